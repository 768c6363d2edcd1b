"""Prefect tasks: find the champion, measure it on today's test split, and the champion/challenger gate.

Reading and downloading the champion are network calls, retried for transient errors only. When
the champion's published predictions were not measured on today's test split, it is evaluated
again through the evaluate task (a child process, like every model evaluation). The decision is
vlmdet.pipeline.steps.judge (the pure `vlmdet.decide.gate.decide` on a paired bootstrap) and never retried; the
numbers, the reason and a picture of the images the two models disagree on go into an artifact.
"""
from __future__ import annotations

from typing import Callable

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from tasks import events
from tasks.common import image_markdown
from tasks.evaluate import evaluate
from vlmdet.pipeline import steps as runsteps
from vlmdet.config.settings import RunConfig
from vlmdet.decide.gate import Champion, decision_markdown
from vlmdet.run.layout import RunLayout
from vlmdet.publishing import TransientPublishError, read_champion
from vlmdet.run.records import DatasetRef, EvalReport, GateDecision


def retry_transient_only(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    """Retry the task only for network hiccups; a 401/403 or a bad repo id will not heal by waiting."""
    try:
        state.result()
    except TransientPublishError:
        return True
    except BaseException:  # noqa: BLE001
        return False
    return False


# cache_policy=NONE: the champion can change between runs, and the token must not feed a cache key.
@task(name="find-champion", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_transient_only,
      cache_policy=NONE)
def find_champion(config: RunConfig, token: str | None = None, workdir: str | None = None) -> Champion | None:
    """The model now at publish.target (None when there is none yet)."""
    workdir = workdir or _workdir()
    champion = read_champion(config, workdir, token)
    get_run_logger().info("champion at %s: %s", config.publish.target,
                          f"{champion.source} ({champion.metrics})" if champion else "none yet")
    if champion is not None and champion.unreadable:
        events.champion_unreadable(champion, config, workdir)
    return champion


@task(name="fetch-champion", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_transient_only,
      cache_policy=NONE)
def fetch_champion(champion: Champion, config: RunConfig, workdir: str, token: str | None = None,
                   predictions_only: bool = False) -> str | None:
    """The champion's published predictions (predictions_only) or a local folder with its model."""
    return runsteps.fetch_champion(champion, config, workdir, token, predictions_only)


def measure_champion(champion: Champion | None, report: EvalReport, dataset: DatasetRef, config: RunConfig,
                     workdir: str, token: str | None = None,
                     evaluate_with: Callable[[str, RunConfig], EvalReport] | None = None) -> EvalReport | None:
    """The champion's detections on today's test split: its published ones when they were measured there,
    else a fresh evaluation of its model (evaluate task, name "champion"; `evaluate_with(model, config)`
    runs it the caller's way, e.g. with its result storage). None without a champion."""
    return runsteps.measure_champion(
        champion, report, config, lambda c, only: fetch_champion(c, config, workdir, token, predictions_only=only),
        evaluate_with or (lambda model, cfg: evaluate(model, dataset, cfg, workdir, name="champion")),
        get_run_logger())


@task(name="gate", task_run_name="gate-{name}", cache_policy=NONE)
def gate(report: EvalReport, config: RunConfig, token: str | None = None, workdir: str | None = None,
         champion: Champion | None = None, champion_report: EvalReport | None = None,
         dataset: DatasetRef | None = None, name: str = "adapter") -> GateDecision:
    """Decide on `report` (the model called `name`) against the champion measured on the same images.

    dataset: today's prepared data; without it (a caller that measured no champion) the champion is
    read here and, if there is one, the gate stays closed: it cannot be compared. workdir: what a
    local:DIR target is relative to (default: the flow run's `workdir` parameter, else cwd).
    """
    workdir = workdir or _workdir()
    if dataset is None:
        champion = read_champion(config, workdir, token)
    decision = runsteps.judge(report, config, RunLayout.at(workdir), champion, champion_report, dataset, name)
    get_run_logger().info("gate %s: %s", "passed" if decision.passed else "closed", decision.reason)
    if not decision.passed:
        events.gate_closed(decision, config, workdir, name)
    picture = ("\n\nChampion (left) and new model (right) on those images; green: ground truth, red: predictions.\n\n"
               + image_markdown(decision.picture, "disagreements")) if decision.picture else ""
    create_markdown_artifact(markdown=decision_markdown(decision) + picture, key="gate-decision" if name == "adapter" else f"gate-decision-{name}",
                             description=f"Publish gate ({name}) for {config.publish.target}")
    return decision


def _workdir() -> str:
    """local:DIR targets are relative to the flow's workdir: read it from the flow run's parameters."""
    from prefect.runtime import flow_run

    params = flow_run.parameters or {}
    return str(params.get("workdir") or ".")
