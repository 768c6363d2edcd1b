"""Read back every attempt of every task run of a flow run from the Prefect API.

The UI draws a retried task run as one bar, and Prefect keeps one task run for all its
attempts; the attempts only show in the run's state history (Running -> Retrying or
AwaitingRetry -> Running ... -> Completed/Failed). The error of an attempt that was retried is
not on any state: the task engine logs it ("Task run failed with exception: ... - Retry 1/2 will
start ...") and moves straight to Retrying with no message. So this module joins the state
history (attempt boundaries) with those log lines (attempt errors). Both reach the server a
second or two after the run moves on (states through its event pipeline, logs in client
batches), so a table read while a run is live may lag slightly.

`vlmdet retries FLOW_RUN_ID` prints `format_attempts(task_run_attempts(FLOW_RUN_ID))`.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Iterable
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
    LogFilterTextSearch,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import LogSort, TaskRunSort
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from vlmdet.config import ConfigError  # the CLI prints these as one line, exit 2

# The server caps a page at PREFECT_API_DEFAULT_LIMIT (200 by default); ask for less and page.
_PAGE = 100
# Logged by prefect.task_engine.handle_retry before it sets Retrying/AwaitingRetry.
_RETRY_LOG = re.compile(r"Task run failed with (?:exception|state): (?P<error>.*) - Retry \d+/\d+ will start", re.S)
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


def task_run_attempts(flow_run_id: str | UUID) -> list[dict]:
    """Every task run of `flow_run_id`, each with its attempts (start, end, outcome, error).

    Returns `[{"task_run_id", "name", "state", "attempts": [{"attempt", "start", "end",
    "outcome", "error"}]}]` in the order the task runs were expected to start. Times are ISO 8601
    strings (UTC) or None. Raises ConfigError for an id that is not a UUID or not a flow run of
    the API at PREFECT_API_URL.
    """
    where = "take it from the run's URL (.../runs/flow-run/ID) or from `prefect flow-run ls`"
    try:
        flow_run_id = UUID(str(flow_run_id))
    except ValueError:
        raise ConfigError(f"flow run id {str(flow_run_id)!r} is not a UUID: {where}") from None
    with get_client(sync_client=True) as client:
        try:
            client.read_flow_run(flow_run_id)  # an unknown id fails here, not as an empty table
        except ObjectNotFound:
            raise ConfigError(
                f"no flow run {flow_run_id} on the Prefect API at {PREFECT_API_URL.value() or '(PREFECT_API_URL unset)'}: "
                f"check PREFECT_API_URL, or {where}") from None
        task_runs = _paged(
            client.read_task_runs,
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
        )
        logs = _paged(
            client.read_logs,
            log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]),
                text=LogFilterTextSearch(query='"Task run failed with"'),
            ),
            sort=LogSort.TIMESTAMP_ASC,
        )
        retry_errors: dict[UUID, list[str]] = {}
        for log in logs:
            match = _RETRY_LOG.search(log.message)
            if match and log.task_run_id is not None:
                retry_errors.setdefault(log.task_run_id, []).append(match.group("error"))
        result = []
        for task_run in task_runs:
            states = client.read_task_run_states(task_run.id)
            result.append({
                "task_run_id": str(task_run.id),
                "name": task_run.name,
                "state": task_run.state.name if task_run.state else None,
                "attempts": attempts_from_states(states, retry_errors.get(task_run.id, [])),
            })
    return result


def _short_time(iso: str | None) -> str:
    return iso[11:19] if iso else "-"  # HH:MM:SS of an ISO timestamp; the date is the run's


def _one_line(text: str | None, width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_attempts(task_runs: list[dict], error_width: int = 100) -> str:
    """A plain-text table: one line per attempt, the task run's name on its first attempt."""
    rows = [("task run", "#", "start", "end", "outcome", "error")]
    for task_run in task_runs:
        attempts = task_run["attempts"] or [{"attempt": 0, "start": None, "end": None, "outcome": task_run["state"] or "-", "error": None}]
        for i, a in enumerate(attempts):
            rows.append((
                task_run["name"] if i == 0 else "",
                str(a["attempt"]) if a["attempt"] else "-",
                _short_time(a["start"]),
                _short_time(a["end"]),
                a["outcome"],
                _one_line(a["error"], error_width),
            ))
    if len(rows) == 1:
        return "no task runs"
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    return "\n".join(
        ("  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1]).rstrip() for r in rows
    )
