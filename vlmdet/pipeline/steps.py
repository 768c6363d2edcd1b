"""Every step of the run, each declared once (vlmdet.pipeline.step.Step): its call, its cache key and
done-check over the run folder (vlmdet.run.layout), its child process, its retry policy, and the line and
artifacts it shows. The drivers run these declarations as they are: `Plain` calls them, flows/retrain.py
makes a Prefect task of each (tasks/).

Heavy steps (train, evaluate, merge) run in a child (`python -m vlmdet.pipeline.child`, vlmdet.run.runner);
the child's function is declared with the step (`child=`). Each writes the marker of its key beside its
output once complete, so a cache is trusted only while the folder still holds what the key produced.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from vlmdet.config.settings import ConfigError, RunConfig
from vlmdet.data.errors import DataError
from vlmdet.pipeline.show import image_markdown
from vlmdet.pipeline.step import Retry, Show, Step
from vlmdet.run.keys import source_revision, source_stamp, stamp_revision, write_marker
from vlmdet.run.layout import RunLayout
from vlmdet.run.records import (AdapterRef, Champion, DatasetRef, EvalReport, GateDecision, MergedRef, Publication,
                                atomic_write_text)
from vlmdet.run.runner import OnProgress, OutOfMemory, StepFailed, plan_processes, run_step
from vlmdet.run.timeline import phase

if TYPE_CHECKING:
    from vlmdet.publishing.target import Target

log = logging.getLogger(__name__)


def _transient() -> tuple[type[BaseException], ...]:
    from vlmdet.publishing.errors import TransientPublishError

    return (TransientPublishError,)


# --- prepare_data ----------------------------------------------------------------------------------------------
def prepare(config: RunConfig, layout: RunLayout, stamp: str | None = None) -> DatasetRef:
    """Materialize the dataset spec and prepare it (validate, quarantine, split, fingerprint) into
    WORKDIR/data/<data_key>: runs on different data never read each other's files.

    stamp: keys.source_stamp of the spec, read once by the run so that the cache key and the data loaded
    name the same Hub revision (read here when not given)."""
    from vlmdet.data import materialize, prepare as prepare_raw

    spec = config.data.dataset
    stamp = stamp or source_stamp(spec)
    root = layout.data_dir(config)
    pinned = stamp_revision(stamp)  # a hub: source loads at the commit its stamp names; provenance records it
    raw = materialize(spec, root / "raw", seed=config.data.seed, image_size=tuple(config.data.image_size),
                      revision=pinned)
    return prepare_raw(raw, root / "prepared", config.data, source=spec,
                       revision=pinned or source_revision(spec, stamp))


def _prepare_shows(ref: DatasetRef, a: dict[str, Any]) -> list[Show]:
    shows = [Show("dataset-counts", "table", [{"split": s, **c} for s, c in ref.counts.items()],
                  f"Prepared {ref.source}, fingerprint {ref.fingerprint[:12]}")]
    if ref.quarantine_counts:
        rows = "\n".join(f"| {reason} | {n} |" for reason, n in sorted(ref.quarantine_counts.items()))
        examples = "\n".join(f"- `{q['file']}`: {q['reason']} {q.get('detail', '')}" for q in ref.quarantine[:20])
        shows.append(Show("dataset-quarantine", "markdown",
                          f"## Quarantined\n\n| reason | count |\n|---|---|\n{rows}\n\n{examples}"))
    return shows


PREPARE = Step(
    "prepare_data", prepare, cache_days=30,
    key=lambda config, layout, stamp: layout.prepare_key(config, stamp or source_stamp(config.data.dataset)),
    done=lambda config, layout: layout.prepared_exists(config),
    # a missing path or data with nothing usable fails the same way every time; a Hub download cut off or a
    # full disk freed by someone is worth another try
    retry=Retry(attempts=2, delays=(30,), when=(Exception,), unless=(DataError, ConfigError)),
    says=lambda ref, a: "{}: {} images, fingerprint {}".format(
        ref.source, ", ".join(f"{split} {c['images']}" for split, c in ref.counts.items()), ref.fingerprint[:12]),
    shows=_prepare_shows)


# --- train -----------------------------------------------------------------------------------------------------
def train(dataset: DatasetRef, config: RunConfig, layout: RunLayout, fresh: bool = False,
          env: dict[str, str] | None = None, on_progress: OnProgress | None = None) -> AdapterRef:
    """QLoRA fine-tuning in a child (accelerate launch over the visible GPUs); config already resolved.

    fresh: start from the base even where this configuration trained before (a forced rerun trains in a
    folder named by its run); a retry of the same run still resumes its own checkpoints.
    on_progress(fraction, text): the optimizer step of total and the loss while it trains (vlmdet.run.runner)."""
    processes, plan_env = plan_processes(config.train.num_processes)
    out = layout.train_dir(dataset, config, fresh)
    try:
        record = run_step("train", {"dataset": dataset.to_dict(), "config": config.to_dict(), "out": str(out)},
                          out / "step", timeout_s=config.train.timeout_s, num_processes=processes,
                          env={**plan_env, **(env or {})}, on_progress=on_progress)
    except OutOfMemory as err:
        if config.train.per_device_batch > 1:
            raise  # retried with half the batch (TRAIN.retry)
        raise StepFailed("train", f"{err} Already at per_device_batch=1: not retrying.", kind="oom") from None
    adapter = AdapterRef.from_dict(record)
    write_marker(out, layout.train_key(dataset, config, fresh))
    return adapter


def _train_child(req: dict[str, Any]) -> dict[str, Any]:
    with phase("imports"):  # torch, transformers, TRL, PEFT: seconds before any work
        from vlmdet.training.train import train as train_adapter

    return train_adapter(DatasetRef.from_dict(req["dataset"]), RunConfig.from_dict(req["config"]), req["out"]).to_dict()


def halved_batch(arguments: dict[str, Any], attempt: int) -> tuple[dict[str, Any], str | None]:
    """Attempt 2+ after an out-of-memory: the same effective batch in smaller pieces (so the same key)."""
    config: RunConfig = arguments["config"]
    if attempt <= 1 or config.train.per_device_batch == 1:
        return arguments, None
    config = config.override({"train.per_device_batch": max(1, config.train.per_device_batch // 2),
                              "train.grad_accum": config.train.grad_accum * 2})
    return dict(arguments, config=config), (f"retrying after out of GPU memory with per_device_batch="
                                            f"{config.train.per_device_batch} grad_accum={config.train.grad_accum}")


def _train_says(adapter: AdapterRef, a: dict[str, Any]) -> str:
    return (f"adapter at {adapter.path} after {adapter.global_step} steps"
            + (f" (resumed from {adapter.resumed_from})" if adapter.resumed_from else ""))


def _train_shows(adapter: AdapterRef, a: dict[str, Any]) -> list[Show]:
    losses = adapter.losses
    if not losses:
        return []
    rows = adapter.validation.get("checkpoints") or []
    table = ""
    if any("val_loss" in r for r in rows):
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        body = "\n".join(f"| {r['step']}{' (kept)' if r['step'] == adapter.selected_step else ''} "
                         f"| {fmt(r.get('val_loss'))} | {fmt(r.get('val_map50'))} | {fmt(r.get('val_map'))} |"
                         for r in rows)
        table = f"| checkpoint | val loss | val mAP50 | val mAP |\n|---|---|---|---|\n{body}\n\n"
    return [Show("training", "markdown",
                 f"## Training\n\n- steps: {adapter.global_step}\n- loss: {losses[0]:.4f} -> {losses[-1]:.4f}\n"
                 f"- adapter: `{adapter.path}`\n- resumed from: {adapter.resumed_from or 'no'}\n"
                 f"- checkpoint kept: {adapter.selected_step} ({adapter.validation.get('rule', 'n/a')})\n\n"
                 + table + image_markdown(adapter.loss_curve, "loss curve"))]


TRAIN = Step(
    "train", train, child=_train_child,
    # the folder is named by keys.training_key (data fingerprint, base, LoRA and training settings)
    key=lambda dataset, config, layout, fresh: layout.train_key(dataset, config, fresh),
    done=lambda dataset, config, layout, fresh: layout.train_done(dataset, config, fresh),
    child_dir=lambda dataset, config, layout, fresh: layout.train_dir(dataset, config, fresh) / "step",
    # an ordinary failure is not retried here: a flow-run retry resumes from the last checkpoint of the
    # same folder; out of GPU memory is retried once with half the per-device batch
    retry=Retry(attempts=1, when=(OutOfMemory,), adjust=halved_batch),
    progress=lambda a: ("training-progress", "training"), says=_train_says, shows=_train_shows)


# --- evaluate --------------------------------------------------------------------------------------------------
def evaluate(model: str, dataset: DatasetRef, config: RunConfig, layout: RunLayout, name: str = "adapter",
             env: dict[str, str] | None = None, on_progress: OnProgress | None = None) -> EvalReport:
    """COCO mAP of `model` (adapter, merged, base or champion) on config.eval.split, one process per GPU.
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


