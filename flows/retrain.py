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

from tasks.common import metrics_table, run_key
from tasks.evaluate import evaluate
from tasks.gate import gate
from tasks.merge import merge
from tasks.prepare_data import prepare_data, prepared_exists
from tasks.publish import publish, resolve_token
from tasks.train import train
from vlmdet.config import RunConfig, load_preset
from vlmdet.records import EvalReport, GateDecision


def build_config(preset: str, threshold: float | None, dataset: str | None, overrides: dict[str, Any] | None) -> RunConfig:
    extra = dict(overrides or {})
    if threshold is not None:
        extra["gate.threshold"] = threshold
    if dataset is not None:
        extra["data.dataset"] = dataset
    return load_preset(preset, extra)


def write_summary(workdir: Path, summary: dict[str, Any]) -> Path:
    path = workdir / "summary.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(path)
    return path


def _gate_summary(decision: GateDecision) -> dict[str, Any]:
    return {"threshold": decision.threshold, "passed": decision.passed, "reason": decision.reason,
            "metric": decision.metric, "value": decision.value, "champion": decision.champion,
            "min_delta": decision.min_delta}


@flow(name="retrain", log_prints=True)
def retrain(preset: str = "smoke", workdir: str = "runs/latest", threshold: float | None = None,
            dataset: str | None = None, overrides: dict[str, Any] | None = None, force: bool = False) -> dict[str, Any]:
    """Fine-tune, evaluate and (when the gate passes) merge and publish.

    preset: a name from vlmdet/presets or a YAML path. threshold / dataset: shortcuts for
    gate.threshold / data.dataset. overrides: any setting by dotted key, e.g. {"train.max_steps": 10}.
    force: retrain even when data, configuration and base model are unchanged since the last success.
    """
    log = get_run_logger()
    started = time.time()
    config = build_config(preset, threshold, dataset, overrides)
    wd = Path(workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    # cached across runs and flow retries; refreshed when the prepared files were deleted
    data = prepare_data.with_options(refresh_cache=not prepared_exists(str(wd)))(config, str(wd))
    key = run_key(config, data.fingerprint)
    state_path = wd / "last_success.json"
    last = json.loads(state_path.read_text()) if state_path.is_file() else None
    if last and last.get("run_key") == key and not force:
        log.info("nothing new since the run of %s (same data %s, configuration and base model): "
                 "skipping training and evaluation; pass force=True to retrain.", last.get("finished"), data.fingerprint[:12])
        summary = dict(last["summary"], skipped=True,
                       skip_reason=f"data, configuration and base model unchanged since {last.get('finished')}")
        write_summary(wd, summary)
        return summary

    adapter = train(data, config, str(wd))
    report = evaluate(adapter.path, data, config, str(wd), name="adapter")
    base_report: EvalReport | None = None
    if config.eval.eval_base:
        base_report = evaluate(adapter.base_model, data, config, str(wd), name="base")
    token = resolve_token(config)
    decision = gate(report, config, token=token, workdir=str(wd))

    published = merged = None
    if decision.passed:
        merged = merge(adapter, data, config, str(wd))
        publication = publish(merged, report, data, adapter, decision, config, str(wd), token=token)
        published = publication.to_dict()
    else:
        log.info("gate closed: %s; nothing merged or published", decision.reason)

    summary = {
        "preset": config.name,
        "metrics": report.metrics(),
        "base_metrics": base_report.metrics() if base_report else None,
        "gate": _gate_summary(decision),
        "published": published,
        "adapter": adapter.path,
        "merged": merged.path if merged else None,
        "dataset": {"source": data.source, "fingerprint": data.fingerprint, "counts": data.counts,
                    "quarantined": data.quarantine_counts},
        "training": {"global_step": adapter.global_step, "losses": adapter.losses, "loss_curve": adapter.loss_curve,
                     "resumed_from": adapter.resumed_from},
        "evaluation": {"split": report.split, "images": report.num_images, "parse_failures": report.parse_failures,
                       "predictions": report.predictions, "preview": report.preview},
        "run_key": key,
        "seconds": round(time.time() - started, 1),
        "skipped": False,
    }
    path = write_summary(wd, summary)
    state_path.write_text(json.dumps({"run_key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                      "summary": summary}, indent=2, default=str))
    rows = metrics_table(adapter=report, base=base_report)
    table = "\n".join(f"| {r['model']} | {r['mAP']} | {r['mAP50']} | {r['mAP75']} | {r['images']} |" for r in rows)
    create_markdown_artifact(
        f"## Retrain summary\n\n| model | mAP | mAP50 | mAP75 | images |\n|---|---|---|---|---|\n{table}\n\n"
        f"**Gate** ({decision.metric} >= {decision.threshold}): {'passed' if decision.passed else 'closed'} — "
        f"{decision.reason}\n\n**Published**: {published['target'] if published else 'nothing'}\n\nSummary: `{path}`",
        key="retrain-summary")
    return summary
