"""Read back every attempt of every task run of a flow run from the Prefect API.

The UI draws a retried task run as one bar, and Prefect keeps one task run for all its
attempts; the attempts only show in the run's state history (Running -> Retrying or
AwaitingRetry -> Running ... -> Completed/Failed). The error of an attempt that was retried is
not on any state: the task engine logs it ("Task run failed with exception: ... - Retry 1/2 will
start ...") and moves straight to Retrying with no message. So this module joins the state
history (attempt boundaries) with those log lines (attempt errors). Both reach the server a
second or two after the run moves on (states through its event pipeline, logs in client
batches), so a table read while a run is live may lag slightly.

The flow run itself can run more than once too: Prefect retries it (`@flow(retries=...)`), or
someone presses Retry on the failed run in the UI. Both keep the flow run's id and add states
(Failed or AwaitingRetry, then Running again); a retried flow's error is logged by the flow engine
("Encountered exception during execution: ...") like a task's. Each flow attempt starts new task
runs, so every task run is assigned to the flow attempt it started in.

Links: each attempt carries the UI address of its (task or flow) run, PREFECT_UI_URL based
(Prefect derives it from PREFECT_API_URL when unset; none for a temporary server), so a person
goes from the terminal to the logs in one click.

`vlmdet retries [FLOW_RUN_ID]` prints `format_report(run_report(FLOW_RUN_ID))`; without an id it
takes the latest failed run of the nightly deployment (`latest_failed_run`).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Iterable
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterStateType,
    FlowRunFilterState,
    LogFilter,
    LogFilterFlowRunId,
    LogFilterTextSearch,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort, LogSort, TaskRunSort
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from prefect.utilities.urls import url_for

from vlmdet.config.settings import ConfigError  # the CLI prints these as one line, exit 2

# The server caps a page at PREFECT_API_DEFAULT_LIMIT (200 by default); ask for less and page.
_PAGE = 100
# Logged by prefect.task_engine.handle_retry before it sets Retrying/AwaitingRetry.
_RETRY_LOG = re.compile(r"Task run failed with (?:exception|state): (?P<error>.*) - Retry \d+/\d+ will start", re.S)
# Logged by prefect.flow_engine for every failed flow attempt, retried or not.
_FLOW_ERROR_LOG = re.compile(r"Encountered exception during execution: (?P<error>.*)", re.S)
NIGHTLY_DEPLOYMENT = "retrain/nightly-gpu"  # deployments/prefect.yaml
_TERMINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}


def _paged(read, **kwargs) -> list:
    out, offset = [], 0
    while True:
        page = read(limit=_PAGE, offset=offset, **kwargs)
        out.extend(page)
        if len(page) < _PAGE:
            return out
        offset += _PAGE


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts is not None else None


def attempts_from_states(states: Iterable[Any], retry_errors: list[str]) -> list[dict]:
    """Split one task run's state history into attempts.

    An attempt starts at a RUNNING-type state (Running, or Retrying for an immediate retry) and
    ends at the next state that leaves it: Retrying (immediate retry), AwaitingRetry (delayed
    retry) or a terminal state. `retry_errors` are the logged errors of the retried attempts, in
    order; a terminal failure's error is its state message.
    """
    attempts: list[dict] = []
    current: dict | None = None
    errors = iter(retry_errors)

    def close(state, outcome: str, error: str | None) -> None:
        nonlocal current
        current.update(end=_iso(state.timestamp), outcome=outcome, error=error)
        attempts.append(current)
        current = None

    for state in sorted(states, key=lambda s: s.timestamp):
        if state.type == StateType.RUNNING:
            if current is not None:  # Running -> Retrying: the previous attempt failed
                close(state, "retried", next(errors, None))
            current = {"attempt": len(attempts) + 1, "start": _iso(state.timestamp), "end": None, "outcome": "running", "error": None}
        elif current is not None and state.type == StateType.SCHEDULED:  # AwaitingRetry
            close(state, "retried", next(errors, None))
        elif current is not None and state.type in _TERMINAL:
            failed = state.type != StateType.COMPLETED
            close(state, state.name or state.type.value.title(), (state.message or None) if failed else None)
        elif current is None and state.type in _TERMINAL and state.type != StateType.COMPLETED:
            # Failed or cancelled before it ever ran (e.g. an upstream task failed): no attempt
            # ran, but the reason belongs in the table.
            attempts.append({"attempt": 0, "start": None, "end": _iso(state.timestamp), "outcome": state.name, "error": state.message})
    if current is not None:
        attempts.append(current)
    return attempts


def _flow_run_id(flow_run_id: str | UUID) -> UUID:
    try:
        return UUID(str(flow_run_id))
    except ValueError:
        raise ConfigError(f"flow run id {str(flow_run_id)!r} is not a UUID: {_WHERE}") from None


_WHERE = "take it from the run's URL (.../runs/flow-run/ID) or from `prefect flow-run ls`"


def _api() -> str:
    return PREFECT_API_URL.value() or "(PREFECT_API_URL unset: a temporary server with no runs)"


def latest_failed_run(deployment: str = NIGHTLY_DEPLOYMENT) -> UUID | None:
    """The id of the most recent failed (or crashed) flow run of `deployment` ("FLOW/DEPLOYMENT"),
    None when it has none. ConfigError when the API has no such deployment."""
    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise ConfigError(f"no deployment {deployment!r} on the Prefect API at {_api()}: pass a flow run id, or "
                              "--deployment FLOW/NAME (`prefect deployment ls` lists them)") from None
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.FAILED, StateType.CRASHED]))),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
    return runs[0].id if runs else None


def _link(kind: str, run_id: UUID) -> str | None:
    return url_for(kind, obj_id=str(run_id))  # None without a UI address (a temporary server)


def run_report(flow_run_id: str | UUID) -> dict:
    """The flow run's own attempts and every task run's attempts, each attempt with its UI link.

    Returns `{"flow_run_id", "name", "state", "url", "attempts": [...], "task_runs": [{"task_run_id",
    "name", "state", "url", "flow_attempt", "attempts": [{"attempt", "start", "end", "outcome",
    "error", "url"}]}]}`; `flow_attempt` is the number of the flow attempt the task run started in.
    Raises ConfigError for an id that is not a UUID or not a flow run of the API at PREFECT_API_URL.
    """
    flow_run_id = _flow_run_id(flow_run_id)
    with get_client(sync_client=True) as client:
        try:
            flow_run = client.read_flow_run(flow_run_id)  # an unknown id fails here, not as an empty table
        except ObjectNotFound:
            raise ConfigError(f"no flow run {flow_run_id} on the Prefect API at {_api()}: check PREFECT_API_URL, "
                              f"or {_WHERE}") from None
        flow_errors = [m.group("error") for log in _error_logs(client, flow_run_id, '"Encountered exception"')
                       if log.task_run_id is None and (m := _FLOW_ERROR_LOG.search(log.message))]
        flow_url = _link("flow-run", flow_run_id)
        flow_attempts = attempts_from_states(client.read_flow_run_states(flow_run_id), flow_errors)
        for a in flow_attempts:
            a["url"] = flow_url
        task_runs = _task_runs(client, flow_run_id)
    for task_run in task_runs:
        task_run["flow_attempt"] = _attempt_at(flow_attempts, task_run["attempts"])
    return {"flow_run_id": str(flow_run_id), "name": flow_run.name,
            "state": flow_run.state.name if flow_run.state else None, "url": flow_url,
            "attempts": flow_attempts, "task_runs": task_runs}


def _attempt_at(flow_attempts: list[dict], attempts: list[dict]) -> int | None:
    """The flow attempt whose start is the last at or before the task run's first attempt."""
    start = next((a["start"] or a["end"] for a in attempts if a["start"] or a["end"]), None)
    number = None
    for fa in flow_attempts:
        if fa["attempt"] and fa["start"] and start and fa["start"] <= start:
            number = fa["attempt"]
    return number