def _evaluate_child(req: dict[str, Any]) -> dict[str, Any]:
    with phase("imports"):
        from vlmdet.prediction.evaluate import evaluate as evaluate_model

    return evaluate_model(req["model"], DatasetRef.from_dict(req["dataset"]), RunConfig.from_dict(req["config"]),
                          req["out"], split=req.get("split")).to_dict()


EVALUATE = Step(
    "evaluate", evaluate, child=_evaluate_child, run_name="evaluate-{name}",
    # the model's files (names, sizes, times), the data fingerprint, the evaluation and model settings
    key=lambda model, dataset, config, layout, name: layout.eval_key(model, dataset, config, name),
    done=lambda model, dataset, config, layout, name: layout.eval_done(model, dataset, config, name),
    child_dir=lambda layout, name: layout.eval_dir(name) / "step",
    progress=lambda a: (f"evaluation-progress-{a['name']}", f"evaluating {a['name']}"),
    says=lambda r, a: (f"{a['name']}: mAP {r.map:.4f}, mAP50 {r.map50:.4f}, mAP75 {r.map75:.4f} on {r.num_images} "
                       f"{r.split} images ({r.parse_failures} unparsable answers)"),
    shows=lambda r, a: [Show(
        f"evaluation-{a['name']}", "markdown",
        f"## Evaluation: {a['name']}\n\n| mAP | mAP50 | mAP75 | images | unparsable |\n|---|---|---|---|---|\n"
        f"| {r.map:.4f} | {r.map50:.4f} | {r.map75:.4f} | {r.num_images} | {r.parse_failures} |\n\n"
        "Green: ground truth; red: predictions with scores.\n\n" + image_markdown(r.preview, "predictions"))])


