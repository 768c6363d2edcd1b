"""Each step of a run as a plain call into its run-folder place: what the Prefect tasks wrap (adding
retries, caching and artifacts) and what the CLI and the GPU benchmark run as they are.

Heavy steps (train, evaluate, merge) run in a child process (vlmdet.run.runner.run_step); each writes the
marker of its key beside its output (vlmdet.run.layout) once complete.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

from vlmdet.decide.champion import (champion_config, champion_model, needs_measuring, published_predictions, reuse_report,
                             was_evaluated)
from vlmdet.config.settings import RunConfig
from vlmdet.decide.gate import Champion, compare, decide, decision_markdown, disagreement_picture
from vlmdet.run.keys import source_revision, source_stamp, stamp_revision, write_marker
from vlmdet.run.layout import RunLayout
from vlmdet.run.records import AdapterRef, DatasetRef, EvalReport, GateDecision, MergedRef, Publication, atomic_write_text
from vlmdet.run.runner import OnProgress, plan_processes, run_step

log = logging.getLogger(__name__)


def prepare(config: RunConfig, layout: RunLayout, stamp: str | None = None) -> DatasetRef:
    """Materialize the dataset spec and prepare it (validate, quarantine, split, fingerprint).

    stamp: keys.source_stamp of the spec, read once by the caller so that a cache key and the data
    loaded name the same Hub revision (read here when not given)."""
    from vlmdet.data import materialize, prepare as prepare_raw

    spec = config.data.dataset
    stamp = stamp or source_stamp(spec)
    root = layout.data_dir(config)
    pinned = stamp_revision(stamp)  # a hub: source loads at the commit its stamp names; provenance records it
    raw = materialize(spec, root / "raw", seed=config.data.seed, image_size=tuple(config.data.image_size),
                      revision=pinned)
    return prepare_raw(raw, root / "prepared", config.data, source=spec,
                       revision=pinned or source_revision(spec, stamp))


def train(dataset: DatasetRef, config: RunConfig, layout: RunLayout, fresh: bool = False,
          env: dict[str, str] | None = None, on_progress: OnProgress | None = None) -> AdapterRef:
    """QLoRA fine-tuning in a child (accelerate launch over the visible GPUs); config already resolved.
    on_progress(fraction, text): the optimizer step of total and the loss while it trains (vlmdet.run.runner)."""
    processes, plan_env = plan_processes(config.train.num_processes)
    out = layout.train_dir(dataset, config, fresh)
    record = run_step("train", {"dataset": dataset.to_dict(), "config": config.to_dict(), "out": str(out)},
                      out / "step", timeout_s=config.train.timeout_s, num_processes=processes,
                      env={**plan_env, **(env or {})}, on_progress=on_progress)
    adapter = AdapterRef.from_dict(record)
    write_marker(out, layout.train_key(dataset, config, fresh))
    return adapter


def evaluate(model: str, dataset: DatasetRef, config: RunConfig, layout: RunLayout, name: str = "adapter",
             env: dict[str, str] | None = None, on_progress: OnProgress | None = None) -> EvalReport:
    """COCO mAP of `model` (adapter, merged or base) on config.eval.split, one process per GPU.
    on_progress(fraction, text): the images detected of total while it runs (vlmdet.run.runner)."""
    out = layout.eval_dir(name)
    processes, plan_env = plan_processes(config.eval.num_processes, setting="eval.num_processes")
    record = run_step("evaluate", {"model": model, "dataset": dataset.to_dict(), "config": config.to_dict(),
                                   "out": str(out), "split": config.eval.split}, out / "step",
                      timeout_s=config.eval.timeout_s, num_processes=processes, env={**plan_env, **(env or {})},
                      on_progress=on_progress)
    report = EvalReport.from_dict(record)
    write_marker(out, layout.eval_key(model, dataset, config, name))
    return report


def merge(adapter: AdapterRef, dataset: DatasetRef, config: RunConfig, layout: RunLayout,
          env: dict[str, str] | None = None) -> MergedRef:
    """The adapter merged into the unquantized base, checked against base + adapter on test images, into
    merged/<id> of its own (vlmdet.run.layout); pinned by its files' hashes (MergedRef). A complete merge of
    the same adapter is reused, never rewritten: a run next to this one may have gated it."""
    out = layout.merge_dir(adapter, dataset, config)
    with layout.merging(out):
        if layout.merge_done(adapter, dataset, config):
            return layout.merged_record(out)
        record = run_step("merge", {"adapter": adapter.to_dict(), "dataset": dataset.to_dict(),
                                    "config": config.to_dict(), "out": str(out), "split": config.eval.split},
                          layout.merge_step_dir, timeout_s=config.publish.merge_timeout_s, env=env)
        merged = MergedRef.from_dict(record)
        merged.save(layout.merge_record(out))  # after the folder: marks it complete
    return merged


def measure_champion(champion: Champion | None, report: EvalReport, config: RunConfig,
                     fetch: Callable[[Champion, bool], str | None],
                     evaluate_with: Callable[[str, RunConfig], EvalReport],
                     logger: logging.Logger | logging.LoggerAdapter = log) -> EvalReport | None:
    """The champion's detections on today's test split: its published ones when they were measured there,
    else a fresh evaluation of its model with its own answer settings. None without a champion, or with
    one that cannot be read (the gate then closes on it).

    fetch(champion, predictions_only): its published predictions' path (or None) / a folder with its model.
    """
    if not needs_measuring(champion):
        return None
    if champion.measured_on(report):
        path = fetch(champion, True)
        if path:
            logger.info("champion %s was measured on today's %s split (%s): reusing its published predictions",
                        champion.source, report.split, report.data_fingerprint[:12])
            return reuse_report(champion, report, path)
    logger.info("champion %s was measured on %s/%s, today's data is %s/%s: evaluating it again on today's images",
                champion.source, champion.data_fingerprint[:12] or "unknown", champion.split or "?",
                report.data_fingerprint[:12], report.split)
    return evaluate_with(fetch(champion, False), champion_config(champion, config))


def fetch_champion(champion: Champion, config: RunConfig, workdir: str, token: str | None = None,
                   predictions_only: bool = False) -> str | None:
    """The champion's published predictions (predictions_only) or a local folder with its model."""
    if predictions_only:
        return published_predictions(champion, workdir, config.publish.endpoint, token)
    return champion_model(champion, workdir, config.publish.endpoint, token)


