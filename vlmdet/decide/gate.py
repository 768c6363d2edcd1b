"""The publication gate: publish only a model that clears the threshold and beats the champion on today's images.

The champion is the model now at the target. Its card's numbers may come from other data (the
data changed, which is why the flow retrained), so the flow evaluates the champion again on
today's test split, and `compare` scores both models' detections on the same images: a paired
bootstrap over test images (vlmdet.decide.bootstrap) gives the probability that the new model is better
and a 95% interval of the difference. `decide` then publishes only when the metric clears
`gate.threshold` and that probability reaches `gate.min_probability`. Only a target without a
champion (missing or empty) is decided by the threshold alone; a champion that could not be read,
or not measured on today's images, blocks publication rather than being replaced on a guess, unless
`gate.replace_unreadable_champion` asks for it by name (recorded in the decision, summary and card).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from vlmdet.decide.bootstrap import Matches, match, paired_bootstrap, per_image_ap
from vlmdet.config.settings import GateConfig
from vlmdet.run.records import CONTENT, TRANSPORT, Champion, EvalReport, GateDecision

__all__ = ["Champion", "Comparison", "compare", "decide", "clears_threshold", "decision_markdown",
           "disagreement_picture"]  # Champion lives in vlmdet.run.records; re-exported for older imports


@dataclass
class Comparison:
    """Both models on the same test images: the bootstrap and where they disagree most."""

    champion: float  # the champion's metric on today's images
    challenger: float
    p_better: float
    ci_low: float
    ci_high: float
    resamples: int
    images: int
    champion_evaluated: bool = True
    disagreements: list[dict] = field(default_factory=list)  # image_id, champion, challenger (per-image AP)
    picture: str | None = None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def compare(report: EvalReport, champion_report: EvalReport, gt: str | dict, cfg: GateConfig,
            champion_evaluated: bool = True, top: int = 4) -> tuple[Comparison, Matches, Matches]:
    """Paired bootstrap of `report` (challenger) against `champion_report` on the ground truth `gt`."""
    if champion_report.split != report.split or champion_report.num_images != report.num_images:
        raise ValueError(f"the champion was evaluated on {champion_report.num_images} {champion_report.split!r} "
                         f"images and the new model on {report.num_images} {report.split!r} images; the gate "
                         "compares both on the same test split")
    champ, chall = match(gt, champion_report.predictions), match(gt, report.predictions)
    b = paired_bootstrap(champ, chall, cfg.metric, cfg.resamples, cfg.seed, cfg.min_delta)
    a, c = per_image_ap(champ, cfg.metric), per_image_ap(chall, cfg.metric)
    order = sorted(range(len(a)), key=lambda i: (-abs(c[i] - a[i]), i))
    worst = [{"image_id": champ.image_ids[i], "champion": round(float(a[i]), 4), "challenger": round(float(c[i]), 4)}
             for i in order[:top] if c[i] != a[i]]
    return Comparison(champion=b.champion, challenger=b.challenger, p_better=b.p_better, ci_low=b.ci_low,
                      ci_high=b.ci_high, resamples=b.resamples, images=b.images, champion_evaluated=champion_evaluated,
                      disagreements=worst), champ, chall


def clears_threshold(report: EvalReport, cfg: GateConfig) -> bool:
    """Whether the champion needs measuring at all: a model below the threshold is refused without it."""
    value = float(getattr(report, cfg.metric))
    return not math.isnan(value) and value >= cfg.threshold


def decide(report: EvalReport, cfg: GateConfig, champion: Champion | None,
           comparison: Comparison | None = None) -> GateDecision:
    """Decide whether `report`'s model may be published; the reason names both models' numbers."""
    metric = cfg.metric
    value = float(getattr(report, metric))
    recorded = champion.metrics.get(metric) if champion else None
    fields = dict(threshold=cfg.threshold, metric=metric, value=value, min_delta=cfg.min_delta,
                  min_probability=cfg.min_probability, champion=recorded, champion_recorded=recorded,
                  champion_data_fingerprint=champion.data_fingerprint if champion else None,
                  champion_source=champion.source if champion else None,
                  # the publication is a compare-and-swap on exactly this (None: the target was empty)
                  champion_revision=(champion.revision or None) if champion else None,
                  champion_unreadable=(champion.unreadable or None) if champion else None,
                  champion_fault=(champion.fault or TRANSPORT) if champion and champion.unreadable else None)
    if comparison is not None:
        fields.update(champion=comparison.champion, same_data=True, champion_evaluated=comparison.champion_evaluated,
                      p_better=comparison.p_better, ci_low=comparison.ci_low, ci_high=comparison.ci_high,
                      resamples=comparison.resamples, images=comparison.images,
                      disagreements=comparison.disagreements, picture=comparison.picture)

    def closed(reason: str) -> GateDecision:
        return GateDecision(passed=False, reason=reason, **fields)

    if math.isnan(value):
        return closed(f"{metric} is NaN (evaluation produced no score); not publishing.")
    if value < cfg.threshold:
        return closed(f"{metric}={value:.4f} is below the threshold {cfg.threshold:.4f}.")
    above = f"{metric}={value:.4f} >= threshold {cfg.threshold:.4f}"
    if champion is None:
        return GateDecision(passed=True, reason=f"{above}; no champion published at the target yet.", **fields)
    if champion.unreadable:
        return _unreadable(champion, cfg, above, fields)
    if comparison is None:
        return closed(f"{above}, but the champion at {champion.source} (recorded {metric}={_fmt(recorded)}) was not "
                      "measured on today's test images, so the two cannot be compared; not replacing it on a guess.")
    where = (f"on today's {comparison.images} test images (champion evaluated again in this run; its card says "
             f"{_fmt(recorded)})" if comparison.champion_evaluated else f"on the same {comparison.images} test images")
    margin = f" by more than {cfg.min_delta:.4f}" if cfg.min_delta else ""
    stats = (f"new {metric}={comparison.challenger:.4f} vs champion {comparison.champion:.4f} {where}: difference "
             f"{comparison.challenger - comparison.champion:+.4f}, 95% CI [{comparison.ci_low:+.4f}, "
             f"{comparison.ci_high:+.4f}], P(new better{margin})={comparison.p_better:.3f} over "
             f"{comparison.resamples} bootstrap resamples")
    if comparison.p_better >= cfg.min_probability:
        return GateDecision(passed=True, reason=f"{above}; {stats}, at least the required {cfg.min_probability:.3f}.",
                            **fields)
    return closed(f"{above}, but not reliably better than the champion: {stats}, below the required "
                  f"{cfg.min_probability:.3f}.")


def _unreadable(champion: Champion, cfg: GateConfig, above: str, fields: dict) -> GateDecision:
    """A model is at the target but cannot be read or measured: closed, unless replacing it is asked for.

    Only a content fault can be replaced on purpose: the target answered and what it holds is not a
    model this vlmdet can judge. A transport fault (5xx, timeout, dropped connection, 401/403, a folder
    the worker may not list) says nothing about the model, which may be healthy: the setting never
    applies to it. Replacing also needs the revision that was seen (the publication is a
    compare-and-swap on it).
    """
    where = f"the model at {champion.source or champion.location} cannot be read: {champion.unreadable}"
    if champion.fault != CONTENT:  # "" with a reason counts as transport: fail closed
        return GateDecision(passed=False, reason=f"{above}, but {where}. The target could not be read, which says "
                            "nothing about the model there; nothing was replaced (gate.replace_unreadable_champion "
                            "applies only to a champion that was read and cannot be judged). Run again when the "
                            "target answers, or fix the token or permission.", **fields)
    if not cfg.replace_unreadable_champion:
        return GateDecision(passed=False, reason=f"{above}, but {where}. Nothing was replaced. Fix the target, or set "
                            "gate.replace_unreadable_champion=true to replace it on purpose.", **fields)
    if not champion.revision:
        return GateDecision(passed=False, reason=f"{above}, but {where}. gate.replace_unreadable_champion=true, but no "
                            "revision of the target could be read to replace on purpose; nothing was replaced.",
                            **fields)
    return GateDecision(passed=True, replaced_unreadable=True,
                        reason=f"{above}; {where}; replacing it on purpose (gate.replace_unreadable_champion=true, "
                               f"revision {champion.revision}).", **fields)


def decision_markdown(decision: GateDecision) -> str:
    """The decision as a small markdown table, for the Prefect artifact and the model card."""
    verdict = "PUBLISH" if decision.passed else "DO NOT PUBLISH"
    ci = (f"[{decision.ci_low:+.4f}, {decision.ci_high:+.4f}]" if decision.ci_low is not None
          and decision.ci_high is not None else "n/a")
    rows = [
        ("decision", verdict),
        (f"new {decision.metric}", _fmt(decision.value)),
        ("threshold", _fmt(decision.threshold)),
        (f"champion {decision.metric} on the same images", _fmt(decision.champion) if decision.same_data else "n/a"),
        (f"champion {decision.metric} on its card", _fmt(decision.champion_recorded)),
        ("difference, 95% CI", ci),
        ("P(new better)", f"{_fmt(decision.p_better)} (needs {_fmt(decision.min_probability)})"
         if decision.p_better is not None else "n/a"),
        ("bootstrap", f"{decision.resamples} resamples of {decision.images} images" if decision.resamples else "n/a"),
        ("min_delta", _fmt(decision.min_delta)),
        ("champion data", decision.champion_data_fingerprint or "n/a"),
        ("champion read from", decision.champion_source or "n/a"),
        ("champion revision", decision.champion_revision or "none (target missing or empty)"),
    ]
    if decision.champion_unreadable:
        rows.append(("champion unreadable", decision.champion_unreadable))
    if decision.replaced_unreadable:
        rows.append(("replaced on purpose", "yes: gate.replace_unreadable_champion=true"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    text = f"### Gate: {verdict}\n\n| | |\n| --- | --- |\n{table}\n\n**Reason:** {decision.reason}\n"
    if decision.disagreements:
        lines = "\n".join(f"| {d.get('file', d['image_id'])} | {d['champion']:.4f} | {d['challenger']:.4f} |"
                          for d in decision.disagreements)
        text += (f"\nImages where the two disagree most (per-image {decision.metric}):\n\n"
                 f"| image | champion | new |\n| --- | --- | --- |\n{lines}\n")
    return text


def disagreement_picture(comparison: Comparison, gt_path: str | Path, champion_report: EvalReport,
                         report: EvalReport, out: str | Path, cell: int = 240) -> str | None:
    """Champion (left) and new model (right) on the images they disagree on most, as one PNG.

    Green: ground truth; red: each model's boxes with scores. Fills in each disagreement's file name.
    """
    import json

    from PIL import Image, ImageDraw

    from vlmdet.data.images import open_image
    from vlmdet.formats import Box
    from vlmdet.data.draw import draw
    from vlmdet.data.samples import load_split

    if not comparison.disagreements:
        return None
    samples = {s.image_id: s for s in load_split(gt_path)[0]}

    def boxes(path: str, image_id) -> list[Box]:
        return [Box(p["bbox"][0], p["bbox"][1], p["bbox"][0] + p["bbox"][2], p["bbox"][1] + p["bbox"][3],
                    score=p["score"]) for p in json.loads(Path(path).read_text()) if p["image_id"] == image_id]

    label_h = 16
    sheet = Image.new("RGB", (2 * cell, len(comparison.disagreements) * (cell + label_h)), "white")
    pen = ImageDraw.Draw(sheet)
    for row, d in enumerate(comparison.disagreements):
        s = samples[d["image_id"]]
        d["file"] = Path(s.file).name
        image = open_image(s.file)
        y = row * (cell + label_h)
        for col, (name, rep, score) in enumerate((("champion", champion_report, d["champion"]),
                                                   ("new", report, d["challenger"]))):
            im = draw(image, boxes(rep.predictions, s.image_id), s.boxes)
            im.thumbnail((cell - 4, cell - 4))
            pen.text((col * cell + 4, y + 2), f"{name}: {score:.2f}  {d['file']}", fill="black")
            sheet.paste(im, (col * cell + (cell - im.width) // 2, y + label_h))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    comparison.picture = str(Path(out).resolve())
    return comparison.picture
