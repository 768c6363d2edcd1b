"""Evaluation that knows the answer: an oracle model answers each image's ground truth in its family's format.

Only `model.generate` is replaced (it returns the tokens of the ground-truth answer, and logits that
give each image a known confidence); the real processor, chat template, answer decoding, parsing,
box mapping back to pixels, scoring from logits, COCO results and pycocotools all run. A perfect
answer must give mAP 1.0 and one displaced box the AP computed by hand, for every family.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlmdet.prediction import evaluate as evaluation
from vlmdet.config.settings import load_preset
from vlmdet.formats import Box, get_format
from vlmdet.modeling.load import load_processor, resolve_base
from vlmdet.prediction.predict import Detector
from vlmdet.run.records import DatasetRef
from vlmdet.data.samples import load_split

N = 12


@pytest.fixture(scope="module", params=[11, 3], ids=["one-image-with-two-tables", "one-image-without-table"])
def split(request, tmp_path_factory) -> Path:
    """12 synthetic images as one test split: seed 11 has an image with two tables, seed 3 one with none."""
    from vlmdet.data.synth import generate

    path = generate(tmp_path_factory.mktemp("oracle") / "data", N, seed=request.param)
    counts = sorted(sum(a["image_id"] == im["id"] for a in json.loads(path.read_text())["annotations"])
                    for im in json.loads(path.read_text())["images"])
    assert counts == ([1] * 11 + [2] if request.param == 11 else [0] + [1] * 11)
    return path


class Oracle:
    """Stands in for the model: generate() writes the ground-truth answer of each image of the batch."""

    device = torch.device("cpu")

    def __init__(self, tokenizer, fmt, truth: dict[str, list[Box]], confidence: dict[str, float], category: str):
        self.tok, self.fmt, self.truth, self.confidence, self.category = tokenizer, fmt, truth, confidence, category
        self.files: list[str] = []  # set by the patched Detector.detect for the batch at hand
        self.answers: list[str] = []

    def generate(self, input_ids, max_new_tokens, eos_token_id, pad_token_id, **kw):
        from PIL import Image

        rows = []
        for f in self.files:
            with Image.open(f) as im:
                w, h = im.size
            answer = self.fmt.render(self.truth[f], w, h, self.category)
            self.answers.append(answer)
            rows.append(self.tok.encode(answer, add_special_tokens=False) + [eos_token_id[0]])
        length = max(len(r) for r in rows)
        assert length <= max_new_tokens
        gen = torch.tensor([r + [pad_token_id] * (length - len(r)) for r in rows])
        vocab = max(len(self.tok), int(gen.max()) + 1)
        logits = []
        for t in range(length):  # the chosen token gets logit c: its probability is e^c / (e^c + vocab - 1)
            step = torch.zeros(len(rows), vocab)
            step[torch.arange(len(rows)), gen[:, t]] = torch.tensor([self.confidence[f] for f in self.files])
            logits.append(step)
        return type("Out", (), {"sequences": torch.cat([input_ids, gen], dim=1), "logits": tuple(logits)})()


def _config(family: str, base: str):
    px = 32 if family == "qwen3_vl" else 28
    return load_preset("smoke", {"model.base": base, "model.family": family, "model.min_pixels": 64 * px * px,
                                 "model.max_pixels": 256 * px * px, "eval.batch_size": 5, "eval.preview_images": 0,
                                 "eval.max_new_tokens": 128})


def _run(monkeypatch, tmp_path, split: Path, family: str, shift_lowest: bool):
    base = "asset:tiny-qwen2-vl-grounding" if family == "qwen2_vl" else f"tiny:{family}"
    config = _config(family, base)
    path = resolve_base(base, tmp_path.parent.parent / "oracle-models", config.model)
    samples, _ = load_split(split)
    truth = {s.file: s.boxes for s in samples}
    confidence = {s.file: 12.0 - 0.5 * i for i, s in enumerate(samples)}  # distinct: AP must not hinge on ties
    lowest = [s for s in samples if len(s.boxes) == 1][-1]
    confidence[lowest.file] = 0.5  # the least confident answer of all
    if shift_lowest:  # the least confident answer points one box-width to the right of the table: IoU 0
        b = lowest.boxes[0]
        dx = b.x2 - b.x1 if b.x2 + (b.x2 - b.x1) <= lowest.width else -(b.x2 - b.x1)
        truth[lowest.file] = [Box(b.x1 + dx, b.y1, b.x2 + dx, b.y2)]
    oracle = Oracle(None, get_format(family, config.model.min_pixels, config.model.max_pixels), truth, confidence,
                    config.data.category)

    def load(model_path, cfg):
        processor = load_processor(path, cfg)
        oracle.tok = processor.tokenizer
        return oracle, processor

    real_detect = Detector.detect

    def detect(self, images, files, *args, **kwargs):
        oracle.files = list(files)
        return real_detect(self, images, files, *args, **kwargs)

    import vlmdet.prediction.load as detector_factory

    monkeypatch.setattr(detector_factory, "load_for_inference", load)  # what evaluation's detector loads
    monkeypatch.setattr(Detector, "detect", detect)
    data = DatasetRef(fingerprint="fp-oracle", root=str(split.parent), splits={"test": str(split)}, counts={})
    report = evaluation.evaluate("oracle", data, config, tmp_path / "eval")
    return report, oracle, samples


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_ground_truth_answers_score_map_1(monkeypatch, tmp_path, split, family):
    report, oracle, samples = _run(monkeypatch, tmp_path, split, family, shift_lowest=False)
    assert len(oracle.answers) == N and report.parse_failures == 0 and report.num_images == N
    boxes = sum(len(s.boxes) for s in samples)
    assert len(json.loads(Path(report.predictions).read_text())) == boxes  # two boxes parsed, "none" parsed as none
    # 1.0 up to pycocotools' epsilon in precision = tp / (tp + fp + eps)
    assert report.map == pytest.approx(1.0, abs=1e-12) and report.map50 == pytest.approx(1.0, abs=1e-12)
    scores = [p["boxes"][0]["score"] for p in json.loads(Path(report.per_image).read_text()) if p["boxes"]]
    assert len(set(scores)) == len(scores)  # each image's confidence came through from the logits


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_one_displaced_box_gives_the_hand_computed_ap(monkeypatch, tmp_path, split, family):
    """All boxes but one hit, ranked first; then one false positive, its table missed. With 11 tables
    (seed 3) recall stops at 10/11 = 0.909 with precision 1: AP = (levels 0, 0.01, ..., 0.90: 91 of 101)
    / 101; with 13 (seed 11) at 12/13 = 0.923: 93 / 101. The same at every IoU threshold."""
    report, _, samples = _run(monkeypatch, tmp_path, split, family, shift_lowest=True)
    expected = {11: 91 / 101, 13: 93 / 101}[sum(len(s.boxes) for s in samples)]
    assert report.map50 == pytest.approx(expected, abs=1e-9) and report.map75 == pytest.approx(expected, abs=1e-9)
    assert report.map == pytest.approx(expected, abs=1e-9)
