"""Validate a COCO dataset, normalise its images once, split it, and describe it in a DatasetRef.

Rules (each rejected image or box becomes a QuarantineEntry with a reason and a detail):
- Images: outside-root (a file_name that is absolute, climbs out with `..` or is a symbolic link
  pointing out of the dataset's folder: never opened, so a dataset cannot copy a file of the
  worker's disk into a published model card), missing-file, empty-file, unreadable, truncated, too-large (Pillow's decompression-bomb
  limit), duplicate (same bytes as an earlier image: the first is kept, so copies can never sit in
  two splits and leak test images into training). Re-encoded near-duplicates are not detected.
- Boxes are taken to refer to the image as displayed, EXIF orientation applied (what a labelling
  tool shows). When the json's width/height differ from the displayed size other than by an EXIF
  swap (the file was resized after labelling), boxes are scaled by the ratio.
- bad-box: not four finite numbers or a negative side. box-outside: beyond the image by more than
  EDGE_TOLERANCE_PX (a smaller overshoot is rounding and is clipped). zero-area: a side under
  MIN_BOX_PX after clipping; the real data holds a 2x1 px box, which is a labelling slip, not a
  table, so anything under 2 px in either side goes. unknown-category: a box of another class
  (the image stays, as a negative for ours).
  An image whose every box of our category was rejected is dropped as well: kept without its box
  it would teach (and score) "no table here" on a photo that has one.
- Normalised images (out_dir/images/HASH.ext) are RGB without a rotating EXIF tag: a file that is
  already so is copied byte for byte; others are re-encoded once (PNG stays PNG, the rest JPEG q95).
- Splits are drawn from sha256(seed, group), so an image keeps its split when others are added.
  The group is the product the image shows where the data say so (a COCO image's "group" key,
  which sources.py fills from Open Food Facts `meta.barcode`), else the image's content hash: all
  photos of one product land in one split, so the test score never measures a product seen in
  training. A dataset's own held-out split (an image "split" of val/validation/test/dev, as
  written by sources.py for Hub datasets) becomes our test split, untouched; its train split is
  divided into train and val by group, and a train image of a product that also has a held-out
  photo is quarantined (product-in-test). Every split holds at least one image when there are 3
  or more (val may be empty only when data.val_fraction is 0).
- data.max_images keeps the first N usable images in split-hash order (an even sample across
  splits); images past the cap are not examined, so the quarantine covers the examined ones only.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from vlmdet.config.settings import DataConfig
from vlmdet.run.records import DatasetRef, QuarantineEntry, write_json
from vlmdet.data.errors import DataError, ImageError
from vlmdet.data.images import content_hash, load_image

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
HELD_OUT_SPLITS = frozenset({"val", "validation", "valid", "test", "dev"})
EDGE_TOLERANCE_PX = 1.0
MIN_BOX_PX = 2.0
PROGRESS_MIN_IMAGES = 50
_NORMALISED_NAME = re.compile(r"^[0-9a-f]{16}\.(jpg|png)$")


@dataclass
class _Item:
    """An image that passed validation."""

    order: int
    file: str
    content_hash: str
    held_out: bool
    rank: float  # uniform in [0, 1) from (seed, group): decides the split
    group: str = ""  # the product (e.g. "barcode:123"), else "image:<content hash>"
    name: str = ""
    width: int = 0
    height: int = 0
    normalised_hash: str = ""
    boxes: list[list[float]] = field(default_factory=list)  # xywh pixels of the normalised image


def prepare(annotations: str | Path, out_dir: str | Path, cfg: DataConfig, source: str = "",
            revision: str | None = None) -> DatasetRef:
    """Validate, normalise and split the COCO dataset at `annotations`; write out_dir/{split}.json and report.json.

    revision: the Hub commit the source was loaded at (None for local data), recorded as provenance."""
    annotations, out_dir = Path(annotations), Path(out_dir)
    (out_dir / "report.json").unlink(missing_ok=True)  # until rewritten, the folder is incomplete
    coco = _read_coco(annotations)
    root = annotations.parent
    categories = {c.get("id"): c.get("name") for c in coco.get("categories", [])}
    by_image: dict[Any, list[dict]] = {}
    for ann in coco.get("annotations", []):
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    quarantine: list[QuarantineEntry] = []
    images = coco["images"]

    # Pass 1 (bytes only): files that are missing, empty or repeated.
    candidates: list[tuple[_Item, dict, Path]] = []
    first_seen: dict[str, str] = {}
    for order, img in enumerate(images):
        file = str(img.get("file_name", ""))
        path = _resolve(root, file)
        if isinstance(path, str):
            quarantine.append(QuarantineEntry(file, "outside-root", path))
            continue
        if path is None:
            quarantine.append(QuarantineEntry(file, "missing-file", f"not found under {root}"))
            continue
        if path.stat().st_size == 0:
            quarantine.append(QuarantineEntry(file, "empty-file", "0 bytes"))
            continue
        digest = content_hash(path)
        if digest in first_seen:
            quarantine.append(QuarantineEntry(file, "duplicate", f"same bytes as {first_seen[digest]}, which is kept"))
            continue
        first_seen[digest] = file
        held_out = str(img.get("split", "")).lower() in HELD_OUT_SPLITS
        group = str(img.get("group") or "").strip()
        # an image of no known product is its own group, ranked by its bytes: data without groups splits by
        # content alone, whatever order or names its files have
        rank = _rank(cfg.seed, group) if group else _rank(cfg.seed, digest)
        candidates.append((_Item(order, file, digest, held_out, rank, group or f"image:{digest}"), img, path))
    if cfg.max_images > 0:
        candidates.sort(key=lambda c: (c[0].rank, c[0].order))

    # Pass 2 (decode): unreadable images and bad boxes; normalise what is kept. The images are decoded in
    # threads (Pillow's decoders release the GIL) and taken in order, so the outcome is the serial one's.
    (out_dir / "images").mkdir(parents=True, exist_ok=True)

    def decode(candidate: tuple[_Item, dict, Path]) -> _Decoded:
        item, img, path = candidate
        try:
            im, fmt, changed = load_image(path)
        except ImageError as err:
            return _Decoded(error=QuarantineEntry(item.file, err.reason, err.detail))
        boxes, rejected = _check_boxes(item.file, by_image.get(img.get("id"), []), categories, cfg.category,
                                       im.size, (img.get("width"), img.get("height")))
        name = digest = ""
        if boxes is not None:
            name, digest = _normalise(im, fmt, changed, path, item.content_hash, out_dir / "images")
        return _Decoded(size=im.size, boxes=boxes, rejected=rejected, name=name, normalised_hash=digest)

    items: list[_Item] = []
    bar = tqdm(total=len(candidates), desc="prepare images", unit="img",
               disable=len(candidates) <= PROGRESS_MIN_IMAGES)
    decoded = _in_order(decode, candidates)
    try:
        for item, _, _ in candidates:
            # with data.max_images, the few decoded past the limit are never taken (their files go in _remove_stale,
            # their errors with them)
            if 0 < cfg.max_images <= len(items):
                break
            done = next(decoded)
            bar.update()
            if done.error:
                quarantine.append(done.error)
                continue
            item.width, item.height = done.size
            quarantine += done.rejected
            if done.boxes is None:
                continue
            item.boxes, item.name, item.normalised_hash = done.boxes, done.name, done.normalised_hash
            items.append(item)
    finally:
        decoded.close()  # the threads still decoding have finished: no file is written after this
        bar.close()
    items.sort(key=lambda it: it.order)
    items = _drop_products_in_test(items, quarantine)
    _remove_stale(out_dir / "images", {it.name for it in items})

    groups = _split(items, cfg, annotations, len(images), quarantine)
    category = cfg.category
    splits, counts = {}, {}
    for name in SPLITS:
        path = out_dir / f"{name}.json"
        _write_coco(path, groups[name], category)
        splits[name] = str(path)
        counts[name] = {"images": len(groups[name]), "boxes": sum(len(it.boxes) for it in groups[name]),
                        "groups": len({it.group for it in groups[name]})}
    fingerprint = _fingerprint(groups, cfg)
    ref = DatasetRef(fingerprint=fingerprint, root=str(out_dir), splits=splits, counts=counts,
                     quarantine=[q.to_dict() for q in quarantine], source=source, category=category,
                     revision=revision)
    products = sum(1 for it in items if not it.group.startswith("image:"))
    report = {"source": source, "annotations": str(annotations), "fingerprint": fingerprint, "counts": counts,
              "revision": revision, "input_images": len(images), "usable_images": len(items),
              "groups": {"total": len({it.group for it in items}), "images_with_product": products,
                         "by_split": {n: c["groups"] for n, c in counts.items()},
                         "rule": "one product (meta.barcode / COCO 'group') never spans two splits; an image "
                                 "without one is its own group"},
              "quarantine_counts": ref.quarantine_counts,
              "quarantine": ref.quarantine, "config": dataclasses.asdict(cfg),
              "rules": {"edge_tolerance_px": EDGE_TOLERANCE_PX, "min_box_px": MIN_BOX_PX,
                        "held_out_splits": sorted(HELD_OUT_SPLITS), "boxes_refer_to": "image as displayed (EXIF applied)"}}
    write_json(out_dir / "report.json", report)  # written last: its presence means the folder is complete
    log.info("prepared %d of %d images from %s: %s; %d groups (%d images of a known product); quarantined %s",
             len(items), len(images), source or annotations,
             ", ".join(f"{k} {v['images']} images / {v['boxes']} boxes / {v['groups']} groups" for k, v in counts.items()),
             report["groups"]["total"], products, dict(ref.quarantine_counts) or "nothing")
    return ref


@dataclass
class _Decoded:
    """One image's pass 2, done in a worker thread: an error, or its size, boxes and normalised file."""

    error: QuarantineEntry | None = None
    size: tuple[int, int] = (0, 0)
    boxes: list[list[float]] | None = None
    rejected: list[QuarantineEntry] = field(default_factory=list)
    name: str = ""
    normalised_hash: str = ""


