"""QLoRA supervised fine-tuning with TRL's SFTTrainer.

The data is TRL's conversational prompt-completion form, so the collator masks the prompt (system,
user text and every image token) and the loss falls on the answer tokens only. Checkpoints go to
OUT/checkpoints every `train.save_steps`; a run started again on the same OUT resumes from the last
one (same global step, optimizer and scheduler state), which is how a killed or preempted run
loses no work. The validation split is measured at every save and picks the checkpoint that
becomes the adapter (vlmdet.training.select); the test split is never seen here.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch

from vlmdet.run import tracking
from vlmdet.config.settings import RunConfig
from vlmdet.formats import get_format
from vlmdet.formats.resize import visual_tokens
from vlmdet.modeling.load import has_cuda, load_model, load_processor, resolve_base, torch_dtype
from vlmdet.run.records import AdapterRef, DatasetRef
from vlmdet.data.samples import load_split, training_example
from vlmdet.run.timeline import folder_bytes, phase
from vlmdet.training import faults, select, speed
from vlmdet.training.precision import set_adapter_dtype  # noqa: F401 - also imported from here
from vlmdet.config.profiles import TRAINED_WITH, accumulation_per_process
from vlmdet.training.progress import ProgressLines
from transformers import TrainerCallback  # already imported by faults; the step counter below is one

log = logging.getLogger(__name__)


def build_dataset(split_json: str, config: RunConfig, image_cache: Path | None = None):
    """A `datasets.Dataset` of prompt/completion/images; images decode lazily from their files."""
    from datasets import Dataset, Image, Sequence

    fmt = get_format(config.model.family, config.model.min_pixels, config.model.max_pixels)
    samples, _ = load_split(split_json)
    rows = [training_example(s, fmt, config.model.prompt, config.data.category) for s in samples]
    add_speed_columns(rows, samples, config, image_cache)
    ds = Dataset.from_list(rows)
    return ds.cast_column("images", Sequence(Image()))


def add_speed_columns(rows: list[dict], samples: list, config: RunConfig, image_cache: Path | None) -> None:
    """train.pre_resize: images at their processed size (the answer was rendered from the original
    size, so boxes are unchanged); train.group_by_length: a `length` column for the sampler."""
    m = config.model
    if config.train.pre_resize and image_cache is not None:
        from concurrent.futures import ThreadPoolExecutor

        def resized(s) -> str:
            return speed.resized_copy(s.file, s.width, s.height, m.family, m.min_pixels, m.max_pixels, image_cache)

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # decode/resize release the GIL
            for row, path in zip(rows, pool.map(resized, samples)):
                row["images"] = [path]
    if config.train.group_by_length:
        for row, s in zip(rows, samples):  # visual tokens dominate; the answer's characters bound its tokens
            answer = row["completion"][0]["content"][0]["text"]
            row["length"] = visual_tokens(s.width, s.height, m.family, m.min_pixels, m.max_pixels) + len(answer)


def last_checkpoint(ckpt_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None


def checkpointing_args(on: bool, every: int) -> dict:
    """Activation checkpointing under the name this transformers knows. Newer releases call it
    `activation_checkpointing` and keep `gradient_checkpointing` as a deprecated alias that warns whenever the
    new name is unset (TRL's default sets the old one); 5.17 (the GPU image's) knows only the old name and
    refuses the new one. Non-reentrant: reentrant checkpointing drops the gradients of a frozen base's inputs."""
    import dataclasses

    from transformers import TrainingArguments  # SFTConfig's base: it holds the name

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    kwargs = ({"use_reentrant": False} | ({"every_n_layers": every} if every > 1 else {})) if on else None
    return {name: on, f"{name}_kwargs": kwargs}


