"""Entry point of the child processes: `python -m vlmdet.pipeline.child STEP REQUEST.json RESULT.json`.

Each step reads its input records from the request, calls one library function and writes
{"record": ...} or {"kind": "oom"|"config"|"error", "message": ..., "traceback": ...}.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from vlmdet.config.settings import ConfigError, RunConfig
from vlmdet.run.records import AdapterRef, DatasetRef, write_json
from vlmdet.run.timeline import phase, take


def _train(req: dict[str, Any]) -> dict[str, Any]:
    with phase("imports"):  # torch, transformers, TRL, PEFT: seconds before any work
        from vlmdet.training.train import train

    return train(DatasetRef.from_dict(req["dataset"]), RunConfig.from_dict(req["config"]), req["out"]).to_dict()


def _evaluate(req: dict[str, Any]) -> dict[str, Any]:
    with phase("imports"):
        from vlmdet.prediction.evaluate import evaluate

    return evaluate(req["model"], DatasetRef.from_dict(req["dataset"]), RunConfig.from_dict(req["config"]),
                    req["out"], split=req.get("split")).to_dict()


def _merge(req: dict[str, Any]) -> dict[str, Any]:
    with phase("imports"):
        from vlmdet.data.images import open_image
        from vlmdet.publishing.merge import merge
        from vlmdet.data.samples import load_split

    dataset = DatasetRef.from_dict(req["dataset"])
    with phase("decode images"):  # the few the merge checks its logits on
        samples, _ = load_split(dataset.splits[req.get("split", "test")])
        images = [open_image(s.file) for s in samples[: req.get("check_images", 2)]]
    return merge(AdapterRef.from_dict(req["adapter"]), RunConfig.from_dict(req["config"]), req["out"], images).to_dict()


STEPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"train": _train, "evaluate": _evaluate, "merge": _merge}


def main(argv: list[str] | None = None) -> int:
    step, request, result = (argv or sys.argv[1:])[:3]
    logging.basicConfig(level=logging.INFO, format=f"[{step}] %(levelname)s %(name)s: %(message)s")
    rank0 = int(os.environ.get("RANK", 0)) == 0
    out: dict[str, Any]
    try:
        out = {"record": STEPS[step](json.loads(Path(request).read_text()))}
        code = 0
    except Exception as err:  # the parent turns this into a clear task failure
        import torch

        kind = "oom" if isinstance(err, torch.cuda.OutOfMemoryError) else "config" if isinstance(err, ConfigError) else "error"
        out = {"kind": kind, "message": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        if kind == "config":  # a user error: its message says what to fix; the traceback stays in the result
            print(f"[{step}] {' '.join(out['message'].split())}", file=sys.stderr)
        else:
            traceback.print_exc()
        code = 1
    if rank0:
        # where the step's seconds went (vlmdet.run.timeline); the parent adds start-up and exit
        write_json(result, {**out, "timeline": take(), "written": time.time()}, indent=1)
    return code


if __name__ == "__main__":
    sys.exit(main())
