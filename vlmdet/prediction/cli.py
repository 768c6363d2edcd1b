"""`vlmdet predict`: boxes for any images, with a drawn copy of each."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm.auto import tqdm

from vlmdet.config import RunConfig
from vlmdet.data.images import ImageError, open_image
from vlmdet.formats import get_format
from vlmdet.modeling.load import family_of, load_for_inference, saved_pixel_budget
from vlmdet.prediction.draw import draw
from vlmdet.prediction.predict import Detector

log = logging.getLogger(__name__)


def inference_config(model_path: str, config: RunConfig, explicit: set[str] = frozenset()) -> RunConfig:
    """`config` with the family and pixel budget the model folder was saved with, unless set in
    `explicit` (the dotted keys the user gave): what `vlmdet predict` and `vlmdet serve` detect with."""
    overrides = {}
    if "model.family" not in explicit:
        overrides["model.family"] = family_of(model_path)
    budget = saved_pixel_budget(model_path)
    if budget and not explicit & {"model.min_pixels", "model.max_pixels"}:
        overrides.update({"model.min_pixels": budget[0], "model.max_pixels": budget[1]})
    return config.override(overrides)


def predict_files(model_path: str, files: list[Path], out: Path, config: RunConfig, explicit: set[str] = frozenset()) -> Path:
    """Writes OUT/predictions.json (per image: file, width, height, boxes xyxy in original pixels
    with scores) and OUT/<name>.jpg with the boxes drawn. Unreadable images are listed with their
    error, never crash the run. Family and pixel budget come from the model folder unless set."""
    out.mkdir(parents=True, exist_ok=True)
    config = inference_config(model_path, config, explicit)
    model, processor = load_for_inference(model_path, config.model)
    fmt = get_format(config.model.family, config.model.min_pixels, config.model.max_pixels)
    det = Detector(model, processor, fmt, config.model.prompt, config.data.category, config.eval.max_new_tokens)

    # One batch of images decoded at a time: a folder of 12 MP phone photos held in memory at
    # once is 36 MB each, tens of GB for a thousand.
    records, errors, used = [], [], set()
    bs = config.eval.batch_size
    bar = tqdm(total=len(files), desc="predict", unit="img")
    for start in range(0, len(files), bs):
        batch = []
        for f in files[start:start + bs]:
            try:
                batch.append((str(f), open_image(f)))
            except ImageError as err:
                errors.append({"file": str(f), "error": f"{err.reason}: {err.detail}"})
                log.warning("skipping %s: %s", f, err)
        preds = det.detect([img for _, img in batch], [f for f, _ in batch]) if batch else []
        for (f, img), p in zip(batch, preds):
            name = Path(f).stem
            while name in used:  # two inputs with the same stem from different folders
                name += "_"
            used.add(name)
            drawn = out / f"{name}.jpg"
            draw(img, p.boxes).save(drawn, quality=90)
            records.append(dict(p.to_dict(), drawn=str(drawn)))
        bar.update(len(files[start:start + bs]))
    bar.close()
    path = out / "predictions.json"
    path.write_text(json.dumps({"model": str(model_path), "images": records, "errors": errors}, indent=1))
    return path