# --- merge -----------------------------------------------------------------------------------------------------
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


def _merge_child(req: dict[str, Any]) -> dict[str, Any]:
    with phase("imports"):
        from vlmdet.data.images import open_image
        from vlmdet.data.samples import load_split
        from vlmdet.publishing.merge import merge as merge_adapter

    dataset = DatasetRef.from_dict(req["dataset"])
    with phase("decode images"):  # the few the merge checks its logits on
        samples, _ = load_split(dataset.splits[req.get("split", "test")])
        images = [open_image(s.file) for s in samples[: req.get("check_images", 2)]]
    return merge_adapter(AdapterRef.from_dict(req["adapter"]), RunConfig.from_dict(req["config"]), req["out"],
                         images).to_dict()


MERGE = Step(
    "merge", merge, child=_merge_child,
    # the adapter's files, the model settings and the check images; a later merge removes the folders no
    # running run holds (a 7B merge is 16.6 GB), and done says when the cached record's folder is gone
    key=lambda adapter, dataset, config, layout: layout.merge_key(adapter, dataset, config),
    done=lambda adapter, dataset, config, layout: layout.merge_done(adapter, dataset, config),
    child_dir=lambda layout: layout.merge_step_dir,
    says=lambda m, a: f"merged model at {m.path} (max |logit diff| vs base + adapter: {m.max_abs_logit_diff:.3g})")


# --- the champion ----------------------------------------------------------------------------------------------
def find_champion(config: RunConfig, layout: RunLayout, token: str | None = None,
                  target: Target | None = None) -> Champion | None:
    """The model now at publish.target (None when there is none yet); target: the run's, parsed once."""
    from vlmdet.publishing import read_champion

    return read_champion(config, str(layout.root), token, target=target)


def fetch_champion(champion: Champion, config: RunConfig, layout: RunLayout, token: str | None = None,
                   predictions_only: bool = False, target: Target | None = None) -> str | None:
    """The champion's published predictions (predictions_only) or a local folder with its model."""
    from vlmdet.publishing import fetch_champion as fetch

    return fetch(champion, config, str(layout.root), token, predictions_only, target=target)


# Reading and downloading the champion are network calls, retried for transient errors only: a 401/403 or a
# bad repo id will not heal by waiting. Never cached: the champion changes outside this run, and the token
# must not feed a key.
FIND_CHAMPION = Step(
    "find-champion", find_champion,
    retry=Retry(attempts=2, delays=(10, 60), when=_transient()),
    says=lambda c, a: f"champion at {a['config'].publish.target}: "
                      + (f"{c.source} ({c.metrics})" if c else "none yet"))
FETCH_CHAMPION = Step("fetch-champion", fetch_champion, retry=Retry(attempts=2, delays=(10, 60), when=_transient()))


