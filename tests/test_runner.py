"""The child-process runner: results come back, crashes and timeouts are named as such."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from vlmdet.run import runner

from vlmdet.pipeline import child as steps
from vlmdet.run.runner import StepFailed, StepTimeout, run_step


@pytest.fixture
def fake_steps(monkeypatch, tmp_path):
    """Register throwaway steps in the child through a sitecustomize-free route: an env switch."""
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    (tmp_path / "fakesteps.py").write_text(
        "import os, time, signal\n"
        "from vlmdet.pipeline import child as steps\n"
        "def ok(req): return {'echo': req['x'] * 2}\n"
        "def boom(req): raise ValueError('bad value 42')\n"
        "def sleep(req):\n"
        "    open(req['pidfile'], 'w').write(str(os.getpid())); time.sleep(60); return {}\n"
        "def die(req): os.kill(os.getpid(), signal.SIGKILL)\n"
        "def conf(req):\n"
        "    from vlmdet.config.settings import ConfigError\n"
        "    raise ConfigError('train.learning_rate=-1 must be > 0; set e.g. --train.learning_rate 1e-4')\n"
        "steps.STEPS.update(ok=ok, boom=boom, sleep=sleep, die=die, conf=conf)\n")
    # the child imports fakesteps before dispatching
    monkeypatch.setattr(runner, "command", lambda step, req, res, n=1: [
        runner.sys.executable, "-c", f"import sys, fakesteps; from vlmdet.pipeline.child import main; sys.exit(main({[step, str(req), str(res)]!r}))"])


def test_result_record_comes_back(fake_steps, tmp_path):
    assert run_step("ok", {"x": 21}, tmp_path / "s", timeout_s=60) == {"echo": 42}


def test_an_exception_in_the_child_names_the_step_and_the_error(fake_steps, tmp_path):
    with pytest.raises(StepFailed, match="step 'boom' failed: ValueError: bad value 42"):
        run_step("boom", {}, tmp_path / "s", timeout_s=60)


def test_a_config_error_in_the_child_prints_one_line_and_keeps_the_traceback_in_the_result(fake_steps, tmp_path,
                                                                                           capfd):
    message = "ConfigError: train.learning_rate=-1 must be > 0; set e.g. --train.learning_rate 1e-4"
    with pytest.raises(StepFailed, match=re.escape("step 'conf' failed: " + message)) as err:
        run_step("conf", {}, tmp_path / "s", timeout_s=60)
    assert err.value.kind == "config"
    err_text = capfd.readouterr().err  # the child's stderr
    assert f"[conf] {message}" in err_text.splitlines() and "Traceback" not in err_text
    result = json.loads((tmp_path / "s" / "result.json").read_text())
    assert result["message"] == message
    assert result["traceback"].startswith("Traceback") and "raise ConfigError" in result["traceback"]
    # any other error is a bug: its traceback is printed as before
    with pytest.raises(StepFailed):
        run_step("boom", {}, tmp_path / "b", timeout_s=60)
    err_text = capfd.readouterr().err
    assert "Traceback (most recent call last)" in err_text and "ValueError: bad value 42" in err_text.splitlines()


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


def _wait_gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if runner._gone(pid):
            return True
        time.sleep(0.05)
    return False


def _parent_running_sleep(tmp_path, step_dir) -> tuple[subprocess.Popen, int]:
    """A flow-run stand-in in another process, running the `sleep` step in step_dir: (it, its step child's pid)
    once the child has started."""
    pidfile = tmp_path / "childpid"
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        from vlmdet.run import runner
        runner.command = lambda step, req, res, n=1: [
            runner.sys.executable, "-c",
            f"import sys, fakesteps; from vlmdet.pipeline.child import main; sys.exit(main({{[step, str(req), str(res)]!r}}))"]
        runner.run_step("sleep", {{"pidfile": {str(pidfile)!r}}}, {str(step_dir)!r}, timeout_s=120)
    """))
    parent = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.is_file() and pidfile.read_text()) and time.monotonic() < deadline:
            assert parent.poll() is None, "parent ended before its child started"
            time.sleep(0.05)
        return parent, int(pidfile.read_text())
    except BaseException:
        parent.kill()
        parent.wait()
        raise


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_the_child_dies_when_its_parent_is_sigkilled(fake_steps, tmp_path):
    # The flow-run process killed hard (OOM killer, preemption) must not leave its trainer on the GPU.
    parent, child = _parent_running_sleep(tmp_path, tmp_path / "s")
    try:
        assert not runner._gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_gone(child, within_s=5), "the step child outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait()


def test_a_stale_child_of_a_crashed_parent_is_killed_before_the_step_runs(fake_steps, tmp_path, caplog):
    step_dir = tmp_path / "s"
    step_dir.mkdir()
    # A leftover child: its own session, "vlmdet.pipeline.child" on its command line, pid in child.pid.
    stale = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "vlmdet.pipeline.child", "train"],
                             start_new_session=True)
    # Not a step child: a reused pid must never be killed.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        (step_dir / "child.pid").write_text(str(other.pid))
        with caplog.at_level(logging.WARNING, logger="vlmdet.run.runner"):
            assert run_step("ok", {"x": 1}, step_dir, timeout_s=60) == {"echo": 2}
        assert other.poll() is None and not caplog.records
        (step_dir / "child.pid").write_text(str(stale.pid))
        with caplog.at_level(logging.WARNING, logger="vlmdet.run.runner"):
            assert run_step("ok", {"x": 2}, step_dir, timeout_s=60) == {"echo": 4}
        assert stale.wait(timeout=10) == -signal.SIGKILL
        assert any(str(stale.pid) in r.getMessage() and "still running" in r.getMessage() for r in caplog.records)
        assert int((step_dir / "child.pid").read_text()) != stale.pid  # the new child's pid replaced it
    finally:
        for p in (stale, other):
            p.kill()
            p.wait()


def test_a_step_running_in_a_live_run_is_refused_not_killed(fake_steps, tmp_path):
    """Two runs of one step and configuration in one work folder (a manual run while the nightly trains): the
    second is refused with who holds the folder; the first's child runs on. Once that run's process is gone
    the folder is free again."""
    from vlmdet.run.runner import StepBusy

    step_dir = tmp_path / "s"
    parent, child = _parent_running_sleep(tmp_path, step_dir)
    try:
        with pytest.raises(StepBusy, match=rf"step 'ok' is already running in {re.escape(str(step_dir))} "
                                           rf"\(pid {parent.pid} on ") as err:
            run_step("ok", {"x": 1}, step_dir, timeout_s=60)
        assert err.value.kind == "busy"
        assert not runner._gone(child), "the running step's child was killed"
        assert "pidfile" in json.loads((step_dir / "request.json").read_text())  # its request untouched
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_gone(child, within_s=5)
        assert run_step("ok", {"x": 1}, step_dir, timeout_s=60) == {"echo": 2}  # the kernel dropped its lock
    finally:
        parent.kill()
        parent.wait()
