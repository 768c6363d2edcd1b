"""`{"image": BASE64, "draw": true, "name": "photo.jpg"}` read as it arrives, the image decoded from
base64 chunk by chunk.

`json.loads` of a 20 MB body holds the body, its text and the image's string at once (~3 x the body),
then the decoded bytes. Here the image's string is never held: its base64 goes through a small
carry-over into the decoded bytes (3/4 of it) as each chunk comes, so a request never holds more than
the image plus one chunk. The rest of the document (other keys and values, which may be any JSON) is
held and parsed with `json.loads`, up to OTHER_LIMIT bytes.

The image's string may start with a `data:image/...;base64,` prefix and may escape `/` as `\\/` (PHP's
json_encode does); it must be strict base64 otherwise, as `base64.b64decode(..., validate=True)` asks: no
line breaks, and no other escape (base64 needs none, and undoing `\\uXXXX` one at a time would cost the
server a Python step per character).
"""
from __future__ import annotations

import binascii
import functools
import json
import re
from typing import Any, Callable

from vlmdet.serving.errors import RequestError

OTHER_LIMIT = 64 * 1024  # bytes of the document outside the image's string
WHITESPACE = b" \t\r\n"
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=]")
SHAPE = 'send a JSON object {"image": "<base64 of the image file>"}'


def malformed(detail: str) -> RequestError:
    return RequestError(400, "malformed-json", f"the body is not JSON: {detail}")


def bad_base64(detail: str) -> RequestError:
    return RequestError(400, "bad-base64", f"the field 'image' is not valid base64: {detail}")


class Base64Stream:
    """Strict base64 in pieces of any length -> decoded bytes to `write`, four characters at a time."""

    def __init__(self, write: Callable[[bytes], None]):
        self.write, self.carry, self.seen, self.padded = write, b"", 0, False

    def feed(self, text: bytes) -> None:
        if bad := _NOT_BASE64.search(text):
            raise bad_base64(f"character {self.seen + bad.start()} is {chr(text[bad.start()])!r} (base64 has "
                             "A-Z a-z 0-9 + / and = at the end only, no line breaks)")
        if self.padded and text.strip(b"="):
            raise bad_base64(f"data after the '=' padding at character {self.seen}")
        self.seen += len(text)
        data = self.carry + text
        whole = len(data) - len(data) % 4
        if whole:
            try:
                out = binascii.a2b_base64(data[:whole], strict_mode=True)
            except binascii.Error as err:
                raise bad_base64(str(err)) from None
            self.padded = self.padded or data[whole - 1] == ord("=")
            self.write(out)
        self.carry = data[whole:]

    def finish(self) -> None:
        if self.carry:
            raise bad_base64(f"Incorrect padding ({self.seen} characters, not a multiple of 4)")


def _at_token(state: Callable[[Any, int], int | None]) -> Callable[[Any, int], int | None]:
    """A state of JsonImageReader that starts at the next byte that is not whitespace: JSON allows whitespace
    between any two tokens, so the state reads only its own token. Whitespace up to the chunk's end is
    consumed (and counted) and the state waits for the next chunk."""

    @functools.wraps(state)
    def skip_whitespace(self: Any, pos: int) -> int | None:
        if (end := self._ws(pos)) >= len(self.buf):
            return end if end > pos else None
        return state(self, end)

    return skip_whitespace


