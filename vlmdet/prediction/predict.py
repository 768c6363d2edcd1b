"""Batched greedy detection: images in, boxes in original-image pixels with model scores out.

Each box's score is the geometric-mean probability of its coordinate tokens (Qwen2-VL:
`<|box_start|>...<|box_end|>`; Qwen2.5/3-VL: the `bbox_2d` list), read from the raw logits of
greedy decoding, so COCO AP ranks detections by the model's own confidence rather than by
detection order. The label and the JSON punctuation are left out: they are near-certain for
every box and would pull all scores together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from vlmdet.formats import Box, BoxFormat
from vlmdet.samples import user_message


@dataclass
class Prediction:
    file: str
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)
    answer: str = ""
    parse_ok: bool = True
    parse_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "width": self.width, "height": self.height, "answer": self.answer,
                "parse_ok": self.parse_ok, "parse_error": self.parse_error,
                "boxes": [{"xyxy": [round(v, 2) for v in (b.x1, b.y1, b.x2, b.y2)], "label": b.label,
                           "score": round(b.score, 5) if b.score is not None else None} for b in self.boxes]}


def _token_char_ends(tokenizer, ids: list[int]) -> list[int]:
    """End offset in the decoded text of each generated token (decoding prefixes keeps it exact
    for byte-level BPE, where one character can span several tokens)."""
    ends, prev = [], 0
    for i in range(len(ids)):
        n = len(tokenizer.decode(ids[: i + 1], skip_special_tokens=False))
        prev = max(prev, n)
        ends.append(prev)
    return ends


# Plain greedy decoding, whatever the checkpoint's generation_config.json says: Qwen2-VL-7B-Instruct
# ships repetition_penalty=1.05 (a logits processor that also runs in greedy mode and penalises a
# digit already written, e.g. the second "5" of "(552,558)") plus temperature/top_k/top_p for
# sampling. Passing the sampling knobs at their neutral values (top_k None) keeps transformers'
# "do_sample is False but temperature is set" validation quiet.
GREEDY = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "temperature": 1.0, "top_p": 1.0,
          "top_k": None}


def _box_scores(boxes: list[Box], logprobs: list[float], ends: list[int]) -> None:
    """score = exp(mean log-prob) of the tokens overlapping the box's coordinate characters."""
    starts = [0] + ends[:-1]
    for b in boxes:
        lo, hi = b.coord_span or b.span or (0, ends[-1] if ends else 0)
        lp = [p for p, s, e in zip(logprobs, starts, ends) if e > lo and s < hi]
        b.score = math.exp(sum(lp) / len(lp)) if lp else 0.0


class Detector:
    def __init__(self, model, processor, fmt: BoxFormat, prompt: str, category: str, max_new_tokens: int = 128):
        self.model, self.processor, self.fmt = model, processor, fmt
        self.prompt, self.category, self.max_new_tokens = prompt, category, max_new_tokens
        tok = processor.tokenizer
        self.stop_ids = {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} - {None, tok.unk_token_id}
        self.text = processor.apply_chat_template([user_message(prompt, category)], add_generation_prompt=True)

    @torch.no_grad()
    def detect(self, images: list, files: list[str]) -> list[Prediction]:
        """images: RGB PIL images as displayed (EXIF applied)."""
        tok = self.processor.tokenizer
        # add_special_tokens=False as TRL's collator tokenizes the training prompt: the chat template
        # already holds every special token, and a tokenizer that adds a BOS would otherwise put one
        # in front at inference only (tests/test_consistency.py).
        inputs = self.processor(text=[self.text] * len(images), images=images, return_tensors="pt",
                                padding=True, padding_side="left", add_special_tokens=False)
        inputs = inputs.to(self.model.device)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **GREEDY,
                                  output_logits=True, return_dict_in_generate=True,
                                  pad_token_id=tok.pad_token_id, eos_token_id=sorted(self.stop_ids))
        gen = out.sequences[:, inputs["input_ids"].shape[1]:]  # [batch, new tokens]
        # Raw logits, not out.scores: scores are after the logits processors, not the model's distribution.
        logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.logits], dim=1)  # [b, new, vocab]
        token_lp = logprobs.gather(-1, gen.unsqueeze(-1)).squeeze(-1).tolist()
        preds = []
        for i, (img, f) in enumerate(zip(images, files)):
            ids = gen[i].tolist()
            n = next((k for k, t in enumerate(ids) if t in self.stop_ids), len(ids))
            ids, lps = ids[:n], token_lp[i][:n]
            answer = tok.decode(ids, skip_special_tokens=False)
            w, h = img.size
            parsed = self.fmt.parse(answer, w, h)
            boxes = [b.clip(w, h) for b in parsed.boxes]
            _box_scores(boxes, lps, _token_char_ends(tok, ids))
            preds.append(Prediction(f, w, h, boxes, answer, parsed.ok, parsed.error))
        return preds

    def detect_all(self, items: Iterable[tuple[str, Any]], total: int, batch_size: int, desc: str = "detect") -> list[Prediction]:
        """items: (file, PIL image or loader) pairs; a loader is called when its batch comes."""
        preds: list[Prediction] = []
        batch: list[tuple[str, Any]] = []
        bar = tqdm(total=total, desc=desc, unit="img")

        def flush() -> None:
            imgs = [im() if callable(im) else im for _, im in batch]
            preds.extend(self.detect(imgs, [f for f, _ in batch]))
            bar.update(len(batch))
            batch.clear()

        for item in items:
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        bar.close()
        return preds
