"""Training and inference agree, for every family (issue 9, items 5 and 6).

- The prompt a model is trained on (everything before the answer, exactly as TRL's SFTTrainer
  collator builds it from vlmdet's training example) is token for token, pixel for pixel, the
  prompt the detector feeds `generate` for the same image.
- Batching changes nothing: images of different sizes (different visual-token counts, so the
  detector left-pads) give in one batch the boxes and scores they give alone.

Qwen2-VL runs the shipped pretrained tiny base, which really emits boxes. The Qwen2.5-VL and
Qwen3-VL tiny models are random: a few fine-tuning steps make them lean towards the answer, and
a logits processor holds decoding to the family's answer layout while leaving the coordinate
digits to the model (argmax over the digit tokens). Boxes still come from the model's logits,
and scores are always read from the raw logits, so a batch that perturbs the model's
computation changes them; the test shows that it would notice (attending to the padding).
"""
from __future__ import annotations

import json

import pytest
import torch

from vlmdet.config.settings import load_preset
from vlmdet.run.records import DatasetRef

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# (width, height): 99, 77 and 81 visual tokens on the 28 px grid, 80, 70 and 64 on Qwen3-VL's 32 px grid.
SIZES = [(320, 240), (200, 300), (256, 256)]
SYNTH_SEED = 1  # renders 0, 1 and 3 of this seed at these sizes hold tables the pretrained base finds
RENDERS = [0, 1, 3]
TEACH_STEPS = 8


def family_config(family: str):
    if family == "qwen2_vl":  # the smoke preset as shipped: the pretrained asset base
        return load_preset("smoke", {"eval.max_new_tokens": 64})
    overrides = {"model.base": f"tiny:{family}", "model.family": family, "lora.modules_to_save": []}
    if family == "qwen3_vl":  # Qwen3-VL tokens are 32x32 px: 64 to 256 of them
        overrides.update({"model.min_pixels": 64 * 32 * 32, "model.max_pixels": 256 * 32 * 32})
    return load_preset("smoke", overrides)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro models gain nothing from intra-op threads; on a busy 2-core runner the spinning
    threads cost 20x the CPU time (measured: 13 s vs 0.7 s for one batch)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("consistency")


@pytest.fixture(scope="module")
def dataset(work) -> DatasetRef:
    """Three synthetic JPEGs of different sizes with their table boxes, as one prepared split."""
    from vlmdet.data.synth import CATEGORY, render

    root = work / "data"
    (root / "images").mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": CATEGORY}]}
    for n, (index, (w, h)) in enumerate(zip(RENDERS, SIZES), start=1):
        im, boxes = render(SYNTH_SEED, index, (w, h))
        im.save(root / f"images/{n}.jpg", "JPEG", quality=90)
        coco["images"].append({"id": n, "file_name": f"images/{n}.jpg", "width": w, "height": h})
        for x1, y1, x2, y2 in boxes:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": n, "category_id": 1,
                                        "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    split = root / "train.json"
    split.write_text(json.dumps(coco))
    return DatasetRef(fingerprint="consistency", root=str(root), splits={"train": str(split), "test": str(split)},
                      counts={"train": {"images": 3, "boxes": len(coco["annotations"])}})


def images_of(dataset: DatasetRef):
    from vlmdet.data.images import open_image
    from vlmdet.data.samples import load_split

    samples, _ = load_split(dataset.splits["train"])
    return samples, [open_image(s.file) for s in samples]


class Captured(Exception):
    """Raised by the wrapped generate once it has seen its inputs: no tokens are needed here."""


