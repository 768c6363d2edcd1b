"""Prefect tasks: find the champion, measure it on today's test split, and the champion/challenger gate.

Reading and downloading the champion are network calls, retried for transient errors only. When
the champion's published predictions were not measured on today's test split, it is evaluated
again through the evaluate task (a child process, like every model evaluation). The decision is
the pure `vlmdet.gate.decide` on a paired bootstrap (`vlmdet.gate.compare`) and never retried; the
numbers, the reason and a picture of the images the two models disagree on go into an artifact.
"""
from __future__ import annotations

from typing import Callable

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from tasks.common import image_markdown, step_dir
from tasks.evaluate import evaluate
from vlmdet.champion import (champion_config, champion_model, needs_measuring, published_predictions, reuse_report,
                             was_evaluated)
from vlmdet.config import RunConfig
from vlmdet.gate import Champion, compare, decide, decision_markdown, disagreement_picture
from vlmdet.publishing import TransientPublishError, read_champion
from vlmdet.records import DatasetRef, EvalReport, GateDecision, atomic_write_text


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
    champion = read_champion(config, workdir or _workdir(), token)
    get_run_logger().info("champion at %s: %s", config.publish.target,
                          f"{champion.source} ({champion.metrics})" if champion else "none yet")
    return champion


@task(name="fetch-champion", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_transient_only,
      cache_policy=NONE)
def fetch_champion(champion: Champion, config: RunConfig, workdir: str, token: str | None = None,
                   predictions_only: bool = False) -> str | None:
    """The champion's published predictions (predictions_only) or a local folder with its model."""
    if predictions_only:
        return published_predictions(champion, workdir, config.publish.endpoint, token)
    return champion_model(champion, workdir, config.publish.endpoint, token)


def measure_champion(champion: Champion | None, report: EvalReport, dataset: DatasetRef, config: RunConfig,
                     workdir: str, token: str | None = None,
                     evaluate_with: Callable[[str, RunConfig], EvalReport] | None = None) -> EvalReport | None:
    """The champion's detections on today's test split: its published ones when they were measured there,
    else a fresh evaluation of its model (evaluate task, name "champion"; `evaluate_with(model, config)`
    runs it the flow's way, with its result storage). None without a champion, or with one that cannot
    be read (the gate then closes on it)."""
    if not needs_measuring(champion):
        return None
    log = get_run_logger()
    if champion.measured_on(report):
        path = fetch_champion(champion, config, workdir, token, predictions_only=True)
        if path:
            log.info("champion %s was measured on today's %s split (%s): reusing its published predictions",
                     champion.source, report.split, report.data_fingerprint[:12])
            return reuse_report(champion, report, path)
    log.info("champion %s was measured on %s/%s, today's data is %s/%s: evaluating it again on today's images",
             champion.source, champion.data_fingerprint[:12] or "unknown", champion.split or "?",
             report.data_fingerprint[:12], report.split)
    model = fetch_champion(champion, config, workdir, token)
    cfg = champion_config(champion, config)
    if evaluate_with is not None:
        return evaluate_with(model, cfg)
    return evaluate(model, dataset, cfg, workdir, name="champion")


@task(name="gate", task_run_name="gate-{name}", cache_policy=NONE)
def gate(report: EvalReport, config: RunConfig, token: str | None = None, workdir: str | None = None,
         champion: Champion | None = None, champion_report: EvalReport | None = None,
         dataset: DatasetRef | None = None, name: str = "adapter") -> GateDecision:
    """Decide on `report` (the model called `name`) against the champion measured on the same images.

    dataset: today's prepared data; without it (a caller that measured no champion) the champion is
    read here and, if there is one, the gate stays closed: it cannot be compared. workdir: what a
    local:DIR target is relative to (default: the flow run's `workdir` parameter, else cwd).
    """
    logger = get_run_logger()
    workdir = workdir or _workdir()
    if dataset is None:
        champion = read_champion(config, workdir, token)
    comparison = None
    if needs_measuring(champion) and champion_report is not None and dataset is not None:
        gt = dataset.splits[report.split]
        comparison, _, _ = compare(report, champion_report, gt, config.gate,
                                   champion_evaluated=was_evaluated(champion_report))
        disagreement_picture(comparison, gt, champion_report, report,
                             step_dir(workdir, "gate", name, "disagreements.png"))
    decision = decide(report, config.gate, champion, comparison)
    if name != "adapter":
        decision.reason = f"{name} model: {decision.reason}"
    logger.info("gate %s: %s", "passed" if decision.passed else "closed", decision.reason)
    picture = ("\n\nChampion (left) and new model (right) on those images; green: ground truth, red: predictions.\n\n"
               + image_markdown(decision.picture, "disagreements")) if decision.picture else ""
    # on disk too, beside the picture: the decision survives a Prefect server without artifact history
    atomic_write_text(step_dir(workdir, "gate", name, "decision.md"), decision_markdown(decision))
    create_markdown_artifact(markdown=decision_markdown(decision) + picture, key="gate-decision" if name == "adapter" else f"gate-decision-{name}",
                             description=f"Publish gate ({name}) for {config.publish.target}")
    return decision


def _workdir() -> str:
    """local:DIR targets are relative to the flow's workdir: read it from the flow run's parameters."""
    from prefect.runtime import flow_run

    params = flow_run.parameters or {}
    return str(params.get("workdir") or ".")
