"""The small typed records that flow one way through the pipeline.

prepare_data -> DatasetRef -> train -> AdapterRef -> evaluate -> EvalReport -> gate -> GateDecision
-> merge -> MergedRef -> publish -> Publication; the gate reads a Champion (the model at the target).
Each is a dataclass that round-trips through JSON: heavy steps run in a child process that writes its
result record as JSON for the task to read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write through a temporary file and rename: a crash leaves the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str))


class Record:
    """JSON round trip for the records below (plain dataclasses of JSON-able fields)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        return cls.from_dict(json.loads(Path(path).read_text()))  # type: ignore[attr-defined]


@dataclass
class QuarantineEntry(Record):
    """One image or annotation kept out of training, and why."""

    file: str
    reason: str  # a short machine-readable reason: unreadable, truncated, box-outside, zero-area, ...
    detail: str = ""


@dataclass
class DatasetRef(Record):
    """Prepared data: COCO files per split, all with file_name relative to `root`."""

    fingerprint: str
    root: str
    splits: dict[str, str]  # split name -> COCO annotations.json path
    counts: dict[str, dict[str, int]]  # split -> {"images": n, "boxes": m}
    quarantine: list[dict[str, str]] = field(default_factory=list)
    source: str = ""
    category: str = "nutrition-table"
    revision: str | None = None  # the Hub commit a hub: source was loaded at; None for local data

    @property
    def quarantine_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for q in self.quarantine:
            out[q["reason"]] = out.get(q["reason"], 0) + 1
        return out


@dataclass
class AdapterRef(Record):
    """A trained LoRA adapter."""

    path: str
    base_model: str
    family: str
    global_step: int
    losses: list[float] = field(default_factory=list)
    loss_curve: str | None = None  # PNG of the training loss
    resumed_from: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    steps_run: int | None = None  # optimizer steps this call executed (global_step minus the resumed step)
    selected_step: int | None = None  # the checkpoint the adapter was taken from (validation picks it)
    validation: dict[str, Any] = field(default_factory=dict)  # per-checkpoint val loss / mAP and the rule
    provenance: dict[str, Any] = field(default_factory=dict)  # vlmdet.run.provenance.provenance()


@dataclass
class EvalReport(Record):
    """COCO bbox AP of one model on one split, with every prediction kept."""

    map: float
    map50: float
    map75: float
    split: str
    num_images: int
    parse_failures: int
    predictions: str  # COCO results JSON path
    per_image: str | None = None  # JSON with raw answers, boxes and scores per image
    model: str = ""
    data_fingerprint: str = ""
    preview: str | None = None  # PNG grid of predictions on a few images

    def metrics(self) -> dict[str, float]:
        return {"map": self.map, "map50": self.map50, "map75": self.map75}


CONTENT = "content"
TRANSPORT = "transport"


@dataclass
class Champion:
    """What the target holds now, as the gate read it: one home for the champion.

    `unreadable` non-empty means the target holds a model (files beyond the keepers) that could not
    be read or cannot be measured: the gate stays closed unless replacing it is asked for by name
    (gate.replace_unreadable_champion). A target that does not exist or is empty is no Champion at
    all (None), the only case decided by the threshold alone.
    """

    metrics: dict[str, float]  # map / map50 / map75, those the card holds
    data_fingerprint: str = ""  # fingerprint of the data the metrics were measured on ("" = unknown)
    split: str = ""
    source: str = ""  # where it was read: a folder or repo@revision, for the reason text
    run_id: str = ""
    extra: dict = field(default_factory=dict)
    kind: str = ""  # the target's kind (publish.target KIND:...): local, hub, or an installed one; location is its where
    location: str = ""
    # The exact state the gate read and the publication must still find (compare-and-swap): the Hub
    # commit sha (card, vlmdet.json, predictions and weights are all read at it), or for a local
    # folder a hash of its content as it stands (every file's name, size and time, the small files'
    # bytes; vlmdet.publishing.local) ("" = not known: the read failed before a revision was seen).
    revision: str = ""
    config: dict = field(default_factory=dict)  # the champion's run configuration (vlmdet.json), if published
    unreadable: str = ""  # why the model at the target cannot be read or measured, and what to do ("" = readable)
    # Which kind of "unreadable" (set where the fault happened, never guessed later): CONTENT = the target
    # answered and what it holds cannot be judged (gate.replace_unreadable_champion may replace it);
    # anything else (TRANSPORT, or "" with a reason) = it could not be read at all: a server error, a
    # timeout, a refused token or folder permission. Nothing replaces a model nobody could look at.
    fault: str = ""

    def measured_on(self, report: EvalReport) -> bool:
        """True when the card's numbers were measured on the same split of the same prepared data."""
        return bool(report.data_fingerprint) and report.data_fingerprint == self.data_fingerprint \
            and self.split == report.split


