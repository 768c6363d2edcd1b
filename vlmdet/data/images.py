"""Open any image the way a viewer would show it: RGB, EXIF orientation applied.

Real product photos come as CMYK JPEGs, 16-bit greyscale PNGs, palette GIFs with a transparent
colour, RGBA screenshots and phone JPEGs whose pixels are stored sideways with an EXIF
orientation tag. Everything downstream (boxes, the processor, drawing) assumes the image as
displayed, so this is the one place that turns a file into pixels.
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from vlmdet.data.errors import ImageError

# EXIF tag 0x0112: values 5-8 store the pixels transposed (width and height swap when displayed).
ORIENTATION_TAG = 0x0112


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
    if isinstance(source, bytes):
        if not source:
            raise ImageError("empty-file", "0 bytes")
        fh: io.BytesIO | Path = io.BytesIO(source)
    else:
        fh = Path(source)
        if fh.stat().st_size == 0:
            raise ImageError("empty-file", f"{fh} has 0 bytes")
    try:
        # Pillow warns between MAX_IMAGE_PIXELS and twice that, and raises above; both are "too
        # large" here. The filter is local: the global limit stays in force for everyone else.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fh)
        with im:  # closes the file even for multi-frame formats (GIF, TIFF) that keep it open
            im.load()
            fmt = im.format
            orientation = im.getexif().get(ORIENTATION_TAG, 1)
            try:
                shown = ImageOps.exif_transpose(im)  # a new image: it outlives the file
            except Exception:  # a corrupt EXIF block: keep the stored orientation rather than lose the image
                shown, orientation = im.copy(), 1
            mode = im.mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError("too-large", str(err)) from err
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, struct.error...
        message = str(err) or type(err).__name__
        reason = "truncated" if _looks_truncated(message) else "unreadable"
        raise ImageError(reason, message) from err
    rgb = to_rgb(shown)
    changed = mode != "RGB" or orientation not in (None, 1)
    return rgb, fmt, changed


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


# --- the copies at the model's pixel budget (train.pre_resize) ----------------------------------------------------
def resized_copy(src: str, width: int, height: int, family: str, min_pixels: int, max_pixels: int,
                 cache_dir: Path) -> str:
    """The image at the size the processor resizes it to (same resampling), stored once in cache_dir.

    The processor's own resize of a picture already at its target size is the identity, so what the
    model sees is the same; the answer is rendered from the original width/height, not the copy's.
    Returns src itself when no resize would happen.
    """
    from vlmdet.formats.resize import factor, smart_resize

    h, w = smart_resize(height, width, factor=factor(family), min_pixels=min_pixels, max_pixels=max_pixels)
    if (w, h) == (width, height):
        return src
    st = os.stat(src)
    dst = cache_dir / f"{Path(src).stem}-{st.st_size}-{st.st_mtime_ns}-{w}x{h}.bmp"
    if not dst.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        # bicubic, as Qwen2VLImageProcessor resizes. Stored uncompressed, so the pixels are exactly these and
        # neither writing nor the collator's read of every epoch pays for zlib: a 756x1008 copy is 2.1 MB against
        # PNG's 1.0 MB, and ~1 ms to write or read against PNG's ~53 and ~23 (benchmarks/pre_resize_bench.py)
        im = open_image(src).resize((w, h), Image.Resampling.BICUBIC)
        tmp = dst.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
        im.save(tmp, format="BMP")
        os.replace(tmp, dst)  # atomic: ranks of a multi-GPU run, or two threads, may write the same file
    return str(dst)


_AHEAD: dict[Path, Future] = {}  # cache folder -> the copies being made ahead (resize_ahead)


def resized_copies(images: Sequence[tuple[str, int, int]], family: str, min_pixels: int, max_pixels: int,
                   cache_dir: Path) -> list[str]:
    """resized_copy of every (file, width, height), in threads (decoding and resizing release the GIL), in order.
    Copies that resize_ahead is still making for cache_dir are waited for, not made twice."""
    ahead = _AHEAD.pop(Path(cache_dir), None)
    if ahead is not None:
        ahead.result()  # its error (an unreadable photo) is this call's
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda i: resized_copy(*i, family, min_pixels, max_pixels, cache_dir), images))


def resize_ahead(images: Sequence[tuple[str, int, int]], family: str, min_pixels: int, max_pixels: int,
                 cache_dir: Path) -> None:
    """Start making the copies in the background; resized_copies for the same folder waits for them. The train
    child starts them before it imports torch, transformers, TRL and PEFT (seconds of one core)."""
    cache_dir = Path(cache_dir)
    runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resize-ahead")
    _AHEAD[cache_dir] = runner.submit(resized_copies, list(images), family, min_pixels, max_pixels, cache_dir)
    runner.shutdown(wait=False)