def sft_config(config: RunConfig, out: Path, validation: bool = False):
    from trl import SFTConfig

    t = config.train
    cuda = has_cuda()
    # bf16 autocast on a GPU, and on a CPU where the base itself is bf16: the GPU's mixed
    # path (bf16 base, fp32 adapters under autocast) then runs in the CPU tests too.
    mixed = t.bf16 and (cuda or torch_dtype(config.model) == torch.bfloat16)
    return SFTConfig(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=t.per_device_batch,
        # the effective batch is the one-GPU one whatever the process count (train.num_processes)
        gradient_accumulation_steps=accumulation_per_process(t.grad_accum, int(os.environ.get("WORLD_SIZE", 1))),
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        bf16=mixed,
        **checkpointing_args(t.gradient_checkpointing, t.checkpoint_every),
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        seed=t.seed,
        data_seed=t.seed,
        # the trainer's own integration logs the loss, learning rate and val loss per step (vlmdet.run.tracking)
        report_to=tracking.report_to(config),
        run_name=f"{config.name} {out.name}",  # the tracker run: the preset and the training folder (its key)
        project="vlmdet",  # trackio's project
        remove_unused_columns=False,  # the collator needs the raw images column
        max_length=None,  # never truncate: a cut answer teaches a broken box
        dataloader_num_workers=t.dataloader_workers,
        dataloader_persistent_workers=t.dataloader_workers > 0,  # not re-spawned every epoch
        optim=t.optim,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        use_cpu=not cuda,
        ddp_find_unused_parameters=t.ddp_find_unused,
        use_liger_kernel=speed.liger_kernels_usable(t.liger_kernels, cuda),  # transformers' own default is True for a PEFT model
        completion_only_loss=True,
        **(validation_args(config) if validation else {}),
    )


