"""The image formats the server decodes (JPEG, PNG, WebP), told from a file's first bytes, and the size
each declares, read from its header by this module without Pillow.

Pillow reads dozens of formats, and its "lazy" `Image.open` is lazy only for some (measured with
Pillow 13.0): opening an ICO decodes its first entry, so a 307 KB ICO holding a 9000 x 9000 PNG cost
315 MB and seconds inside `Image.open`; an ICNS declares 512 x 512 and decodes the 81 MP PNG it holds
on load; and opening a WebP hands the whole file to libwebp's animation decoder, which reserves 8
bytes a pixel of the canvas at once (617 MB of address space for 34 bytes declaring 9000 x 9000).
Its open of PNG and JPEG reads only the header, but it is not called here either: the format is told
from the magic bytes, the size from the format's own header fields, and Pillow sees only a file that
passed both.
"""
from __future__ import annotations

import struct

from vlmdet.serving.errors import RequestError

ALLOWED = ("JPEG", "PNG", "WEBP")
SNIFF_BYTES = 12  # "RIFF" size "WEBP": the longest magic of the three
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# Formats a client may plausibly send, named in the 415 so that it says what the file is.
OTHERS = ((b"\0\0\1\0", "an ICO icon"), (b"icns", "an ICNS icon"), (b"GIF8", "a GIF"), (b"BM", "a BMP"),
          (b"II*\0", "a TIFF"), (b"MM\0*", "a TIFF"), (b"\0\0\0\x0cjP  ", "a JPEG 2000"),
          (b"\xffO\xffQ", "a JPEG 2000"), (b"8BPS", "a Photoshop file"), (b"%PDF", "a PDF"),
          (b"\x1a\x45\xdf\xa3", "a video"), (b"<", "text (HTML/SVG/XML)"))
FTYP = {b"heic": "a HEIC photo", b"heix": "a HEIC photo", b"mif1": "a HEIF image", b"avif": "an AVIF image",
        b"qt  ": "a video", b"isom": "a video", b"mp42": "a video"}
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic...): C0-CF less DHT, JPG and DAC.
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
STANDALONE = frozenset(range(0xD0, 0xDA)) | {0x01}  # RSTn, SOI, EOI, TEM: no length field


def sniff(head: bytes | bytearray, final: bool = False) -> str | None:
    """"JPEG", "PNG" or "WEBP" from the first bytes; None while fewer than SNIFF_BYTES came and they may
    still be one (with `final`, a short file that begins like one is that format: its header check says
    it is cut off). Any other file is a 415 RequestError that names what it looks like."""
    head = bytes(head[:SNIFF_BYTES])
    if head.startswith(JPEG_MAGIC):
        return "JPEG"
    if head.startswith(PNG_MAGIC):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if len(head) < SNIFF_BYTES:
        for fmt, magic in (("JPEG", JPEG_MAGIC), ("PNG", PNG_MAGIC), ("WEBP", b"RIFF")):
            if magic[:len(head)] == head[:len(magic)]:
                return fmt if final else None
    what = next((name for magic, name in OTHERS if head.startswith(magic)), None)
    if what is None and head[4:8] == b"ftyp":
        what = FTYP.get(head[8:12], "an ISO media file (HEIF/AVIF/MP4)")
    what = what or f"not a JPEG, PNG or WebP file (it starts {head[:8].hex(' ')})"
    raise RequestError(415, "unsupported-format",
                       f"the image is {what}; this server decodes only JPEG, PNG and WebP, and refuses other formats "
                       "before decoding (Pillow's readers of some decode the whole image to open it): convert it "
                       "to JPEG or PNG and send it again")


def header_size(data: bytes, fmt: str) -> tuple[int, int]:
    """(width, height) the file's header declares, without decoding; a 422 RequestError when the
    header is cut off ("truncated") or malformed ("unreadable")."""
    return {"JPEG": _jpeg_size, "PNG": _png_size, "WEBP": _webp_size}[fmt](data)


def _cut(fmt: str, what: str) -> RequestError:
    return RequestError(422, "truncated", f"the {fmt} file ends inside its header ({what})")


def _bad(fmt: str, what: str) -> RequestError:
    return RequestError(422, "unreadable", f"not a readable {fmt} file: {what}")


def _png_size(data: bytes) -> tuple[int, int]:
    # The signature, then IHDR, which the PNG specification puts first: length, "IHDR", width, height.
    if len(data) < 24:
        raise _cut("PNG", "no complete IHDR chunk")
    if data[12:16] != b"IHDR":
        raise _bad("PNG", f"its first chunk is {data[12:16]!r}, not IHDR")
    return struct.unpack(">II", data[16:24])


def _webp_size(data: bytes) -> tuple[int, int]:
    # RIFF header (12 bytes), then the first chunk's fourcc and length; its payload starts at 20.
    if len(data) < 30:
        raise _cut("WebP", "no complete first chunk header")
    kind = data[12:16]
    if kind == b"VP8X":  # extended (alpha, animation, metadata): the canvas, 24-bit width-1 and height-1
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if kind == b"VP8 ":  # lossy: 3-byte frame tag, start code 9d 01 2a, then 14-bit width and height
        if data[23:26] != b"\x9d\x01\x2a":
            raise _bad("WebP", "the VP8 frame has no start code")
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8L":  # lossless: signature 0x2f, then width-1 and height-1 in 14 bits each
        if data[20] != 0x2F:
            raise _bad("WebP", "the VP8L bitstream has no signature")
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    raise _bad("WebP", f"its first chunk is {kind!r}, not VP8, VP8L or VP8X")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """The largest frame header (SOFn) before the first scan. Walks the segments as Pillow does (bytes
    between segments that are not 0xFF are skipped, 0xFF fill bytes too), so a second SOF that Pillow
    would take cannot hide behind a small first one."""
    sizes: list[tuple[int, int]] = []
    i, n = 2, len(data)
    while True:
        while i < n and data[i] != 0xFF:  # junk between segments
            i += 1
        while i < n and data[i] == 0xFF:
            i += 1
        if i >= n:
            raise _cut("JPEG", "no start of scan after the frame header" if sizes else "no frame header (SOF)")
        marker = data[i]
        i += 1
        if marker == 0 or marker in STANDALONE:  # EOI included: Pillow reads on after it, so does this
            continue
        if i + 2 > n:
            raise _cut("JPEG", f"segment {marker:02X} has no length")
        length = struct.unpack(">H", data[i:i + 2])[0]
        if length < 2:
            raise _bad("JPEG", f"segment {marker:02X} declares {length} bytes")
        if marker in SOF_MARKERS:
            if i + 7 > n:
                raise _cut("JPEG", "the frame header")
            height, width = struct.unpack(">HH", data[i + 3:i + 7])
            sizes.append((width, height))
        if marker == 0xDA:  # start of scan: the compressed pixels follow
            break
        i += length
    if not sizes:
        raise _bad("JPEG", "no frame header (SOF) before the image data")
    return max(sizes, key=lambda wh: wh[0] * wh[1])
