"""Merging: the merged folder answers exactly as base + adapter, and a bad merge is refused."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmdet.data.images import open_image
from vlmdet.publishing.merge import MergeMismatch, check_batch, merge
from vlmdet.run.records import AdapterRef
from vlmdet.data.samples import load_split


@pytest.fixture
def trained_adapter(tiny_model, tmp_path):
    """An adapter whose B matrices are random (fresh LoRA has B = 0, which any merge reproduces),
    with lm_head trained in full beside it (lora.modules_to_save, as the smoke preset does)."""
    torch.manual_seed(1)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    for name, p in peft.named_parameters():
        if "lora_B" in name or ("modules_to_save" in name and "lm_head" in name):
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path / "adapter"
    peft.save_pretrained(path)
    AutoProcessor.from_pretrained(tiny_model).save_pretrained(path)
    return AdapterRef(path=str(path), base_model=tiny_model, family="qwen2_vl", global_step=1)


def _images(synth_coco, n=2):
    samples, _ = load_split(synth_coco)
    return [open_image(s.file) for s in samples[:n]]


def test_merged_model_matches_base_plus_adapter(trained_adapter, micro_config, synth_coco, tmp_path):
    images = _images(synth_coco)
    merged = merge(trained_adapter, micro_config, tmp_path / "merged", images)
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()

    # independent check through plain transformers + peft, as a user would load them
    processor = AutoProcessor.from_pretrained(merged.path)
    batch = check_batch(processor, images, micro_config)
    base = AutoModelForImageTextToText.from_pretrained(trained_adapter.base_model)
    with torch.no_grad():
        plain_base = base(**batch).logits
        expected = PeftModel.from_pretrained(base, trained_adapter.path).eval()(**batch).logits
        got = AutoModelForImageTextToText.from_pretrained(merged.path).eval()(**batch).logits
    assert (expected - plain_base).abs().max() > 1e-2, "the adapter should change the logits"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert merged.max_abs_logit_diff < 1e-4


def test_a_merge_that_loses_the_adapter_is_refused(trained_adapter, micro_config, synth_coco, tmp_path, monkeypatch):
    # a merge that silently drops the adapter (e.g. wrong target modules) must not be published
    from peft.tuners.lora import LoraModel

    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())
    with pytest.raises(MergeMismatch, match="differs from base \\+ adapter"):
        merge(trained_adapter, micro_config, tmp_path / "merged", _images(synth_coco))
    assert not (tmp_path / "merged").exists()
