"""Prefect task: the champion/challenger gate.

Reads the champion (the model now at publish.target) with retries, because that is a network call;
the decision itself is the pure `vlmdet.gate.decide` and never retried. Both numbers and the reason go
into a markdown artifact.
"""
from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from vlmdet.config import RunConfig
from vlmdet.gate import decide, decision_markdown
from vlmdet.publishing import TransientPublishError, read_champion
from vlmdet.records import EvalReport, GateDecision


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
@task(name="gate", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_transient_only,
      cache_policy=NONE)
def gate(report: EvalReport, config: RunConfig, token: str | None = None, workdir: str | None = None) -> GateDecision:
    """workdir: what a local:DIR target is relative to (default: the flow run's `workdir` parameter, else cwd)."""
    logger = get_run_logger()
    champion = read_champion(config, workdir or _workdir(), token)
    decision = decide(report, config.gate, champion)
    logger.info("gate %s: %s", "passed" if decision.passed else "closed", decision.reason)
    create_markdown_artifact(markdown=decision_markdown(decision), key="gate-decision",
                             description=f"Publish gate for {config.publish.target}")
    return decision


def _workdir() -> str:
    """local:DIR targets are relative to the flow's workdir: read it from the flow run's parameters."""
    from prefect.runtime import flow_run

    params = flow_run.parameters or {}
    return str(params.get("workdir") or ".")
