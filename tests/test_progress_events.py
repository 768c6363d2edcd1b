"""Where owners look while the nightly run runs: progress artifacts, events, the shipped Automations.

Against the session's Prefect test server (tests/conftest.py's prefect_harness, which runs Prefect's
event persister, triggers and actions services), a real `vlmdet serve` child on a local target, and
the micro model: the retrain flow's progress artifacts move and end at 100, its events reach the
server with their payloads, and deployments/automations.yaml's automations notify through a
notification block and make the running server reload the model just published.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest

from vlmdet.run.progress import Progress, ProgressReader, ProgressWriter

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "serve-secret-token"


# ---------------------------------------------------------------------------------- the library's lines

def test_progress_lines_one_per_percent_with_the_loss_and_torn_lines_wait(tmp_path, monkeypatch):
    path = tmp_path / "progress.jsonl"
    writer = ProgressWriter(path, "step", 1000)
    for step in range(1, 1001):
        writer.update(step)
    writer.update(1000, loss=0.5)  # the loss of the last step arrives after its step end
    reader = ProgressReader(path)
    lines = reader.read_new()
    # the first step, then one line a whole percent (0.1% steps are not lines), then the last step's loss
    assert [line.done for line in lines] == [1] + [10 * k for k in range(1, 101)] + [1000]
    assert lines[-1] == Progress(1000, 1000, "step", 0.5) and lines[-1].text == "step 1000/1000, loss 0.5000"
    assert lines[50].fraction == 0.5 and lines[50].loss is None

    with path.open("a") as f:
        f.write('{"done": 3, "total": 4, "unit": "image"}\n{"done": 4, "tot')  # the child is mid-write
    assert reader.read_new() == [Progress(3, 4, "image")]
    with path.open("a") as f:
        f.write('al": 4, "unit": "image"}\n')
    assert reader.read_new() == [Progress(4, 4, "image")] and reader.read_new() == []

    monkeypatch.delenv("VLMDET_PROGRESS", raising=False)
    assert ProgressWriter.from_env("image", 4) is None  # outside a step child nothing is written
    monkeypatch.setenv("VLMDET_PROGRESS", str(path))
    monkeypatch.setenv("RANK", "1")
    assert ProgressWriter.from_env("image", 4) is None  # only the main process of a multi-GPU step writes


@pytest.fixture
def progress_steps(monkeypatch, tmp_path):
    """Throwaway steps in the child (as tests/test_runner.py): one that reports 4 images, one that hangs."""
    from vlmdet.run import runner

    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    (tmp_path / "progsteps.py").write_text(
        "import time\n"
        "from vlmdet.pipeline import child as steps\n"
        "from vlmdet.run.progress import ProgressWriter\n"
        "def images(req):\n"
        "    w = ProgressWriter.from_env('image', 4)\n"
        "    for i in range(1, 5):\n"
        "        w.update(i); time.sleep(0.2)\n"
        "    return {'ok': True}\n"
        "def hang(req):\n"
        "    time.sleep(60)\n"
        "steps.STEPS.update(images=images, hang=hang)\n")
    monkeypatch.setattr(runner, "command", lambda step, req, res, n=1: [
        sys.executable, "-c", f"import sys, progsteps; from vlmdet.pipeline.child import main; sys.exit(main({[step, str(req), str(res)]!r}))"])


def test_the_parent_forwards_every_line_then_100_and_a_failing_callback_never_stops_the_step(progress_steps, tmp_path,
                                                                                           caplog):
    from vlmdet.run.runner import StepTimeout, run_step

    seen: list[tuple[float, str]] = []
    assert run_step("images", {}, tmp_path / "a", timeout_s=120, on_progress=lambda f, t: seen.append((f, t))) == {"ok": True}
    assert seen[:4] == [(0.25, "image 1/4"), (0.5, "image 2/4"), (0.75, "image 3/4"), (1.0, "image 4/4")]
    assert len(seen) == 5 and seen[4][0] == 1.0 and seen[4][1].startswith("image 4/4; finished in ")

    def unreachable(fraction, text):
        raise ConnectionError("Prefect API unreachable")

    assert run_step("images", {}, tmp_path / "b", timeout_s=120, on_progress=unreachable) == {"ok": True}
    assert [r.message for r in caplog.records if "progress callback failed" in r.message] == [
        "progress callback failed (the step goes on; further failures are not logged): Prefect API unreachable"]

    started = time.monotonic()
    with pytest.raises(StepTimeout, match="timed out"):  # the polling wait still ends the child at its limit
        run_step("hang", {}, tmp_path / "c", timeout_s=3, on_progress=lambda f, t: None)
    assert time.monotonic() - started < 30


def test_shipped_automations_are_prefect_automations_listening_for_the_flows_events():
    """Prefect's automation models ignore unknown keys: a misspelt `expect` would silently match everything."""
    from uuid import uuid4

    from prefect.events.actions import CallWebhook, SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger

    from tasks import events

    definitions = {d["name"]: d for d in _automations().definitions()}
    assert set(definitions) == {"vlmdet-reload-serve", "vlmdet-notify"}
    actions = {"call-webhook": CallWebhook, "send-notification": SendNotification}
    for d in definitions.values():
        assert set(d) <= set(AutomationCore.model_fields) and set(d["trigger"]) <= set(EventTrigger.model_fields)
        for action in d["actions"]:
            assert set(action) <= set(actions[action["type"]].model_fields)
        AutomationCore.model_validate(dict(d, actions=[dict(a, block_document_id=str(uuid4())) for a in d["actions"]]))
    assert definitions["vlmdet-reload-serve"]["trigger"]["expect"] == [events.PUBLISHED]
    assert events.GATE_CLOSED in definitions["vlmdet-notify"]["trigger"]["expect"]
    assert "prefect.flow-run.Failed" in definitions["vlmdet-notify"]["trigger"]["expect"]


