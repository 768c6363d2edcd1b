"""train.liger_kernels on a GPU: the trainer vlmdet builds has Liger's RMSNorm in every RMSNorm of the model.

The CPU suite shows the setting reaches the trainer's arguments (tests/test_liger.py); only here can
the kernels be applied and run. transformers applies them when training starts (Trainer.train,
integrations.liger), patching the instances the trainer holds
(liger_kernel.transformers.monkey_patch._patch_rms_norm_module): each keeps its class and gets
LigerRMSNorm's forward and name, which is what is asserted. The smoke preset's shipped tiny Qwen2-VL
(a few seconds); the same code path as the nightly profiles, which turn the setting on.

    pytest -m gpu tests/gpu/test_liger_gpu.py
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from vlmdet.config.settings import load_preset
    from vlmdet.data import materialize, prepare

    cfg = load_preset("smoke", {"data.dataset": "synth:24"}).data
    root = tmp_path_factory.mktemp("data")
    raw = materialize(cfg.dataset, root / "raw", seed=cfg.seed, image_size=cfg.image_size)
    return prepare(raw, root / "prepared", cfg, source=cfg.dataset)


@pytest.fixture
def plain_transformers_after():
    """Liger also patches transformers' Qwen2-VL module for the whole process (Qwen2RMSNorm = LigerRMSNorm,
    the model's forward, ...; apply_liger_kernel_to_qwen2_vl): a training child process ends with it, a test
    process does not. Put the module back so later models of this process (the 7B tests) are plain."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl as module

    saved = dict(vars(module))
    classes = {c: dict(vars(c)) for c in saved.values() if isinstance(c, type) and c.__module__ == module.__name__}
    yield
    for name in set(vars(module)) - set(saved):
        delattr(module, name)
    for name, value in saved.items():
        setattr(module, name, value)
    for cls, attrs in classes.items():
        for name in set(vars(cls)) - set(attrs):
            delattr(cls, name)
        for name, value in attrs.items():
            if vars(cls).get(name) is not value:
                setattr(cls, name, value)


def _norms(trainer) -> dict[str, torch.nn.Module]:
    model = trainer.model.get_base_model()
    return {name: m for name, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")}


# on first: the plain run after it also shows that plain_transformers_after undid Liger's patches
@pytest.mark.parametrize("liger", [True, False])
def test_the_trainer_built_with_liger_kernels_has_ligers_rmsnorm(liger, dataset, tmp_path, plain_transformers_after):
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    from vlmdet.config.settings import load_preset
    from vlmdet.training.train import build_trainer

    config = load_preset("smoke", {"data.dataset": "synth:24", "train.profile": "preset", "train.max_steps": 2,
                                   "train.liger_kernels": liger, "train.save_steps": 2, "train.logging_steps": 1,
                                   "eval.val_max_images": 0})
    trainer, _, _ = build_trainer(dataset, config, tmp_path / "train")
    assert trainer.args.use_liger_kernel is liger
    trainer.train()  # two optimizer steps: the kernels are applied as training starts, then run
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v in losses)
    norms = _norms(trainer)
    # the decoder's input and post-attention norms of every layer, and its final norm
    layers = trainer.model.get_base_model().config.text_config.num_hidden_layers
    assert len(norms) == 2 * layers + 1, sorted(norms)
    patched = {name for name, m in norms.items()
               if getattr(m.forward, "__func__", None) is LigerRMSNorm.forward and m._get_name() == "LigerRMSNorm"}
    assert patched == (set(norms) if liger else set())
