"""Where each step of a run writes in the run folder, and the key that says what produced it.

    WORKDIR/config.json                  the configuration the run used (profile resolved)
    WORKDIR/data/<data_key>/{raw,prepared}
    WORKDIR/train/<training_key>[-<run>]  a forced run trains from the base in a folder of its own
    WORKDIR/eval/<name>                  adapter, base, champion, merged
    WORKDIR/merged/<id>, <id>.json       one folder per merged adapter (<id>: its merge key), and its
                                         record (MergedRef: the files' hashes) once it is complete; a
                                         7B merge is 16.6 GB: a merge removes those no running run holds
    WORKDIR/steps/merge                  the merge child's request and result: one merge at a time
    WORKDIR/gate/<name>                  decision.md and the disagreement picture
    WORKDIR/summary.json, last_success.json, .prefect-results

Each heavy step's key covers its output folder and every input (vlmdet.run.keys); a marker file beside
the output records which key produced it, so a cache (Prefect's) is trusted only while the folder
still holds that output: Prefect keeps the result record, not the files it points to.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from vlmdet.config.settings import RunConfig
from vlmdet.run.keys import EVAL_EXECUTION_ONLY, data_key, marker_matches, path_stamp, step_key, training_key
from vlmdet.run.records import AdapterRef, DatasetRef, MergedRef

log = logging.getLogger(__name__)
_MERGE_ID = re.compile(r"[0-9a-f]{16}")  # merged/<id>: the hash part of a merge key (keys.step_key)


@dataclass(frozen=True)
class RunLayout:
    root: Path
    run_id: str = "manual"  # names the training folder of a forced run (the flow run's id under Prefect)

    @classmethod
    def at(cls, workdir: str | Path, run_id: str | None = None) -> "RunLayout":
        return cls(Path(workdir).resolve(), (run_id or "manual").replace("-", "")[:8])

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def config_file(self) -> Path:
        return self.path("config.json")

    @property
    def summary_file(self) -> Path:
        return self.path("summary.json")

    @property
    def last_success_file(self) -> Path:
        return self.path("last_success.json")

    @property
    def results(self) -> Path:
        """Prefect's persisted task results beside the files they describe: they live and go with the
        work folder (a volume that outlives a Docker or Kubernetes worker), not the worker's home."""
        return self.path(".prefect-results")

    # --- prepare ---
    def data_dir(self, config: RunConfig) -> Path:
        """Each data configuration has its own folder: runs on different data never read each other's files."""
        return self.path("data", data_key(config))

    def prepared_exists(self, config: RunConfig) -> bool:
        return (self.data_dir(config) / "prepared" / "report.json").is_file()

    def prepare_key(self, config: RunConfig, stamp: str) -> str:
        blob = json.dumps({"dir": str(self.data_dir(config)), "source": stamp})
        return "prepare-" + hashlib.sha256(blob.encode()).hexdigest()[:24]

    # --- train ---
    def train_dir(self, dataset: DatasetRef, config: RunConfig, fresh: bool = False) -> Path:
        if config.train.profile == "auto":
            # the folder is named by what the profile sets (quantization, batch split): resolve it first,
            # once, where the run starts (vlmdet.pipeline.run.resolve), so every step sees the same choice
            raise ValueError("train.profile=auto reached the run layout unresolved; resolve the configuration "
                             "with vlmdet.pipeline.run.resolve (or training.profiles.resolve) first")
        key = training_key(config, dataset.fingerprint)
        return self.path("train", key + (f"-{self.run_id}" if fresh else ""))

    def train_key(self, dataset: DatasetRef, config: RunConfig, fresh: bool = False) -> str:
        return step_key("train", self.train_dir(dataset, config, fresh))

    def train_done(self, dataset: DatasetRef, config: RunConfig, fresh: bool = False) -> bool:
        out = self.train_dir(dataset, config, fresh)
        return (out / "adapter" / "adapter_config.json").is_file() and marker_matches(out, step_key("train", out))

    # --- evaluate ---
    def eval_dir(self, name: str) -> Path:
        return self.path("eval", name)

    def eval_key(self, model: str, dataset: DatasetRef, config: RunConfig, name: str) -> str:
        cfg = config.to_dict()
        return step_key("evaluate", self.eval_dir(name), model=path_stamp(model), data=dataset.fingerprint,
                        eval={k: v for k, v in cfg["eval"].items() if k not in EVAL_EXECUTION_ONLY},
                        model_settings=cfg["model"], category=cfg["data"]["category"])

    def eval_done(self, model: str, dataset: DatasetRef, config: RunConfig, name: str) -> bool:
        """True while eval/NAME holds the evaluation this key produced (not another model's)."""
        out = self.eval_dir(name)
        return (out / "predictions.json").is_file() and marker_matches(out, self.eval_key(model, dataset, config, name))

    # --- merge ---
    @property
    def merged_dir(self) -> Path:
        return self.path("merged")

    @property
    def merge_step_dir(self) -> Path:
        return self.path("steps", "merge")

    def merge_key(self, adapter: AdapterRef, dataset: DatasetRef, config: RunConfig) -> str:
        return step_key("merge", self.merged_dir, adapter=path_stamp(adapter.path), data=dataset.fingerprint,
                        model_settings=config.to_dict()["model"], split=config.eval.split)

    def merge_dir(self, adapter: AdapterRef, dataset: DatasetRef, config: RunConfig) -> Path:
        """merged/<id>, named by the merge key: another run's merge (another adapter) writes a folder of its
        own, never over the one a run gated and is about to publish; the same adapter merged again is the
        same folder, found and reused (merge_done), never rewritten once complete."""
        return self.merged_dir / self.merge_key(adapter, dataset, config).rsplit("-", 1)[1]

    @staticmethod
    def merge_record(folder: Path) -> Path:
        """merged/<id>.json: the MergedRef (files' hashes) of a complete merge, written after its folder."""
        return folder.with_name(folder.name + ".json")

    def merge_done(self, adapter: AdapterRef, dataset: DatasetRef, config: RunConfig) -> bool:
        """True while merged/<id> holds this adapter's merge, complete (its record written)."""
        out = self.merge_dir(adapter, dataset, config)
        return (out / "config.json").is_file() and self.merge_record(out).is_file()

    def merged_record(self, folder: Path) -> MergedRef:
        return MergedRef.load(self.merge_record(folder))

    @contextlib.contextmanager
    def holding(self, folder: Path) -> Iterator[None]:
        """Keep merged/<id> (and its record) from being removed while this run needs it: a shared flock on
        merged/<id>.lock, from before the merge until the publish returns (vlmdet.pipeline.run). The kernel
        drops it when the process ends, so a crashed run holds nothing."""
        lock = folder.with_name(folder.name + ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # a removal unlinked this lock file while we waited on it: take the new one
        try:
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def merging(self, folder: Path) -> Iterator[None]:
        """Hold `folder` and the workdir's one merge slot (an exclusive flock on steps/merge: the child's
        request and result live there, and two 7B merges at once would not fit one host's memory), and
        first remove every other merge that no running run holds."""
        self.merge_step_dir.mkdir(parents=True, exist_ok=True)
        with self.holding(folder):
            fd = os.open(self.merge_step_dir, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self.remove_unheld_merges(keep=folder)
                yield
            finally:
                os.close(fd)

    def remove_unheld_merges(self, keep: Path) -> list[str]:
        """Remove every merge in merged/ but `keep` that no running run needs; the names removed.

        "Needed" is asked of the kernel, not guessed from times: a run holds a shared flock on
        merged/<id>.lock from before its merge until its publish returns (holding); an exclusive flock
        taken without waiting proves nobody does. Files of the one-folder layout (merged/config.json,
        model*.safetensors, ...) belong to no run of this layout and go too."""
        root, removed = self.merged_dir, []
        if not root.is_dir():
            return removed
        ids = set()
        for entry in sorted(root.iterdir()):
            name = entry.name.split(".", 1)[0]
            if name == keep.name:
                continue
            if _MERGE_ID.fullmatch(name):
                ids.add(name)
            else:
                _remove(entry)
                removed.append(entry.name)
        for name in sorted(ids):
            lock = root / f"{name}.lock"
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a running run holds it
                # the record first: a removal cut short never leaves a folder that reads as a finished merge
                for path in (root / f"{name}.json", root / name, root / f"{name}.partial"):
                    _remove(path)
                lock.unlink(missing_ok=True)  # still locked: a run waiting on it sees it gone and takes a new one
                removed.append(name)
            finally:
                os.close(fd)
        if removed:
            log.info("removed merges no running run holds from %s: %s", root, ", ".join(removed))
        return removed

    # --- gate ---
    def gate_dir(self, name: str) -> Path:
        return self.path("gate", name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
