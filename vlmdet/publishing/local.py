"""Publishing to a local repo-shaped folder (the `local:DIR` target, LocalTarget), and reading its champion.

The folder is replaced as a whole: the publication is written to a hidden staging sibling and swapped
in with renames, so a reader (or the next run's gate) sees the old model or the new one, never half
of each. Weights are copied, not hard-linked: a later merge writing into the same workdir truncates
its files in place, which would silently corrupt a hard-linked published copy.

The swap is a compare-and-swap: under a lock on the parent folder (flock; one writer per target on
one machine), the folder must still hold the revision the gate read, else the publication stops with
a TargetChangedError. A local revision is the content as it stands: a hash over every file's name,
size and modification time and the bytes of the small files (card, vlmdet.json with its run id,
config), so any edit, in place or not, moves it.

Durability, what a crash or a power loss at any instant leaves:
- every staged file and folder is fsynced before the first rename, and the parent folder after each
  rename, so the published name never points at files whose bytes are not on disk;
- the champion is moved aside to `.NAME.old-RUN`, the new model renamed in, and the backup renamed to
  `.NAME.trash-RUN` before it is deleted: an `.old-*` folder is always a whole model, and the only
  thing `recover` restores (when the published name is missing). The next publish deletes staging
  and trash leftovers, and a leftover backup (the new model is in place) after renaming it to trash.
  `recover` runs under the lock before the gate reads the folder as well as before a publish, so the
  next run finds the old model or the new one, whole.
Not covered: a filesystem that reorders or drops fsynced writes (some network mounts), and two
machines writing one folder over a network filesystem (flock may not reach across them).

Errors are errors: anything in the folder that cannot be listed or read (a permission, an I/O error)
makes the champion unreadable with a transport fault (the gate stays closed whatever the override),
and makes a publish fail before it moves anything. Never "no champion".
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from vlmdet.publishing import card as cardlib
from vlmdet.publishing.errors import PermanentPublishError, TargetChangedError
from vlmdet.publishing.files import KEEP, Source
from vlmdet.publishing.target import Outgoing, Target
from vlmdet.run.records import CONTENT, TRANSPORT, Champion, Publication

# Files up to this size are hashed by content into the revision (the card, vlmdet.json, config.json,
# processor files, predictions); larger ones (weights) by size and modification time only.
SMALL_FILE = 1 << 20
_READ_WHOLE = {cardlib.CARD_FILE, cardlib.META_FILE, "config.json"}  # read whatever their size


def publish_folder(dest: Path, files: dict[str, Source], run_id: str, expected: str | None = None,
                   check: Callable[[Path], None] | None = None) -> Publication:
    """Swap `files` in at `dest` if it still holds revision `expected` (None: missing or empty).

    check(staging): called on the staged copy before anything moves (files.check_staged: the bytes renamed
    into place are the ones the gate judged); raising stops the publication and removes the copy.

    A target that cannot be listed, locked or read raises PermanentPublishError before anything moves.
    """
    dest = Path(dest)
    staging = dest.with_name(f".{dest.name}.staging-{run_id}")
    old = dest.with_name(f".{dest.name}.old-{run_id}")
    trash = dest.with_name(f".{dest.name}.trash-{run_id}")
    with contextlib.ExitStack() as stack:
        try:
            if not dest.parent.is_dir():
                dest.parent.mkdir(parents=True)
                _sync_dir(dest.parent.parent)
            stack.enter_context(_locked(dest))
            recover(dest, old)
            now = _scan(dest)
        except OSError as err:
            raise PermanentPublishError(f"not publishing to {dest}: {_why(dest, err)} Nothing was moved.") from err
        if now.revision != expected and now.revision is not None and now.run_id == run_id:
            return _publication(dest, files, run_id, now.revision, reused=True)  # this run swapped in, then died
        if now.revision != expected:
            raise TargetChangedError(str(dest), expected, now.revision)
        # Under the lock nobody else is mid-publish: every staging, backup or trash sibling is a crashed
        # attempt's (this run's or another's), and the champion is back in place.
        leftovers = [(p, *p.name[len(dest.name) + 2:].partition("-")[::2])  # (path, kind, run)
                     for p in dest.parent.glob(f".{dest.name}.*-*")]
        for path, kind, _ in leftovers:
            if kind in ("staging", "trash"):
                _remove(path)
        for path, kind, run in leftovers:
            if kind == "old":  # out of the `.old-*` name first: only whole copies ever carry it
                path = path.rename(dest.with_name(f".{dest.name}.trash-{run}"))
                _sync_dir(dest.parent)
                _remove(path)
        staging.mkdir()
        for rel, src in files.items():
            out = staging / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, bytes):
                out.write_bytes(src)
            else:
                shutil.copy2(src, out)
        if check is not None:
            try:
                check(staging)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        _sync_tree(staging)
        _sync_dir(dest.parent)  # the staging folder's own name
        revision = _scan(staging).revision  # what dest holds after the rename (names relative, times kept)
        if dest.exists() or dest.is_symlink():
            dest.rename(old)
            _sync_dir(dest.parent)
        staging.rename(dest)
        _sync_dir(dest.parent)
        if old.exists() or old.is_symlink():
            old.rename(trash)
            _sync_dir(dest.parent)  # the backup is gone from `.old-*` on disk before any of it is deleted
            _remove(trash)
    return _publication(dest, files, run_id, revision)


def _publication(dest: Path, files: dict[str, Source], run_id: str, revision: str | None,
                 reused: bool = False) -> Publication:
    return Publication(target=str(dest), kind="local", revision=revision or "", url=dest.resolve().as_uri(),
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

    Then dest is missing and `.NAME.old-RUN` holds the only copy of the champion, whole (a backup is
    renamed out of that name before it is deleted): without this the gate would read "no champion"
    and the leftover cleanup of the next publish would delete it. Prefer this run's own backup
    (`old`), else the newest one any run left behind. Raises OSError if the folder cannot be read.
    """
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        return False
    if old is not None and old.is_dir():
        backups = [old]
    else:
        backups = sorted((p for p in dest.parent.glob(f".{dest.name}.old-*") if p.is_dir()),
                         key=lambda p: p.stat().st_mtime)
    if not backups:
        return False
    backups[-1].rename(dest)
    _sync_dir(dest.parent)
    return True


