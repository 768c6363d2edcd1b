"""The champion/challenger gate (vlmdet.decide.gate): every branch, the bootstrap it decides on, and what it shows."""
from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from data_fixtures import boxed_predictions, boxed_split
from vlmdet.config.settings import ConfigError, GateConfig, load_preset
from vlmdet.decide.gate import Champion, Comparison, compare, decide, decision_markdown, disagreement_picture
from vlmdet.run.records import EvalReport, GateDecision


def _report(map50: float, fp: str = "fp-a", split: str = "test", predictions: str = "p.json", n: int = 20) -> EvalReport:
    return EvalReport(map=map50 / 2, map50=map50, map75=map50 / 3, split=split, num_images=n, parse_failures=0,
                      predictions=predictions, data_fingerprint=fp)


def _champ(map50: float | None, fp: str = "fp-a", split: str = "test") -> Champion:
    metrics = {"map": 0.1} if map50 is None else {"map": 0.1, "map50": map50}
    return Champion(metrics=metrics, data_fingerprint=fp, split=split, source="hub:org/m@abc")


def _cmp(champion: float, challenger: float, p: float, evaluated: bool = True) -> Comparison:
    return Comparison(champion=champion, challenger=challenger, p_better=p, ci_low=-0.01, ci_high=0.05,
                      resamples=1000, images=120, champion_evaluated=evaluated)


CFG = GateConfig(threshold=0.5, metric="map50", min_probability=0.9)


def test_below_threshold_is_closed_even_when_certainly_better():
    d = decide(_report(0.49), CFG, _champ(0.2), _cmp(0.2, 0.49, 1.0))
    assert not d.passed and d.value == 0.49 and d.threshold == 0.5
    assert "0.4900" in d.reason and "below the threshold 0.5000" in d.reason


def test_only_a_target_without_champion_is_decided_by_the_threshold():
    d = decide(_report(0.5), CFG, None)  # equal to the threshold counts as passing (>=)
    assert d.passed and d.champion is None and d.same_data is None and d.p_better is None
    assert "no champion" in d.reason


@pytest.mark.parametrize("champ", [_champ(0.95, fp="fp-b"), _champ(0.95, split="val"), _champ(0.95, fp=""),
                                   _champ(None), _champ(0.1)])
def test_a_champion_not_measured_on_todays_images_is_never_replaced_on_a_guess(champ):
    """The old fallback (threshold alone for a champion on other data) let any model replace a better one."""
    d = decide(_report(0.6), CFG, champ)
    assert not d.passed and "not measured on today's test images" in d.reason
    assert d.champion_data_fingerprint == champ.data_fingerprint


def test_probability_at_the_level_passes_and_names_both_numbers_on_todays_images():
    d = decide(_report(0.81), CFG, _champ(0.95, fp="fp-old"), _cmp(0.70, 0.81, 0.9))
    assert d.passed and d.same_data is True and d.champion_evaluated
    assert d.champion == 0.70 and d.champion_recorded == 0.95 and d.p_better == 0.9 and d.images == 120
    for text in ("0.8100", "0.7000", "its card says 0.9500", "P(new better)=0.900", "[-0.0100, +0.0500]",
                 "1000 bootstrap resamples", "120 test images"):
        assert text in d.reason


def test_higher_point_value_but_probability_below_the_level_is_closed():
    d = decide(_report(0.72), CFG, _champ(0.70), _cmp(0.70, 0.72, 0.899, evaluated=False))
    assert not d.passed and "not reliably better" in d.reason and "P(new better)=0.899" in d.reason and "below the required 0.900" in d.reason
    assert "same 120 test images" in d.reason and not d.champion_evaluated


def test_worse_than_champion_on_the_same_images_is_closed():
    d = decide(_report(0.6), CFG, _champ(0.2, fp="fp-b"), _cmp(0.9, 0.6, 0.0))
    assert not d.passed and d.champion == 0.9


def test_metric_choice_is_respected():
    r = _report(0.9)  # map = 0.45
    assert not decide(r, GateConfig(threshold=0.5, metric="map"), None).passed
    assert decide(r, GateConfig(threshold=0.5, metric="map50"), None).passed


def test_nan_metric_never_passes():
    assert not decide(_report(math.nan), GateConfig(threshold=0.0), None).passed


@pytest.mark.parametrize("field,value", [("gate.min_probability", 1.5), ("gate.resamples", 10)])
def test_bad_gate_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        load_preset("smoke", {field: value})


def test_markdown_has_both_numbers_and_reason_and_round_trips():
    d = decide(_report(0.72), CFG, _champ(0.95), _cmp(0.70, 0.72, 0.5))
    md = decision_markdown(d)
    assert "0.7200" in md and "0.7000" in md and "0.9500" in md and d.reason in md and "DO NOT PUBLISH" in md
    assert "0.5000 (needs 0.9000)" in md and "[-0.0100, +0.0500]" in md
    assert GateDecision.from_dict(json.loads(json.dumps(d.to_dict()))) == d


# --- compare(): real predictions files on a real split, the picture of disagreements -------------------------

def _preds(tmp_path, name: str, hits: set[int]) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(boxed_predictions(hits))
    return str(path)