def _error_logs(client, flow_run_id: UUID, query: str) -> list:
    return _paged(client.read_logs,
                  log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]),
                                       text=LogFilterTextSearch(query=query)),
                  sort=LogSort.TIMESTAMP_ASC)


def _task_runs(client, flow_run_id: UUID) -> list[dict]:
    task_runs = _paged(
        client.read_task_runs,
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        sort=TaskRunSort.EXPECTED_START_TIME_ASC,
    )
    retry_errors: dict[UUID, list[str]] = {}
    for log in _error_logs(client, flow_run_id, '"Task run failed with"'):
        match = _RETRY_LOG.search(log.message)
        if match and log.task_run_id is not None:
            retry_errors.setdefault(log.task_run_id, []).append(match.group("error"))
    result = []
    for task_run in task_runs:
        states = client.read_task_run_states(task_run.id)
        url = _link("task-run", task_run.id)
        attempts = attempts_from_states(states, retry_errors.get(task_run.id, []))
        for a in attempts:
            a["url"] = url
        result.append({
            "task_run_id": str(task_run.id),
            "name": task_run.name,
            "state": task_run.state.name if task_run.state else None,
            "url": url,
            "attempts": attempts,
        })
    return result


def task_run_attempts(flow_run_id: str | UUID) -> list[dict]:
    """Every task run of `flow_run_id`, each with its attempts (start, end, outcome, error, url).

    Returns `[{"task_run_id", "name", "state", "url", "flow_attempt", "attempts": [{"attempt",
    "start", "end", "outcome", "error", "url"}]}]` in the order the task runs were expected to
    start. Times are ISO 8601 strings (UTC) or None. Raises ConfigError for an id that is not a
    UUID or not a flow run of the API at PREFECT_API_URL.
    """
    return run_report(flow_run_id)["task_runs"]


