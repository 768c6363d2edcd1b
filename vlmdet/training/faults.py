"""Fault injection for rehearsing recovery: set VLMDET_FAULTS in the environment of a run.

  kill-after-checkpoint:N   the training process SIGKILLs itself right after saving checkpoint N
                            (as a preempted spot machine would); a retry must resume from it
  oom-above-batch:B         training raises CUDA out-of-memory while train.per_device_batch > B
                            (the train task must retry with half the batch, same effective batch)

Tests use these to make crashes deterministic; operators can use them to rehearse a bad night.
Nothing happens when the variable is unset.
"""
from __future__ import annotations

import os
import signal

from transformers import TrainerCallback


def faults() -> dict[str, int]:
    out = {}
    for item in filter(None, os.environ.get("VLMDET_FAULTS", "").split(",")):
        name, _, value = item.partition(":")
        out[name.strip()] = int(value or 0)
    return out


def check_memory_fault(per_device_batch: int) -> None:
    limit = faults().get("oom-above-batch")
    if limit is not None and per_device_batch > limit:
        import torch

        raise torch.cuda.OutOfMemoryError(
            f"CUDA out of memory (injected by VLMDET_FAULTS: per_device_batch {per_device_batch} > {limit})")


class KillAfterCheckpoint(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:  # once: a resumed run saves later steps and goes on
            os.kill(os.getpid(), signal.SIGKILL)


def callbacks() -> list[TrainerCallback]:
    step = faults().get("kill-after-checkpoint")
    return [KillAfterCheckpoint(step)] if step else []