@dataclass
class _Scan:
    """One read of a folder: its files, the bytes of its small ones, and the revision they make."""

    files: list[str]  # relative names, sorted
    small: dict[str, bytes]
    revision: str | None  # None: missing, or nothing but keepers

    @property
    def run_id(self) -> str:
        meta = _meta(self.small.get(cardlib.META_FILE))
        return meta.get("run_id", "") if meta else ""


def _raise(err: OSError) -> None:
    raise err


def _scan(folder: Path) -> _Scan:
    """List and read `folder`, raising OSError (naming the path) on anything that cannot be read:
    a folder this user may not list is never an empty one."""
    folder = Path(folder)
    if not folder.exists():
        return _Scan([], {}, None)
    if not folder.is_dir():
        return _Scan([], {}, f"not-a-folder:{folder.stat().st_mtime_ns}")
    names: list[str] = []
    for root, dirs, filenames in os.walk(folder, onerror=_raise):
        names += [Path(root, f).relative_to(folder).as_posix() for f in filenames]
    names.sort()
    digest, small = hashlib.sha256(), {}
    for name in names:
        # O_NONBLOCK: a fifo left in the folder must not hang the gate; opening proves it readable
        fd = os.open(folder / name, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fd)
            digest.update(f"{name}\0{st.st_mode:o}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            if stat.S_ISREG(st.st_mode) and (st.st_size <= SMALL_FILE or name in _READ_WHOLE):
                small[name] = fh.read()
                digest.update(hashlib.sha256(small[name]).digest())
    if not [n for n in names if n not in KEEP]:
        return _Scan(names, small, None)
    return _Scan(names, small, "content-" + digest.hexdigest()[:16])


def _meta(data: bytes | None) -> dict | None:
    """vlmdet.json's object, or None where it is missing or not a JSON object (the champion then says why)."""
    if data is None:
        return None
    try:
        meta = json.loads(data)
    except ValueError as err:
        cardlib.log.warning("%s cannot be parsed (%s); ignored", cardlib.META_FILE, err)
        return None
    return meta if isinstance(meta, dict) else None


def folder_revision(folder: Path) -> str | None:
    """The folder's content id: a hash of every file's name, size and modification time and the bytes of
    the small ones; None when the folder is missing or holds nothing but keepers. Raises OSError on
    anything that cannot be listed or read."""
    return _scan(Path(folder)).revision


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """fsync every file, then every folder bottom-up, `root` last: its bytes and names are on disk."""
    for folder, _, filenames in os.walk(root, topdown=False, onerror=_raise):
        for name in filenames:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_dir(Path(folder))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _why(folder: Path, err: OSError) -> str:
    """What could not be read, as an operator can check it: the path, the error, who asked, the fix."""
    path = Path(err.filename) if err.filename else folder
    who = f"user id {os.geteuid()}"
    try:
        st = os.stat(path)
        who += f"; {path.name} is {stat.filemode(st.st_mode)}, owner id {st.st_uid}"
    except OSError:
        pass
    what = f"{path} cannot be read ({err.strerror or err}; {who})."
    if isinstance(err, PermissionError):
        return (f"{what} Every folder of the target must be readable and searchable (r-x) and every file readable "
                f"by the user running the flow: fix the permissions (e.g. chmod -R u+rwX,go+rX {folder}, or chown "
                "it to that user) or run the flow as the owner, then run again.")
    return f"{what} Check the disk or mount holding {folder}, then run again."


def read_champion_folder(folder: str | Path) -> Champion | None:
    """The champion in a local target folder: None only when the folder is missing or empty (after
    recovering an interrupted swap); otherwise a Champion, marked unreadable when it cannot be read
    (fault TRANSPORT: a permission or I/O error, never replaced) or judged (fault CONTENT)."""
    folder = Path(folder)
    where = dict(source=str(folder), kind=LocalTarget.kind, location=str(folder))
    try:
        if not folder.parent.is_dir():
            return None
        with _locked(folder):  # not in the middle of someone's swap; the revision and content are one read
            recover(folder)
            scan = _scan(folder)
    except OSError as err:
        return Champion(metrics={}, **where, fault=TRANSPORT,
                        unreadable=f"the target folder could not be read: {_why(folder, err)}")
    if scan.revision is None:
        return None
    if scan.revision.startswith("not-a-folder:"):
        return Champion(metrics={}, **where, fault=CONTENT, unreadable=(
            f"publish.target points at a file, not a folder ({folder}); point it at a folder or move the file"))
    card_text = None
    if cardlib.CARD_FILE in scan.small:
        try:
            card_text = scan.small[cardlib.CARD_FILE].decode()
        except UnicodeDecodeError as err:
            cardlib.log.warning("%s cannot be read (%s)", folder / cardlib.CARD_FILE, err)
    champion = cardlib.champion_from_card(card_text, _meta(scan.small.get(cardlib.META_FILE)), str(folder),
                                          files=scan.files)
    champion.kind, champion.location, champion.revision = LocalTarget.kind, str(folder), scan.revision
    return champion


class LocalTarget(Target):
    """`local:DIR`: a repo-shaped folder, relative to the run's workdir unless absolute, swapped whole."""

    kind = "local"
    form = "local:DIR (a folder, relative to the workdir)"

    def location(self, workdir: str | Path = ".") -> str:
        path = Path(self.rest).expanduser()
        return str(path if path.is_absolute() else Path(workdir) / path)

    def read_champion(self, workdir, token=None, *, sleep=None, retry_policy=None) -> Champion | None:
        return read_champion_folder(self.location(workdir))  # recovers an interrupted swap first

    def fetch(self, champion, workdir, token=None, predictions_only=False, *, sleep=None,
              retry_policy=None) -> str | None:
        folder = Path(self.location(workdir))  # read in place: the gate compares with what is there
        if predictions_only:
            path = folder / cardlib.PREDICTIONS
            return str(path) if path.is_file() else None
        return str(folder)

    def publish(self, out: Outgoing, workdir, token=None, *, sleep=None, retry_policy=None) -> Publication:
        # the bytes renamed into place are checked on the staged copy, after the last copy was made
        return publish_folder(Path(self.location(workdir)), out.files, out.run_id, expected=out.expected,
                              check=out.check_copy)