def test_compare_scores_both_models_on_the_same_images_and_draws_where_they_differ(tmp_path):
    gt = boxed_split(tmp_path)
    champion = _report(0.5, predictions=_preds(tmp_path, "champ", {1, 2, 3}), n=6)
    challenger = _report(1.0, predictions=_preds(tmp_path, "new", {1, 2, 3, 4, 5, 6}), n=6)
    cfg = GateConfig(threshold=0.5, resamples=200)
    comparison, _, _ = compare(challenger, champion, gt, cfg)
    # champion: its 3 misses score higher than its 3 hits, so precision is 1/4, 2/5, 3/6 at recall 1/6..1/2,
    # 0.5 once made monotone, over the 51 of 101 recall levels it reaches
    assert comparison.champion == pytest.approx(0.5 * 51 / 101, abs=1e-9) and comparison.challenger == pytest.approx(1.0)
    assert comparison.p_better > 0.9 and comparison.ci_low >= 0 and comparison.images == 6
    assert [d["image_id"] for d in comparison.disagreements] == [4, 5, 6]  # images 1-3 agree
    assert all(d["champion"] == 0 and d["challenger"] == pytest.approx(1) for d in comparison.disagreements)
    png = disagreement_picture(comparison, gt, champion, challenger, tmp_path / "gate" / "d.png", cell=120)
    with Image.open(png) as im:
        assert im.size == (240, 3 * (120 + 16))
    assert [d["file"] for d in comparison.disagreements] == ["im4.png", "im5.png", "im6.png"]
    d = decide(challenger, cfg, _champ(0.9, fp="fp-old"), comparison)
    assert d.passed and d.picture == png and "im5.png" in decision_markdown(d)


def test_compare_refuses_reports_on_different_splits(tmp_path):
    gt = boxed_split(tmp_path)
    with pytest.raises(ValueError, match="same test split"):
        compare(_report(1.0, n=6), _report(1.0, split="val", n=6), gt, CFG)


def test_the_card_of_a_replacement_shows_the_comparison_and_its_picture(tmp_path):
    from pubkit import records

    from vlmdet import publishing
    from vlmdet.config.settings import RunConfig

    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    (merged_dir / "config.json").write_text("{}")  # the publication copies the folder; no model needed here
    merged, report, dataset, adapter, _ = records(tmp_path, merged_dir, map50=0.81)
    comparison = _cmp(0.70, 0.81, 0.97)
    Image.new("RGB", (20, 10)).save(tmp_path / "d.png")
    comparison.picture = str(tmp_path / "d.png")
    decision = decide(report, CFG, _champ(0.95, fp="fp-old"), comparison)
    publishing.publish(merged, report, dataset, adapter, decision, RunConfig(name="smoke"), tmp_path)
    card = (tmp_path / "published" / "README.md").read_text()
    assert "### Compared with the model it replaced" in card
    assert ("On the same 120 test images (the previous model was evaluated again on this run's test split): map50 "
            "0.8100 against 0.7000") in card
    assert "[-0.0100, +0.0500] (95%)" in card and "97.0% of resamples (required: 90%)" in card
    assert (tmp_path / "published" / "assets" / "gate_disagreements.png").is_file()
    assert "](assets/gate_disagreements.png)" in card
    gate = json.loads((tmp_path / "published" / "vlmdet.json").read_text())["gate"]
    assert gate["p_better"] == 0.97 and gate["champion"] == 0.70 and gate["champion_recorded"] == 0.95


def test_the_champion_is_evaluated_with_its_own_answer_settings_on_todays_eval_settings():
    from vlmdet.decide.champion import champion_config

    today = load_preset("smoke", {"eval.batch_size": 3})
    theirs = load_preset("qwen2.5-vl-7b-nutrition").to_dict()
    cfg = champion_config(Champion(metrics={"map50": 0.9}, config=theirs), today)
    assert cfg.model.family == "qwen2_5_vl" and cfg.model.max_pixels == theirs["model"]["max_pixels"]
    assert cfg.model.prompt == theirs["model"]["prompt"]
    # its answer length (an answer setting) too; how today's run batches and where its data is stay today's
    assert cfg.eval.max_new_tokens == theirs["eval"]["max_new_tokens"] == 160 != today.eval.max_new_tokens
    assert cfg.eval.batch_size == 3 and cfg.data.dataset == today.data.dataset and cfg.model.base == today.model.base
    # No vlmdet.json: never today's settings (after a family or prompt change it would score ~0 and be replaced)
    with pytest.raises(ValueError, match="no model settings.*gate.replace_unreadable_champion"):
        champion_config(Champion(metrics={"map50": 0.9}, source="hub:org/m@abc"), today)


def test_a_champion_report_says_whether_it_was_evaluated_in_this_run(tmp_path):
    """A local champion's folder is both its card's source and the model path a fresh evaluation names."""
    from vlmdet.decide.champion import reuse_report, was_evaluated

    champ = Champion(metrics={"map50": 0.9}, data_fingerprint="fp-a", split="test", source=str(tmp_path),
                     kind="local", location=str(tmp_path))
    fresh = _report(0.8, predictions=str(tmp_path / "eval.json"))
    fresh.model = str(tmp_path)
    assert was_evaluated(fresh)
    reused = reuse_report(champ, _report(0.7), str(tmp_path / "eval" / "predictions.json"))
    assert not was_evaluated(reused) and reused.map50 == 0.9 and reused.split == "test"
