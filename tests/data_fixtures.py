"""Builders for the data-stage tests: tiny images of every awkward kind, COCO folders, and a
dataset with the openfoodfacts/nutrition-table-detection features, all made in-process."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REAL_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-photos"


def noise(size=(48, 36), seed=0, mode="RGB") -> Image.Image:
    """A small image with content (a flat colour compresses to almost nothing and hides truncation)."""
    w, h = size
    arr = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(arr, "RGB")


def encode(im: Image.Image, fmt="JPEG", orientation: int | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def write_coco(folder: Path, images: list[dict], boxes: list[tuple], categories=("nutrition-table",)) -> Path:
    """images: {"file": name, "bytes": data or None (missing), "size": (w, h), "split": optional};
    boxes: (image index, [x, y, w, h], category name). Returns folder/annotations.json."""
    folder.mkdir(parents=True, exist_ok=True)
    cats = {name: i + 1 for i, name in enumerate(categories)}
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for n, i in cats.items()]}
    for i, img in enumerate(images):
        if img.get("bytes") is not None:
            (folder / img["file"]).parent.mkdir(parents=True, exist_ok=True)
            (folder / img["file"]).write_bytes(img["bytes"])
        entry = {"id": i + 1, "file_name": img["file"], "width": img["size"][0], "height": img["size"][1]}
        if "split" in img:
            entry["split"] = img["split"]
        coco["images"].append(entry)
    for index, bbox, cat in boxes:
        coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": index + 1,
                                    "category_id": cats[cat], "bbox": bbox, "iscrowd": 0})
    path = folder / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def off_features():
    """The features of openfoodfacts/nutrition-table-detection (see DESIGN.md)."""
    from datasets import Features, Image as HFImage, List, Value

    return Features({
        "image_id": Value("string"), "image": HFImage(), "width": Value("int64"), "height": Value("int64"),
        "meta": {"barcode": Value("string"), "off_image_id": Value("string"), "image_url": Value("string")},
        "objects": {"bbox": List(List(Value("float32"))), "category_id": List(Value("int64")),
                    "category_name": List(Value("string"))},
    })


def off_rows(rows: list[dict]) -> dict[str, list]:
    """Columns for Dataset.from_dict from rows {"id", "bytes", "size" (as displayed), "boxes" yxyx-norm}."""
    cols = {k: [] for k in ("image_id", "image", "width", "height", "meta", "objects")}
    for r in rows:
        barcode, _, off_id = r["id"].partition("_")
        cols["image_id"].append(r["id"])
        cols["image"].append({"bytes": r["bytes"], "path": None})
        cols["width"].append(r["size"][0])
        cols["height"].append(r["size"][1])
        cols["meta"].append({"barcode": barcode, "off_image_id": off_id, "image_url": f"https://example.org/{r['id']}.jpg"})
        cols["objects"].append({"bbox": r["boxes"], "category_id": [0] * len(r["boxes"]),
                                "category_name": ["nutrition-table"] * len(r["boxes"])})
    return cols


@pytest.fixture(scope="module")
def off_dataset(tmp_path_factory):
    """An OFF-style DatasetDict saved both with save_to_disk and as Hub-layout parquet files.

    Returns (disk_dir, parquet_dir, expected) where expected maps image_id -> (split, bytes,
    displayed size, boxes as xywh pixels computed by hand from the normalised yxyx boxes)."""
    from datasets import Dataset, DatasetDict

    root = tmp_path_factory.mktemp("off")
    train = [
        {"id": "0001_1", "bytes": encode(noise((64, 48), 1)), "size": (64, 48), "boxes": [[0.1, 0.2, 0.6, 0.7]]},
        # three tables on one package
        {"id": "0002_1", "bytes": encode(noise((80, 60), 2), "PNG"), "size": (80, 60),
         "boxes": [[0.0, 0.0, 0.5, 0.25], [0.5, 0.5, 1.0, 1.0], [0.1, 0.3, 0.4, 0.45]]},
        # stored 60x40 sideways, displayed 40x60: boxes refer to the displayed image
        {"id": "0003_1", "bytes": encode(noise((60, 40), 3), orientation=6), "size": (40, 60),
         "boxes": [[0.1, 0.25, 0.5, 0.75]]},
        # the known degenerate 2x1 px box next to a real one
        {"id": "0004_1", "bytes": encode(noise((100, 50), 4)), "size": (100, 50),
         "boxes": [[0.5, 0.5, 0.52, 0.52], [0.1, 0.1, 0.9, 0.4]]},
        {"id": "0005_1", "bytes": encode(noise((50, 50), 5)), "size": (50, 50), "boxes": [[0.2, 0.2, 0.8, 0.8]]},
    ]
    val = [
        {"id": "0006_2", "bytes": encode(noise((50, 40), 6)), "size": (50, 40), "boxes": [[0.25, 0.1, 0.75, 0.9]]},
        {"id": "0007_2", "bytes": encode(noise((40, 40), 7)), "size": (40, 40), "boxes": []},
    ]
    features = off_features()
    dd = DatasetDict({name: Dataset.from_dict(off_rows(rows), features=features)
                      for name, rows in (("train", train), ("val", val))})
    disk = root / "disk"
    dd.save_to_disk(str(disk))
    parquet = root / "parquet"
    (parquet / "data").mkdir(parents=True)
    dd["train"].to_parquet(str(parquet / "data" / "train-00000-of-00001.parquet"))
    dd["val"].to_parquet(str(parquet / "data" / "val-00000-of-00001.parquet"))
    expected = {}
    for split, rows in (("train", train), ("val", val)):
        for r in rows:
            w, h = r["size"]
            boxes = [[x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h] for y1, x1, y2, x2 in r["boxes"]]
            expected[r["id"]] = (split, r["bytes"], (w, h), boxes)
    return disk, parquet, expected


def boxed_split(folder: Path, n: int = 6) -> str:
    """n 100x80 images with one box each, as a COCO test split beside them (the gate and publish tests')."""
    images, anns = [], []
    for i in range(1, n + 1):
        Image.new("RGB", (100, 80), (40 * i % 255, 90, 120)).save(folder / f"im{i}.png")
        images.append({"id": i, "file_name": f"im{i}.png", "width": 100, "height": 80})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0})
    gt = folder / "test.json"
    gt.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "t"}]}))
    return str(gt)


def boxed_predictions(hits: set[int], n: int = 6) -> str:
    """Predictions for boxed_split: a hit is the true box; a miss the box shifted by its width (IoU 0)."""
    return json.dumps([{"image_id": i, "category_id": 1, "bbox": [10 if i in hits else 50, 10, 40, 30],
                        "score": 0.5 + i / 100} for i in range(1, n + 1)])


def install_package(root: Path, name: str, files: dict[str, str], entry_points: str) -> Path:
    """A package as pip would leave it: root/name/ with `files`, and its dist-info declaring `entry_points`
    (the text of entry_points.txt). The caller puts root on sys.path."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    for file, text in files.items():
        (root / name / file).write_text(text)
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return root
