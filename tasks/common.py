"""What the task modules and the flow share: picture, table and summary artifacts."""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Any


def image_markdown(path: str | None, alt: str, max_bytes: int = 400_000) -> str:
    """Inline a PNG into a markdown artifact (the UI cannot reach files on the worker's disk)."""
    if not path or not Path(path).is_file():
        return ""
    data = Path(path).read_bytes()
    if len(data) > max_bytes:
        return f"_{alt}: {path}_"
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode()})\n\n_{path}_"


def summary_artifact(summary: Any, path: Path) -> None:
    """The run's summary (vlmdet.pipeline.run.RunSummary) as the flow run's markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    rows = [("adapter", summary.metrics), ("base", summary.base_metrics), ("merged", summary.merged_metrics),
            ("champion", summary.champion_metrics)]
    images = summary.evaluation.get("images", "")
    table = "\n".join(f"| {name} | {m['map']:.4f} | {m['map50']:.4f} | {m['map75']:.4f} | {images} |"
                      for name, m in rows if m)
    g = summary.gate
    create_markdown_artifact(
        f"## Retrain summary\n\n| model | mAP | mAP50 | mAP75 | images |\n|---|---|---|---|---|\n{table}\n\n"
        f"**Gate** ({g['metric']} >= {g['threshold']}): {'passed' if g['passed'] else 'closed'} — {g['reason']}\n\n"
        f"**Published**: {summary.published['target'] if summary.published else 'nothing'}\n\n"
        + (f"**Skipped**: {summary.skip_reason}\n\n" if summary.skipped else "")
        + (f"**Check run**: {summary.check_run}\n\n" if summary.check_run else "") + f"Summary: `{path}`",
        key="retrain-summary")


def tracker_artifact(tracker: dict[str, Any]) -> None:
    """Where tonight's loss curve and numbers are in the experiment tracker (summary.tracker, written by
    vlmdet.run.tracking): a link when the tracker has an address (an MLflow server), else the command that
    opens it on the run folder. Nothing with train.report_to=none."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    if not tracker or not tracker.get("report_to"):
        return
    kind = tracker["report_to"]
    if tracker.get("url"):
        create_link_artifact(tracker["url"], link_text=f"{kind} run {tracker.get('run_id', '')}".strip(),
                             key="tracker-run", description=f"This run in {kind}")
        return
    where = {k: tracker[k] for k in ("log_dir", "tracking_uri", "experiment_id", "run_id") if tracker.get(k)}
    create_markdown_artifact(
        f"## This run in {kind}\n\n" + "".join(f"- {k}: `{v}`\n" for k, v in where.items())
        + (f"\nOpen it on the worker: `{tracker['command']}`\n" if tracker.get("command") else "")
        + (f"\n**Not logged**: {tracker['error']}\n" if tracker.get("error") else ""),
        key="tracker-run", description=f"This run in {kind}")
