"""Turn a dataset spec into one COCO annotations.json on local disk.

Specs (DataConfig.dataset):
  synth:N              N generated images (seeded, see synth.py)
  coco:PATH            an annotations.json, or a folder holding one; file_name relative to its folder
  hub:ORG/NAME         a Hugging Face Hub dataset through datasets.load_dataset (HF_HUB_OFFLINE=1
                       works from the HF cache)
  hf-disk:PATH         a dataset written with Dataset(Dict).save_to_disk
  parquet:PATH         parquet files: a glob, a file or a folder (split from the file or folder
                       name, e.g. data/train-00000-of-00002.parquet, as the Hub stores them)
The last three expect the openfoodfacts/nutrition-table-detection features: `image`, `objects`
{`bbox`, `category_name` or `category_id`}, optional `image_id`, `width`, `height`, `meta`.
Its boxes are [y_min, x_min, y_max, x_max] normalised to 0-1; other datasets name their layout
with a suffix: `hub:ORG/NAME@bbox=xyxy-abs` (one of BBOX_LAYOUTS).

Boxes are taken to refer to the image as displayed (EXIF orientation applied), so normalised
boxes are scaled by the displayed width and height. Image bytes are written as they are (no
recompression); prepare() validates and normalises them. An image given by path alone (no bytes)
is read only when the path lies inside the dataset's own folder (hf-disk:/parquet:) or the Hugging
Face caches (hub:); otherwise its file_name is the path as given, which prepare() quarantines as
outside-root without opening it. Each COCO image keeps the dataset's own
split name in a "split" key so that prepare() never mixes a dataset's held-out split into training,
and, where the data say which product it shows (Open Food Facts `meta.barcode`), that product in
a "group" key so that prepare() keeps every photo of one product in one split.
"""
from __future__ import annotations

import glob
import io
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from vlmdet.config.specs import split_spec
from vlmdet.data.errors import DataError
from vlmdet.data.images import ORIENTATION_TAG
from vlmdet.data.synth import generate

BBOX_LAYOUTS = ("yxyx-norm", "xyxy-norm", "xyxy-abs", "xywh-abs")
SCHEMES = {"synth": "synth:N", "coco": "coco:PATH", "hub": "hub:ORG/NAME[@bbox=LAYOUT]", "hf-disk": "hf-disk:PATH",
           "parquet": "parquet:PATH"}  # each kind of dataset spec, and its form
SPLIT_NAMES = ("train", "val", "validation", "valid", "test", "dev")
COCO_LAYOUT = ("a COCO annotations.json (keys images, annotations, categories) or a folder holding one, "
               "with each image's file_name relative to the json's folder (what `vlmdet synth --out DIR` writes)")
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def materialize(spec: str, workdir: str | Path, seed: int, image_size: Iterable[int] = (320, 240),
                revision: str | None = None) -> Path:
    """Resolve `spec` to a COCO annotations.json (written under workdir unless spec is coco:).

    revision: for hub: specs, the dataset commit to load (keys.source_stamp records it), so the
    data used is the data the cache key and the model card name."""
    scheme, target, layout = parse_spec(spec)
    workdir = Path(workdir)
    if scheme == "synth":
        size = tuple(int(v) for v in image_size)
        return generate(workdir / f"synth-{target}-seed{seed}-{size[0]}x{size[1]}", int(target), seed, size)
    if scheme == "coco":
        return _coco_path(target)
    out = workdir / ("source-" + re.sub(r"[^A-Za-z0-9._-]+", "-", f"{scheme}-{target}").strip("-"))
    return to_coco(_load_splits(scheme, target, spec, out, revision), out, layout, spec,
                   roots=_image_roots(scheme, target))


def _image_roots(scheme: str, target: str) -> tuple[Path, ...]:
    """Where a dataset's path-only images may live: its own folder, or for hub: the HF caches it downloads to."""
    if scheme == "hub":
        import datasets
        from huggingface_hub import constants

        return (Path(datasets.config.HF_DATASETS_CACHE), Path(constants.HF_HUB_CACHE))
    path = Path(target).expanduser()
    if scheme == "parquet":  # a folder, a file or a glob: the folder above the first wildcard
        parts = [p for p in path.parts[: next((i for i, p in enumerate(path.parts) if re.search(r"[*?[]", p)),
                                              len(path.parts))]]
        path = Path(*parts) if parts else Path(".")
        path = path if path.is_dir() else path.parent
    return (path,)


def parse_spec(spec: str) -> tuple[str, str, str]:
    """(scheme, target, box layout) of a dataset spec; DataError naming the spec when it is malformed."""
    scheme, rest = split_spec(spec, "data.dataset", SCHEMES, error=DataError)
    target, layout = _split_layout(spec, rest)
    if scheme == "synth" and (layout != BBOX_LAYOUTS[0] or not target.isdigit() or int(target) < 1):
        raise DataError(f"data.dataset={spec!r}: synth takes a positive image count, e.g. synth:240.")
    return scheme, target, layout


