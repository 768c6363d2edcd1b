"""benchmarks/nightly_run.py on a CPU (--tiny): every step of the nightly run timed, the publication a real commit."""
from __future__ import annotations

import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import pytest

from hub_server import HubServer

REPO = Path(__file__).resolve().parents[1]
STEPS = ["prepare_data", "train", "evaluate adapter", "find champion", "gate adapter", "merge", "evaluate merged", "gate merged",
         "publish"]


def _script(monkeypatch):
    spec = importlib.util.spec_from_file_location("nightly_run", REPO / "benchmarks" / "nightly_run.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "nightly_run", module)  # the data workers find render_photo by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def online_classic_lfs(monkeypatch):
    """As tests/test_hub_roundtrip.py: the client was imported offline (conftest); this server is local."""
    import huggingface_hub.constants as C
    import huggingface_hub.utils._detect_agent as detect_agent
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(C, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(detect_agent, "_registry", detect_agent._EMPTY_REGISTRY)
    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.sleep = lambda s: None
    monkeypatch.setattr(http, "time", fake_time)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # main() lifts it for itself and gives it to the step children


def test_tiny_nightly_run_times_every_step_and_commits_to_the_hub(tmp_path, monkeypatch, online_classic_lfs):
    nightly = _script(monkeypatch)
    out, work = tmp_path / "out", tmp_path / "work"
    with HubServer() as hub:
        summary = nightly.main(["--tiny", "--train-images", "4", "--test-images", "2", "--epochs", "1",
                                "--workers", "1", "--out", str(out), "--workdir", str(work), "--hub-endpoint", hub.url,
                                "--set", "eval.max_new_tokens=8", "--set", "eval.preview_images=1"])
        repo = hub.state.repos[nightly.HUB_REPO]

    # every step of the flow, in the flow's order, with its time; the total is their sum
    steps = summary["steps"]
    assert [s["step"] for s in steps] == STEPS
    assert all(s["seconds"] > 0 for s in steps if s["step"] in ("train", "evaluate adapter", "merge", "publish"))
    assert summary["total_seconds"] == pytest.approx(sum(s["seconds"] for s in steps), abs=0.01)
    assert sum(s["share"] for s in steps) == pytest.approx(1.0, abs=1e-3)
    assert summary["state"] == "done" and summary["gate_forced"]
    assert json.loads((out / "progress.json").read_text()) == json.loads((out / "nightly_run.json").read_text())
    assert "| **total** |" in (out / "nightly_run.md").read_text()

    # the data: 4 + 2 photos at sizes from the real photos' list, split as the Hub dataset is
    data = json.loads(Path(summary["overrides"]["data.dataset"][len("coco:"):]).read_text())
    assert {(i["width"], i["height"]) for i in data["images"]} <= set(nightly.REAL_PHOTO_SIZES)
    assert summary["counts"]["test"]["images"] == 2
    assert summary["counts"]["train"]["images"] + summary["counts"]["val"]["images"] == 4
    by = {s["step"]: s for s in steps}
    assert by["train"]["global_step"] == 1 and by["evaluate adapter"]["images"] == 2
    # 1 of the preset's 3 epochs: the total at 3 adds twice the trainer's own time
    x = summary["extrapolated"]
    assert x["epochs"] == 3 and x["total_seconds"] == pytest.approx(
        summary["total_seconds"] + 2 * by["train"]["trainer_runtime_s"], abs=0.1)
    # each step child ran with the memory hook (no GPU here: no peak to report)
    assert all(by[name]["reports"] >= 1 and "peak_allocated_gib" not in by[name]
               for name in ("train", "evaluate adapter", "merge", "evaluate merged"))

    # the publication reached the server: one commit on top of the repo's first, holding the merged weights
    published = summary["published"]
    assert summary["commit_found"] and repo.head.oid == published["revision"] and len(repo.commits) == 2
    weights = next((work / "run" / "merged").glob("*/model.safetensors"))  # merged/<id>: the one merge of the run
    assert repo.head.files["model.safetensors"][0] == weights.read_bytes()
    assert "README.md" in repo.head.files and f"run-{published['run_id']}" in repo.tags

    # where each step child's seconds went (vlmdet.run.timeline): its phases cover the child's wall time (what
    # no phase covers is the step's own unexplained overhead), and the child ran inside the driver's step
    for name, expected in (("train", {"start-up", "imports", "load weights", "train", "save", "exit"}),
                           ("evaluate adapter", {"start-up", "imports", "load weights", "detect", "score", "save"}),
                           ("merge", {"start-up", "imports", "load weights", "merge", "save", "check"}),
                           ("evaluate merged", {"load weights", "detect", "decode images"})):
        t = by[name]["timeline"]
        assert expected <= {p["name"] for p in t["phases"]}, name
        assert 0 < t["wall_s"] <= by[name]["seconds"]
        assert t["accounted_s"] == pytest.approx(sum(p["s"] for p in t["phases"] if "within" not in p), abs=0.01)
        assert t["accounted_s"] == pytest.approx(t["wall_s"], rel=0.05), (name, t)
    md = (out / "nightly_run.md").read_text()
    assert "nightly_run_timeline.png" in md and (out / "nightly_run_timeline.png").stat().st_size > 0
    # the run's own summary carries the same timelines (the smoke run's and the flow's too)
    run_summary = json.loads((work / "run" / "summary.json").read_text())
    assert {t["step"] for t in run_summary["timeline"]} == {"train", "evaluate", "merge"}
    assert Path(run_summary["timeline_picture"]).is_file()
