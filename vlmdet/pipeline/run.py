"""The run, written once: prepare_data -> train -> evaluate -> gate -> merge -> evaluate -> gate -> publish.

Three drivers run it: flows/retrain.py (a Prefect task a step: retries, caching, artifacts, persisted
results), `vlmdet train`/`evaluate` and benchmarks/nightly_run.py (vlmdet.pipeline.step.Plain: direct calls).
Each step is declared once (vlmdet.pipeline.steps); a driver is `driver(step, *args) -> (record, cached)`.
What this module owns, so that a change to it is one edit:

- the configuration, resolved once up front (`resolve`): preset + overrides, inputs checked before
  any data or GPU work, the check-run guard, and train.profile (auto: from the GPU's free memory).
  The resolved configuration is what every step gets and what WORKDIR/config.json records;
- the step sequence and its branches (`run`): the gate sees the champion measured on today's test
  images; a passing adapter is merged, the merged model measured and gated again, then published;
- the run summary (`RunSummary`, WORKDIR/summary.json, docs in DESIGN.md "Contracts").

No Prefect here: the library never imports it.
"""
from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from vlmdet.config.settings import RunConfig, guard_check_run, load_preset
from vlmdet.decide.gate import clears_threshold
from vlmdet.pipeline import steps
from vlmdet.pipeline.step import Step, resolve_token
from vlmdet.publishing.target import Target, resolve_target
from vlmdet.run import timeline, tracking
from vlmdet.run.keys import decision_settings, evaluation_key, source_stamp
from vlmdet.run.layout import RunLayout
from vlmdet.publishing.files import check_folder, hash_ahead
from vlmdet.run.records import (AdapterRef, DatasetRef, EvalReport, GateDecision, MergedRef, Publication, Record,
                            write_json)

__all__ = ["RunLayout", "Resolved", "Driver", "RunSummary", "configure", "resolve", "run", "trained"]

log = logging.getLogger(__name__)


# --- configuration ---------------------------------------------------------------------------------------------
def configure(preset: str, overrides: dict[str, Any] | None = None, threshold: float | None = None,
              dataset: str | None = None, check_base: bool = True) -> RunConfig:
    """The preset with the overrides (threshold / dataset: shortcuts for gate.threshold / data.dataset),
    and its inputs checked: a bad setting, dataset spec or base model fails here, in a second."""
    extra = dict(overrides or {})
    if threshold is not None:
        extra["gate.threshold"] = threshold
    if dataset is not None:
        extra["data.dataset"] = dataset
    config = load_preset(preset, extra)
    check_inputs(config, check_base)
    return config


def check_inputs(config: RunConfig, check_base: bool = True) -> None:
    """The dataset spec parses and model.base exists (a folder or a Hub repo, the HF cache when offline)
    and holds safetensors: a typo is a one-line error before any data is prepared or a GPU touched."""
    from vlmdet.data.sources import check_spec

    check_spec(config.data.dataset)
    if check_base and not config.model.base.startswith(("tiny:", "asset:")):  # built in-process / shipped in the package
        from vlmdet.modeling.load import check_model_source

        check_model_source(config.model.base, "model.base")


@dataclass(frozen=True)
class Resolved:
    config: RunConfig  # train.profile concrete: what every step runs with
    check_run: str | None = None  # why a check run publishes locally, if it was redirected

    @functools.cached_property
    def target(self) -> Target:
        """config.publish.target, parsed once: where the champion is read and what publishes."""
        return resolve_target(self.config)

    def to_dict(self) -> dict[str, Any]:
        """What `vlmdet retrain` hands the flow, so the flow runs what the command checked and resolved."""
        return {"config": self.config.to_dict(), "check_run": self.check_run}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Resolved":
        config = RunConfig.from_dict(d["config"])
        return cls(config, d.get("check_run"))


def resolve(preset: str, overrides: dict[str, Any] | None = None, threshold: float | None = None,
            dataset: str | None = None, free_gib: float | None | str = "query") -> Resolved:
    """The configuration the run uses, decided once: checked, guarded, the speed profile applied."""
    from vlmdet.config import profiles

    config = configure(preset, overrides, threshold, dataset)
    config, note = guard_check_run(config, set(overrides or {}))
    resolved = Resolved(profiles.resolve(config, free_gib), note)
    resolved.target  # noqa: B018 - a bad publish.target fails here, with the other settings
    return resolved


