"""The retrain flow: vlmdet.pipeline.run's run with Prefect tasks as its steps.

    prepare_data -> train -> evaluate adapter [-> evaluate base] -> find champion -> measure champion
    -> gate adapter -> merge -> evaluate merged -> gate merged -> publish

The order and the branches are vlmdet/pipeline/run.py's (`run`), the same that `vlmdet train` and the
GPU benchmark run; this file runs each declared step (vlmdet.pipeline.steps) as its Prefect task
(tasks.common.task_of). Run it by hand (`vlmdet retrain --preset
smoke --workdir runs/demo`), from the Prefect UI (deployments/prefect.yaml), or on a schedule. It
writes WORKDIR/summary.json whatever the gate decides and fails when a step fails.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.utilities.urls import url_for

from tasks.common import read_secret, show, task_of
from vlmdet.pipeline import run as pipeline
from vlmdet.pipeline.show import summary_markdown, tracker_shows
from vlmdet.pipeline.step import Show, Step
from vlmdet.run import tracking
from vlmdet.run.layout import RunLayout


class PrefectDriver:
    """Each step as its task (tasks.common.task_of). Steps with a key persist their results beside the run
    folder (RunLayout.results): a flow-run retry or a run with nothing new gets them back as "Cached" states
    without starting a child, unless the folder no longer holds what the key produced (then the cache is
    refreshed: Prefect keeps the record, not the files)."""

    read_secret = staticmethod(read_secret)

    def __init__(self, layout: RunLayout):
        self.layout = layout
        # names the publication: the flow run's id, stable across task and flow retries, distinct between runs
        self.run_id = str(flow_run.id).replace("-", "")[:12] if flow_run.id else None

    def __call__(self, step: Step, *args: Any, **kwargs: Any) -> tuple[Any, bool]:
        task_fn = task_of(step)
        if step.key:
            done = step.is_done(step.arguments(*args, **kwargs))
            task_fn = task_fn.with_options(result_storage=self.layout.results, **({} if done else {"refresh_cache": True}))
        state = task_fn(*args, return_state=True, **kwargs)
        return state.result(), state.name == "Cached"


@flow(name="retrain", log_prints=True)
def retrain(preset: str = "smoke", workdir: str = "runs/latest", threshold: float | None = None,
            dataset: str | None = None, overrides: dict[str, Any] | None = None, force: bool = False,
            resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune, evaluate and (when the gate passes) merge and publish.

    preset: a name from vlmdet/config/presets or a YAML path. threshold / dataset: shortcuts for
    gate.threshold / data.dataset. overrides: any setting by dotted key, e.g. {"train.max_steps": 10}.
    force: retrain from the base even when data, configuration and base model are unchanged since
    the last success (without it such a run skips training and evaluation and says so).
    resolved: the configuration `vlmdet retrain` already checked and resolved from these parameters
    (pipeline.Resolved.to_dict()); without it (the UI, a schedule) they are resolved here.
    """
    log = get_run_logger()
    run_with = (pipeline.Resolved.from_dict(resolved) if resolved
                else pipeline.resolve(preset, overrides, threshold=threshold, dataset=dataset))
    if run_with.check_run:
        log.warning(run_with.check_run)
    layout = RunLayout.at(workdir, str(flow_run.id or "manual"))
    # the tracker run names this flow run (its UI address: None without a UI, unlike flow_run.ui_url's "None/...")
    with tracking.flow_run_env(flow_run.id, url_for("flow-run", obj_id=flow_run.id) if flow_run.id else None):
        summary = pipeline.run(run_with, layout, PrefectDriver(layout), force=force, logger=log)
    show(Show("retrain-summary", "markdown", summary_markdown(summary.to_dict(), layout.summary_file)))
    for item in tracker_shows(summary.tracker):
        show(item)
    return summary.to_dict()
