"""Prefect events for the moments an owner wants to hear about or chain on, built from the run's records.

Each names the model (the publish target) as its resource, so an Automation can match one model
(`prefect.resource.id: vlmdet.model.hub:org/name`) or all of them (`vlmdet.model.*`); Prefect adds
the flow run, flow, deployment and tags as related resources. deployments/automations.yaml acts on them.

    vlmdet.model.published     target, kind, revision, tag, url, metrics, run (publication run id, flow run id)
    vlmdet.gate.closed         reason, which model (adapter/merged), metric, threshold, challenger and
                               champion numbers, P(better), its 95% interval
    vlmdet.champion.unreadable reason, fault ("content": it can be replaced on purpose; else "transport":
                               it could not be read at all), where it was read
"""
from __future__ import annotations

from typing import Any

from prefect.events import Event, emit_event

from vlmdet.config.settings import RunConfig
from vlmdet.publishing.target import Target, resolve_target
from vlmdet.run.records import Champion, EvalReport, GateDecision, Publication

PUBLISHED, GATE_CLOSED, CHAMPION_UNREADABLE = "vlmdet.model.published", "vlmdet.gate.closed", "vlmdet.champion.unreadable"


def model_resource(config: RunConfig, workdir: str, target: Target | None = None) -> dict[str, str]:
    """The model at the publish target: `vlmdet.model.KIND:WHERE`, e.g. `vlmdet.model.hub:ORG/NAME` or
    `vlmdet.model.local:/abs/folder`."""
    target = target or resolve_target(config)
    where = target.location(workdir)
    return {"prefect.resource.id": f"vlmdet.model.{target.kind}:{where}", "prefect.resource.name": where,
            "vlmdet.target.kind": target.kind, "vlmdet.preset": config.name}


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else None


def published(pub: Publication, report: EvalReport, config: RunConfig, workdir: str,
              target: Target | None = None) -> Event | None:
    return emit_event(PUBLISHED, model_resource(config, workdir, target), payload={
        "target": pub.target, "kind": pub.kind, "revision": pub.revision, "tag": pub.tag, "url": pub.url,
        "metrics": report.metrics(), "split": report.split, "images": report.num_images,
        "run": {"id": pub.run_id, "flow_run_id": _flow_run_id(), "reused": pub.reused}})


def gate_closed(decision: GateDecision, config: RunConfig, workdir: str, name: str = "adapter") -> Event | None:
    payload: dict[str, Any] = {
        "reason": decision.reason, "model": name, "metric": decision.metric, "threshold": decision.threshold,
        "challenger": decision.value, "champion": decision.champion, "champion_source": decision.champion_source,
        "p_better": decision.p_better, "min_probability": decision.min_probability,
        "ci": [decision.ci_low, decision.ci_high] if decision.p_better is not None else None,
        "images": decision.images, "champion_unreadable": decision.champion_unreadable or None,
        "run": {"flow_run_id": _flow_run_id()}}
    return emit_event(GATE_CLOSED, model_resource(config, workdir), payload=payload)


def champion_unreadable(champion: Champion, config: RunConfig, workdir: str,
                        target: Target | None = None) -> Event | None:
    return emit_event(CHAMPION_UNREADABLE, model_resource(config, workdir, target), payload={
        "reason": champion.unreadable, "fault": champion.fault or None, "source": champion.source,
        "revision": champion.revision or None, "replace_on_purpose": config.gate.replace_unreadable_champion,
        "run": {"flow_run_id": _flow_run_id()}})


def after(step: str, record: Any, arguments: dict[str, Any]) -> None:
    """The events a finished step's record calls for (tasks.common.task_of calls this after every step)."""
    layout = arguments.get("layout")
    workdir = str(layout.root) if layout is not None else "."
    if step == "find-champion" and record is not None and record.unreadable:
        champion_unreadable(record, arguments["config"], workdir, arguments.get("target"))
    elif step == "gate" and not record.passed:
        gate_closed(record, arguments["config"], workdir, arguments["name"])
    elif step == "publish":
        published(record, arguments["report"], arguments["config"], workdir, arguments.get("target"))
