"""The publication gate: a pure decision from the new model's metrics and the published champion's.

Publish only when the new metric clears the threshold AND beats the champion (the model now at the
target) by at least `min_delta` on the same evaluation data. A champion measured on other data
(another fingerprint or split) gives numbers that cannot be compared, so the gate says so and falls
back to the threshold alone rather than blocking forever or replacing on a meaningless comparison.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from vlmdet.config import GateConfig
from vlmdet.records import EvalReport, GateDecision


@dataclass
class Champion:
    """What the target says about the model published there now (read from its card)."""

    metrics: dict[str, float]  # map / map50 / map75, those the card holds
    data_fingerprint: str = ""  # fingerprint of the data the metrics were measured on ("" = unknown)
    split: str = ""
    source: str = ""  # where it was read: a folder or repo@revision, for the reason text
    run_id: str = ""
    extra: dict = field(default_factory=dict)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def decide(report: EvalReport, cfg: GateConfig, champion: Champion | None) -> GateDecision:
    """Decide whether `report`'s model may be published; the reason names both numbers."""
    metric = cfg.metric
    value = float(getattr(report, metric))
    base = dict(threshold=cfg.threshold, metric=metric, value=value, min_delta=cfg.min_delta)
    champ_value = champion.metrics.get(metric) if champion else None
    champ_fields = dict(
        champion=champ_value,
        champion_data_fingerprint=champion.data_fingerprint if champion else None,
        champion_source=champion.source if champion else None,
    )
    if math.isnan(value):
        return GateDecision(passed=False, reason=f"{metric} is NaN (evaluation produced no score); not publishing.",
                            **base, **champ_fields)
    if value < cfg.threshold:
        return GateDecision(passed=False, reason=f"{metric}={value:.4f} is below the threshold {cfg.threshold:.4f}.",
                            **base, **champ_fields)
    above = f"{metric}={value:.4f} >= threshold {cfg.threshold:.4f}"
    if champion is None:
        return GateDecision(passed=True, reason=f"{above}; no champion published at the target yet.",
                            **base, **champ_fields)
    if champ_value is None:
        return GateDecision(passed=True, reason=f"{above}; the champion at {champion.source} records no {metric}, "
                            "so the threshold alone decides.", **base, **champ_fields)
    same_data = bool(report.data_fingerprint) and report.data_fingerprint == champion.data_fingerprint \
        and (not champion.split or champion.split == report.split)
    if not same_data:
        return GateDecision(
            passed=True, same_data=False,
            reason=(f"{above}; the champion ({metric}={_fmt(champ_value)}) was evaluated on different data "
                    f"(fingerprint {champion.data_fingerprint or 'unknown'}/{champion.split or '?'} vs "
                    f"{report.data_fingerprint or 'unknown'}/{report.split}), so the numbers are not comparable "
                    "and the threshold alone decides."),
            **base, **champ_fields)
    needed = champ_value + cfg.min_delta
    # A tiny epsilon: 0.1 + 0.2 style float noise must not flip an exact tie at min_delta.
    if value + 1e-12 >= needed:
        return GateDecision(
            passed=True, same_data=True,
            reason=(f"{above}; beats the champion {metric}={champ_value:.4f} by {value - champ_value:+.4f} "
                    f"(min_delta {cfg.min_delta:.4f}) on the same data."),
            **base, **champ_fields)
    return GateDecision(
        passed=False, same_data=True,
        reason=(f"{above}, but it does not beat the champion {metric}={champ_value:.4f} by min_delta "
                f"{cfg.min_delta:.4f} (difference {value - champ_value:+.4f}) on the same data."),
        **base, **champ_fields)


def decision_markdown(decision: GateDecision) -> str:
    """The decision as a small markdown table, for the Prefect artifact and the model card."""
    verdict = "PUBLISH" if decision.passed else "DO NOT PUBLISH"
    rows = [
        ("decision", verdict),
        (f"new {decision.metric}", _fmt(decision.value)),
        ("threshold", _fmt(decision.threshold)),
        (f"champion {decision.metric}", _fmt(decision.champion)),
        ("min_delta", _fmt(decision.min_delta)),
        ("champion data", getattr(decision, "champion_data_fingerprint", None) or "n/a"),
        ("champion read from", getattr(decision, "champion_source", None) or "n/a"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"### Gate: {verdict}\n\n| | |\n| --- | --- |\n{table}\n\n**Reason:** {decision.reason}\n"
