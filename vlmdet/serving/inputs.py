"""A request body -> the image as displayed (RGB), in memory, or a RequestError that says why.

Accepted: `multipart/form-data` with the image in the field `file`, `application/json` with
`{"image": BASE64}` (a `data:image/...;base64,` prefix is allowed), or the raw image bytes with an
`image/*` or `application/octet-stream` type. Nothing is fetched from a URL and nothing touches
the disk.

The body is parsed as it arrives (`read_upload`): only the image's bytes are kept, never more than
`serve.max_body_mb` of body is read (a 413 the moment it is passed, or at once from Content-Length),
and the image's first bytes must be a JPEG, PNG or WebP (vlmdet.serving.formats), else a 415 before the
rest is read. `check_pixels` then reads the size the header declares, again without Pillow, and
refuses more than the server's pixel cap: a 100 KB PNG can declare 20000 x 20000 pixels, 1.2 GB once
decoded to RGB. Only then does `decode` hand the bytes to vlmdet.data.images, the one place that
turns bytes into pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from PIL import Image
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from vlmdet.data.errors import ImageError
from vlmdet.data.images import load_image
from vlmdet.serving.errors import RequestError
from vlmdet.serving.formats import SNIFF_BYTES, header_size, sniff
from vlmdet.serving.jsonbody import JsonImageReader

__all__ = ["FIELD", "RequestError", "Upload", "check_pixels", "decode", "read_upload"]

FIELD = "file"
# ImageError reasons (vlmdet.data.images) -> HTTP status.
IMAGE_STATUS = {"empty-file": 400, "too-large": 413, "truncated": 422, "unreadable": 422}
# Pillow names a JPEG with a Multi-Picture index (many phone cameras write one) MPO.
PILLOW_FORMATS = {"JPEG": {"JPEG", "MPO"}, "PNG": {"PNG"}, "WEBP": {"WEBP"}}


@dataclass
class Upload:
    data: bytes
    name: str
    format: str  # JPEG, PNG or WEBP, from the magic bytes
    draw: bool = False


class _ImageBytes:
    """The image's bytes as they are parsed out of the body; its format is told as soon as its first
    bytes are in, so a GIF, ICO, ... is refused before the rest of the body is read."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.format: str | None = None

    def write(self, data: bytes) -> None:
        self.buf += data
        if self.format is None and len(self.buf) >= SNIFF_BYTES:
            self.format = sniff(self.buf)

    def finish(self) -> tuple[bytes, str]:
        if not self.buf:
            raise RequestError(400, "empty-file", "0 bytes: the image is empty")
        fmt = self.format or sniff(self.buf, final=True)
        data, self.buf = bytes(self.buf), bytearray()  # one immutable copy (Pillow reads bytes without copying)
        return data, fmt


def too_big(limit: int) -> RequestError:
    return RequestError(413, "body-too-large", f"the request body exceeds serve.max_body_mb ({limit / 1e6:g} MB); send "
                                               "a smaller image or raise the setting")


async def read_upload(stream: AsyncIterator[bytes], content_type: str, content_length: str | None, limit: int,
                      draw: bool, count: Callable[[int], None] = lambda n: None) -> Upload:
    """The upload in the body, read chunk by chunk against `limit` bytes of body; `count` hears the size of each
    chunk read."""
    kind = (content_type or "").split(";")[0].strip().lower()
    image = _ImageBytes()
    if kind == "multipart/form-data":
        parser: _Multipart | JsonImageReader | _Raw = _Multipart(content_type, image)
    elif kind == "application/json":
        parser = JsonImageReader(image.write)
    elif kind.startswith("image/") or kind == "application/octet-stream":
        parser = _Raw(image)
    else:
        raise RequestError(415, "unsupported-content-type",
                           f"Content-Type {content_type or '(none)'!r}; send multipart/form-data with the image in the "
                           f"field {FIELD!r}, application/json with {{\"image\": BASE64}}, or the raw image as image/*")
    if content_length and content_length.isdigit() and int(content_length) > limit:
        raise too_big(limit)
    seen = 0
    async for chunk in stream:
        count(len(chunk))
        seen += len(chunk)
        if seen > limit:
            raise too_big(limit)
        parser.feed(chunk)
    if isinstance(parser, JsonImageReader):
        fields = parser.finish()
        name, draw = str(fields.get("name") or "upload"), bool(fields.get("draw", draw))
    else:
        name = parser.finish()
    data, fmt = image.finish()
    return Upload(data, name, fmt, draw)


class _Raw:
    def __init__(self, image: _ImageBytes):
        self.feed = image.write

    def finish(self) -> str:
        return "upload"