def capture_generate(model) -> dict:
    """Wrap model.generate to record exactly what the detector passes it, then stop."""
    seen: dict = {}

    def generate(**kwargs):
        seen.update(kwargs)
        raise Captured

    model.generate = generate
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_training_prompt_is_the_inference_prompt(family, dataset, work):
    from vlmdet.prediction.evaluate import detector_for
    from vlmdet.formats import get_format
    from vlmdet.training.train import build_trainer

    config = family_config(family)
    out = work / f"train-{family}"  # base models are built once, in work/base-models
    trainer, processor, _ = build_trainer(dataset, config, out)
    # The trainer's own collator on the trainer's own rows: what the model is trained on.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    # Saved as train() saves it, loaded as evaluation/prediction load it.
    trainer.save_model(str(out / "adapter"))
    processor.save_pretrained(str(out / "adapter"))
    detector = detector_for(str(out / "adapter"), config)
    seen = capture_generate(detector.model)
    samples, images = images_of(dataset)
    with pytest.raises(Captured):
        detector.detect(images, [s.file for s in samples])  # one batch: left padding, as in evaluation

    tok = processor.tokenizer
    fmt = get_format(family, config.model.min_pixels, config.model.max_pixels)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for i, s in enumerate(samples):
        labels, ids = batch["labels"][i], batch["input_ids"][i]
        start = int((labels != -100).nonzero()[0])  # the completion mask: the answer starts here
        answer_ids = ids[start:][labels[start:] != -100].tolist()
        # the answer is what the format renders, then <|im_end|> (the training target ends the turn)
        assert tok.decode(answer_ids[: answer_ids.index(end)]) == fmt.render(s.boxes, s.width, s.height,
                                                                             config.data.category)
        assert batch["attention_mask"][i, :start].all()  # flushed left: the prompt starts at 0
        train_prompt = ids[:start].tolist()
        mask = seen["attention_mask"][i]
        # left padding only: zeros, then the prompt
        assert mask.tolist() == sorted(mask.tolist()), mask
        infer_prompt = seen["input_ids"][i][mask.bool()].tolist()
        assert infer_prompt == train_prompt, (tok.decode(train_prompt), tok.decode(infer_prompt))
        assert tok.decode(infer_prompt).endswith("<|im_start|>assistant\n")
        if "mm_token_type_ids" in batch:  # Qwen3-VL places M-RoPE positions by these
            assert seen["mm_token_type_ids"][i][mask.bool()].tolist() == batch["mm_token_type_ids"][i, :start].tolist()
    assert torch.equal(seen["image_grid_thw"], batch["image_grid_thw"])
    assert len({tuple(t.tolist()) for t in batch["image_grid_thw"]}) == len(samples)  # the sizes really differ
    assert seen["pixel_values"].dtype == batch["pixel_values"].dtype
    assert torch.equal(seen["pixel_values"], batch["pixel_values"])
    # nothing the model is trained with is missing at inference
    assert set(batch) - {"labels"} <= set(seen), set(batch) - set(seen)


# --- batching ---

def answer_grammar(tokenizer, fmt) -> list[list[int]]:
    """Allowed token ids per generated position: a one-box JSON answer (Qwen2.5-VL / Qwen3-VL)
    with every coordinate digit left to the model (first digit 1-9, later 0-9), then <|im_end|>.
    Coordinates are x1, y1 in 1..9 and x2, y2 in 10..99: a valid box in both families' frames.
    (No ```json fence: the parser takes bare JSON, and every forced token is a decoding step.)"""
    from vlmdet.formats.qwen2_5_vl import render_json

    text = render_json([([1, 2, 34, 56], "nutrition-table")], fence=False)
    spans = [b.coord_span for b in fmt.parse(text, 1000, 1000).boxes]
    assert len(spans) == 1, text
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    digit = {str(d): tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}
    allowed, after_digit = [], False
    for t, (a, _) in zip(enc["input_ids"], enc["offset_mapping"]):
        free = spans[0][0] <= a < spans[0][1] and tokenizer.decode([t]).isdigit()
        if free:
            assert len(tokenizer.decode([t])) == 1, "digits must be single tokens"
            allowed.append([digit[d] for d in ("0123456789" if after_digit else "123456789")])
        else:
            allowed.append([t])
        after_digit = free
    return allowed + [[tokenizer.convert_tokens_to_ids("<|im_end|>")]]


def grammar_processor(allowed: list[list[int]], prompt_len: int):
    from transformers import LogitsProcessor

    class Grammar(LogitsProcessor):
        def __call__(self, input_ids, scores):
            step = min(input_ids.shape[1] - prompt_len, len(allowed) - 1)
            mask = torch.full_like(scores, float("-inf"))
            mask[:, allowed[step]] = 0
            return scores + mask

    return Grammar()


def guided(model, allowed: list[list[int]] | None, state: dict) -> None:
    """Wrap model.generate: add the grammar (if any) and, when state["unmask"], attend to the
    padding too (the sensitivity check: a batch that leaks padding must fail the comparison)."""
    from transformers import LogitsProcessorList

    generate = model.generate

    def wrapped(**kwargs):
        if allowed is not None:
            kwargs["logits_processor"] = LogitsProcessorList([grammar_processor(allowed, kwargs["input_ids"].shape[1])])
        state.setdefault("masks", []).append(kwargs["attention_mask"])
        if state.get("unmask"):
            kwargs["attention_mask"] = torch.ones_like(kwargs["attention_mask"])
        return generate(**kwargs)

    model.generate = wrapped


