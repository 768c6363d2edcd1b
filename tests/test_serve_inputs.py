"""`vlmdet serve`'s request bodies, without a server: read as they arrive against the byte cap, the JSON
form's base64 decoded in pieces, only JPEG, PNG and WebP let through (by their magic bytes), and each
one's size read from its header without Pillow.

The builders of refused files (ICO and ICNS holding a 9000 x 9000 PNG, headers declaring huge sizes)
are used by tests/test_serve.py and tests/test_serve_bounded.py against a live server too.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import random
import struct
import zlib

import httpx
import pytest
from PIL import Image

from data_fixtures import encode, noise

MB = 1_000_000


def serving():
    """vlmdet.serving's readers, imported when a test runs: tests/test_serve.py imports this module's file
    builders alone."""
    from vlmdet.serving import errors, formats, inputs

    return errors, formats, inputs


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zeros_zlib(n: int) -> bytes:
    """A zlib stream of n zero bytes in milliseconds: after a full flush deflate forgets its history, so every
    1 MB block of zeros compresses to the same bytes, written once and repeated (zlib over 324 MB takes
    seconds); adler32 of n zeros is n mod 65521 in its high half and 1 in its low half."""
    block = 1 << 20
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = deflate.compress(b"\0" * block) + deflate.flush(zlib.Z_FULL_FLUSH)
    tail = deflate.compress(b"\0" * (n % block)) + deflate.flush()
    return b"\x78\xda" + piece * (n // block) + tail + struct.pack(">I", (n % 65521) << 16 | 1)


def flat_rgba_png(width: int, height: int) -> bytes:
    """A valid one-colour RGBA PNG: 4 bytes a pixel decoded, ~1/1000 of that on the wire."""
    idat = zeros_zlib(height * (1 + 4 * width))  # each row: filter byte 0, then transparent black pixels
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def ico_holding(png: bytes) -> bytes:
    """An ICO whose one entry (declared 256 x 256) is `png`: Pillow's Image.open decodes it to open the file."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def icns_holding(png: bytes) -> bytes:
    """An ICNS whose 512 x 512 entry (ic09) is `png`, of whatever size: Pillow decodes that on load."""
    entry = b"ic09" + struct.pack(">I", 8 + len(png)) + png
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


def png_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_declaring(width: int, height: int, behind_small_frame: bool = False) -> bytes:
    """A JPEG whose frame header (SOF0) says width x height; with `behind_small_frame`, a first SOF0 of
    8 x 8 comes before it (Pillow takes the last one)."""
    data = encode(Image.new("RGB", (8, 8)), "JPEG")
    sof = data.index(b"\xff\xc0")
    length = struct.unpack(">H", data[sof + 2:sof + 4])[0]
    frame = bytearray(data[sof:sof + 2 + length])
    frame[5:9] = struct.pack(">HH", height, width)
    first = data[sof:sof + 2 + length] if behind_small_frame else b""
    return data[:sof] + first + bytes(frame) + data[sof + 2 + length:]


def webp_declaring(width: int, height: int, kind: str) -> bytes:
    """A WebP whose first chunk (VP8 lossy, VP8L lossless, or VP8X extended) declares width x height."""
    if kind == "VP8L":
        data = bytearray(encode(Image.new("RGB", (8, 8)), "WEBP", lossless=True))
        assert data[12:16] == b"VP8L"
        bits = int.from_bytes(data[21:25], "little") & ~((1 << 28) - 1)
        data[21:25] = (bits | (width - 1) | ((height - 1) << 14)).to_bytes(4, "little")
        return bytes(data)
    data = bytearray(encode(Image.new("RGB", (8, 8)), "WEBP", quality=80))
    assert data[12:16] == b"VP8 "
    if kind == "VP8":
        data[26:30] = struct.pack("<HH", width, height)
        return bytes(data)
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0" * 4 + (width - 1).to_bytes(3, "little") + \
        (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + bytes(data[12:])
    return b"RIFF" + struct.pack("<I", len(body)) + body


def huge_headers() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """name -> (a file of a few hundred bytes, the size its header declares)."""
    return {"png-20000x20000": (png_declaring(20000, 20000), (20000, 20000)),
            "jpeg-60000x60000": (jpeg_declaring(60000, 60000), (60000, 60000)),
            "jpeg-second-frame": (jpeg_declaring(30000, 20000, behind_small_frame=True), (30000, 20000)),
            "webp-vp8-16383": (webp_declaring(16383, 16383, "VP8"), (16383, 16383)),
            "webp-vp8l-16384": (webp_declaring(16384, 16384, "VP8L"), (16384, 16384)),
            "webp-vp8x-9000": (webp_declaring(9000, 9000, "VP8X"), (9000, 9000))}