def _in_order(fn: Callable[[Any], Any], work: list[Any], threads: int = min(8, os.cpu_count() or 1)) -> Iterator[Any]:
    """fn over work in threads, yielded in work's order, at most 2 x threads ahead of the consumer (memory: a
    few decoded photos); the rest is cancelled when the consumer stops early."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: collections.deque[Future] = collections.deque()
        it = iter(work)
        try:
            for w in itertools.islice(it, 2 * threads):
                pending.append(pool.submit(fn, w))
            while pending:
                result = pending.popleft().result()
                for w in itertools.islice(it, 1):
                    pending.append(pool.submit(fn, w))
                yield result
        finally:
            for f in pending:
                f.cancel()


def _read_coco(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path} does not exist; expected a COCO annotations.json (see vlmdet.data.sources).")
    try:
        coco = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); expected a COCO annotations file.") from err
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise DataError(f"{path} has no 'images' list; expected COCO keys images, annotations, categories.")
    if not coco["images"]:
        raise DataError(f"{path} lists no images; nothing to train or evaluate on.")
    return coco


def _resolve(root: Path, file: str) -> Path | str | None:
    """The image file inside `root`; None when missing; a reason (str) when the name leads out of root."""
    if not file:
        return None
    if Path(file).is_absolute() or Path(file).drive:
        return f"file_name is an absolute path; expected a name relative to {root}. Not opened."
    inside = root.resolve()
    # COCO exports often name files relative to an images/ folder next to the json.
    for path in (root / file, root / "images" / file):
        # resolve() follows every symbolic link and folds `..`: the real file must lie inside the root
        real = path.resolve()
        if not real.is_relative_to(inside):
            return (f"resolves to a file outside the dataset folder {inside} "
                    f"({'a symbolic link points out' if '..' not in Path(file).parts else 'it climbs out with ..'}). "
                    "Not opened.")
        if path.is_file():
            return path
    return None


def _rank(seed: int, digest: str) -> float:
    return int(hashlib.sha256(f"{seed}:{digest}".encode()).hexdigest()[:15], 16) / 16**15


def _check_boxes(file: str, anns: list[dict], categories: dict, category: str, size: tuple[int, int],
                 declared: tuple[Any, Any]) -> tuple[list[list[float]] | None, list[QuarantineEntry]]:
    """The usable boxes (xywh, clipped) of one image, and the rejected ones; None drops the image."""
    width, height = size
    sx = sy = 1.0
    dw, dh = declared
    if isinstance(dw, (int, float)) and isinstance(dh, (int, float)) and dw > 0 and dh > 0 \
            and (dw, dh) not in ((width, height), (height, width)):
        sx, sy = width / dw, height / dh  # the file was resized after labelling
    kept, rejected, ours = [], [], 0
    for ann in anns:
        name = categories.get(ann.get("category_id"))
        bbox = ann.get("bbox")
        if name != category:
            rejected.append(QuarantineEntry(file, "unknown-category",
                                            f"box {bbox} has category {name!r} (id {ann.get('category_id')}); "
                                            f"data.category is {category!r}"))
            continue
        ours += 1
        reason, detail, box = _check_box(bbox, sx, sy, width, height)
        if reason:
            rejected.append(QuarantineEntry(file, reason, detail))
        else:
            kept.append(box)
    if ours and not kept:
        for entry in rejected:
            if entry.reason != "unknown-category":
                entry.detail += "; image dropped: none of its boxes is usable"
        return None, rejected
    return kept, rejected


def _check_box(bbox: Any, sx: float, sy: float, width: int, height: int) -> tuple[str, str, list[float]]:
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return "bad-box", f"bbox {bbox!r} is not [x, y, width, height]", []
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 0 or h < 0:
        return "bad-box", f"bbox {bbox!r} has a non-finite value or a negative side", []
    x, w, y, h = x * sx, w * sx, y * sy, h * sy
    tol = EDGE_TOLERANCE_PX
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        return "box-outside", f"bbox {_r(bbox)} reaches beyond the {width}x{height} image by more than {tol:g} px", []
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(width)), min(y + h, float(height))
    if x2 - x1 < MIN_BOX_PX or y2 - y1 < MIN_BOX_PX:
        return "zero-area", f"bbox {_r(bbox)} is {x2 - x1:.2f}x{y2 - y1:.2f} px; under {MIN_BOX_PX:g} px is not a table", []
    return "", "", [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)]


def _r(bbox: Any) -> list[float]:
    return [round(float(v), 2) for v in bbox]


def _normalise(im, fmt: str | None, changed: bool, src: Path, digest: str, folder: Path) -> tuple[str, str]:
    """Write the image once in normal form; return (file name relative to out_dir, its sha256)."""
    keep_bytes = not changed and fmt in ("JPEG", "PNG")
    ext = ".png" if fmt == "PNG" else ".jpg"
    dst = folder / f"{digest[:16]}{ext}"
    if not dst.exists():  # named by the source bytes: an earlier run already wrote the same result
        tmp = dst.with_name(dst.name + ".tmp")
        if keep_bytes:
            shutil.copyfile(src, tmp)
        else:
            im.save(tmp, "PNG" if ext == ".png" else "JPEG", quality=95)
        tmp.replace(dst)
    return f"images/{dst.name}", content_hash(dst)  # the bytes there are what is pinned, whoever wrote them


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Drop images an earlier run of a different dataset left here (only files named as we name them)."""
    names = {Path(k).name for k in keep}
    for path in folder.iterdir():
        if _NORMALISED_NAME.match(path.name) and path.name not in names:
            path.unlink()


