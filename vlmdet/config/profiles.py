"""Speed/memory profiles: which settings a profile sets over a preset, and which profile a machine gets.

A profile changes how a run executes, never what it learns: the effective batch (per-device batch
x accumulation), learning rate, LoRA settings and data stay the preset's. What it changes is the
base's precision and what is traded between memory and speed (benchmarks/RESULTS.md measures
each row against the original recipe):

  qlora  4-bit nf4 base, checkpointing, batch 8 x accumulation 2: fits a 24 GB card
         (target: peak <= 12 GiB allocated, >= 2x the recipe's samples/s).
  large  bf16 base, no checkpointing, batch 4 x accumulation 4: for 80 GB cards (target >= 4x).
  preset the preset exactly as written (the `seed-recipe` preset's choice: a faithful copy).

`auto` picks large when the first GPU has at least LARGE_FREE_GIB free and qlora otherwise; a
preset that does not load its base in 4-bit (the CPU smoke preset) is left as written under auto.
The choice is made in the parent (the train task), before an out-of-memory retry halves the
batch, so the halving is not undone; nvidia-smi answers without creating a CUDA context there.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from typing import Any

from vlmdet.config.settings import ConfigError, RunConfig

log = logging.getLogger(__name__)

# Written beside a trained adapter: the settings its base was loaded with (evaluation loads it alike).
TRAINED_WITH = "vlmdet_trained_with.json"

# An 80 GB card shows ~79 GiB free when idle; 70 leaves room for another tenant's context.
LARGE_FREE_GIB = 70.0

# Settings each profile sets (dotted keys of RunConfig). per_device_batch is an upper bound: the
# effective batch is kept, so it is lowered to a divisor of it where needed (split_batch).
PROFILES: dict[str, dict[str, Any]] = {
    "qlora": {
        "model.quantization": "nf4",
        # Checkpointing stays: without it a 1,090-token sample keeps ~6 GiB of activations (bench
        # README: nf4 without checkpointing, batch 2, 18.3 GiB). With it ~0.4 GiB a sample. Measured
        # on one H200, 2026-11-27 (benchmarks/RESULTS.md), 1,091 tokens a sample: batch 4 x 4 6.23
        # samples/s (1.89x the recipe) at 9.68 GiB; batch 8 x 2 6.77 (2.06x) at 11.93 GiB: the 2x
        # target inside 12 GiB needs batch 8.
        "train.gradient_checkpointing": True,
        "train.checkpoint_every": 1,
        "train.per_device_batch": 8,
        "train.dataloader_workers": 4,    # image decode + processor beside the GPU, not before it
        "train.group_by_length": True,
        "train.optim": "adamw_torch_fused",
        "train.pre_resize": True,
        # Liger's fused RMSNorm/SwiGLU: 7.40 vs 7.22 samples/s (1.02x), the same 11.41 GiB, a loss curve as close
        # to the one without as a dropout redraw's over 21 steps (one H200, 2026-12-03, bench-levers-fbf9503)
        "train.liger_kernels": True,
    },
    "large": {
        "model.quantization": "none",
        "model.dtype": "bfloat16",
        "train.gradient_checkpointing": False,  # activations fit in 80 GB: no recomputation at all
        "train.checkpoint_every": 1,
        # ~6 GiB of activations a sample with LoRA on q/k/v/o (bench README: batch 8, 64.6 GiB); LoRA
        # on the MLP too keeps its 18,944-wide inputs and their dropout copies, ~9 GiB a sample: batch 4
        # (measured 49.7 GiB on an H200) leaves an 80 GB card room where batch 8 (82.9 GiB) would not fit.
        "train.per_device_batch": 4,
        "train.dataloader_workers": 6,
        "train.group_by_length": True,
        "train.optim": "adamw_torch_fused",
        "train.pre_resize": True,
        # Liger's fused kernels: 9.97 vs 8.63 samples/s (1.16x) and 43.4 vs 49.2 GiB peak, learning within a
        # dropout redraw's distance over 21 steps (one H200, 2026-12-03, bench-levers-fbf9503)
        "train.liger_kernels": True,
    },
}


def split_batch(effective: int, want: int) -> tuple[int, int]:
    """(per_device_batch, grad_accum) with product `effective` and the largest per-device batch <= want."""
    per_device = max(d for d in range(1, min(want, effective) + 1) if effective % d == 0)
    return per_device, effective // per_device


def choose(requested: str, config: RunConfig, free_gib: float | None) -> str:
    """The concrete profile for `requested` (auto/qlora/large/preset) on a GPU with free_gib free (None: no GPU)."""
    if requested != "auto":
        return requested
    if free_gib is None or config.model.quantization != "nf4":
        return "preset"  # no GPU, or a preset that does not load its base in 4-bit: left as written
    return "large" if free_gib >= LARGE_FREE_GIB else "qlora"


def apply(config: RunConfig, profile: str) -> RunConfig:
    """config with `profile`'s settings (train.profile records the concrete choice); preset: unchanged."""
    if profile == "preset":
        return config.override({"train.profile": "preset"})
    if profile not in PROFILES:
        raise ConfigError(f"train.profile={profile!r}; use auto, {', '.join(PROFILES)} or preset.")
    settings = dict(PROFILES[profile])
    effective = config.train.per_device_batch * config.train.grad_accum
    settings["train.per_device_batch"], settings["train.grad_accum"] = split_batch(
        effective, settings["train.per_device_batch"])
    settings["train.profile"] = profile
    return config.override(settings)


def resolve(config: RunConfig, free_gib: float | None | str = "query") -> RunConfig:
    """Apply config.train.profile (auto: chosen from the free memory of the first visible GPU)."""
    if free_gib == "query":
        free_gib = free_gpu_gib() if config.train.profile == "auto" else None
    profile = choose(config.train.profile, config, free_gib)
    out = apply(config, profile)
    changed = changes(config, out)
    log.info("train.profile=%s -> %s%s: %s", config.train.profile, profile,
             f" ({free_gib:.0f} GiB free)" if isinstance(free_gib, float) else "",
             ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()) or "no change")
    return out


def changes(before: RunConfig, after: RunConfig) -> dict[str, tuple[Any, Any]]:
    """dotted key -> (before, after) for every setting that differs."""
    a, b = before.to_dict(), after.to_dict()
    return {f"{s}.{k}": (a[s][k], b[s][k]) for s in a if isinstance(a[s], dict) for k in a[s] if a[s][k] != b[s][k]}


def free_gpu_gib() -> float | None:
    """Free memory of the first visible GPU in GiB, or None without one.

    nvidia-smi first: it answers without a CUDA context, which in the long-lived parent process
    would hold ~0.5 GiB of the card for as long as the worker runs.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return None
    first = visible.split(",")[0].strip() if visible else "0"
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", first],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            return float(out.strip().splitlines()[0]) / 1024  # MiB -> GiB
        except (subprocess.SubprocessError, OSError, ValueError, IndexError):
            pass
    import torch

    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(0)
    return free / 2**30


def accumulation_per_process(grad_accum: int, world_size: int) -> int:
    """Each of N processes accumulates grad_accum / N steps, so the effective batch is the one-GPU one."""
    if world_size <= 1:
        return grad_accum
    per = max(1, round(grad_accum / world_size))
    if per * world_size != grad_accum:
        log.warning("train.grad_accum=%d is not a multiple of %d processes: each accumulates %d, an effective batch "
                    "%d/%d of the one-GPU one; pick grad_accum divisible by the GPU count to keep it exact",
                    grad_accum, world_size, per, per * world_size, grad_accum)
    return per