@functools.lru_cache(maxsize=1)
def real_images() -> dict[str, bytes]:
    """Files of each allowed format as encoders write them (Pillow's size is the truth for these)."""
    photo = noise((37, 23), 1)
    rgba = photo.convert("RGBA")
    frames = [noise((37, 23), s) for s in (2, 3)]
    return {
        "baseline.jpg": encode(photo, "JPEG"), "progressive.jpg": encode(photo, "JPEG", progressive=True),
        "exif-icc.jpg": encode(photo, "JPEG", orientation=6, icc_profile=b"\0" * 200_000),  # 4 APP2 segments
        "cmyk.jpg": encode(photo.convert("CMYK"), "JPEG"), "grey.jpg": encode(photo.convert("L"), "JPEG"),
        "mpo.jpg": encode(photo, "MPO", save_all=True, append_images=frames[:1]),
        "rgb.png": encode(photo, "PNG"), "rgba.png": encode(rgba, "PNG"), "palette.png": encode(photo.quantize(16), "PNG"),
        "apng.png": encode(photo, "PNG", save_all=True, append_images=frames),
        "lossy.webp": encode(photo, "WEBP"), "lossless.webp": encode(photo, "WEBP", lossless=True),
        "alpha.webp": encode(rgba, "WEBP"), "animated.webp": encode(photo, "WEBP", save_all=True, append_images=frames),
    }


class Body:
    """An async body in chunks that records how many bytes the reader took from it."""

    def __init__(self, data: bytes, chunk: int):
        self.data, self.chunk, self.taken = data, chunk, 0

    async def __aiter__(self):
        for i in range(0, len(self.data), self.chunk):
            piece = self.data[i:i + self.chunk]
            self.taken += len(piece)
            yield piece


def read(data: bytes, content_type: str, chunk: int = 4096, limit: int = 10 * MB, length: bool = True,
         body: Body | None = None):
    body = body or Body(data, chunk)
    return asyncio.run(serving()[2].read_upload(body, content_type, str(len(data)) if length else None, limit, False))


def refused(status: int, reason: str, *args, **kwargs):
    with pytest.raises(serving()[0].RequestError) as err:
        read(*args, **kwargs)
    assert (err.value.status, err.value.reason) == (status, reason), err.value.detail
    return err.value


def multipart(files: dict, data: dict | None = None) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/detect", files=files, data=data)
    return request.read(), request.headers["content-type"]


@pytest.mark.parametrize("name", sorted(real_images()))
def test_the_header_size_is_pillows_size_for_every_encoder_output(name):
    _, formats, _ = serving()
    data = real_images()[name]
    fmt = formats.sniff(data)
    with Image.open(io.BytesIO(data)) as im:
        assert fmt == {"MPO": "JPEG"}.get(im.format, im.format)
        assert formats.header_size(data, fmt) == im.size


@pytest.mark.parametrize("name", sorted(huge_headers()))
def test_huge_declared_sizes_are_refused_from_the_header_without_pillow(name, monkeypatch):
    errors, formats, inputs = serving()
    data, size = huge_headers()[name]
    assert len(data) < 1000

    def no_pillow(*args, **kwargs):
        raise AssertionError("Pillow opened an image that its header already refuses")

    monkeypatch.setattr(Image, "open", no_pillow)
    upload = read(data, "image/x-anything")
    assert formats.header_size(upload.data, upload.format) == size
    with pytest.raises(errors.RequestError) as err:
        inputs.check_pixels(upload, 12_845_056, "the test's cap")
    assert (err.value.status, err.value.reason) == (413, "too-large")
    assert f"{size[0]}x{size[1]}" in err.value.detail and "12,845,056" in err.value.detail


def test_formats_outside_the_allow_list_are_refused_from_their_first_bytes():
    ico = ico_holding(flat_rgba_png(64, 64))
    gif, bmp, tiff = (encode(noise((8, 8)), f) for f in ("GIF", "BMP", "TIFF"))
    padding = b"\0" * (2 * MB)
    for data, what in ((ico, "ICO"), (icns_holding(flat_rgba_png(64, 64)), "ICNS"), (gif, "GIF"), (bmp, "BMP"),
                       (tiff, "TIFF"), (b"\0\0\0\x18ftypheic" + b"\0" * 20, "HEIC"), (b"<svg xmlns=", "text")):
        body = Body(data + padding, 4096)  # a 2 MB body: the refusal comes with its first chunk
        err = refused(415, "unsupported-format", data + padding, "image/png", body=body)
        assert what in err.detail and "JPEG, PNG and WebP" in err.detail
        assert body.taken == 4096, what
        # the same file in a multipart upload and in JSON: refused as the image's first bytes are parsed
        mp, kind = multipart({"file": ("x", data + padding)})
        body = Body(mp, 4096)
        refused(415, "unsupported-format", mp, kind, body=body)
        assert body.taken == 4096, what
        doc = json.dumps({"image": base64.b64encode(data + padding).decode()}).encode()
        body = Body(doc, 4096)
        refused(415, "unsupported-format", doc, "application/json", body=body)
        assert body.taken == 4096, what


