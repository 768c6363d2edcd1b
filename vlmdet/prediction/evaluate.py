"""Evaluation: detect on a held-out split, score COCO bbox AP with pycocotools."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from vlmdet.run import timeline
from vlmdet.modeling.carried import trained_with
from vlmdet.config.settings import RunConfig
from vlmdet.decide.metrics import coco_map, predictions_to_coco
from vlmdet.data.draw import draw, grid
from vlmdet.prediction.load import load_detector
from vlmdet.prediction.predict import Detector
from vlmdet.run.progress import ProgressWriter
from vlmdet.run.records import DatasetRef, EvalReport, write_json
from vlmdet.data.samples import load_split

log = logging.getLogger(__name__)


def detector_for(model_path: str, config: RunConfig) -> Detector:
    """The model as evaluation measures it: loaded with the base settings it was trained with."""
    return load_detector(model_path, trained_with(model_path, config))


def detect_sharded(det: Detector, samples: list, config: RunConfig, desc: str,
                   progress: ProgressWriter | None = None) -> list:
    """Predictions for every sample, in order. Under `accelerate launch` with N processes (one per
    GPU) each rank detects every Nth image and all ranks receive all predictions. progress: where
    the main rank reports images done (its own count times N: the ranks move at one pace)."""
    from vlmdet.data.images import open_image
    from vlmdet.formats.resize import visual_tokens

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    mine = samples[rank::world]
    m = config.model
    sizes = [visual_tokens(s.width, s.height, m.family, m.min_pixels, m.max_pixels) for s in mine]
    on_done = (lambda n: progress.update(min(len(samples), n * world))) if progress is not None else None
    decoding = [0.0]  # seconds in open_image, summed: decoding is interleaved with detection

    def decode(s):  # noqa: ANN001, ANN202
        t = time.perf_counter()
        image = open_image(s.file)
        decoding[0] += time.perf_counter() - t
        return image

    preds = det.detect_all([(s.file, lambda s=s: decode(s)) for s in mine], len(mine),
                           config.eval.batch_size, desc=desc, sizes=sizes, on_done=on_done)
    timeline.add("decode images", decoding[0])
    if world == 1:
        return preds
    import torch
    import torch.distributed as dist

    ours = not dist.is_initialized()
    if ours:  # accelerate launch / torchrun set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
        if torch.cuda.is_available():  # NCCL gathers through the current device: this rank's, not every rank's cuda:0
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    gathered: list = [None] * world
    dist.all_gather_object(gathered, [(rank + world * k, p) for k, p in enumerate(preds)])
    # Every rank is past the gather: the group this made goes now, as a group left to the interpreter's exit can
    # abort the process (gloo's threads: SIGABRT). Not after a failed gather: a peer may still be in the
    # collective, and destroying then can hang (NCCL).
    if ours:
        dist.destroy_process_group()
    return [p for _, p in sorted((t for part in gathered for t in part), key=lambda t: t[0])]


def evaluate(model_path: str, dataset: DatasetRef, config: RunConfig, out: str | Path, split: str | None = None) -> EvalReport:
    """mAP of the model (merged folder or adapter folder) on `split` (default config.eval.split)."""
    from vlmdet.data.images import open_image

    split = split or config.eval.split
    if split not in dataset.splits:
        raise ValueError(f"eval split {split!r} not in the prepared data (has: {', '.join(dataset.splits)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with timeline.phase("data index"):
        samples, coco = load_split(dataset.splits[split])
    t0 = time.perf_counter()
    with timeline.phase("load weights", nbytes=timeline.folder_bytes(model_path)):  # with the processor
        det = detector_for(model_path, config)
    t1 = time.perf_counter()
    with timeline.phase("detect"):
        preds = detect_sharded(det, samples, config, desc=f"evaluate {split}",
                               progress=ProgressWriter.from_env("image", len(samples)))
    t2 = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", 1))
    log.info("loaded in %.1fs; detected %d images in %.1fs (%.0f ms an image over %d process(es))", t1 - t0,
             len(samples), t2 - t1, 1000 * (t2 - t1) / max(1, len(samples)), world)
    if os.environ.get("VLMDET_STEP_TIMES") and int(os.environ.get("RANK", 0)) == 0:  # benchmarks/multi_gpu.py
        write_json(os.environ["VLMDET_STEP_TIMES"], {"load_s": t1 - t0, "detect_s": t2 - t1, "processes": world})
    cat_id = next((c["id"] for c in coco["categories"] if c["name"] == config.data.category), 1)
    results = predictions_to_coco([p.boxes for p in preds], [s.image_id for s in samples], cat_id)
    with timeline.phase("score"):
        metrics = coco_map(coco, results)
    per_image = [dict(p.to_dict(), image_id=s.image_id, truth=[[b.x1, b.y1, b.x2, b.y2] for b in s.boxes])
                 for s, p in zip(samples, preds)]
    n = config.eval.preview_images
    preview = None
    if int(os.environ.get("RANK", 0)) == 0:  # under several GPUs every rank has all predictions; one writes
        with timeline.phase("save"):  # predictions and the preview picture
            write_json(out / "predictions.json", results, indent=None)
            write_json(out / "per_image.json", per_image, indent=1)
            preview = grid([draw(open_image(s.file), p.boxes, s.boxes) for s, p in list(zip(samples, preds))[:n]],
                           out / "preview.png") if n else None
    failures = sum(not p.parse_ok for p in preds)
    log.info("%s on %s: mAP %.3f mAP50 %.3f mAP75 %.3f (%d images, %d unparsable answers)", model_path, split,
             metrics["map"], metrics["map50"], metrics["map75"], len(samples), failures)
    return EvalReport(map=metrics["map"], map50=metrics["map50"], map75=metrics["map75"], split=split,
                      num_images=len(samples), parse_failures=failures, predictions=str((out / "predictions.json").resolve()),
                      per_image=str((out / "per_image.json").resolve()), model=str(model_path),
                      data_fingerprint=dataset.fingerprint, preview=preview)
