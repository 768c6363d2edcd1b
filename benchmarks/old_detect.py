"""vlmdet's detection path as it was before the evaluation levers (commit f106be1), for the "before" row.

The two methods below are verbatim copies of Detector.detect and Detector.detect_all from
vlmdet/prediction/predict.py at f106be1: every step's full-vocabulary logits kept
(`output_logits=True`), images decoded and processed on the main thread between generate calls,
batches in input order. Everything else (prompt, parsing, scores) is the current Detector's.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from vlmdet.prediction.predict import GREEDY, Detector, Prediction, _box_scores, _token_char_ends


class OldDetector(Detector):
    @torch.no_grad()
    def detect(self, images: list, files: list[str]) -> list[Prediction]:
        """images: RGB PIL images as displayed (EXIF applied)."""
        tok = self.processor.tokenizer
        inputs = self.processor(text=[self.text] * len(images), images=images, return_tensors="pt",
                                padding=True, padding_side="left")
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
