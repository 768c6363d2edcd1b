"""Synthetic data: deterministic bytes, the promised mix of table counts, boxes that fit."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vlmdet.data.synth import generate


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = generate(tmp_path / "a", 12, seed=3)
    b = generate(tmp_path / "b", 12, seed=3)
    c = generate(tmp_path / "c", 12, seed=4)
    assert _files(a.parent) == _files(b.parent)
    assert len(_files(a.parent)) == 13
    differing = [n for n, data in _files(a.parent).items() if _files(c.parent)[n] != data]
    assert len(differing) == 13


@pytest.fixture(scope="module")
def synth150(tmp_path_factory):
    path = generate(tmp_path_factory.mktemp("synth") / "ds", 150, seed=0)
    return path, json.loads(path.read_text())


def test_coco_structure_and_boxes_inside(synth150):
    path, coco = synth150
    assert coco["categories"] == [{"id": 1, "name": "nutrition-table", "supercategory": "none"}]
    ids = {im["id"] for im in coco["images"]}
    assert len(ids) == 150
    for im in coco["images"]:
        with Image.open(path.parent / im["file_name"]) as f:  # file_name is relative to the json's folder
            assert f.size == (im["width"], im["height"]) == (320, 240)
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert ann["image_id"] in ids and ann["category_id"] == 1
        assert x >= 0 and y >= 0 and x + w <= 320 + 1e-6 and y + h <= 240 + 1e-6
        assert 0.2 * 320 <= w <= 0.8 * 320, "the table must be large enough for a tiny model to learn"
        assert h >= 0.2 * 240


def test_mix_of_no_table_one_and_two_tables(synth150):
    _, coco = synth150
    per_image = Counter(a["image_id"] for a in coco["annotations"])
    counts = Counter(per_image.get(im["id"], 0) for im in coco["images"])
    assert set(counts) <= {0, 1, 2}
    # ~8% without a table and ~10% with two (150 draws: expected 12 and 15)
    assert 4 <= counts[0] <= 24
    assert 5 <= counts[2] <= 28
    two = [i for i, n in per_image.items() if n == 2]
    for image_id in two:  # two tables never overlap
        (ax, ay, aw, ah), (bx, by, bw, bh) = [a["bbox"] for a in coco["annotations"] if a["image_id"] == image_id]
        overlap_w = min(ax + aw, bx + bw) - max(ax, bx)
        overlap_h = min(ay + ah, by + bh) - max(ay, by)
        assert overlap_w <= 0 or overlap_h <= 0 or overlap_w * overlap_h < 0.15 * min(aw * ah, bw * bh)


@pytest.mark.parametrize("seed", range(5))
def test_warped_box_is_the_bounding_box_of_the_warped_table(seed):
    """Rotation/perspective move the table: its box must be the AABB of where its pixels landed."""
    import random

    from vlmdet.data.synth import _warp

    blank = Image.new("RGB", (320, 240), (0, 0, 0))
    im = blank.copy()
    table = (60, 50, 230, 200)
    im.paste((255, 255, 255), table)
    out, [box] = _warp(random.Random(seed), im, [table])
    reference, _ = _warp(random.Random(seed), blank, [])  # same warp and fill colour, no table
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(reference, np.int16)).max(-1)
    (y1, x1), (y2, x2) = np.argwhere(diff > 128).min(0), np.argwhere(diff > 128).max(0) + 1
    assert np.allclose(box, [x1, y1, x2, y2], atol=1.5)
    assert (box[2] - box[0]) * (box[3] - box[1]) >= 0.8 * 170 * 150


def test_size_and_bad_arguments(tmp_path):
    path = generate(tmp_path / "big", 3, seed=1, size=(480, 360))
    coco = json.loads(path.read_text())
    assert {(i["width"], i["height"]) for i in coco["images"]} == {(480, 360)}
    with pytest.raises(ValueError, match="num=0"):
        generate(tmp_path / "none", 0)
    with pytest.raises(ValueError, match="64x64"):
        generate(tmp_path / "tiny", 2, size=(32, 32))
