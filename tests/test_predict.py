"""`vlmdet predict`: every real photo gets boxes and a drawing; boxes come back in original pixels.

The real photos (../shared/data/real-photos, beside the checkout) are large phone JPEGs; the test
skips where the folder is absent, as in a user's fresh clone.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageOps

import vlmdet.modeling.carried as carried
import vlmdet.prediction.files as predict_cli
import vlmdet.prediction.load as detector_factory
from vlmdet.cli import main
from vlmdet.config.settings import RunConfig
from vlmdet.modeling.load import saved_pixel_budget

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-photos"
PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}


def spy_generate(monkeypatch, replace=None, on_generate=None) -> list[torch.Tensor]:
    """Record the image grid of every generate call of the model predict loads; optionally replace
    the model by `replace(processor)` and call `on_generate()` at each call."""
    grids: list[torch.Tensor] = []
    real_load = detector_factory.load_for_inference

    def load(path, cfg):
        model, processor = real_load(path, cfg)
        if replace is not None:
            model = replace(processor)
        real_generate = model.generate

        def generate(**inputs):
            grids.append(inputs["image_grid_thw"].clone())
            if on_generate:
                on_generate()
            return real_generate(**inputs)

        model.generate = generate
        return model, processor

    monkeypatch.setattr(detector_factory, "load_for_inference", load)
    return grids


def read(out: Path) -> dict:
    return json.loads((out / "predictions.json").read_text())


@pytest.mark.skipif(not PHOTOS.is_dir(), reason=f"{PHOTOS} is absent (it sits beside the checkout)")
def test_predict_over_every_real_photo(tiny_model, tmp_path, monkeypatch):
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    assert any(max(Image.open(p).size) >= 2000 for p in photos), "the folder should hold large photos"
    # A random model writes no box; a fake one answering a box and the whole image makes the box
    # checks below run on every photo, EXIF-rotated ones included (the real processor still runs).
    answer = ANSWERS["qwen2_vl"] + ANSWERS["qwen2_vl"].replace("(100,200),(500,600)", "(0,0),(1000,1000)")
    grids = spy_generate(monkeypatch, replace=lambda processor: FakeModel(processor, answer))
    out = tmp_path / "pred"
    assert main(["predict", "--model", tiny_model, "--out", str(out), str(PHOTOS)]) == 0

    result = read(out)
    assert result["errors"] == []
    records = result["images"]
    assert [Path(r["file"]).name for r in records] == [p.name for p in photos]
    _, max_pixels = saved_pixel_budget(tiny_model)
    grid = torch.cat(grids)  # one row (t, h, w) per image, in input order
    assert len(grid) == len(photos)
    for photo, rec, (t, gh, gw) in zip(photos, records, grid.tolist()):
        with Image.open(photo) as im:
            shown = ImageOps.exif_transpose(im).size  # the photo as a viewer shows it
        assert (rec["width"], rec["height"]) == shown, photo.name
        # the processor resized it into the pixel budget (a 4000 px photo is ~10 MP before)
        assert t == 1 and gh * 14 * gw * 14 <= max_pixels, (photo.name, gh, gw)
        if max(shown) >= 2000:
            assert gw * 14 < shown[0] and gh * 14 < shown[1]
        assert rec["parse_ok"] and len(rec["boxes"]) == 2, (photo.name, rec["answer"])
        for box in rec["boxes"]:
            x1, y1, x2, y2 = box["xyxy"]
            assert 0 <= x1 <= x2 <= rec["width"] and 0 <= y1 <= y2 <= rec["height"], (photo.name, box)
        w, h = shown
        assert rec["boxes"][0]["xyxy"] == pytest.approx([0.1 * w, 0.2 * h, 0.5 * w, 0.6 * h], abs=0.01), photo.name
        assert rec["boxes"][1]["xyxy"] == pytest.approx([0, 0, w, h], abs=0.01), photo.name  # the displayed frame
        with Image.open(rec["drawn"]) as drawn:
            assert drawn.size == shown


def test_bad_files_are_reported_and_exif_is_applied(tiny_model, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (300, 200), "white").save(good)
    rotated = tmp_path / "rotated.jpg"  # stored 300x200, shown 200x300 (EXIF orientation 6: rotate 90)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (300, 200), "gray").save(rotated, exif=exif)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a JPEG" * 10)
    out = tmp_path / "pred"
    argv = ["predict", "--model", tiny_model, "--out", str(out), "--eval.max_new_tokens", "4"]
    assert main(argv + [str(good), str(empty), str(rotated), str(garbage)]) == 6  # EXIT_SOME_INPUTS_FAILED

    result = read(out)
    assert [(Path(r["file"]).name, r["width"], r["height"]) for r in result["images"]] == [
        ("good.png", 300, 200), ("rotated.jpg", 200, 300)]
    assert sorted(Path(e["file"]).name for e in result["errors"]) == ["empty.jpg", "garbage.jpg"]
    assert all(e["error"] for e in result["errors"])
    assert Image.open(out / "rotated.jpg").size == (200, 300)


class FakeModel:
    """Generates a fixed answer for every image. `answer` is a string (every token confident) or
    (text, logit) pieces: each token of a piece gets `logit` for itself and 0 for the rest of the
    vocabulary in the raw logits. The processed `scores` say the opposite (uniform), so reading
    them instead of the logits shows."""

    device = torch.device("cpu")

    def __init__(self, processor, answer: str | list[tuple[str, float]]):
        tok = processor.tokenizer
        pieces = [(answer, 50.0)] if isinstance(answer, str) else answer
        self.ids, self.conf = [], []
        for text, logit in pieces:
            ids = tok.encode(text, add_special_tokens=False)
            self.ids += ids
            self.conf += [logit] * len(ids)
        self.ids.append(tok.convert_tokens_to_ids("<|im_end|>"))
        self.conf.append(50.0)
        self.answer = "".join(text for text, _ in pieces)
        assert tok.decode(self.ids[:-1]) == self.answer  # the tokenizer round-trips the answer
        self.vocab = len(tok)
        self.calls: list[dict] = []

    def generate(self, input_ids, **kwargs):
        self.calls.append(kwargs)
        new = torch.tensor([self.ids] * input_ids.shape[0])
        logits = tuple(torch.nn.functional.one_hot(new[:, i], self.vocab).float() * c for i, c in enumerate(self.conf))
        scores = tuple(torch.zeros(len(new), self.vocab) for _ in self.conf)
        return SimpleNamespace(sequences=torch.cat([input_ids, new], dim=1), logits=logits, scores=scores)


ANSWERS = {  # (100, 200), (500, 600) in each family's words
    "qwen2_vl": "<|object_ref_start|>nutrition-table<|object_ref_end|><|box_start|>(100,200),(500,600)<|box_end|>",
    "qwen2_5_vl": '```json\n[\n\t{"bbox_2d": [100, 200, 500, 600], "label": "nutrition-table"}\n]\n```',
    "qwen3_vl": '```json\n[\n\t{"bbox_2d": [100, 200, 500, 600], "label": "nutrition-table"}\n]\n```',
}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    from vlmdet.modeling.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("predict-models")
    # a budget well below the test image, so the processor really resizes it
    return {f: str(build_tiny_model(root / f, family=f, min_pixels=64 * 28 * 28, max_pixels=1024 * 28 * 28))
            for f in ANSWERS}


@pytest.mark.parametrize("family", list(ANSWERS))
def test_boxes_map_back_to_original_pixels(family, family_models, tmp_path, monkeypatch):
    width, height = 1999, 1333  # odd, larger than the budget: resized to a grid that is no simple fraction
    photo = tmp_path / "photo.png"
    Image.new("RGB", (width, height), "white").save(photo)
    grids = spy_generate(monkeypatch, replace=lambda processor: FakeModel(processor, ANSWERS[family]))
    out = tmp_path / "pred"
    assert main(["predict", "--model", family_models[family], "--out", str(out), str(photo)]) == 0

    (rec,) = read(out)["images"]
    (box,) = rec["boxes"]
    _, gh, gw = grids[0][0].tolist()
    if family == "qwen2_5_vl":
        # absolute pixels of the image the processor produced (grid x patch), scaled to the original
        rw, rh = gw * PATCH[family], gh * PATCH[family]
        assert (rw, rh) != (width, height)
        expected = [100 * width / rw, 200 * height / rh, 500 * width / rw, 600 * height / rh]
    else:  # 0-1000 of the image, whatever the resize
        expected = [100 / 1000 * width, 200 / 1000 * height, 500 / 1000 * width, 600 / 1000 * height]
    assert box["xyxy"] == pytest.approx(expected, abs=0.01)
    assert box["label"] == "nutrition-table" and box["score"] == pytest.approx(1.0, abs=1e-3)
    assert (rec["width"], rec["height"]) == (width, height)


def test_images_are_decoded_one_batch_at_a_time(tiny_model, tmp_path, monkeypatch):
    # a folder of phone photos must not be held in memory all at once
    files = []
    for i in range(5):
        files.append(tmp_path / f"im{i}.png")
        Image.new("RGB", (120 + i, 90), "white").save(files[-1])
    events: list[str] = []
    real_open = predict_cli.open_image
    monkeypatch.setattr(predict_cli, "open_image", lambda f: events.append("open") or real_open(f))
    grids = spy_generate(monkeypatch, on_generate=lambda: events.append("generate"))
    out = tmp_path / "pred"
    argv = ["predict", "--model", tiny_model, "--out", str(out), "--eval.max_new_tokens", "2", "--eval.batch_size", "2"]
    assert main(argv + [str(f) for f in files]) == 0
    assert [len(g) for g in grids] == [2, 2, 1]
    assert len(read(out)["images"]) == 5
    # each batch is opened right before its own generate call, never all five up front
    assert events == ["open", "open", "generate"] * 2 + ["open", "generate"]


def _pieces(family: str, a_label: float, a_coords: float, b_label: float, b_coords: float) -> list[tuple[str, float]]:
    """Two boxes, A (100, 200)-(500, 600) and B (50, 60)-(300, 400), with a logit per part."""
    if family == "qwen2_vl":
        label = "<|object_ref_start|>nutrition-table<|object_ref_end|>"
        return [(label, a_label), ("<|box_start|>(100,200),(500,600)<|box_end|>", a_coords),
                (label, b_label), ("<|box_start|>(50,60),(300,400)<|box_end|>", b_coords)]
    return [('```json\n[\n\t{"bbox_2d": ', 50.0), ("[100, 200, 500, 600]", a_coords),
            (', "label": "nutrition-table"},\n\t{"bbox_2d": ', a_label), ("[50, 60, 300, 400]", b_coords),
            (', "label": "nutrition-table"}\n]\n```', b_label)]


@pytest.mark.parametrize("family", list(ANSWERS))
def test_scores_are_the_coordinate_tokens_confidence_from_raw_logits(family, family_models):
    from transformers import AutoProcessor

    from vlmdet.formats import get_format
    from vlmdet.prediction.predict import Detector

    processor = AutoProcessor.from_pretrained(family_models[family])
    # A: sure of its coordinates, not of its label; B: the reverse. Scoring the label or the JSON
    # keys as well would rank B first; the processed scores (uniform here) would tie them.
    model = FakeModel(processor, _pieces(family, a_label=-30.0, a_coords=50.0, b_label=50.0, b_coords=4.0))
    fmt = get_format(family, *saved_pixel_budget(family_models[family]))
    det = Detector(model, processor, fmt, "Detect the {category}.", "nutrition table", max_new_tokens=128)
    (pred,) = det.detect([Image.new("RGB", (1000, 1000), "white")], ["x.png"])
    assert pred.answer == model.answer and len(pred.boxes) == 2
    a, b = pred.boxes
    assert a.x1 > b.x1  # A is the first box written
    assert a.score > b.score
    assert a.score == pytest.approx(1.0, abs=1e-6)
    # every coordinate token of B has logit 4 against 0 for the rest of the vocabulary
    p4 = torch.softmax(torch.tensor([4.0] + [0.0] * (model.vocab - 1)), 0)[0].item()
    assert b.score == pytest.approx(p4, rel=1e-4)
    call = model.calls[0]
    assert call["do_sample"] is False and call["repetition_penalty"] == 1.0 and call["output_logits"] is True


def test_the_checkpoints_repetition_penalty_does_not_change_greedy_answers(tiny_model):
    # Qwen2-VL-7B-Instruct's generation_config.json has repetition_penalty=1.05, which penalises
    # a digit already written in the coordinates even under greedy decoding.
    from vlmdet.config.settings import RunConfig
    from vlmdet.formats import get_format
    from vlmdet.modeling.load import load_for_inference
    from vlmdet.prediction.predict import Detector

    model, processor = load_for_inference(tiny_model, RunConfig().model)
    det = Detector(model, processor, get_format("qwen2_vl"), "Detect the {category}.", "nutrition table",
                   max_new_tokens=24)
    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(120, 160, 3, generator=gen) * 255).byte().numpy()) for _ in range(2)]
    inputs = processor(text=[det.text] * 2, images=images, return_tensors="pt", padding=True, padding_side="left")

    def answers(penalty: float) -> tuple[list[str], torch.Tensor]:
        model.generation_config.repetition_penalty = penalty
        model.generation_config.do_sample, model.generation_config.temperature = True, 0.01  # as shipped: sampling knobs
        raw = model.generate(**inputs, max_new_tokens=24, do_sample=False)  # what a plain call picks up
        return [p.answer for p in det.detect(images, ["a", "b"])], raw

    plain, raw_plain = answers(1.0)
    penalised, raw_penalised = answers(1.5)
    assert not torch.equal(raw_plain, raw_penalised), "the penalty should change this model's plain greedy output"
    assert penalised == plain


def test_a_line_per_image_in_input_order_the_same_in_predictions_json_and_exit_6(tiny_model, tmp_path, monkeypatch,
                                                                                   capsys):
    spy_generate(monkeypatch, replace=lambda processor: FakeModel(processor, ANSWERS["qwen2_vl"]))
    first, third = tmp_path / "first.png", tmp_path / "third.png"
    Image.new("RGB", (1000, 500), "white").save(first)
    Image.new("RGB", (200, 100), "white").save(third)
    missing = tmp_path / "second.jpg"
    out = tmp_path / "pred"
    argv = ["predict", "--model", tiny_model, "--out", str(out), "--eval.batch_size", "3"]
    assert main(argv + [str(first), str(missing), str(third)]) == 6
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(tmp_path))]
    assert printed == [
        f"{first}: 1 box, best score 1.00 (xyxy 100 100 500 300)",
        f"{missing}: FAILED missing-file: no such file",
        f"{third}: 1 box, best score 1.00 (xyxy 20 20 100 60)",
    ]
    result = read(out)
    assert [r["line"] for r in result["images"]] == [printed[0], printed[2]]
    assert result["errors"] == [{"file": str(missing), "error": "missing-file: no such file", "line": printed[1]}]
    assert result["failed"] == 1
    # every image read: exit 0
    assert main(argv + [str(first)]) == 0


def _published_copy(model: str, folder: Path, meta: dict) -> str:
    """The model folder as the publish step leaves it: its files and a vlmdet.json."""
    import shutil

    shutil.copytree(model, folder)
    (folder / "vlmdet.json").write_text(json.dumps(meta))
    return str(folder)


def test_predict_asks_with_the_prompt_and_category_the_model_was_published_with(tiny_model, tmp_path, monkeypatch,
                                                                                caplog):
    """A published model's vlmdet.json says how it was trained to be asked; a setting the user gives
    still wins, and a model without the file is asked as the settings say."""
    made: list = []

    class Spy(detector_factory.Detector):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(detector_factory, "Detector", Spy)
    published = _published_copy(tiny_model, tmp_path / "published", {
        "run_id": "r1", "config": {"model": {"prompt": "Find every {category} here."}, "data": {"category": "table"}}})
    image = tmp_path / "img.png"
    Image.new("RGB", (120, 90), "white").save(image)

    def asked(model: str, *settings: str) -> tuple[str, str, str]:
        caplog.clear()
        with caplog.at_level("INFO", logger=carried.log.name):
            assert main(["predict", "--model", model, "--out", str(tmp_path / "out"), "--eval.max_new_tokens", "2",
                         *settings, str(image)]) == 0
        (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prompt ")]
        return made[-1].prompt, made[-1].category, line

    prompt, category, line = asked(published)
    assert (prompt, category) == ("Find every {category} here.", "table")
    assert "Find every table here." in made[-1].text  # what the model is really asked
    assert line == "prompt 'Find every {category} here.': the model's vlmdet.json; category 'table': the model's vlmdet.json"

    prompt, category, line = asked(published, "--data.category", "nutrition-table")
    assert (prompt, category) == ("Find every {category} here.", "nutrition-table")
    assert line.endswith("category 'nutrition-table': given on the command line")

    default = RunConfig()
    prompt, category, line = asked(tiny_model)  # no vlmdet.json: the settings
    assert (prompt, category) == (default.model.prompt, default.data.category)
    assert "the settings (preset or defaults" in line

    # an older vlmdet.json without the config still knows the data's category
    old = _published_copy(tiny_model, tmp_path / "old", {"run_id": "r0", "dataset": {"category": "label"}})
    assert asked(old)[:2] == (default.model.prompt, "label")