def measure_champion(champion: Champion | None, report: EvalReport, config: RunConfig,
                     fetch: Callable[[Champion, bool], str | None],
                     evaluate_with: Callable[[str, RunConfig], EvalReport]) -> EvalReport | None:
    """The champion's detections on today's test split: its published ones when they were measured there,
    else a fresh evaluation of its model with its own answer settings. None without a champion, or with
    one that cannot be read (the gate then closes on it).

    fetch(champion, predictions_only): its published predictions' path (or None) / a folder with its model.
    """
    from vlmdet.decide.champion import champion_config, needs_measuring, reuse_report

    if not needs_measuring(champion):
        return None
    if champion.measured_on(report):
        path = fetch(champion, True)
        if path:
            log.info("champion %s was measured on today's %s split (%s): reusing its published predictions",
                     champion.source, report.split, report.data_fingerprint[:12])
            return reuse_report(champion, report, path)
    log.info("champion %s was measured on %s/%s, today's data is %s/%s: evaluating it again on today's images",
             champion.source, champion.data_fingerprint[:12] or "unknown", champion.split or "?",
             report.data_fingerprint[:12], report.split)
    return evaluate_with(fetch(champion, False), champion_config(champion, config))


# --- gate ------------------------------------------------------------------------------------------------------
def judge(report: EvalReport, config: RunConfig, layout: RunLayout, champion: Champion | None = None,
          champion_report: EvalReport | None = None, dataset: DatasetRef | None = None,
          name: str = "adapter") -> GateDecision:
    """Decide on `report` (the model called `name`) against the champion measured on the same images;
    the decision also goes to gate/NAME/decision.md (it outlives a Prefect server's artifact history)."""
    from vlmdet.decide.champion import needs_measuring, was_evaluated
    from vlmdet.decide.gate import compare, decide, decision_markdown, disagreement_picture

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


def _gate_shows(decision: GateDecision, a: dict[str, Any]) -> list[Show]:
    from vlmdet.decide.gate import decision_markdown

    picture = ("\n\nChampion (left) and new model (right) on those images; green: ground truth, red: predictions.\n\n"
               + image_markdown(decision.picture, "disagreements")) if decision.picture else ""
    name = a["name"]
    return [Show("gate-decision" if name == "adapter" else f"gate-decision-{name}", "markdown",
                 decision_markdown(decision) + picture, f"Publish gate ({name}) for {a['config'].publish.target}")]


# The decision is a pure function of its inputs: never retried, never cached (the champion changes outside
# this run).
GATE = Step("gate", judge, run_name="gate-{name}", shows=_gate_shows,
            says=lambda d, a: f"{a['name']} {'passed' if d.passed else 'closed'}: {d.reason}")


# --- publish ---------------------------------------------------------------------------------------------------
def publish(merged: MergedRef, report: EvalReport, dataset: DatasetRef, adapter: AdapterRef, decision: GateDecision,
            config: RunConfig, layout: RunLayout, token: str | None = None, run_id: str | None = None,
            target: Target | None = None) -> Publication:
    """The merged model, its card and predictions to publish.target (compare-and-swap against the champion
    read; transient Hub errors retried inside, with a check that this run's commit has not already landed).
    run_id: names the publication; stable across retries of one run (a Prefect flow run's id)."""
    from vlmdet import publishing

    return publishing.publish(merged, report, dataset, adapter, decision, config, str(layout.root), token,
                              run_id=run_id, target=target)


def _publish_shows(pub: Publication, a: dict[str, Any]) -> list[Show]:
    m, report = a["report"].metrics(), a["report"]
    return [Show("publication", "markdown",
                 f"### Published to {pub.kind}: `{pub.target}`\n\n- revision: `{pub.revision}`\n- tag: `{pub.tag}`\n"
                 f"- url: {pub.url}\n- mAP {m['map']:.4f}, mAP50 {m['map50']:.4f}, mAP75 {m['map75']:.4f} on "
                 f"`{report.split}`\n- gate: {a['decision'].reason}\n- files: {len(pub.files)}\n",
                 f"Where run {pub.run_id} was published")]


# A cached publish would skip the upload, and the token must not feed a key: never cached; one slow retry
# for longer outages on top of the library's own.
PUBLISH = Step("publish", publish, retry=Retry(attempts=1, delays=(60,), when=_transient()), shows=_publish_shows,
               says=lambda p, a: (f"published {a['config'].name} to {p.kind} {p.target} (revision {p.revision}"
                                  + (", commit found from an earlier attempt" if p.reused else "") + ")"))

ALL = (PREPARE, TRAIN, EVALUATE, MERGE, FIND_CHAMPION, FETCH_CHAMPION, GATE, PUBLISH)
