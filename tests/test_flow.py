"""The retrain flow end to end under a Prefect test API, on the micro model and synthetic data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlmdet.run.layout import RunLayout
from prefect import flow

from flows.retrain import retrain
from tasks.prepare_data import prepare_data
from vlmdet.config.settings import load_preset

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _overrides(tiny_model):
    return {"model.base": tiny_model, "data.dataset": "synth:16", "train.max_steps": 2, "train.per_device_batch": 2,
            "train.save_steps": 50, "eval.batch_size": 8, "eval.max_new_tokens": 8, "eval.eval_base": False,
            "eval.preview_images": 2, "publish.token_secret": ""}


def _summary(workdir: Path) -> dict:
    return json.loads((workdir / "summary.json").read_text())


@pytest.mark.slow
def test_gate_closed_then_opened_then_nothing_new_then_forced(tiny_model, tmp_path):
    args = dict(preset="smoke", workdir=str(tmp_path), overrides=_overrides(tiny_model))

    # 1. threshold out of reach: evaluated, nothing merged or published, the summary says why
    first = retrain(threshold=0.99, **args)
    gate = _summary(tmp_path)["gate"]
    assert gate["passed"] is False and gate["threshold"] == 0.99 and "below the threshold" in gate["reason"]
    assert first["published"] is None and first["merged"] is None
    assert not (tmp_path / "published").exists() and not (tmp_path / "merged").exists()
    assert set(first["metrics"]) == {"map", "map50", "map75"}
    assert first["training"]["global_step"] == 2 and Path(first["adapter"], "adapter_config.json").is_file()

    # 2. only the threshold changes (an untrained micro model scores 0, so 0 is the reachable bar):
    # no retraining, the saved evaluation is gated again, merged, measured again and published
    second = retrain(threshold=0.0, **args)
    on_disk = _summary(tmp_path)
    assert on_disk == json.loads(json.dumps(second))
    assert second["retrained"] is False and second["adapter"] == first["adapter"]
    assert second["gate"]["passed"] is True and second["gate"]["threshold"] == 0.0
    assert second["published"]["kind"] == "local" and second["merged_metrics"] is not None
    published = tmp_path / "published"
    assert (published / "model.safetensors").is_file() and "model-index" in (published / "README.md").read_text()
    assert Path(second["merged"], "config.json").is_file() and Path(second["merged"]).parent == tmp_path / "merged"

    # 3. the same again: nothing new, said so, nothing trained
    third = retrain(threshold=0.0, **args)
    assert third["skipped"] is True and "unchanged" in third["skip_reason"]
    assert third["metrics"] == second["metrics"]

    # 4. force: trained again from the base, in a folder of its own
    forced = retrain(threshold=0.99, force=True, **args)
    assert forced["retrained"] is True and forced["adapter"] != first["adapter"]
    assert forced["training"]["resumed_from"] is None and forced["training"]["global_step"] == 2


def test_prepared_data_follows_the_data_settings(tmp_path):
    """Data A, then B, then A again in one workdir: each run gets its own prepared files."""
    a = load_preset("smoke", {"data.dataset": "synth:6", "data.seed": 1})
    b = load_preset("smoke", {"data.dataset": "synth:7", "data.seed": 2})

    @flow
    def three():
        return [prepare_data(cfg, RunLayout.at(tmp_path)) for cfg in (a, b, a)]

    ra, rb, ra2 = three()
    assert ra.fingerprint != rb.fingerprint and ra2.fingerprint == ra.fingerprint
    for ref, n in ((ra, 6), (rb, 7), (ra2, 6)):
        images = sum(len(json.loads(Path(p).read_text())["images"]) for p in ref.splits.values())
        assert images == n  # the files on disk are the ones the record describes


def test_missing_coco_path_fails_before_any_model_with_its_name(tmp_path):
    missing = tmp_path / "nowhere" / "annotations.json"
    proc = subprocess.run([sys.executable, "-m", "vlmdet.cli", "retrain", "--preset", "smoke", "--workdir", str(tmp_path / "run"),
                           "--dataset", f"coco:{missing}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr
    assert not (tmp_path / "run" / "train").exists()  # failed before training started


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_the_flow_runs_with_each_family(family, tmp_path):
    """The successors' tiny models through the whole flow: their formats, processors and merges."""
    overrides = {**_overrides("unused"), "model.base": f"tiny:{family}", "model.family": family,
                 "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "lora.modules_to_save": []}
    if family == "qwen3_vl":  # 32 px per visual token
        overrides.update({"model.min_pixels": 64 * 32 * 32, "model.max_pixels": 256 * 32 * 32})
    summary = retrain(preset="smoke", workdir=str(tmp_path), threshold=0.0, overrides=overrides)
    assert summary["gate"]["passed"] and summary["published"]["kind"] == "local"
    config = json.loads((tmp_path / "published" / "config.json").read_text())
    assert config["model_type"] == family
    assert summary["merged_metrics"] is not None
