"""What each stage's output depends on, as short stable hashes.

The run folder is laid out by these keys (WORKDIR/data/<data_key>, WORKDIR/train/<training_key>),
so two configurations never share prepared files or checkpoints, and a rerun of the same one
finds its own: a crashed training resumes, unchanged inputs are recognised as nothing new.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from vlmdet.config.settings import RunConfig, keys_where, names_where
from vlmdet.config.specs import split_spec


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
    # Execution settings (vlmdet/config/settings.py roles; train.profile among them: what a profile changes, quantization
    # and batch split, is in the other fields, so a resolved and an unresolved config share the key) are
    # left out; save_steps and save_total_limit move to `selection` below.
    for name in TRAIN_EXECUTION_ONLY + ("save_steps", "save_total_limit"):
        train.pop(name, None)
    # save_steps and save_total_limit decide which checkpoints exist to choose from, and the
    # validation settings which one is kept (vlmdet.training.select): they change the adapter.
    selection = {"save_steps": cfg["train"]["save_steps"], "save_total_limit": cfg["train"]["save_total_limit"],
                 "val_max_images": cfg["eval"].get("val_max_images", 0),
                 "val_batch_size": cfg["eval"]["batch_size"], "max_new_tokens": cfg["eval"]["max_new_tokens"]}
    return _hash({"data": data_fingerprint, "model": cfg["model"], "lora": cfg["lora"], "train": train,
                  "selection": selection})


# Derived from the roles declared with each field (vlmdet/config/settings.py): settings that change how fast a
# step runs, never what it produces.
TRAIN_EXECUTION_ONLY = names_where("train", role="execution")
EVAL_EXECUTION_ONLY = names_where("eval", role="execution")
# eval settings that change what is written beside the numbers (the preview), not the numbers
EVAL_OUTPUT_ONLY = names_where("eval", role="output")


def evaluation_key(config: RunConfig, data_fingerprint: str) -> str:
    """The trained adapter and how it is measured: what makes a metric comparable."""
    ev = {k: v for k, v in config.to_dict()["eval"].items() if k not in EVAL_EXECUTION_ONLY + EVAL_OUTPUT_ONLY}
    return _hash({"training": training_key(config, data_fingerprint), "eval": ev})


def decision_settings(config: RunConfig) -> dict[str, Any]:
    """The settings with role `decided` (gate, publish): a change re-runs the gate on the saved
    evaluation, no retraining."""
    cfg = config.to_dict()
    out: dict[str, dict[str, Any]] = {}
    for key in keys_where(role="decided"):
        section, name = key.split(".")
        out.setdefault(section, {})[name] = cfg[section][name]
    return out


def _file_stats(files: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]


def path_stamp(model: str) -> str:
    """Changes when the model behind a path changes: a folder (adapter, merged, local base) by the
    names, sizes and modification times of its files; anything else (a Hub id, tiny:...) is itself.

    Cheap even for a 15 GB merged model (stat, not read), and a re-merge or retrain into the same
    folder rewrites the files, so a cached evaluation of the old contents is never returned.
    """
    path = Path(model).expanduser()
    if not path.is_dir():
        return model
    files = sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)
    return f"{path.resolve()}#{_hash(_file_stats(files))}"


def step_key(step: str, out_dir: str | Path, **inputs: Any) -> str:
    """A Prefect cache key for one heavy step writing to out_dir: the folder plus every input.

    The output folder is part of it, so two work folders (or two test runs) never share a result
    that points into the other's files.
    """
    return f"{step}-{_hash({'out': str(Path(out_dir).resolve()), **inputs})}"


MARKER = ".vlmdet-step-key"


def write_marker(folder: str | Path, key: str) -> None:
    """Record which cache key produced the files in `folder` (written after they are complete)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / MARKER).write_text(key)


def marker_matches(folder: str | Path, key: str) -> bool:
    """True when `folder` still holds what `key` produced: Prefect's cached record may be returned.

    Prefect keeps the result record, not the files it points to: a folder deleted by hand, or
    overwritten by another model (workdir/merged holds one merge at a time), must refresh the cache.
    """
    try:
        return (Path(folder) / MARKER).read_text() == key
    except OSError:
        return False


_SHA = re.compile(r"@([0-9a-f]{40})$")
# A Hub repo id, ORG/NAME: the one pattern provenance, the model card and serving check names against.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def stamp_revision(stamp: str) -> str | None:
    """The Hub commit a source_stamp recorded (`hub:ORG/NAME[@bbox=...]@SHA`), or None."""
    m = _SHA.search(stamp)
    return m.group(1) if m else None


def hub_revision(repo_id: str, repo_type: str = "model", cached: bool = True) -> str | None:
    """The commit sha of a Hub repo: the Hub's current one when reachable, else (cached=True) the
    one of the copy in the local HF cache, which is what an offline load reads; else None."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        info = api.dataset_info(repo_id) if repo_type == "dataset" else api.model_info(repo_id)
        if info.sha:
            return info.sha
    except Exception:  # offline, unreachable, private without a token, or no such repo
        pass
    if not cached:
        return None
    try:
        from huggingface_hub import snapshot_download

        # .../snapshots/<sha>: the revision the cached copy was downloaded at
        name = Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)).name
        return name if re.fullmatch(r"[0-9a-f]{40}", name) else None
    except Exception:
        return None


def source_revision(spec: str, stamp: str) -> str | None:
    """The Hub commit to load a hub: spec at and to record: the one its stamp pinned, else (offline)
    the cached copy's; None for local data."""
    kind, rest = split_spec(spec, "data.dataset", default="")
    if kind != "hub":
        return None
    return stamp_revision(stamp) or hub_revision(rest.split("@")[0], "dataset")


def source_stamp(spec: str) -> str:
    """Changes when the data behind a spec changes.

    Local sources: size and mtime of the annotation file and of every image it lists (COCO) or of
    every file under the folder (hf-disk, parquet). Hub datasets: the repo's current commit when the
    Hub is reachable, else the spec itself (offline, the cached copy is what would load anyway).
    synth: the spec (generation is seeded).
    """
    kind, rest = split_spec(spec, "data.dataset", default="")
    target = rest.split("@")[0]
    if kind == "hub":
        # materialize loads the dataset at this revision (prepare_data passes it on), so the data a
        # cache key names is the data that was used. Offline there is no revision to pin: the
        # cached copy is what loads anyway (its revision is still recorded, see data.sources).
        sha = hub_revision(target, "dataset", cached=False)
        return f"{spec}@{sha}" if sha else spec
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
    return f"{spec}#{_hash(_file_stats(files))}"
