"""Qwen3-VL grounding format.

Answer: the same JSON as Qwen2.5-VL (`{"bbox_2d": [x1, y1, x2, y2], "label": LABEL}` in a ```json
fence), but coordinates are integers 0-1000 relative to the image, as in Qwen2-VL: Qwen3-VL went
back to relative coordinates, so its processor's resize (factor 32 = 16 px patches x 2x2 merge)
does not enter the format. No object: `[]`.
"""
from __future__ import annotations

from vlmdet.formats.base import Box, BoxFormat, ParseResult
from vlmdet.formats.qwen2_5_vl import parse_scaled, render_json
from vlmdet.formats.qwen2_vl import RELATIVE, SCALE, to_scale
from vlmdet.formats.resize import QWEN3_FACTOR


class Qwen3VLFormat(BoxFormat):
    name = "qwen3_vl"
    no_object_answer = "[]"
    factor = QWEN3_FACTOR  # 16 px patches x 2x2 merge
    model_types = ("qwen3_vl",)
    coordinates = RELATIVE
    score_span = "the `bbox_2d` list"
    usage_parse = (
        '# Answer: [{"bbox_2d": [x1, y1, x2, y2], "label": ...}], 0-1000 of the image',
        'found = json.loads(m.group()) if (m := re.search(r"\\[.*\\]", answer, re.S)) else []',
        'boxes = [[x1 / 1000 * W, y1 / 1000 * H, x2 / 1000 * W, y2 / 1000 * H] for x1, y1, x2, y2 in (o["bbox_2d"] for o in found)]',
    )

    def render(self, boxes: list[Box], width: int, height: int, label: str) -> str:
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got width={width}, height={height}")
        return render_json([([to_scale(b.x1, width), to_scale(b.y1, height), to_scale(b.x2, width),
                              to_scale(b.y2, height)], label) for b in boxes])

    def parse(self, text: str, width: int, height: int) -> ParseResult:
        if not (isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0):
            return ParseResult([], ok=False, error=f"image size must be positive, got width={width}, height={height}")
        return parse_scaled(text, width / SCALE, height / SCALE, SCALE, SCALE)
