"""Batched greedy detection: images in, boxes in original-image pixels with model scores out.

Each box's score is the geometric-mean probability of its coordinate tokens (Qwen2-VL:
`<|box_start|>...<|box_end|>`; Qwen2.5/3-VL: the `bbox_2d` list), read from the raw logits of
greedy decoding, so COCO AP ranks detections by the model's own confidence rather than by
detection order. The label and the JSON punctuation are left out: they are near-certain for
every box and would pull all scores together.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from vlmdet.formats import Box, BoxFormat
from vlmdet.data.samples import user_message


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


def stop_token_ids(tokenizer) -> set[int]:
    """The chat turn's end and the document's end: either stops an answer (read from the tokenizer,
    never hard-coded: the ids differ between families)."""
    return {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} - {None, tokenizer.unk_token_id}


def _box_scores(boxes: list[Box], logprobs: list[float], ends: list[int]) -> None:
    """score = exp(mean log-prob) of the tokens overlapping the box's coordinate characters."""
    starts = [0] + ends[:-1]
    for b in boxes:
        lo, hi = b.coord_span or b.span or (0, ends[-1] if ends else 0)
        lp = [p for p, s, e in zip(logprobs, starts, ends) if e > lo and s < hi]
        b.score = math.exp(sum(lp) / len(lp)) if lp else 0.0


class ChosenTokenLogProbs:
    """Log-probability, under the raw logits, of each token greedy decoding picks, without keeping
    the [steps, batch, vocab] logits `output_logits=True` stores (1 GB at batch 64 x 24 steps of a
    152k vocabulary, plus their log-softmax).

    A forward hook on the LM head keeps the current step's log-softmax of the raw logits (before
    any logits processor); a forward pre-hook on the model reads, at the next step, the token that
    was chosen (the last input id) and keeps only its log-probability. Hooks, not a logits
    processor, so a caller that passes its own `logits_processor` changes nothing here.
    """

    def __init__(self, model, head: torch.nn.Module):
        self.pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []
        self.handles = [head.register_forward_hook(self._logits),
                        model.register_forward_pre_hook(self._inputs, with_kwargs=True)]

    def _logits(self, module, args, output) -> None:
        self.pending = torch.log_softmax(output[:, -1, :].float(), dim=-1)  # [batch, vocab], this step only

    def _inputs(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.pending is not None and ids is not None:  # ids[:, -1]: the token chosen at the previous step
            self.steps.append(self.pending.gather(-1, ids[:, -1:].to(self.pending.device)).squeeze(-1))
            self.pending = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[batch, new tokens] log-probabilities; removes the hooks."""
        self.remove()
        if self.pending is not None:
            self.steps.append(self.pending.gather(-1, sequences[:, -1:].to(self.pending.device)).squeeze(-1))
        self.pending = None
        return torch.stack(self.steps, dim=1) if self.steps else sequences.new_zeros((sequences.shape[0], 0)).float()


class Detector:
    def __init__(self, model, processor, fmt: BoxFormat, prompt: str, category: str, max_new_tokens: int = 128):
        self.model, self.processor, self.fmt = model, processor, fmt
        self.prompt, self.category, self.max_new_tokens = prompt, category, max_new_tokens
        tok = processor.tokenizer
        self.stop_ids = stop_token_ids(tok)
        self.text = processor.apply_chat_template([user_message(prompt, category)], add_generation_prompt=True)

    def inputs(self, images: list):
        """The processor's tensors for a batch (CPU work: safe to run in a background thread)."""
        # add_special_tokens=False as TRL's collator tokenizes the training prompt: the chat template
        # already holds every special token, and a tokenizer that adds a BOS would otherwise put one
        # in front at inference only (tests/test_consistency.py).
        return self.processor(text=[self.text] * len(images), images=images, return_tensors="pt",
                              padding=True, padding_side="left", add_special_tokens=False)

    @torch.no_grad()
    def detect(self, images: list, files: list[str], inputs=None) -> list[Prediction]:
        """images: RGB PIL images as displayed (EXIF applied); inputs: self.inputs(images) if already made."""
        tok = self.processor.tokenizer
        inputs = (self.inputs(images) if inputs is None else inputs).to(self.model.device)
        sequences, token_lp = self._generate(inputs)
        gen = sequences[:, inputs["input_ids"].shape[1]:]  # [batch, new tokens]
        token_lp = token_lp.tolist()
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

    def generate_options(self) -> dict[str, Any]:
        """Extra `generate` arguments (none: the dynamic KV cache; benchmarks/rejected_detect.py measures others)."""
        return {}

    def _generate(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequences, [batch, new tokens] log-probabilities of the chosen tokens under the raw logits).

        Raw logits, not generate's scores: scores are after the logits processors, not the model's
        distribution. A model exposing its LM head gets ChosenTokenLogProbs (one step's logits at a
        time); any other generate-able object the full `output_logits` of every step.
        """
        tok = self.processor.tokenizer
        kw = dict(max_new_tokens=self.max_new_tokens, **GREEDY, pad_token_id=tok.pad_token_id,
                  eos_token_id=sorted(self.stop_ids))
        kw.update(self.generate_options())
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if head is None:
            out = self.model.generate(**inputs, **kw, output_logits=True, return_dict_in_generate=True)
            gen = out.sequences[:, inputs["input_ids"].shape[1]:]
            logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.logits], dim=1)  # [b, new, vocab]
            return out.sequences, logprobs.gather(-1, gen.unsqueeze(-1)).squeeze(-1).cpu()
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # PEFT
        chosen = ChosenTokenLogProbs(inner, head)
        try:
            sequences = self.model.generate(**inputs, **kw)
        finally:
            chosen.remove()
        return sequences, chosen.finish(sequences).cpu()

    def detect_all(self, items: Iterable[tuple[str, Any]], total: int, batch_size: int, desc: str = "detect",
                   sizes: list[int] | None = None, on_done: Callable[[int], None] | None = None) -> list[Prediction]:
        """items: (file, PIL image or loader) pairs; a loader is called when its batch comes.
        on_done(n): called after each batch with the number of images detected so far.

        Predictions come back in the order of `items`. With `sizes` (e.g. visual tokens an image),
        batches are formed largest first, so images of one batch pad little and an out-of-memory
        shows on the first batch. The next batch's images are decoded and processed by a background
        thread while the GPU generates the current one.
        """
        items = list(items)
        order = sorted(range(len(items)), key=lambda i: -sizes[i]) if sizes else list(range(len(items)))
        batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]

        def load(batch: list[int]):
            imgs = [im() if callable(im) else im for im in (items[i][1] for i in batch)]
            return imgs, self.inputs(imgs)

        preds: list[Prediction | None] = [None] * len(items)
        bar = tqdm(total=total, desc=desc, unit="img")
        for batch, (imgs, inputs) in zip(batches, self._prepared(load, batches)):
            for i, p in zip(batch, self.detect(imgs, [items[i][0] for i in batch], inputs)):
                preds[i] = p
            bar.update(len(batch))
            if on_done is not None:
                on_done(bar.n)
        bar.close()
        return preds  # type: ignore[return-value]

    def _prepared(self, load, batches: list[list[int]]):
        """(images, inputs) of every batch in order, the next one prepared by a background thread while the
        GPU generates the current one (forked DataLoader workers measured slower: benchmarks/RESULTS.md)."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead = pool.submit(load, batches[0]) if batches else None
            for k in range(len(batches)):
                ready = ahead.result()
                if k + 1 < len(batches):
                    ahead = pool.submit(load, batches[k + 1])
                yield ready
