"""Task: materialize the dataset spec and prepare it (validate, quarantine, split, fingerprint).

Cached: a rerun with the same data settings and an unchanged source reuses the prepared data (a
flow retry after a crash does not redo it). Each data configuration has its own folder,
WORKDIR/data/<data_key> (vlmdet.run.layout), so runs on different data never read each other's files.
"""
from __future__ import annotations

from datetime import timedelta

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from vlmdet.config.settings import ConfigError, RunConfig
from vlmdet.data import DataError
from vlmdet.run.keys import source_stamp
from vlmdet.run.layout import RunLayout
from vlmdet.run.records import DatasetRef
from vlmdet.pipeline.steps import prepare


def _cache_key(context, parameters) -> str:
    config: RunConfig = parameters["config"]
    stamp = parameters.get("stamp") or source_stamp(config.data.dataset)
    return RunLayout.at(parameters["workdir"]).prepare_key(config, stamp)


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
    ref = prepare(config, RunLayout.at(workdir), stamp)
    create_table_artifact([{"split": s, **c} for s, c in ref.counts.items()], key="dataset-counts",
                          description=f"Prepared {ref.source}, fingerprint {ref.fingerprint[:12]}")
    quarantined = ref.quarantine_counts
    if quarantined:
        rows = "\n".join(f"| {reason} | {n} |" for reason, n in sorted(quarantined.items()))
        examples = "\n".join(f"- `{q['file']}`: {q['reason']} {q.get('detail', '')}" for q in ref.quarantine[:20])
        create_markdown_artifact(f"## Quarantined\n\n| reason | count |\n|---|---|\n{rows}\n\n{examples}",
                                 key="dataset-quarantine")
    return ref
