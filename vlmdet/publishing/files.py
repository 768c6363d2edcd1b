"""What one publication holds, as path-in-repo -> source, shared by the local and Hub targets.

Weights, processor and config come from the merged folder the MergedRef names; README.md (the card),
vlmdet.json and the pictures are added. Building the list once keeps both targets byte-identical, and
the Hub target uploads straight from the merged folder without a staging copy of multi-GB weights.

The model files are the bytes the gate judged, or nothing is published: the merge recorded each
file's sha256 (MergedRef), and `check_pinned` recomputes them from exactly what goes out (the staged
copy for a local folder, the hashes the Hub commit will carry) and refuses any difference.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from vlmdet.config.settings import RunConfig
from vlmdet.publishing import card as cardlib
from vlmdet.publishing import digests
from vlmdet.publishing.errors import PermanentPublishError
from vlmdet.run.records import (AdapterRef, DatasetRef, EvalReport, GateDecision, MergedRef, content_sha256,
                            files_sha256, model_files)

Source = Path | bytes

# Files of the target that a publication keeps although it does not bring them: a user's LFS rules.
# Everything else of the previous model is deleted in the same commit (a stale model.safetensors
# next to a sharded index loads first; stale eval/predictions.json would be read as the new
# model's). A target holding nothing but these is empty: there is no champion.
KEEP = frozenset({".gitattributes"})


def make_run_id(merged: MergedRef, report: EvalReport, dataset: DatasetRef, adapter: AdapterRef) -> str:
    """A content id for one publication: the same inputs on a retry give the same id, so a retry can
    find its own commit; a different model (other step, data or metrics) gives another."""
    key = json.dumps([merged.path, merged.base_model, report.metrics(), report.data_fingerprint,
                      dataset.fingerprint, adapter.path, adapter.global_step, merged.sha256], sort_keys=True,
                     default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def plan(merged: MergedRef, report: EvalReport, dataset: DatasetRef, adapter: AdapterRef, decision: GateDecision,
         config: RunConfig, run_id: str, model_name: str, load_name: str | None = None) -> dict[str, Source]:
    """Every file of the publication; raises FileNotFoundError naming the merged folder if it is not one.
    load_name: what the card's code loads the model by where it is published (Target.load_name(): a Hub
    id), None where the target has no such name."""
    root = Path(merged.path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"merged model folder {root} has no config.json; the merge step did not finish "
                                "(merged.path must be a folder written by save_pretrained).")
    # records.model_files: the files the merge hashed (not the card or vlmdet.json, which the publication writes)
    files: dict[str, Source] = dict(model_files(root))
    loss_curve = Path(adapter.loss_curve) if adapter.loss_curve else None
    preview = Path(report.preview) if report.preview else None
    has_loss = bool(loss_curve and loss_curve.is_file())
    has_preview = bool(preview and preview.is_file())
    if has_loss:
        files[cardlib.LOSS_CURVE] = loss_curve  # type: ignore[assignment]
    if has_preview:
        files[cardlib.PREVIEW] = preview  # type: ignore[assignment]
    predictions = Path(report.predictions) if report.predictions else None
    if predictions and predictions.is_file():  # lets the next run's gate compare on the same images unevaluated
        files[cardlib.PREDICTIONS] = predictions  # type: ignore[assignment]
    has_picture = bool(decision.picture and Path(decision.picture).is_file())
    if has_picture:
        files[cardlib.GATE_PICTURE] = Path(decision.picture)  # type: ignore[arg-type]
    meta = cardlib.build_metadata(report=report, dataset=dataset, adapter=adapter, decision=decision, config=config,
                                  run_id=run_id, model_name=model_name)
    # what an operator checks the published weights against (`sha256sum -c`, records.content_sha256)
    meta["merged"] = {"sha256": merged.sha256, "files": merged.files}
    files[cardlib.META_FILE] = (json.dumps(meta, indent=2, default=str) + "\n").encode()
    files[cardlib.CARD_FILE] = cardlib.render_card(meta, decision, license=config.publish.license,
                                                   has_loss_curve=has_loss, has_preview=has_preview,
                                                   has_gate_picture=has_picture, load_name=load_name).encode()
    return files


class MergedChangedError(PermanentPublishError):
    """The merged folder no longer holds the bytes its merge recorded: what was gated is not what would go out."""


def pinned_names(merged: MergedRef, files: dict[str, Source]) -> list[str]:
    """The publication's files that come from the merged folder (the model), by path in the repo."""
    root = Path(merged.path)
    return sorted(rel for rel, src in files.items() if isinstance(src, Path) and src == root / rel)


def check_pinned(merged: MergedRef, digests: dict[str, str], what: str = "publishing") -> None:
    """Raise MergedChangedError unless `digests` (name -> sha256 of the bytes about to be used or sent) are
    the merge's own, byte for byte: same names, same hashes."""
    why = merged.difference(digests)
    if why is None:
        return
    raise MergedChangedError(
        f"not {what}: the merged model in {merged.path} is not the one this run's merge wrote and its gate "
        f"judged: its files hash to sha256 {content_sha256(digests)}, the merge recorded sha256 "
        f"{merged.sha256 or '(none)'} ({why}). Most likely another run on the same workdir wrote there, or the "
        f"folder was edited. Nothing was published. Run again; if nothing else runs on this workdir, delete "
        f"{merged.path} first so that it is merged afresh.")


def hash_ahead(merged: MergedRef) -> threading.Thread:
    """Hash the merged folder's files in a thread (while its evaluation runs on the GPU), so that the
    check_folder after it is a stat of each file; a file written meanwhile is read again and refused there.
    Join the thread before checking. An unreadable file is left for check_folder to report."""
    def run() -> None:
        try:
            digests.file_digests(model_files(merged.path))
        except OSError:
            pass

    thread = threading.Thread(target=run, name="hash merged", daemon=True)
    thread.start()
    return thread


def check_folder(merged: MergedRef, what: str) -> None:
    """check_pinned on the merged folder as it is on disk now (after its evaluation, for one). A file this
    process hashed before and whose stat is unchanged is not read again (digests.py: what that catches)."""
    check_pinned(merged, digests.file_digests(model_files(merged.path)), what)


def check_staged(merged: MergedRef, files: dict[str, Source], staged: Path) -> None:
    """check_pinned on a staged copy of the publication: the bytes that are renamed into place."""
    check_pinned(merged, files_sha256({rel: staged / rel for rel in pinned_names(merged, files)}))
