"""Tiny Qwen-VL models built in-process: random weights, a tokenizer trained locally with the
family's special tokens, the family's chat template. Saved to a folder, they load through
`from_pretrained` exactly like a real checkpoint, so every code path of the real pipeline runs on
a CPU in seconds (the approach of transformers' own Qwen2-VL tests).
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# The special tokens of the Qwen2-VL tokenizer, in its order (ids are read back, never hard-coded).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL-Instruct's chat template without the video branch.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Sizes: "micro" for unit tests (fastest), "small" for the smoke preset (learns on a CPU in minutes).
SIZES = {
    "micro": dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, v_depth=2, v_dim=32, v_heads=4),
    "small": dict(hidden=128, layers=4, heads=4, kv_heads=2, inter=384, v_depth=4, v_dim=96, v_heads=4),
    # The committed pretrained base (scripts/pretrain_tiny_base.py, docs/tiny-base.md): ~4M params, 15 MB fp32.
    "grounding": dict(hidden=192, layers=6, heads=6, kv_heads=2, inter=576, v_depth=4, v_dim=128, v_heads=4),
}


def _corpus() -> list[str]:
    words = ("system user assistant You are a helpful assistant. Detect the nutrition-table in this image. "
             "None nutrition table label bbox_2d [ ] { } \" : , ( ) 0 1 2 3 4 5 6 7 8 9 object box There is no")
    return [words] * 50


def build_tokenizer(vocab_size: int = 384) -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # Digits one by one, as Qwen2's own pre-tokenizer does: coordinates are digit sequences.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                                model_max_length=32768)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(min_pixels: int, max_pixels: int) -> transformers.ProcessorMixin:
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tok = build_tokenizer()
    ip = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                            chat_template=CHAT_TEMPLATE)


def build_config(tokenizer, size: str = "micro") -> transformers.Qwen2VLConfig:
    s = SIZES[size]
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    head_dim = s["hidden"] // s["heads"]
    # mrope_section splits head_dim/2 rotary frequencies over (temporal, height, width).
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    text = dict(vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=s["inter"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0},
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    vision = dict(depth=s["v_depth"], embed_dim=s["v_dim"], hidden_size=s["hidden"], num_heads=s["v_heads"], mlp_ratio=2)
    return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def build_tiny_model(out: str | Path, family: str = "qwen2_vl", size: str = "micro", seed: int = 0,
                     min_pixels: int = 64 * 28 * 28, max_pixels: int = 256 * 28 * 28) -> Path:
    """Write a random tiny model of `family` with its processor to `out`; returns the folder."""
    if family != "qwen2_vl":
        return build_family(out, family=family, size=size, seed=seed, min_pixels=min_pixels, max_pixels=max_pixels)
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    processor = build_processor(min_pixels, max_pixels)
    config = build_config(processor.tokenizer, size)
    torch.manual_seed(seed)
    return save_random(transformers.Qwen2VLForConditionalGeneration(config), processor, out)


def save_random(model, processor, out: Path) -> Path:
    """A random-weight `model`, stopping at <|im_end|> as the Instruct checkpoints do, saved with the
    processor; written to a sibling folder first so a half-built model is never found."""
    model.generation_config.eos_token_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tmp.replace(out)
    return out


# --- Qwen2.5-VL and Qwen3-VL ----------------------------------------------------------------------
# Tiny random Qwen2.5-VL and Qwen3-VL models with their real processor classes, built the same way
# as the Qwen2-VL one above (a few layers, the locally trained tokenizer with the Qwen special
# tokens). What differs per family, and is why each has its own processor and config builder rather
# than a switch in Qwen2-VL's:
#
# - Qwen2.5-VL: 14 px patches, windowed vision attention (`window_size`, `fullatt_block_indexes`),
#   Qwen2-VL's chat template (a default system prompt), `Qwen2_5_VLProcessor`.
# - Qwen3-VL: 16 px patches (resize factor 32), learned vision position embeddings interpolated
#   over the grid, "deepstack" features from vision layers fed to the first text layers,
#   interleaved M-RoPE, explicit `head_dim`, no default system prompt in the chat template, image
#   mean/std 0.5, `Qwen3VLProcessor` with `Qwen3VLVideoProcessor`, and `mm_token_type_ids`, which
#   the processor returns and the model needs to place M-RoPE positions.

FAMILIES = ("qwen2_5_vl", "qwen3_vl")

# Qwen3-VL-Instruct's chat template without tools, video and vision ids: unlike Qwen2-VL it adds
# no system prompt of its own.
QWEN3_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _check(family: str, size: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} has no tiny builder here; choose one of {FAMILIES} "
                         f"(qwen2_vl: build_tiny_model)")
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not a tiny model size; choose one of {list(SIZES)}")


def _family_processor(family: str, min_pixels: int, max_pixels: int) -> transformers.ProcessorMixin:
    """The family's real processor classes around a locally trained tokenizer."""
    _check(family, "micro")
    tok = build_tokenizer()
    if family == "qwen2_5_vl":
        ip = transformers.Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
        return transformers.Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok,
                                                video_processor=transformers.Qwen2VLVideoProcessor(),
                                                chat_template=CHAT_TEMPLATE)
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    # Qwen3-VL's preprocessor_config: 16 px patches merged 2x2, mean/std 0.5 (not CLIP's).
    ip = transformers.Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                            image_std=[0.5] * 3, min_pixels=min_pixels, max_pixels=max_pixels)
    return transformers.Qwen3VLProcessor(image_processor=ip, tokenizer=tok,
                                         video_processor=transformers.Qwen3VLVideoProcessor(),
                                         chat_template=QWEN3_CHAT_TEMPLATE)


