"""How far a step's child process is, as lines its parent follows while it waits.

The child (training steps, evaluation images) appends one JSON line to the file named by
VLMDET_PROGRESS, which vlmdet.run.runner sets to STEP_DIR/progress.jsonl:

    {"done": 3, "total": 20, "unit": "step", "loss": 1.2345}

A line is written when the whole percent changes (or the loss of that point becomes known), so a
run of 100,000 steps writes a few hundred lines and the parent can forward every one of them (a
Prefect progress artifact, a console line). Only the main process of a multi-GPU run writes.
No orchestrator here: the parent decides what a line becomes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

ENV = "VLMDET_PROGRESS"
FILE = "progress.jsonl"


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    unit: str  # "step" (optimizer steps) or "image" (images detected)
    loss: float | None = None

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 1.0

    @property
    def text(self) -> str:
        loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
        return f"{self.unit} {self.done}/{self.total}{loss}"


class ProgressWriter:
    """Appends Progress lines to `path`; one per whole percent, plus the loss when it arrives."""

    def __init__(self, path: str | Path, unit: str, total: int):
        self.path, self.unit, self.total = Path(path), unit, total
        self._last: tuple[int, bool] | None = None  # (percent, had a loss) of the last line written
        self._loss: float | None = None
        self._loss_step: int | None = None

    @classmethod
    def from_env(cls, unit: str, total: int) -> "ProgressWriter | None":
        """The writer of this child (VLMDET_PROGRESS), or None outside a step or on a non-main rank."""
        path = os.environ.get(ENV)
        if not path or int(os.environ.get("RANK", 0)) != 0:
            return None
        return cls(path, unit, total)

    def update(self, done: int, loss: float | None = None) -> None:
        if loss is not None:
            self._loss, self._loss_step = float(loss), done
        percent = int(100 * done / self.total) if self.total > 0 else 100
        with_loss = self._loss_step == done
        if self._last is not None and (percent, with_loss) <= self._last:
            return  # same percent, and no newer loss for it: nothing a reader would see change
        self._last = (percent, with_loss)
        line = {"done": done, "total": self.total, "unit": self.unit}
        if self._loss is not None:
            line["loss"] = self._loss
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


class ProgressReader:
    """The lines appended since the last read; a line still being written waits for its newline."""

    def __init__(self, path: str | Path):
        self.path, self.offset = Path(path), 0

    def read_new(self) -> list[Progress]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        out = []
        for raw in complete.splitlines():
            try:
                d = json.loads(raw)
                out.append(Progress(int(d["done"]), int(d["total"]), str(d["unit"]), d.get("loss")))
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line is skipped, never a reason to fail the step
        return out