# --- the driver ------------------------------------------------------------------------------------------------
class Driver(Protocol):
    """Runs one declared step: `driver(step, *args, **kwargs) -> (record, cached)` (vlmdet.pipeline.step.Plain,
    flows/retrain.py). run_id names the publication; read_secret reads publish.token_secret where the driver has
    a secret store."""

    run_id: str | None
    read_secret: Callable[[str], str | None] | None

    def __call__(self, step: Step, *args: Any, **kwargs: Any) -> tuple[Any, bool]: ...


# --- the summary -----------------------------------------------------------------------------------------------
def gate_summary(decision: GateDecision) -> dict[str, Any]:
    """The decision as summary.json's `gate`: every GateDecision field, the interval as one `ci` pair."""
    out = decision.to_dict()
    out["ci"] = [decision.ci_low, decision.ci_high] if decision.p_better is not None else None
    return out


@dataclass
class RunSummary(Record):
    """WORKDIR/summary.json; `metrics`, `gate`, `published` and `adapter` are a contract (DESIGN.md)."""

    preset: str
    metrics: dict[str, float]
    gate: dict[str, Any]
    published: dict[str, Any] | None
    adapter: str
    base_metrics: dict[str, float] | None = None
    merged_metrics: dict[str, float] | None = None
    champion_metrics: dict[str, float] | None = None
    merged: str | None = None
    dataset: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    check_run: str | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)
    profile: str | None = None  # the train.profile the run resolved to (auto: chosen from the GPU)
    run_key: str = ""
    seconds: float = 0.0
    skipped: bool = False
    retrained: bool = True
    from_cache: bool = False
    skip_reason: str | None = None
    tracker: dict[str, Any] = field(default_factory=dict)  # where the run is in train.report_to's tracker
    # where each step child's seconds went (vlmdet.run.timeline), and the same as a picture
    timeline: list[dict[str, Any]] = field(default_factory=list)
    timeline_picture: str | None = None

    @classmethod
    def build(cls, config: RunConfig, data: DatasetRef, adapter: AdapterRef, report: EvalReport,
              decision: GateDecision, **parts: Any) -> "RunSummary":
        def metrics(r: EvalReport | None) -> dict[str, float] | None:
            return r.metrics() if r else None

        merged: MergedRef | None = parts.pop("merged", None)
        published: Publication | None = parts.pop("published", None)
        return cls(preset=config.name, metrics=report.metrics(), gate=gate_summary(decision),
                   published=published.to_dict() if published else None, adapter=adapter.path,
                   base_metrics=metrics(parts.pop("base_report", None)),
                   merged_metrics=metrics(parts.pop("merged_report", None)),
                   champion_metrics=metrics(parts.pop("champion_report", None)),
                   merged=merged.path if merged else None,
                   dataset={"source": data.source, "fingerprint": data.fingerprint, "counts": data.counts,
                            "quarantined": data.quarantine_counts, "revision": data.revision},
                   training={k: getattr(adapter, k) for k in ("global_step", "losses", "loss_curve", "resumed_from",
                                                              "steps_run", "selected_step", "validation")},
                   provenance=adapter.provenance,
                   evaluation={"split": report.split, "images": report.num_images,
                               "parse_failures": report.parse_failures, "predictions": report.predictions,
                               "preview": report.preview},
                   profile=config.train.profile, **parts)


