"""QLoRA supervised fine-tuning with TRL's SFTTrainer.

The data is TRL's conversational prompt-completion form, so the collator masks the prompt (system,
user text and every image token) and the loss falls on the answer tokens only. Checkpoints go to
OUT/checkpoints every `train.save_steps`; a run started again on the same OUT resumes from the last
one (same global step, optimizer and scheduler state), which is how a killed or preempted run
loses no work.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from vlmdet.config import RunConfig
from vlmdet.formats import get_format
from vlmdet.modeling.load import has_cuda, load_model, load_processor, resolve_base
from vlmdet.records import AdapterRef, DatasetRef
from vlmdet.samples import load_split, training_example
from vlmdet.training import faults

log = logging.getLogger(__name__)


def build_dataset(split_json: str, config: RunConfig):
    """A `datasets.Dataset` of prompt/completion/images; images decode lazily from their files."""
    from datasets import Dataset, Image, Sequence

    fmt = get_format(config.model.family, config.model.min_pixels, config.model.max_pixels)
    samples, _ = load_split(split_json)
    rows = [training_example(s, fmt, config.model.prompt, config.data.category) for s in samples]
    ds = Dataset.from_list(rows)
    return ds.cast_column("images", Sequence(Image()))


def last_checkpoint(ckpt_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None


def sft_config(config: RunConfig, out: Path):
    from trl import SFTConfig

    t = config.train
    cuda = has_cuda()
    return SFTConfig(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=t.per_device_batch,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        bf16=t.bf16 and cuda,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        remove_unused_columns=False,  # the collator needs the raw images column
        max_length=None,  # never truncate: a cut answer teaches a broken box
        dataloader_num_workers=t.dataloader_workers,
        use_cpu=not cuda,
        completion_only_loss=True,
    )


def build_trainer(dataset: DatasetRef, config: RunConfig, out: Path):
    """The SFTTrainer for this run (base loaded, LoRA attached), and the processor."""
    from peft import LoraConfig
    from trl import SFTTrainer

    base = resolve_base(config.model.base, out.parent / "base-models", config.model)
    processor = load_processor(base, config.model)
    train_ds = build_dataset(dataset.splits["train"], config)
    model = load_model(base, config.model)
    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=config.lora.target_modules, exclude_modules=config.lora.exclude or None,
                      modules_to_save=config.lora.modules_to_save or None,
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=sft_config(config, out), train_dataset=train_ds,
                         processing_class=processor, peft_config=lora, callbacks=faults.callbacks())
    set_adapter_dtype(trainer.model, config.train.adapter_dtype)
    return trainer, processor, base


def set_adapter_dtype(model, dtype_name: str) -> int:
    """Cast the trainable (LoRA and modules_to_save) weights to `dtype_name`; returns how many tensors.

    SFTTrainer casts them to bf16 when the base is 4-bit (trl sft_trainer.py, "following the QLoRA
    paper"). A LoRA-A entry of Qwen2-VL-7B starts near 0.017 (kaiming over 3,584 inputs), where a
    bf16 step is 6e-5..1.2e-4, while AdamW moves a weight by about lr: at lr 1e-5 most updates round
    to nothing (issue 9: 14% of LoRA-A entries changed in 10 steps). fp32 master weights cost 8 bytes
    a LoRA parameter more (weight + grad) and keep every update; the forward still computes in bf16
    under autocast. Done before the optimizer exists (Trainer builds it in train()), so its state is
    fp32 too.
    """
    dtype = getattr(torch, dtype_name)
    n = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype and param.is_floating_point():
            param.data = param.data.to(dtype)
            n += 1
    return n


def train(dataset: DatasetRef, config: RunConfig, out: str | Path) -> AdapterRef:
    """Fine-tune config.model.base with LoRA on dataset's train split; the adapter goes to OUT/adapter."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    faults.check_memory_fault(config.train.per_device_batch)
    trainer, processor, base = build_trainer(dataset, config, out)
    resume = last_checkpoint(out / "checkpoints")
    if resume:
        log.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)

    adapter_dir = out / "adapter"
    trainer.save_model(str(adapter_dir))
    processor.save_pretrained(str(adapter_dir))
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    steps = [h["step"] for h in history if "loss" in h]
    (out / "log_history.json").write_text(json.dumps(history, indent=1))
    curve = plot_loss(steps, losses, out / "loss_curve.png", title=f"{config.name}: training loss")
    return AdapterRef(path=str(adapter_dir.resolve()), base_model=base, family=config.model.family,
                      global_step=trainer.state.global_step, losses=losses, loss_curve=curve,
                      resumed_from=resume, config=config.to_dict())


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