def judge(report: EvalReport, config: RunConfig, layout: RunLayout, champion: Champion | None,
          champion_report: EvalReport | None, dataset: DatasetRef | None, name: str = "adapter") -> GateDecision:
    """Decide on `report` (the model called `name`) against the champion measured on the same images;
    the decision also goes to gate/NAME/decision.md (it outlives a Prefect server's artifact history)."""
    comparison = None
    if needs_measuring(champion) and champion_report is not None and dataset is not None:
        gt = dataset.splits[report.split]
        comparison, _, _ = compare(report, champion_report, gt, config.gate,
                                   champion_evaluated=was_evaluated(champion_report))
        disagreement_picture(comparison, gt, champion_report, report, layout.gate_dir(name) / "disagreements.png")
    decision = decide(report, config.gate, champion, comparison)
    if name != "adapter":
        decision.reason = f"{name} model: {decision.reason}"
    atomic_write_text(layout.gate_dir(name) / "decision.md", decision_markdown(decision))
    return decision


class PlainSteps:
    """The steps without an orchestrator (no caching, retries or artifacts): `vlmdet train`/`evaluate`
    and benchmarks/nightly_run.py. env(step_dir): extra environment of a step's child process."""

    last_cached = False  # nothing here is ever returned from a cache

    def env(self, step_dir) -> dict[str, str]:
        return {}

    def prepare_data(self, config: RunConfig, layout: RunLayout) -> DatasetRef:
        return prepare(config, layout)

    def train(self, dataset: DatasetRef, config: RunConfig, layout: RunLayout, fresh: bool = False) -> AdapterRef:
        return train(dataset, config, layout, fresh, env=self.env(layout.train_dir(dataset, config, fresh) / "step"))

    def evaluate(self, model: str, dataset: DatasetRef, config: RunConfig, layout: RunLayout,
                 name: str = "adapter") -> EvalReport:
        return evaluate(model, dataset, config, layout, name, env=self.env(layout.eval_dir(name) / "step"))

    def merge(self, adapter: AdapterRef, dataset: DatasetRef, config: RunConfig, layout: RunLayout) -> MergedRef:
        return merge(adapter, dataset, config, layout, env=self.env(layout.merge_step_dir))

    def resolve_token(self, config: RunConfig) -> str | None:
        return os.environ.get("HF_TOKEN") or None  # no Prefect Secret block without Prefect

    def find_champion(self, config: RunConfig, layout: RunLayout, token: str | None) -> Champion | None:
        from vlmdet.publishing import read_champion

        return read_champion(config, str(layout.root), token)

    def fetch_champion(self, champion: Champion, config: RunConfig, layout: RunLayout, token: str | None,
                       predictions_only: bool) -> str | None:
        return fetch_champion(champion, config, str(layout.root), token, predictions_only)

    def measure_champion(self, champion: Champion | None, report: EvalReport, dataset: DatasetRef, config: RunConfig,
                         layout: RunLayout, token: str | None) -> EvalReport | None:
        return measure_champion(champion, report, config,
                                lambda c, only: self.fetch_champion(c, config, layout, token, only),
                                lambda model, cfg: self.evaluate(model, dataset, cfg, layout, "champion"))

    def gate(self, report: EvalReport, config: RunConfig, layout: RunLayout, *, token: str | None,
             champion: Champion | None, champion_report: EvalReport | None, dataset: DatasetRef,
             name: str = "adapter") -> GateDecision:
        decision = judge(report, config, layout, champion, champion_report, dataset, name)
        log.info("gate %s %s: %s", name, "passed" if decision.passed else "closed", decision.reason)
        return decision

    def publish(self, merged: MergedRef, report: EvalReport, dataset: DatasetRef, adapter: AdapterRef,
                decision: GateDecision, config: RunConfig, layout: RunLayout, token: str | None) -> Publication:
        from vlmdet import publishing

        return publishing.publish(merged, report, dataset, adapter, decision, config, str(layout.root), token)