def _short_time(iso: str | None) -> str:
    return iso[11:19] if iso else "-"  # HH:MM:SS of an ISO timestamp; the date is the run's


def _one_line(text: str | None, width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_attempts(task_runs: list[dict], error_width: int = 100) -> str:
    """A plain-text table: one line per attempt, the task run's name on its first attempt; a
    "run" column (the flow attempt) when the flow ran more than once; a link column when known."""
    with_run = len({t.get("flow_attempt") for t in task_runs}) > 1
    with_link = any(t.get("url") for t in task_runs)
    rows = [("task run",) + (("run",) if with_run else ()) + ("#", "start", "end", "outcome")
            + (("link",) if with_link else ()) + ("error",)]
    for task_run in task_runs:
        attempts = task_run["attempts"] or [{"attempt": 0, "start": None, "end": None, "outcome": task_run["state"] or "-", "error": None}]
        for i, a in enumerate(attempts):
            rows.append(
                (task_run["name"] if i == 0 else "",)
                + ((str(task_run.get("flow_attempt") or "-") if i == 0 else "",) if with_run else ())
                + (str(a["attempt"]) if a["attempt"] else "-", _short_time(a["start"]), _short_time(a["end"]),
                   a["outcome"])
                + ((a.get("url") or task_run.get("url") or "-",) if with_link else ())
                + (_one_line(a["error"], error_width),))
    if len(rows) == 1:
        return "no task runs"
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    return "\n".join(
        ("  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1]).rstrip() for r in rows
    )


def format_report(report: dict, error_width: int = 100) -> str:
    """The flow run's attempts (when it ran more than once or failed), then the task table."""
    attempts = report["attempts"]
    head = f"flow run {report['name']} ({report['flow_run_id']}): {report['state']}"
    if report.get("url"):
        head += f"  {report['url']}"
    lines = [head]
    if len(attempts) > 1 or any(a["error"] for a in attempts):
        lines.append(f"the flow ran {len(attempts)} time{'s' if len(attempts) != 1 else ''}:")
        for a in attempts:
            number = str(a["attempt"]) if a["attempt"] else "-"
            lines.append(f"  run {number}  {_short_time(a['start'])}-{_short_time(a['end'])}  {a['outcome']}"
                         + (f"  {_one_line(a['error'], error_width)}" if a["error"] else ""))
    lines += ["", format_attempts(report["task_runs"], error_width)]
    return "\n".join(lines)
