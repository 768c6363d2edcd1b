"""Qwen2-VL grounding format.

Answer: `<|object_ref_start|>LABEL<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>` once per
box, integers 0-1000 relative to the image (Qwen2-VL normalises to the image, not to the resized
grid, so the processor's resize does not enter). No box: the family's usual "none" sentence.
"""
from __future__ import annotations

import re

from vlmdet.formats.base import Box, BoxFormat, ParseResult

_BOX = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>)?\s*"
    r"(?P<coords><\|box_start\|>\s*\(\s*(?P<x1>\d+)\s*,\s*(?P<y1>\d+)\s*\)\s*,\s*\(\s*(?P<x2>\d+)\s*,\s*(?P<y2>\d+)\s*\)\s*<\|box_end\|>)",
    re.S,
)


def _q(v: float, size: int) -> int:
    return int(min(1000, max(0, round(v / size * 1000))))


class Qwen2VLFormat(BoxFormat):
    name = "qwen2_vl"
    no_object_answer = "None"
    factor = 28  # 14 px patches x 2x2 merge
    model_types = ("qwen2_vl",)
    coordinates = "integers 0-1000 relative to the image"
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
            f"({_q(b.x1, width)},{_q(b.y1, height)}),({_q(b.x2, width)},{_q(b.y2, height)})<|box_end|>"
            for b in boxes)

    def parse(self, text: str, width: int, height: int) -> ParseResult:
        try:
            text = text or ""
            boxes = []
            for m in _BOX.finditer(text):
                x1, y1, x2, y2 = (int(m[k]) for k in ("x1", "y1", "x2", "y2"))
                if max(x1, y1, x2, y2) > 1000:
                    continue
                x1, x2 = sorted((x1, x2))
                y1, y2 = sorted((y1, y2))
                boxes.append(Box(x1 / 1000 * width, y1 / 1000 * height, x2 / 1000 * width, y2 / 1000 * height,
                                 label=(m["label"] or "").strip(), span=m.span(), coord_span=m.span("coords")))
            stripped = text.strip()
            if boxes or stripped == self.no_object_answer:
                return ParseResult(boxes, ok=True)
            return ParseResult([], ok=False, error=f"no box in answer: {stripped[:80]!r}")
        except Exception as err:  # parse never raises: garbage is zero boxes
            return ParseResult([], ok=False, error=repr(err))