def check_spec(spec: str) -> None:
    """The mistakes a spec can be checked for without reading or downloading anything: its form, and
    that a local coco:/hf-disk:/parquet: path exists. Lets the CLI fail before the flow starts."""
    scheme, target, _ = parse_spec(spec)
    if scheme == "coco":
        _coco_path(target)
    elif scheme == "hf-disk" and not Path(target).expanduser().exists():
        raise DataError(f"hf-disk:{target}: no such folder; expected a dataset written by save_to_disk.")
    elif scheme == "parquet":
        _parquet_files(target)


def _split_layout(spec: str, rest: str) -> tuple[str, str]:
    target, sep, suffix = rest.rpartition("@bbox=")
    if not sep:
        return rest, BBOX_LAYOUTS[0]
    if suffix not in BBOX_LAYOUTS:
        raise DataError(f"data.dataset={spec!r}: unknown box layout {suffix!r}; use one of {', '.join(BBOX_LAYOUTS)}.")
    return target, suffix


def _coco_path(target: str) -> Path:
    path = Path(target).expanduser()
    if path.is_dir():
        candidate = path / "annotations.json"
        if not candidate.is_file():
            found = sorted(p.name for p in path.glob("*.json"))[:5]
            hint = f" It holds {', '.join(found)}: pass one of them as coco:{path}/NAME.json." if found else ""
            raise DataError(f"coco:{target}: the folder {path} has no annotations.json. Expected {COCO_LAYOUT}.{hint}")
        return candidate
    if not path.is_file():
        raise DataError(f"coco:{target}: {path} does not exist. Expected {COCO_LAYOUT}.")
    return path


def _load_splits(scheme: str, target: str, spec: str, out: Path, revision: str | None = None) -> dict[str, Any]:
    """The dataset's splits as {name: datasets.Dataset}."""
    import datasets  # heavy import, only for these specs

    try:
        if scheme == "hub":
            loaded = datasets.load_dataset(target, revision=revision) if revision else datasets.load_dataset(target)
        elif scheme == "hf-disk":
            if not Path(target).expanduser().exists():
                raise DataError(f"hf-disk:{target}: no such folder; expected a dataset written by save_to_disk.")
            loaded = datasets.load_from_disk(str(Path(target).expanduser()))
        else:
            loaded = datasets.load_dataset("parquet", data_files=_parquet_files(target),
                                           cache_dir=str(out.with_name(out.name + ".cache")))
    except DataError:
        raise
    except Exception as err:  # network, auth, missing cache, bad files: all need the same advice
        hint = (" Without network, set HF_HUB_OFFLINE=1 with the dataset in the HF cache, or use a local copy "
                "through hf-disk:PATH or parquet:PATH." if scheme == "hub" else "")
        raise DataError(f"data.dataset={spec!r} could not be loaded: {type(err).__name__}: {err}.{hint}") from err
    return dict(loaded) if isinstance(loaded, (datasets.DatasetDict, dict)) else {"train": loaded}


def _parquet_files(target: str) -> dict[str, list[str]]:
    path = Path(target).expanduser()
    pattern = str(path / "**" / "*.parquet") if path.is_dir() else str(path)
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise DataError(f"parquet:{target}: no parquet files match {pattern}.")
    groups: dict[str, list[str]] = {}
    for f in files:
        p = Path(f)
        stem = re.split(r"[-_.]", p.name)[0].lower()
        split = stem if stem in SPLIT_NAMES else p.parent.name if p.parent.name in SPLIT_NAMES else "train"
        groups.setdefault(split, []).append(f)
    return groups