# ---------------------------------------------------------------------------------- the flow on the server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """A local HTTP endpoint standing in for the notification channel (Slack, Teams, ...)."""

    def __init__(self):
        self.received: list[dict] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                received.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/notify"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _automations():
    spec = importlib.util.spec_from_file_location("vlmdet_automations", ROOT / "deployments" / "automations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _events(names: list[str], flow_run_id=None, resource_id: str | None = None, want: int = 1,
            timeout: float = 60) -> list[dict]:
    """Events read back through the server's /events/filter, oldest first, once `want` have arrived
    (the persister writes them in batches)."""
    from prefect.settings import PREFECT_API_URL

    body: dict = {"event": {"name": names}}
    if flow_run_id is not None:
        body["related"] = {"id": [f"prefect.flow-run.{flow_run_id}"]}
    if resource_id is not None:
        body["resource"] = {"id": [resource_id]}
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json={"filter": {**body, "order": "ASC"},
                                                                        "limit": 50}, timeout=10)
        r.raise_for_status()
        events = r.json()["events"]
        if len(events) >= want or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def _progress(client, flow_run_id, key: str):
    """(the artifact as it ends, every value it was updated to, in order)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    updates = _events(["prefect.artifact.updated"], resource_id=f"prefect.artifact.{artifact.id}", want=2)
    return artifact, [e["payload"]["data"] for e in updates]


@pytest.fixture
def served_target(tiny_model, tmp_path):
    """A local publish target holding a model without vlmdet's card (an unreadable champion) and a
    `vlmdet serve` child following it, started first so that it loads while the flow trains."""
    workdir = tmp_path / "run"
    target = workdir / "published"
    shutil.copytree(tiny_model, target)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "vlmdet.cli", "serve", "--model", str(target), "--port", str(port),
                             "--token-file", str(token_file)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        yield workdir, f"http://127.0.0.1:{port}", proc, tmp_path / "serve.log"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _health(url: str, proc, log: Path, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"vlmdet serve did not answer /health:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)


@pytest.mark.slow
def test_progress_events_and_automations_of_a_nightly_run(prefect_harness, tiny_model, served_target):
    from prefect import flow, get_client
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from flows.retrain import retrain

    workdir, serve_url, serve, serve_log = served_target
    target = str((workdir / "published").resolve())
    model_id = f"vlmdet.model.local:{workdir / 'published'}"
    notified = Receiver()
    CustomWebhookNotificationBlock(name="vlmdet", url=notified.url,
                                   json_data={"subject": "{{subject}}", "body": "{{body}}"}).save("vlmdet-notify",
                                                                                                  overwrite=True)
    automations = _automations()
    automations.save_reload_webhook(serve_url, TOKEN)
    applied = automations.apply()
    assert [(a.name, a.action) for a in applied] == [("vlmdet-reload-serve", "created"), ("vlmdet-notify", "created")]
    assert [a.action for a in automations.apply()] == ["updated", "updated"]  # applied again: no copies

    overrides = {"model.base": tiny_model, "data.dataset": "synth:12", "train.max_steps": 2, "train.per_device_batch": 2,
                 "train.save_steps": 50, "train.logging_steps": 1, "eval.batch_size": 1, "eval.max_new_tokens": 8,
                 "eval.eval_base": False, "eval.preview_images": 0, "publish.token_secret": ""}

    # 1. below the threshold, and an unreadable model at the target: the gate closes, the owner is told
    state = retrain(preset="smoke", workdir=str(workdir), threshold=0.99, overrides=overrides, return_state=True)
    first = state.result()
    run_a = state.state_details.flow_run_id
    assert first["gate"]["passed"] is False
    with get_client(sync_client=True) as client:
        trained, values = _progress(client, run_a, "training-progress")
        assert trained.data == 100.0 and "step 2/2, loss" in trained.description
        assert values == [0.0, 50.0, 50.0, 100.0, 100.0, 100.0]  # step 0, 1, its loss, 2, its loss, finished
        evaluated, values = _progress(client, run_a, "evaluation-progress-adapter")
        n = first["evaluation"]["images"]
        assert n >= 2 and evaluated.data == 100.0 and f"image {n}/{n}" in evaluated.description
        assert values == [round(100.0 * k / n, 1) for k in range(1, n + 1)] + [100.0]  # one a batch of 1, finished

    closed, unreadable = (_events([name], run_a)
                          for name in ("vlmdet.gate.closed", "vlmdet.champion.unreadable"))
    assert len(closed) == 1 and len(unreadable) == 1
    event = closed[0]
    assert event["resource"]["prefect.resource.id"] == model_id and event["resource"]["prefect.resource.name"] == str(
        workdir / "published")
    assert event["payload"]["reason"] == first["gate"]["reason"] and event["payload"]["model"] == "adapter"
    assert event["payload"]["threshold"] == 0.99 and event["payload"]["challenger"] == first["gate"]["value"]
    assert event["payload"]["metric"] == "map50" and event["payload"]["champion"] is None
    related = {r["prefect.resource.role"]: r for r in event["related"]}
    assert related["flow"]["prefect.resource.name"] == "retrain"
    assert related["flow-run"]["prefect.resource.id"] == f"prefect.flow-run.{run_a}"
    assert unreadable[0]["payload"]["fault"] == "content" and unreadable[0]["payload"]["reason"]
    assert unreadable[0]["payload"]["replace_on_purpose"] is False

    deadline = time.monotonic() + 60
    while not notified.received and time.monotonic() < deadline:
        time.sleep(0.5)
    (note,) = notified.received
    assert note["subject"].startswith("vlmdet: vlmdet.gate.closed")
    assert first["gate"]["reason"] in note["body"] and "(adapter model)" in note["body"]

    @flow(name="retrain")  # a retrain run that fails: the same automation tells the owner, with the error
    def failing():
        raise RuntimeError("the disk is full")

    assert failing(return_state=True).is_failed()
    while len(notified.received) < 2 and time.monotonic() < deadline + 60:
        time.sleep(0.5)
    assert notified.received[1]["subject"].startswith("vlmdet: prefect.flow-run.Failed")
    assert "ended Failed" in notified.received[1]["body"] and "the disk is full" in notified.received[1]["body"]

    # the flow run's page links the tracker run (TensorBoard in the run folder by default)
    with get_client(sync_client=True) as client:
        (tracker,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["tracker-run"]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_a])))
    assert first["tracker"]["log_dir"] in tracker.data and f"tensorboard --logdir {workdir / 'train'}" in tracker.data

    # 2. the threshold met and replacing the unreadable model asked for: published, and the running
    # server reloads through the shipped automation (POST /reload with its bearer token)
    before = _health(serve_url, serve, serve_log)
    assert before["revision"].startswith("local-")
    state = retrain(preset="smoke", workdir=str(workdir), threshold=0.0, return_state=True,
                    overrides={**overrides, "gate.replace_unreadable_champion": True})
    second = state.result()
    run_b = state.state_details.flow_run_id
    published = second["published"]
    assert published and published["target"] == target
    (event,) = _events(["vlmdet.model.published"], run_b)
    assert event["resource"]["prefect.resource.id"] == model_id
    assert event["payload"]["revision"] == published["revision"] and event["payload"]["target"] == target
    assert event["payload"]["metrics"] == second["merged_metrics"]
    assert event["payload"]["run"] == {"id": published["run_id"], "flow_run_id": str(run_b), "reused": False}

    deadline = time.monotonic() + 90
    while (now := _health(serve_url, serve, serve_log))["revision"] != f"run-{published['run_id']}":
        assert time.monotonic() < deadline, f"the server still serves {now['revision']}:\n{serve_log.read_text()[-3000:]}"
        time.sleep(0.5)
    # through POST /reload (the server's own schedule is off), answered 200 with the token the block sends
    assert 'vlmdet_serve_reloads_total{outcome="changed"} 1.0' in httpx.get(
        f"{serve_url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
