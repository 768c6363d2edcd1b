"""Model loading: the QLoRA quantization config is what the recipe says, bases resolve clearly."""
from __future__ import annotations

import pytest
import torch

from vlmdet.config.settings import ConfigError, ModelConfig
from vlmdet.modeling import load


def test_nf4_config_has_bf16_compute_and_double_quant(monkeypatch):
    monkeypatch.setattr(load, "has_cuda", lambda: True)
    qc = load.quantization_config(ModelConfig(quantization="nf4"))
    assert qc.load_in_4bit and qc.bnb_4bit_quant_type == "nf4" and qc.bnb_4bit_use_double_quant
    # the field transformers reads; a misspelt kwarg (bnb_4bit_compute_type) would leave fp32 here
    assert qc.bnb_4bit_compute_dtype == torch.bfloat16
    assert load.quantization_config(ModelConfig(quantization="none")) is None


def test_nf4_without_cuda_fails_before_loading(monkeypatch):
    monkeypatch.setattr(load, "has_cuda", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU.*--model.quantization none"):
        load.quantization_config(ModelConfig(quantization="nf4"))


def test_base_resolution(tmp_path, tiny_model):
    assert load.resolve_base(tiny_model, tmp_path) == tiny_model
    assert load.resolve_base("Qwen/Qwen2-VL-7B-Instruct", tmp_path) == "Qwen/Qwen2-VL-7B-Instruct"  # a Hub id
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="without config.json"):
        load.resolve_base(str(tmp_path / "empty"), tmp_path)
    with pytest.raises(ConfigError, match="no model at"):
        load.resolve_base("asset:does-not-exist", tmp_path)


def test_processor_gets_the_configured_pixel_budget(tiny_model):
    proc = load.load_processor(tiny_model, ModelConfig(min_pixels=32 * 28 * 28, max_pixels=64 * 28 * 28))
    from PIL import Image

    grid = proc.image_processor(images=[Image.new("RGB", (2000, 1500))], return_tensors="pt")["image_grid_thw"][0]
    # 64 visual tokens after the 2x2 merge at most: a 2000 px photo is resized to the budget
    assert int(grid[1] * grid[2]) // 4 <= 64
    assert load.family_of(tiny_model) == "qwen2_vl"
