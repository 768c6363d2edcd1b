"""Loading bases, adapters and merged models, the same way for every step.

`base` strings: a Hub id (`Qwen/Qwen2-VL-7B-Instruct`), a local folder, `tiny:FAMILY[:SIZE]` (a
random tiny model built in-process, for tests) or `asset:NAME` (a model shipped in vlmdet/assets).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlmdet.config.settings import ConfigError, ModelConfig
from vlmdet.formats.resize import pixel_budget

ASSETS = Path(__file__).resolve().parent.parent / "assets"

# Every from_pretrained of a model, adapter, config or processor: no code from the repository runs
# here (a Hub repo can ship Python that trust_remote_code=True would execute), and no pickle is
# unpickled (torch.load of a .bin can run arbitrary code). The repositories vlmdet writes itself
# hold safetensors only.
SAFE = {"trust_remote_code": False}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}  # Trainer's own files


class ModelError(ConfigError):
    """A model, adapter or processor that cannot or must not be loaded; the message says which, why and the fix."""


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

    processor = AutoProcessor.from_pretrained(path, **SAFE)
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

    kwargs: dict[str, Any] = {"dtype": dtype or torch_dtype(cfg), "attn_implementation": cfg.attn_implementation,
                              "use_safetensors": True, **SAFE}
    qc = quantization_config(cfg) if quantize else None
    if qc is not None:
        kwargs["quantization_config"] = qc
    if has_cuda():
        kwargs["device_map"] = device_map()
    check_safe_weights(path)
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
        check_safe_weights(path, adapter=True)
        model = PeftModel.from_pretrained(model, path)
        proc_src = path if (Path(path) / "preprocessor_config.json").is_file() or (Path(path) / "processor_config.json").is_file() else base
    else:
        model = load_model(path, cfg, quantize=False)
        proc_src = path
    model.eval()
    return model, load_processor(proc_src, cfg)


def family_of(path: str | Path) -> str:
    """The box-format family of a merged or adapter folder, from its (base's) config.json model_type
    (each format class lists the model types it answers for)."""
    from transformers import AutoConfig

    from vlmdet.formats.base import family_for_model_type, families

    src = adapter_base(path) if is_adapter(path) else str(path)
    model_type = AutoConfig.from_pretrained(src, **SAFE).model_type
    family = family_for_model_type(model_type)
    if family is None:
        raise ConfigError(f"{path}: model_type {model_type!r} is not a supported family ({', '.join(families())}); "
                          "pass --model.family if the model answers in one of their formats")
    return family


def saved_pixel_budget(path: str | Path) -> tuple[int, int] | None:
    """(min_pixels, max_pixels) of the processor saved with a model folder, if any."""
    from transformers import AutoImageProcessor

    try:
        ip = AutoImageProcessor.from_pretrained(str(path), **SAFE)
    except (OSError, ValueError):
        return None
    try:
        return pixel_budget(ip)
    except ValueError:  # not a Qwen-VL image processor: no budget to read
        return None


def _repo_files(name: str, what: str) -> list[str]:
    """The file names of Hub repo `name` (the cached snapshot when offline); ModelError when there is none."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    local = Path(name).expanduser().resolve()
    nothing = f"{what} {name}: no such folder or repository (no folder {local}"
    try:
        if constants.is_offline_mode():
            folder = Path(snapshot_download(name, local_files_only=True))
            return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
        return HfApi().list_repo_files(name)
    except HFValidationError:
        raise ModelError(f"{nothing}, and {name!r} is not a Hub repo id). Pass a model folder "
                         "(what save_pretrained wrote, e.g. WORKDIR/published) or ORG/NAME.") from None
    except LocalEntryNotFoundError:
        raise ModelError(f"{nothing}; HF_HUB_OFFLINE=1 and the HF cache holds no repository {name}). Check the "
                         "path, or download the model once with network access.") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{nothing}, and the Hub has no repository {name} that this token can read). "
                         "Check the path or the repo id (private repos need HF_TOKEN).") from None
    except (HfHubHTTPError, OSError, Exception) as err:  # noqa: BLE001 - refused, DNS, timeouts (httpx's or httpx2's)
        raise ModelError(f"{nothing}, and the Hub at {constants.ENDPOINT} could not be reached to look for a "
                         f"repository {name}: {type(err).__name__}). Check the path, or the network (with "
                         "HF_HUB_OFFLINE=1 a model in the HF cache is used).") from None


def check_model_source(name: str, what: str = "--model") -> str:
    """`name` as from_pretrained should get it: a model or adapter folder, or a Hub repo that exists.

    Fails (ModelError) before any download or weight is read: no such folder or repository, a
    folder that holds no saved model, or weights in pickle form only (see check_safe_weights).
    """
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not ((path / "config.json").is_file() or is_adapter(path)):
            raise ModelError(f"{what} {name}: not a saved model or adapter folder (no config.json or "
                             "adapter_config.json in it). Pass the folder save_pretrained wrote, e.g. "
                             "WORKDIR/published or WORKDIR/train/*/adapter.")
        check_safe_weights(path, adapter=is_adapter(path), what=what)
        return str(path.resolve())
    files = _repo_files(name, what)
    check_safe_weights(name, adapter="adapter_config.json" in files and "config.json" not in files, what=what,
                       files=files)
    return name


def check_safe_weights(source: str | Path, adapter: bool = False, what: str = "model",
                       files: list[str] | None = None) -> None:
    """Refuse a folder or repo whose weights exist only as pickles (pytorch_model.bin, adapter_model.bin).

    Unpickling runs whatever code the file names, so a checkpoint from a repository vlmdet did not
    write itself could take over the worker that holds the Hub token. `files`: the repo's file
    names (a Hub repo); a local folder is listed here; a Hub id without `files` is left to
    from_pretrained(use_safetensors=True), which refuses pickles on its own.
    """
    if files is None:
        folder = Path(source)
        if not folder.is_dir():
            return
        files = [p.name for p in folder.iterdir() if p.is_file()]
    names = [Path(f).name for f in files]
    if adapter:
        safe = "adapter_model.safetensors" in names
        pickles = [n for n in names if n.startswith("adapter_model") and n.endswith(PICKLE_SUFFIXES)]
        fix = "PeftModel.from_pretrained(base, PATH).save_pretrained(OUT)  # writes adapter_model.safetensors"
    else:
        safe = any(n.endswith(".safetensors") for n in names)
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES) and n not in NOT_WEIGHTS]
        fix = "AutoModelForImageTextToText.from_pretrained(PATH).save_pretrained(OUT)  # writes model.safetensors"
    if safe:
        return
    if pickles:
        raise ModelError(f"{what} {source}: refusing {', '.join(sorted(pickles)[:3])}: its weights exist only as "
                         "pickle files, and unpickling a checkpoint can run arbitrary code, so vlmdet loads "
                         f"safetensors only. Convert it once where you trust it: {fix}, and pass OUT.")
    raise ModelError(f"{what} {source}: no {'adapter_model.safetensors' if adapter else '*.safetensors weights'} "
                     "in it; pass a folder or repo that save_pretrained wrote.")
