"""deployments/: prefect.yaml and the work-pool job templates, checked against what Prefect and
the worker packages really accept. Prefect ignores unknown keys silently (its config models use
extra="ignore"), so a misspelt field would otherwise only show as a GPU-less run at 2 a.m."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS = ROOT / "deployments"
TEMPLATES = DEPLOYMENTS / "templates"
PLACEHOLDER = re.compile(r"\{\{\s*([\w.$-]+)\s*\}\}")


def _worker(pool_type: str):
    if pool_type == "process":
        from prefect.workers.process import ProcessWorker
        return ProcessWorker
    if pool_type == "docker":
        return pytest.importorskip("prefect_docker.worker").DockerWorker
    return pytest.importorskip("prefect_kubernetes.worker").KubernetesWorker


def _load(name: str) -> dict:
    return json.loads((TEMPLATES / name).read_text())


@pytest.fixture
def render(prefect_harness):
    """from_template_and_values opens an API client (to resolve block/variable references);
    without an API URL Prefect would start its own ephemeral server, so use the session's."""
    return _render


def _render(pool_type: str, template: dict, values: dict | None = None):
    cls = _worker(pool_type).job_configuration
    return asyncio.run(cls.from_template_and_values(template, values or {}))


def _placeholders(obj) -> set[str]:
    return set(PLACEHOLDER.findall(json.dumps(obj)))


TEMPLATE_TYPES = [("process-gpu.json", "process"), ("docker-gpu.json", "docker"), ("kubernetes-gpu.json", "kubernetes")]


@pytest.mark.parametrize("name,pool_type", TEMPLATE_TYPES)
def test_template_only_uses_fields_prefect_knows(name, pool_type):
    ours, default = _load(name), _worker(pool_type).get_default_base_job_template()
    unknown = set(ours["job_configuration"]) - set(default["job_configuration"])
    assert not unknown, f"{name}: job_configuration keys the {pool_type} worker would ignore: {unknown}"
    ours_vars, default_vars = ours["variables"]["properties"], default["variables"]["properties"]
    used = _placeholders(ours["job_configuration"])
    for var, schema in ours_vars.items():
        if var in default_vars:
            # Only defaults and help text may differ: a changed type would break the UI form
            # and the worker's validation of what a deployment overrides.
            strip = lambda s: {k: v for k, v in s.items() if k not in ("default", "description")}
            assert strip(schema) == strip(default_vars[var]), f"{name}: variable {var!r} changed shape"
        else:
            assert var in used, f"{name}: variable {var!r} is neither Prefect's nor used by job_configuration"
    assert used <= set(ours_vars), f"{name}: placeholders without a variable: {used - set(ours_vars)}"


def test_process_template_pins_one_gpu(render):
    config = render("process", _load("process-gpu.json"))
    assert config.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert config.env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    # A deployment overriding env adds to the pool's GPU settings instead of dropping them.
    config = render("process", _load("process-gpu.json"), {"env": {"HF_HOME": "/data/hf"}})
    assert config.env["CUDA_VISIBLE_DEVICES"] == "0" and config.env["HF_HOME"] == "/data/hf"


def test_docker_template_requests_gpus_in_a_form_docker_py_accepts(render):
    docker_types = pytest.importorskip("docker.types")
    containers = pytest.importorskip("docker.models.containers")
    config = render("docker", _load("docker-gpu.json"))
    extra = config.container_create_kwargs
    known = set(containers.RUN_CREATE_KWARGS) | set(containers.RUN_HOST_CONFIG_KWARGS)
    assert set(extra) <= known, f"docker-py does not know {set(extra) - known}"
    # The worker passes these to containers.create(); HostConfig is where docker-py turns them
    # into the Engine API's DeviceRequests (and where a wrong key or type raises).
    host = docker_types.HostConfig(version="1.44", device_requests=extra["device_requests"], shm_size=extra["shm_size"])
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}]
    assert host["ShmSize"] >= 1 << 30
    assert config.image == "vlmdet:latest"


