"""The training images' pre-resized copies, PNG against uncompressed BMP (issue 29): one run, one machine.

The train step's data phase (51 s of the real-size night, benchmarks/RESULTS.md) decodes every photo, resizes
it to the model's pixel budget (bicubic, as the processor does) and stores the copy; the trainer's collator
then reads the copy once an epoch. Old: PNG at compress_level 1 (the copy of the commit before this one,
kept here as the baseline). New: `vlmdet.training.speed.resized_copy` as it is, an uncompressed BMP. Both
store the same pixels; the script checks that they read back equal.

The photos are ../shared/data/real-photos (2-8 MP photos), each used --repeat times under another name (a
copy per name, so every store is a miss), at the nightly preset's pixel budget. Writes run in the thread
pool the data phase uses (min(8, cores) threads); reads are one thread, as one collator worker reads.

    python benchmarks/pre_resize_bench.py [--photos ../shared/data/real-photos --repeat 4 --epochs 3]

Prints a markdown table (machine, cores, date, versions, ms an image, MB an image, ratios) and writes it
with the raw numbers to benchmarks/results/pre_resize-<commit>-<date>.json unless --no-save.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

from vlmdet.config.settings import load_preset  # noqa: E402
from vlmdet.data.images import open_image  # noqa: E402
from vlmdet.formats.resize import factor, smart_resize  # noqa: E402
from vlmdet.training.speed import resized_copy  # noqa: E402


def png_copy(src: str, width: int, height: int, family: str, min_pixels: int, max_pixels: int,
             cache_dir: Path) -> str:
    """The baseline: resized_copy as it stored its copies before, PNG at compress_level 1."""
    h, w = smart_resize(height, width, factor=factor(family), min_pixels=min_pixels, max_pixels=max_pixels)
    dst = cache_dir / f"{Path(src).stem}-{w}x{h}.png"
    cache_dir.mkdir(parents=True, exist_ok=True)
    open_image(src).resize((w, h), Image.Resampling.BICUBIC).save(dst, format="PNG", compress_level=1)
    return str(dst)


def run(store, photos: list[tuple[str, int, int]], model, cache: Path, epochs: int) -> dict:
    threads = min(8, os.cpu_count() or 1)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        paths = list(pool.map(lambda p: store(p[0], p[1], p[2], model.family, model.min_pixels, model.max_pixels,
                                              cache), photos))
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for p in paths:
            Image.open(p).convert("RGB")  # what the collator's image decode does with each row
    read_s = time.perf_counter() - t0
    n = len(photos)
    return {"images": n, "threads": threads, "write_s": round(write_s, 3), "read_s": round(read_s, 3),
            "write_ms_per_image": round(write_s / n * 1000, 1), "read_ms_per_image": round(read_s / n / epochs * 1000, 1),
            "mb_per_image": round(sum(os.path.getsize(p) for p in paths) / n / 1e6, 2), "paths": paths}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", default=str(REPO.parent / "shared" / "data" / "real-photos"))
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--preset", default="qwen2-vl-7b-nutrition")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args()
    model = load_preset(a.preset).model
    work = Path(tempfile.mkdtemp(prefix="pre-resize-"))
    try:
        photos = []
        for i in range(a.repeat):
            for f in sorted(p for p in Path(a.photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
                dst = work / "src" / f"{f.stem}-{i}{f.suffix}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst)
                w, h = open_image(dst).size
                photos.append((str(dst), w, h))
        old = run(png_copy, photos, model, work / "png", a.epochs)
        new = run(resized_copy, photos, model, work / "bmp", a.epochs)
        for p, q in zip(old.pop("paths"), new.pop("paths")):
            assert Image.open(p).convert("RGB").tobytes() == Image.open(q).convert("RGB").tobytes(), (p, q)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from importlib.metadata import version

    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    head = {"commit": commit, "date": date, "cpu": cpu, "cores": os.cpu_count(), "pillow": version("pillow"),
            "python": platform.python_version(), "preset": a.preset, "epochs_read": a.epochs}
    rows = [("PNG, compress_level 1 (before)", old), ("BMP, uncompressed (resized_copy)", new)]
    table = [f"{commit}, {date}, {cpu} ({os.cpu_count()} cores), Pillow {head['pillow']}: {old['images']} photos "
             f"({a.repeat} x {len(photos) // a.repeat}), writes in {old['threads']} threads, {a.epochs} reads each",
             "", "| copy | write ms/image | read ms/image | MB/image | data phase writes (s) | reads over the epochs (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows:
        table.append(f"| {name} | {r['write_ms_per_image']} | {r['read_ms_per_image']} | {r['mb_per_image']} | "
                     f"{r['write_s']} | {r['read_s']} |")
    table.append(f"| ratio new/old | {new['write_s'] / old['write_s']:.2f} | {new['read_s'] / old['read_s']:.2f} | "
                 f"{new['mb_per_image'] / old['mb_per_image']:.2f} | | |")
    print("\n".join(table))
    if not a.no_save:
        out = REPO / "benchmarks" / "results" / f"pre_resize-{commit}-{date}.json"
        out.write_text(json.dumps({**head, "old_png": old, "new_bmp": new, "table": table}, indent=1) + "\n")
        print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
