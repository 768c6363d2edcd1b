"""What one publication holds, as path-in-repo -> source, shared by the local and Hub targets.

Weights, processor and config come from the merged folder; README.md (the card), vlmdet.json and the
pictures are added. Building the list once keeps both targets byte-identical, and the Hub target
uploads straight from the merged folder without a staging copy of multi-GB weights.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vlmdet.config import RunConfig
from vlmdet.publishing import card as cardlib
from vlmdet.records import AdapterRef, DatasetRef, EvalReport, GateDecision, MergedRef

Source = Path | bytes

# Files of the target that a publication keeps although it does not bring them: a user's LFS rules.
# Everything else of the previous model is deleted in the same commit (a stale model.safetensors
# next to a sharded index loads first; stale eval/predictions.json would be read as the new
# model's). A target holding nothing but these is empty: there is no champion.
KEEP = frozenset({".gitattributes"})

# Files of the merged folder that the publication writes itself, and clutter never worth uploading.
_OWN = {cardlib.CARD_FILE, cardlib.META_FILE}
_SKIP_PARTS = {".cache", "__pycache__", ".git"}


def make_run_id(merged: MergedRef, report: EvalReport, dataset: DatasetRef, adapter: AdapterRef) -> str:
    """A content id for one publication: the same inputs on a retry give the same id, so a retry can
    find its own commit; a different model (other step, data or metrics) gives another."""
    key = json.dumps([merged.path, merged.base_model, report.metrics(), report.data_fingerprint,
                      dataset.fingerprint, adapter.path, adapter.global_step], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def plan(merged: MergedRef, report: EvalReport, dataset: DatasetRef, adapter: AdapterRef, decision: GateDecision,
         config: RunConfig, run_id: str, model_name: str) -> dict[str, Source]:
    """Every file of the publication; raises FileNotFoundError naming the merged folder if it is not one."""
    root = Path(merged.path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"merged model folder {root} has no config.json; the merge step did not finish "
                                "(merged.path must be a folder written by save_pretrained).")
    files: dict[str, Source] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and rel.as_posix() not in _OWN and not (set(rel.parts) & _SKIP_PARTS):
            files[rel.as_posix()] = path
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
    files[cardlib.META_FILE] = (json.dumps(meta, indent=2, default=str) + "\n").encode()
    files[cardlib.CARD_FILE] = cardlib.render_card(meta, decision, license=config.publish.license,
                                                   has_loss_curve=has_loss, has_preview=has_preview,
                                                   has_gate_picture=has_picture).encode()
    return files
