"""Records, a tiny merged model and the online Hub client setup for the publishing tests (not a test module)."""
from __future__ import annotations

import time
import types
from pathlib import Path

from PIL import Image

from vlmdet.run.records import AdapterRef, DatasetRef, EvalReport, GateDecision, MergedRef


def png(path: Path, color: tuple[int, int, int]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), color).save(path)
    return str(path)


def records(tmp: Path, merged_path: Path, map50: float = 0.8, fp: str = "fp-test", pictures: bool = True,
            champion_revision: str | None = None):
    """champion_revision: what the gate saw at the target (None: empty), the publication's compare-and-swap."""
    merged = MergedRef.pinned(merged_path, "tiny:qwen2_vl", 0.0)  # as the merge records it: its files' hashes
    report = EvalReport(map=map50 * 0.6, map50=map50, map75=map50 * 0.5, split="test", num_images=12,
                        parse_failures=1, predictions=str(tmp / "pred.json"), data_fingerprint=fp,
                        preview=png(tmp / "preview.png", (200, 10, 10)) if pictures else None)
    dataset = DatasetRef(fingerprint=fp, root=str(tmp), splits={"test": str(tmp / "test.json")},
                         counts={"test": {"images": 12, "boxes": 14}}, source="hub:openfoodfacts/nutrition-table-detection")
    adapter = AdapterRef(path=str(tmp / "adapter"), base_model="tiny:qwen2_vl", family="qwen2_vl", global_step=7,
                         losses=[2.0, 1.5, 1.2], loss_curve=png(tmp / "loss.png", (10, 200, 10)) if pictures else None)
    decision = GateDecision(passed=True, threshold=0.5, metric="map50", value=map50, reason="map50 above threshold",
                            champion_revision=champion_revision)
    return merged, report, dataset, adapter, decision


NO_SLEEP = lambda s: None  # noqa: E731 - our own backoff, made instant for tests


def online_classic_lfs(monkeypatch) -> None:
    """The real huggingface_hub client, online against tests/hub_server.py, on the classic LFS route."""
    import huggingface_hub.constants as C
    import huggingface_hub.utils._detect_agent as detect_agent
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)  # CI sets HF_HUB_OFFLINE=1; this server is local
    monkeypatch.setattr(C, "HF_HUB_DISABLE_XET", True)
    # Online mode makes the client fetch an "agent harness" registry from huggingface.co for its
    # user agent; the tests stay hermetic with the empty registry it falls back to.
    monkeypatch.setattr(detect_agent, "_registry", detect_agent._EMPTY_REGISTRY)
    # The client's own http_backoff (preupload, LFS PUT) sleeps 1-8 s between tries: instant here.
    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.sleep = NO_SLEEP
    monkeypatch.setattr(http, "time", fake_time)
