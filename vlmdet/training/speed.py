"""Training-speed mechanisms that change how fast a step runs, never what it computes.

- A frozen vision tower gets no backward pass. transformers' `enable_input_require_grads` (called
  by TRL and by `gradient_checkpointing_enable` for PEFT models) hooks the input embeddings of
  *every* sub-model, the vision tower's `patch_embed` included, so its output requires grad and
  autograd records the whole tower: 32 blocks over ~4,000 patches an image, whose activations are
  kept (or recomputed under checkpointing) and whose backward runs, all for a gradient that no
  trainable weight uses (the LoRA targets are the language model's). Removing that hook where a
  sub-model has nothing trainable leaves every LoRA gradient bit-identical.
- LoRA layers take their input as autocast gives it (bf16) while their weights stay fp32. PEFT
  casts a LoRA layer's input to the adapter's dtype, so fp32 adapters (train.adapter_dtype) on a bf16
  base copy every adapted activation to fp32, run the dropout in fp32, and autocast copies it back to
  bf16 for the matmul: for all 7 linears of 28 layers ~1.2e9 elements a sample, ~4x the memory
  traffic of the bf16 path. Under autocast the matmul is bf16 either way; without dropout the outputs
  and gradients are bit-identical (with dropout the mask is drawn over a tensor of another dtype).
  PEFT's 4-bit layers already skip the cast under autocast, so this is the bf16 base's (large) lever.
- DDP without `find_unused_parameters` on several processes. transformers' Trainer sets it True for
  any model that is not a `PreTrainedModel` (trainer.py `_build_accelerator_args`), and a PEFT model
  is not one, so after every synchronised forward DDP walks the whole autograd graph from the
  outputs, passes them through a cloning autograd function (`_DDPSink`, the logits included) and
  all-reduces a map of used parameters. Only trainable weights are in DDP's buckets (the frozen base
  and vision tower never are), and each LoRA and modules_to_save weight of vlmdet's models is used
  in every forward (dropout multiplies, it never cuts the graph; non-reentrant checkpointing keeps
  it), so there is nothing to find. EveryTrainableWeightGetsAGradient checks that at the first step.
- Liger Kernel's fused Triton kernels (train.liger_kernels, through TRL's use_liger_kernel): the
  decoder's RMSNorm in one pass instead of ~6 elementwise kernels with an fp32 copy, SiLU(gate) x up
  in one kernel, the vision tower's LayerNorm. The fused linear cross-entropy stays off (TRL keeps its
  own chunked LM head). They need CUDA: on any other machine, or without the package, training runs
  the plain modules and liger_kernels_usable says why in the log.
- Lengths for grouping samples by size, from the image size alone (no decoding).
- Training images stored once at the size the processor would resize them to.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from transformers import TrainerCallback

from vlmdet.formats.resize import factor, smart_resize

log = logging.getLogger(__name__)

# Names of the hook functions transformers (make_inputs_require_grads) and PEFT
# (make_inputs_require_grad) register; matched by name because both libraries lose track of
# their own handles when the hook is registered twice (TRL's __init__, then train()).
_REQUIRE_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


def _hf_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def frozen_input_hooks_removed(model) -> list[str]:
    """Remove the require-grad hooks on the input embeddings of sub-models without trainable weights.

    Returns the names of the sub-models whose hook was removed (e.g. ["model.visual"]).
    """
    from transformers import PreTrainedModel

    removed = []
    for name, sub in _hf_model(model).named_modules():
        if not isinstance(sub, PreTrainedModel) or any(p.requires_grad for p in sub.parameters()):
            continue
        try:
            emb = sub.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            continue
        hooks = getattr(emb, "_forward_hooks", None) or {}
        drop = [k for k, fn in hooks.items() if getattr(fn, "__name__", "") in _REQUIRE_GRAD_HOOKS]
        for k in drop:
            del hooks[k]
        if drop:
            removed.append(name)
    return removed


class FrozenTowersOutOfBackward(TrainerCallback):
    """Re-applies frozen_input_hooks_removed when training starts: Trainer.train() enables gradient
    checkpointing, which registers the hooks again after the trainer was built."""

    def __init__(self, model):
        self.model = model

    def on_train_begin(self, args, state, control, **kwargs):
        removed = frozen_input_hooks_removed(self.model)
        if removed:
            log.info("no backward through frozen %s (nothing trainable there)", ", ".join(removed))


class EveryTrainableWeightGetsAGradient(TrainerCallback):
    """Several processes with DDP's find_unused_parameters off (train.ddp_find_unused=false): before
    the first optimizer step, every trainable weight must hold a gradient.

    A weight the forward did not use leaves its DDP bucket (and every later one) unreduced: the
    ranks would step on their own gradients and DDP would fail at the next synchronised forward with
    "Expected to have finished reduction in the prior iteration". This stops the run at step 1
    instead, before the optimizer moves anything, naming the weights and the setting that fixes it.
    """

    def __init__(self, model):
        self.model, self.checked = model, False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.checked:
            return
        self.checked = True
        missing = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            from vlmdet.config.settings import ConfigError

            raise ConfigError(f"{len(missing)} trainable weight(s) got no gradient in the first step "
                              f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); with several "
                              "processes DDP cannot reduce them. Set train.ddp_find_unused=true, or leave the "
                              "modules the forward does not use out of lora.target_modules / lora.modules_to_save.")


def adapter_inputs_uncast(model, autocast: bool):
    """Context in which LoRA layers do not cast their input to the adapter's dtype (see the module
    docstring); only where the forward runs under autocast (`autocast`), which makes the matmul's
    dtypes agree. Outside it (validation's generate, a CPU fp32 run) PEFT's cast is needed and kept."""
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model, active=autocast)


def liger_kernels_usable(wanted: bool, cuda: bool) -> bool:
    """train.liger_kernels where it can run: on CUDA with liger-kernel importable; otherwise off, with the reason."""
    if not wanted:
        return False
    if not cuda:
        log.info("train.liger_kernels: off on this machine (Liger's Triton kernels need CUDA); plain modules")
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as err:  # not installed, or a Triton/torch it cannot load
        log.warning("train.liger_kernels: liger-kernel cannot be used (%s: %s); training without it "
                    "(pip install liger-kernel, or set train.liger_kernels=false)", type(err).__name__, err)
        return False
    return True


def grouping_independent_of_gpus(sampler, args):
    """The length-grouped order depends on the effective batch, not on how many processes share it.

    transformers' LengthGroupedSampler groups by `train_batch_size x gradient_accumulation_steps`,
    both per process: one GPU at batch 4 x 4 groups by 16, four GPUs at 4 x 1 by 4, so the mega-batches
    (and which samples make an optimizer step) differ with the GPU count and the loss curve is not the
    one-GPU one (seen on 4 H200s, 2026-11-28: step 1 loss 12.158 on one GPU, 12.117 on two and four).
    Grouping by the whole effective batch gives every process count the same global order; the
    distributed loader then deals consecutive micro-batches to the ranks, so each optimizer step sees
    the same samples as on one GPU. On one process nothing changes.
    """
    from transformers.trainer_pt_utils import LengthGroupedSampler

    if isinstance(sampler, LengthGroupedSampler):
        sampler.batch_size = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
    return sampler


def resized_copy(src: str, width: int, height: int, family: str, min_pixels: int, max_pixels: int,
                 cache_dir: Path) -> str:
    """The image at the size the processor resizes it to (same resampling), stored once in cache_dir.

    The processor's own resize of a picture already at its target size is the identity, so what the
    model sees is the same; the answer is rendered from the original width/height, not the copy's.
    Returns src itself when no resize would happen.
    """
    from PIL import Image

    from vlmdet.data.images import open_image

    h, w = smart_resize(height, width, factor=factor(family), min_pixels=min_pixels, max_pixels=max_pixels)
    if (w, h) == (width, height):
        return src
    st = os.stat(src)
    dst = cache_dir / f"{Path(src).stem}-{st.st_size}-{st.st_mtime_ns}-{w}x{h}.bmp"
    if not dst.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        # bicubic, as Qwen2VLImageProcessor resizes. Stored uncompressed, so the pixels are exactly these and
        # neither writing nor the collator's read of every epoch pays for zlib: a 756x1008 copy is 2.1 MB against
        # PNG's 1.0 MB, and ~1 ms to write or read against PNG's ~53 and ~23 (benchmarks/pre_resize_bench.py)
        im = open_image(src).resize((w, h), Image.Resampling.BICUBIC)
        tmp = dst.with_suffix(f".{os.getpid()}.tmp")
        im.save(tmp, format="BMP")
        os.replace(tmp, dst)  # atomic: ranks of a multi-GPU run may write the same file
    return str(dst)


# resized_copy's names, stem-size-mtime-WxH.bmp; .png as they were before (a resumed older folder holds them) and
# .PID.tmp where a writer was killed mid-save
_COPY_NAME = re.compile(r"^.+-\d+-\d+-\d+x\d+\.(bmp|png|\d+\.tmp)$")


def drop_copies(cache_dir: Path) -> None:
    """Delete resized_copy's files in cache_dir (nothing else that may be there), then the folder if empty."""
    if not cache_dir.is_dir():
        return
    for path in cache_dir.iterdir():
        if _COPY_NAME.match(path.name):
            path.unlink(missing_ok=True)
    try:
        cache_dir.rmdir()
    except OSError:  # something else is kept there
        pass


class StepTimes(TrainerCallback):
    """VLMDET_STEP_TIMES=FILE: the wall time of every optimizer step, written as JSON by rank 0
    (benchmarks/multi_gpu.py reads it from a training child it cannot reach otherwise)."""

    def __init__(self, path: str):
        self.path, self.times, self.t = Path(path), [], 0.0

    @classmethod
    def from_env(cls) -> "StepTimes | None":
        path = os.environ.get("VLMDET_STEP_TIMES")
        return cls(path) if path else None

    def on_step_begin(self, args, state, control, **kwargs):
        import time

        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        import json
        import time

        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(round(time.perf_counter() - self.t, 4))
        if state.is_world_process_zero:
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            self.path.write_text(json.dumps({"step_s": self.times, "peak_alloc_GiB": peak}))


class StepProfile(TrainerCallback):
    """VLMDET_PROFILE_STEP=N with VLMDET_PROFILE_DIR=DIR: torch.profiler over optimizer step N (1-based)
    on every rank, written as DIR/rank{R}.txt: the step's wall time, then the operators by device
    time and by host time (where a rank waits: collectives, synchronisations, the data loader).
    benchmarks/multi_gpu.py --torch-profile sets them for a training child it cannot reach otherwise."""

    def __init__(self, step: int, folder: str):
        self.step, self.folder, self.prof, self.t = step, Path(folder), None, 0.0

    @classmethod
    def from_env(cls) -> "StepProfile | None":
        step, folder = os.environ.get("VLMDET_PROFILE_STEP"), os.environ.get("VLMDET_PROFILE_DIR")
        return cls(int(step), folder) if step and folder else None

    def on_step_begin(self, args, state, control, **kwargs):
        import time

        import torch

        if state.global_step + 1 != self.step:
            return
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                         if torch.cuda.is_available() else [])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof = torch.profiler.profile(activities=acts)
        self.prof.__enter__()
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        import time

        import torch

        if self.prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t
        self.prof.__exit__(None, None, None)
        events, self.prof = self.prof.key_averages(), None
        tables = [f"{key}:\n" + events.table(sort_by=key, row_limit=40, max_name_column_width=70)
                  for key in (["self_device_time_total"] if torch.cuda.is_available() else []) + ["cpu_time_total"]]
        rank = int(os.environ.get("RANK", 0))
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{rank}.txt").write_text(
            f"optimizer step {self.step}, rank {rank} of {args.world_size}, {wall:.3f} s under the profiler\n\n"
            + "\n\n".join(tables) + "\n")
