"""What each stage's output depends on, as short stable hashes.

The run folder is laid out by these keys (WORKDIR/data/<data_key>, WORKDIR/train/<training_key>),
so two configurations never share prepared files or checkpoints, and a rerun of the same one
finds its own: a crashed training resumes, unchanged inputs are recognised as nothing new.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from vlmdet.config import RunConfig


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_key(config: RunConfig) -> str:
    return _hash(config.to_dict()["data"])


def training_key(config: RunConfig, data_fingerprint: str) -> str:
    """The data, the base and every setting that changes the adapter; not gate or publish."""
    cfg = config.to_dict()
    train = dict(cfg["train"])
    # How the effective batch is split (per-device x accumulation) is an execution detail: an
    # out-of-memory retry halves one and doubles the other and is still the same run.
    train["effective_batch"] = train.pop("per_device_batch") * train.pop("grad_accum")
    for execution_only in ("timeout_s", "num_processes", "dataloader_workers", "save_steps", "save_total_limit",
                           "logging_steps"):
        train.pop(execution_only, None)
    return _hash({"data": data_fingerprint, "model": cfg["model"], "lora": cfg["lora"], "train": train})


def evaluation_key(config: RunConfig, data_fingerprint: str) -> str:
    """The trained adapter and how it is measured: what makes a metric comparable."""
    ev = {k: v for k, v in config.to_dict()["eval"].items() if k not in ("timeout_s", "preview_images")}
    return _hash({"training": training_key(config, data_fingerprint), "eval": ev})


def decision_settings(config: RunConfig) -> dict[str, Any]:
    """Gate and publish settings: a change re-runs the gate on the saved evaluation, no retraining."""
    cfg = config.to_dict()
    return {"gate": cfg["gate"], "publish": {k: v for k, v in cfg["publish"].items() if k != "merge_timeout_s"}}


def source_stamp(spec: str) -> str:
    """Changes when the data behind a spec changes.

    Local sources: size and mtime of the annotation file and of every image it lists (COCO) or of
    every file under the folder (hf-disk, parquet). Hub datasets: the repo's current commit when the
    Hub is reachable, else the spec itself (offline, the cached copy is what would load anyway).
    synth: the spec (generation is seeded).
    """
    kind, _, rest = spec.partition(":")
    target = rest.split("@")[0]
    if kind == "hub":
        try:
            from huggingface_hub import HfApi

            return f"{spec}@{HfApi().dataset_info(target).sha}"
        except Exception:  # offline, unreachable, or no such repo: materialize will say which
            return spec
    path = Path(target).expanduser()
    if kind not in ("coco", "hf-disk", "parquet") or not path.exists():
        return spec
    if kind == "coco":
        ann = path / "annotations.json" if path.is_dir() else path
        files = [ann]
        try:
            images = json.loads(ann.read_text()).get("images", [])
            files += [ann.parent / im["file_name"] for im in images if "file_name" in im]
        except (OSError, ValueError):
            pass
    else:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    return f"{spec}#{_hash(stats)}"
