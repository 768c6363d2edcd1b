"""Bad nights, rehearsed: a training child killed mid-run, and a GPU out of memory."""
from __future__ import annotations

import json

import pytest

import vlmdet.data
from flows.retrain import retrain
from flows.retries import task_run_attempts

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def _overrides(tiny_model, **extra):
    return {"model.base": tiny_model, "data.dataset": "synth:12", "train.per_device_batch": 2, "eval.batch_size": 6,
            "eval.max_new_tokens": 6, "eval.eval_base": False, "eval.preview_images": 0, "publish.token_secret": "",
            **extra}


def test_killed_training_resumes_from_its_checkpoint_on_flow_retry(tiny_model, tmp_path, monkeypatch):
    calls = []
    real_prepare = vlmdet.data.prepare  # the preparation itself, below the step's cache
    monkeypatch.setattr(vlmdet.data, "prepare", lambda *a, **k: calls.append(1) or real_prepare(*a, **k))
    # the training child SIGKILLs itself right after writing checkpoint-2 of 4, as a preempted machine
    monkeypatch.setenv("VLMDET_FAULTS", "kill-after-checkpoint:2")
    flow = retrain.with_options(retries=1, retry_delay_seconds=0)
    state = flow(preset="smoke", workdir=str(tmp_path), threshold=1.0, return_state=True,
                 overrides=_overrides(tiny_model, **{"train.max_steps": 4, "train.save_steps": 2}))
    assert state.is_completed(), state
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["training"]["resumed_from"].endswith("checkpoint-2")
    # it continued: the retry ran steps 3 and 4 only (a restart from zero would run 4 and report no resume)
    assert summary["training"]["global_step"] == 4 and summary["training"]["steps_run"] == 2
    assert len(calls) == 1, "the flow retry must reuse the cached data preparation"
    attempts = {t["name"]: t for t in task_run_attempts(state.state_details.flow_run_id)}
    train_runs = [t for name, t in attempts.items() if name.startswith("train")]
    errors = [a["error"] or "" for t in train_runs for a in t["attempts"]]
    assert any("killed by SIGKILL" in e for e in errors), errors


def test_out_of_memory_retries_once_with_half_the_batch(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMDET_FAULTS", "oom-above-batch:2")
    state = retrain(preset="smoke", workdir=str(tmp_path), threshold=1.0, return_state=True,
                    overrides=_overrides(tiny_model, **{"train.max_steps": 1, "train.per_device_batch": 4,
                                                        "train.grad_accum": 1}))
    assert state.is_completed(), state
    summary = json.loads((tmp_path / "summary.json").read_text())
    adapter_cfg = json.loads((tmp_path / summary["adapter"]).parent.joinpath("step", "result.json").read_text())
    train_cfg = adapter_cfg["record"]["config"]["train"]
    assert (train_cfg["per_device_batch"], train_cfg["grad_accum"]) == (2, 2)  # same effective batch of 4
    train_run = next(t for t in task_run_attempts(state.state_details.flow_run_id) if t["name"].startswith("train"))
    assert len(train_run["attempts"]) == 2
    assert "out of GPU memory" in train_run["attempts"][0]["error"]
    assert "per_device_batch" in train_run["attempts"][0]["error"]  # the message names the knobs


def test_out_of_memory_at_batch_one_is_not_retried_blindly(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMDET_FAULTS", "oom-above-batch:0")
    state = retrain(preset="smoke", workdir=str(tmp_path), threshold=1.0, return_state=True,
                    overrides=_overrides(tiny_model, **{"train.max_steps": 1, "train.per_device_batch": 1}))
    assert state.is_failed()
    train_run = next(t for t in task_run_attempts(state.state_details.flow_run_id) if t["name"].startswith("train"))
    assert len(train_run["attempts"]) == 1
    assert "model.max_pixels" in train_run["attempts"][0]["error"]
