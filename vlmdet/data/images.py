"""Open any image the way a viewer would show it: RGB, EXIF orientation applied.

Real product photos come as CMYK JPEGs, 16-bit greyscale PNGs, palette GIFs with a transparent
colour, RGBA screenshots and phone JPEGs whose pixels are stored sideways with an EXIF
orientation tag. Everything downstream (boxes, the processor, drawing) assumes the image as
displayed, so this is the one place that turns a file into pixels.
"""
from __future__ import annotations

import hashlib
import io
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from vlmdet.data.errors import ImageError

# EXIF tag 0x0112: values 5-8 store the pixels transposed (width and height swap when displayed).
ORIENTATION_TAG = 0x0112
_BOMB_CHECK = threading.Lock()


def content_hash(path: str | Path) -> str:
    """sha256 of the file's bytes (duplicates are found by this, before decoding)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def open_image(path: str | Path) -> Image.Image:
    """The image as displayed, in RGB. Raises ImageError(reason, detail) when it cannot be used."""
    return load_image(path)[0]


def load_image(source: str | Path | bytes) -> tuple[Image.Image, str | None, bool]:
    """(RGB image as displayed, the file's format e.g. "JPEG", whether pixels differ from the file's).

    The third value tells prepare() whether the file's bytes can be kept as they are: only an RGB
    file without a rotating EXIF tag is already in normalised form.
    """
    name = None
    if not isinstance(source, bytes):
        name = str(source)
        # the bytes in memory, the file closed at once (multi-frame formats such as GIF, TIFF and phones' MPO
        # JPEGs keep their file open otherwise): the decoded image needs no copy to outlive the file
        try:
            with open(name, "rb") as fh:
                source = fh.read()
        except FileNotFoundError:  # not an image's fault: the caller says the file is missing
            raise
        except OSError as err:  # a folder, a file the worker may not read
            raise ImageError("unreadable", str(err) or type(err).__name__) from err
    if not source:
        raise ImageError("empty-file", f"{name} has 0 bytes" if name else "0 bytes")
    try:
        # Pillow warns between MAX_IMAGE_PIXELS and twice that, and raises above; both are "too
        # large" here. The filter is local: the global limit stays in force for everyone else.
        # The filter is process-wide state: one thread at a time (prepare and the training copies decode in threads)
        with _BOMB_CHECK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(_Bytes(source, name))  # the header only: the lock is held for microseconds
        im.load()
        fmt, mode = im.format, im.mode
        orientation = im.getexif().get(ORIENTATION_TAG, 1)
        shown = im
        try:
            ImageOps.exif_transpose(im, in_place=True)  # no copy of the pixels where nothing turns
        except Exception:  # a corrupt EXIF block: keep the stored orientation rather than lose the image
            shown, orientation = Image.open(_Bytes(source, name)), 1  # as stored, whatever the failed turn did
            shown.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError("too-large", str(err)) from err
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, struct.error...
        message = str(err) or type(err).__name__
        reason = "truncated" if _looks_truncated(message) else "unreadable"
        raise ImageError(reason, message) from err
    rgb = to_rgb(shown)
    if getattr(rgb, "n_frames", 1) > 1:  # a multi-frame image (TIFF pages, a phone's MPO) keeps the file's bytes to
        rgb = rgb.copy()  # seek its other frames: its first frame alone, so an image held holds only its pixels
    changed = mode != "RGB" or orientation not in (None, 1)
    return rgb, fmt, changed


class _Bytes(io.BytesIO):
    """A file's bytes that Pillow's messages name as the file ("cannot identify image file '/data/x.jpg'")."""

    def __init__(self, data: bytes, name: str | None):
        super().__init__(data)
        self.label = name

    def __repr__(self) -> str:
        return repr(self.label) if self.label else "<bytes>"


def _looks_truncated(message: str) -> bool:
    lowered = message.lower()
    return any(s in lowered for s in ("truncated", "broken data stream", "premature end", "unexpected end"))


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB pixels for any Pillow mode: alpha is composited on white, 16-bit scaled to 8-bit."""
    if im.mode == "RGB":
        return im
    if (im.mode == "P" and "transparency" in im.info) or im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        # convert("L") would clip 16-bit values at 255 (an almost white picture); scale instead.
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if im.mode == "F":
            low, top = float(arr.min(initial=0)), float(arr.max(initial=1))
            arr = arr - low
            top = max(top - low, 1e-12)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return im.convert("RGB")
