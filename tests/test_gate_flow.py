"""The gate inside the retrain flow, on the shipped smoke base: real training, real evaluations, real decisions.

One champion is trained and published once for the module (the smoke base learns: base mAP50 below
the threshold, fine-tuned above it); challengers trained for a few steps then meet it at its
target: on the same test images (its published predictions are reused) and on other data (it is
evaluated again on today's images). Neither may replace it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.retrain import retrain

pytestmark = pytest.mark.usefixtures("prefect_harness")

# The smoke preset, shortened: fewer images and steps (the smoke base still learns the task), 500 resamples.
SMOKE = {"data.dataset": "synth:240", "train.max_steps": 100, "train.save_steps": 1000, "eval.preview_images": 2,
         "publish.token_secret": "", "gate.resamples": 500}
WEAK = {"train.max_steps": 4, "eval.eval_base": False}  # a challenger that barely trained


@pytest.fixture(scope="module")
def champion_run(tmp_path_factory, prefect_harness):
    wd = tmp_path_factory.mktemp("champion")
    target = wd / "target"
    summary = retrain(preset="smoke", workdir=str(wd), overrides={**SMOKE, "publish.target": f"local:{target}"})
    return target, summary


def _meta(target: Path) -> dict:
    return json.loads((target / "vlmdet.json").read_text())


@pytest.mark.slow
def test_the_smoke_base_learns_and_the_first_model_is_published(champion_run):
    target, s = champion_run
    assert s["base_metrics"]["map50"] < 0.5 <= s["metrics"]["map50"]
    assert s["gate"]["passed"] and s["published"]["target"] == str(target)
    assert s["gate"]["p_better"] is None and "no champion" in s["gate"]["reason"]
    assert s["champion_metrics"] is None and not (Path(s["adapter"]).parents[2] / "eval" / "champion").exists()
    # the publication carries its test predictions for the next gate
    assert (target / "eval" / "predictions.json").read_text() == Path(s["evaluation"]["predictions"]).parent.parent.joinpath(
        "merged", "predictions.json").read_text()


@pytest.mark.slow
def test_a_better_champion_on_the_same_images_keeps_its_place(champion_run, tmp_path):
    target, first = champion_run
    before = _meta(target)["run_id"]
    s = retrain(preset="smoke", workdir=str(tmp_path), threshold=0.0,
                overrides={**SMOKE, **WEAK, "publish.target": f"local:{target}"})
    g = s["gate"]
    assert s["dataset"]["fingerprint"] == first["dataset"]["fingerprint"]
    assert not g["passed"] and s["published"] is None and s["merged"] is None and _meta(target)["run_id"] == before
    # compared on the same images through the champion's published predictions, not evaluated again;
    # their AP computed for the bootstrap is the champion's pycocotools number
    assert g["champion_evaluated"] is False and not (tmp_path / "eval" / "champion").exists()
    assert g["champion"] == pytest.approx(first["merged_metrics"]["map50"], abs=1e-6)
    assert g["value"] < g["champion"] and g["p_better"] < 0.9 and g["ci"][0] < 0
    assert g["images"] == first["evaluation"]["images"] and g["resamples"] == 500
    assert f"{g['value']:.4f}" in g["reason"] and f"{g['champion']:.4f}" in g["reason"]


@pytest.mark.slow
def test_a_champion_measured_on_other_data_is_evaluated_again_on_todays_images(champion_run, tmp_path):
    target, first = champion_run
    s = retrain(preset="smoke", workdir=str(tmp_path), threshold=0.0,
                overrides={**SMOKE, **WEAK, "data.seed": 1, "publish.target": f"local:{target}"})
    g = s["gate"]
    assert s["dataset"]["fingerprint"] != first["dataset"]["fingerprint"]
    assert g["champion_evaluated"] is True and (tmp_path / "eval" / "champion" / "predictions.json").is_file()
    assert g["champion_recorded"] == pytest.approx(first["merged_metrics"]["map50"])  # its card: other data
    assert g["champion"] == pytest.approx(s["champion_metrics"]["map50"], abs=1e-6)  # today's images
    assert g["champion"] >= 0.5 > s["metrics"]["map50"] == g["value"]
    for text in (f"new map50={g['value']:.4f}", f"champion {g['champion']:.4f}", "evaluated again",
                 f"its card says {g['champion_recorded']:.4f}"):
        assert text in g["reason"]
    assert not g["passed"] and s["published"] is None
    assert g["picture"] and Path(g["picture"]).is_file() and g["disagreements"]
    assert g["reason"] in (tmp_path / "gate" / "adapter" / "decision.md").read_text()


@pytest.mark.slow  # ~70 s on 2 cores: one training, two evaluations and a merge, each a child process
def test_a_merged_model_worse_than_its_adapter_is_not_published(tiny_model, tmp_path, monkeypatch):
    """The adapter clears the gate; the merged model (what would be published) is measured below it."""
    import vlmdet.pipeline.steps as runsteps

    real = runsteps.run_step

    def run_step(step, request, *args, **kwargs):  # the evaluation child runs; its numbers are replaced
        record = real(step, request, *args, **kwargs)
        if step == "evaluate":
            record["map50"] = {"adapter": 0.8, "merged": 0.3}[Path(request["out"]).name]
        return record

    monkeypatch.setattr(runsteps, "run_step", run_step)
    overrides = {"model.base": tiny_model, "data.dataset": "synth:16", "train.max_steps": 2, "train.per_device_batch": 2,
                 "train.save_steps": 50, "eval.batch_size": 8, "eval.max_new_tokens": 8, "eval.eval_base": False,
                 "eval.preview_images": 0, "publish.token_secret": ""}
    s = retrain(preset="smoke", workdir=str(tmp_path), threshold=0.5, overrides=overrides)
    assert s["metrics"]["map50"] == 0.8 and s["merged_metrics"]["map50"] == 0.3 and s["merged"]
    assert not s["gate"]["passed"] and s["published"] is None and not (tmp_path / "published").exists()
    assert s["gate"]["reason"] == "merged model: map50=0.3000 is below the threshold 0.5000."
