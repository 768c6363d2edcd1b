"""Mixed precision of the model being trained: a bf16 (or 4-bit, bf16 compute) base with fp32 trainable weights.

Under the trainer's bf16 autocast every matmul runs in bf16 whatever the weights' dtype, so fp32
master weights cost nothing in the forward. Outside autocast (validation selection's `generate`, an
in-process evaluation, a merge check, the trainer's own eval loop where it does not autocast) the
dtypes must agree by themselves:

- LoRA layers: PEFT casts their input to the adapter's dtype and the result back (lora/layer.py).
- `modules_to_save` copies (`lm_head`, `embed_tokens`, a norm, any module a user lists): PEFT calls
  the fp32 copy on the bf16 hidden states as they are, and `F.linear` raises "expected mat1 and mat2
  to have the same dtype" (validation selection's `generate` on a GPU, with `lm_head` among them).
  `base_dtype_outside_autocast` gives each such copy what PEFT gives LoRA layers: its input in its own
  dtype, its output in the dtype of the module it replaces, so the rest of the model sees the dtype
  it would see from the base. Under autocast the hooks step aside, so training computes exactly what it
  would without them.
"""
from __future__ import annotations

from typing import Any

import torch


def set_adapter_dtype(model, dtype_name: str) -> int:
    """Cast the trainable (LoRA and modules_to_save) weights to `dtype_name`; returns how many tensors.

    SFTTrainer casts them to bf16 when the base is 4-bit (trl sft_trainer.py, "following the QLoRA
    paper"). A LoRA-A entry of Qwen2-VL-7B starts near 0.017 (kaiming over 3,584 inputs), where a
    bf16 step is 6e-5..1.2e-4, while AdamW moves a weight by about lr: at lr 1e-5 most updates round
    to nothing (measured in bf16: 14% of LoRA-A entries changed in 10 steps). fp32 master weights cost 8 bytes
    a LoRA parameter more (weight + grad) and keep every update; the forward still computes in bf16
    under autocast. Done before the optimizer exists (Trainer builds it in train()), so its state is
    fp32 too. The model then computes correctly outside autocast as well (base_dtype_outside_autocast).
    """
    dtype = getattr(torch, dtype_name)
    n = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype and param.is_floating_point():
            param.data = param.data.to(dtype)
            n += 1
    base_dtype_outside_autocast(model)
    return n


def _float_dtype(module: torch.nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors (also inside tuples, lists, dicts and model outputs) in `dtype`; the rest as is."""
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, dict):  # ModelOutput is a dict too: set its items in place
        for k in list(value.keys()):
            value[k] = _cast(value[k], dtype)
        return value
    return value


def _autocasting(args: tuple, kwargs: dict) -> bool:
    first = next((v for v in (*args, *kwargs.values()) if torch.is_tensor(v)), None)
    device = first.device.type if first is not None else "cpu"
    return torch.is_autocast_enabled(device)


_HOOKED = "_vlmdet_base_dtype_hooks"


def base_dtype_outside_autocast(model) -> list[str]:
    """Hook every `modules_to_save` copy (see the module docstring): outside autocast its input comes in
    its own dtype and its output goes out in the dtype of the module it replaces. The dtypes are read
    at each call, so a later cast of either changes nothing; where they agree the hooks do nothing.
    Idempotent; returns the names of the copies hooked by this call."""
    from peft.utils.other import ModulesToSaveWrapper

    hooked = []
    for name, wrapper in model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        for adapter, copy in wrapper.modules_to_save.items():
            if getattr(copy, _HOOKED, None):
                continue

            def before(module, args, kwargs):
                inner = _float_dtype(module)
                if inner is None or _autocasting(args, kwargs):
                    return None
                return _cast(args, inner), _cast(kwargs, inner)

            def after(module, args, kwargs, output, wrapper=wrapper):
                outer = _float_dtype(wrapper.original_module)
                if outer is None or outer == _float_dtype(module) or _autocasting(args, kwargs):
                    return output
                return _cast(output, outer)

            setattr(copy, _HOOKED, (copy.register_forward_pre_hook(before, with_kwargs=True),
                                    copy.register_forward_hook(after, with_kwargs=True)))
            hooked.append(f"{name}.modules_to_save.{adapter}")
    return hooked