class JsonImageReader:
    """Feed the body's chunks in order, then `finish()` -> the other fields as a dict. The image's bytes go to
    `write` as they are decoded. Raises RequestError (400) as soon as the body cannot be the object asked for."""

    def __init__(self, write: Callable[[bytes], None]):
        self.buf = bytearray()  # received, not yet consumed: a few bytes, or one chunk
        self.offset = 0  # bytes of the body consumed before buf
        self.state: Callable[[int], int | None] = self._start
        self.fields: dict[str, Any] = {}
        self.key: str | None = None
        self.other = 0  # bytes outside the image's string, against OTHER_LIMIT
        self.token = bytearray()  # the key or value being captured
        self.depth, self.in_string, self.escaped = 0, False, False
        self.image_done = False
        self.prefix: bytearray | None = bytearray()  # the image string's first bytes, until a data: URL is ruled out
        self.b64 = Base64Stream(write)

    def feed(self, chunk: bytes) -> None:
        self.buf += chunk
        pos = 0
        while (new := self.state(pos)) is not None:
            pos = new
        del self.buf[:pos]
        self.offset += pos

    def finish(self) -> dict[str, Any]:
        if self.state == self._start:
            raise malformed("the body is empty")
        if self.state != self._done:
            raise malformed(f"the body ends at byte {self.offset + len(self.buf)}, inside the JSON object")
        if not self.image_done:
            raise RequestError(400, "missing-image", f"no key 'image' (keys: {sorted(self.fields) or 'none'}); "
                                                     f"{SHAPE}")
        return self.fields

    # Each state consumes from buf[pos:] and returns where it stopped, or None when it needs more bytes.

    def _ws(self, pos: int) -> int:
        """The first byte at or after pos that is not whitespace (the whitespace counted as other bytes)."""
        start = pos
        while pos < len(self.buf) and self.buf[pos] in WHITESPACE:
            pos += 1
        self._count(pos - start)
        return pos

    def _count(self, n: int) -> None:
        self.other += n
        if self.other > OTHER_LIMIT:
            raise RequestError(400, "malformed-json", f"the JSON holds more than {OTHER_LIMIT // 1024} KB besides the "
                                                      f"image's base64; {SHAPE}")

    def _took(self, pos: int, then: Callable[[int], int | None]) -> int:
        """Consume the one-byte token at pos (a brace, colon, comma or quote, counted against OTHER_LIMIT)
        and go on with the state `then`."""
        self._count(1)
        self.state = then
        return pos + 1

    def _unexpected(self, pos: int, wanted: str) -> RequestError:
        return malformed(f"expected {wanted} at byte {self.offset + pos}, found {chr(self.buf[pos])!r}")

    @_at_token
    def _start(self, pos: int) -> int | None:
        if self.offset == 0 and pos == 0 and self.buf[:3] == b"\xef\xbb\xbf"[:len(self.buf)]:
            return 3 if len(self.buf) >= 3 else None  # a UTF-8 byte-order mark, as json.loads allows
        if self.buf[pos] != ord("{"):
            if self.buf[pos] in b'["-0123456789tfn':
                raise RequestError(400, "missing-image", f"the JSON is not an object; {SHAPE}")
            raise self._unexpected(pos, "'{'")
        return self._took(pos, self._first_key)

    @_at_token
    def _first_key(self, pos: int) -> int | None:
        if self.buf[pos] == ord("}"):
            return self._took(pos, self._done)
        self.state = self._key
        return pos

    @_at_token
    def _key(self, pos: int) -> int | None:
        if self.buf[pos] != ord('"'):
            raise self._unexpected(pos, "a key in double quotes")
        self.state = self._capture(self._got_key)
        return pos

    def _got_key(self, key: Any) -> None:
        self.key = key
        self.state = self._colon

    @_at_token
    def _colon(self, pos: int) -> int | None:
        if self.buf[pos] != ord(":"):
            raise self._unexpected(pos, "':'")
        return self._took(pos, self._value)

    @_at_token
    def _value(self, pos: int) -> int | None:
        if self.key == "image":
            if self.image_done:
                raise malformed("the key 'image' appears twice")
            if self.buf[pos] != ord('"'):
                raise RequestError(400, "missing-image", f"'image' is not a string; {SHAPE}")
            return self._took(pos, self._image)
        self.state = self._capture(self._got_value)
        return pos

    def _got_value(self, value: Any) -> None:
        self.fields[self.key] = value
        self.state = self._after_value

    @_at_token
    def _after_value(self, pos: int) -> int | None:
        if self.buf[pos] not in b",}":
            raise self._unexpected(pos, "',' or '}'")
        return self._took(pos, self._key if self.buf[pos] == ord(",") else self._done)

    @_at_token
    def _done(self, pos: int) -> int | None:
        raise malformed(f"extra data after the JSON object at byte {self.offset + pos}")

    def _capture(self, then: Callable[[Any], None]) -> Callable[[int], int | None]:
        """A state that holds one JSON value or key (anything but the image) until it ends, then parses it."""
        self.token.clear()
        self.depth, self.in_string, self.escaped = 0, False, False

        def capture(pos: int) -> int | None:
            start, buf = pos, self.buf
            while pos < len(buf):
                c = buf[pos]
                if self.in_string:
                    if self.escaped:
                        self.escaped = False
                    elif c == 0x5C:  # backslash
                        self.escaped = True
                    elif c == 0x22:  # closing quote
                        self.in_string = False
                        if self.depth == 0:
                            pos += 1
                            break
                elif c == 0x22:
                    self.in_string = True
                elif c in b"[{":
                    self.depth += 1
                elif c in b"]}" and self.depth > 0:
                    self.depth -= 1
                    if self.depth == 0:
                        pos += 1
                        break
                elif self.depth == 0 and (c in WHITESPACE or c in b",:}]"):
                    break  # the end of a number or literal: the delimiter is the next state's
                pos += 1
            else:
                self._count(pos - start)
                self.token += buf[start:pos]
                return pos if pos > start else None  # the rest of the value comes with the next chunk
            self._count(pos - start)
            self.token += buf[start:pos]
            try:
                value = json.loads(self.token)
            except ValueError as err:
                raise malformed(f"{err} in {bytes(self.token[:80])!r}") from None
            then(value)
            return pos

        return capture

    def _image(self, pos: int) -> int | None:
        buf = self.buf
        if pos >= len(buf):
            return None
        end = buf.find(b'"', pos)  # the string's end: an escaped quote would be no base64 either
        stop = end if end >= 0 else len(buf)
        if end < 0 and buf[stop - 1] == 0x5C:  # an escape cut by the chunk's end: its rest comes next
            stop -= 1
            if stop == pos:
                return None
        text = bytes(buf[pos:stop])
        if b"\\" in text:
            text = text.replace(b"\\/", b"/")
            if b"\\" in text:
                raise bad_base64("it holds a JSON escape other than \\/ (base64 needs none)")
        self._image_text(text)
        if end < 0:
            return stop
        self._end_image()
        return self._took(end, self._after_value)

    def _image_text(self, text: bytes) -> None:
        if self.prefix is not None:  # the first bytes: a data: URL's "data:image/jpeg;base64," is dropped
            self.prefix += text
            if not (self.prefix.startswith(b"data:") or b"data:".startswith(self.prefix)):
                text, self.prefix = bytes(self.prefix), None
            elif (comma := self.prefix.find(b",")) >= 0:
                text, self.prefix = bytes(self.prefix[comma + 1:]), None
            elif len(self.prefix) > 1024:
                raise bad_base64("it starts like a data: URL but has no ',' in its first 1024 bytes")
            else:
                return
        self.b64.feed(text)

    def _end_image(self) -> None:
        if self.prefix is not None and not self.prefix.startswith(b"data:"):
            self.b64.feed(bytes(self.prefix))  # a string shorter than "data:"
        self.prefix = None
        self.b64.finish()
        self.image_done = True