def _check_k8s(obj, type_name: str, path: str, models) -> None:
    """Every key of a manifest must be a field of the Kubernetes model at that place."""
    if isinstance(obj, str) and PLACEHOLDER.fullmatch(obj):
        return  # filled by the worker from a variable
    if type_name.startswith("list["):
        assert isinstance(obj, list), f"{path}: expected a list"
        for i, item in enumerate(obj):
            _check_k8s(item, type_name[5:-1], f"{path}[{i}]", models)
        return
    if type_name.startswith("dict(") or type_name in ("str", "int", "bool", "object", "float", "datetime"):
        return
    model = getattr(models, type_name)
    by_json = {json_key: attr for attr, json_key in model.attribute_map.items()}
    assert isinstance(obj, dict), f"{path}: expected an object ({type_name})"
    for key, value in obj.items():
        assert key in by_json, f"{path}.{key}: not a field of {type_name}"
        _check_k8s(value, model.openapi_types[by_json[key]], f"{path}.{key}", models)


def test_kubernetes_manifest_is_a_valid_job_that_requests_gpus(render):
    models = pytest.importorskip("kubernetes_asyncio.client.models")
    template = _load("kubernetes-gpu.json")
    _check_k8s(template["job_configuration"]["job_manifest"], "V1Job", "job_manifest", models)
    config = render("kubernetes", template, {"gpu_count": 2})
    pod = config.job_manifest["spec"]["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 2
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert render("kubernetes", template).job_manifest["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_checker_catches_a_misplaced_field():
    models = pytest.importorskip("kubernetes_asyncio.client.models")
    bad = {"spec": {"template": {"spec": {"containers": [{"name": "x", "resource": {}}]}}}}
    with pytest.raises(AssertionError, match="resource"):
        _check_k8s(bad, "V1Job", "job_manifest", models)


# ---------------------------------------------------------------- prefect.yaml

@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((DEPLOYMENTS / "prefect.yaml").read_text())


def test_prefect_yaml_uses_only_keys_prefect_deploy_reads(prefect_yaml):
    # prefect deploy parses the file with these models (extra="ignore": a typo is dropped).
    from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel, RawScheduleConfig, WorkPoolConfig

    top = {f.alias or n for n, f in PrefectYamlModel.model_fields.items()}
    assert set(prefect_yaml) <= top, set(prefect_yaml) - top
    PrefectYamlModel.model_validate(prefect_yaml)
    for dep in prefect_yaml["deployments"]:
        assert set(dep) <= set(DeploymentConfig.model_fields), set(dep) - set(DeploymentConfig.model_fields)
        assert set(dep["work_pool"]) <= set(WorkPoolConfig.model_fields)
        for schedule in dep.get("schedules", []):
            RawScheduleConfig.model_validate(schedule)  # extra="forbid"


def test_nightly_schedule_fires_once_every_night_all_year(prefect_yaml):
    # The server's own schedule model: the scheduler service computes run times with it.
    from datetime import datetime
    from prefect.server.schemas.schedules import CronSchedule

    nightly = next(d for d in prefect_yaml["deployments"] if d["name"] == "nightly-gpu")
    (schedule,) = nightly["schedules"]
    assert schedule["active"] is True
    ZoneInfo(schedule["timezone"])
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    # A year that spans both daylight-saving changes: no night is skipped, none runs twice.
    dates = asyncio.run(cron.get_dates(n=366, start=datetime(2026, 1, 1, tzinfo=ZoneInfo("UTC"))))
    gaps = {(b - a).total_seconds() for a, b in zip(dates, dates[1:])}
    assert gaps == {24 * 3600.0}
    assert len(dates) == 366


def test_deployments_point_at_the_retrain_flow_with_parameters_it_accepts(prefect_yaml):
    retrain_module = pytest.importorskip("flows.retrain", reason="flows/retrain.py not importable yet")
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(retrain_module.retrain)
    presets = {p.stem for p in (ROOT / "vlmdet" / "config" / "presets").glob("*.yaml")}
    for dep in prefect_yaml["deployments"]:
        path, func = dep["entrypoint"].split(":")
        assert (ROOT / path).is_file() and getattr(retrain_module, func).name == "retrain"
        unknown = set(dep["parameters"]) - set(schema.properties)
        assert not unknown, f"{dep['name']}: parameters the flow does not take: {unknown}"
        assert dep["parameters"]["preset"] in presets


def test_deployments_target_pools_documented_with_a_template(prefect_yaml):
    docs = (ROOT / "docs" / "operations.md").read_text()
    for dep in prefect_yaml["deployments"]:
        pool = dep["work_pool"]["name"]
        assert re.search(rf"prefect work-pool create {pool}\b", docs), f"docs/operations.md never creates pool {pool}"
    for name, _ in TEMPLATE_TYPES:
        assert f"deployments/templates/{name}" in docs
