"""A request body -> the image as displayed (RGB), in memory, or a RequestError that says why.

Accepted: `multipart/form-data` with the image in the field `file`, `application/json` with
`{"image": BASE64}` (a `data:image/...;base64,` prefix is allowed), or the raw image bytes with an
`image/*` or `application/octet-stream` type. Nothing is fetched from a URL and nothing touches
the disk: the body is read into memory up to `serve.max_body_mb` (Starlette's own form parser
would spool uploads over 1 MB to a temporary file), then decoded by vlmdet.data.images, the one
place that turns bytes into pixels, with its decompression-bomb guard. Before that, `check_pixels`
reads the image's size from its header alone and refuses more than the server's pixel cap: a
100 KB PNG can declare 20000 x 20000 pixels, 1.2 GB once decoded to RGB.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import warnings
from dataclasses import dataclass
from typing import AsyncIterator

from PIL import Image
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from vlmdet.data.errors import ImageError
from vlmdet.data.images import load_image

FIELD = "file"
# Bodies over the limit are still read (and dropped) up to this many times the limit, so the client
# hears the 413 instead of a connection reset while it is still sending.
DRAIN_FACTOR = 4


class RequestError(Exception):
    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.status, self.reason, self.detail = status, reason, detail


# ImageError reasons (vlmdet.data.images) -> HTTP status.
IMAGE_STATUS = {"empty-file": 400, "too-large": 413, "truncated": 422, "unreadable": 422}


@dataclass
class Upload:
    data: bytes
    name: str
    draw: bool = False


async def read_body(stream: AsyncIterator[bytes], content_length: str | None, limit: int) -> bytes:
    too_big = RequestError(413, "body-too-large", f"the request body exceeds serve.max_body_mb ({limit / 1e6:g} MB); "
                                                  "send a smaller image or raise the setting")
    if content_length and content_length.isdigit() and int(content_length) > limit * DRAIN_FACTOR:
        raise too_big
    buf, seen = bytearray(), 0
    async for chunk in stream:
        seen += len(chunk)
        if seen <= limit:
            buf += chunk
        elif seen > limit * DRAIN_FACTOR:
            break
    if seen > limit:
        raise too_big
    return bytes(buf)


def parse_upload(body: bytes, content_type: str, draw_param: bool) -> Upload:
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return Upload(*_multipart_file(body, content_type), draw=draw_param)
    if kind == "application/json":
        return _json(body, draw_param)
    if kind.startswith("image/") or kind == "application/octet-stream":
        return Upload(body, "upload", draw_param)
    raise RequestError(415, "unsupported-content-type",
                       f"Content-Type {content_type or '(none)'!r}; send multipart/form-data with the image in the "
                       f"field {FIELD!r}, application/json with {{\"image\": BASE64}}, or the raw image as image/*")


def _multipart_file(body: bytes, content_type: str) -> tuple[bytes, str]:
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "malformed-multipart", "multipart/form-data without a boundary parameter")
    parts: list[dict] = []
    header: dict = {}

    def on_part_begin() -> None:
        parts.append({"headers": {}, "data": bytearray()})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] = header.get("field", b"") + data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] = header.get("value", b"") + data[start:end]

    def on_header_end() -> None:
        parts[-1]["headers"][header.pop("field", b"").lower()] = header.pop("value", b"")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"] += data[start:end]

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end, "on_part_data": on_part_data}
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError) as err:
        raise RequestError(400, "malformed-multipart", str(err) or type(err).__name__) from None
    names = []
    for part in parts:
        _, disp = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        names.append(name)
        if name == FIELD:
            return bytes(part["data"]), disp.get(b"filename", b"upload").decode("utf-8", "replace")
    raise RequestError(400, "missing-file", f"no form field {FIELD!r} in the upload (fields: {names or 'none'}); "
                                            f"send the image as -F {FIELD}=@photo.jpg")


def _json(body: bytes, draw_param: bool) -> Upload:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, "malformed-json", f"the body is not JSON: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("image"), str):
        raise RequestError(400, "missing-image", 'expected a JSON object {"image": BASE64 of the image bytes}')
    data = doc["image"]
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, "bad-base64", f"the field 'image' is not valid base64: {err}") from None
    draw = doc.get("draw", draw_param)
    return Upload(raw, str(doc.get("name") or "upload"), bool(draw))


def check_pixels(data: bytes, cap: int, why: str) -> tuple[int, int] | None:
    """The (width, height) the image's header declares, read without decoding a pixel; a 413
    RequestError when that is over `cap` pixels (`why`: where the cap comes from) or over Pillow's
    decompression-bomb limit. None when the header cannot be read: `decode` then says why."""
    if not data:
        return None
    try:
        # Image.open is lazy: it parses the header (PNG chunks up to IDAT, JPEG markers up to SOF)
        # and allocates no pixels until load(). Its bomb check runs here, on the declared size: an
        # error above 2x Image.MAX_IMAGE_PIXELS, a warning above 1x, both "too large" as in
        # vlmdet.data.images (the filter is local, the global limit stays as it is).
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RequestError(413, "too-large", f"{err} (Pillow's decompression-bomb limit); this server takes at most "
                                             f"{cap:,} pixels ({why}): send a smaller image") from None
    except Exception:  # noqa: BLE001 - not an image Pillow can open: decode() gives the reason and status
        return None
    if width * height > cap:
        scale = math.sqrt(cap / (width * height))
        raise RequestError(413, "too-large", f"{width}x{height} is {width * height:,} pixels; this server takes at "
                                             f"most {cap:,} ({why}): downscale it to at most "
                                             f"{max(1, int(width * scale))}x{max(1, int(height * scale))} and send "
                                             "it again")
    return width, height


def decode(data: bytes):
    """The RGB image as displayed; a RequestError with the image's reason otherwise."""
    try:
        image, _, _ = load_image(data)
    except ImageError as err:
        status = IMAGE_STATUS.get(err.reason, 422)
        detail = err.detail
        if err.reason == "too-large":
            detail += " (Pillow's decompression-bomb limit, Image.MAX_IMAGE_PIXELS)"
        elif "cannot identify image file" in detail:  # Pillow names the BytesIO object: say what it means
            detail = "not an image in a format Pillow can read (cannot identify image file)"
        raise RequestError(status, err.reason, detail) from None
    return image
