"""The nightly recipe's mechanics on CPU: adapter master-weight precision, LoRA kept off the vision
tower, the vision tower left out of 4-bit. The 7B numbers behind the choices are GPU runs
(docs/recipe.md, tests/gpu)."""
from __future__ import annotations

import pytest
import torch

from vlmdet.config.settings import ConfigError, ModelConfig, TrainConfig, load_preset
from vlmdet.modeling import load
from vlmdet.run.records import DatasetRef
from vlmdet.training.train import build_trainer


def _dataset(coco_path) -> DatasetRef:
    return DatasetRef(fingerprint="test", root=str(coco_path.parent), splits={"train": str(coco_path)}, counts={})


def _lora_a(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_A" in n}


@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_adapter_master_weights_keep_small_updates_only_in_fp32(adapter_dtype, synth_coco, micro_config, tmp_path):
    # lr 1e-5: AdamW moves each weight by ~1e-5 a step. The micro model's LoRA-A entries are ~0.1
    # (kaiming over 64 inputs), where one bf16 ulp is 4.9e-4: in bf16 every such update rounds away,
    # which is what TRL's cast does to a 4-bit 7B's adapters at the seed recipe's rate.
    config = micro_config.override({"train.adapter_dtype": adapter_dtype, "lora.modules_to_save": [],
                                    "train.learning_rate": 1e-5, "train.warmup_steps": 0,
                                    "train.scheduler": "constant", "train.max_steps": 3, "train.save_steps": 100})
    torch.manual_seed(0)
    trainer, _, _ = build_trainer(_dataset(synth_coco), config, tmp_path / "train")
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {getattr(torch, adapter_dtype)}
    before = _lora_a(trainer.model)
    trainer.train()
    after = _lora_a(trainer.model)
    big = torch.cat([before[n].flatten().abs() > 1e-2 for n in before])  # entries a bf16 ulp can't follow
    changed = torch.cat([(after[n] != before[n]).flatten() for n in before])
    fraction = changed[big].float().mean().item()
    if adapter_dtype == "float32":  # all but entries whose gradient was exactly 0 (B starts at 0)
        assert fraction > 0.999, fraction
    else:
        assert fraction == 0.0, fraction


def test_adapter_dtype_is_validated():
    with pytest.raises(ConfigError, match="train.adapter_dtype='float16'"):
        TrainConfig(adapter_dtype="float16")


def test_all_linear_lora_stays_off_the_vision_tower(synth_coco, tmp_path):
    # Qwen2.5-VL's vision blocks have gate/up/down_proj too: without lora.exclude the nightly
    # targets would adapt the vision tower, which then no longer matches the base's image features
    config = load_preset("smoke", {"model.base": "tiny:qwen2_5_vl", "model.family": "qwen2_5_vl",
                                   "lora.modules_to_save": [], "train.max_steps": 1,
                                   "lora.target_modules": load_preset("qwen2.5-vl-7b-nutrition").lora.target_modules})
    trainer, _, _ = build_trainer(_dataset(synth_coco), config, tmp_path / "train")
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in trainer.model.named_parameters() if "lora_A" in n}
    assert adapted and not [n for n in adapted if "visual" in n]
    assert {n.rsplit(".", 1)[-1] for n in adapted} == set(config.lora.target_modules)
    # and the exclusion is what keeps it off: with none, the vision MLP is adapted
    trainer, _, _ = build_trainer(_dataset(synth_coco), config.override({"lora.exclude": ""}), tmp_path / "train2")
    assert any("visual" in n and "lora_A" in n for n, _ in trainer.model.named_parameters())


def test_vision_tower_stays_out_of_4bit_unless_asked(monkeypatch):
    monkeypatch.setattr(load, "has_cuda", lambda: True)
    kept = load.quantization_config(ModelConfig(quantization="nf4")).llm_int8_skip_modules
    # an explicit skip list replaces transformers' default (the output head): lm_head must be in it
    assert "lm_head" in kept and "model.visual" in kept
    assert load.quantization_config(ModelConfig(quantization="nf4", quantize_vision=True)).llm_int8_skip_modules is None
    nightly = load_preset("qwen2-vl-7b-nutrition")
    assert not nightly.model.quantize_vision and nightly.train.adapter_dtype == "float32"
