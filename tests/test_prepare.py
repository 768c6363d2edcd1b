"""prepare(): every quarantine reason, odd image modes, EXIF, duplicates, splits, fingerprint."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import encode, noise, write_coco
from vlmdet.config.settings import DataConfig
from vlmdet.data import DataError, ImageError, open_image, prepare
from vlmdet.data.images import content_hash


def content_hash_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _split_of(ref) -> dict[str, str]:
    """source file -> split."""
    out = {}
    for split, path in ref.splits.items():
        for im in json.loads(Path(path).read_text())["images"]:
            out[im["source_file"]] = split
    return out


def _coco(ref, split):
    return json.loads(Path(ref.splits[split]).read_text())


def _good(n, start=0, size=(40, 30)):
    return [{"file": f"ok{i}.jpg", "bytes": encode(noise(size, 1000 + i)), "size": size} for i in range(start, start + n)]


def test_every_quarantine_reason(tmp_path, monkeypatch):
    jpeg = encode(noise((64, 48), 1))
    bomb = encode(noise((128, 128), 2), "PNG")
    near_bomb = encode(noise((80, 60), 2), "PNG")
    images = _good(4) + [
        {"file": "truncated.jpg", "bytes": jpeg[: len(jpeg) // 2], "size": (64, 48)},
        {"file": "empty.jpg", "bytes": b"", "size": (64, 48)},
        {"file": "notes.jpg", "bytes": b"this is not an image", "size": (64, 48)},
        {"file": "missing.jpg", "bytes": None, "size": (64, 48)},
        {"file": "copy.jpg", "bytes": _good(1)[0]["bytes"], "size": (40, 30)},
        {"file": "bomb.png", "bytes": bomb, "size": (128, 128)},
        {"file": "near-bomb.png", "bytes": near_bomb, "size": (80, 60)},
        {"file": "boxes.jpg", "bytes": jpeg, "size": (64, 48)},
        {"file": "only-degenerate.jpg", "bytes": encode(noise((64, 48), 3)), "size": (64, 48)},
    ]
    b = len(images) - 2
    boxes = [(0, [1, 1, 20, 20], "nutrition-table"),
             (b, [10, 10, 20, 20], "nutrition-table"),          # kept
             (b, [50, 30, 14.6, 18.8], "nutrition-table"),      # overshoots by 0.6/0.8 px: clipped
             (b, [50, 30, 20, 10], "nutrition-table"),          # 6 px beyond the right edge
             (b, [5, 5, 2, 1], "nutrition-table"),              # the 2x1 px slip
             (b, [5, 5, 10, 10], "nutrition-facts-logo"),       # another class
             (b, [5, 5, -3, 10], "nutrition-table"),            # negative width
             (b + 1, [5, 5, 1, 8], "nutrition-table")]          # its only box is degenerate
    ann = write_coco(tmp_path / "src", images, boxes, categories=("nutrition-table", "nutrition-facts-logo"))
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice it: 80x60 warns, 128x128 raises
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    ref = prepare(ann, tmp_path / "out", DataConfig(), source="test")
    monkeypatch.undo()

    reasons = {(q["file"], q["reason"]) for q in ref.quarantine}
    assert {("truncated.jpg", "truncated"), ("empty.jpg", "empty-file"), ("notes.jpg", "unreadable"),
            ("missing.jpg", "missing-file"), ("copy.jpg", "duplicate"), ("bomb.png", "too-large"), ("near-bomb.png", "too-large"),
            ("boxes.jpg", "box-outside"), ("boxes.jpg", "zero-area"), ("boxes.jpg", "unknown-category"),
            ("boxes.jpg", "bad-box"), ("only-degenerate.jpg", "zero-area")} == reasons
    assert all(q["detail"] for q in ref.quarantine)
    assert "image dropped" in next(q["detail"] for q in ref.quarantine if q["file"] == "only-degenerate.jpg")
    assert ref.quarantine_counts["zero-area"] == 2
    kept = {im["source_file"]: (split, im) for split in ref.splits for im in _coco(ref, split)["images"]}
    assert set(kept) == {"ok0.jpg", "ok1.jpg", "ok2.jpg", "ok3.jpg", "boxes.jpg"}
    split, im = kept["boxes.jpg"]
    got = sorted(a["bbox"] for a in _coco(ref, split)["annotations"] if a["image_id"] == im["id"])
    assert got == [[10, 10, 20, 20], [50, 30, 14, 18]]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["quarantine_counts"] == ref.quarantine_counts and report["usable_images"] == 5
    assert sum(c["images"] for c in ref.counts.values()) == 5


def test_odd_modes_become_rgb_with_the_right_colours(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent: white once composited
    grey16 = Image.fromarray(np.array([[65535, 32768], [0, 1000]], dtype=np.uint16))
    assert grey16.mode.startswith("I;16")
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    la = Image.new("LA", (4, 4), (0, 128))
    files = {"rgba.png": encode(rgba, "PNG"), "grey16.png": encode(grey16, "PNG"),
             "pal.png": encode(pal, "PNG", transparency=0), "cmyk.jpg": encode(cmyk, "JPEG", quality=95),
             "la.png": encode(la, "PNG")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    opened = {name: open_image(tmp_path / name) for name in files}
    assert all(im.mode == "RGB" for im in opened.values())
    assert opened["rgba.png"].getpixel((0, 0)) == (255, 255, 255)
    assert opened["rgba.png"].getpixel((3, 3)) == (255, 0, 0)
    g = opened["grey16.png"]
    assert g.getpixel((0, 0)) == (255, 255, 255) and g.getpixel((1, 1)) == (4, 4, 4)
    assert abs(g.getpixel((1, 0))[0] - 128) <= 1  # scaled, not clipped at 255
    assert opened["pal.png"].getpixel((0, 0)) == (255, 255, 255) and opened["pal.png"].getpixel((1, 1)) == (0, 0, 255)
    r, gr, bl = opened["cmyk.jpg"].getpixel((4, 4))
    assert r > 200 and gr < 60 and bl < 60
    assert opened["la.png"].getpixel((0, 0)) == (127, 127, 127)  # black at 50% alpha over white

    images = [{"file": n, "bytes": d, "size": open_image(tmp_path / n).size} for n, d in files.items()]
    ref = prepare(write_coco(tmp_path / "src", images, []), tmp_path / "out", DataConfig())
    assert not ref.quarantine
    for split in ref.splits:
        for im in _coco(ref, split)["images"]:
            with Image.open(tmp_path / "out" / im["file_name"]) as f:
                assert f.mode == "RGB" and f.size == (im["width"], im["height"])
                assert f.format == ("PNG" if im["source_file"].endswith(".png") else "JPEG")


def test_image_error_reasons_directly(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(ImageError) as err:
        open_image(tmp_path / "zero.jpg")
    assert err.value.reason == "empty-file"


def test_exif_rotated_jpeg_is_normalised_upright(tmp_path):
    stored = Image.new("RGB", (60, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # a red mark top-left of the stored pixels
    data = encode(stored, orientation=6, quality=95)  # 6: display rotated 90 degrees clockwise
    # the box is in displayed pixels (40 wide, 60 high)
    ann = write_coco(tmp_path / "src", [{"file": "rot.jpg", "bytes": data, "size": (40, 60)}] + _good(3),
                     [(0, [5, 30, 30, 25], "nutrition-table")])
    ref = prepare(ann, tmp_path / "out", DataConfig())
    split = _split_of(ref)["rot.jpg"]
    im = next(i for i in _coco(ref, split)["images"] if i["source_file"] == "rot.jpg")
    assert (im["width"], im["height"]) == (40, 60)
    assert [a["bbox"] for a in _coco(ref, split)["annotations"] if a["image_id"] == im["id"]] == [[5, 30, 30, 25]]
    with Image.open(tmp_path / "out" / im["file_name"]) as f:
        assert f.size == (40, 60)
        assert f.getexif().get(0x0112, 1) == 1
        top_right, top_left = f.convert("RGB").getpixel((35, 4)), f.convert("RGB").getpixel((4, 4))
    assert top_right[0] > 200 and top_right[2] < 60, "the stored top-left mark is displayed top-right"
    assert top_left[2] > 200


def test_a_corrupt_exif_block_keeps_the_stored_pixels(tmp_path, monkeypatch):
    """The image is turned in place; an EXIF block that breaks the turn halfway leaves the pixels as stored."""
    from PIL import ImageOps

    from vlmdet.data.images import load_image

    stored = Image.new("RGB", (60, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))
    (tmp_path / "rot.jpg").write_bytes(encode(stored, orientation=6, quality=95))
    turn = ImageOps.exif_transpose

    def breaks_halfway(image, *, in_place=False):
        turn(image, in_place=in_place)  # the pixels turned, then the EXIF rewrite fails
        raise SyntaxError("corrupt EXIF")

    monkeypatch.setattr(ImageOps, "exif_transpose", breaks_halfway)
    im, fmt, changed = load_image(tmp_path / "rot.jpg")
    assert (im.size, fmt, changed) == ((60, 40), "JPEG", False)
    assert im.getpixel((4, 4))[0] > 200  # the red mark where it is stored


def test_an_unreadable_file_is_named_in_its_reason(tmp_path):
    """load_image decodes the file's bytes from memory; Pillow's message still names the file."""
    from vlmdet.data.images import load_image

    (tmp_path / "junk.jpg").write_bytes(b"not a picture")
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / "junk.jpg")
    assert (err.value.reason, err.value.detail) == ("unreadable", f"cannot identify image file {str(tmp_path / 'junk.jpg')!r}")


@pytest.mark.parametrize("fmt", ["TIFF", "MPO"])
def test_a_multi_frame_files_first_frame_holds_only_its_pixels(tmp_path, fmt):
    """A phone's MPO JPEG or a multi-page TIFF decodes to its first frame, which keeps no reference to the
    file's bytes (Pillow holds them to seek other frames): a decoded image costs its pixels, nothing more."""
    from vlmdet.data.images import load_image

    first, second = Image.new("RGB", (40, 30), (10, 20, 30)), Image.new("RGB", (40, 30), (200, 20, 30))
    path = tmp_path / f"two.{fmt.lower()}"
    first.save(path, format=fmt, save_all=True, append_images=[second])
    im, _, changed = load_image(path)
    assert (im.mode, im.size, im.getpixel((0, 0)), changed) == ("RGB", (40, 30), (10, 20, 30), False)
    assert getattr(im, "fp", None) is None and getattr(im, "_fp", None) is None