class _Multipart:
    """python-multipart's streaming parser; the data of the first part named FIELD goes to the image, other
    parts' data is dropped as it comes (their bytes still count against the body limit)."""

    def __init__(self, content_type: str, image: _ImageBytes):
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise RequestError(400, "malformed-multipart", "multipart/form-data without a boundary parameter")
        self.image, self.names, self.filename = image, [], None
        self.field, self.value, self.headers = b"", b"", {}
        self.state = "before"  # of the FIELD part: before, in (its data goes to the image), after
        self.ended = False  # the closing boundary came

        def on_header_field(data: bytes, start: int, end: int) -> None:
            self.field += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            self.value += data[start:end]

        def on_header_end() -> None:
            self.headers[self.field.lower()] = self.value
            self.field, self.value = b"", b""

        def on_headers_finished() -> None:
            _, disp = parse_options_header(self.headers.get(b"content-disposition", b""))
            name = disp.get(b"name", b"").decode("utf-8", "replace")
            self.names.append(name)
            if name == FIELD and self.state == "before":
                self.state = "in"
                self.filename = disp.get(b"filename", b"upload").decode("utf-8", "replace")
            self.headers = {}

        def on_part_data(data: bytes, start: int, end: int) -> None:
            if self.state == "in":
                self.image.write(data[start:end])

        def on_part_end() -> None:
            if self.state == "in":
                self.state = "after"

        def on_end() -> None:
            self.ended = True

        callbacks = {"on_end": on_end, "on_header_field": on_header_field, "on_header_value": on_header_value,
                     "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
                     "on_part_data": on_part_data, "on_part_end": on_part_end}
        try:
            self.parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        except ValueError as err:
            raise RequestError(400, "malformed-multipart", str(err)) from None

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except (MultipartParseError, ValueError) as err:
            raise RequestError(400, "malformed-multipart", str(err) or type(err).__name__) from None

    def finish(self) -> str:
        try:
            self.parser.finalize()
        except (MultipartParseError, ValueError) as err:
            raise RequestError(400, "malformed-multipart", str(err) or type(err).__name__) from None
        if not self.ended:
            where = f"inside the field {FIELD!r}" if self.state == "in" else "before its closing boundary"
            raise RequestError(400, "malformed-multipart", f"the body ends {where}: the upload was cut off")
        if self.state == "before":
            raise RequestError(400, "missing-file", f"no form field {FIELD!r} in the upload (fields: "
                                                    f"{self.names or 'none'}); send the image as -F {FIELD}=@photo.jpg")
        return self.filename or "upload"


def check_pixels(upload: Upload, cap: int, why: str) -> tuple[int, int]:
    """The (width, height) the image's header declares, read without Pillow; a 413 RequestError when that is
    over `cap` pixels (`why`: where the cap comes from) or over Pillow's decompression-bomb limit, a 422
    when the header is cut off or malformed."""
    width, height = header_size(upload.data, upload.format)
    pixels = width * height
    bomb = Image.MAX_IMAGE_PIXELS
    if bomb and pixels > bomb:
        raise RequestError(413, "too-large", f"{width}x{height} is {pixels:,} pixels, over Pillow's decompression-bomb "
                                             f"limit ({bomb:,}); this server takes at most {cap:,} pixels ({why}): "
                                             "send a smaller image")
    if pixels > cap:
        scale = math.sqrt(cap / pixels)
        raise RequestError(413, "too-large", f"{width}x{height} is {pixels:,} pixels; this server takes at most "
                                             f"{cap:,} ({why}): downscale it to at most "
                                             f"{max(1, int(width * scale))}x{max(1, int(height * scale))} and send "
                                             "it again")
    return width, height


def decode(upload: Upload):
    """The RGB image as displayed; a RequestError with the image's reason otherwise."""
    try:
        image, fmt, _ = load_image(upload.data)
    except ImageError as err:
        status = IMAGE_STATUS.get(err.reason, 422)
        detail = err.detail
        if err.reason == "too-large":
            detail += " (Pillow's decompression-bomb limit, Image.MAX_IMAGE_PIXELS)"
        elif "cannot identify image file" in detail:  # Pillow names the BytesIO object: say what it means
            detail = f"Pillow cannot read this {upload.format} file (cannot identify image file)"
        raise RequestError(status, err.reason, detail) from None
    if fmt not in PILLOW_FORMATS[upload.format]:  # the magic bytes and Pillow's reader must agree
        raise RequestError(415, "unsupported-format", f"the file starts like a {upload.format} but Pillow read it as "
                                                      f"{fmt}; send a plain JPEG, PNG or WebP")
    return image
