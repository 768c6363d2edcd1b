"""train.report_to (issue 28): the trainer logs to the experiment tracker, and the run's mAP, gate decision,
publication and Prefect flow run go to the same tracker run. Read back with the trackers' own readers:
TensorBoard's event accumulator, MLflow's client against a real local store."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from vlmdet.pipeline import run as pipeline
from vlmdet.cli import EXIT_CONFIG, main
from vlmdet.pipeline.step import Plain

FLOW_RUN = "0b6f1a52-3c1d-4e8f-9a7b-5d2c6e4f8a10"


def _run(tmp_path: Path, tiny_model: str, **overrides):
    """The smoke preset on the CPU, shrunk: 3 steps of the micro model, one evaluation, gate open at 0, merge,
    merged evaluation, local publication (about a minute on 2 cores)."""
    resolved = pipeline.resolve("smoke", {
        "model.base": tiny_model, "data.dataset": "synth:12", "train.max_steps": 3, "train.per_device_batch": 2,
        "train.logging_steps": 1, "train.save_steps": 50, "train.warmup_steps": 0, "eval.batch_size": 6,
        "eval.max_new_tokens": 12, "eval.eval_base": False, "eval.preview_images": 0, "eval.val_max_images": 0,
        "gate.threshold": 0.0, **overrides}, free_gib=None)
    layout = pipeline.RunLayout.at(tmp_path / "run")
    summary = pipeline.run(resolved, layout, Plain())
    history = json.loads((Path(summary.adapter).parent / "log_history.json").read_text())
    return summary, [(h["step"], h["loss"]) for h in history if "loss" in h]


def _f32(x: float) -> float:
    return float(np.float32(x))


@pytest.mark.slow
def test_the_smoke_run_writes_tensorboard_by_default_with_the_loss_and_the_runs_outcome(tmp_path, tiny_model,
                                                                                           monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    monkeypatch.setenv("VLMDET_FLOW_RUN_ID", FLOW_RUN)  # what the Prefect flow sets for its run
    summary, losses = _run(tmp_path, tiny_model)
    log_dir = Path(summary.adapter).parent / "tensorboard"
    assert summary.tracker["report_to"] == "tensorboard" and summary.tracker["log_dir"] == str(log_dir)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["tracker"] == summary.tracker
    assert len(losses) == 3 and summary.gate["passed"] and summary.published

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    # the trainer's own logging: its loss at every step, exactly what its log history says
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(s, _f32(v)) for s, v in losses]
    # the run's outcome, at the last training step beside the curve
    step = summary.training["global_step"]
    expected = {"test/adapter/map50": summary.metrics["map50"], "test/adapter/map": summary.metrics["map"],
                "test/merged/map75": summary.merged_metrics["map75"], "gate/challenger": summary.gate["value"],
                "gate/threshold": 0.0, "gate/passed": 1.0}
    assert {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in expected} == \
        {tag: [(step, _f32(v))] for tag, v in expected.items()}

    def text(tag: str) -> str:
        (event,) = events.Tensors(f"{tag}/text_summary")
        return make_ndarray(event.tensor_proto).item().decode()

    assert text("published/revision") == summary.published["revision"] != ""
    assert text("published/target") == summary.published["target"]
    assert text("prefect/flow_run_id") == FLOW_RUN
    assert text("gate/reason") == summary.gate["reason"]


@pytest.mark.slow
def test_report_to_mlflow_logs_the_training_and_the_gate_to_one_run_of_a_local_store(tmp_path, tiny_model,
                                                                                       monkeypatch):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("VLMDET_FLOW_RUN_ID", FLOW_RUN)
    summary, losses = _run(tmp_path, tiny_model, **{"train.report_to": "mlflow", "gate.threshold": 1.0})
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("vlmdet-smoke")
    (run,) = client.search_runs([experiment.experiment_id])  # one run: training and outcome together
    run_id = run.info.run_id
    assert summary.tracker == {"report_to": "mlflow", "tracking_uri": store, "experiment_id": experiment.experiment_id,
                               "run_id": run_id, "url": None, "command": f"mlflow ui --backend-store-uri {store}"}

    # the trainer's arguments and vlmdet's own settings
    params = run.data.params
    assert params["max_steps"] == "3" and params["learning_rate"] == str(2.0e-3)
    assert params["vlmdet.train.max_steps"] == "3" and params["vlmdet.model.base"] == tiny_model
    # the loss per step, as the trainer logged it
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(s, pytest.approx(v, rel=1e-6)) for s, v in losses]
    # the gate's numbers: closed at threshold 1.0 (a 3-step micro model is far from mAP50 1)
    step = summary.training["global_step"]
    for key, value in {"gate/challenger": summary.gate["value"], "gate/threshold": 1.0, "gate/passed": 0.0,
                       "test/adapter/map50": summary.metrics["map50"], "test/adapter/map75": summary.metrics["map75"]
                       }.items():
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, key)] == [(step, value)], key
    assert not summary.gate["passed"] and summary.published is None
    tags = run.data.tags
    assert tags["prefect.flow_run_id"] == FLOW_RUN  # the link to the Prefect flow run
    assert tags["vlmdet.gate.reason"] == summary.gate["reason"]
    assert tags["vlmdet.published.target"] == "nothing"
    assert tags["mlflow.runName"] == f"smoke {Path(summary.adapter).parent.name}"
    assert not list((tmp_path / "run" / "train").glob("*/tensorboard"))  # the one tracker asked for


def test_a_tracker_that_is_not_installed_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable, whatever this machine has
    monkeypatch.delitem(sys.modules, "flows.retrain", raising=False)
    workdir = tmp_path / "run"
    code = main(["retrain", "--preset", "smoke", "--workdir", str(workdir), "--train.report_to", "wandb"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("vlmdet: error:")]
    assert code == EXIT_CONFIG and len(lines) == 1 and "Traceback" not in err, err
    assert "train.report_to='wandb'" in lines[0] and "pip install vlmdet[wandb]" in lines[0]
    assert not workdir.exists() and "flows.retrain" not in sys.modules  # no data, no Prefect, no training


def _decided(tmp_path: Path, threshold: float = 0.3, report_to: str = "tensorboard"):
    """The summary of a run whose training logged to no tracker (trained before the setting, or with none)."""
    from vlmdet.config.settings import load_preset
    from vlmdet.decide.gate import decide
    from vlmdet.run.records import AdapterRef, DatasetRef, EvalReport

    config = load_preset("smoke", {"gate.threshold": threshold, "train.report_to": report_to})
    report = EvalReport(map=0.25, map50=0.5, map75=0.125, split="test", num_images=4, parse_failures=0,
                        predictions="p.json")
    adapter = AdapterRef(path=str(tmp_path / "run" / "train" / "k" / "adapter"), base_model="b", family="qwen2_vl",
                         global_step=7)
    data = DatasetRef(fingerprint="f", root=str(tmp_path), splits={}, counts={})
    return config, pipeline.RunSummary.build(config, data, adapter, report, decide(report, config.gate, None))


def test_the_flow_run_reaches_the_tracker_through_the_flows_environment(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    from vlmdet.run import tracking

    monkeypatch.delenv("VLMDET_FLOW_RUN_ID", raising=False)
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    config, summary = _decided(tmp_path)
    with tracking.flow_run_env(FLOW_RUN, "http://prefect/runs/flow-run/x"):  # what flows/retrain.py wraps the run in
        where = tracking.log_run(summary, config)
    assert "VLMDET_FLOW_RUN_ID" not in os.environ  # set for the run only
    events = EventAccumulator(where["log_dir"], size_guidance={"scalars": 0, "tensors": 0}).Reload()
    text = {t: make_ndarray(events.Tensors(t)[0].tensor_proto).item().decode() for t in events.Tags()["tensors"]}
    assert text["prefect/flow_run_id/text_summary"] == FLOW_RUN
    assert text["prefect/flow_run_url/text_summary"] == "http://prefect/runs/flow-run/x"
    assert [(e.step, e.value) for e in events.Scalars("test/adapter/map50")] == [(7, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("gate/passed")] == [(7, 1.0)]


def test_mlflow_without_a_training_run_gets_a_run_of_its_own_for_the_results(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from vlmdet.run import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", FLOW_RUN)  # what a Prefect worker sets in the flow run's process
    config, summary = _decided(tmp_path, report_to="mlflow")
    Path(summary.adapter).parent.mkdir(parents=True)
    where = tracking.log_run(summary, config)
    # without MLFLOW_TRACKING_URI: a store in the work folder, not in whatever folder the worker started in
    assert where["tracking_uri"] == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=where["tracking_uri"])
    run = client.get_run(where["run_id"])
    assert run.data.metrics == {"test/adapter/map": 0.25, "test/adapter/map50": 0.5, "test/adapter/map75": 0.125,
                                "gate/challenger": 0.5, "gate/threshold": 0.3, "gate/passed": 1.0}
    assert run.data.tags["prefect.flow_run_id"] == FLOW_RUN and run.data.params["vlmdet.gate.threshold"] == "0.3"
    # a second decision on the same training (gate settings changed) goes to the same run; params stay as logged
    again = tracking.log_run(*reversed(_decided(tmp_path, threshold=0.9, report_to="mlflow")))
    assert again == where and len(client.search_runs([where["experiment_id"]])) == 1
    assert [m.value for m in client.get_metric_history(where["run_id"], "gate/threshold")] == [0.3, 0.9]
    assert client.get_run(where["run_id"]).data.params["vlmdet.gate.threshold"] == "0.3"