def _token_ids(tokenizer) -> dict:
    return {k: tokenizer.convert_tokens_to_ids(t) for k, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}


def _family_config(family: str, tokenizer, size: str = "micro") -> transformers.PretrainedConfig:
    _check(family, size)
    s = SIZES[size]
    head_dim = s["hidden"] // s["heads"]
    half = head_dim // 2  # rotary frequencies, split over (temporal, height, width) by mrope_section
    text = dict(vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=s["inter"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                max_position_embeddings=4096, rms_norm_eps=1e-6, pad_token_id=tokenizer.pad_token_id)
    if family == "qwen2_5_vl":
        mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # Qwen2.5-VL-7B: [16, 24, 24] of 64
        text.update(rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 1000000.0},
                    eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), bos_token_id=None)
        # window_size is in pixels: 56 px = 2x2 merged tokens a window, so a 64-token image has
        # several windows and the window/full attention split really runs.
        vision = dict(depth=s["v_depth"], hidden_size=s["v_dim"], intermediate_size=2 * s["v_dim"],
                      num_heads=s["v_heads"], out_hidden_size=s["hidden"], window_size=56,
                      fullatt_block_indexes=[s["v_depth"] - 1])
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                                             **_token_ids(tokenizer))
    # Qwen3-VL interleaves H and W frequencies every third index (recomposition_frequencies), so
    # each may take at most a third of them: Qwen3-VL: [24, 20, 20] of 64.
    hw = half * 20 // 64 or 1
    text.update(head_dim=head_dim, rope_parameters={"rope_type": "default", "mrope_section": [half - 2 * hw, hw, hw],
                                                    "mrope_interleaved": True, "rope_theta": 5000000.0})
    depth = s["v_depth"]
    # Deepstack: features after these vision layers are added to the first len(...) text layers.
    deepstack = list(range(1, depth))[: min(3, s["layers"])]
    vision = dict(depth=depth, hidden_size=s["v_dim"], intermediate_size=2 * s["v_dim"], num_heads=s["v_heads"],
                  out_hidden_size=s["hidden"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=64, deepstack_visual_indexes=deepstack)  # 8x8 learned grid, interpolated
    return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                                      **_token_ids(tokenizer))


def build_family(out: str | Path, family: str, size: str = "micro", seed: int = 0, min_pixels: int = 64 * 28 * 28,
          max_pixels: int = 256 * 28 * 28) -> Path:
    """Write a random tiny `family` model with its processor to `out` (kept if already built)."""
    _check(family, size)
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    processor = _family_processor(family, min_pixels, max_pixels)
    config = _family_config(family, processor.tokenizer, size)
    cls = (transformers.Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl"
           else transformers.Qwen3VLForConditionalGeneration)
    torch.manual_seed(seed)
    return save_random(cls(config), processor, out)
