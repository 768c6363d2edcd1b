"""The retrain flow end to end under a Prefect test API, on the micro model and synthetic data."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flows.retrain import retrain

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _overrides(tiny_model):
    return {"model.base": tiny_model, "data.dataset": "synth:16", "train.max_steps": 2, "train.per_device_batch": 2,
            "train.save_steps": 50, "eval.batch_size": 8, "eval.max_new_tokens": 8, "eval.eval_base": False,
            "eval.preview_images": 2, "publish.token_secret": ""}


def test_gate_passes_merges_and_publishes(tiny_model, tmp_path):
    # an untrained micro model scores mAP 0, so threshold 0 is the reachable bar
    summary = retrain(preset="smoke", workdir=str(tmp_path), threshold=0.0, overrides=_overrides(tiny_model))
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["gate"]["passed"] is True and on_disk["gate"]["threshold"] == 0.0
    assert on_disk["published"] and on_disk["published"]["kind"] == "local"
    published = tmp_path / "published"
    assert (published / "model.safetensors").is_file() and (published / "README.md").is_file()
    assert "model-index" in (published / "README.md").read_text()
    assert set(on_disk["metrics"]) == {"map", "map50", "map75"}
    assert (tmp_path / "merged" / "config.json").is_file()
    assert on_disk["adapter"].endswith("adapter") and (tmp_path / on_disk["adapter"]).is_dir()
    assert summary["metrics"] == on_disk["metrics"]

    # the same run again: nothing changed, so it says so and does not train
    again = retrain(preset="smoke", workdir=str(tmp_path), threshold=0.0, overrides=_overrides(tiny_model))
    assert again["skipped"] is True and "unchanged" in again["skip_reason"]
    assert again["metrics"] == summary["metrics"]


def test_gate_closed_publishes_nothing(tiny_model, tmp_path):
    summary = retrain(preset="smoke", workdir=str(tmp_path), threshold=0.99, overrides=_overrides(tiny_model))
    gate = json.loads((tmp_path / "summary.json").read_text())["gate"]
    assert gate["passed"] is False and gate["threshold"] == 0.99
    assert "below the threshold" in gate["reason"]
    assert summary["published"] is None and summary["merged"] is None
    assert not (tmp_path / "published").exists() and not (tmp_path / "merged").exists()


def test_missing_coco_path_fails_before_any_model_with_its_name(tmp_path):
    missing = tmp_path / "nowhere" / "annotations.json"
    proc = subprocess.run([sys.executable, "-m", "vlmdet.cli", "retrain", "--preset", "smoke", "--workdir", str(tmp_path / "run"),
                           "--dataset", f"coco:{missing}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr
    assert not (tmp_path / "run" / "train").exists()  # failed before training started
