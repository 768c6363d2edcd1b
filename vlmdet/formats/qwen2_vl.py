"""Qwen2-VL grounding format.

Answer: `<|object_ref_start|>LABEL<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>` once per
box, integers 0-1000 relative to the image (Qwen2-VL normalises to the image, not to the resized
grid, so the processor's resize does not enter). No box: the family's usual "none" sentence.
"""
from __future__ import annotations

import re

from vlmdet.formats.base import Box, BoxFormat, ParseResult
from vlmdet.formats.resize import QWEN2_FACTOR

_BOX = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>)?\s*"
    r"(?P<coords><\|box_start\|>\s*\(\s*(?P<x1>\d+)\s*,\s*(?P<y1>\d+)\s*\)\s*,\s*\(\s*(?P<x2>\d+)\s*,\s*(?P<y2>\d+)\s*\)\s*<\|box_end\|>)",
    re.S,
)


# Qwen2-VL's coordinate frame, which Qwen3-VL shares: thousandths of the original image's width and height.
SCALE = 1000
RELATIVE = "integers 0-1000 relative to the image"


def to_scale(v: float, size: int) -> int:
    """A pixel coordinate on a side of `size` pixels as an integer 0-SCALE, clamped to the image."""
    return int(min(SCALE, max(0, round(v / size * SCALE))))


class Qwen2VLFormat(BoxFormat):
    name = "qwen2_vl"
    no_object_answer = "None"
    factor = QWEN2_FACTOR  # 14 px patches x 2x2 merge
    model_types = ("qwen2_vl",)
    coordinates = RELATIVE
    score_span = "`<|box_start|>...<|box_end|>`"
    usage_parse = (
        "# Answer: <|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>, 0-1000 of the image",
        'found = re.findall(r"<\\|box_start\\|>\\((\\d+),(\\d+)\\),\\((\\d+),(\\d+)\\)<\\|box_end\\|>", answer)',
        "boxes = [[int(x1) / 1000 * W, int(y1) / 1000 * H, int(x2) / 1000 * W, int(y2) / 1000 * H] for x1, y1, x2, y2 in found]",
    )

    def render(self, boxes: list[Box], width: int, height: int, label: str) -> str:
        if not boxes:
            return self.no_object_answer
        return "".join(
            f"<|object_ref_start|>{label}<|object_ref_end|><|box_start|>"
            f"({to_scale(b.x1, width)},{to_scale(b.y1, height)}),({to_scale(b.x2, width)},{to_scale(b.y2, height)})"
            "<|box_end|>"
            for b in boxes)

    def parse(self, text: str, width: int, height: int) -> ParseResult:
        try:
            text = text or ""
            boxes = []
            for m in _BOX.finditer(text):
                x1, y1, x2, y2 = (int(m[k]) for k in ("x1", "y1", "x2", "y2"))
                if max(x1, y1, x2, y2) > SCALE:
                    continue
                x1, x2 = sorted((x1, x2))
                y1, y2 = sorted((y1, y2))
                boxes.append(Box(x1 / SCALE * width, y1 / SCALE * height, x2 / SCALE * width, y2 / SCALE * height,
                                 label=(m["label"] or "").strip(), span=m.span(), coord_span=m.span("coords")))
            stripped = text.strip()
            if boxes or stripped == self.no_object_answer:
                return ParseResult(boxes, ok=True)
            return ParseResult([], ok=False, error=f"no box in answer: {stripped[:80]!r}")
        except Exception as err:  # parse never raises: garbage is zero boxes
            return ParseResult([], ok=False, error=repr(err))
