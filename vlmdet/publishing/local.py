"""Publishing to a local repo-shaped folder (the `local:DIR` target).

The folder is replaced as a whole: the publication is written to a hidden staging sibling and swapped
in with renames, so a reader (or the next run's gate) sees the old model or the new one, never half
of each. Weights are copied, not hard-linked: a later merge writing into the same workdir truncates
its files in place, which would silently corrupt a hard-linked published copy.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from vlmdet.publishing.files import Source
from vlmdet.records import Publication


def publish_folder(dest: Path, files: dict[str, Source], run_id: str) -> Publication:
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.staging-{run_id}")
    old = dest.with_name(f".{dest.name}.old-{run_id}")
    _recover(dest, old)
    for leftover in (staging, old):
        if leftover.exists():  # from a crashed earlier attempt of this run
            shutil.rmtree(leftover)
    for rel, src in files.items():
        out = staging / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            out.write_bytes(src)
        else:
            shutil.copy2(src, out)
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    if old.exists():
        shutil.rmtree(old)
    return Publication(target=str(dest), kind="local", revision=run_id, url=dest.resolve().as_uri(),
                       files=sorted(files), tag=f"run-{run_id}", run_id=run_id)


def _recover(dest: Path, old: Path) -> None:
    """Put the published model back if an earlier attempt crashed between its two renames.

    Then dest is missing and `.NAME.old-RUN` holds the only copy of the champion; the cleanup of
    leftovers that follows would delete it. Prefer this run's own backup, else the newest one any
    run left behind.
    """
    if dest.exists():
        return
    backups = [old] if old.is_dir() else sorted(dest.parent.glob(f".{dest.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if backups and backups[-1].is_dir():
        backups[-1].rename(dest)
