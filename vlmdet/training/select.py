"""Which checkpoint is published: the validation split decides, the test split only judges.

During training the trainer measures the loss on the validation split at every save
(`eval_strategy=steps`, `eval_steps=save_steps`) and protects the checkpoint with the lowest
val loss from rotation (`metric_for_best_model=eval_loss`), so at the end the checkpoints folder
holds the best-by-loss one and the latest `save_total_limit`. Each of those is then scored for
val mAP on at most `eval.val_max_images` validation images, with the model already in memory
(each checkpoint's adapter weights loaded in turn: no second 7B load), and the winner is:

    highest val mAP50, then lowest val loss, then the later step.

Loss alone is a poor guide for detection (a checkpoint can fit the answer tokens better and
place boxes worse), mAP alone on a few dozen images ties often, hence the order. Without a
validation split the last checkpoint is kept: there is nothing to choose by.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
RULE = "highest val mAP50, then lowest val loss, then the later step"


def checkpoints(ckpt_dir: str | Path) -> dict[int, Path]:
    """step -> checkpoint folder, for those holding adapter weights."""
    out = {}
    for path in Path(ckpt_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if m and (path / ADAPTER_WEIGHTS).is_file():
            out[int(m.group(1))] = path
    return dict(sorted(out.items()))


def val_losses(log_history: list[dict[str, Any]]) -> dict[int, float]:
    """step -> eval_loss, from the trainer's log history (the last entry of a step wins)."""
    return {int(h["step"]): float(h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h}


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The winning row among {"step", "val_loss", "val_map50", ...}; missing numbers rank last."""
    if not rows:
        raise ValueError("no checkpoint to choose from")

    def rank(row: dict[str, Any]) -> tuple[float, float, int]:
        m = row.get("val_map50")
        loss = row.get("val_loss")
        return (m if m is not None else float("-inf"), -loss if loss is not None else float("-inf"), row["step"])

    return max(rows, key=rank)


def load_checkpoint_weights(model, folder: str | Path) -> None:
    """Put a checkpoint's adapter (and modules_to_save) weights into the PEFT model in memory."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(Path(folder) / ADAPTER_WEIGHTS)))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise RuntimeError(f"checkpoint {folder} does not fit the model in memory: unexpected keys {unexpected[:5]}")


def val_map(model, processor, config, split_json: str, max_images: int) -> dict[str, float]:
    """COCO mAP of the model in memory on the first `max_images` images of the validation split."""
    from vlmdet.data.images import open_image
    from vlmdet.decide.metrics import coco_map, predictions_to_coco
    from vlmdet.prediction.load import make_detector
    from vlmdet.data.samples import load_split

    samples, coco = load_split(split_json)
    samples = samples[:max_images]
    ids = {s.image_id for s in samples}
    gt = dict(coco, images=[im for im in coco["images"] if im["id"] in ids],
              annotations=[a for a in coco["annotations"] if a["image_id"] in ids])
    det = make_detector(model, processor, config)  # the evaluation's Detector, over the model in memory
    was_training = model.training
    model.eval()
    try:
        preds = det.detect_all(((s.file, lambda s=s: open_image(s.file)) for s in samples), len(samples),
                               config.eval.batch_size, desc="validate")
    finally:
        model.train(was_training)
    cat_id = next((c["id"] for c in gt["categories"] if c["name"] == config.data.category), 1)
    return coco_map(gt, predictions_to_coco([p.boxes for p in preds], [s.image_id for s in samples], cat_id))


def select_checkpoint(model, processor, config, ckpt_dir: str | Path, log_history: list[dict[str, Any]],
                      val_split: str | None) -> tuple[int | None, dict[str, Any]]:
    """Score the kept checkpoints on validation, load the winner's weights into `model`.

    Returns (chosen step or None when there is no checkpoint, the validation record for AdapterRef).
    """
    found = checkpoints(ckpt_dir)
    losses = val_losses(log_history)
    if not found:
        return None, {"rule": "no checkpoint saved: the final weights are the adapter", "checkpoints": []}
    if not val_split:
        step = max(found)
        return step, {"rule": "no validation split: the last checkpoint", "checkpoints": [{"step": step}]}
    n = config.eval.val_max_images
    if n > 0 and not _has_boxes(val_split, n):
        # AP is undefined without a true box (a small split of pictures without tables): loss decides
        log.info("the first %d validation images hold no box: choosing by validation loss", n)
        n = 0
    rows = []
    for step, folder in found.items():
        row: dict[str, Any] = {"step": step, "val_loss": losses.get(step)}
        if n > 0:
            load_checkpoint_weights(model, folder)
            metrics = val_map(model, processor, config, val_split, n)
            row.update(val_map=metrics["map"], val_map50=metrics["map50"], val_map75=metrics["map75"])
        rows.append(row)
        log.info("checkpoint %d: val loss %s, val mAP50 %s", step, row["val_loss"], row.get("val_map50"))
    best = choose(rows)
    load_checkpoint_weights(model, found[best["step"]])
    images = min(n, _count_images(val_split))
    return best["step"], {"rule": RULE if n > 0 else "lowest val loss, then the later step", "checkpoints": rows,
                          "val_images": images, "chosen": best}


def _has_boxes(split_json: str, max_images: int) -> bool:
    from vlmdet.data.samples import load_split

    samples, _ = load_split(split_json)
    return any(s.boxes for s in samples[:max_images])


def _count_images(split_json: str) -> int:
    import json

    return len(json.loads(Path(split_json).read_text())["images"])