def test_a_folder_is_unreadable_and_the_bomb_check_is_one_thread_at_a_time(tmp_path, monkeypatch):
    """The decompression-bomb check turns a process-wide warning into an error: threads decoding at once (prepare,
    the training copies) take turns through it, or one would open an oversized image unchecked."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from vlmdet.data import images

    with pytest.raises(ImageError) as err:
        images.load_image(tmp_path)
    assert err.value.reason == "unreadable" and "Is a directory" in err.value.detail

    inside, most = [0], [0]
    real_open = Image.open

    def slow_open(*a, **kw):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.05)
        inside[0] -= 1
        return real_open(*a, **kw)

    (tmp_path / "p.png").write_bytes(encode(noise((20, 20), 1), "PNG"))
    monkeypatch.setattr(images.Image, "open", slow_open)
    with ThreadPoolExecutor(4) as pool:
        assert all(im.size == (20, 20) for im, _, _ in pool.map(images.load_image, [tmp_path / "p.png"] * 8))
    assert most[0] == 1


def test_an_image_past_max_images_cannot_fail_prepare(tmp_path, monkeypatch):
    """Images past data.max_images are never examined: one decoded ahead in a thread that fails does not fail the
    run, while the same failure on an image that is needed does."""
    import sys

    prep = sys.modules["vlmdet.data.prepare"]
    images = _good(6)
    late = content_hash_of(images[5]["bytes"])
    rank = prep._rank
    monkeypatch.setattr(prep, "_rank", lambda seed, key: 0.999 if key == late else rank(seed, key) * 0.9)
    check = prep._check_boxes

    def broken_for_late(file, *a):
        if file == "ok5.jpg":
            raise RuntimeError("a bug on the last image")
        return check(file, *a)

    monkeypatch.setattr(prep, "_check_boxes", broken_for_late)
    ann = write_coco(tmp_path / "src", images, [])
    ref = prepare(ann, tmp_path / "capped", DataConfig(max_images=5))
    assert sum(c["images"] for c in ref.counts.values()) == 5 and "ok5.jpg" not in _split_of(ref)
    assert len(list((tmp_path / "capped" / "images").iterdir())) == 5
    with pytest.raises(RuntimeError, match="a bug on the last image"):
        prepare(ann, tmp_path / "all", DataConfig())


def test_plain_jpeg_and_png_are_copied_byte_for_byte(tmp_path):
    images = _good(3) + [{"file": "p.png", "bytes": encode(noise((20, 20), 9), "PNG"), "size": (20, 20)}]
    ref = prepare(write_coco(tmp_path / "src", images, []), tmp_path / "out", DataConfig())
    for split in ref.splits:
        for im in _coco(ref, split)["images"]:
            assert content_hash(tmp_path / "out" / im["file_name"]) == im["content_hash"] == \
                content_hash(tmp_path / "src" / im["source_file"])
    # the fingerprint pins the bytes in the prepared folder
    other = prepare(write_coco(tmp_path / "src2", images, []), tmp_path / "out2", DataConfig())
    assert other.fingerprint == ref.fingerprint
    first = next(p for p in (tmp_path / "out" / "images").iterdir())
    first.write_bytes(first.read_bytes() + b"x")  # the same name, other bytes: prepared again, another fingerprint
    again = prepare(write_coco(tmp_path / "src", images, []), tmp_path / "out", DataConfig())
    assert again.fingerprint != ref.fingerprint


def test_duplicates_never_cross_splits_and_held_out_split_becomes_test(tmp_path):
    train = _good(30)
    held = _good(6, start=100)
    for im in held:
        im["split"] = "val"
    for im in train:
        im["split"] = "train"
    # copies: a train image repeated in the dataset's val split, and twice inside train
    dup_val = dict(train[0], file="dup-in-val.jpg", split="val")
    dup_train = [dict(train[i], file=f"dup{i}.jpg") for i in (1, 2)]
    ann = write_coco(tmp_path / "src", train + held + [dup_val] + dup_train, [])
    ref = prepare(ann, tmp_path / "out", DataConfig(val_fraction=0.2))
    splits = _split_of(ref)
    assert {q["file"] for q in ref.quarantine if q["reason"] == "duplicate"} == {"dup-in-val.jpg", "dup1.jpg", "dup2.jpg"}
    hashes = Counter(im["content_hash"] for s in ref.splits for im in _coco(ref, s)["images"])
    assert max(hashes.values()) == 1
    assert {f for f, s in splits.items() if s == "test"} == {im["file"] for im in held}
    assert ref.counts["val"]["images"] >= 1 and ref.counts["train"]["images"] >= 1
    assert ref.counts["train"]["images"] + ref.counts["val"]["images"] == 30


def test_split_is_deterministic_stable_and_never_empty(tmp_path):
    images = _good(40)
    a = prepare(write_coco(tmp_path / "a", images, []), tmp_path / "out-a", DataConfig(seed=5))
    b = prepare(write_coco(tmp_path / "b", images, []), tmp_path / "out-b", DataConfig(seed=5))
    assert _split_of(a) == _split_of(b) and a.fingerprint == b.fingerprint
    assert all(a.counts[s]["images"] >= 1 for s in ("train", "val", "test"))
    grown = prepare(write_coco(tmp_path / "c", images + _good(20, start=40), []), tmp_path / "out-c",
                    DataConfig(seed=5))
    assert {f: s for f, s in _split_of(grown).items() if f in _split_of(a)} == _split_of(a)
    reseeded = prepare(write_coco(tmp_path / "d", images, []), tmp_path / "out-d", DataConfig(seed=6))
    assert _split_of(reseeded) != _split_of(a)

    three = prepare(write_coco(tmp_path / "e", _good(3), []), tmp_path / "out-e", DataConfig())
    assert [three.counts[s]["images"] for s in ("train", "val", "test")] == [1, 1, 1]
    with pytest.raises(DataError, match="would be empty"):
        prepare(write_coco(tmp_path / "f", _good(2), []), tmp_path / "out-f", DataConfig())


def test_nothing_usable_names_the_reasons(tmp_path):
    images = [{"file": f"bad{i}.jpg", "bytes": b"junk %d" % i, "size": (8, 8)} for i in range(3)]
    images.append({"file": "gone.jpg", "bytes": None, "size": (8, 8)})
    with pytest.raises(DataError) as err:
        prepare(write_coco(tmp_path / "src", images, []), tmp_path / "out", DataConfig())
    message = str(err.value)
    assert "all 4" in message and "unreadable 3" in message and "missing-file 1" in message
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path / "nowhere.json", tmp_path / "out", DataConfig())


def test_fingerprint_follows_boxes_and_config(tmp_path):
    images = _good(6)
    boxes = [(0, [1, 1, 20, 20], "nutrition-table")]
    base = prepare(write_coco(tmp_path / "a", images, boxes), tmp_path / "o1", DataConfig())
    again = prepare(write_coco(tmp_path / "a", images, boxes), tmp_path / "o1", DataConfig())
    moved = prepare(write_coco(tmp_path / "b", images, [(0, [2, 1, 20, 20], "nutrition-table")]), tmp_path / "o2",
                    DataConfig())
    other_cfg = prepare(write_coco(tmp_path / "a", images, boxes), tmp_path / "o3", DataConfig(val_fraction=0.2))
    assert base.fingerprint == again.fingerprint
    assert len({base.fingerprint, moved.fingerprint, other_cfg.fingerprint}) == 3


def test_max_images_caps_usable_images_and_removes_stale_files(tmp_path):
    images = _good(20) + [{"file": "bad.jpg", "bytes": b"junk", "size": (8, 8)}]
    out = tmp_path / "out"
    full = prepare(write_coco(tmp_path / "src", images, []), out, DataConfig())
    assert len(list((out / "images").iterdir())) == 20
    capped = prepare(write_coco(tmp_path / "src", images, []), out, DataConfig(max_images=6))
    assert sum(c["images"] for c in capped.counts.values()) == 6
    assert all(capped.counts[s]["images"] >= 1 for s in capped.counts)
    assert len(list((out / "images").iterdir())) == 6, "images of the earlier, larger run are removed"
    assert capped.fingerprint != full.fingerprint


@pytest.mark.parametrize("max_images", [0, 7])
def test_decoding_in_threads_gives_the_serial_outcome(tmp_path, monkeypatch, max_images):
    """Pass 2 decodes in threads and takes the results in order: splits, quarantine and files are the ones a
    single thread gives, also when data.max_images stops early (the images decoded past it leave no file)."""
    import sys

    prep = sys.modules["vlmdet.data.prepare"]  # the package's `prepare` is the function
    in_order = prep._in_order
    images = _good(14) + [{"file": "bad.jpg", "bytes": b"junk", "size": (8, 8)}] + _good(6, start=14)
    images += [dict(images[5], file="again.jpg"), {"file": "empty.jpg", "bytes": b"", "size": (8, 8)}]
    boxes = [(i, [2, 2, 20, 10], "nutrition-table") for i in range(0, 21, 2)] + [(3, [500, 500, 5, 5], "nutrition-table")]
    ann = write_coco(tmp_path / "src", images, boxes)

    def outcome(out: Path, threads: int) -> tuple:
        monkeypatch.setattr(prep, "_in_order", lambda fn, work: in_order(fn, work, threads=threads))
        ref = prepare(ann, out, DataConfig(max_images=max_images))
        return ({s: Path(p).read_text() for s, p in ref.splits.items()}, ref.quarantine, ref.fingerprint,
                sorted(f.name for f in (out / "images").iterdir()))

    serial, threaded = outcome(tmp_path / "one", 1), outcome(tmp_path / "four", 4)
    assert threaded == serial
    kept = sum(len(json.loads(text)["images"]) for text in serial[0].values())
    assert kept == (max_images or 19) and len(serial[3]) == kept  # 21 less the unreadable and the one out of bounds
    if not max_images:
        assert [q["reason"] for q in serial[1]] == ["duplicate", "empty-file", "box-outside", "unreadable"]


def test_resized_file_scales_boxes(tmp_path):
    """Labels made on a 200x150 original, file shipped at 40x30: boxes scale with the image."""
    images = _good(4)
    images[0] = dict(images[0], size=(200, 150))
    ref = prepare(write_coco(tmp_path / "src", images, [(0, [20, 30, 100, 60], "nutrition-table")]),
                  tmp_path / "out", DataConfig())
    split = _split_of(ref)["ok0.jpg"]
    assert _coco(ref, split)["annotations"][0]["bbox"] == [4, 6, 20, 12]


def test_progress_bar_and_copy_of_source_untouched(tmp_path, capsys):
    images = _good(55, size=(16, 12))
    src = tmp_path / "src"
    prepare(write_coco(src, images, []), tmp_path / "out", DataConfig())
    assert "prepare images" in capsys.readouterr().err
    before = sorted(p.name for p in src.iterdir())
    shutil.rmtree(tmp_path / "out")
    assert sorted(p.name for p in src.iterdir()) == before
