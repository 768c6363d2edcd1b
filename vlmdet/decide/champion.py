"""Getting the champion (the model now at the target) ready to be measured on today's test split.

The gate compares both models on the same images. A published model carries its own test
predictions (`eval/predictions.json`); when its card says they were measured on today's split of
the same prepared data they are reused as they are. Otherwise the model itself is fetched at the
revision its card was read at and evaluated again (the publish target fetches either one:
vlmdet.publishing.fetch_champion), with its own answer settings (family, pixel budget, prompt,
category, answer length) from its `vlmdet.json`, every one of them, since that is how it answers in
production. A champion lacking
one is never evaluated with today's (after a family or prompt change it would score ~0 and be
replaced): it is unreadable, and `needs_measuring` says so before anything is fetched.
"""
from __future__ import annotations

from vlmdet.config.settings import RunConfig
from vlmdet.modeling.carried import ANSWER_SETTINGS, answer_settings, held_answer_settings
from vlmdet.run.records import Champion, EvalReport


def needs_measuring(champion: Champion | None) -> bool:
    """Whether there is a champion to measure: none at an empty target, none that cannot be read
    (the gate closes on it, or replaces it by the threshold alone when asked to)."""
    return champion is not None and not champion.unreadable


def champion_config(champion: Champion, config: RunConfig) -> RunConfig:
    """Today's configuration with every one of the champion's own answer settings (vlmdet.modeling.carried:
    family, pixel budget, prompt, category, answer length, ...), to evaluate it. A champion lacking one
    is not judged by today's (after a family, prompt or category change it would score ~0 and be
    replaced); reading it already marked it unreadable (publishing.card), so this only guards the call."""
    missing = [key for key in ANSWER_SETTINGS if key not in held_answer_settings(champion.config)]
    if missing:
        raise ValueError(f"the champion at {champion.source} has no model settings {', '.join(missing)} in its "
                         "vlmdet.json (or no vlmdet.json); evaluating it with today's would judge it by an answer it "
                         "was not trained to give. Set gate.replace_unreadable_champion=true to replace it on purpose.")
    return answer_settings(champion.config, config)


REUSED = "published predictions of "  # EvalReport.model of a champion that was not evaluated again


def reuse_report(champion: Champion, report: EvalReport, predictions: str) -> EvalReport:
    """An EvalReport for the champion from its card's numbers and its published predictions."""
    m = champion.metrics
    return EvalReport(map=m.get("map", float("nan")), map50=m.get("map50", float("nan")),
                      map75=m.get("map75", float("nan")), split=champion.split, num_images=report.num_images,
                      parse_failures=0, predictions=predictions, model=REUSED + champion.source,
                      data_fingerprint=champion.data_fingerprint)


def was_evaluated(champion_report: EvalReport) -> bool:
    """True when the champion's report comes from an evaluation in this run, not from its publication."""
    return not champion_report.model.startswith(REUSED)
