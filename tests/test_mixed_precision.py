"""The GPU's mixed-precision path on the CPU: a bf16 base with fp32 adapters and fp32 `modules_to_save`.

Issue 17: on the GPU, validation selection (`generate` outside the trainer's autocast, on the model
being trained) crashed with "expected mat1 and mat2 to have the same dtype" because the fp32 copy of
`lm_head` that `modules_to_save` trains got bf16 hidden states. Every CPU test trained in fp32, so
none saw it. Here each family's micro model trains as the GPU trains (bf16 base, CPU bf16 autocast,
fp32 trainable weights, `lm_head` and `embed_tokens` trained in full, validation picking the
checkpoint by val mAP), then is evaluated and merged through the library functions the step children
call.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from test_families import FAMILIES  # the same families and micro runs as the fp32 family tests
from vlmdet.config.settings import DataConfig

FULL = ["lm_head", "embed_tokens"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """20 synthetic images; 5 validation images with tables, so validation scores mAP."""
    from vlmdet.data import materialize, prepare

    root = tmp_path_factory.mktemp("mixed-data")
    cfg = DataConfig(dataset="synth:20", seed=5, val_fraction=0.25, test_fraction=0.25)
    raw = materialize(cfg.dataset, root / "raw", seed=cfg.seed, image_size=cfg.image_size)
    return prepare(raw, root / "prepared", cfg, source=cfg.dataset)


def mixed_config(family: str):
    """test_families' micro run of `family`, trained as the GPU trains it: bf16 base under bf16 autocast, fp32
    trainable weights, `lm_head` and `embed_tokens` in full, a checkpoint each step for validation to score."""
    from test_families import family_config

    return family_config(family).override({
        "model.dtype": "bfloat16", "train.bf16": True, "train.adapter_dtype": "float32", "train.save_steps": 1,
        "eval.preview_images": 1, "eval.val_max_images": 8, "lora.modules_to_save": FULL})


@pytest.fixture(scope="module", params=FAMILIES)
def run(request, prepared, tmp_path_factory):
    from vlmdet.data.images import open_image
    from vlmdet.prediction.evaluate import evaluate
    from vlmdet.publishing.merge import merge
    from vlmdet.data.samples import load_split
    from vlmdet.training.train import train

    family = request.param
    config = mixed_config(family)
    out = tmp_path_factory.mktemp(f"mixed-{family}")
    torch.manual_seed(0)
    adapter = train(prepared, config, out / "train")
    report = evaluate(adapter.path, prepared, config, out / "eval")
    test_samples, _ = load_split(prepared.splits["test"])
    merged = merge(adapter, config, out / "merged", [open_image(s.file) for s in test_samples[:2]])
    return dict(family=family, config=config, adapter=adapter, report=report, merged=merged)


def test_validation_scores_every_kept_checkpoint_of_the_mixed_model(run):
    validation = run["adapter"].validation
    assert validation["rule"].startswith("highest val mAP50"), validation
    assert [r["step"] for r in validation["checkpoints"]] == [1, 2]
    assert all(r["val_map50"] is not None and r["val_loss"] is not None for r in validation["checkpoints"])
    assert run["adapter"].selected_step == validation["chosen"]["step"]


def test_trainable_weights_are_fp32_and_the_full_modules_were_trained(run):
    weights = safetensors.torch.load_file(Path(run["adapter"].path) / "adapter_model.safetensors")
    full = {k: v for k, v in weights.items() if any(f".{m}." in k or k.endswith(f".{m}.weight") for m in FULL)}
    assert {m for m in FULL if any(m in k for k in full)} == set(FULL), sorted(weights)[:8]
    assert {v.dtype for v in weights.values()} == {torch.float32}


def test_evaluates_the_mixed_adapter(run, prepared):
    from vlmdet.decide.metrics import coco_map

    report = run["report"]
    again = coco_map(prepared.splits["test"], report.predictions)
    assert {k: again[k] for k in ("map", "map50", "map75")} == report.metrics()
    assert report.num_images == len(json.loads(Path(report.per_image).read_text())) > 0


def test_merges_the_trained_full_modules_into_the_bf16_model(run):
    """merge() itself checks base + adapter against the reloaded merged folder (and raises past bf16's
    bound); here: the fully trained fp32 modules are what the merged bf16 model holds, rounded once."""
    merged = run["merged"]
    assert json.loads((Path(merged.path) / "config.json").read_text())["model_type"] == run["family"]
    saved: dict[str, torch.Tensor] = {}
    for f in Path(merged.path).glob("*.safetensors"):
        saved.update(safetensors.torch.load_file(f))
    trained = safetensors.torch.load_file(Path(run["adapter"].path) / "adapter_model.safetensors")
    for module in FULL:
        mine = next(v for k, v in trained.items() if k.endswith(f"{module}.weight"))
        theirs = next(v for k, v in saved.items() if k.endswith(f"{module}.weight"))
        assert theirs.dtype == torch.bfloat16
        assert torch.equal(theirs, mine.to(torch.bfloat16)), module


def _peft_micro(tmp_path, modules_to_save):
    """A micro Qwen2-VL in bf16 with LoRA, `modules_to_save` copies and fp32 trainable weights, as training has it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vlmdet.modeling.tiny import build_tiny_model
    from vlmdet.training.precision import set_adapter_dtype

    path = build_tiny_model(tmp_path / "tiny", family="qwen2_vl", size="micro")
    base = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            modules_to_save=modules_to_save, task_type="CAUSAL_LM"))
    set_adapter_dtype(model, "float32")
    return model


