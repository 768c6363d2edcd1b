"""Qwen2.5-VL grounding format.

Answer: a JSON list of `{"bbox_2d": [x1, y1, x2, y2], "label": LABEL}` in a ```json fence, as the
official Instruct models write it. Coordinates are absolute pixels of the image *after*
`smart_resize` (factor 28, this format's min/max pixels), not of the original image: Qwen2.5-VL
learnt absolute coordinates on the resized grid it sees. A parser that ignores the resize is off
by the resize ratio on every box above max_pixels or below min_pixels, and nothing fails loudly.
No object: `[]`.

The JSON scanner here is shared with Qwen3-VL (same JSON, other coordinates): it takes what the
official models actually write, fenced or not, with text around it, a single dict instead of a
list, `bbox` for `bbox_2d`, and truncated output (generation stopped by max_new_tokens), whose
complete objects it keeps.
"""
from __future__ import annotations

import json
import math
import re

from vlmdet.formats.base import Box, BoxFormat, ParseResult
from vlmdet.formats.resize import QWEN2_FACTOR, smart_resize

_DECODER = json.JSONDecoder()
_BOX_KEYS = ("bbox_2d", "bbox")
# The no-object answer, bare or fenced, with whatever whitespace.
_EMPTY = re.compile(r"\s*(?:```(?:json)?\s*)?\[\s*\]\s*(?:```)?\s*", re.S)


def find_json_boxes(text: str) -> tuple[list[tuple[list[float], str, tuple[int, int], tuple[int, int]]], int]:
    """Every JSON object in `text` that carries a 4-number `bbox_2d`/`bbox`, in order.

    Returns ([(coords, label, (start, end), coord_span), ...], rejected) where (start, end) is the
    object's character span in `text`, coord_span that of its coordinate list, and `rejected`
    counts box-like objects whose box was not 4 finite numbers. Objects are decoded one at a time from each `{`, so fences, prose, a trailing
    truncated object or a missing `]` cost only what they spoil.
    """
    found, rejected, i = [], 0, text.find("{")
    while i != -1:
        try:
            obj, end = _DECODER.raw_decode(text, i)
        except ValueError:  # not an object here (truncated, or prose with a brace): try the next brace
            obj, end = None, i + 1
        key = next((k for k in _BOX_KEYS if isinstance(obj, dict) and k in obj), None)
        if key is None:
            # A decodable dict without a box may wrap boxes ({"objects": [...]}): look inside it.
            i = text.find("{", i + 1)
            continue
        coords = obj[key]
        if (isinstance(coords, list) and len(coords) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in coords)):
            label = obj.get("label", "")
            found.append(([float(v) for v in coords], label if isinstance(label, str) else json.dumps(label), (i, end),
                          _list_span(text, i, end, key, coords)))
        else:
            rejected += 1
        i = text.find("{", end)
    return found, rejected


def _list_span(text: str, start: int, end: int, key: str, coords: list) -> tuple[int, int]:
    """Character span of the `key` list inside the object at text[start:end]. The match must decode
    to the same list, so a quoted `"bbox_2d":` inside a label is skipped; the whole object is the
    fallback."""
    for m in re.finditer(rf'"{key}"\s*:\s*', text[start:end]):
        at = start + m.end()
        try:
            value, stop = _DECODER.raw_decode(text, at)
        except ValueError:
            continue
        if value == coords and stop <= end:
            return at, stop
    return start, end


def render_json(items: list[tuple[list[int], str]], fence: bool = True) -> str:
    """The official layout: one tab-indented object per line inside a ```json fence."""
    if not items:
        return "[]"
    body = ",\n".join(f'\t{{"bbox_2d": [{", ".join(str(v) for v in c)}], "label": {json.dumps(label, ensure_ascii=False)}}}'
                      for c, label in items)
    text = f"[\n{body}\n]"
    return f"```json\n{text}\n```" if fence else text


def parse_scaled(text: str, sx: float, sy: float, limit_x: float, limit_y: float) -> ParseResult:
    """Boxes from JSON answer `text`: coordinates must lie in [0, limit] with x1 <= x2, y1 <= y2,
    and are multiplied by (sx, sy) to give original pixels. Never raises."""
    try:
        if not isinstance(text, str):
            return ParseResult([], ok=False, error=f"answer is not text: {type(text).__name__}")
        found, rejected = find_json_boxes(text)
        boxes, bad = [], []
        for (x1, y1, x2, y2), label, span, coord_span in found:
            if not (0 <= x1 <= x2 <= limit_x and 0 <= y1 <= y2 <= limit_y):
                bad.append([x1, y1, x2, y2])
                continue
            boxes.append(Box(x1 * sx, y1 * sy, x2 * sx, y2 * sy, label=label.strip(), span=span, coord_span=coord_span))
        dropped = rejected + len(bad)
        note = f"dropped {dropped} box(es) out of range [0, {limit_x:g}]x[0, {limit_y:g}], swapped or malformed" \
            f"{': ' + str(bad[:3]) if bad else ''}" if dropped else ""
        if boxes:
            return ParseResult(boxes, ok=True, error=note)
        if not found and not rejected and _EMPTY.fullmatch(text):
            return ParseResult([], ok=True)
        return ParseResult([], ok=False, error=note or f"no box in answer: {text.strip()[:80]!r}")
    except Exception as err:  # parse never raises: garbage is zero boxes
        return ParseResult([], ok=False, error=repr(err))


class Qwen25VLFormat(BoxFormat):
    name = "qwen2_5_vl"
    no_object_answer = "[]"
    factor = QWEN2_FACTOR  # 14 px patches x 2x2 merge
    model_types = ("qwen2_5_vl",)
    coordinates = ("absolute pixels of the image after the processor's resize (smart_resize, factor 28, "
                   "within the pixel budget), not of the original")
    score_span = "the `bbox_2d` list"
    usage_parse = (
        '# Answer: [{"bbox_2d": [x1, y1, x2, y2], "label": ...}] in pixels of the image the processor resized',
        "patch = processor.image_processor.patch_size  # the resized image is grid x patch pixels",
        'grid_h, grid_w = inputs["image_grid_thw"][0, 1:].tolist()',
        "sx, sy = W / (grid_w * patch), H / (grid_h * patch)",
        'found = json.loads(m.group()) if (m := re.search(r"\\[.*\\]", answer, re.S)) else []',
        'boxes = [[x1 * sx, y1 * sy, x2 * sx, y2 * sy] for x1, y1, x2, y2 in (o["bbox_2d"] for o in found)]',
    )

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the image the model sees: the frame its coordinates live in."""
        h, w = smart_resize(height, width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return w, h

    def render(self, boxes: list[Box], width: int, height: int, label: str) -> str:
        rw, rh = self.resized(width, height)

        def q(v: float, size: int, rsize: int) -> int:
            return int(min(rsize, max(0, round(v / size * rsize))))

        return render_json([([q(b.x1, width, rw), q(b.y1, height, rh), q(b.x2, width, rw), q(b.y2, height, rh)], label)
                            for b in boxes])

    def parse(self, text: str, width: int, height: int) -> ParseResult:
        try:
            rw, rh = self.resized(width, height)
        except Exception as err:  # an impossible image size is a failed parse, not a crash
            return ParseResult([], ok=False, error=f"cannot resize {width}x{height}: {err}")
        return parse_scaled(text, width / rw, height / rh, rw, rh)
