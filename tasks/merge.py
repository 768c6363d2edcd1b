"""Task: merge the adapter into the unquantized base and check it (vlmdet.steps merge)."""
from __future__ import annotations

from prefect import get_run_logger, task

from tasks.common import step_dir
from vlmdet.config import RunConfig
from vlmdet.records import AdapterRef, DatasetRef, MergedRef
from vlmdet.runner import run_step


@task(name="merge")
def merge(adapter: AdapterRef, dataset: DatasetRef, config: RunConfig, workdir: str) -> MergedRef:
    out = step_dir(workdir, "merged")
    record = run_step("merge", {"adapter": adapter.to_dict(), "dataset": dataset.to_dict(), "config": config.to_dict(),
                                "out": str(out), "split": config.eval.split}, step_dir(workdir, "steps", "merge"),
                      timeout_s=config.publish.merge_timeout_s)
    merged = MergedRef.from_dict(record)
    get_run_logger().info("merged model at %s (max |logit diff| vs base + adapter: %.3g)", merged.path,
                          merged.max_abs_logit_diff)
    return merged
