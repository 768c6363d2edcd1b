"""A person's path through the Prefect UI, in headless Chromium: Deployments -> smoke -> Run ->
Quick run; the run it starts completes on the real worker; a screenshot of the finished run is
kept in test-output/ (CI keeps that folder)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from .conftest import ROOT, wait_for_final_state

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's package, not Playwright's download
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
OUTPUT = ROOT / "test-output"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        yield b
        b.close()


def _runs_of(server, deployment_id) -> set:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with server.client() as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return {r.id for r in runs}


def test_quick_run_from_the_ui_completes(prefect_server, deployed, worker, browser):
    OUTPUT.mkdir(exist_ok=True)
    before = _runs_of(prefect_server, deployed["smoke_id"])
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(30_000)
    try:
        page.goto(f"{prefect_server.url}/deployments", wait_until="networkidle")
        page.get_by_role("link", name="smoke", exact=True).click()
        page.wait_for_url(f"**/deployments/deployment/{deployed['smoke_id']}**")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_role("button", name="Quick run", exact=True).click()

        # The UI posts the run; find it through the API (the toast's link is UI detail).
        deadline = time.monotonic() + 30
        while not (new := _runs_of(prefect_server, deployed["smoke_id"]) - before):
            assert time.monotonic() < deadline, "pressing Quick run created no flow run"
            time.sleep(0.5)
        (flow_run_id,) = new
        run = wait_for_final_state(prefect_server, flow_run_id)
        assert run.state.is_completed(), f"{run.state.type}: {run.state.message}"
        assert run.parameters == deployed["parameters"]  # Quick run = the deployment's defaults

        page.goto(f"{prefect_server.url}/runs/flow-run/{flow_run_id}", wait_until="networkidle")
        page.get_by_text("Completed").first.wait_for()
        page.screenshot(path=str(OUTPUT / "ui-quick-run-completed.png"), full_page=True)
    except Exception:
        page.screenshot(path=str(OUTPUT / "ui-quick-run-failure.png"), full_page=True)
        raise
    finally:
        page.close()
