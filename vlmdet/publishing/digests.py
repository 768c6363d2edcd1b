"""The sha256 of the merged model's files, read once in a process.

A passing night checks the merged folder twice in the run's own process after the merge child pinned it:
before the gate (files.check_folder, after the merged model's evaluation) and in the publication (the sha256
each file of the Hub commit carries; a local target hashes its staged copy, new files). Each file is read and
hashed once a process, and its digest remembered with the file's stat as it was read:
(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns). A later check reads again any file whose stat differs
and trusts the digest of a file whose stat is the same.

What that catches: any write through the file system (write, truncate, copy_file_range, a shared mapping's
first write after its pages were written back), a file replaced by a rename or a copy (another inode), and a
rewrite that restores the size and the mtime (utime sets ctime to the clock; no call sets ctime back).
What it does not: a change that bypasses the file system (the block device underneath, a kernel that keeps no
times), a process holding a shared writable mapping that writes again to a page it had dirtied before the
hash (the kernel updates the times on the first write after writeback, up to ~30 s later), and a system clock
set back between two writes. The pin itself (MergedRef.pinned, in the merge child) always reads every byte.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

from vlmdet.run.records import files_sha256

# A file's times come from a coarse clock (a scheduler tick; a whole second on some file systems), so a write
# in the same tick as the write before it can leave them as they were: a file changed less than RACY_S before
# its hash started is not remembered and is read again at the next check (git's "racily clean" entries).
# A merged folder is checked minutes after its merge wrote it (its evaluation runs in between).
RACY_S = 2.0

_known: dict[tuple[int, ...], str] = {}
_lock = threading.Lock()


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def read_sha256(path: Path) -> str:
    """Read the whole file and hash it; remember the digest if the file was settled and unchanged while read."""
    started = time.time_ns()
    with open(path, "rb") as f:
        before = _stat_key(os.fstat(f.fileno()))
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        after = _stat_key(os.fstat(f.fileno()))
    if before == after and max(after[3], after[4]) < started - int(RACY_S * 1e9):
        with _lock:
            _known[after] = digest
    return digest


def file_digest(path: str | Path) -> str:
    """The sha256 of a file's bytes; read unless this process hashed it with the same stat."""
    known = _known.get(_stat_key(os.stat(path)))
    return known if known is not None else read_sha256(Path(path))


def file_digests(files: dict[str, Path]) -> dict[str, str]:
    """name -> sha256 (file_digest), the files to read hashed in parallel threads (records.files_sha256)."""
    return files_sha256(files, file_digest)


def forget() -> None:
    """Read every file again at its next check, as a fresh process does."""
    with _lock:
        _known.clear()
