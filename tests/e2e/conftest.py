"""One real `prefect server start` (loopback, SQLite in a temp folder, basic authentication on, as
docs/operations.md runs it) for the whole session, the pools and deployments of deployments/prefect.yaml registered on it with the real CLI, and one
real process worker polling the smoke pool. Every wait is bounded; every process started here is
stopped at the end; a failing test gets the server's and the worker's log tails in its report.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
SMOKE_POOL, GPU_POOL = "vlmdet-cpu", "vlmdet-gpu"
# Tiny enough for CI (two optimizer steps on 24 synthetic images), still every step of the DAG.
E2E_OVERRIDES = {"train.max_steps": 2, "data.dataset": "synth:24", "eval.eval_base": False}
_LOGS: dict[str, Path] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _stop(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM the process group we started (the worker's flow-run children included), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@dataclass
class PrefectServer:
    url: str  # the UI
    api_url: str
    env: dict[str, str]  # what the CLI, deploys and the worker run with: PREFECT_API_AUTH_STRING included
    auth_string: str
    home: Path
    log: Path
    procs: list = field(default_factory=list)

    def cli(self, *args: str, timeout: float = 120, cwd: Path = ROOT) -> subprocess.CompletedProcess:
        """Run a `prefect` CLI command against this server; fail with its output if it fails."""
        done = subprocess.run([PREFECT, *args], cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            pytest.fail(f"prefect {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def client(self):
        # An explicit client, not get_client(): another fixture (tests/conftest.py's
        # prefect_harness) may have pointed this process's settings at a different server.
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url, auth_string=self.auth_string)

    def start(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.home / f"{name}.log"
        _LOGS[name] = log
        proc = subprocess.Popen(
            [PREFECT, *args], cwd=ROOT, env={**self.env, **(extra_env or {})},
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.procs.append(proc)
        return proc


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> PrefectServer:
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    # Basic auth as docs/operations.md sets it up: the secret is read from a file (mode 600) into
    # the environment of the server (PREFECT_SERVER_API_AUTH_STRING) and of every client
    # (PREFECT_API_AUTH_STRING), never passed on a command line.
    auth_string = f"vlmdet:{secrets.token_urlsafe(18)}"
    auth_file = home / "prefect-auth"
    auth_file.touch(mode=0o600)
    auth_file.write_text(auth_string + "\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no outbound calls from CI
        "DO_NOT_TRACK": "1",
        "PREFECT_UI_API_URL": api_url,  # the browser talks to this port, not the default 4200
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # the default 10 s poll would dominate the test
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_API_AUTH_STRING": auth_file.read_text().strip(),
    }
    server = PrefectServer(url=f"http://127.0.0.1:{port}", api_url=api_url, env=env, auth_string=auth_string,
                           home=home, log=home / "server.log")
    proc = server.start("server", ["server", "start", "--host", "127.0.0.1", "--port", str(port)],
                        extra_env={"PREFECT_SERVER_API_AUTH_STRING": auth_file.read_text().strip()})
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited {proc.returncode}:\n{_tail(server.log)}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"prefect server not healthy after 120 s:\n{_tail(server.log)}")
        time.sleep(0.5)
    yield server
    for p in reversed(server.procs):
        _stop(p)


@pytest.fixture(scope="session")
def deployed(prefect_server: PrefectServer, tmp_path_factory) -> dict:
    """Pools created and deployments deployed word for word as docs/operations.md says, then the
    smoke deployment's default parameters edited (as one would in the UI) to the tiny CI run."""
    s = prefect_server
    s.cli("work-pool", "create", GPU_POOL, "--type", "process",
          "--base-job-template", "deployments/templates/process-gpu.json")
    s.cli("work-pool", "create", SMOKE_POOL, "--type", "process")
    s.cli("deploy", "--prefect-file", "deployments/prefect.yaml", "--all", timeout=240)
    workdir = tmp_path_factory.mktemp("smoke-run")
    with s.client() as client:
        smoke = client.read_deployment_by_name("retrain/smoke")
        params = {**smoke.parameters, "workdir": str(workdir), "overrides": E2E_OVERRIDES}
        from prefect.client.schemas.actions import DeploymentUpdate

        client.update_deployment(smoke.id, DeploymentUpdate(parameters=params))
        nightly = client.read_deployment_by_name("retrain/nightly-gpu")
    return {"smoke_id": smoke.id, "nightly": nightly, "workdir": workdir, "parameters": params}


@pytest.fixture(scope="session")
def worker(prefect_server: PrefectServer, deployed) -> subprocess.Popen:
    """`prefect worker start` on the smoke pool, run from the checkout as on a GPU box."""
    proc = prefect_server.start(
        "worker", ["worker", "start", "--pool", SMOKE_POOL, "--type", "process", "--name", "e2e-worker"],
        extra_env={"VLMDET_HOME": str(ROOT)},
    )
    deadline = time.monotonic() + 60
    with prefect_server.client() as client:
        while not client.read_workers_for_work_pool(SMOKE_POOL):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker did not register:\n{_tail(_LOGS['worker'])}")
            time.sleep(0.5)
    return proc


def wait_for_final_state(server: PrefectServer, flow_run_id, timeout: float = 420):
    """Poll the API until the flow run is final; fail (with the worker log) after `timeout` s."""
    deadline = time.monotonic() + timeout
    with server.client() as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                pytest.fail(f"flow run {flow_run_id} still {run.state.name if run.state else None} after {timeout} s")
            time.sleep(1)


def pytest_collection_modifyitems(config, items):
    """Browser tests last, so that a failure of the plain server/worker path shows first; each
    browser run has its own workdir, so they train whatever ran before."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _LOGS:
        for name, path in _LOGS.items():
            report.sections.append((f"prefect {name} log (tail)", _tail(path, 80)))


def load_summary(workdir: Path) -> dict:
    return json.loads((Path(workdir) / "summary.json").read_text())