def teach(detector, samples, images, steps: int) -> None:
    """A few full fine-tuning steps on the images' true answers (one batch, the training prompt).

    A random model's logits are nearly flat: every score is ~1/vocab and a perturbed computation
    (right padding, say) moves it only in the 4th significant digit. A few steps make the model
    lean towards the answer layout and its digits without memorising them, so scores spread and
    react to what the batch does to the computation."""
    from vlmdet.data.samples import user_message

    proc, model = detector.processor, detector.model
    texts = [proc.apply_chat_template([user_message(detector.prompt, detector.category), {"role": "assistant", "content": [
        {"type": "text", "text": detector.fmt.render(s.boxes, s.width, s.height, detector.category)}]}]) for s in samples]
    batch = proc(text=texts, images=images, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def boxes_of(preds):
    return [[(round(b.x1, 6), round(b.y1, 6), round(b.x2, 6), round(b.y2, 6)) for b in p.boxes] for p in preds]


def scores_of(preds):
    return [[b.score for b in p.boxes] for p in preds]


@pytest.mark.parametrize("family", FAMILIES)
def test_batching_changes_nothing(family, dataset, work):
    from vlmdet.prediction.evaluate import detector_for
    from vlmdet.modeling.load import resolve_base

    config = family_config(family)
    if family == "qwen2_vl":  # what the pretrained base was taught to find (it never saw "nutrition-table")
        config = config.override({"data.category": "table"})
    base = resolve_base(config.model.base, work / "base-models", config.model)
    detector = detector_for(base, config)
    allowed = None
    if family != "qwen2_vl":
        teach(detector, *images_of(dataset), steps=TEACH_STEPS)
        allowed = answer_grammar(detector.processor.tokenizer, detector.fmt)
        detector.max_new_tokens = len(allowed)
    state: dict = {}
    guided(detector.model, allowed, state)
    samples, images = images_of(dataset)
    files = [s.file for s in samples]

    together = detector.detect(images, files)
    assert (state["masks"][0] == 0).any(dim=1).sum() == len(images) - 1  # all but the longest prompt are left-padded
    alone = [detector.detect([im], [f])[0] for im, f in zip(images, files)]

    assert all(p.parse_ok and p.boxes for p in alone), [p.answer for p in alone]  # boxes really are compared
    assert [p.answer for p in together] == [p.answer for p in alone]
    assert boxes_of(together) == boxes_of(alone)
    for t, a in zip(scores_of(together), scores_of(alone)):
        # relative 1e-4 (stricter than the brief's absolute 1e-4: a random model's scores are ~1/vocab)
        assert t == pytest.approx(a, rel=1e-4, abs=0)

    # The comparison can fail: attending to the left padding changes the answers or their scores.
    state["unmask"] = True
    leaky = detector.detect(images, files)
    moved = max(abs(t - a) / a for tp, ap in zip(scores_of(leaky), scores_of(alone)) for t, a in zip(tp, ap))
    assert boxes_of(leaky) != boxes_of(alone) or moved > 1e-3, moved


def test_a_tokenizer_that_adds_bos_adds_it_nowhere(tmp_path):
    """TRL tokenizes the training prompt with add_special_tokens=False; the detector must too.
    Qwen's tokenizers add no BOS, so this guards a tokenizer that does (Llama-style template)."""
    from types import SimpleNamespace

    from tokenizers import processors
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from vlmdet.data.synth import render
    from vlmdet.formats import Box, get_format
    from vlmdet.modeling.load import load_processor, resolve_base
    from vlmdet.prediction.predict import Detector
    from vlmdet.data.samples import Sample, training_example

    config = family_config("qwen2_vl")
    processor = load_processor(resolve_base(config.model.base, tmp_path, config.model), config.model)
    tok = processor.tokenizer
    bos = "<|endoftext|>"
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])
    assert tok("x")["input_ids"][0] == tok.convert_tokens_to_ids(bos)  # the tokenizer now adds a BOS

    image = render(SYNTH_SEED, 0)[0]
    fmt = get_format("qwen2_vl")
    example = training_example(Sample(1, "unused.jpg", 320, 240, [Box(10, 20, 200, 150)]), fmt, config.model.prompt,
                               config.data.category)
    example["images"] = [image]
    batch = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)([example])
    start = int((batch["labels"][0] != -100).nonzero()[0])

    seen: dict = {}

    def generate(**kwargs):
        seen.update(kwargs)
        raise Captured

    detector = Detector(SimpleNamespace(device="cpu", generate=generate), processor, fmt, config.model.prompt,
                        config.data.category)
    with pytest.raises(Captured):
        detector.detect([image], ["unused.jpg"])
    assert seen["input_ids"][0].tolist() == batch["input_ids"][0, :start].tolist()
