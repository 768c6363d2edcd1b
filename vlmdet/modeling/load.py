"""Loading bases, adapters and merged models, the same way for every step.

`base` strings: a Hub id (`Qwen/Qwen2-VL-7B-Instruct`), a local folder, `tiny:FAMILY[:SIZE]` (a
random tiny model built in-process, for tests) or `asset:NAME` (a model shipped in vlmdet/assets).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlmdet.config import ConfigError, ModelConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def resolve_base(base: str, cache_dir: str | Path, model_cfg: ModelConfig | None = None) -> str:
    """A path or Hub id that `from_pretrained` understands."""
    if base.startswith("tiny:"):
        from vlmdet.modeling.tiny import build_tiny_model

        family, _, size = base[5:].partition(":")
        # absolute: PEFT writes this path into adapter_config.json, read later from anywhere
        out = Path(cache_dir).resolve() / f"tiny-{family}-{size or 'micro'}"
        kw = {"min_pixels": model_cfg.min_pixels, "max_pixels": model_cfg.max_pixels} if model_cfg else {}
        return str(build_tiny_model(out, family=family, size=size or "micro", **kw))
    if base.startswith("asset:"):
        path = ASSETS / base[6:]
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.base={base!r}: no model at {path}; shipped assets: "
                              f"{', '.join(p.name for p in ASSETS.iterdir()) if ASSETS.is_dir() else 'none'}")
        return str(path)
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.base={base!r} is a folder without config.json; expected a saved model folder.")
        return str(path.resolve())
    return base  # a Hub id: from_pretrained downloads it (or reads the HF cache when offline)


def has_cuda() -> bool:
    return torch.cuda.is_available()


def torch_dtype(cfg: ModelConfig) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if has_cuda() else torch.float32
    return getattr(torch, cfg.dtype)


def quantization_config(cfg: ModelConfig):
    """nf4 + double quant with bf16 compute (QLoRA), or None."""
    if cfg.quantization == "none":
        return None
    if not has_cuda():
        raise ConfigError("model.quantization='nf4' needs a CUDA GPU (bitsandbytes 4-bit); "
                          "on a CPU set --model.quantization none.")
    from transformers import BitsAndBytesConfig

    # bnb_4bit_compute_dtype (not compute_type: transformers ignores unknown names silently).
    kw: dict[str, Any] = {}
    if not cfg.quantize_vision:
        kw["llm_int8_skip_modules"] = UNQUANTIZED_VISION
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, **kw)


# Modules kept in bf16 when model.quantize_vision is off. An explicit skip list replaces transformers'
# default one (the output head), so lm_head is named again. Module names differ between transformers
# versions ("model.visual" in 5.x, "visual" before; matching is by prefix, by regex and by suffix, or by
# substring in older releases), so both spellings are listed; tests/gpu checks no Linear4bit is left
# under "visual" on the GPU machine's transformers.
UNQUANTIZED_VISION = ["model.visual", "visual", "lm_head"]


def load_processor(path: str, cfg: ModelConfig):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    # The pixel budget bounds visual tokens per image: a 4000 px photo is resized to fit it.
    processor.image_processor.size = {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}
    for name in ("min_pixels", "max_pixels"):  # older processors read these attributes directly
        if hasattr(processor.image_processor, name):
            setattr(processor.image_processor, name, getattr(cfg, name))
    return processor


def device_map() -> Any:
    if not has_cuda():
        return None
    import os

    # One process per GPU under accelerate/torchrun: each loads its replica on its own device.
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


def load_model(path: str, cfg: ModelConfig, quantize: bool = True, dtype: torch.dtype | None = None):
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"dtype": dtype or torch_dtype(cfg), "attn_implementation": cfg.attn_implementation}
    qc = quantization_config(cfg) if quantize else None
    if qc is not None:
        kwargs["quantization_config"] = qc
    if has_cuda():
        kwargs["device_map"] = device_map()
    return AutoModelForImageTextToText.from_pretrained(path, **kwargs)


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | Path) -> str:
    return json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]


def load_for_inference(path: str, cfg: ModelConfig):
    """(model, processor) for a merged folder or an adapter folder (base read from its config)."""
    path = str(path)
    if is_adapter(path):
        from peft import PeftModel

        base = adapter_base(path)
        model = load_model(base, cfg)
        model = PeftModel.from_pretrained(model, path)
        proc_src = path if (Path(path) / "preprocessor_config.json").is_file() or (Path(path) / "processor_config.json").is_file() else base
    else:
        model = load_model(path, cfg, quantize=False)
        proc_src = path
    model.eval()
    return model, load_processor(proc_src, cfg)


FAMILY_BY_MODEL_TYPE = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}


def family_of(path: str | Path) -> str:
    """The box-format family of a merged or adapter folder, from its (base's) config.json model_type."""
    from transformers import AutoConfig

    src = adapter_base(path) if is_adapter(path) else str(path)
    model_type = AutoConfig.from_pretrained(src).model_type
    if model_type not in FAMILY_BY_MODEL_TYPE:
        raise ConfigError(f"{path}: model_type {model_type!r} is not a supported family "
                          f"({', '.join(FAMILY_BY_MODEL_TYPE)})")
    return FAMILY_BY_MODEL_TYPE[model_type]


def saved_pixel_budget(path: str | Path) -> tuple[int, int] | None:
    """(min_pixels, max_pixels) of the processor saved with a model folder, if any."""
    from transformers import AutoImageProcessor

    try:
        ip = AutoImageProcessor.from_pretrained(str(path))
    except (OSError, ValueError):
        return None
    size = getattr(ip, "size", None) or {}
    lo, hi = size.get("shortest_edge"), size.get("longest_edge")
    return (int(lo), int(hi)) if lo and hi else None