def _drop_products_in_test(items: list[_Item], quarantine: list[QuarantineEntry]) -> list[_Item]:
    """Quarantine training images of a product that has a photo in the dataset's held-out split.

    The held-out split becomes our test split untouched (others compare on it); moving the product's
    other photos there would change it, keeping them in training would leak the product.
    """
    held = {it.group: it.file for it in items if it.held_out}
    kept = []
    for it in items:
        if not it.held_out and it.group in held:
            quarantine.append(QuarantineEntry(it.file, "product-in-test",
                                              f"{it.group} also has a photo in the held-out split ({held[it.group]}); "
                                              "kept out of training and validation so no product is in two splits"))
        else:
            kept.append(it)
    return kept


def _split(items: list[_Item], cfg: DataConfig, annotations: Path, total: int,
           quarantine: list[QuarantineEntry]) -> dict[str, list[_Item]]:
    if not items:
        raise DataError(f"no usable images in {annotations}: all {total} were quarantined "
                        f"({_top_reasons(quarantine)}). See the quarantine list in report.json.")
    groups: dict[str, list[_Item]] = {name: [] for name in SPLITS}
    has_held_out = any(it.held_out for it in items)
    for it in items:
        if it.held_out:
            groups["test"].append(it)
        elif has_held_out:  # the dataset's own held-out split is the test set; val comes from its train split
            groups["val" if it.rank < cfg.val_fraction else "train"].append(it)
        elif it.rank < cfg.test_fraction:
            groups["test"].append(it)
        elif it.rank < cfg.test_fraction + cfg.val_fraction:
            groups["val"].append(it)
        else:
            groups["train"].append(it)
    # Small datasets: borrow the train images whose rank lies nearest to the empty split's range.
    for name in ("test", "val"):
        if groups[name] or (name == "val" and cfg.val_fraction == 0):
            continue
        if len({it.group for it in groups["train"]}) < 2:
            break
        pick = min(groups["train"], key=lambda it: it.rank).group  # a whole product moves, never half of it
        groups[name] += [it for it in groups["train"] if it.group == pick]
        groups["train"] = [it for it in groups["train"] if it.group != pick]
    empty = [n for n in SPLITS if not groups[n] and not (n == "val" and cfg.val_fraction == 0)]
    if empty:
        raise DataError(f"split(s) {', '.join(empty)} would be empty: {len(items)} usable of {total} images in "
                        f"{annotations} (train {len(groups['train'])}, val {len(groups['val'])}, test "
                        f"{len(groups['test'])}, {len({it.group for it in items})} product groups); at least 3 usable "
                        "images of 3 different products are needed, training images first. "
                        f"Quarantined: {_top_reasons(quarantine) or 'none'}.")
    for name in SPLITS:
        groups[name].sort(key=lambda it: it.order)
    return groups


def _top_reasons(quarantine: list[QuarantineEntry], n: int = 3) -> str:
    counts = Counter(q.reason for q in quarantine).most_common(n)
    return ", ".join(f"{reason} {count}" for reason, count in counts)


def _write_coco(path: Path, items: list[_Item], category: str) -> None:
    images, annotations = [], []
    for image_id, it in enumerate(items, start=1):
        images.append({"id": image_id, "file_name": it.name, "width": it.width, "height": it.height,
                       "source_file": it.file, "content_hash": it.content_hash})
        for box in it.boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "bbox": box, "area": round(box[2] * box[3], 3), "iscrowd": 0})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": category, "supercategory": "none"}]}
    write_json(path, coco, indent=None)


def _fingerprint(groups: dict[str, list[_Item]], cfg: DataConfig) -> str:
    """Changes when any normalised image, box, split assignment or data setting changes."""
    rows = sorted([name, it.normalised_hash, it.width, it.height, it.boxes] for name in SPLITS for it in groups[name])
    payload = json.dumps({"config": dataclasses.asdict(cfg), "images": rows}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