@pytest.mark.parametrize("modules_to_save", [["lm_head"], ["embed_tokens"], ["lm_head", "embed_tokens", "norm"]])
def test_fp32_trained_copies_compute_like_the_base_outside_autocast(tmp_path, modules_to_save):
    """Fresh copies equal the modules they replace and LoRA-B starts at zero: outside autocast the mixed
    model must give the base's logits (to bf16 rounding), where it raised before."""
    torch.manual_seed(0)
    model = _peft_micro(tmp_path, modules_to_save).eval()
    trained = [n for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." in n]
    assert trained and all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trained)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert logits.dtype == base.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), base.float(), rtol=1.6e-2, atol=1e-2)


# embed_tokens is the copy where stepping aside shows: autocast leaves an embedding lookup in the copy's fp32,
# which the hooks would otherwise cast to the base's bf16 (lm_head's matmul is bf16 under autocast either way)
@pytest.mark.parametrize("modules_to_save", [["lm_head"], ["embed_tokens"]])
def test_under_autocast_the_copies_compute_as_training_always_did(tmp_path, modules_to_save):
    """The hooks step aside under autocast: the training forward is unchanged (bit-identical)."""
    from vlmdet.training.precision import _HOOKED

    torch.manual_seed(0)
    model = _peft_micro(tmp_path, modules_to_save)
    hooked_copies = {n for n, m in model.named_modules(remove_duplicate=False) if getattr(m, _HOOKED, None)}
    assert {n.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for n in hooked_copies} == set(modules_to_save)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hooked = model(input_ids=ids).logits
        for m in model.modules():
            for h in getattr(m, _HOOKED, ()):
                h.remove()
        plain = model(input_ids=ids).logits
    assert hooked.dtype == plain.dtype and torch.equal(hooked, plain)


def test_the_cpu_trains_under_bf16_autocast_only_when_the_base_is_bf16(tmp_path):
    from vlmdet.training.train import sft_config

    assert sft_config(mixed_config("qwen2_vl"), tmp_path).bf16 is True
    assert sft_config(mixed_config("qwen2_vl").override({"model.dtype": "auto"}), tmp_path).bf16 is False  # fp32 on CPU
    assert sft_config(mixed_config("qwen2_vl").override({"train.bf16": False}), tmp_path).bf16 is False
