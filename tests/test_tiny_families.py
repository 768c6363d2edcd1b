"""Tiny Qwen2.5-VL / Qwen3-VL models load like real checkpoints and run through their processors."""
import pytest
import torch
from PIL import Image

from vlmdet.formats import get_format
from vlmdet.formats.resize import pixel_budget, smart_resize
from vlmdet.modeling import tiny
from vlmdet.modeling.tiny import build_tiny_model

MIN_PIXELS, MAX_PIXELS = 16 * 28 * 28, 64 * 28 * 28  # small budgets keep the image token count low
EXPECTED = {  # family: (model class, processor class, patch size, system prompt by default)
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", 14, True),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", 16, False),
}


@pytest.fixture(scope="module", params=list(EXPECTED))
def loaded(request, tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    family = request.param
    path = build_tiny_model(tmp_path_factory.mktemp(family) / "model", family=family, min_pixels=MIN_PIXELS,
                            max_pixels=MAX_PIXELS)
    return family, path, AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)


def chat(processor, image, text="Detect the nutrition-table."):
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def test_loads_as_the_family(loaded):
    family, _, model, processor = loaded
    model_cls, processor_cls, patch, _ = EXPECTED[family]
    assert type(model).__name__ == model_cls and type(processor).__name__ == processor_cls
    assert processor.image_processor.patch_size == model.config.vision_config.patch_size == patch
    tok = processor.tokenizer
    for key, token in [("image_token_id", "<|image_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
                       ("vision_end_token_id", "<|vision_end|>"), ("video_token_id", "<|video_pad|>")]:
        assert getattr(model.config, key) == tok.convert_tokens_to_ids(token) != tok.unk_token_id
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("width, height", [(300, 200), (900, 700)])  # the second is above MAX_PIXELS
def test_image_tokens_match_the_grid(loaded, width, height):
    family, _, _, processor = loaded
    patch = EXPECTED[family][2]
    inputs = chat(processor, Image.new("RGB", (width, height)))
    rh, rw = smart_resize(height, width, factor=patch * 2, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert inputs["image_grid_thw"][0].tolist() == [1, rh // patch, rw // patch]
    n_image_tokens = (inputs["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()
    assert n_image_tokens == (rh // patch) * (rw // patch) // 4  # 2x2 patches merge into one token


def test_format_frame_is_the_processor_frame(loaded):
    # Qwen2.5-VL answers in pixels of the image the processor produced: a format built from the
    # saved processor's budget must see the same frame, for an image above the budget too.
    family, _, _, processor = loaded
    assert pixel_budget(processor) == (MIN_PIXELS, MAX_PIXELS)
    fmt = get_format("qwen2_5_vl", *pixel_budget(processor))
    if family == "qwen2_5_vl":
        for width, height in [(300, 200), (1500, 900)]:
            _, gh, gw = chat(processor, Image.new("RGB", (width, height)))["image_grid_thw"][0].tolist()
            assert fmt.resized(width, height) == (gw * 14, gh * 14)


def test_chat_template_of_the_family(loaded):
    family, _, _, processor = loaded
    text = processor.tokenizer.decode(chat(processor, Image.new("RGB", (64, 64)))["input_ids"][0])
    assert text.startswith("<|im_start|>system\n") == EXPECTED[family][3]
    assert text.endswith("Detect the nutrition-table.<|im_end|>\n<|im_start|>assistant\n")


def test_generates_and_trains(loaded):
    _, _, model, processor = loaded
    inputs = chat(processor, Image.new("RGB", (200, 150), "red"))
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert 1 <= out.shape[1] - inputs["input_ids"].shape[1] <= 4
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()


@pytest.mark.parametrize("family", list(EXPECTED))
def test_seeded_and_reused(tmp_path, family):
    import safetensors.torch

    a = tiny.build_family(tmp_path / "a", family, seed=3)
    b = tiny.build_family(tmp_path / "b", family, seed=3)
    c = tiny.build_family(tmp_path / "c", family, seed=4)
    wa, wb, wc = (safetensors.torch.load_file(p / "model.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert tiny.build_family(a, family, seed=5) == a and (a / "model.safetensors").stat().st_mtime_ns == stamp


def test_unknown_family_or_size_is_named(tmp_path):
    with pytest.raises(ValueError, match="qwen9_vl"):
        tiny.build_family(tmp_path / "x", "qwen9_vl")
    with pytest.raises(ValueError, match="huge"):
        tiny.build_family(tmp_path / "x", "qwen3_vl", size="huge")
