"""COCO box AP through pycocotools, the reference implementation everyone's numbers come from.

`coco_map` takes a COCO ground-truth dict (or its path) and COCO-results predictions (or their
path) and returns `{"map", "map50", "map75"}` (AP over IoU 0.50:0.95, at 0.50, at 0.75; area
"all", 100 detections an image). Every image of the ground truth counts, those without boxes
too: a box predicted there is a false positive. Predictions need real scores: AP ranks
detections by score, so a constant score makes AP depend on the order boxes were written.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Iterable, Sequence

from vlmdet.formats.base import Box

KEYS = ("map", "map50", "map75")


def _load(obj, what: str):
    if isinstance(obj, (str, Path)):
        path = Path(obj)
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
        with open(path) as f:
            return json.load(f)
    return copy.deepcopy(obj)  # pycocotools writes into what it is given


def _check_gt(gt) -> dict:
    if not isinstance(gt, dict) or not all(isinstance(gt.get(k), list) for k in ("images", "annotations", "categories")):
        raise ValueError("ground truth must be a COCO dict with lists 'images', 'annotations' and 'categories'")
    # Hand-made or converted ground truth often lacks the fields COCOeval reads (id, area, iscrowd).
    for i, ann in enumerate(gt["annotations"], start=1):
        ann.setdefault("id", i)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    return gt


def _check_predictions(preds, image_ids: set) -> list[dict]:
    if not isinstance(preds, list):
        raise ValueError(f"predictions must be a list of COCO results, got {type(preds).__name__}")
    for i, p in enumerate(preds):
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in p]
        if missing:
            raise ValueError(f"prediction {i} lacks {missing}; COCO results need image_id, category_id, "
                             f"bbox [x, y, w, h] and score: {p}")
        if p["image_id"] not in image_ids:
            raise ValueError(f"prediction {i} has image_id={p['image_id']!r}, which is not in the ground truth")
    return preds


def coco_map(gt: dict | str | Path, predictions: list[dict] | str | Path) -> dict[str, float]:
    """COCO bbox AP: {"map": AP@[.50:.95], "map50": AP@.50, "map75": AP@.75}, each in [0, 1].

    No predictions at all scores 0.0. Raises ValueError for malformed input or ground truth
    without a single box (AP is undefined there).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = _check_gt(_load(gt, "ground-truth"))
    if not gt["annotations"]:
        raise ValueError("ground truth has no boxes: AP is undefined; evaluate on a split with annotations")
    preds = _check_predictions(_load(predictions, "predictions"), {im["id"] for im in gt["images"]})
    if not preds:  # pycocotools' loadRes indexes preds[0]
        return {k: 0.0 for k in KEYS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the stats table
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(preds)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # stats[0:3] = AP@[.5:.95], AP@.5, AP@.75; -1 means "no ground truth to score against".
    return {k: max(0.0, float(v)) for k, v in zip(KEYS, ev.stats[:3])}


def predictions_to_coco(per_image_boxes: Sequence[Iterable[Box]], image_ids: Sequence[int], category_id: int = 1,
                        default_score: float | None = None) -> list[dict]:
    """COCO results from boxes (xyxy, original pixels) per image; coordinates to 0.01 px (what
    predictions.json holds: finer is noise, and the file stays small).

    Each box needs a `score`; `default_score` fills missing ones only when given explicitly,
    since equal scores make AP depend on write order.
    """
    if len(per_image_boxes) != len(image_ids):
        raise ValueError(f"per_image_boxes has {len(per_image_boxes)} entries but image_ids has {len(image_ids)}")
    out = []
    for image_id, boxes in zip(image_ids, per_image_boxes):
        for b in boxes:
            score = b.score if b.score is not None else default_score
            if score is None:
                raise ValueError(f"a box on image {image_id} has no score; set Box.score (the model's confidence) "
                                 f"or pass default_score=")
            out.append({"image_id": image_id, "category_id": category_id,
                        "bbox": [round(float(v), 2) for v in b.xywh()], "score": float(score)})
    return out
