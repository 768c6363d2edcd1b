"""The interface every model family's box format fills, and the registry.

A family module owns the family: how a list of boxes is rendered as the answer the model is
trained to write, how an answer is parsed back to boxes in original-image pixels, and the family's
facts the rest of vlmdet reads from the class (the processor's pixels per visual token, the words
and the plain-transformers code the model card uses to describe its coordinates). `parse` never
raises: a malformed answer is zero boxes with `ok=False`, which evaluation counts as a parse failure.

A family shipped here is one module and one REGISTRY line. Another installed package adds one
without editing vlmdet: an entry point in the group `vlmdet.families` (`NAME = module:Class`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vlmdet.plugins import installed, load


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
    # Pixels per visual-token side after the processor's merge (patch size x spatial merge): the grid
    # images are resized to (formats/resize.smart_resize), so the number of visual tokens of an image.
    factor: int = 28
    # For the model card: what the coordinates are, the span a box's score averages over, and the
    # plain-transformers lines that turn `answer` into [[x1, y1, x2, y2], ...] in pixels of a W x H photo.
    coordinates: str = ""
    score_span: str = "the box's coordinates"
    usage_parse: tuple[str, ...] = ()
    # The transformers model_type(s) whose checkpoints answer in this format: `vlmdet predict` and
    # `vlmdet serve` tell a model folder's family by them (modeling.load.family_of).
    model_types: tuple[str, ...] = ()

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


ENTRY_POINTS = "vlmdet.families"


def families() -> dict[str, str]:
    """Family name -> "module:Class": the shipped ones, then those installed packages declare."""
    return installed(REGISTRY, ENTRY_POINTS)


def format_class(family: str) -> type[BoxFormat]:
    known = families()
    if family not in known:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(known)}")
    return load(known[family])


def family_for_model_type(model_type: str) -> str | None:
    """The family whose format declares `model_type`, or None."""
    return next((name for name in families() if model_type in format_class(name).model_types), None)


def get_format(family: str, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280) -> BoxFormat:
    return format_class(family)(min_pixels=min_pixels, max_pixels=max_pixels)