def to_coco(splits: dict[str, Any], out: Path, layout: str = "yxyx-norm", spec: str = "",
            roots: Iterable[Path] = ()) -> Path:
    """Write every split's images (bytes unchanged) under out/images and one out/annotations.json.

    roots: folders a path-only image may be read from (none by default: only embedded bytes)."""
    import datasets

    if layout not in BBOX_LAYOUTS:
        raise DataError(f"box layout {layout!r} is unknown; use one of {', '.join(BBOX_LAYOUTS)}.")
    shutil.rmtree(out, ignore_errors=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    categories: dict[str, int] = {}
    used: set[str] = set()
    roots = tuple(Path(r).resolve() for r in roots)
    for split, ds in splits.items():
        missing = {"image", "objects"} - set(ds.column_names)
        if missing:
            raise DataError(f"{spec or 'dataset'} split {split!r} lacks the column(s) {sorted(missing)}; it has "
                            f"{ds.column_names}. Expected the openfoodfacts/nutrition-table-detection features.")
        if isinstance(ds.features["image"], datasets.Image):
            ds = ds.cast_column("image", datasets.Image(decode=False))  # keep the original bytes
        names = _label_names(ds.features["objects"])
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        for index, row in enumerate(ds):
            image_id = str(row.get("image_id") or f"{split}-{index}")
            data, outside = _image_bytes(row["image"], roots)
            width, height, fmt = _displayed_size(data)
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)[:80] or str(index)
            ext = EXTENSIONS.get(fmt or "", ".img")
            name, clash = f"images/{split}/{stem}{ext}", 0
            while name in used:  # a repeated image_id: rebuild the name, never edit the path as text
                clash += 1
                name = f"images/{split}/{stem}_{index}{'' if clash == 1 else f'_{clash}'}{ext}"
            used.add(name)
            if outside is not None:
                name = outside  # the path as the dataset gave it: prepare() quarantines it as outside-root
            elif data is not None:
                (out / name).write_bytes(data)
            # an unreadable image keeps the dataset's size so that prepare() can report it
            width = width or int(row.get("width") or 0)
            height = height or int(row.get("height") or 0)
            image = {"id": len(images) + 1, "file_name": name, "width": width, "height": height,
                     "split": split, "source_id": image_id, "meta": row.get("meta")}
            group = product_group(row.get("meta"))
            if group:
                image["group"] = group
            images.append(image)
            for bbox, label in _objects(row["objects"], names):
                cat = categories.setdefault(label, len(categories) + 1)
                annotations.append({"id": len(annotations) + 1, "image_id": len(images), "category_id": cat,
                                    "bbox": to_xywh(bbox, layout, width, height), "iscrowd": 0})
    coco = {"info": {"source": spec, "bbox_layout": layout},
            "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in categories.items()]}
    path = out / "annotations.json"
    path.write_text(json.dumps(coco, default=str))
    return path


def product_group(meta: Any) -> str | None:
    """The product an image shows, when the data say so: Open Food Facts `meta.barcode`.

    Photos of one product (front, back, several shots of the same table) look alike; left to the
    hash they land in train and test and the test score measures recall of seen packages.
    """
    if isinstance(meta, dict):
        barcode = str(meta.get("barcode") or "").strip()
        if barcode:
            return f"barcode:{barcode}"
    return None


def _label_names(feature: Any) -> list[str] | None:
    """Class names when the objects' category is a ClassLabel (datasets' usual detection layout)."""
    import datasets

    inner = getattr(feature, "feature", feature)
    if isinstance(inner, (list, tuple)) and inner:
        inner = inner[0]
    if isinstance(inner, dict):
        for key in ("category", "category_id", "label"):
            sub = inner.get(key)
            sub = getattr(sub, "feature", sub)
            if isinstance(sub, datasets.ClassLabel):
                return list(sub.names)
    return None


def _objects(objects: Any, names: list[str] | None) -> list[tuple[list[float], str]]:
    """(bbox, category name) pairs from a dict of lists (Sequence feature) or a list of dicts (List)."""
    if not objects:
        return []
    if isinstance(objects, dict):
        keys = list(objects)
        objects = [dict(zip(keys, values)) for values in zip(*(objects[k] for k in keys))]
    out = []
    for obj in objects:
        label = obj.get("category_name")
        if label is None:
            cat = obj.get("category", obj.get("category_id", obj.get("label")))
            label = names[cat] if names is not None and isinstance(cat, int) and 0 <= cat < len(names) else str(cat)
        out.append((obj.get("bbox"), str(label)))
    return out


def to_xywh(bbox: Any, layout: str, width: int, height: int) -> Any:
    """COCO [x, y, w, h] pixels from one box in `layout`; a malformed box is passed on for prepare() to report."""
    try:
        a, b, c, d = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return bbox
    if layout == "yxyx-norm":
        x1, y1, x2, y2 = b * width, a * height, d * width, c * height
    elif layout == "xyxy-norm":
        x1, y1, x2, y2 = a * width, b * height, c * width, d * height
    elif layout == "xyxy-abs":
        x1, y1, x2, y2 = a, b, c, d
    else:
        x1, y1, x2, y2 = a, b, a + c, b + d
    return [x1, y1, x2 - x1, y2 - y1]


def _image_bytes(value: Any, roots: tuple[Path, ...] = ()) -> tuple[bytes | None, str | None]:
    """(the image's bytes or None, None) or (None, its path) for a path that lies outside every root
    (absolute after resolving links and `..`; such a file is never read)."""
    if value is None:
        return None, None
    if isinstance(value, bytes):
        return value, None
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"], None
        value = value.get("path")
    if isinstance(value, str):
        real = Path(value).expanduser().resolve()
        if not any(real.is_relative_to(root) for root in roots):
            return None, str(Path(value).expanduser().absolute())
        return (real.read_bytes() if real.is_file() else None), None
    if isinstance(value, Image.Image):  # a decoded image without its file: PNG keeps every pixel
        buf = io.BytesIO()
        value.save(buf, "PNG")
        return buf.getvalue(), None
    return None, None


def _displayed_size(data: bytes | None) -> tuple[int, int, str | None]:
    """Width and height as displayed (EXIF 5-8 swap them), from the header only; zeros if unreadable."""
    if not data:
        return 0, 0, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # prepare() reports it
            im = Image.open(io.BytesIO(data))
        with im:
            width, height = im.size
            if im.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8):
                width, height = height, width
            return width, height, im.format
    except Exception:
        return 0, 0, None
