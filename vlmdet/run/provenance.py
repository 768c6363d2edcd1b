"""What produced a model: the data and base-model revisions and the library versions. One place.

Built once, in the training child (the process whose libraries trained the adapter), carried in
AdapterRef.provenance, and written unchanged into summary.json, vlmdet.json and the model card.
A later reader can then load exactly the same inputs: `datasets.load_dataset(id, revision=...)`,
`from_pretrained(base, revision=...)`, and the same package versions.
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
from pathlib import Path
from typing import Any

from vlmdet.config.settings import RunConfig
from vlmdet.config.specs import split_spec
from vlmdet.run.records import DatasetRef

PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "vlmdet")
_SHA = re.compile(r"^[0-9a-f]{40}$")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape training (None: not installed, e.g. no CUDA)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _files_hash(folder: Path) -> str:
    """A cheap identity of a local model folder: file names and sizes, and config.json's bytes."""
    rows = sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
    config = (folder / "config.json").read_bytes() if (folder / "config.json").is_file() else b""
    return hashlib.sha256(json.dumps(rows).encode() + config).hexdigest()[:16]


def base_model_record(base: str, resolved: str) -> dict[str, Any]:
    """{"id", "revision", "files_hash"}: revision is a Hub commit sha for a Hub id (None if it cannot
    be known); a local folder has no Hub revision, so a hash of its files names it instead (a folder
    inside the HF cache, .../snapshots/<sha>, does have one)."""
    from vlmdet.run.keys import REPO_ID, hub_revision

    path = Path(resolved)
    if path.is_dir():
        revision = path.name if _SHA.match(path.name) and path.parent.name == "snapshots" else None
        return {"id": base, "revision": revision, "files_hash": _files_hash(path)}
    if REPO_ID.match(resolved):
        return {"id": base, "revision": hub_revision(resolved, "model"), "files_hash": None}
    return {"id": base, "revision": None, "files_hash": None}


def provenance(dataset: DatasetRef, config: RunConfig, base_resolved: str) -> dict[str, Any]:
    """The provenance record of a model trained on `dataset` from `base_resolved`."""
    source = dataset.source or config.data.dataset
    kind, rest = split_spec(source, "data.dataset", default="")
    hub_id = rest.split("@", 1)[0] if kind == "hub" else None
    return {
        "dataset": {"source": source, "hub_id": hub_id, "revision": dataset.revision,
                    "fingerprint": dataset.fingerprint},
        "base_model": base_model_record(config.model.base, base_resolved),
        "versions": package_versions(),
        "python": platform.python_version(),
    }
