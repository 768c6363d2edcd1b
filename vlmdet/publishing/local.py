"""Publishing to a local repo-shaped folder (the `local:DIR` target), and reading its champion.

The folder is replaced as a whole: the publication is written to a hidden staging sibling and swapped
in with renames, so a reader (or the next run's gate) sees the old model or the new one, never half
of each. Weights are copied, not hard-linked: a later merge writing into the same workdir truncates
its files in place, which would silently corrupt a hard-linked published copy.

The swap is a compare-and-swap: under a lock on the parent folder, the folder must still hold the
revision the gate read (its champion's run id, or nothing), else the publication stops with a
TargetChangedError. A crash between the two renames leaves the champion in `.NAME.old-RUN`;
`recover` puts it back, and runs before the gate reads the folder as well as before a publish.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from vlmdet.publishing import card as cardlib
from vlmdet.publishing.errors import TargetChangedError
from vlmdet.publishing.files import KEEP, Source
from vlmdet.records import CONTENT, Champion, Publication


def publish_folder(dest: Path, files: dict[str, Source], run_id: str, expected: str | None = None) -> Publication:
    """Swap `files` in at `dest` if it still holds revision `expected` (None: missing or empty)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.staging-{run_id}")
    old = dest.with_name(f".{dest.name}.old-{run_id}")
    with _locked(dest):
        recover(dest, old)
        now = folder_revision(dest)
        if now == run_id and now != expected:  # an earlier attempt of this run swapped in, then died
            return _publication(dest, files, run_id, reused=True)
        if now != expected:
            raise TargetChangedError(str(dest), expected, now)
        # Under the lock nobody else is mid-publish: every staging or backup sibling is a crashed
        # attempt's (this run's or another's), and the champion is back in place.
        for leftover in [*dest.parent.glob(f".{dest.name}.staging-*"), *dest.parent.glob(f".{dest.name}.old-*")]:
            if leftover.is_dir():
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
    return _publication(dest, files, run_id)


def _publication(dest: Path, files: dict[str, Source], run_id: str, reused: bool = False) -> Publication:
    return Publication(target=str(dest), kind="local", revision=run_id, url=dest.resolve().as_uri(),
                       files=sorted(files), tag=f"run-{run_id}", run_id=run_id, reused=reused)


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """One writer at a time per target folder (two runs on one machine): an advisory lock on the
    parent folder, which outlives the swap and leaves no lock file behind."""
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def recover(dest: Path, old: Path | None = None) -> bool:
    """Put the published model back if a publication crashed between its two renames; True if it did.

    Then dest is missing and `.NAME.old-RUN` holds the only copy of the champion: without this the
    gate would read "no champion" and the leftover cleanup of the next publish would delete it.
    Prefer this run's own backup (`old`), else the newest one any run left behind.
    """
    dest = Path(dest)
    if dest.exists():
        return False
    if old is not None and old.is_dir():
        backups = [old]
    else:
        backups = sorted((p for p in dest.parent.glob(f".{dest.name}.old-*") if p.is_dir()),
                         key=lambda p: p.stat().st_mtime)
    if not backups:
        return False
    backups[-1].rename(dest)
    return True


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def folder_revision(folder: Path) -> str | None:
    """The published model's stable id: its run id from vlmdet.json, else a hash of its file list
    (names, sizes, times); None when the folder is missing or holds nothing but keepers."""
    folder = Path(folder)
    if not folder.is_dir():
        return None if not folder.exists() else f"not-a-folder:{folder.stat().st_mtime_ns}"
    names = [n for n in _files(folder) if n not in KEEP]
    if not names:
        return None
    run_id = (cardlib.read_meta(folder) or {}).get("run_id")
    if isinstance(run_id, str) and run_id:
        return run_id
    stats = [(n, (folder / n).stat().st_size, (folder / n).stat().st_mtime_ns) for n in names]
    return "files-" + hashlib.sha256(repr(stats).encode()).hexdigest()[:12]


def read_champion_folder(folder: str | Path) -> Champion | None:
    """The champion in a local target folder: None only when the folder is missing or empty (after
    recovering an interrupted swap); otherwise a Champion, marked unreadable when it cannot be judged."""
    folder = Path(folder)
    if folder.parent.is_dir():
        with _locked(folder):  # not in the middle of someone's swap
            recover(folder)
    if folder.exists() and not folder.is_dir():
        return Champion(metrics={}, source=str(folder), fault=CONTENT, unreadable=(
            f"publish.target points at a file, not a folder ({folder}); point it at a folder or move the file"))
    revision = folder_revision(folder)
    if revision is None:
        return None
    card = folder / cardlib.CARD_FILE
    try:
        card_text = card.read_text() if card.is_file() else None
    except (OSError, UnicodeDecodeError) as err:
        card_text = None
        cardlib.log.warning("%s cannot be read (%s)", card, err)
    champion = cardlib.champion_from_card(card_text, cardlib.read_meta(folder), str(folder), files=_files(folder))
    champion.revision = revision
    return champion
