"""The whole operations path for real: server, pools, `prefect deploy`, a worker, a run started
the way the UI's Run button starts one, the run's artifacts and summary."""

from __future__ import annotations

import json

import pytest

from .conftest import GPU_POOL, ROOT, load_summary, wait_for_final_state

pytestmark = pytest.mark.slow


def test_deployed_schedule_and_pool_are_what_prefect_yaml_says(prefect_server, deployed):
    nightly = deployed["nightly"]
    assert nightly.work_pool_name == GPU_POOL
    assert nightly.parameters["preset"] == "qwen2-vl-7b-nutrition"
    (schedule,) = nightly.schedules
    assert schedule.active and schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
    assert nightly.global_concurrency_limit.limit == 1
    assert nightly.concurrency_options.collision_strategy == "ENQUEUE"
    # The pull step keeps the env placeholder for the worker to fill at run time.
    assert nightly.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $VLMDET_HOME }}"}}]
    with prefect_server.client() as client:
        pool = client.read_work_pool(GPU_POOL)
        assert pool.base_job_template["variables"]["properties"]["env"]["default"]["CUDA_VISIBLE_DEVICES"] == "0"
        # The server accepts the Docker and Kubernetes templates too (it rejects a
        # job_configuration placeholder without a variable).
        from prefect.client.schemas.actions import WorkPoolCreate

        for pool_type in ("docker", "kubernetes"):
            template = json.loads((ROOT / "deployments" / "templates" / f"{pool_type}-gpu.json").read_text())
            created = client.create_work_pool(WorkPoolCreate(name=f"check-{pool_type}", type=pool_type, base_job_template=template))
            assert created.base_job_template == template


def test_a_ui_style_run_of_the_smoke_deployment_completes_with_artifacts(prefect_server, deployed, worker):
    with prefect_server.client() as client:
        # What the UI's Run -> Quick run posts: no parameters, so the deployment's defaults apply.
        flow_run = client.create_flow_run_from_deployment(deployed["smoke_id"])
    run = wait_for_final_state(prefect_server, flow_run.id)
    assert run.state.is_completed(), f"{run.state.type}: {run.state.message}"
    assert run.parameters["overrides"] == deployed["parameters"]["overrides"]

    with prefect_server.client() as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    keys = {a.key for a in artifacts}
    assert "retrain-summary" in keys, keys
    summary_md = next(a for a in artifacts if a.key == "retrain-summary").data
    assert "mAP" in summary_md

    summary = load_summary(deployed["workdir"])
    assert set(summary["metrics"]) >= {"map", "map50", "map75"}
    assert set(summary["gate"]) >= {"threshold", "passed", "reason"}
    assert summary["training"]["global_step"] == 2
