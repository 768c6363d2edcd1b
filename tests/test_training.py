"""Training: the loss falls on the answer only, and it goes down."""
from __future__ import annotations

import json

import torch

from vlmdet.formats import get_format
from vlmdet.records import DatasetRef
from vlmdet.samples import load_split
from vlmdet.training.train import build_trainer, train


def _dataset(coco_path) -> DatasetRef:
    return DatasetRef(fingerprint="test", root=str(coco_path.parent), splits={"train": str(coco_path), "test": str(coco_path)},
                      counts={})


def test_labels_cover_the_answer_tokens_only(synth_coco, micro_config, tmp_path):
    trainer, processor, _ = build_trainer(_dataset(synth_coco), micro_config, tmp_path / "train")
    examples = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(examples)
    tok = processor.tokenizer
    samples, _ = load_split(synth_coco)
    fmt = get_format("qwen2_vl")
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert (batch["input_ids"] == image_pad).any(), "the batch should hold image tokens"
    for row in range(3):
        labels = batch["labels"][row]
        kept = labels[labels != -100].tolist()
        answer = fmt.render(samples[row].boxes, samples[row].width, samples[row].height, "nutrition-table")
        # exactly the answer and the end-of-turn token: no prompt, no system text, no image token
        assert tok.decode(kept).strip() == answer + "<|im_end|>"
        assert image_pad not in kept
        # the labelled positions are the last non-padding tokens of the sequence
        ids = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
        assert ids[-len(kept):] == kept


def test_loss_decreases_on_a_fixed_batch(synth_coco, micro_config, tmp_path):
    # 4 images, 12 steps over them at a high rate: the adapter must fit them
    coco = json.loads(synth_coco.read_text())
    keep = {im["id"] for im in coco["images"][:4]}
    small = dict(coco, images=coco["images"][:4], annotations=[a for a in coco["annotations"] if a["image_id"] in keep])
    path = synth_coco.parent / "four.json"
    path.write_text(json.dumps(small))
    config = micro_config.override({"train.max_steps": 12, "train.per_device_batch": 4, "train.learning_rate": 1e-2,
                                    "train.warmup_steps": 0, "train.scheduler": "constant", "train.save_steps": 100})
    torch.manual_seed(0)
    adapter = train(_dataset(path), config, tmp_path / "train")
    assert adapter.global_step == 12
    assert len(adapter.losses) == 12
    # a random micro model starts near ln(vocab); LoRA on attention alone moves it slowly but surely
    # (a broken label mask, a zero learning rate or frozen adapters would leave it flat)
    first, last = sum(adapter.losses[:3]) / 3, sum(adapter.losses[-3:]) / 3
    assert last < first - 0.15, adapter.losses
    assert (tmp_path / "train" / "adapter" / "adapter_config.json").is_file()
    assert adapter.loss_curve and (tmp_path / "train" / "loss_curve.png").is_file()


def test_training_resumes_from_the_last_checkpoint(synth_coco, micro_config, tmp_path):
    out = tmp_path / "train"
    first = train(_dataset(synth_coco), micro_config.override({"train.max_steps": 2, "train.save_steps": 1}), out)
    assert first.resumed_from is None
    # the same run asked for more steps (as after a crash at step 2 of 4): it continues, not restarts
    second = train(_dataset(synth_coco), micro_config.override({"train.max_steps": 4, "train.save_steps": 1}), out)
    assert second.resumed_from and second.resumed_from.endswith("checkpoint-2")
    assert second.global_step == 4
