"""Prefect keeps the results: a retry after a failed publish goes straight to publish, a change of
gate settings re-decides without training, nothing new is recognised, an edited box retrains; and a
check run of a production preset publishes to a local folder and says so."""
from __future__ import annotations

import json

import pytest
import yaml

import vlmdet.publishing
import vlmdet.pipeline.steps
from flows.retrain import retrain
from vlmdet.config.settings import load_preset
from vlmdet.data.synth import generate
from vlmdet.publishing import PermanentPublishError

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def test_retry_after_publish_failure_gate_change_nothing_new_and_edit(tiny_model, tmp_path, monkeypatch):
    prod = load_preset("smoke").to_dict()
    prod["name"] = "prod"
    prod["publish"]["target"] = "hub:example/production"  # a check run must never reach it
    preset = tmp_path / "prod.yaml"
    preset.write_text(yaml.safe_dump(prod))
    ann = generate(tmp_path / "data", 12, seed=4)
    overrides = {"model.base": tiny_model, "data.dataset": f"coco:{ann.parent}", "train.max_steps": 2,
                 "train.per_device_batch": 2, "train.save_steps": 2, "eval.batch_size": 6, "eval.max_new_tokens": 6,
                 "eval.eval_base": False, "eval.preview_images": 0, "eval.val_max_images": 1,
                 "publish.token_secret": ""}
    steps: list[str] = []
    real = vlmdet.pipeline.steps.run_step  # every heavy step's child starts there
    monkeypatch.setattr(vlmdet.pipeline.steps, "run_step", lambda step, *a, **k: steps.append(step) or real(step, *a, **k))
    publishes = []
    real_publish = vlmdet.publishing.publish

    def flaky_publish(*args, **kwargs):
        publishes.append(1)
        if len(publishes) == 1:
            raise PermanentPublishError("injected: the upload failed")
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(vlmdet.publishing, "publish", flaky_publish)
    wd = str(tmp_path / "run")

    # 1. a check run (max_steps set) of a preset that targets the Hub: its publish fails once, the flow
    # run is retried and goes straight to publish: nothing trained, evaluated or merged twice
    state = retrain.with_options(retries=1, retry_delay_seconds=0)(
        preset=str(preset), workdir=wd, threshold=0.0, overrides=overrides, return_state=True)
    assert state.is_completed(), state
    assert len(publishes) == 2
    assert steps == ["train", "evaluate", "merge", "evaluate"]
    assert any((tmp_path / "run" / ".prefect-results").iterdir())  # results live with the work folder
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["published"]["kind"] == "local"
    assert summary["published"]["target"] == str(tmp_path / "run" / "check-published")
    assert "check run" in summary["check_run"] and "hub:example/production" in summary["check_run"]
    assert (tmp_path / "run" / "check-published" / "model.safetensors").is_file()
    assert summary["training"]["steps_run"] == 2 and summary["provenance"]["versions"]["torch"]

    # 2. only the gate changes: decided again on the cached training and evaluation
    second = retrain(preset=str(preset), workdir=wd, threshold=0.99, overrides=overrides)
    assert steps == ["train", "evaluate", "merge", "evaluate"]
    assert second["retrained"] is False and second["from_cache"] is True and second["skipped"] is False
    assert second["gate"]["threshold"] == 0.99 and second["gate"]["passed"] is False
    assert second["adapter"] == summary["adapter"]

    # 3. the same again: nothing new, recognised from Prefect's cache, nothing run
    third = retrain(preset=str(preset), workdir=wd, threshold=0.99, overrides=overrides)
    assert third["skipped"] is True and "Prefect's cache" in third["skip_reason"]
    assert steps == ["train", "evaluate", "merge", "evaluate"]

    # 4. one box of the coco dataset moves by a pixel: prepared again, trained and evaluated again
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["bbox"][0] += 1
    ann.write_text(json.dumps(coco))
    fourth = retrain(preset=str(preset), workdir=wd, threshold=0.99, overrides=overrides)
    assert fourth["retrained"] is True and fourth["dataset"]["fingerprint"] != summary["dataset"]["fingerprint"]
    assert steps == ["train", "evaluate", "merge", "evaluate", "train", "evaluate"]
