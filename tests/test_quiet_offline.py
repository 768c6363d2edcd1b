"""An offline run is quiet (issue 13, item 4): `vlmdet retrain` in a fresh Prefect home, as a new
user's first run, prints no telemetry error, no "database is locked" and no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_a_first_offline_retrain_prints_no_telemetry_lock_or_traceback(tmp_path, tiny_model):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "DO_NOT_TRACK"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]))
    workdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "vlmdet.cli", "retrain", "--preset", "smoke", "--workdir", str(workdir),
         "--dataset", "synth:24", "--model.base", tiny_model, "--train.max_steps", "2", "--train.save_steps", "1",
         "--eval.max_new_tokens", "8", "--eval.preview_images", "1", "--eval.eval_base", "false"],
        capture_output=True, text=True, env=env, timeout=600)
    output = out.stdout + out.stderr
    assert out.returncode == 0, output[-3000:]
    for noise in ("Traceback", "telemetry", "database is locked", "Logging error"):
        assert noise not in output, f"{noise!r} in:\n{output[-3000:]}"
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["training"]["global_step"] == 2  # it really trained: the quiet is not an empty run
