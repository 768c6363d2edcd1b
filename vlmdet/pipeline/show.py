"""How a run shows itself, one renderer a form: the summary as the CLI's text and as markdown (the Prefect
flow run's artifact, the benchmark's report), pictures inlined into markdown, and where the tracker holds
the run. Pure text: the drivers decide where it goes."""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from vlmdet.pipeline.step import Show


def image_markdown(path: str | None, alt: str, max_bytes: int = 400_000) -> str:
    """A PNG inlined into markdown (the Prefect UI cannot reach files on the worker's disk); its path alone
    when it is larger than max_bytes."""
    if not path or not Path(path).is_file():
        return ""
    data = Path(path).read_bytes()
    if len(data) > max_bytes:
        return f"_{alt}: {path}_"
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode()})\n\n_{path}_"


def _rows(s: dict[str, Any], adapter: str) -> list[tuple[str, dict[str, float]]]:
    """(model, metrics) of every model the run measured, the adapter's row named `adapter`. champion: the model
    now at the target, on today's test split (what the gate compared against)."""
    rows = [(adapter, s["metrics"]), ("base", s.get("base_metrics")), ("merged", s.get("merged_metrics")),
            ("champion", s.get("champion_metrics"))]
    return [(name, m) for name, m in rows if m]


def summary_text(s: dict[str, Any], summary_file: Path) -> str:
    """summary.json (RunSummary.to_dict()) as `vlmdet retrain` prints it."""
    g, lines = s["gate"], [""]
    if s.get("skipped"):
        lines.append(f"Nothing new: {s.get('skip_reason')}. Pass --force to retrain.")
    lines.append(f"{'model':<12}{'mAP':>8}{'mAP50':>8}{'mAP75':>8}")
    lines += [f"{name:<12}{m['map']:>8.3f}{m['map50']:>8.3f}{m['map75']:>8.3f}" for name, m in _rows(s, "fine-tuned")]
    # A skipped run repeats the summary of the run it skipped to: its gate reason and publication
    # are that run's ("no champion ... yet" was true then, before it published), so say whose they are.
    then = " (that run)" if s.get("skipped") else ""
    lines.append(f"{'gate' + then + ':':<10} {'PASSED' if g['passed'] else 'closed'} — {g['reason']}")
    lines.append(f"adapter:   {s['adapter']}")
    if s.get("published"):
        lines.append(f"{'published' + then + ':':<10} {s['published']['target']}")
    if s.get("evaluation", {}).get("preview"):
        lines.append(f"preview:   {s['evaluation']['preview']}")
    lines.append(f"summary:   {summary_file.resolve()}")
    return "\n".join(lines)


def summary_markdown(s: dict[str, Any], summary_file: Path) -> str:
    """summary.json as markdown: the flow run's artifact and the benchmark's report."""
    images = s.get("evaluation", {}).get("images", "")
    table = "\n".join(f"| {name} | {m['map']:.4f} | {m['map50']:.4f} | {m['map75']:.4f} | {images} |"
                      for name, m in _rows(s, "adapter"))  # named as the steps and artifacts name it
    g = s["gate"]
    return (f"## Retrain summary\n\n| model | mAP | mAP50 | mAP75 | images |\n|---|---|---|---|---|\n{table}\n\n"
            f"**Gate** ({g['metric']} >= {g['threshold']}): {'passed' if g['passed'] else 'closed'} — {g['reason']}\n\n"
            f"**Published**: {s['published']['target'] if s.get('published') else 'nothing'}\n\n"
            + (f"**Skipped**: {s.get('skip_reason')}\n\n" if s.get("skipped") else "")
            + (f"**Check run**: {s['check_run']}\n\n" if s.get("check_run") else "") + f"Summary: `{summary_file}`")


def tracker_shows(tracker: dict[str, Any]) -> list[Show]:
    """Where tonight's loss curve and numbers are in the experiment tracker (summary.tracker, written by
    vlmdet.run.tracking): a link when the tracker has an address (an MLflow server), else the command that
    opens it on the run folder. Nothing with train.report_to=none."""
    if not tracker or not tracker.get("report_to"):
        return []
    kind = tracker["report_to"]
    if tracker.get("url"):
        return [Show("tracker-run", "link", {"url": tracker["url"],
                                             "text": f"{kind} run {tracker.get('run_id', '')}".strip()},
                     f"This run in {kind}")]
    where = {k: tracker[k] for k in ("log_dir", "tracking_uri", "experiment_id", "run_id") if tracker.get(k)}
    return [Show("tracker-run", "markdown",
                 f"## This run in {kind}\n\n" + "".join(f"- {k}: `{v}`\n" for k, v in where.items())
                 + (f"\nOpen it on the worker: `{tracker['command']}`\n" if tracker.get("command") else "")
                 + (f"\n**Not logged**: {tracker['error']}\n" if tracker.get("error") else ""),
                 f"This run in {kind}")]
