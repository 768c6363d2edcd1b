"""Task: merge the adapter into the unquantized base and check it (vlmdet.pipeline.steps.merge).

The result persists, keyed on the adapter's files, the model settings and the check images: a
flow-run retry after a failed publish does not merge again. Each adapter's merge has a folder of its
own, WORKDIR/merged/<id>, with its record beside it (vlmdet.run.layout); a later merge removes the ones no
running run holds (a 7B merge is 16.6 GB), and the flow refreshes the cache when its folder is gone.
"""
from __future__ import annotations

from datetime import timedelta

from prefect import get_run_logger, task

from vlmdet.pipeline import steps as runsteps
from vlmdet.config.settings import RunConfig
from vlmdet.run.layout import RunLayout
from vlmdet.run.records import AdapterRef, DatasetRef, MergedRef


def _cache_key(context, parameters) -> str:
    return RunLayout.at(parameters["workdir"]).merge_key(parameters["adapter"], parameters["dataset"],
                                                         parameters["config"])


@task(name="merge", cache_key_fn=_cache_key, persist_result=True, cache_expiration=timedelta(days=90))
def merge(adapter: AdapterRef, dataset: DatasetRef, config: RunConfig, workdir: str) -> MergedRef:
    merged = runsteps.merge(adapter, dataset, config, RunLayout.at(workdir))
    get_run_logger().info("merged model at %s (max |logit diff| vs base + adapter: %.3g)", merged.path,
                          merged.max_abs_logit_diff)
    return merged
