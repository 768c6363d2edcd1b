"""A publish target kind added from outside vlmdet: one module in a temporary package, registered through the
`vlmdet.targets` entry point, read, gated against, fetched from and published to with compare-and-swap and the
pinned bytes checked, without a file of vlmdet touched; and an unknown kind fails when the run resolves it."""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from data_fixtures import boxed_predictions, boxed_split, install_package
from pubkit import records
from vlmdet import publishing
from vlmdet.config.settings import ConfigError, RunConfig
from vlmdet.decide.champion import reuse_report
from vlmdet.decide.gate import compare, decide
from vlmdet.modeling.tiny import build_tiny_model
from vlmdet.publishing import TargetChangedError
from vlmdet.publishing.files import MergedChangedError
from vlmdet.run.records import MergedRef

SHELF = '''
"""`shelf:DIR`: every publication kept as a numbered folder (v1, v2, ...) and HEAD naming the one in force."""
import fcntl
import json
import os
import shutil
from pathlib import Path

from vlmdet.publishing.card import CARD_FILE, META_FILE, PREDICTIONS, champion_from_card
from vlmdet.publishing.errors import TargetChangedError
from vlmdet.publishing.target import Target
from vlmdet.run.records import Publication


class ShelfTarget(Target):
    kind = "shelf"
    form = "shelf:DIR (a folder of numbered publications)"

    def location(self, workdir="."):
        path = Path(self.rest).expanduser()
        return str(path if path.is_absolute() else Path(workdir) / path)

    @staticmethod
    def _head(root):
        return (root / "HEAD").read_text().strip() if (root / "HEAD").is_file() else None

    def read_champion(self, workdir, token=None, **_):
        root = Path(self.location(workdir))
        head = self._head(root)
        if head is None:
            return None
        folder = root / head
        card, meta = folder / CARD_FILE, folder / META_FILE
        champion = champion_from_card(card.read_text() if card.is_file() else None,
                                      json.loads(meta.read_text()) if meta.is_file() else None, f"shelf:{root}@{head}",
                                      files=sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                                                   if p.is_file()))
        champion.kind, champion.location, champion.revision = self.kind, str(root), head
        return champion

    def fetch(self, champion, workdir, token=None, predictions_only=False, **_):
        folder = Path(self.location(workdir)) / champion.revision
        if predictions_only:
            return str(folder / PREDICTIONS) if (folder / PREDICTIONS).is_file() else None
        return str(folder)

    def publish(self, out, workdir, token=None, **_):
        root = Path(self.location(workdir))
        root.mkdir(parents=True, exist_ok=True)
        lock = os.open(root, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            head = self._head(root)
            if head != out.expected:
                raise TargetChangedError(f"shelf:{root}", out.expected, head)
            revision = f"v{int((head or 'v0')[1:]) + 1}"
            staging = root / f".staging-{out.run_id}"
            shutil.rmtree(staging, ignore_errors=True)
            for rel, src in out.files.items():
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                if isinstance(src, bytes):
                    (staging / rel).write_bytes(src)
                else:
                    shutil.copyfile(src, staging / rel)
            try:
                out.check_copy(staging)
            except BaseException:
                shutil.rmtree(staging)
                raise
            staging.rename(root / revision)
            (root / "HEAD.new").write_text(revision)
            os.replace(root / "HEAD.new", root / "HEAD")
        finally:
            os.close(lock)
        return Publication(target=str(root), kind=self.kind, revision=revision, url=(root / revision).as_uri(),
                           files=sorted(out.files), tag=revision, run_id=out.run_id)
'''


@pytest.fixture
def shelf_package(tmp_path, monkeypatch):
    """shelfkit/ and its dist-info declaring the entry point, on sys.path: installed as a user would."""
    root = install_package(tmp_path / "site", "shelfkit", {"target.py": textwrap.dedent(SHELF)},
                           "[vlmdet.targets]\nshelf = shelfkit.target:ShelfTarget\n")
    monkeypatch.syspath_prepend(str(root))
    return root


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("merged") / "model", size="micro")


def _cfg(target: str) -> RunConfig:
    return RunConfig(name="smoke").override({"publish.target": target})


def _run(tmp_path: Path, merged: Path, map50: float, hits: set[int]):
    """One run's records (a distinct map50, a distinct run id) with its test predictions written."""
    rec = records(tmp_path / f"run-{map50}", merged, map50=map50)
    Path(rec[1].predictions).write_text(boxed_predictions(hits))
    return rec


def test_an_unknown_kind_fails_when_the_run_resolves_it_naming_the_field_and_the_kinds(tmp_path, shelf_package):
    config = _cfg("s3:bucket/models")  # the configuration checks the shape only: it builds
    with pytest.raises(ConfigError) as err:
        publishing.resolve_target(config)
    message = str(err.value)
    assert "publish.target='s3:bucket/models'" in message
    for form in ("local:DIR (a folder, relative to the workdir)", "hub:ORG/NAME (a Hub model repo)",
                 "shelf:DIR (a folder of numbered publications)"):  # the installed package's kind is listed too
        assert form in message
    with pytest.raises(ConfigError, match=r"publish.target='bucket/models' is not a target spec; use KIND:REST"):
        _cfg("bucket/models")