def build_trainer(dataset: DatasetRef, config: RunConfig, out: Path):
    """The SFTTrainer for this run (base loaded, LoRA attached), and the processor."""
    with phase("imports"):  # TRL and PEFT: seconds on their own
        from peft import LoraConfig
        from trl import SFTTrainer

    class Trainer(SFTTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return speed.grouping_independent_of_gpus(super()._get_train_sampler(*args, **kwargs), self.args)

    with phase("resolve base"):  # a Hub id to its cached folder; a tiny: spec built and saved once
        base = resolve_base(config.model.base, out.parent / "base-models", config.model)
    with phase("processor"):
        processor = load_processor(base, config.model)
    with phase("data"):  # the rows, and the images pre-resized to the pixel budget (image_cache)
        train_ds = build_dataset(dataset.splits["train"], config, image_cache=out / "images")
        val_split = validation_split(dataset)
        eval_ds = build_dataset(val_split, config, image_cache=out / "images") if val_split else None
    with phase("load weights", nbytes=folder_bytes(base)):
        model = load_model(base, config.model)
    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=config.lora.target_modules, exclude_modules=config.lora.exclude or None,
                      modules_to_save=config.lora.modules_to_save or None,
                      task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # TRL 1.16 calls use_liger_kernel deprecated for the Hub's kernels, which download at every start (an
        # offline worker cannot); the layer kernels it applies are Liger's either way
        warnings.filterwarnings("ignore", message=".*use_liger_kernel=True. is deprecated", category=FutureWarning)
        # the TensorBoard callback reads its folder when built
        with tracking.trainer_env(config, out), phase("trainer set-up"):
            trainer = Trainer(model=model, args=sft_config(config, out, validation=eval_ds is not None),
                              train_dataset=train_ds, eval_dataset=eval_ds,
                              processing_class=processor, peft_config=lora, callbacks=faults.callbacks())
    set_adapter_dtype(trainer.model, config.train.adapter_dtype)
    trainer.add_callback(speed.FrozenTowersOutOfBackward(trainer.model))
    if trainer.args.world_size > 1 and not config.train.ddp_find_unused:
        trainer.add_callback(speed.EveryTrainableWeightGetsAGradient(trainer.model))
    if speed.StepTimes.from_env():
        trainer.add_callback(speed.StepTimes.from_env())
    if speed.StepProfile.from_env():
        trainer.add_callback(speed.StepProfile.from_env())
    return trainer, processor, base


def train(dataset: DatasetRef, config: RunConfig, out: str | Path) -> AdapterRef:
    """Fine-tune config.model.base with LoRA on dataset's train split; the adapter goes to OUT/adapter."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    faults.check_memory_fault(config.train.per_device_batch)
    trainer, processor, base = build_trainer(dataset, config, out)
    resume = last_checkpoint(out / "checkpoints")
    if resume:
        log.info("resuming from %s", resume)
    counter = StepCounter()
    trainer.add_callback(counter)
    trainer.add_callback(TrackerRecord(config, out))
    trainer.add_callback(ProgressLines())  # step of total and loss, for the parent's progress (vlmdet.run.progress)
    # under bf16 autocast (Accelerate wraps the forward in it for mixed precision): fp32 LoRA weights, bf16 inputs
    amp = trainer.accelerator
    with speed.adapter_inputs_uncast(trainer.model, autocast=amp.native_amp and amp.mixed_precision == "bf16"), \
            tracking.trainer_env(config, out), phase("train"):  # MLflow reads its settings here
        trainer.train(resume_from_checkpoint=resume)
    with phase("validation"):  # every kept checkpoint detects on the validation split; the best is loaded
        selected, validation = select.select_checkpoint(trainer.model, processor, config, out / "checkpoints",
                                                        trainer.state.log_history, validation_split(dataset))

    adapter_dir = out / "adapter"
    with phase("save"):  # the adapter, the processor, the log history and the loss curve
        trainer.save_model(str(adapter_dir))  # the selected checkpoint's weights: select loaded them; main process only
        history = trainer.state.log_history
        losses = [h["loss"] for h in history if "loss" in h]
        steps = [h["step"] for h in history if "loss" in h]
        curve = None
        if trainer.is_world_process_zero():  # one GPU's process writes; the others would race on the same files
            processor.save_pretrained(str(adapter_dir))
            # how the base was loaded for training (a speed profile may differ from the preset): evaluation
            # of this adapter loads the base the same way (vlmdet.modeling.carried.trained_with)
            (adapter_dir / TRAINED_WITH).write_text(json.dumps({"profile": config.train.profile,
                                                                "model": config.to_dict()["model"]}, indent=1))
            (out / "log_history.json").write_text(json.dumps(history, indent=1))
            curve = plot_loss(steps, losses, out / "loss_curve.png", title=f"{config.name}: training loss")
            # the photos' copies at the pixel budget (train.pre_resize) served the trainer only: ~2 MB a photo that
            # a finished training folder need not keep (a resumed run makes them again)
            speed.drop_copies(out / "images")
    with phase("provenance"):  # what the adapter was trained from: data, configuration, base and code
        from vlmdet.run.provenance import provenance

        made_from = provenance(dataset, config, base)
    return AdapterRef(path=str(adapter_dir.resolve()), base_model=base, family=config.model.family,
                      global_step=trainer.state.global_step, losses=losses, loss_curve=curve,
                      # resumed only if the trainer really started past step 0, not because a folder existed
                      resumed_from=resume if counter.start_step else None, config=config.to_dict(),
                      steps_run=counter.steps, selected_step=selected, validation=validation,
                      provenance=made_from)


def plot_loss(steps: list[int], losses: list[float], path: Path, title: str = "training loss") -> str | None:
    if not losses:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, marker="." if len(losses) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title(title)
    if min(losses) > 0 and max(losses) / max(min(losses), 1e-9) > 20:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path.resolve())


def validation_split(dataset: DatasetRef) -> str | None:
    """The prepared validation split's file when it holds images, else None (no validation)."""
    path = dataset.splits.get("val")
    if not path or not Path(path).is_file():
        return None
    return path if json.loads(Path(path).read_text()).get("images") else None


def validation_args(config: RunConfig) -> dict:
    """Trainer settings for the val loss at every save; the best-by-loss checkpoint survives rotation."""
    return {"eval_strategy": "steps", "eval_steps": config.train.save_steps,
            "per_device_eval_batch_size": config.train.per_device_batch,
            "metric_for_best_model": "eval_loss", "greater_is_better": False, "load_best_model_at_end": False}


class StepCounter(TrainerCallback):
    """Counts the optimizer steps this call really runs, and the step training started from.

    A resumed run starts at the checkpoint's step and runs only the rest; a restart from zero
    would show start_step 0 and every step run again.
    """

    def __init__(self) -> None:
        self.steps, self.start_step = 0, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step  # after the trainer loaded the checkpoint's state

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


class TrackerRecord(TrainerCallback):
    """Records where the trainer's tracker integration logs (vlmdet.run.tracking.record_location) once training
    begins: added after the trainer's report_to callbacks, it runs after they started their run."""

    def __init__(self, config: RunConfig, out: Path) -> None:
        self.config, self.out = config, out

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            tracking.record_location(self.config, self.out)