def test_bodies_are_refused_the_moment_they_pass_the_cap():
    jpeg = encode(noise((64, 48)), "JPEG")
    big = jpeg + b"\0" * (3 * MB)
    # Content-Length over the cap: refused before a byte is read
    body = Body(big, 64 * 1024)
    refused(413, "body-too-large", big, "image/jpeg", limit=MB, body=body)
    assert body.taken == 0
    # no Content-Length (chunked): refused with the chunk that passes the cap, the rest never read
    for chunk in (1000, 64 * 1024):
        for data, kind in ((big, "image/jpeg"), multipart({"file": ("a.jpg", big)}),
                           (json.dumps({"image": base64.b64encode(big).decode()}).encode(), "application/json")):
            body = Body(data, chunk)
            refused(413, "body-too-large", data, kind, limit=MB, length=False, body=body)
            assert MB < body.taken <= MB + chunk
    # exactly the cap is read
    at_cap = jpeg + b"\0" * (MB - len(jpeg))
    assert read(at_cap, "image/jpeg", limit=MB).data == at_cap


def test_json_image_is_decoded_in_pieces_as_json_loads_and_b64decode_would():
    jpeg = encode(noise((40, 30)), "JPEG")
    b64 = base64.b64encode(jpeg).decode()
    docs = [{"image": b64}, {"name": "x.jpg", "image": "data:image/jpeg;base64," + b64, "draw": True},
            {"meta": {"image": "not this one", "s": "}\"]", "n": [1, 2.5e3, None]}, "image": b64, "draw": False}]
    rng = random.Random(0)
    for doc in docs:
        texts = [json.dumps(doc), json.dumps(doc, indent=2), json.dumps(doc).replace("/", "\\/"),  # PHP escapes /
                 "\ufeff" + json.dumps(doc)]
        for text in texts:
            for chunk in (1, 2, 3, 5, 7, rng.randint(8, 300), 10 ** 6):
                upload = read(text.encode(), "application/json", chunk)
                assert upload.data == jpeg and upload.format == "JPEG", (text[:60], chunk)
                assert (upload.name, upload.draw) == (doc.get("name", "upload"), doc.get("draw", False))


@pytest.mark.parametrize("body, status, reason", [
    (b'{"image": ', 400, "malformed-json"), (b"", 400, "malformed-json"), (b'{"a": 1,}', 400, "malformed-json"),
    (b'{"image": "QUJD"} trailing', 400, "malformed-json"), (b'{"image": "QUJD", "image": "QUJD"}', 400, "malformed-json"),
    (b'{"picture": "abc"}', 400, "missing-image"), (b"[1, 2]", 400, "missing-image"), (b'{"image": 5}', 400, "missing-image"),
    (b'{"image": "not base64 at all!"}', 400, "bad-base64"), (b'{"image": "QUJ"}', 400, "bad-base64"),
    (b'{"image": "QQ==QQ=="}', 400, "bad-base64"), (b'{"image": "QU\\nJD"}', 400, "bad-base64"),
    (b'{"image": "QU\\u004aD"}', 400, "bad-base64"), (b'{"image": ""}', 400, "empty-file"),
    (b'{"image": "data:image/png;base64,"}', 400, "empty-file"),
    (b'{"note": "' + b"x" * 70_000 + b'", "image": "QUJD"}', 400, "malformed-json"),
])
def test_json_errors_name_what_is_wrong(body, status, reason):
    errors = [refused(status, reason, body, "application/json", chunk) for chunk in (1, 3, 4096)]
    # a sentence saying what is wrong, however the body arrived; a field's error names the field
    named = "image" if reason in ("bad-base64", "empty-file", "missing-image") else ""
    assert all(e.detail and named in e.detail for e in errors), [e.detail for e in errors]


def test_multipart_file_is_streamed_out_of_the_body_at_any_chunk_size():
    jpeg = encode(noise((40, 30)), "JPEG")
    data, kind = multipart({"other": ("o.bin", b"\xff\xd8\xff" * 300), "file": ("photo.jpg", jpeg)},
                           data={"note": "x" * 5000})
    for chunk in (1, 7, 100, 4096, 10 ** 6):
        upload = read(data, kind, chunk)
        assert (upload.data, upload.name, upload.format) == (jpeg, "photo.jpg", "JPEG"), chunk
    cut = refused(400, "malformed-multipart", data[:data.index(jpeg) + 100], kind)
    assert "inside the field 'file'" in cut.detail
    refused(400, "malformed-multipart", data[:-10], kind)  # the closing boundary cut
    wrong, kind2 = multipart({"image": ("a.jpg", jpeg)})
    err = refused(400, "missing-file", wrong, kind2)
    assert "['image']" in err.detail
    refused(400, "malformed-multipart", b"--xyz\r\nnonsense", "multipart/form-data")
    refused(400, "empty-file", *multipart({"file": ("z.jpg", b"")}))
    refused(415, "unsupported-content-type", jpeg, "text/plain")
