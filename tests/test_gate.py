"""The champion/challenger gate (vlmdet.gate.decide): every branch, and that the reason carries both numbers."""
from __future__ import annotations

import math

import pytest

from vlmdet.config import GateConfig
from vlmdet.gate import Champion, decide, decision_markdown
from vlmdet.records import EvalReport, GateDecision


def _report(map50: float, fp: str = "fp-a", split: str = "test") -> EvalReport:
    return EvalReport(map=map50 / 2, map50=map50, map75=map50 / 3, split=split, num_images=20, parse_failures=0,
                      predictions="p.json", data_fingerprint=fp)


def _champ(map50: float | None, fp: str = "fp-a", split: str = "test") -> Champion:
    metrics = {"map": 0.1} if map50 is None else {"map": 0.1, "map50": map50}
    return Champion(metrics=metrics, data_fingerprint=fp, split=split, source="hub:org/m@abc")


CFG = GateConfig(threshold=0.5, metric="map50", min_delta=0.02)


def test_below_threshold_is_closed_even_without_champion():
    d = decide(_report(0.49), CFG, None)
    assert not d.passed and d.value == 0.49 and d.threshold == 0.5
    assert "0.4900" in d.reason and "below the threshold 0.5000" in d.reason


def test_above_threshold_without_champion_passes():
    d = decide(_report(0.5), CFG, None)  # equal to the threshold counts as passing (>=)
    assert d.passed and d.champion is None and d.same_data is None
    assert "no champion" in d.reason


def test_not_better_than_champion_by_min_delta_is_closed():
    d = decide(_report(0.71), CFG, _champ(0.70))
    assert not d.passed and d.same_data is True
    assert d.champion == 0.70 and "0.7000" in d.reason and "0.7100" in d.reason and "does not beat" in d.reason


def test_better_than_champion_by_min_delta_passes():
    d = decide(_report(0.72), CFG, _champ(0.70))  # exactly min_delta better: float noise must not flip it
    assert d.passed and d.same_data is True and d.champion == 0.70
    assert "beats the champion" in d.reason


def test_worse_than_champion_is_closed_even_above_threshold():
    d = decide(_report(0.6), GateConfig(threshold=0.5, metric="map50", min_delta=0.0), _champ(0.9))
    assert not d.passed


@pytest.mark.parametrize("champ", [_champ(0.95, fp="fp-b"), _champ(0.95, split="val"), _champ(0.95, fp="")])
def test_champion_on_different_data_falls_back_to_threshold(champ):
    d = decide(_report(0.6), CFG, champ)
    assert d.passed and d.same_data is False and d.champion == 0.95
    assert "different data" in d.reason and "threshold alone" in d.reason
    assert d.champion_data_fingerprint == champ.data_fingerprint


def test_different_data_still_needs_the_threshold():
    assert not decide(_report(0.4), CFG, _champ(0.1, fp="fp-b")).passed


def test_champion_without_the_gated_metric_uses_threshold():
    d = decide(_report(0.6), CFG, _champ(None))
    assert d.passed and "records no map50" in d.reason


def test_metric_choice_is_respected():
    r = _report(0.9)  # map = 0.45
    assert not decide(r, GateConfig(threshold=0.5, metric="map"), None).passed
    assert decide(r, GateConfig(threshold=0.5, metric="map50"), None).passed


def test_nan_metric_never_passes():
    assert not decide(_report(math.nan), GateConfig(threshold=0.0), None).passed


def test_markdown_has_both_numbers_and_reason_and_round_trips():
    d = decide(_report(0.71), CFG, _champ(0.70))
    md = decision_markdown(d)
    assert "0.7100" in md and "0.7000" in md and d.reason in md and "DO NOT PUBLISH" in md
    assert GateDecision.from_dict(d.to_dict()) == d
