"""Task: materialize the dataset spec and prepare it (validate, quarantine, split, fingerprint).

Cached: a rerun with the same data settings and an unchanged source reuses the prepared data (a
flow retry after a crash does not redo it). Each data configuration has its own folder,
WORKDIR/data/<data_key>, so runs on different data never read each other's files.
"""
from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.common import step_dir
from vlmdet.config import ConfigError, RunConfig
from vlmdet.data import DataError, materialize, prepare
from vlmdet.keys import data_key, source_revision, source_stamp, stamp_revision
from vlmdet.records import DatasetRef


def data_dir(workdir: str | Path, config: RunConfig) -> Path:
    return step_dir(workdir, "data", data_key(config))


def prepared_exists(workdir: str | Path, config: RunConfig) -> bool:
    """False when the prepared folder is missing (never made, or deleted by hand): refresh the cache."""
    return (data_dir(workdir, config) / "prepared" / "report.json").is_file()


def _cache_key(context, parameters) -> str:
    config: RunConfig = parameters["config"]
    stamp = parameters.get("stamp") or source_stamp(config.data.dataset)
    blob = json.dumps({"dir": str(data_dir(parameters["workdir"], config)), "source": stamp})
    return "prepare-" + hashlib.sha256(blob.encode()).hexdigest()[:24]


def _transient_only(task, task_run, state) -> bool:
    """A missing path or data with nothing usable fails the same way every time: no retry."""
    try:
        state.result()
    except (DataError, ConfigError):
        return False
    except Exception:
        return True  # a Hub download cut off, a full disk freed by someone: worth another try
    return False


@task(name="prepare_data", cache_key_fn=_cache_key, cache_expiration=timedelta(days=30), persist_result=True,
      retries=2, retry_delay_seconds=30, retry_condition_fn=_transient_only)
def prepare_data(config: RunConfig, workdir: str, stamp: str | None = None) -> DatasetRef:
    """stamp: keys.source_stamp of the dataset, computed once by the caller so that the cache key and
    the data loaded name the same Hub revision (computed here when not given)."""
    spec = config.data.dataset
    stamp = stamp or source_stamp(spec)
    root = data_dir(workdir, config)
    # a hub: source loads at the commit its stamp names; the provenance records that revision
    pinned = stamp_revision(stamp)
    raw = materialize(spec, root / "raw", seed=config.data.seed, image_size=tuple(config.data.image_size),
                      revision=pinned)
    ref = prepare(raw, root / "prepared", config.data, source=spec, revision=pinned or source_revision(spec, stamp))
    create_table_artifact([{"split": s, **c} for s, c in ref.counts.items()], key="dataset-counts",
                          description=f"Prepared {ref.source}, fingerprint {ref.fingerprint[:12]}")
    quarantined = ref.quarantine_counts
    if quarantined:
        rows = "\n".join(f"| {reason} | {n} |" for reason, n in sorted(quarantined.items()))
        examples = "\n".join(f"- `{q['file']}`: {q['reason']} {q.get('detail', '')}" for q in ref.quarantine[:20])
        create_markdown_artifact(f"## Quarantined\n\n| reason | count |\n|---|---|\n{rows}\n\n{examples}",
                                 key="dataset-quarantine")
    return ref
