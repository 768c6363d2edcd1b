"""A new step costs its declaration and one line of the run (issue 27).

The test declares a step that is in no vlmdet module (`NOTE`: writes the adapter's step count beside the
run, cached on its folder, with a log line and an artifact), adds the one line that calls it to the run,
and runs it through every driver: the Prefect flow on the test server, `vlmdet retrain`, and the GPU
benchmark's driver. Nothing else is written for it: no task module, no driver method, no layout entry.

The model work of train and evaluate is not what is tested here: their child process is replaced by one
that answers with records at once (`run_step`), so each run takes seconds; every other part is the product's.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from vlmdet.pipeline import run as pipeline
from vlmdet.pipeline import steps
from vlmdet.pipeline.step import Show, Step
from vlmdet.run.layout import RunLayout
from vlmdet.run.records import AdapterRef, EvalReport

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = {"data.dataset": "synth:6", "gate.threshold": 0.99, "eval.eval_base": False, "train.report_to": "none"}


# --- the new step: one declaration ------------------------------------------------------------------------------
def write_note(adapter: AdapterRef, layout: RunLayout) -> str:
    """WORKDIR/note/steps.txt: how many optimizer steps the adapter took."""
    out = layout.path("note", "steps.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{adapter.global_step}\n")
    return str(out)


NOTE = Step("note", write_note,
            key=lambda adapter, layout: f"note-{adapter.global_step}-{layout.root.name}",
            done=lambda layout: layout.path("note", "steps.txt").is_file(),
            says=lambda path, a: f"noted {a['adapter'].global_step} steps in {path}",
            shows=lambda path, a: [Show("note", "markdown", f"## Note\n\n{a['adapter'].global_step} steps")])


@pytest.fixture
def noted_run(monkeypatch):
    """The run with the new step's one line, after training; train and evaluate answer without a model."""
    real_trained = pipeline.trained

    def trained(config, layout, driver, fresh=False):
        data, adapter, cached = real_trained(config, layout, driver, fresh)
        driver(NOTE, adapter, layout)  # the one line a new step adds to the run
        return data, adapter, cached

    def run_step(step, request, step_dir, **_):
        out = Path(request["out"])
        out.mkdir(parents=True, exist_ok=True)
        if step == "train":
            (out / "adapter").mkdir(exist_ok=True)
            (out / "adapter" / "adapter_config.json").write_text("{}")
            return AdapterRef(path=str(out / "adapter"), base_model="base", family="qwen2_vl", global_step=3,
                              losses=[1.0, 0.5]).to_dict()
        (out / "predictions.json").write_text("[]")
        return EvalReport(map=0.1, map50=0.1, map75=0.1, split="test", num_images=2, parse_failures=0,
                          predictions=str(out / "predictions.json"), model=request["model"],
                          data_fingerprint=request["dataset"]["fingerprint"]).to_dict()

    monkeypatch.setattr(pipeline, "trained", trained)
    monkeypatch.setattr(steps, "run_step", run_step)


def _task_runs(flow_run_id) -> dict[str, list]:
    """Task runs of a flow run by task name, and the artifacts each made."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterTaskRunId, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        by_name: dict[str, list] = {}
        for tr in runs:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(task_run_id=ArtifactFilterTaskRunId(any_=[tr.id])))
            named = re.fullmatch(r"(.+)-[0-9a-f]{3}", tr.name)  # Prefect's TASK-xyz, unless the task names its runs
            by_name.setdefault(named.group(1) if named else tr.name, []).append((tr, [a.key for a in arts]))
    return by_name


def test_a_declared_step_runs_as_a_task_of_the_flow_and_is_cached_by_its_key(noted_run, prefect_harness, tmp_path):
    from flows.retrain import retrain

    first = retrain(preset="smoke", workdir=str(tmp_path), overrides=OVERRIDES, return_state=True)
    assert first.is_completed() and (tmp_path / "note" / "steps.txt").read_text() == "3\n"
    runs = _task_runs(first.state_details.flow_run_id)
    ((note, artifacts),) = runs["note"]
    assert note.state.name == "Completed" and artifacts == ["note"]
    # the same run again: the declaration's key finds the cached note (its folder still holds it)
    again = retrain(preset="smoke", workdir=str(tmp_path), overrides=OVERRIDES, return_state=True)
    ((note, artifacts),) = _task_runs(again.state_details.flow_run_id)["note"]
    assert note.state.name == "Cached" and artifacts == []


def test_a_declared_step_runs_through_the_command_line(noted_run, prefect_harness, tmp_path, capsys):
    from vlmdet.cli import main

    assert main(["retrain", "--preset", "smoke", "--workdir", str(tmp_path), "--set", "data.dataset=synth:6",
                 "--threshold", "0.99", "--set", "eval.eval_base=false", "--set", "train.report_to=none"]) == 0
    assert (tmp_path / "note" / "steps.txt").read_text() == "3\n"
    assert "gate:      closed" in capsys.readouterr().out


def test_a_declared_step_runs_through_the_benchmark_driver(noted_run, tmp_path):
    spec = importlib.util.spec_from_file_location("nightly_run_add_step", REPO / "benchmarks" / "nightly_run.py")
    nightly = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nightly)
    (tmp_path / "out").mkdir()
    rec = nightly.Recorder(tmp_path / "out", {"date": "today"})
    driver = nightly.bench_driver(rec, tmp_path / "hook")
    resolved = pipeline.resolve("smoke", OVERRIDES, free_gib=None)
    pipeline.run(resolved, RunLayout.at(tmp_path / "work"), driver)
    rows = [r["step"] for r in rec.steps]
    assert rows[:3] == ["prepare_data", "train", "note"] and (tmp_path / "work" / "note" / "steps.txt").is_file()
    assert json.loads((tmp_path / "work" / "summary.json").read_text())["gate"]["passed"] is False
