"""Hashing the merged model once (issue 29): the parent's checks of a passing night, old and new, in one run.

A passing night hashes the merged folder in the merge child (the pin, MergedRef), then in the run's own
process: `check_folder` after the merged model's evaluation (before the gate), and the publication's check,
which reads every file again (a Hub target: the sha256 huggingface_hub computes for each file of the commit;
huggingface_hub >= 2 hashes a file when its `upload_info.sha256` is first read, the check reads it, one file
after the other). New: the run's process hashes each file once (in parallel threads) and remembers the digest
with the file's (dev, inode, size, mtime, ctime); a later check in that process re-reads only a file whose
stat changed (vlmdet/publishing/digests.py says what that catches and what it does not).

The folder is shaped like a merged 7B (4 safetensors shards, config, tokenizer), scaled down to fit this
machine's disk and page cache (default 4 x 512 MiB, printed). Its files are left alone for
digests.RACY_S + 0.5 s after writing, as a merged folder is during its evaluation (minutes): a file written
within RACY_S of being hashed is never remembered.

    python benchmarks/hash_bench.py [--shards 4 --shard-mib 512 --repeat 3 --work /tmp/hash-bench]

Prints a markdown table (machine, date, versions, seconds, GB/s, ratio); every row is the median of
--repeat runs, page cache warm (the merge has just written the files; both sides read the same cache).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import ssl
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from huggingface_hub.utils.sha import sha_fileobj  # noqa: E402 - the client's own hashing of an LFS file

from vlmdet.publishing import digests, files as pubfiles  # noqa: E402
from vlmdet.run.records import MergedRef, files_sha256, model_files  # noqa: E402


def build(folder: Path, shards: int, shard_mib: int) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    block = os.urandom(1 << 20)
    for i in range(1, shards + 1):
        with open(folder / f"model-{i:05d}-of-{shards:05d}.safetensors", "wb") as f:
            for j in range(shard_mib):
                f.write(block[j % 97:] + block[:j % 97])  # no two MiB alike
    (folder / "config.json").write_text('{"model_type": "qwen2_vl"}\n')
    (folder / "tokenizer.json").write_bytes(os.urandom(11 << 20))  # Qwen2-VL's is 11 MB
    (folder / "model.safetensors.index.json").write_text("{}\n")


def old_night(merged: MergedRef) -> None:
    """The parent's two passes as they were: check_folder (records.files_sha256), then the Hub client's sha256
    of every file of the commit, read by the publication's check one after the other."""
    pubfiles.check_pinned(merged, files_sha256(model_files(merged.path)), "gating it")
    sent = {}
    for rel, path in model_files(merged.path).items():
        with open(path, "rb") as f:
            sent[rel] = sha_fileobj(f).hex()
    pubfiles.check_pinned(merged, sent)


def new_night(merged: MergedRef) -> None:
    """The same two checks through files.py: check_folder hashes, the publication's check re-reads nothing
    unchanged (hub.publish_repo hands these digests to the client's upload_info)."""
    pubfiles.check_folder(merged, "gating it")
    pubfiles.check_pinned(merged, digests.file_digests(model_files(merged.path)))


def timed(fn, repeat: int, before=None) -> float:
    runs = []
    for _ in range(repeat):
        if before:
            before()
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/hash-bench"))
    args = ap.parse_args(argv)

    folder = args.work / "merged"
    build(folder, args.shards, args.shard_mib)
    time.sleep(digests.RACY_S + 0.5)
    merged = MergedRef.pinned(folder, "random-7b", 0.0)  # the merge child's pin (another process in a run)
    size = sum(p.stat().st_size for p in model_files(folder).values())
    gb = size / 1e9

    forget = digests.forget  # each repeat starts as a fresh run's process does: nothing remembered
    rows = [
        ("check_folder, as it was (records.files_sha256)", timed(
            lambda: pubfiles.check_pinned(merged, files_sha256(model_files(folder)), "gating it"), args.repeat), 1),
        ("check_folder, first in a process (digests.file_digests)", timed(
            lambda: pubfiles.check_folder(merged, "gating it"), args.repeat, forget), 1),
        ("publish's check, as it was (the client's sha256, file by file)", timed(
            lambda: {rel: sha_fileobj(open(p, "rb")) for rel, p in model_files(folder).items()}, args.repeat), 1),
        ("publish's check after check_folder in the same process", timed(
            lambda: pubfiles.check_pinned(merged, digests.file_digests(model_files(folder))), args.repeat), 0),
        ("the run's process, both checks, as it was", timed(lambda: old_night(merged), args.repeat), 1),
        ("the run's process, both checks, hashing once", timed(lambda: new_night(merged), args.repeat, forget), 1),
    ]
    import huggingface_hub

    print(f"\nhash_bench: {platform.node()} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; Python {platform.python_version()}, "
          f"{ssl.OPENSSL_VERSION}, "
          f"huggingface_hub {huggingface_hub.__version__}; folder: {args.shards} shards x {args.shard_mib} MiB + "
          f"tokenizer and config = {gb:.2f} GB (a merged 7B is 4 shards, 16.6 GB), page cache warm, "
          f"median of {args.repeat}\n")
    base = {0: rows[0][1], 2: rows[2][1], 4: rows[4][1]}
    print("| what | seconds | GB/s | vs as it was |")
    print("| --- | ---: | ---: | ---: |")
    for i, (what, s, reads) in enumerate(rows):
        ref = base[i - i % 2]
        rate = f"{gb / s:.2f}" if reads else "(stat only)"
        print(f"| {what} | {s:.3f} | {rate} | {s / ref:.3f} |")
    shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
