"""Where a step's seconds go: the phases of one heavy step (train, evaluate, merge), with bytes moved.

A nightly run on a GPU spends much of its time outside training and detection (starting a process,
importing torch, loading 16 GB of weights, decoding photos, saving, checking). To remove that time
one has to see it, so each step child records its phases:

    with phase("load weights", nbytes=folder_bytes(base)):
        model = load_model(...)

and the parent (vlmdet.run.runner.run_step) adds what only it can see: the seconds from starting the
child to its first line of step code (interpreter start-up and the imports of vlmdet.pipeline.child) and from
the child's result to its exit (tearing down CUDA and the interpreter). The result is
STEP_DIR/timeline.json:

    {"step": "evaluate", "wall_s": 61.2, "phases": [{"name": "start-up", "s": 2.9, "bytes": null}, ...],
     "accounted_s": 60.8}

Phases are flat and in order; a phase opened inside another is kept as a detail of it (`within`) and
not counted twice. Time between top-level phases is not invented: `wall_s - accounted_s` is what no
phase covers, so a test can hold the step to covering its wall time. Recording is a few list
appends: it costs nothing measurable and runs in every process (the parent of an in-process step
simply never writes it out).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

SPAWNED_ENV = "VLMDET_STEP_SPAWNED"  # epoch seconds at which the parent started the child
FILE = "timeline.json"

_phases: list[dict[str, Any]] = []
_open: list[dict[str, Any]] = []  # the phases now open, innermost last


@contextlib.contextmanager
def phase(name: str, nbytes: int | None = None) -> Iterator[dict[str, Any]]:
    """Time the block as phase `name`; `nbytes` (or the yielded dict's "bytes", set inside) = bytes moved."""
    row: dict[str, Any] = {"name": name, "start": time.time(), "s": 0.0, "bytes": nbytes, **_inside()}
    _open.append(row)
    try:
        yield row
    finally:
        _open.pop()
        row["s"] = round(time.time() - row["start"], 3)
        _phases.append(row)


def add(name: str, seconds: float, nbytes: int | None = None) -> None:
    """A phase measured piecewise (e.g. image decoding interleaved with detection): a detail of the
    phase now open, counted inside it."""
    _phases.append({"name": name, "start": time.time() - seconds, "s": round(seconds, 3), "bytes": nbytes,
                    **_inside()})


def _inside() -> dict[str, Any]:
    return {"within": _open[-1]["name"], "parent_start": _open[-1]["start"]} if _open else {}


def take() -> list[dict[str, Any]]:
    """The phases recorded so far in this process in order of their start, each detail right after the
    phase it is within; clears them."""
    rows = sorted(_phases, key=lambda r: (r.get("parent_start", r["start"]), "within" in r, r["start"]))
    _phases.clear()
    return rows


def folder_bytes(path: str | Path) -> int | None:
    """Bytes of the weight files (safetensors, bin) in a model folder; None for a Hub id or a missing folder."""
    p = Path(path)
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin"))


def assemble(step: str, phases: list[dict[str, Any]], spawned: float, exited: float,
             result_written: float | None) -> dict[str, Any]:
    """The step's timeline as the parent sees it: the child's phases between start-up and exit."""
    top = [r for r in phases if "within" not in r]
    first = min((r["start"] for r in top), default=result_written or exited)
    rows = [{"name": "start-up", "s": round(max(0.0, first - spawned), 3), "bytes": None}]
    rows += [{k: v for k, v in r.items() if k not in ("start", "parent_start")} for r in phases]
    last = result_written or max((r["start"] + r["s"] for r in top), default=first)
    rows.append({"name": "exit", "s": round(max(0.0, exited - last), 3), "bytes": None})
    wall = round(exited - spawned, 3)
    accounted = round(sum(r["s"] for r in rows if "within" not in r), 3)
    return {"step": step, "wall_s": wall, "accounted_s": accounted, "phases": rows}


def spawned_at() -> float | None:
    """When the parent started this child (None outside a step child)."""
    value = os.environ.get(SPAWNED_ENV)
    return float(value) if value else None


def collect(root: str | Path, since: float = 0.0) -> list[dict[str, Any]]:
    """Every step timeline written under `root` since `since` (epoch seconds), in the order they ended;
    each with `dir`, its step folder relative to root. A cached step ran no child and has none."""
    root = Path(root)
    found = []
    for p in root.rglob(FILE):
        try:  # another run on the workdir may be removing its folders meanwhile: theirs, not ours
            mtime = p.stat().st_mtime
        except OSError:
            continue
        if mtime >= since:
            found.append((mtime, p))
    out = []
    for _, path in sorted(found):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out.append({**data, "dir": path.parent.relative_to(root).as_posix()})
    return out


# Colours by what a phase is: overhead (grey), moving weights (orange), preparing inputs (yellow),
# the work itself (green), writing (blue), checking (purple).
_KINDS = {"start-up": "#9e9e9e", "imports": "#bdbdbd", "exit": "#e0e0e0", "trainer set-up": "#d7ccc8",
          "load weights": "#fb8c00", "processor": "#fdd835", "data": "#fff176", "data index": "#fff176",
          "decode images": "#fff59d", "train": "#2e7d32", "detect": "#43a047", "merge": "#66bb6a",
          "validation": "#a5d6a7", "score": "#26a69a", "save": "#1e88e5", "check": "#8e24aa", "hash": "#ab47bc",
          "in process": "#90a4ae"}


def draw(timelines: list[dict[str, Any]], path: str | Path, title: str = "where the run's seconds go") -> str | None:
    """One horizontal stacked bar a step (its top-level phases; what no phase covers is left blank)."""
    if not timelines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 0.55 * len(timelines) + 1.6))
    seen: dict[str, Any] = {}
    labels = []
    for y, t in enumerate(timelines):
        labels.append(f"{t.get('label') or t['dir']} ({t['wall_s']:.1f} s)")
        left = 0.0
        for r in (r for r in t["phases"] if "within" not in r):
            bar = ax.barh(y, r["s"], left=left, color=_KINDS.get(r["name"], "#78909c"), edgecolor="white",
                          linewidth=0.5)
            seen.setdefault(r["name"], bar)
            left += r["s"]
    ax.set_yticks(range(len(timelines)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(title)
    ax.legend(seen.values(), seen.keys(), ncol=min(6, len(seen)), fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.35 if len(timelines) < 4 else -0.15), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def markdown(timelines: list[dict[str, Any]]) -> str:
    """The same as a table: a row a step, its phases with seconds (and GB moved where known)."""
    rows = ["| step | wall s | phases (s) | not covered s |", "| --- | ---: | --- | ---: |"]
    for t in timelines:
        parts = []
        for r in t["phases"]:
            gb = f", {r['bytes'] / 1e9:.2f} GB" if r.get("bytes") else ""
            parts.append(f"{'  ' if 'within' in r else ''}{r['name']} {r['s']:.1f}{gb}"
                         + (f" (in {r['within']})" if "within" in r else ""))
        rows.append(f"| {t.get('label') or t['dir']} | {t['wall_s']:.1f} | {'; '.join(parts)} | "
                    f"{t['wall_s'] - t['accounted_s']:.1f} |")
    return "\n".join(rows)
