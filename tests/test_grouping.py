"""Splits by product: every photo of one product (Open Food Facts meta.barcode) lands in one split."""
from __future__ import annotations

import json
from pathlib import Path

from data_fixtures import encode, noise, off_rows, write_coco
from vlmdet.config.settings import DataConfig
from vlmdet.data import prepare
from vlmdet.data.sources import to_coco


def _where(ref) -> dict[str, str]:
    """source file -> split."""
    return {im["source_file"]: split for split, path in ref.splits.items()
            for im in json.loads(Path(path).read_text())["images"]}


def _images(n, start=0):
    return [{"file": f"im{i}.jpg", "bytes": encode(noise((32, 24), 500 + i)), "size": (32, 24)}
            for i in range(start, start + n)]


def test_photos_of_one_product_never_span_two_splits(tmp_path):
    # 12 products with 4 photos each, and 12 photos of unknown products (their own groups)
    images = _images(60)
    for i, im in enumerate(images[:48]):
        im["group"] = f"barcode:{i // 4:04d}"
    ann = write_coco(tmp_path / "src", images, [])
    coco = json.loads(ann.read_text())
    for entry, im in zip(coco["images"], images):  # write_coco knows no groups: add them as sources.py does
        if "group" in im:
            entry["group"] = im["group"]
    ann.write_text(json.dumps(coco))

    ref = prepare(ann, tmp_path / "out", DataConfig(seed=1, val_fraction=0.2, test_fraction=0.25))
    where = _where(ref)
    by_product: dict[str, set[str]] = {}
    for im in images[:48]:
        by_product.setdefault(im["group"], set()).add(where[im["file"]])
    assert all(len(splits) == 1 for splits in by_product.values()), by_product
    used = {s for splits in by_product.values() for s in splits}
    assert used == {"train", "val", "test"}, "products must be spread over every split for this test to mean anything"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["groups"]["total"] == 12 + 12 and report["groups"]["images_with_product"] == 48
    assert sum(report["groups"]["by_split"].values()) == 24
    assert {s: c["groups"] for s, c in ref.counts.items()} == report["groups"]["by_split"]


def test_small_dataset_borrows_whole_products(tmp_path):
    images = _images(6)
    ann = write_coco(tmp_path / "src", images, [])
    coco = json.loads(ann.read_text())
    for i, entry in enumerate(coco["images"]):
        entry["group"] = f"barcode:{i // 2}"
    ann.write_text(json.dumps(coco))
    ref = prepare(ann, tmp_path / "out", DataConfig())
    assert [ref.counts[s]["images"] for s in ("train", "val", "test")] == [2, 2, 2]
    assert [ref.counts[s]["groups"] for s in ("train", "val", "test")] == [1, 1, 1]


def test_hub_barcode_groups_and_a_product_in_the_held_out_split_stays_out_of_training(tmp_path):
    from datasets import Dataset

    from data_fixtures import off_features

    def row(image_id, seed):
        return {"id": image_id, "bytes": encode(noise((40, 30), seed)), "size": (40, 30), "boxes": [[0.1, 0.1, 0.6, 0.6]]}

    # product 0001 has three photos in train and one in val (the dataset's held-out split)
    train = [row("0001_1", 1), row("0001_2", 2), row("0001_3", 3)] + [row(f"{b:04d}_1", 10 + b) for b in range(2, 14)]
    val = [row("0001_9", 9), row("0099_1", 99)]
    splits = {name: Dataset.from_dict(off_rows(rows), features=off_features())
              for name, rows in (("train", train), ("val", val))}
    ann = to_coco(splits, tmp_path / "coco", spec="hub:test/off")
    groups = {im["source_id"]: im.get("group") for im in json.loads(ann.read_text())["images"]}
    assert groups["0001_1"] == groups["0001_9"] == "barcode:0001" and groups["0099_1"] == "barcode:0099"

    ref = prepare(ann, tmp_path / "out", DataConfig(val_fraction=0.2), source="hub:test/off", revision="a" * 40)
    test_ids = {Path(f).stem for f, s in _where(ref).items() if s == "test"}
    assert test_ids == {"0001_9", "0099_1"}  # the held-out split is our test split, untouched
    leaked = {Path(q["file"]).stem for q in ref.quarantine if q["reason"] == "product-in-test"}
    assert leaked == {"0001_1", "0001_2", "0001_3"}
    assert all(Path(f).stem.split("_")[0] != "0001" for f, s in _where(ref).items() if s != "test")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["revision"] == "a" * 40 and ref.revision == "a" * 40
    assert report["groups"]["total"] == 12 + 2  # 0002..0013 in train/val, 0001 and 0099 in test
