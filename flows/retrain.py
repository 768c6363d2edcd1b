"""The retrain flow: vlmdet.pipeline.run's run with Prefect tasks as its steps.

    prepare_data -> train -> evaluate adapter [-> evaluate base] -> find champion -> measure champion
    -> gate adapter -> merge -> evaluate merged -> gate merged -> publish

The order and the branches are vlmdet/pipeline/run.py's (`run`), the same that `vlmdet train` and the
GPU benchmark run; this file maps each step to its task. Run it by hand (`vlmdet retrain --preset
smoke --workdir runs/demo`), from the Prefect UI (deployments/prefect.yaml), or on a schedule. It
writes WORKDIR/summary.json whatever the gate decides and fails when a step fails.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.utilities.urls import url_for

from tasks.common import summary_artifact, tracker_artifact
from tasks.evaluate import evaluate
from tasks.gate import find_champion, gate, measure_champion
from tasks.merge import merge
from tasks.prepare_data import prepare_data
from tasks.publish import publish, resolve_token
from tasks.train import train
from vlmdet.pipeline import run as pipeline
from vlmdet.run import tracking
from vlmdet.run.keys import source_stamp
from vlmdet.run.layout import RunLayout


class PrefectSteps:
    """Each step as its task. Train, evaluate, merge and prepare persist their results beside the run
    folder (RunLayout.results), keyed on their inputs: a flow-run retry or a run with nothing new gets
    them back as "Cached" states without starting a child, unless the folder no longer holds what the
    key produced (then the cache is refreshed: Prefect keeps the record, not the files)."""

    last_cached = False

    def _cached(self, task_fn, done: bool, layout: RunLayout):
        return task_fn.with_options(result_storage=layout.results, **({} if done else {"refresh_cache": True}))

    def _keep(self, state):
        self.last_cached = state.name == "Cached"
        return state.result()

    def prepare_data(self, config, layout):
        # the stamp (a Hub dataset's commit) is read once: the cache key and the data loaded name one revision
        return self._cached(prepare_data, layout.prepared_exists(config), layout)(
            config, str(layout.root), stamp=source_stamp(config.data.dataset))

    def train(self, dataset, config, layout, fresh=False):
        return self._keep(self._cached(train, layout.train_done(dataset, config, fresh), layout)(
            dataset, config, str(layout.root), fresh=fresh, return_state=True))

    def evaluate(self, model, dataset, config, layout, name="adapter"):
        return self._keep(self._cached(evaluate, layout.eval_done(model, dataset, config, name), layout)(
            model, dataset, config, str(layout.root), name=name, return_state=True))

    def merge(self, adapter, dataset, config, layout):
        return self._cached(merge, layout.merge_done(adapter, dataset, config), layout)(
            adapter, dataset, config, str(layout.root))

    def resolve_token(self, config):
        return resolve_token(config)

    def find_champion(self, config, layout, token):
        return find_champion(config, token=token, workdir=str(layout.root))

    def measure_champion(self, champion, report, dataset, config, layout, token):
        return measure_champion(champion, report, dataset, config, str(layout.root), token=token,
                                evaluate_with=lambda model, cfg: self.evaluate(model, dataset, cfg, layout, "champion"))

    def gate(self, report, config, layout, *, token, champion, champion_report, dataset, name="adapter"):
        return gate(report, config, token=token, workdir=str(layout.root), champion=champion,
                    champion_report=champion_report, dataset=dataset, name=name)

    def publish(self, merged, report, dataset, adapter, decision, config, layout, token):
        return publish(merged, report, dataset, adapter, decision, config, str(layout.root), token=token)


@flow(name="retrain", log_prints=True)
def retrain(preset: str = "smoke", workdir: str = "runs/latest", threshold: float | None = None,
            dataset: str | None = None, overrides: dict[str, Any] | None = None, force: bool = False) -> dict[str, Any]:
    """Fine-tune, evaluate and (when the gate passes) merge and publish.

    preset: a name from vlmdet/config/presets or a YAML path. threshold / dataset: shortcuts for
    gate.threshold / data.dataset. overrides: any setting by dotted key, e.g. {"train.max_steps": 10}.
    force: retrain from the base even when data, configuration and base model are unchanged since
    the last success (without it such a run skips training and evaluation and says so).
    """
    log = get_run_logger()
    resolved = pipeline.resolve(preset, overrides, threshold=threshold, dataset=dataset)
    if resolved.check_run:
        log.warning(resolved.check_run)
    layout = RunLayout.at(workdir, str(flow_run.id or "manual"))
    # the tracker run names this flow run (its UI address: None without a UI, unlike flow_run.ui_url's "None/...")
    with tracking.flow_run_env(flow_run.id, url_for("flow-run", obj_id=flow_run.id) if flow_run.id else None):
        summary = pipeline.run(resolved, layout, PrefectSteps(), force=force, logger=log)
    summary_artifact(summary, layout.summary_file)
    tracker_artifact(summary.tracker)
    return summary.to_dict()
