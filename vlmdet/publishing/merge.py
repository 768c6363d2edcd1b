"""Merge a LoRA adapter into its base, unquantized, and prove the merge changed nothing.

QLoRA trains against a 4-bit base, but the published model must be plain weights: the base is
reloaded in bf16 (fp32 on a CPU), the adapter merged in, the result saved as safetensors with the
processor, then reloaded from disk and compared with base + adapter on a fixed batch. A merge that
does not reproduce the adapter's logits fails loudly instead of publishing a different model. The
MergedRef it returns pins the folder's bytes (each file's sha256), which the evaluation of the merged
model and the publication check.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlmdet.config.settings import RunConfig
from vlmdet.modeling.load import adapter_base, check_safe_weights, load_model, load_processor, torch_dtype
from vlmdet.prediction.predict import GREEDY, stop_token_ids
from vlmdet.run.records import AdapterRef, MergedRef
from vlmdet.data.samples import user_message
from vlmdet.run.timeline import folder_bytes, phase

if TYPE_CHECKING:
    from transformers import GenerationConfig

log = logging.getLogger(__name__)


class MergeMismatch(RuntimeError):
    pass


def check_batch(processor, images: list, config: RunConfig) -> dict:
    text = processor.apply_chat_template([user_message(config.model.prompt, config.data.category)], add_generation_prompt=True)
    return processor(text=[text] * len(images), images=images, return_tensors="pt", padding=True, padding_side="left")


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    batch = batch.to(model.device)
    return model(**batch).logits.float().cpu()  # [batch, seq, vocab]


def tolerance(dtype: torch.dtype, scale: float, adapter_effect: float = 0.0) -> float:
    # fp32 merges agree to rounding; bf16 keeps 8 mantissa bits, so W + BA rounds differently from
    # W x + B(A x): allow a few bf16 ulps of the logits' scale. Through 28 layers that rounding
    # alone grows past it (Qwen2-VL-7B, tests/gpu: bf16 vs fp32 of the *same* base differ by 0.44
    # on logits of scale 6.7, tolerance 0.27), so in bf16 half the adapter's own effect on the
    # logits is allowed too: a merge that lost the adapter (or scaled it wrongly) misses by the
    # whole effect and is still refused.
    if dtype == torch.float32:
        return 1e-4 * max(1.0, scale)
    return max(4e-2 * max(1.0, scale), 0.5 * adapter_effect)


def published_generation_config(base: GenerationConfig, tokenizer, max_new_tokens: int) -> GenerationConfig:
    """The decoding the model was measured with, as its generation_config.json: a plain
    `model.generate(**inputs)` (transformers, a pipeline, vLLM) then gives the card's boxes. The base's
    file would bring sampling and repetition_penalty (Qwen2-VL-7B-Instruct ships 1.05, which
    penalises a coordinate digit already written)."""
    gc = copy.deepcopy(base)
    gc.update(**GREEDY)
    gc.eos_token_id = sorted(stop_token_ids(tokenizer))  # both: <|im_end|> ends the turn, <|endoftext|> the text
    gc.pad_token_id = tokenizer.pad_token_id
    gc.max_new_tokens = max_new_tokens  # the answer length evaluation allowed; transformers' default is 20 in all
    gc.validate(strict=True)
    return gc


def merge(adapter: AdapterRef | str, config: RunConfig, out: str | Path, images: list) -> MergedRef:
    """Merge the adapter folder into its base; save to OUT; check logits on `images` (PIL, RGB)."""
    with phase("imports"):
        from peft import PeftModel

    adapter_path = adapter.path if isinstance(adapter, AdapterRef) else str(adapter)
    check_safe_weights(adapter_path, adapter=True, what="adapter")  # PEFT would unpickle an adapter_model.bin
    base = adapter_base(adapter_path)
    out = Path(out)
    dtype = torch_dtype(config.model)
    with phase("processor"):
        processor = load_processor(adapter_path, config.model)
        batch = check_batch(processor, images, config)

    with phase("load weights", nbytes=folder_bytes(base)):  # the base unquantized, then the adapter on it
        model = PeftModel.from_pretrained(load_model(base, config.model, quantize=False, dtype=dtype), adapter_path)
    model.eval()
    with phase("check"):  # base + adapter's logits, the reference the merged model must reproduce
        expected = _logits(model, batch)
        with model.disable_adapter():
            effect = (_logits(model, batch) - expected).abs().max().item()  # what the adapter changes
    with phase("merge"):
        merged = model.merge_and_unload()
    merged.generation_config = published_generation_config(merged.generation_config, processor.tokenizer,
                                                           config.eval.max_new_tokens)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with phase("save") as saved:
        merged.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        saved["bytes"] = folder_bytes(tmp)
    del model, merged
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # The pin: each saved file's sha256 (save_pretrained writes through safetensors, which offers no hook to
    # hash while writing). Hashed in a thread while the reloaded model is checked: both read the same files
    # from the page cache, neither writes them, and the check's seconds are mostly the GPU's. The evaluation of
    # the merged model and the publication recompute these hashes and refuse other bytes.
    with ThreadPoolExecutor(max_workers=1) as hashing:
        started = time.perf_counter()
        pinning = hashing.submit(lambda: (MergedRef.pinned(tmp, base, 0.0), time.perf_counter() - started))
        with phase("check"):  # the saved folder reloaded answers as base + adapter did
            reloaded = load_model(str(tmp), config.model, quantize=False, dtype=dtype)
            reloaded.eval()
            got = _logits(reloaded, batch)
        with phase("hash"):  # what is left of it once the check is done
            pinned, hash_s = pinning.result()
    diff = (got - expected).abs().max().item()
    tol = tolerance(dtype, expected.abs().max().item(), effect)
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    log.info("merge check: max |logit diff| %.3g (tolerance %.3g; the adapter moves them %.3g), greedy tokens "
             "agree %.1f%%", diff, tol, effect, 100 * agree)
    if diff > tol:
        raise MergeMismatch(f"merged model differs from base + adapter: max |logit diff| {diff:.4g} > {tol:.4g} "
                            f"(the adapter itself moves them {effect:.4g}) "
                            f"on {len(images)} images; not publishing. Adapter: {adapter_path}")
    log.info("merged model pinned: %d files, sha256 %s (%.1f s, beside the check)", len(pinned.files),
             pinned.sha256, hash_s)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return dataclasses.replace(pinned, path=str(out.resolve()), max_abs_logit_diff=diff)
