"""Training: the loss falls on the answer only, and it goes down."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from vlmdet.formats import get_format
from vlmdet.run.records import DatasetRef
from vlmdet.data.samples import load_split
from vlmdet.training import faults, select, speed
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


def test_resume_runs_only_the_remaining_steps_with_the_saved_optimizer_state(synth_coco, micro_config, tmp_path,
                                                                           monkeypatch):
    """A run continued on the same folder starts at checkpoint-2 with its Adam moments and runs steps 3
    and 4 only; a restart from zero would run 1-4 with an empty optimizer state."""
    out = tmp_path / "train"
    copies: list[str] = []  # train.pre_resize: the photos' copies are made for each run and gone once it ends
    resized_copy = speed.resized_copy
    monkeypatch.setattr(speed, "resized_copy", lambda *a: copies.append(resized_copy(*a)) or copies[-1])
    config = micro_config.override({"train.pre_resize": True, "train.save_steps": 1})
    (out / "images").mkdir(parents=True)
    (out / "images" / "mine.bmp").write_bytes(b"a file vlmdet did not write")
    # copies too: one as PNG (what the copies were before they were BMP) and one whose writer was killed mid-save
    (out / "images" / "old-1234-1700000000000000000-28x28.png").write_bytes(b"an older copy")
    (out / "images" / "cut-1234-1700000000000000000-28x28.4242.tmp").write_bytes(b"half a copy")
    first = train(_dataset(synth_coco), config.override({"train.max_steps": 2}), out)
    assert first.resumed_from is None and first.steps_run == 2
    assert copies and all(Path(c).parent == out / "images" for c in copies)
    assert [p.name for p in (out / "images").iterdir()] == ["mine.bmp"]  # the copies gone, nothing else
    (out / "images" / "mine.bmp").unlink()
    copies.clear()
    saved = torch.load(out / "checkpoints" / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"]
    assert saved and all("exp_avg" in v for v in saved.values())

    seen: dict = {"steps": []}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            seen["start"] = state.global_step
            seen["exp_avg"] = {k: v["exp_avg"].clone() for k, v in optimizer.state_dict()["state"].items()}

        def on_step_end(self, args, state, control, **kwargs):
            seen["steps"].append(state.global_step)

    monkeypatch.setattr(faults, "callbacks", lambda: [Probe()])
    second = train(_dataset(synth_coco), config.override({"train.max_steps": 4}), out)
    assert seen["start"] == 2 and seen["steps"] == [3, 4]  # only the remaining optimizer steps ran
    assert copies and not (out / "images").exists()
    assert second.steps_run == 2 and second.global_step == 4
    assert second.resumed_from and second.resumed_from.endswith("checkpoint-2")
    assert set(seen["exp_avg"]) == set(saved)
    for k, v in saved.items():
        assert torch.equal(seen["exp_avg"][k], v["exp_avg"]), k  # the optimizer state was restored, not re-created


def test_validation_picks_the_published_checkpoint(synth_coco, micro_config, tmp_path, monkeypatch):
    """Val loss at every save, val mAP of every kept checkpoint; the winner's weights become the adapter."""
    from safetensors.torch import load_file

    coco = json.loads(synth_coco.read_text())
    keep = {im["id"] for im in coco["images"][:2]}
    val = synth_coco.parent / "val-two.json"
    val.write_text(json.dumps(dict(coco, images=coco["images"][:2],
                                   annotations=[a for a in coco["annotations"] if a["image_id"] in keep])))
    data = DatasetRef(fingerprint="test", root=str(synth_coco.parent),
                      splits={"train": str(synth_coco), "val": str(val), "test": str(synth_coco)}, counts={})
    loaded, scored = [], []
    real_load, real_map = select.load_checkpoint_weights, select.val_map

    def load(model, folder):
        loaded.append(Path(folder).name)
        real_load(model, folder)

    def val_map(model, processor, config, split, n):
        metrics = real_map(model, processor, config, split, n)  # the real detector on the model in memory
        assert set(metrics) == {"map", "map50", "map75"} and split == str(val) and n == 2
        scored.append(loaded[-1])
        # a random micro model scores 0 everywhere: make the *oldest* kept checkpoint the best
        return dict(metrics, map50=0.9 if len(scored) == 1 else 0.1)

    monkeypatch.setattr(select, "load_checkpoint_weights", load)
    monkeypatch.setattr(select, "val_map", val_map)
    config = micro_config.override({"train.max_steps": 3, "train.save_steps": 1, "train.save_total_limit": 2,
                                    "eval.val_max_images": 2, "eval.max_new_tokens": 4})
    adapter = train(data, config, tmp_path / "train")
    kept = sorted(select.checkpoints(tmp_path / "train" / "checkpoints"))
    assert len(kept) >= 2 and kept[-1] == 3 and scored == [f"checkpoint-{s}" for s in kept]
    assert adapter.selected_step == kept[0] != adapter.global_step == 3
    rows = {r["step"]: r for r in adapter.validation["checkpoints"]}
    assert set(rows) == set(kept) and all(isinstance(r["val_loss"], float) for r in rows.values())
    assert adapter.validation["chosen"]["step"] == kept[0] and adapter.validation["val_images"] == 2
    published = load_file(str(tmp_path / "train" / "adapter" / "adapter_model.safetensors"))
    chosen = load_file(str(tmp_path / "train" / "checkpoints" / f"checkpoint-{kept[0]}" / "adapter_model.safetensors"))
    last = load_file(str(tmp_path / "train" / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors"))
    assert set(published) == set(chosen)
    assert all(torch.equal(published[k], chosen[k]) for k in chosen)
    assert any(not torch.equal(published[k], last[k]) for k in last)  # not simply the final weights


def test_choose_ranks_val_map50_then_loss_then_step():
    rows = [{"step": 1, "val_loss": 0.5, "val_map50": 0.7}, {"step": 2, "val_loss": 0.4, "val_map50": 0.7},
            {"step": 3, "val_loss": 0.9, "val_map50": 0.6}]
    assert select.choose(rows)["step"] == 2
    assert select.choose([{"step": 1, "val_loss": 0.3}, {"step": 2, "val_loss": 0.3}])["step"] == 2
    assert select.choose([{"step": 4, "val_loss": None}, {"step": 2, "val_loss": 1.0}])["step"] == 2
