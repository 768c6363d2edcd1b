"""The child-process runner: results come back, crashes and timeouts are named as such."""
from __future__ import annotations

import os
import time

import pytest

from vlmdet import runner, steps
from vlmdet.runner import StepFailed, StepTimeout, run_step


@pytest.fixture
def fake_steps(monkeypatch, tmp_path):
    """Register throwaway steps in the child through a sitecustomize-free route: an env switch."""
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    (tmp_path / "fakesteps.py").write_text(
        "import os, time, signal\n"
        "from vlmdet import steps\n"
        "def ok(req): return {'echo': req['x'] * 2}\n"
        "def boom(req): raise ValueError('bad value 42')\n"
        "def sleep(req):\n"
        "    open(req['pidfile'], 'w').write(str(os.getpid())); time.sleep(60); return {}\n"
        "def die(req): os.kill(os.getpid(), signal.SIGKILL)\n"
        "steps.STEPS.update(ok=ok, boom=boom, sleep=sleep, die=die)\n")
    # the child imports fakesteps before dispatching
    monkeypatch.setattr(runner, "command", lambda step, req, res, n=1: [
        runner.sys.executable, "-c", f"import sys, fakesteps; from vlmdet.steps import main; sys.exit(main({[step, str(req), str(res)]!r}))"])


def test_result_record_comes_back(fake_steps, tmp_path):
    assert run_step("ok", {"x": 21}, tmp_path / "s", timeout_s=60) == {"echo": 42}


def test_an_exception_in_the_child_names_the_step_and_the_error(fake_steps, tmp_path):
    with pytest.raises(StepFailed, match="step 'boom' failed: ValueError: bad value 42"):
        run_step("boom", {}, tmp_path / "s", timeout_s=60)


def test_a_killed_child_is_reported_as_killed(fake_steps, tmp_path):
    with pytest.raises(StepFailed, match="killed by SIGKILL") as err:
        run_step("die", {}, tmp_path / "s", timeout_s=60)
    assert err.value.kind == "crash"


def test_a_timeout_kills_the_child_and_says_how_long(fake_steps, tmp_path):
    pidfile = tmp_path / "pid"
    start = time.monotonic()
    with pytest.raises(StepTimeout, match=r"step 'sleep' timed out after \d+s \(limit 3s\)"):
        run_step("sleep", {"pidfile": str(pidfile)}, tmp_path / "s", timeout_s=3)
    assert time.monotonic() - start < 30
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):  # really gone, not left running on the GPU
        os.kill(pid, 0)


def test_steps_module_lists_the_heavy_steps():
    assert {"train", "evaluate", "merge"} <= set(steps.STEPS)
