"""The interface every model family's box format fills, and the registry.

A family module owns three things: the prompt's wording conventions, how a list of boxes is
rendered as the answer the model is trained to write, and how an answer is parsed back to boxes
in original-image pixels. `parse` never raises: a malformed answer is zero boxes with `ok=False`,
which evaluation counts as a parse failure.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass
class Box:
    """xyxy in original-image pixels."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str = ""
    score: float | None = None
    span: tuple[int, int] | None = None  # character span of this box in the answer text
    # Character span of just its coordinates (Qwen2-VL: <|box_start|>...<|box_end|>; JSON: the
    # bbox_2d list). The detection score averages over these tokens only: the label and the JSON
    # punctuation are near-certain for every box and would pull all scores together.
    coord_span: tuple[int, int] | None = None

    def xywh(self) -> list[float]:
        return [self.x1, self.y1, self.x2 - self.x1, self.y2 - self.y1]

    def clip(self, width: int, height: int) -> "Box":
        return Box(min(max(self.x1, 0), width), min(max(self.y1, 0), height), min(max(self.x2, 0), width),
                   min(max(self.y2, 0), height), self.label, self.score, self.span, self.coord_span)


@dataclass
class ParseResult:
    boxes: list[Box] = field(default_factory=list)
    ok: bool = True  # False when the answer was not in the family's format (counted as a parse failure)
    error: str = ""


class BoxFormat:
    """Base class: one subclass per model family (see qwen2_vl.py)."""

    name: str = ""
    no_object_answer: str = ""

    def __init__(self, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280):
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels

    def render(self, boxes: list[Box], width: int, height: int, label: str) -> str:
        """The answer the model learns to write for these boxes on an image of width x height."""
        raise NotImplementedError

    def parse(self, text: str, width: int, height: int) -> ParseResult:
        """Boxes in original pixels from a generated answer. Never raises."""
        raise NotImplementedError


# family name -> "module:Class"; adding a family is one module and one line here.
REGISTRY = {
    "qwen2_vl": "vlmdet.formats.qwen2_vl:Qwen2VLFormat",
    "qwen2_5_vl": "vlmdet.formats.qwen2_5_vl:Qwen25VLFormat",
    "qwen3_vl": "vlmdet.formats.qwen3_vl:Qwen3VLFormat",
}


def get_format(family: str, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280) -> BoxFormat:
    if family not in REGISTRY:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[family].split(":")
    return getattr(importlib.import_module(module), cls)(min_pixels=min_pixels, max_pixels=max_pixels)
