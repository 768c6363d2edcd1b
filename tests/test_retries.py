"""Reading retried task runs back from the Prefect API (flows/retries.py)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from prefect import flow, task
from prefect.states import AwaitingRetry, Completed, Failed, Pending, Retrying, Running

from flows.retries import attempts_from_states, format_attempts, task_run_attempts


def _at(states_and_offsets):
    t0 = datetime(2026, 1, 1, 2, 0, 0, tzinfo=timezone.utc)
    out = []
    for state, seconds in states_and_offsets:
        state.timestamp = t0 + timedelta(seconds=seconds)
        out.append(state)
    return out


def test_immediate_retry_splits_into_two_attempts_with_the_logged_error():
    states = _at([(Pending(), 0), (Running(), 1), (Retrying(), 5), (Completed(), 9)])
    attempts = attempts_from_states(reversed(states), ["OSError('hub 503')"])  # order must not matter
    assert [(a["attempt"], a["outcome"], a["error"]) for a in attempts] == [
        (1, "retried", "OSError('hub 503')"),
        (2, "Completed", None),
    ]
    assert attempts[0]["start"].endswith("02:00:01+00:00") and attempts[0]["end"].endswith("02:00:05+00:00")
    assert attempts[1]["start"] == attempts[0]["end"]


def test_delayed_retries_and_a_final_failure_keep_every_error():
    states = _at([
        (Pending(), 0), (Running(), 1), (AwaitingRetry(), 2), (Running(), 12),
        (AwaitingRetry(), 13), (Running(), 23), (Failed(message="Task run encountered an exception MemoryError: out of memory"), 24),
    ])
    attempts = attempts_from_states(states, ["TimeoutError('a')", "TimeoutError('b')"])
    assert [a["outcome"] for a in attempts] == ["retried", "retried", "Failed"]
    assert [a["error"] for a in attempts][:2] == ["TimeoutError('a')", "TimeoutError('b')"]
    assert "out of memory" in attempts[2]["error"]
    assert attempts[1]["start"].endswith("02:00:12+00:00")


def test_format_attempts_names_the_task_once_and_shows_each_attempt():
    table = format_attempts([{
        "task_run_id": "x", "name": "train-0", "state": "Completed",
        "attempts": [
            {"attempt": 1, "start": "2026-01-01T02:00:01+00:00", "end": "2026-01-01T02:00:05+00:00", "outcome": "retried", "error": "OSError('hub\n503')"},
            {"attempt": 2, "start": "2026-01-01T02:00:05+00:00", "end": "2026-01-01T02:00:09+00:00", "outcome": "Completed", "error": None},
        ],
    }])
    lines = table.splitlines()
    assert len(lines) == 3 and lines[0].split()[:2] == ["task", "run"]
    assert lines[1].startswith("train-0") and "02:00:01" in lines[1] and "OSError('hub 503')" in lines[1]
    assert not lines[2].startswith("train-0") and "Completed" in lines[2]


_calls = {"n": 0}


@task(retries=1, retry_delay_seconds=0)
def flaky_download() -> str:
    _calls["n"] += 1
    if _calls["n"] == 1:
        raise ConnectionError("transient: hub returned 503")
    return "ok"


@task
def steady() -> int:
    return 1


@flow(name="retry-probe")
def retry_probe() -> str:
    steady()
    return flaky_download()


def test_a_transient_failure_shows_two_attempts_and_the_first_error(prefect_harness):
    _calls["n"] = 0
    state = retry_probe(return_state=True)
    assert state.is_completed() and _calls["n"] == 2
    flow_run_id = state.state_details.flow_run_id

    # Task run states (through the server's event pipeline) and logs (batched by the client)
    # reach the database a moment after the flow returns: poll, bounded, until both are there.
    deadline = time.monotonic() + 30
    while True:
        runs = {r["name"].rsplit("-", 1)[0]: r for r in task_run_attempts(flow_run_id)}
        flaky = runs.get("flaky_download")
        settled = flaky and len(flaky["attempts"]) == 2 and flaky["attempts"][0]["error"]
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    assert set(runs) == {"flaky_download", "steady"}
    assert [a["outcome"] for a in flaky["attempts"]] == ["retried", "Completed"]
    assert "ConnectionError" in flaky["attempts"][0]["error"]
    assert "transient: hub returned 503" in flaky["attempts"][0]["error"]
    assert flaky["attempts"][1]["error"] is None
    assert [a["outcome"] for a in runs["steady"]["attempts"]] == ["Completed"]
    table = format_attempts(task_run_attempts(flow_run_id))
    assert "transient: hub returned 503" in table


def test_a_wrong_flow_run_id_is_a_one_line_error_that_says_where_ids_come_from(prefect_harness):
    from vlmdet.config.settings import ConfigError

    with pytest.raises(ConfigError, match="not a UUID.*runs/flow-run"):
        task_run_attempts("not-a-uuid")
    with pytest.raises(ConfigError, match="no flow run 00000000-.*PREFECT_API_URL"):
        task_run_attempts("00000000-0000-0000-0000-000000000000")


# --- the flow run's own attempts, UI links, the latest failed nightly run (issue 13, item 8) ---

_flow_calls = {"n": 0}


@flow(name="flaky-flow", retries=1, retry_delay_seconds=0)
def flaky_flow() -> int:
    _flow_calls["n"] += 1
    steady()
    if _flow_calls["n"] == 1:
        raise RuntimeError("first night: the GPU node went away")
    return _flow_calls["n"]


def _settled(flow_run_id, ready, timeout=30):
    from flows.retries import run_report

    deadline = time.monotonic() + timeout
    while True:
        report = run_report(flow_run_id)
        if ready(report) or time.monotonic() > deadline:
            return report
        time.sleep(0.5)


def test_a_retried_flow_run_shows_both_runs_with_the_first_error_and_links(prefect_harness):
    from prefect.settings import PREFECT_UI_URL, temporary_settings

    from flows.retries import format_report

    _flow_calls["n"] = 0
    state = flaky_flow(return_state=True)
    assert state.is_completed() and _flow_calls["n"] == 2
    flow_run_id = state.state_details.flow_run_id
    with temporary_settings({PREFECT_UI_URL: "http://prefect.example:4200"}):
        report = _settled(flow_run_id, lambda r: len(r["attempts"]) == 2 and r["attempts"][0]["error"]
                          and len(r["task_runs"]) == 2)
    assert [a["outcome"] for a in report["attempts"]] == ["retried", "Completed"]
    assert "first night: the GPU node went away" in report["attempts"][0]["error"]
    assert report["url"] == f"http://prefect.example:4200/runs/flow-run/{flow_run_id}"
    # each flow attempt ran `steady` once: two task runs, one in each run of the flow
    assert sorted(t["flow_attempt"] for t in report["task_runs"]) == [1, 2]
    for t in report["task_runs"]:
        assert t["url"] == f"http://prefect.example:4200/runs/task-run/{t['task_run_id']}"
        assert all(a["url"] == t["url"] for a in t["attempts"])
    text = format_report(report)
    assert "the flow ran 2 times" in text and "first night: the GPU node went away" in text
    assert f"runs/task-run/{report['task_runs'][0]['task_run_id']}" in text


def test_a_retry_from_the_ui_is_a_second_attempt_of_the_same_flow_run():
    # The UI's Retry on a failed run: Failed, then AwaitingRetry (Scheduled), Pending, Running again.
    from prefect.states import Scheduled

    states = _at([(Pending(), 0), (Running(), 1), (Failed(message="CUDA error: device lost"), 60),
                  (Scheduled(name="AwaitingRetry"), 3600), (Pending(), 3601), (Running(), 3602), (Completed(), 3700)])
    attempts = attempts_from_states(states, [])
    assert [(a["attempt"], a["outcome"], a["error"]) for a in attempts] == [
        (1, "Failed", "CUDA error: device lost"), (2, "Completed", None)]


def test_without_an_id_the_latest_failed_run_of_the_deployment_is_taken(prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.states import Failed as FailedState

    from flows.retries import latest_failed_run
    from vlmdet.config.settings import ConfigError

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("retries-probe-nightly")
        dep_id = client.create_deployment(flow_id=flow_id, name="nightly")
        runs = []
        for final in (FailedState(message="old failure"), FailedState(message="last night"), Completed()):
            run = client.create_flow_run_from_deployment(dep_id)
            client.set_flow_run_state(run.id, Running(), force=True)
            client.set_flow_run_state(run.id, final, force=True)
            runs.append(run.id)
            time.sleep(0.05)  # distinct expected start times
    assert latest_failed_run("retries-probe-nightly/nightly") == runs[1]  # not the newer, completed one
    with pytest.raises(ConfigError, match="no deployment 'retries-probe-nightly/nope'.*--deployment"):
        latest_failed_run("retries-probe-nightly/nope")
