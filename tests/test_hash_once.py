"""The merged model's files are hashed once a run's process, and a changed file is still refused (issues 29, 26).

digests.file_digest remembers each sha256 with the file's (dev, inode, size, mtime, ctime) and reads a file
again whenever that stat differs. Each test changes a file after check_folder hashed it, in a way a writer
could, and checks that the next check reads the new bytes and refuses them; and that a folder nobody changed
is not read again, neither by check_folder nor by the Hub publication's check.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from vlmdet.publishing import digests
from vlmdet.publishing.files import MergedChangedError, check_folder
from vlmdet.run.records import MergedRef

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
FOLDERS = ("unchanged", "same-size", "same-size-and-mtime", "renamed-over", "hub")


def _write(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "qwen2_vl"}\n')
    for i, name in enumerate(SHARDS):
        (root / name).write_bytes(bytes([i]) * 100_000 + os.urandom(100_000))


@pytest.fixture(scope="module")
def settled(tmp_path_factory) -> dict[str, MergedRef]:
    """One pinned folder a test, written once and left alone for RACY_S, as a merged folder is during its
    evaluation (a file changed less than RACY_S before its hash is never remembered)."""
    root = tmp_path_factory.mktemp("merged")
    for name in FOLDERS:
        _write(root / name)
    time.sleep(digests.RACY_S + 0.2)
    return {name: MergedRef.pinned(root / name, "base", 0.0) for name in FOLDERS}


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The files read and hashed, by name, from a process that has hashed nothing yet."""
    digests.forget()
    seen: list[str] = []
    real = digests.read_sha256

    def counted(path: Path) -> str:
        seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(digests, "read_sha256", counted)
    return seen


def test_a_folder_nobody_changed_is_read_once_a_process(settled, reads):
    merged = settled["unchanged"]
    check_folder(merged, "gating it")
    assert sorted(reads) == sorted(["config.json", *SHARDS])
    check_folder(merged, "publishing")
    assert sorted(reads) == sorted(["config.json", *SHARDS])  # the second check read nothing
    digests.forget()
    check_folder(merged, "publishing")
    assert len(reads) == 6  # a fresh process reads everything again


def _rewrite_same_size(path: Path) -> bytes:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.write(raw)
    return bytes(raw)


def test_a_file_rewritten_in_place_with_the_same_size_is_read_again_and_refused(settled, reads):
    merged = settled["same-size"]
    check_folder(merged, "gating it")
    shard = Path(merged.path) / SHARDS[0]
    raw = _rewrite_same_size(shard)
    with pytest.raises(MergedChangedError, match=f"changed: {SHARDS[0]}"):
        check_folder(merged, "publishing")
    assert reads.count(SHARDS[0]) == 2 and reads.count(SHARDS[1]) == 1
    assert digests.file_digest(shard) == hashlib.sha256(raw).hexdigest()


def test_a_rewrite_that_restores_size_and_mtime_is_caught_by_ctime(settled, reads):
    merged = settled["same-size-and-mtime"]
    check_folder(merged, "gating it")
    shard = Path(merged.path) / SHARDS[1]
    before = shard.stat()
    _rewrite_same_size(shard)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # size and mtime as they were hashed
    after = shard.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    with pytest.raises(MergedChangedError, match=f"changed: {SHARDS[1]}"):
        check_folder(merged, "publishing")
    assert reads.count(SHARDS[1]) == 2


def test_a_file_replaced_by_a_rename_with_the_same_size_and_mtime_is_refused(settled, reads):
    merged = settled["renamed-over"]
    check_folder(merged, "gating it")
    shard = Path(merged.path) / SHARDS[0]
    before = shard.stat()
    other = shard.with_name("other.tmp")
    other.write_bytes(os.urandom(before.st_size))
    os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
    other.replace(shard)
    with pytest.raises(MergedChangedError, match=f"changed: {SHARDS[0]}"):
        check_folder(merged, "publishing")


def test_a_file_hashed_right_after_it_was_written_is_read_again(tmp_path, reads):
    """Its times may not move at a write in the same clock tick: such a digest is never trusted later."""
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"x" * 1000)
    first = digests.file_digest(fresh)
    assert digests.file_digest(fresh) == first == hashlib.sha256(b"x" * 1000).hexdigest()
    assert reads == ["fresh.bin", "fresh.bin"]


def test_the_hub_commit_carries_the_digests_check_folder_read_and_the_hub_verifies_them(settled, reads, tmp_path,
                                                                                          monkeypatch):
    """After check_folder, the publication's check hashes nothing again (huggingface_hub's own hashing
    included), and the test Hub, which recomputes each LFS upload's sha256, accepts every object."""
    import huggingface_hub.lfs

    from hub_server import HubServer
    from pubkit import NO_SLEEP, online_classic_lfs, records
    from vlmdet import publishing
    from vlmdet.config.settings import RunConfig

    online_classic_lfs(monkeypatch)
    client_hashed: list[str] = []
    real_sha = huggingface_hub.lfs.sha_fileobj
    monkeypatch.setattr(huggingface_hub.lfs, "sha_fileobj",
                        lambda f, *a, **k: client_hashed.append(Path(f.name).name) or real_sha(f, *a, **k))
    rec = records(tmp_path, Path(settled["hub"].path))  # pinned as the merge pins: every byte read
    merged = rec[0]
    check_folder(merged, "gating it")
    read_before = len(reads)
    with HubServer(tokens={"hf_t"}) as hub:
        config = RunConfig(name="smoke").override({"publish.target": "hub:acme/once", "publish.endpoint": hub.url})
        pub = publishing.publish(*rec, config, tmp_path, "hf_t", sleep=NO_SLEEP)
        lfs = hub.state.lfs
    model = {"config.json", *SHARDS}  # the card's pictures are new files: read once, here
    assert not set(reads[read_before:]) & model and not set(client_hashed) & model
    assert sorted(reads[read_before:]) == ["loss.png", "preview.png"]
    assert pub.sha256 == merged.sha256
    for name in SHARDS:  # stored under the sha256 of the bytes, which the server recomputed on upload
        assert merged.files[name] in lfs
