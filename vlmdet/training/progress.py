"""Training progress for the parent of the train step (vlmdet.run.progress): optimizer step of total, loss."""
from __future__ import annotations

from transformers import TrainerCallback

from vlmdet.run.progress import ProgressWriter


class ProgressLines(TrainerCallback):
    """Writes `step N/TOTAL, loss L` lines while the trainer runs (nothing outside a step child)."""

    def __init__(self) -> None:
        self.writer: ProgressWriter | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        # max_steps is known here (epochs turned into steps); a resumed run starts at its checkpoint's step
        self.writer = ProgressWriter.from_env("step", state.max_steps) if state.is_world_process_zero else None
        if self.writer is not None:
            self.writer.update(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self.writer.update(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.writer is not None and logs and "loss" in logs:  # after on_step_end of the same step
            self.writer.update(state.global_step, loss=logs["loss"])