def _load_last(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:  # unreadable: treat as no previous success rather than failing every night
        return None


# --- the run ---------------------------------------------------------------------------------------------------
def trained(config: RunConfig, layout: RunLayout, driver: Driver,
            fresh: bool = False) -> tuple[DatasetRef, AdapterRef, bool]:
    """The prepared data, the adapter trained on it, and whether the adapter came from the driver's cache
    (`vlmdet train`, and the start of `run`). The dataset's stamp (a Hub dataset's commit) is read once: the
    cache key and the data loaded name one revision."""
    data, _ = driver(steps.PREPARE, config, layout, stamp=source_stamp(config.data.dataset))
    adapter, cached = driver(steps.TRAIN, data, config, layout, fresh=fresh)
    return data, adapter, cached


def run(resolved: Resolved, layout: RunLayout, driver: Driver, force: bool = False,
        logger: logging.Logger | logging.LoggerAdapter = log) -> RunSummary:
    """The whole run; writes WORKDIR/summary.json whatever the gate decides and raises when a step fails.

    force: train from the base in a folder of this run's own even when nothing changed; without it a
    run whose training and evaluation all came from the driver's cache, already decided under the same
    gate and publish settings, is skipped and says so."""
    config, started = resolved.config, time.time()
    target = resolved.target
    write_json(layout.config_file, config.to_dict())
    data, adapter, train_cached = trained(config, layout, driver, fresh=force)
    report, eval_cached = driver(steps.EVALUATE, adapter.path, data, config, layout, name="adapter")
    cached = [train_cached, eval_cached]
    base_report = None
    if config.eval.eval_base:
        base_report, base_cached = driver(steps.EVALUATE, adapter.base_model, data, config, layout, name="base")
        cached.append(base_cached)
    from_cache, key = all(cached), evaluation_key(config, data.fingerprint)

    # last_success.json says what a cache cannot: that these cached results were already *decided*
    # under the same gate and publish settings. The gate itself is never cached: the champion at the
    # target changes outside this run, and the token must not feed a key.
    last = _load_last(layout.last_success_file)
    if (from_cache and not force and last and last.get("run_key") == key
            and last.get("decision_settings") == decision_settings(config)):
        logger.info("nothing new since the run of %s (same data %s, configuration and base model): training and "
                    "evaluation came from the cache and were already decided; pass force=True to retrain.",
                    last.get("finished"), data.fingerprint[:12])
        summary = RunSummary.from_dict(dict(
            last["summary"], skipped=True, retrained=False,
            skip_reason=f"data, configuration and base model unchanged since {last.get('finished')} "
                        "(train and evaluate results from Prefect's cache)"))
        write_json(layout.summary_file, summary.to_dict())
        return summary
    if from_cache:
        logger.info("training and evaluation came from the cache; deciding again (gate or publish settings "
                    "changed, or the last run on them did not finish)")

    # Like with like: the champion's detections on today's test split (evaluated again when its card's
    # numbers come from other data), so the gate compares both models on the same images. Below the
    # threshold no comparison is needed.
    token = resolve_token(config, driver.read_secret)
    champion, _ = driver(steps.FIND_CHAMPION, config, layout, token, target=target)
    champion_report = None
    if clears_threshold(report, config.gate):
        champion_report = steps.measure_champion(
            champion, report, config,
            fetch=lambda c, only: driver(steps.FETCH_CHAMPION, c, config, layout, token, predictions_only=only,
                                          target=target)[0],
            evaluate_with=lambda model, cfg: driver(steps.EVALUATE, model, data, cfg, layout, name="champion")[0])
    judged = dict(champion=champion, champion_report=champion_report, dataset=data)
    decision, _ = driver(steps.GATE, report, config, layout, name="adapter", **judged)
    merged = merged_report = published = None
    if decision.passed:
        # Held from the merge to the publication: no other run's merge removes this run's merged folder.
        with layout.holding(layout.merge_dir(adapter, data, config)):
            merged, _ = driver(steps.MERGE, adapter, data, config, layout)
            # The gate measured base + adapter (4-bit base under qlora); what gets published is the adapter
            # merged into unquantized weights. Measure that too, and publish only if it still clears the gate.
            # This process's one full read of the merged bytes runs beside that evaluation.
            hashing = hash_ahead(merged)
            merged_report, _ = driver(steps.EVALUATE, merged.path, data, config, layout, name="merged")
            hashing.join()
            check_folder(merged, "gating it")  # what was measured is what the merge pinned, and publish checks
            decision, _ = driver(steps.GATE, merged_report, config, layout, name="merged", **judged)
            if decision.passed:
                published, _ = driver(steps.PUBLISH, merged, merged_report, data, adapter, decision, config, layout,
                                      token, run_id=driver.run_id, target=target)
    if not published:
        logger.info("gate closed: %s; nothing published", decision.reason)

    summary = RunSummary.build(config, data, adapter, report, decision, base_report=base_report, merged=merged,
                               merged_report=merged_report, champion_report=champion_report, published=published,
                               check_run=resolved.check_run, run_key=key, seconds=round(time.time() - started, 1),
                               retrained=not train_cached, from_cache=from_cache)
    summary.timeline = timeline.collect(layout.root, since=started)
    summary.timeline_picture = timeline.draw(summary.timeline, layout.root / "timeline.png",
                                             title=f"{config.name}: where the run's seconds went")
    summary.tracker = tracking.log_run(summary, config)  # the mAP, gate and publication beside the loss curve
    write_json(layout.summary_file, summary.to_dict())
    write_json(layout.last_success_file, {"run_key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                          "summary": summary.to_dict(), "decision_settings": decision_settings(config)})
    return summary
