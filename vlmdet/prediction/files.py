"""Boxes for a list of image files, with a drawn copy of each (what `vlmdet predict` runs)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from vlmdet.modeling.carried import config_for_model
from vlmdet.config.settings import RunConfig
from vlmdet.data.images import ImageError, open_image
from vlmdet.modeling.load import adapter_base, check_model_source, is_adapter
from vlmdet.data.draw import draw
from vlmdet.prediction.load import load_detector

log = logging.getLogger(__name__)


def image_line(record: dict) -> str:
    """One line for one input: its boxes and best score, or why it failed (printed and kept in predictions.json)."""
    if record.get("error"):
        return f"{record['file']}: FAILED {record['error']}"
    boxes = record["boxes"]
    if not boxes:
        why = "" if record.get("parse_ok", True) else f" (answer not understood: {record.get('parse_error')})"
        return f"{record['file']}: no box{why}"
    best = max((b["score"] for b in boxes if b["score"] is not None), default=None)
    coords = "; ".join(" ".join(f"{v:.0f}" for v in b["xyxy"]) for b in boxes[:3]) + ("; ..." if len(boxes) > 3 else "")
    return (f"{record['file']}: {len(boxes)} box{'es' if len(boxes) > 1 else ''}, best score "
            f"{'n/a' if best is None else f'{best:.2f}'} (xyxy {coords})")


def _open(f: Path):
    """The image, or an error string for predictions.json."""
    try:
        return open_image(f), None
    except ImageError as err:
        return None, f"{err.reason}: {err.detail}"
    except FileNotFoundError:
        return None, "missing-file: no such file"
    except IsADirectoryError:
        return None, "unreadable: a folder, not an image"
    except OSError as err:  # permissions, an I/O error on a network disk
        return None, f"unreadable: {err.strerror or err}"


def check_model(model_path: str) -> str:
    """The model folder or repo, checked before anything loads (ModelError: no such folder or
    repository, pickle-only weights); for an adapter its base is checked too."""
    source = check_model_source(str(model_path), "--model")
    if is_adapter(source):
        check_model_source(adapter_base(source), f"the base model of adapter {source} (base_model_name_or_path)")
    return source


def predict_files(model_path: str, files: list[Path], out: Path, config: RunConfig, explicit: set[str] = frozenset(),
                  echo: Callable[[str], None] | None = None) -> Path:
    """Writes OUT/predictions.json and OUT/<name>.jpg with the boxes drawn.

    predictions.json: {"model", "images": [per image read: file, width, height, boxes xyxy in
    original pixels with scores, drawn, line], "errors": [per image that could not be read: file,
    error, line], "failed": count}. Unreadable or missing images are listed with their reason, never
    crash the run. `echo` gets each image's line as soon as it is known. Family and pixel budget
    come from the model folder unless set."""
    model_path = check_model(model_path)
    out.mkdir(parents=True, exist_ok=True)
    det = load_detector(model_path, config_for_model(model_path, config, explicit))

    # One batch of images decoded at a time: a folder of 12 MP phone photos held in memory at
    # once is 36 MB each, tens of GB for a thousand.
    records, errors, used = [], [], set()
    bs = config.eval.batch_size
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=None)  # None: no bar when not a terminal
    for start in range(0, len(files), bs):
        chunk = files[start:start + bs]
        batch, lines = [], {}
        for i, f in enumerate(chunk):
            img, error = _open(f)
            if img is None:
                errors.append({"file": str(f), "error": error})
                lines[i] = errors[-1]["line"] = image_line(errors[-1])
            else:
                batch.append((i, str(f), img))
        preds = det.detect([img for _, _, img in batch], [f for _, f, _ in batch]) if batch else []
        for (i, f, img), p in zip(batch, preds):
            name = Path(f).stem
            while name in used:  # two inputs with the same stem from different folders
                name += "_"
            used.add(name)
            drawn = out / f"{name}.jpg"
            draw(img, p.boxes).save(drawn, quality=90)
            records.append(dict(p.to_dict(), drawn=str(drawn)))
            lines[i] = records[-1]["line"] = image_line(records[-1])
        bar.update(len(chunk))
        for i in sorted(lines):  # in input order
            echo(lines[i]) if echo else log.info("%s", lines[i])
    bar.close()
    path = out / "predictions.json"
    path.write_text(json.dumps({"model": str(model_path), "images": records, "errors": errors, "failed": len(errors)},
                               indent=1))
    return path
