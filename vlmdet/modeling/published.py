"""Full-size models with random weights, built from the published configs.

No weights can be downloaded on the GPU machines that measure speed, memory and whether an adapter
moves, so the architecture is rebuilt from the published config.json (same shapes, same FLOPs,
same memory) with random bf16 weights, initialised directly on the GPU (seconds, not the minutes a
CPU takes for 8.3B parameters), and saved with vlmdet's Qwen2-VL processor (its small tokenizer
carries the family's special tokens; the model's vocabulary stays the published 152,064).
Used by tests/gpu and benchmarks/.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

# Qwen/Qwen2-VL-7B-Instruct config.json: text and vision towers (8.29B parameters).
QWEN2_VL_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                        rms_norm_eps=1e-6,
                        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
QWEN2_VL_7B_VISION = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4)


def qwen2_vl_7b_config(tokenizer, text_layers: int | None = None):
    from transformers import Qwen2VLConfig

    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(QWEN2_VL_7B_TEXT, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id)
    if text_layers:  # the same layer shapes, fewer of them: a run of the whole pipeline in less time and disk
        text["num_hidden_layers"] = text_layers
    return Qwen2VLConfig(text_config=text, vision_config=dict(QWEN2_VL_7B_VISION), tie_word_embeddings=False, **ids)


def build_random_qwen2_vl_7b(out: str | Path, min_pixels: int = 256 * 28 * 28, max_pixels: int = 1024 * 28 * 28,
                             seed: int = 0, text_layers: int | None = None) -> Path:
    """A random-weight Qwen2-VL-7B-Instruct folder (bf16, ~16.6 GB) with a processor; reused when present.

    text_layers: keep only that many of the 28 decoder layers (each 0.23B; the vision tower, embeddings and
    LM head stay whole), e.g. 4 for a 2.7B model of the 7B's shapes that the GPU check's nightly runs use."""
    from transformers import Qwen2VLForConditionalGeneration

    from vlmdet.modeling.tiny import build_processor, save_random

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    processor = build_processor(min_pixels, max_pixels)
    config = qwen2_vl_7b_config(processor.tokenizer, text_layers)
    t = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    save_random(model, processor, out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"[random-7b] built and saved {out} in {time.perf_counter() - t:.0f} s", flush=True)
    return out
