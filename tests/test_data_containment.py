"""Data stays inside its dataset (issue 12): a file name that resolves outside the dataset's folder
(absolute, `..`, a symbolic link pointing out) is quarantined as outside-root and never opened; the
same for hf-disk, parquet and hub datasets whose images are given by path."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import importlib
from data_fixtures import encode, noise, off_features, off_rows, write_coco
from vlmdet.config.settings import DataConfig
from vlmdet.data import materialize, prepare

prepare_mod = importlib.import_module("vlmdet.data.prepare")  # the package re-exports prepare(), shadowing the module


@pytest.fixture
def opened(monkeypatch):
    """Every file prepare() reads (hashes or decodes)."""
    seen: list[Path] = []
    real_hash, real_load = prepare_mod.content_hash, prepare_mod.load_image
    monkeypatch.setattr(prepare_mod, "content_hash", lambda p: seen.append(Path(p).resolve()) or real_hash(p))
    monkeypatch.setattr(prepare_mod, "load_image", lambda p: seen.append(Path(p).resolve()) or real_load(p))
    return seen


@pytest.fixture
def secret(tmp_path) -> Path:
    """A valid image on the worker's disk, outside any dataset folder."""
    path = tmp_path / "elsewhere" / "secret.jpg"
    path.parent.mkdir()
    path.write_bytes(encode(noise((40, 30), 99)))
    return path


def _good(n):
    return [{"file": f"ok{i}.jpg", "bytes": encode(noise((40, 30), 500 + i)), "size": (40, 30)} for i in range(n)]


def _prepare_with(tmp_path, file_name: str, link_to: Path | None = None):
    root = tmp_path / "dataset"
    images = _good(4) + [{"file": file_name, "bytes": None, "size": (40, 30)}]
    ann = write_coco(root, images, [(i, [5, 5, 20, 15], "nutrition-table") for i in range(5)])
    if link_to is not None:
        (root / file_name).symlink_to(link_to)
    return prepare(ann, tmp_path / "prepared", DataConfig(val_fraction=0.25, test_fraction=0.25))


def _outside(ref) -> list[dict]:
    return [q for q in ref.quarantine if q["reason"] == "outside-root"]


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_a_coco_file_name_leading_out_of_the_dataset_is_quarantined_unopened(tmp_path, secret, opened, how):
    name = {"absolute": str(secret), "dotdot": "../elsewhere/secret.jpg", "symlink": "link.jpg"}[how]
    ref = _prepare_with(tmp_path, name, link_to=secret if how == "symlink" else None)
    (entry,) = _outside(ref)
    assert entry["file"] == name
    assert ("absolute path" if how == "absolute" else "outside the dataset folder") in entry["detail"]
    assert secret.resolve() not in opened
    assert sum(c["images"] for c in ref.counts.values()) == 4  # the other images are kept
    assert secret.read_bytes() not in [p.read_bytes() for p in (tmp_path / "prepared" / "images").iterdir()]


def test_links_and_dotdot_that_stay_inside_the_dataset_are_fine(tmp_path, opened):
    root = tmp_path / "dataset"
    images = _good(4) + [{"file": "sub/../inside.jpg", "bytes": encode(noise((40, 30), 7)), "size": (40, 30)}]
    ann = write_coco(root, images, [(i, [5, 5, 20, 15], "nutrition-table") for i in range(5)])
    (root / "alias.jpg").symlink_to(root / "ok0.jpg")  # a link inside the folder to a file inside it
    coco = json.loads(ann.read_text())
    coco["images"][0]["file_name"] = "alias.jpg"
    ann.write_text(json.dumps(coco))
    ref = prepare(ann, tmp_path / "prepared", DataConfig(val_fraction=0.25, test_fraction=0.25))
    assert ref.quarantine == []
    assert sum(c["images"] for c in ref.counts.values()) == 5


def _path_only_dataset(rows_bytes: int, paths: list[str]):
    """OFF features; `rows_bytes` images with embedded bytes, then one image per path with no bytes.

    The image column is the struct {bytes, path} that datasets' Image feature stores, declared as a
    plain struct: save_to_disk and to_parquet embed the file of an Image feature on the machine that
    writes the dataset, but a dataset made elsewhere can carry any path."""
    from datasets import Dataset, Value

    rows = [{"id": f"{i:04d}_1", "bytes": encode(noise((40, 30), 300 + i)), "size": (40, 30),
             "boxes": [[0.1, 0.1, 0.8, 0.8]]} for i in range(rows_bytes)]
    cols = off_rows(rows + [{"id": f"p{i}_1", "bytes": b"", "size": (40, 30), "boxes": [[0.1, 0.1, 0.8, 0.8]]}
                            for i in range(len(paths))])
    for i, path in enumerate(paths):
        cols["image"][rows_bytes + i] = {"bytes": None, "path": path}
    features = off_features()
    features["image"] = {"bytes": Value("binary"), "path": Value("string")}
    return Dataset.from_dict(cols, features=features)


@pytest.mark.parametrize("kind", ["hf-disk", "parquet", "hub"])
def test_path_only_images_outside_the_dataset_are_quarantined_unread(tmp_path, secret, kind, monkeypatch):
    read: list[Path] = []
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.resolve()) or real_read(self))
    folder = tmp_path / "ds"
    ds = _path_only_dataset(4, [str(secret)])
    if kind == "hf-disk":
        ds.save_to_disk(str(folder))
    else:  # hub: load_dataset on a folder laid out as on the Hub
        (folder / "data").mkdir(parents=True)
        ds.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    ann = materialize(f"{kind}:{folder}", tmp_path / "raw", 0)
    names = [im["file_name"] for im in json.loads(ann.read_text())["images"]]
    assert names[-1] == str(secret)  # the path as given, no copy of the file
    assert secret.resolve() not in read
    ref = prepare(ann, tmp_path / "prepared", DataConfig(val_fraction=0.25, test_fraction=0.25))
    assert [(q["reason"], q["file"]) for q in ref.quarantine] == [("outside-root", str(secret))]
    assert sum(c["images"] for c in ref.counts.values()) == 4


def test_a_path_only_image_inside_the_datasets_own_folder_is_read(tmp_path):
    folder = tmp_path / "ds"
    inside = folder / "files" / "in.jpg"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(encode(noise((40, 30), 42)))
    (folder / "data").mkdir()
    _path_only_dataset(3, [str(inside)]).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    ann = materialize(f"parquet:{folder}", tmp_path / "raw", 0)
    last = json.loads(ann.read_text())["images"][-1]
    assert (ann.parent / last["file_name"]).read_bytes() == inside.read_bytes()
