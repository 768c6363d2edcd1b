"""Task: materialize the dataset spec and prepare it (validate, quarantine, split, fingerprint).

Cached: a rerun with the same data settings and unchanged source reuses the prepared data (a
flow-run retry after a crash does not redo it).
"""
from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.common import step_dir
from vlmdet.config import RunConfig
from vlmdet.data import materialize, prepare
from vlmdet.records import DatasetRef


def _source_stamp(spec: str) -> str:
    """Changes when a local source changes (size and mtime of its files); Hub and synth specs are their own stamp."""
    kind, _, path = spec.partition(":")
    if kind in ("coco", "hf-disk", "parquet") and Path(path.split("@")[0]).exists():
        p = Path(path.split("@")[0])
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())[:5000]
        return hashlib.sha256("".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files).encode()).hexdigest()
    return spec


def _cache_key(context, parameters) -> str:
    config: RunConfig = parameters["config"]
    out = step_dir(parameters["workdir"], "data", "prepared")
    blob = json.dumps({"data": config.to_dict()["data"], "out": str(out), "source": _source_stamp(config.data.dataset)},
                      sort_keys=True)
    return "prepare-" + hashlib.sha256(blob.encode()).hexdigest()[:24]


def prepared_exists(workdir: str) -> bool:
    """False when the prepared folder is gone (deleted by hand): the cache must then be refreshed."""
    return (step_dir(workdir, "data", "prepared") / "report.json").is_file()


@task(name="prepare_data", cache_key_fn=_cache_key, cache_expiration=timedelta(days=30), persist_result=True,
      retries=2, retry_delay_seconds=30)  # retries: Hub downloads fail transiently; validation is deterministic
def prepare_data(config: RunConfig, workdir: str) -> DatasetRef:
    root = step_dir(workdir, "data")
    raw = materialize(config.data.dataset, root / "raw", seed=config.data.seed, image_size=tuple(config.data.image_size))
    ref = prepare(raw, root / "prepared", config.data, source=config.data.dataset)
    create_table_artifact([{"split": s, **c} for s, c in ref.counts.items()], key="dataset-counts",
                          description=f"Prepared {ref.source}, fingerprint {ref.fingerprint[:12]}")
    quarantined = ref.quarantine_counts
    if quarantined:
        rows = "\n".join(f"| {reason} | {n} |" for reason, n in sorted(quarantined.items()))
        examples = "\n".join(f"- `{q['file']}`: {q['reason']} {q.get('detail', '')}" for q in ref.quarantine[:20])
        create_markdown_artifact(f"## Quarantined\n\n| reason | count |\n|---|---|\n{rows}\n\n{examples}",
                                 key="dataset-quarantine")
    return ref
