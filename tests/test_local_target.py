"""The `local:DIR` target fails closed all the way down (issue 26): a folder the worker cannot read is
never "no champion", a publisher killed at any instant leaves the old model or the new one whole, the
swap is fsynced before it renames, one of two concurrent publishers wins, and the revision moves with
any edit. Publishers that die are real child processes killed with SIGKILL."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlmdet
from pubkit import records
from vlmdet.config.settings import RunConfig
from vlmdet.decide.gate import decide
from vlmdet.publishing import PermanentPublishError, TargetChangedError
from vlmdet.publishing import local
from vlmdet.publishing.files import plan
from vlmdet.publishing.local import folder_revision, publish_folder, read_champion_folder
from vlmdet.run.records import TRANSPORT

ROOT = Path(vlmdet.__file__).resolve().parents[1]
NOBODY = 65534
MAP50 = {"A": 0.70, "B": 0.90, "C": 0.80}


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Three publications (A, B, C) of small fake models, every file a source file with a fixed past
    modification time (copies keep it), so the folder each one makes has a revision known in advance."""
    root = tmp_path_factory.mktemp("versions")
    out = {}
    for i, name in enumerate(MAP50):
        merged = root / f"merged-{name}"
        merged.mkdir()
        save_file({"w": torch.full((64, 64), float(i)), "b": torch.arange(64.0) + i}, merged / "model.safetensors")
        (merged / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "hidden_size": 64}))
        # the processor files save_pretrained writes beside the weights (a champion without them is not judged)
        (merged / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"vocab": {"a": i}}}))
        (merged / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
        (merged / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
        (merged / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
        rec = records(root / f"run-{name}", merged, map50=MAP50[name])
        files = plan(*rec, RunConfig(name="smoke"), run_id=f"run{name}", model_name="published")
        out[name] = _as_source_files(files, root / f"src-{name}")
    return out


def _as_source_files(files: dict, folder: Path) -> dict[str, Path]:
    out = {}
    for i, (rel, src) in enumerate(sorted(files.items())):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(src if isinstance(src, bytes) else Path(src).read_bytes())
        past = 1_600_000_000_000_000_000 + i * 1_000_000_007
        os.utime(path, ns=(past, past))
        out[rel] = path
    return out


@pytest.fixture(scope="module")
def revisions(versions, tmp_path_factory) -> dict[str, str]:
    """Each version's revision, from publishing it alone to a folder of its own."""
    root = tmp_path_factory.mktemp("reference")
    return {name: publish_folder(root / name / "published", files, run_id=f"run{name}").revision
            for name, files in versions.items()}


def _holds(dest: Path, versions: dict[str, dict[str, Path]]) -> str:
    """Which version `dest` holds whole (every file byte-equal to that version's, nothing else)."""
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    for name, files in versions.items():
        if got == {rel: src.read_bytes() for rel, src in files.items()}:
            return name
    raise AssertionError(f"{dest} holds no version whole: {sorted(got)}")


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


def _child(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# --- a folder the worker cannot read ----------------------------------------------------------------------

def _as_unprivileged(fn, *args):
    """fn(*args) as a user the folder's permissions apply to, its result or ("raised", type, message).

    As root (CI) a forked child drops to nobody: permissions do not apply to root, and the interpreter
    may live where nobody cannot run it (/root/.pyenv), so the child is forked, not started. As any
    other user, this process, against a folder closed to its owner.
    """
    def call():
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - handed back to the test to assert on
            return ("raised", type(err).__name__, str(err))

    if os.geteuid() != 0:
        return call()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with os.fdopen(write, "wb") as out:
                pickle.dump(call(), out)
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as got:
        data = got.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, f"the unprivileged child failed (status {status})"
    return pickle.loads(data)


@pytest.fixture
def shared_dir(tmp_path):
    """A workdir the unprivileged user may write in (the repro: it can rename what it cannot list)."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    root = Path(tempfile.mkdtemp(prefix="vlmdet-local-target-"))  # pytest's tmp root is closed to nobody
    try:
        root.chmod(0o755)
        work = root / "work"
        work.mkdir()
        work.chmod(0o777)
        yield work
    finally:
        shutil.rmtree(root)


def test_a_folder_the_worker_cannot_list_is_unreadable_and_never_replaced(versions, revisions, shared_dir, tmp_path):
    """Fails on a9dd703: the listing skipped the closed folder, the gate read "no champion", and the
    publish moved the champion aside and put the new model in."""
    import vlmdet.formats  # noqa: F401 - imported here, before the unprivileged child needs it

    dest = shared_dir / "published"
    publish_folder(dest, versions["A"], run_id="runA")
    before = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    new_files = {rel: src.read_bytes() for rel, src in versions["B"].items()}  # nothing the child must read
    dest.chmod(0o700 if os.geteuid() == 0 else 0o000)  # root's folder closed to others; else closed to its owner
    try:
        champ = _as_unprivileged(read_champion_folder, dest)
        assert not isinstance(champ, tuple), champ
        assert champ is not None, "a folder that could not be listed read as no champion"
        assert champ.fault == TRANSPORT and not champ.revision and not champ.metrics
        assert str(dest) in champ.unreadable and "Permission denied" in champ.unreadable
        assert "chmod" in champ.unreadable and f"user id {NOBODY if os.geteuid() == 0 else os.geteuid()}" \
            in champ.unreadable
        _, report, *_ = records(tmp_path, tmp_path, map50=0.95)
        for replace in (False, True):
            gate = RunConfig(name="smoke").override({"gate.replace_unreadable_champion": replace}).gate
            decision = decide(report, gate, champ)
            assert not decision.passed and not decision.replaced_unreadable and decision.champion_fault == TRANSPORT
            assert "no champion" not in decision.reason and str(dest) in decision.reason
        # what the old gate let through ("no champion", expected None): refused before anything moves
        got = _as_unprivileged(publish_folder, dest, new_files, "runB", None)
        assert got[:2] == ("raised", PermanentPublishError.__name__), got
        assert f"not publishing to {dest}" in got[2] and "Permission denied" in got[2] and "Nothing was moved" in got[2]
    finally:
        dest.chmod(0o755)
    assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    assert _leftovers(dest) == [] and folder_revision(dest) == revisions["A"]


# --- a publisher killed at each stage -----------------------------------------------------------------------

KILLED_PUBLISHER = r"""
import json, os, shutil, signal, sys
from pathlib import Path
from vlmdet.publishing.local import publish_folder

stage, dest, files, expected = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
real_copy, real_rename, real_fsync, real_rmtree = shutil.copy2, os.rename, os.fsync, shutil.rmtree
copies = []

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def copy2(src, dst, **kw):
    copies.append(dst)
    if stage == "copying" and len(copies) == 3:  # half of the third file written
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[:len(data) // 2])
        die()
    return real_copy(src, dst, **kw)

def fsync(fd):
    if stage == "syncing":
        die()
    return real_fsync(fd)

def rename(src, dst, *a, **kw):
    name = os.path.basename(src)
    if (stage == "moving-aside" and name == dest.name or stage == "between-renames" and ".staging-" in name
            or stage == "backup-out" and ".old-" in name):
        die()
    return real_rename(src, dst, *a, **kw)

def rmtree(path, *a, **kw):
    name = os.path.basename(path)
    if stage == "removing-backup" and (".trash-" in name or ".old-" in name):
        for f in sorted(p for p in Path(path).rglob("*") if p.is_file())[::2]:  # half of the backup deleted
            f.unlink()
        die()
    return real_rmtree(path, *a, **kw)

shutil.copy2, os.fsync, os.rename, shutil.rmtree = copy2, fsync, rename, rmtree
publish_folder(dest, {k: Path(v) for k, v in files.items()}, "runB", expected=expected)
"""

# stage -> the version a new run must find
STAGES = {"copying": "A", "syncing": "A", "moving-aside": "A", "between-renames": "A", "backup-out": "B",
          "removing-backup": "B"}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_publisher_killed_at_any_stage_leaves_one_model_whole(versions, revisions, tmp_path, stage):
    """A new run finds the old model or the new one whole, loadable, judged, at that version's revision,
    and publishes over it. Fails on a9dd703 at "syncing" and "backup-out" (no fsync; the backup is
    deleted under its `.old-*` name, so a half-deleted one could be restored)."""
    dest = tmp_path / "published"
    first = publish_folder(dest, versions["A"], run_id="runA")
    assert first.revision == revisions["A"]
    files = json.dumps({rel: str(src) for rel, src in versions["B"].items()})
    done = _child(KILLED_PUBLISHER, stage, str(dest), files, first.revision)
    assert done.returncode == -signal.SIGKILL, f"the publisher did not reach {stage!r}: {done.stderr[-2000:]}"

    champ = read_champion_folder(dest)  # the next run's gate, which recovers first
    held = STAGES[stage]
    assert _holds(dest, versions) == held
    assert champ is not None and not champ.unreadable and champ.revision == revisions[held]
    assert champ.metrics["map50"] == pytest.approx(MAP50[held]) and champ.run_id == f"run{held}"
    weights = load_file(dest / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in load_file(versions[held]["model.safetensors"]).items())
    for backup in [n for n in _leftovers(dest) if ".old-" in n]:  # a backup is a whole model, or not one at all
        assert _holds(dest.parent / backup, versions) == "A", backup

    nxt = "B" if held == "A" else "C"
    pub = publish_folder(dest, versions[nxt], run_id="runC", expected=champ.revision)
    assert _holds(dest, versions) == nxt and pub.revision == revisions[nxt] == folder_revision(dest)
    assert _leftovers(dest) == []


# --- the order of the swap on disk -------------------------------------------------------------------------

def test_everything_is_on_disk_before_the_renames_and_the_backup_leaves_its_name_before_deletion(
        versions, tmp_path, monkeypatch):
    """Fails on a9dd703: nothing was fsynced, and the backup was deleted under its `.old-*` name."""
    dest = tmp_path / "published"
    first = publish_folder(dest, versions["A"], run_id="runA")
    trace: list[tuple] = []
    real_fsync, real_rename, real_rmtree = os.fsync, os.rename, shutil.rmtree

    def fsync(fd):
        trace.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, *a, **kw):
        trace.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        return real_rename(src, dst, *a, **kw)

    def rmtree(path, *a, **kw):
        trace.append(("rmtree", os.path.realpath(path)))
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    publish_folder(dest, versions["B"], run_id="runB", expected=first.revision)

    parent, real = str(dest.parent.resolve()), lambda name: str((dest.parent / name).resolve())
    staging, old, trash, published = (real(".published.staging-runB"), real(".published.old-runB"),
                                      real(".published.trash-runB"), real("published"))
    renames = [i for i, t in enumerate(trace) if t[0] == "rename"]
    assert [trace[i][1:] for i in renames] == [(published, old), (staging, published), (old, trash)]
    synced_first = {t[1] for t in trace[:renames[0]] if t[0] == "fsync"}
    staged_dirs = {os.path.dirname(os.path.join(staging, rel)) for rel in versions["B"]}
    missing = ({os.path.join(staging, rel) for rel in versions["B"]} | staged_dirs | {parent}) - synced_first
    assert not missing, f"not fsynced before the first rename: {sorted(missing)}"
    # the staging folder after its files, the parent (the staging name) after the staging folder
    last = {p: max(i for i, t in enumerate(trace[:renames[0]]) if t == ("fsync", p)) for p in synced_first}
    assert max(last[os.path.join(staging, rel)] for rel in versions["B"]) < last[staging] < last[parent]
    for i, j in zip(renames, renames[1:] + [len(trace)]):  # the parent is fsynced after each rename
        assert ("fsync", parent) in trace[i + 1:j], f"no fsync of the parent after {trace[i]}"
    (removal,) = [i for i, t in enumerate(trace) if t[0] == "rmtree"]
    assert trace[removal] == ("rmtree", trash) and removal > renames[-1] + 1 and trace[removal - 1] == ("fsync", parent)


# --- two publishers at once ---------------------------------------------------------------------------------

RACING_PUBLISHER = r"""
import json, os, shutil, sys, time
from pathlib import Path
from vlmdet.publishing.errors import TargetChangedError
from vlmdet.publishing.local import publish_folder

dest, files, expected, run, go = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5])
real_copy = shutil.copy2
# a slow disk: the winner holds the lock a while
shutil.copy2 = lambda src, dst, **kw: (time.sleep(0.1), real_copy(src, dst, **kw))[1]
Path(f"{go}.{run}").touch()
while not go.exists():
    time.sleep(0.005)
start = time.time()
try:
    result = {"won": publish_folder(dest, {k: Path(v) for k, v in files.items()}, run, expected=expected).revision}
except TargetChangedError as err:
    result = {"changed": str(err)}
print(json.dumps({**result, "start": start, "end": time.time()}))
"""


def test_two_publishers_at_once_one_wins_the_other_is_refused(versions, revisions, tmp_path):
    """Both gates read A; both publish at the same instant. The lock makes the second see the first's model."""
    dest = tmp_path / "published"
    first = publish_folder(dest, versions["A"], run_id="runA")
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    procs = {name: subprocess.Popen([sys.executable, "-c", RACING_PUBLISHER, str(dest),
                                     json.dumps({r: str(s) for r, s in versions[name].items()}), first.revision,
                                     f"run{name}", str(go)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, cwd=ROOT)
             for name in ("B", "C")}
    deadline = time.time() + 120
    while not all(Path(f"{go}.run{n}").exists() for n in procs) and time.time() < deadline:
        time.sleep(0.02)
    go.touch()
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-2000:]
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    winners = [n for n, r in out.items() if "won" in r]
    assert len(winners) == 1, out
    (winner,), (loser,) = winners, [n for n in out if n not in winners]
    assert max(r["start"] for r in out.values()) < min(r["end"] for r in out.values()), "the two did not overlap"
    assert out[winner]["won"] == revisions[winner]
    assert f"was {first.revision}, now {revisions[winner]}" in out[loser]["changed"]
    assert _holds(dest, versions) == winner and folder_revision(dest) == revisions[winner]
    assert _leftovers(dest) == []


# --- the revision is the content -----------------------------------------------------------------------------

def _edit_keeping_time(path: Path, data: bytes) -> None:
    st = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_any_edit_moves_the_revision_and_the_swap_refuses_an_edited_target(versions, tmp_path, monkeypatch):
    """Fails on a9dd703: the revision was vlmdet.json's run id, so in-place edits kept it."""
    monkeypatch.setattr(local, "SMALL_FILE", 1024)  # the weights count as large: hashed by size and time only
    dest = tmp_path / "published"
    pub = publish_folder(dest, versions["A"], run_id="runA")
    seen = [pub.revision]
    assert folder_revision(dest) == pub.revision == read_champion_folder(dest).revision
    card, weights = dest / "README.md", dest / "model.safetensors"
    assert weights.stat().st_size > local.SMALL_FILE
    _edit_keeping_time(card, card.read_bytes()[:-1] + b"!")  # same size, same time
    seen.append(folder_revision(dest))
    _edit_keeping_time(weights, weights.read_bytes() + b"\0" * 8)  # another size, same time
    seen.append(folder_revision(dest))
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))  # same size, written now
    seen.append(folder_revision(dest))
    assert len(set(seen)) == len(seen), seen
    assert read_champion_folder(dest).revision == seen[-1]

    with pytest.raises(TargetChangedError, match=f"was {pub.revision}, now {seen[-1]}"):
        publish_folder(dest, versions["B"], run_id="runB", expected=pub.revision)
    assert (dest / "model.safetensors").read_bytes() == bytes(data)
    assert publish_folder(dest, versions["B"], run_id="runB", expected=seen[-1]).revision == folder_revision(dest)
    assert _holds(dest, versions) == "B"


def test_an_old_revision_does_not_come_back_and_a_retry_of_a_landed_run_is_reused(versions, tmp_path):
    dest = tmp_path / "published"
    a = publish_folder(dest, versions["A"], run_id="runA")
    b = publish_folder(dest, versions["B"], run_id="runB", expected=a.revision)
    # the same model published again by a later run: its vlmdet.json names that run
    again = dict(versions["A"])
    meta = json.loads(again["vlmdet.json"].read_bytes())
    again["vlmdet.json"] = (json.dumps({**meta, "run_id": "runA2"}, indent=2) + "\n").encode()
    a2 = publish_folder(dest, again, run_id="runA2", expected=b.revision)
    assert len({a.revision, b.revision, a2.revision}) == 3 and a2.revision == folder_revision(dest)
    # runA2 swapped in, then died before it recorded so: its retry, with the revision its gate read,
    # finds its own model (vlmdet.json's run id) and reuses it; another run is refused
    retry = publish_folder(dest, again, run_id="runA2", expected=b.revision)
    assert retry.reused and retry.revision == a2.revision == folder_revision(dest)
    with pytest.raises(TargetChangedError):
        publish_folder(dest, versions["C"], run_id="runC", expected=b.revision)
