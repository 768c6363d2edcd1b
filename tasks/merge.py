"""Task: merge the adapter into the unquantized base and check it (vlmdet.steps merge).

The result persists, keyed on the adapter's files, the model settings and the check images: a
flow-run retry after a failed publish does not merge again. WORKDIR/merged holds one merge at a
time (a 7B merge is 15 GB), so its key is recorded beside it (steps/merge) and the flow refreshes
the cache when the folder holds another adapter's merge (merge_done).
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from prefect import get_run_logger, task

from tasks.common import step_dir
from vlmdet.config import RunConfig
from vlmdet.keys import marker_matches, path_stamp, step_key, write_marker
from vlmdet.records import AdapterRef, DatasetRef, MergedRef
from vlmdet.runner import run_step


def merge_key(adapter: AdapterRef, dataset: DatasetRef, config: RunConfig, workdir: str | Path) -> str:
    return step_key("merge", step_dir(workdir, "merged"), adapter=path_stamp(adapter.path), data=dataset.fingerprint,
                    model_settings=config.to_dict()["model"], split=config.eval.split)


def _cache_key(context, parameters) -> str:
    return merge_key(parameters["adapter"], parameters["dataset"], parameters["config"], parameters["workdir"])


def merge_done(adapter: AdapterRef, dataset: DatasetRef, config: RunConfig, workdir: str | Path) -> bool:
    """True while WORKDIR/merged holds this adapter's merge."""
    return (step_dir(workdir, "merged") / "config.json").is_file() and \
        marker_matches(step_dir(workdir, "steps", "merge"), merge_key(adapter, dataset, config, workdir))


@task(name="merge", cache_key_fn=_cache_key, persist_result=True, cache_expiration=timedelta(days=90))
def merge(adapter: AdapterRef, dataset: DatasetRef, config: RunConfig, workdir: str) -> MergedRef:
    out = step_dir(workdir, "merged")
    record = run_step("merge", {"adapter": adapter.to_dict(), "dataset": dataset.to_dict(), "config": config.to_dict(),
                                "out": str(out), "split": config.eval.split}, step_dir(workdir, "steps", "merge"),
                      timeout_s=config.publish.merge_timeout_s)
    merged = MergedRef.from_dict(record)
    write_marker(step_dir(workdir, "steps", "merge"), merge_key(adapter, dataset, config, workdir))
    get_run_logger().info("merged model at %s (max |logit diff| vs base + adapter: %.3g)", merged.path,
                          merged.max_abs_logit_diff)
    return merged
