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

import vlmdet.prediction.cli as predict_cli
from vlmdet.cli import main
from vlmdet.modeling.load import saved_pixel_budget

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-photos"
PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}


def spy_generate(monkeypatch, replace=None, on_generate=None) -> list[torch.Tensor]:
    """Record the image grid of every generate call of the model predict loads; optionally replace
    the model by `replace(processor)` and call `on_generate()` at each call."""
    grids: list[torch.Tensor] = []
    real_load = predict_cli.load_for_inference

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

    monkeypatch.setattr(predict_cli, "load_for_inference", load)
    return grids


def read(out: Path) -> dict:
    return json.loads((out / "predictions.json").read_text())


@pytest.mark.skipif(not PHOTOS.is_dir(), reason=f"{PHOTOS} is absent (it sits beside the checkout)")
def test_predict_over_every_real_photo(tiny_model, tmp_path, monkeypatch):
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    assert any(max(Image.open(p).size) >= 2000 for p in photos), "the folder should hold large photos"
    grids = spy_generate(monkeypatch)
    out = tmp_path / "pred"
    assert main(["predict", "--model", tiny_model, "--out", str(out), "--eval.max_new_tokens", "4", str(PHOTOS)]) == 0

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
        for box in rec["boxes"]:
            x1, y1, x2, y2 = box["xyxy"]
            assert 0 <= x1 <= x2 <= rec["width"] and 0 <= y1 <= y2 <= rec["height"], (photo.name, box)
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
    assert main(argv + [str(good), str(empty), str(rotated), str(garbage)]) == 0

    result = read(out)
    assert [(Path(r["file"]).name, r["width"], r["height"]) for r in result["images"]] == [
        ("good.png", 300, 200), ("rotated.jpg", 200, 300)]
    assert sorted(Path(e["file"]).name for e in result["errors"]) == ["empty.jpg", "garbage.jpg"]
    assert all(e["error"] for e in result["errors"])
    assert Image.open(out / "rotated.jpg").size == (200, 300)


class FakeModel:
    """Generates a fixed answer for every image, with confident scores."""

    device = torch.device("cpu")

    def __init__(self, processor, answer: str):
        tok = processor.tokenizer
        self.ids = tok.encode(answer, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
        assert tok.decode(self.ids[:-1]) == answer  # the tokenizer round-trips the answer
        self.vocab = len(tok)

    def generate(self, input_ids, **kwargs):
        new = torch.tensor([self.ids] * input_ids.shape[0])
        scores = tuple(torch.nn.functional.one_hot(new[:, i], self.vocab).float() * 50 for i in range(new.shape[1]))
        return SimpleNamespace(sequences=torch.cat([input_ids, new], dim=1), scores=scores)


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