def test_a_kind_is_unknown_until_its_package_is_installed():
    with pytest.raises(ConfigError, match=r"publish.target='shelf:models'.*local:DIR.*hub:ORG/NAME"):
        publishing.resolve_target(_cfg("shelf:models"))


def test_the_gate_and_publish_run_against_a_kind_from_another_package(tmp_path, shelf_package, merged_dir):
    config = _cfg("shelf:models")
    target = publishing.resolve_target(config)
    assert type(target).__module__ == "shelfkit.target" and target.location(tmp_path) == str(tmp_path / "models")
    gt = boxed_split(tmp_path)

    # an empty target: no champion, the threshold alone decides, the first publication lands as v1
    assert publishing.read_champion(config, tmp_path, target=target) is None
    merged, report, dataset, adapter, _ = _run(tmp_path, merged_dir, 0.70, hits={1, 2, 3})
    first = decide(report, config.gate, None)
    assert first.passed and first.champion_revision is None
    pub = publishing.publish(merged, report, dataset, adapter, first, config, tmp_path, target=target)
    assert (pub.kind, pub.revision, pub.target) == ("shelf", "v1", str(tmp_path / "models"))
    shelf = tmp_path / "models" / "v1"
    assert (shelf / "model.safetensors").read_bytes() == (merged_dir / "model.safetensors").read_bytes()
    card = (shelf / "README.md").read_text()
    assert "vlmdet serve --model FOLDER" in card and 'repo = "path/to/models"' in card  # a folder names no repo

    # the next run: the champion read back through the registry (no target passed), measured on the same
    # images from its published predictions, and beaten
    champion = publishing.read_champion(config, tmp_path)
    assert champion is not None and not champion.unreadable, champion
    assert (champion.revision, champion.metrics["map50"], champion.kind) == ("v1", 0.70, "shelf")
    merged2, report2, dataset2, adapter2, _ = _run(tmp_path, merged_dir, 0.95, hits={1, 2, 3, 4, 5, 6})
    assert champion.measured_on(report2)
    predictions = publishing.fetch_champion(champion, config, tmp_path, predictions_only=True, target=target)
    assert Path(predictions).read_text() == boxed_predictions({1, 2, 3})
    model = publishing.fetch_champion(champion, config, tmp_path, target=target)
    assert (Path(model) / "model.safetensors").read_bytes() == (merged_dir / "model.safetensors").read_bytes()
    comparison, _, _ = compare(report2, reuse_report(champion, report2, predictions), gt, config.gate,
                               champion_evaluated=False)
    second = decide(report2, config.gate, champion, comparison)
    assert second.passed and second.champion_revision == "v1" and comparison.champion < comparison.challenger

    # another run publishes over v1 in between: the publication the gate decided against v1 is refused whole
    merged3, report3, dataset3, adapter3, _ = _run(tmp_path, merged_dir, 0.80, hits={1, 2, 3, 4})
    between = publishing.publish(merged3, report3, dataset3, adapter3, second, config, tmp_path, target=target)
    assert between.revision == "v2"
    with pytest.raises(TargetChangedError, match="was v1, now v2"):
        publishing.publish(merged2, report2, dataset2, adapter2, second, config, tmp_path, target=target)
    assert (tmp_path / "models" / "HEAD").read_text() == "v2" and not (tmp_path / "models" / "v3").exists()
    assert publishing.read_champion(config, tmp_path, target=target).run_id == between.run_id


def test_bytes_other_than_the_merge_pinned_are_not_published_to_a_kind_from_another_package(tmp_path, shelf_package,
                                                                                           merged_dir):
    config = _cfg("shelf:models")
    copy = shutil.copytree(merged_dir, tmp_path / "merged")
    merged, report, dataset, adapter, _ = _run(tmp_path, copy, 0.70, hits={1, 2, 3})
    assert merged.sha256 == MergedRef.pinned(merged_dir, "tiny:qwen2_vl", 0.0).sha256
    with (copy / "model.safetensors").open("r+b") as fh:  # another run writes into the merged folder
        fh.seek(-1, 2)
        fh.write(b"\x00" if fh.read(1) != b"\x00" else b"\x01")
    with pytest.raises(MergedChangedError, match="model.safetensors"):
        publishing.publish(merged, report, dataset, adapter, decide(report, config.gate, None), config, tmp_path)
    assert publishing.read_champion(config, tmp_path) is None
    assert [p.name for p in (tmp_path / "models").iterdir()] == []  # nothing staged is left behind
