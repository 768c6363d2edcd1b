"""The prepare step on real photos (issue 29): seconds, and a digest of what it wrote, for comparing two commits.

`vlmdet.data.prepare` reads every photo's bytes (duplicates), decodes it (unreadable files, EXIF orientation,
boxes against the size as displayed) and writes the kept images in normal form: 36 s of the real-size night
for 1,207 photos (benchmarks/RESULTS.md). It is CPU work, so it is measured on any machine.

The photos are ../shared/data/real-photos (21 JPEGs, 2-8 MP, some with an EXIF orientation), each used
--repeat times under another name and with other bytes (a comment appended after the JPEG's end, which
decoders ignore), so none is a duplicate; one box each. Every start prepares into a fresh folder; the
median of --starts is printed with a digest of the split files, the normalised images' names and hashes
and the dataset's fingerprint: two commits that prepare the same dataset print the same digest.

    python benchmarks/prepare_bench.py [--repo PATH] [--repeat 4 --starts 3] [--json OUT.json]

--repo: the checkout whose vlmdet is measured (default: this one), e.g. a `git worktree` of an older commit.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def photos_dataset(src: Path, repeat: int, work: Path) -> Path:
    """annotations.json over `repeat` distinct copies of every photo in src, one box each."""
    from PIL import Image, ImageOps

    images, anns = [], []
    for i in range(repeat):
        for f in sorted(p for p in src.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")):
            name = f"{f.stem}-{i}{f.suffix}"
            (work / "photos").mkdir(parents=True, exist_ok=True)
            (work / "photos" / name).write_bytes(f.read_bytes() + f"copy {i}".encode())
            with Image.open(f) as im:
                w, h = ImageOps.exif_transpose(im).size
            n = len(images) + 1
            images.append({"id": n, "file_name": f"photos/{name}", "width": w, "height": h})
            anns.append({"id": n, "image_id": n, "category_id": 1, "bbox": [w * 0.25, h * 0.25, w * 0.5, h * 0.4]})
    path = work / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "nutrition-table"}]}))
    return path


def digest(out: Path, fingerprint: str) -> str:
    """What prepare wrote that a later step reads: the splits, the normalised images' names and bytes, and the
    dataset's fingerprint (the training key's part)."""
    h = hashlib.sha256(fingerprint.encode())
    for split in ("train", "val", "test"):
        p = out / f"{split}.json"
        if p.is_file():
            h.update(p.read_bytes())
    for p in sorted((out / "images").iterdir()):
        h.update(p.name.encode() + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=HERE)
    ap.add_argument("--photos", type=Path, default=HERE.parent / "shared" / "data" / "real-photos")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    a = ap.parse_args()
    sys.path.insert(0, str(a.repo.resolve()))
    from vlmdet.config.settings import load_preset
    from vlmdet.data.prepare import prepare

    sys.modules["vlmdet.data.prepare"].PROGRESS_MIN_IMAGES = 1 << 30  # no progress bar in the timings' output

    cfg = load_preset("qwen2-vl-7b-nutrition").data
    work = Path(tempfile.mkdtemp(prefix="prepare-bench-"))
    try:
        ann = photos_dataset(a.photos, a.repeat, work)
        seconds, digests = [], set()
        for i in range(a.starts):
            out = work / f"out-{i}"
            t = time.perf_counter()
            ref = prepare(ann, out, cfg)
            seconds.append(time.perf_counter() - t)
            digests.add(digest(out, ref.fingerprint))
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=a.repo, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    n = sum(c["images"] for c in ref.counts.values())
    result = {"commit": commit, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "cores": os.cpu_count(), "python": platform.python_version(), "photos": n,
              "quarantined": len(ref.quarantine), "median_s": round(statistics.median(seconds), 3),
              "ms_per_photo": round(statistics.median(seconds) / max(n, 1) * 1000, 1),
              "seconds": [round(s, 3) for s in seconds], "digest": sorted(digests)}
    print(json.dumps(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
