"""Dataset specs: errors that name the path, OFF-feature datasets from disk and parquet converted
box-for-box to pixels, and the real photos with Open Food Facts' reference boxes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_fixtures import REAL_PHOTOS, encode, noise, off_dataset, off_features, off_rows  # noqa: F401 (fixture)
from vlmdet.config.settings import DataConfig
from vlmdet.data import DataError, materialize, open_image, prepare


def test_coco_missing_path_names_the_path_and_layout(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(DataError) as err:
        materialize(f"coco:{missing}", tmp_path, 0)
    assert str(missing) in str(err.value) and "annotations.json" in str(err.value)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "instances_val.json").write_text("{}")
    with pytest.raises(DataError, match="instances_val.json"):
        materialize(f"coco:{tmp_path / 'folder'}", tmp_path, 0)
    (tmp_path / "folder" / "annotations.json").write_text("{}")
    assert materialize(f"coco:{tmp_path / 'folder'}", tmp_path, 0) == tmp_path / "folder" / "annotations.json"


@pytest.mark.parametrize("spec", ["nonsense", "synth:zero", "synth:0", "ftp:x", "hf-disk:x@bbox=yx", "coco:"])
def test_bad_specs_are_rejected_with_the_spec_in_the_message(tmp_path, spec):
    with pytest.raises(DataError) as err:
        materialize(spec, tmp_path, 0)
    assert spec in str(err.value)


def test_synth_spec(tmp_path):
    path = materialize("synth:5", tmp_path, seed=2, image_size=(160, 120))
    coco = json.loads(path.read_text())
    assert len(coco["images"]) == 5 and coco["images"][0]["width"] == 160


def test_hub_offline_without_cache_says_what_to_do(tmp_path):
    # conftest sets HF_HUB_OFFLINE=1; no cache holds this name
    with pytest.raises(DataError, match="HF_HUB_OFFLINE") as err:
        materialize("hub:vlmdet-tests/no-such-dataset", tmp_path, 0)
    assert "vlmdet-tests/no-such-dataset" in str(err.value)


@pytest.mark.parametrize("kind", ["hf-disk", "parquet", "hub"])
def test_off_dataset_converts_box_for_box(tmp_path, off_dataset, kind):  # noqa: F811
    """hub: goes through datasets.load_dataset, here on a local folder laid out as on the Hub."""
    disk, parquet, expected = off_dataset
    path = materialize(f"{kind}:{disk if kind == 'hf-disk' else parquet}", tmp_path, 0)
    coco = json.loads(path.read_text())
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    assert set(cats.values()) == {"nutrition-table"}
    assert {im["source_id"] for im in coco["images"]} == set(expected)
    for im in coco["images"]:
        split, data, size, boxes = expected[im["source_id"]]
        assert im["split"] == split
        assert (path.parent / im["file_name"]).read_bytes() == data, "image bytes are kept, not recompressed"
        assert (im["width"], im["height"]) == size
        got = sorted(a["bbox"] for a in coco["annotations"] if a["image_id"] == im["id"])
        assert len(got) == len(boxes)
        for g, e in zip(got, sorted(boxes)):
            assert g == pytest.approx(e, abs=1e-3)
    assert im["meta"]["barcode"] == im["source_id"].split("_")[0]


def test_off_dataset_through_prepare(tmp_path, off_dataset):  # noqa: F811
    disk, _, expected = off_dataset
    ref = prepare(materialize(f"hf-disk:{disk}", tmp_path, 0), tmp_path / "prepared", DataConfig(),
                  source=f"hf-disk:{disk}")
    assert [(q["reason"], q["file"]) for q in ref.quarantine] == [("zero-area", "images/train/0004_1.jpg")]
    test = json.loads(Path(ref.splits["test"]).read_text())
    assert sorted(im["source_file"] for im in test["images"]) == ["images/val/0006_2.jpg", "images/val/0007_2.jpg"]
    train_val = [im for s in ("train", "val") for im in json.loads(Path(ref.splits[s]).read_text())["images"]]
    assert len(train_val) == 5
    rotated = next(im for im in train_val if im["source_file"].endswith("0003_1.jpg"))
    assert (rotated["width"], rotated["height"]) == expected["0003_1"][2] == (40, 60)
    assert ref.counts["train"]["boxes"] + ref.counts["val"]["boxes"] == 1 + 3 + 1 + 1 + 1


def test_bbox_layout_suffix(tmp_path):
    from datasets import Dataset

    data = encode(noise((100, 80), 3))
    cols = off_rows([{"id": "9_1", "bytes": data, "size": (100, 80), "boxes": [[10.0, 20.0, 50.0, 60.0]]}])
    Dataset.from_dict(cols, features=off_features()).save_to_disk(str(tmp_path / "abs"))
    expect = {"xyxy-abs": [10, 20, 40, 40], "xywh-abs": [10, 20, 50, 60]}
    for layout, box in expect.items():
        coco = json.loads(materialize(f"hf-disk:{tmp_path / 'abs'}@bbox={layout}", tmp_path / layout, 0).read_text())
        assert coco["annotations"][0]["bbox"] == pytest.approx(box)
        assert coco["images"][0]["split"] == "train"


@pytest.mark.skipif(not REAL_PHOTOS.is_dir(), reason="real photos live in ../shared/data/real-photos")
def test_real_photos_open_and_reference_boxes_convert(tmp_path):
    from datasets import Dataset

    photos = sorted(REAL_PHOTOS.glob("*.jpg"))
    assert len(photos) >= 20
    for photo in photos:
        im = open_image(photo)
        assert im.mode == "RGB" and min(im.size) >= 100
    rows, expected = [], {}
    for label in sorted(REAL_PHOTOS.glob("*.json")):
        photo = label.with_suffix(".jpg")
        width, height = open_image(photo).size
        refs = json.loads(label.read_text())  # [y_min, x_min, y_max, x_max] normalised, like the Hub dataset
        boxes = [r["bounding_box"] for r in refs]
        rows.append({"id": photo.stem, "bytes": photo.read_bytes(), "size": (width, height), "boxes": boxes})
        expected[photo.stem] = [[b[1] * width, b[0] * height, (b[3] - b[1]) * width, (b[2] - b[0]) * height]
                                for b in boxes]
    assert len(rows) == 4 and sum(map(len, expected.values())) == 3
    Dataset.from_dict(off_rows(rows), features=off_features()).save_to_disk(str(tmp_path / "real"))
    coco = json.loads(materialize(f"hf-disk:{tmp_path / 'real'}", tmp_path, 0).read_text())
    for im in coco["images"]:
        got = [a["bbox"] for a in coco["annotations"] if a["image_id"] == im["id"]]
        assert len(got) == len(expected[im["source_id"]])
        for g, e in zip(got, expected[im["source_id"]]):
            assert g == pytest.approx(e, abs=0.5)
            assert 0 <= g[0] and g[0] + g[2] <= im["width"] + 0.5 and g[1] + g[3] <= im["height"] + 0.5


def test_repeated_image_ids_get_distinct_names_in_their_split_folder(tmp_path):
    # Stems "a" and "in" occur inside "images/train/": renaming must not edit the folder part.
    from datasets import Dataset

    from vlmdet.data.sources import to_coco

    ids = ["a", "a", "in", "in", "a", "a_1"]
    rows = [{"id": i, "bytes": encode(noise((20 + k, 20), k)), "size": (20 + k, 20), "boxes": []}
            for k, i in enumerate(ids)]
    ds = Dataset.from_dict(off_rows(rows), features=off_features())
    coco = json.loads(to_coco({"train": ds}, tmp_path / "out").read_text())
    names = [im["file_name"] for im in coco["images"]]
    assert len(set(names)) == len(ids)
    for name, row in zip(names, rows):
        folder, _, file = name.rpartition("/")
        assert folder == "images/train"
        assert file.startswith(row["id"]) and file.endswith(".jpg")
        assert (tmp_path / "out" / name).read_bytes() == row["bytes"]
