"""train.liger_kernels reaches the trainer on a CUDA machine (the CUDA boundary faked on the CPU).

Liger's Triton kernels cannot run here, so the trainer is not trained: the SFTConfig the product builds
and the arguments it hands to SFTTrainer are intercepted, and the test stops there. That the kernels
are in the model once the trainer is built on a real GPU is tests/gpu/test_liger_gpu.py; that they stay
out where they cannot run is tests/test_perf_levers.py::test_liger_kernels_fall_back_where_they_cannot_run.
"""
from __future__ import annotations

import types

import pytest
import torch

from vlmdet.run.records import DatasetRef


class Handed(Exception):
    """Raised by the stand-in SFTTrainer once it has what build_trainer handed it."""

    def __init__(self, kwargs: dict):
        super().__init__("SFTTrainer built")
        self.kwargs = kwargs


def _trainer_arguments(config, coco, tmp_path, monkeypatch) -> tuple[dict, types.SimpleNamespace]:
    """What vlmdet.training.train.build_trainer hands to SFTTrainer on a machine where CUDA is there, and
    the keyword arguments it built the SFTConfig from."""
    import trl

    from vlmdet.modeling.load import load_model
    from vlmdet.training import train as train_module

    # the weights load on the CPU before CUDA is faked (the faked machine would place them on cuda:0)
    model = load_model(config.model.base, config.model)
    monkeypatch.setattr(train_module, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # vlmdet.modeling.load.has_cuda reads it

    built = {}

    def sft_config(**kwargs):  # TrainingArguments' own checks would look for a real GPU (bf16, the device)
        built.update(kwargs)
        return types.SimpleNamespace(**kwargs)

    class SFTTrainer:
        def __init__(self, *args, **kwargs):
            raise Handed(kwargs)

    monkeypatch.setattr(trl, "SFTConfig", sft_config)
    monkeypatch.setattr(trl, "SFTTrainer", SFTTrainer)
    data = DatasetRef(fingerprint="t", root=str(coco.parent), splits={"train": str(coco), "test": str(coco)}, counts={})
    with pytest.raises(Handed) as handed:
        train_module.build_trainer(data, config, tmp_path / "t")
    return handed.value.kwargs, built


@pytest.mark.parametrize("wanted", [True, False])
def test_the_trainer_gets_liger_kernels_on_a_cuda_machine_when_the_setting_asks(
        wanted, synth_coco, micro_config, tmp_path, monkeypatch):
    handed, built = _trainer_arguments(micro_config.override({"train.liger_kernels": wanted}), synth_coco, tmp_path,
                                       monkeypatch)
    assert handed["args"].use_liger_kernel is wanted
    assert handed["args"].use_cpu is False  # the machine really looked like a CUDA one to the product
    monkeypatch.undo()
    # TRL takes what the product built, under that name: a misspelt field would raise here, a wrong
    # default would show (transformers turns it on by itself for PEFT models when left out)
    from trl import SFTConfig

    real = SFTConfig(**{**built, "use_cpu": True, "bf16": False})
    assert real.use_liger_kernel is wanted
