"""Samples of a prepared split and the chat messages a model sees for them.

One place builds the prompt and the answer, so training, evaluation and prediction can never
drift apart (a prompt that differs by one word between training and evaluation is a silent
accuracy loss).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmdet.formats import Box, BoxFormat


@dataclass
class Sample:
    image_id: int
    file: str  # absolute path
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)


def load_split(coco_json: str | Path, root: str | Path | None = None) -> tuple[list[Sample], dict[str, Any]]:
    """Samples of one prepared COCO file (file_name relative to `root`, default the file's folder)."""
    coco_json = Path(coco_json)
    coco = json.loads(coco_json.read_text())
    root = Path(root) if root else coco_json.parent
    by_image: dict[int, list[Box]] = {}
    cats = {c["id"]: c["name"] for c in coco.get("categories", [])}
    for a in coco.get("annotations", []):
        x, y, w, h = a["bbox"]
        by_image.setdefault(a["image_id"], []).append(Box(x, y, x + w, y + h, label=cats.get(a["category_id"], "")))
    samples = []
    for im in coco["images"]:
        boxes = sorted(by_image.get(im["id"], []), key=lambda b: (b.y1, b.x1))  # reading order: a stable target
        samples.append(Sample(im["id"], str(root / im["file_name"]), im["width"], im["height"], boxes))
    return samples, coco


def user_message(prompt: str, category: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt.format(category=category)}]}


def training_example(sample: Sample, fmt: BoxFormat, prompt: str, category: str) -> dict[str, Any]:
    """TRL's conversational prompt-completion form: the loss falls on the completion only."""
    answer = fmt.render(sample.boxes, sample.width, sample.height, category)
    return {
        "prompt": [user_message(prompt, category)],
        "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
        "images": [sample.file],
    }