@dataclass
class GateDecision(Record):
    passed: bool
    threshold: float
    metric: str
    value: float
    reason: str
    champion: float | None = None
    min_delta: float = 0.0
    champion_data_fingerprint: str | None = None  # data the champion's metric was measured on
    champion_source: str | None = None  # where the champion was read (folder, or repo@revision)
    same_data: bool | None = None  # None: no champion compared; True: both models measured on the same images
    # The paired bootstrap of challenger minus champion on today's test images (None: no champion).
    champion_recorded: float | None = None  # what the champion's card says (maybe measured on other data)
    champion_evaluated: bool = False  # the champion was evaluated again on today's test split in this run
    p_better: float | None = None  # share of resamples where the new model beats the champion by > min_delta
    ci_low: float | None = None  # 95% interval of the difference (new - champion)
    ci_high: float | None = None
    min_probability: float | None = None
    resamples: int = 0
    images: int = 0  # test images both models were scored on
    disagreements: list[dict] = field(default_factory=list)  # images where the two differ most
    picture: str | None = None  # PNG: those images, champion and new model side by side
    # What the publication must still find at the target (compare-and-swap): None = the target was
    # missing or empty; else the Champion.revision the gate read (a Hub commit sha, or a local content hash).
    champion_revision: str | None = None
    champion_unreadable: str | None = None  # why the champion at the target could not be read (None = it could)
    champion_fault: str | None = None  # Champion.fault of an unreadable champion: "content" or "transport"
    replaced_unreadable: bool = False  # passed over an unreadable champion because gate.replace_unreadable_champion


# Files of a merged folder that are not the model: what a publication writes itself (the card and
# vlmdet.json; vlmdet.publishing.card) and tool clutter. Every other file is the model: pinned, published.
NOT_MODEL_FILES = frozenset({"README.md", "vlmdet.json"})
NOT_MODEL_PARTS = frozenset({".cache", "__pycache__", ".git"})


def model_files(folder: str | Path) -> dict[str, Path]:
    """The model's files in a merged folder, by path relative to it (posix), sorted."""
    root = Path(folder)
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and rel.as_posix() not in NOT_MODEL_FILES and not set(rel.parts) & NOT_MODEL_PARTS:
            out[rel.as_posix()] = path
    return out


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def files_sha256(files: dict[str, Path], hash_one: Callable[[Path], str] = file_sha256) -> dict[str, str]:
    """name -> sha256 of the file's bytes (hash_one of its path); files hashed in parallel (hashlib lets go of
    the GIL), so a sharded 16.6 GB model takes about a quarter of one core's time on four cores."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(files), os.cpu_count() or 1))) as pool:
        return dict(zip(files, pool.map(hash_one, files.values())))


def content_sha256(digests: dict[str, str]) -> str:
    """One sha256 over every file's name and bytes: the sha256 of the lines `<sha256 of the bytes>  <name>`
    sorted by name, which is what `sha256sum` prints, so a shell recomputes it from vlmdet.json:
    `jq -r '.merged.files | to_entries[] | "\\(.value)  \\(.key)"' vlmdet.json | sha256sum`."""
    lines = "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass
class MergedRef(Record):
    """A merged model folder, pinned: `files` is the sha256 of each model file (model_files) as the merge
    wrote it and `sha256` one hash over them all (content_sha256). The evaluation of the merged model
    and the publication check them, so what is published is what the gate judged."""

    path: str
    base_model: str
    max_abs_logit_diff: float
    sha256: str = ""  # "": not pinned (a record from before pinning): refused, never trusted
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def pinned(cls, path: str | Path, base_model: str, max_abs_logit_diff: float) -> "MergedRef":
        """The record of a finished merged folder, its files hashed now (once, after the save)."""
        files = files_sha256(model_files(path))
        return cls(path=str(path), base_model=base_model, max_abs_logit_diff=max_abs_logit_diff,
                   sha256=content_sha256(files), files=dict(sorted(files.items())))

    def difference(self, digests: dict[str, str]) -> str | None:
        """None when `digests` (name -> sha256 of the bytes about to be used) are this merge's files, byte for
        byte; else which files differ, are missing or were added."""
        if not self.sha256 or not self.files:
            return "the merge record carries no content hash (written before merges were pinned)"
        if content_sha256(digests) == self.sha256 and digests == self.files:
            return None
        changed = sorted(n for n in digests.keys() & self.files.keys() if digests[n] != self.files[n])
        parts = [f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                 for label, names in (("changed", changed), ("missing", sorted(self.files.keys() - digests.keys())),
                                      ("added", sorted(digests.keys() - self.files.keys()))) if names]
        return "; ".join(parts) or "the file set hashes differently"


@dataclass
class Publication(Record):
    target: str  # a folder or a Hub repo id
    kind: str  # the target's kind: local, hub, or an installed one (vlmdet.publishing.target)
    revision: str | None = None
    url: str | None = None
    files: list[str] = field(default_factory=list)
    tag: str | None = None  # the per-run tag (Hub) or run id (local folder)
    run_id: str = ""
    reused: bool = False  # True when a retry found this run's commit already landed and did not commit again
    sha256: str = ""  # MergedRef.sha256 of the model files published (verified against the merge's record)
