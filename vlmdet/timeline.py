"""Where a step's seconds go: the phases of one heavy step (train, evaluate, merge), with bytes moved.

A nightly run on a GPU spends much of its time outside training and detection (starting a process,
importing torch, loading 16 GB of weights, decoding photos, saving, checking). To remove that time
one has to see it, so each step child records its phases:

    with phase("load weights", nbytes=folder_bytes(base)):
        model = load_model(...)

and the parent (vlmdet.runner.run_step) adds what only it can see: the seconds from starting the
child to its first line of step code (interpreter start-up and the imports of vlmdet.steps) and from
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
import os
import time
from pathlib import Path
from typing import Any, Iterator

SPAWNED_ENV = "VLMDET_STEP_SPAWNED"  # epoch seconds at which the parent started the child
FILE = "timeline.json"

_phases: list[dict[str, Any]] = []
_open: list[str] = []


@contextlib.contextmanager
def phase(name: str, nbytes: int | None = None) -> Iterator[dict[str, Any]]:
    """Time the block as phase `name`; `nbytes` (or the yielded dict's "bytes", set inside) = bytes moved."""
    row: dict[str, Any] = {"name": name, "start": time.time(), "s": 0.0, "bytes": nbytes}
    if _open:
        row["within"] = _open[-1]
    _open.append(name)
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
                    **({"within": _open[-1]} if _open else {})})


def take() -> list[dict[str, Any]]:
    """The phases recorded so far in this process, in order of their start; clears them."""
    rows = sorted(_phases, key=lambda r: r["start"])
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
    rows += [{k: v for k, v in r.items() if k != "start"} for r in phases]
    last = result_written or max((r["start"] + r["s"] for r in top), default=first)
    rows.append({"name": "exit", "s": round(max(0.0, exited - last), 3), "bytes": None})
    wall = round(exited - spawned, 3)
    accounted = round(sum(r["s"] for r in rows if "within" not in r), 3)
    return {"step": step, "wall_s": wall, "accounted_s": accounted, "phases": rows}


def spawned_at() -> float | None:
    """When the parent started this child (None outside a step child)."""
    value = os.environ.get(SPAWNED_ENV)
    return float(value) if value else None
