"""The retrain flow: prepare_data -> train -> evaluate -> gate -> merge -> publish.

Run it by hand (`vlmdet retrain --preset smoke --workdir runs/demo`), from the Prefect UI (a
deployment of this flow, see deployments/prefect.yaml), or on a schedule. It writes
WORKDIR/summary.json (metrics, gate, published, adapter) whatever the gate decides and fails
when a step fails.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.common import metrics_table
from tasks.evaluate import evaluate, evaluation_done
from tasks.gate import find_champion, gate, measure_champion
from tasks.merge import merge, merge_done
from tasks.prepare_data import prepare_data, prepared_exists
from tasks.publish import publish, resolve_token
from tasks.train import train, train_done
from vlmdet.config import RunConfig, guard_check_run, load_preset
from vlmdet.gate import clears_threshold
from vlmdet.keys import decision_settings, evaluation_key, source_stamp
from vlmdet.records import AdapterRef, EvalReport, GateDecision, write_json


def build_config(preset: str, threshold: float | None, dataset: str | None, overrides: dict[str, Any] | None) -> RunConfig:
    extra = dict(overrides or {})
    if threshold is not None:
        extra["gate.threshold"] = threshold
    if dataset is not None:
        extra["data.dataset"] = dataset
    return load_preset(preset, extra)


def _gate_summary(decision: GateDecision) -> dict[str, Any]:
    return {"threshold": decision.threshold, "passed": decision.passed, "reason": decision.reason,
            "metric": decision.metric, "value": decision.value, "champion": decision.champion,
            "min_delta": decision.min_delta,
            # the paired bootstrap against the champion on today's test images (None without a champion)
            "champion_recorded": decision.champion_recorded, "champion_evaluated": decision.champion_evaluated,
            "p_better": decision.p_better, "ci": [decision.ci_low, decision.ci_high] if decision.p_better is not None
            else None, "min_probability": decision.min_probability, "resamples": decision.resamples,
            "images": decision.images, "disagreements": decision.disagreements, "picture": decision.picture,
            # fail closed: the revision the publication must still find, and an unreadable champion replaced on purpose
            "champion_revision": decision.champion_revision, "champion_unreadable": decision.champion_unreadable,
            "replaced_unreadable": decision.replaced_unreadable}


def _cached(task_fn, done: bool, store):
    """The task with its results kept in `store`; Prefect returns a persisted result when the key
    matches, unless the output folder no longer holds what the key produced (then it runs again):
    Prefect keeps the result record, not the files it points to."""
    return task_fn.with_options(result_storage=store, **({} if done else {"refresh_cache": True}))


def _result_store(wd: Path) -> Path:
    """Task results beside the files they describe (WORKDIR/.prefect-results): they live and go with
    the work folder (a volume that outlives a Docker or Kubernetes worker), not the worker's home.
    A Path, which Prefect turns into a LocalFileSystem; an unsaved block is refused, a str is a block slug."""
    return wd / ".prefect-results"


def _load_last(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:  # unreadable: treat as no previous success rather than failing every night
        return None


@flow(name="retrain", log_prints=True)
def retrain(preset: str = "smoke", workdir: str = "runs/latest", threshold: float | None = None,
            dataset: str | None = None, overrides: dict[str, Any] | None = None, force: bool = False) -> dict[str, Any]:
    """Fine-tune, evaluate and (when the gate passes) merge and publish.

    preset: a name from vlmdet/presets or a YAML path. threshold / dataset: shortcuts for
    gate.threshold / data.dataset. overrides: any setting by dotted key, e.g. {"train.max_steps": 10}.
    force: retrain from the base even when data, configuration and base model are unchanged since
    the last success (without it such a run skips training and evaluation and says so).
    """
    log = get_run_logger()
    started = time.time()
    config = build_config(preset, threshold, dataset, overrides)
    config, check_run = guard_check_run(config, set(overrides or {}))
    if check_run:
        log.warning(check_run)
    wd = Path(workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    write_json(wd / "config.json", config.to_dict())

    # cached across runs and flow retries; refreshed when the prepared files are missing. The stamp
    # (a Hub dataset's commit) is read once: the cache key and the data loaded name the same revision.
    store = _result_store(wd)
    data = prepare_data.with_options(refresh_cache=not prepared_exists(wd, config), result_storage=store)(
        config, str(wd), stamp=source_stamp(config.data.dataset))
    key = evaluation_key(config, data.fingerprint)
    state_path = wd / "last_success.json"

    # Train and evaluate persist their results in Prefect, keyed on their inputs (tasks/train.py,
    # tasks/evaluate.py): a flow-run retry or a run with nothing new gets them back as "Cached"
    # states without running a step child, and a change of gate.* or publish.* alone re-decides.
    steps = [_cached(train, train_done(wd, data, config, force), store)(data, config, str(wd), fresh=force,
                                                                        return_state=True)]
    adapter: AdapterRef = steps[0].result()
    steps.append(_cached(evaluate, evaluation_done(adapter.path, data, config, wd, "adapter"), store)(
        adapter.path, data, config, str(wd), name="adapter", return_state=True))
    report: EvalReport = steps[-1].result()
    base_report: EvalReport | None = None
    if config.eval.eval_base:
        steps.append(_cached(evaluate, evaluation_done(adapter.base_model, data, config, wd, "base"), store)(
            adapter.base_model, data, config, str(wd), name="base", return_state=True))
        base_report = steps[-1].result()
    from_cache = all(state.name == "Cached" for state in steps)

    # last_success.json stays for one thing Prefect cannot express: that these cached results were
    # already *decided* under the same gate and publish settings. The gate itself cannot be cached:
    # the champion at the target changes outside this flow, and the token must not feed a key.
    last = _load_last(state_path)
    if (from_cache and not force and last and last.get("run_key") == key
            and last.get("decision_settings") == decision_settings(config)):
        log.info("nothing new since the run of %s (same data %s, configuration and base model): training and "
                 "evaluation came from Prefect's cache and were already decided; pass force=True to retrain.",
                 last.get("finished"), data.fingerprint[:12])
        summary = dict(last["summary"], skipped=True, retrained=False,
                       skip_reason=f"data, configuration and base model unchanged since {last.get('finished')} "
                                   "(train and evaluate results from Prefect's cache)")
        write_json(wd / "summary.json", summary)
        return summary
    if from_cache:
        log.info("training and evaluation came from Prefect's cache; deciding again (gate or publish settings "
                 "changed, or the last run on them did not finish)")

    token = resolve_token(config)
    # Like with like: the champion's detections on today's test split (re-evaluated when its card's
    # numbers come from other data), so the gate compares both models on the same images.
    champion = find_champion(config, token=token, workdir=str(wd))

    def evaluate_champion(model: str, cfg: RunConfig) -> EvalReport:
        return _cached(evaluate, evaluation_done(model, data, cfg, wd, "champion"), store)(
            model, data, cfg, str(wd), name="champion")

    champion_report = None  # below the threshold, no comparison is needed
    if clears_threshold(report, config.gate):
        champion_report = measure_champion(champion, report, data, config, str(wd), token=token,
                                           evaluate_with=evaluate_champion)
    judged = dict(token=token, workdir=str(wd), champion=champion, champion_report=champion_report, dataset=data)
    decision = gate(report, config, **judged)
    published = merged = merged_report = None
    if decision.passed:
        merged = _cached(merge, merge_done(adapter, data, config, wd), store)(adapter, data, config, str(wd))
        # The gate measured 4-bit base + adapter; what gets published is the adapter merged into
        # unquantized weights. Measure that too, and publish only if it still clears the gate.
        merged_report = _cached(evaluate, evaluation_done(merged.path, data, config, wd, "merged"), store)(
            merged.path, data, config, str(wd), name="merged")
        decision = gate(merged_report, config, name="merged", **judged)
        if decision.passed:
            published = publish(merged, merged_report, data, adapter, decision, config, str(wd), token=token).to_dict()
    if not published:
        log.info("gate closed: %s; nothing published", decision.reason)

    summary = {
        "preset": config.name,
        "metrics": report.metrics(),
        "base_metrics": base_report.metrics() if base_report else None,
        "merged_metrics": merged_report.metrics() if merged_report else None,
        "champion_metrics": champion_report.metrics() if champion_report else None,
        "gate": _gate_summary(decision),
        "published": published,
        "adapter": adapter.path,
        "merged": merged.path if merged else None,
        "dataset": {"source": data.source, "fingerprint": data.fingerprint, "counts": data.counts,
                    "quarantined": data.quarantine_counts, "revision": data.revision},
        "training": {"global_step": adapter.global_step, "losses": adapter.losses, "loss_curve": adapter.loss_curve,
                     "resumed_from": adapter.resumed_from, "steps_run": adapter.steps_run,
                     "selected_step": adapter.selected_step, "validation": adapter.validation},
        "provenance": adapter.provenance,
        "check_run": check_run,
        "evaluation": {"split": report.split, "images": report.num_images, "parse_failures": report.parse_failures,
                       "predictions": report.predictions, "preview": report.preview},
        "run_key": key,
        "seconds": round(time.time() - started, 1),
        "skipped": False,
        "retrained": steps[0].name != "Cached",
        "from_cache": from_cache,
    }
    path = write_json(wd / "summary.json", summary)
    write_json(state_path, {"run_key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "summary": summary,
                            "decision_settings": decision_settings(config)})
    rows = metrics_table(adapter=report, base=base_report, merged=merged_report, champion=champion_report)
    table = "\n".join(f"| {r['model']} | {r['mAP']} | {r['mAP50']} | {r['mAP75']} | {r['images']} |" for r in rows)
    create_markdown_artifact(
        f"## Retrain summary\n\n| model | mAP | mAP50 | mAP75 | images |\n|---|---|---|---|---|\n{table}\n\n"
        f"**Gate** ({decision.metric} >= {decision.threshold}): {'passed' if decision.passed else 'closed'} — "
        f"{decision.reason}\n\n**Published**: {published['target'] if published else 'nothing'}\n\n"
        + (f"**Check run**: {check_run}\n\n" if check_run else "") + f"Summary: `{path}`",
        key="retrain-summary")
    return summary
