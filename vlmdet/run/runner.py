"""Run a heavy step (train, evaluate, merge) in a child process.

The child returns its GPU memory to the system when it ends, a crash or an out-of-memory is seen
as such instead of poisoning the parent, a timeout really stops it (the whole process group is
killed), and the same command scales to several GPUs with `accelerate launch`. The child writes
its result record as JSON; the parent reads it back.

One attempt at a time owns a step's folder (an exclusive flock on STEP_DIR/step.lock while its child runs):
another run of the same step and configuration in the same work folder is refused (StepBusy) instead of
overwriting the request, checkpoints and files of the one running, and a child.pid left there is a crashed
parent's only when nobody holds the lock (the kernel drops it with the process).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from vlmdet.run import progress, timeline
from vlmdet.run.records import write_json

log = logging.getLogger(__name__)
OnProgress = Callable[[float, str], None]  # (fraction done 0..1, what it is: "step 3/20, loss 1.2345")
PROGRESS_POLL_S = 1.0  # how often the parent reads the child's progress lines while it waits
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
OOM_KNOBS = ("train.per_device_batch (halve it and double train.grad_accum to keep the effective batch), "
             "lora.r, model.max_pixels (fewer visual tokens per image), train.gradient_checkpointing=true, "
             "eval.batch_size")


class StepFailed(RuntimeError):
    def __init__(self, step: str, message: str, kind: str = "error"):
        super().__init__(message)
        self.step, self.kind = step, kind


class StepTimeout(StepFailed):
    pass


class OutOfMemory(StepFailed):
    pass


class StepBusy(StepFailed):
    """Another live process is running this step in the same folder."""


LOCK = "step.lock"


@contextlib.contextmanager
def owning(step: str, step_dir: Path) -> Iterator[None]:
    """Hold step_dir for one attempt, or raise StepBusy naming who holds it."""
    fd = os.open(step_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise StepBusy(step, f"step '{step}' is already running in {step_dir} ({holder}): another run with the "
                                 "same step and settings in this work folder. Two at once would overwrite each "
                                 "other's request, checkpoints and files, so this one stops. Run again once it has "
                                 "finished (its result is then reused), or give this run its own --workdir.",
                           kind="busy") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
                  .encode(), 0)
        yield
    finally:
        os.close(fd)  # drops the lock


def command(step: str, request: Path, result: Path, num_processes: int = 1) -> list[str]:
    if num_processes > 1:
        # accelerate starts one process per GPU (torchrun underneath); only rank 0 writes the result.
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
                "--module", "vlmdet.pipeline.child", step, str(request), str(result)]
    return [sys.executable, "-m", "vlmdet.pipeline.child", step, str(request), str(result)]


def plan_processes(requested: int, visible: int | None = None, environ: dict[str, str] | None = None,
                   setting: str = "train.num_processes") -> tuple[int, dict[str, str]]:
    """(processes, extra environment) for a step asking for `requested` GPUs (0 = every visible one).

    One process per GPU: a single process that sees several GPUs makes SFTTrainer wrap the model in
    nn.DataParallel, which it refuses. So N processes (accelerate launch) for N visible GPUs, and a
    request for fewer than are visible pins the first ones with CUDA_VISIBLE_DEVICES.
    """
    from vlmdet.config.settings import ConfigError

    environ = os.environ if environ is None else environ
    if visible is None:
        import torch

        visible = torch.cuda.device_count()  # honours CUDA_VISIBLE_DEVICES; no CUDA context is created
    if visible == 0:
        if requested > 1:
            raise ConfigError(f"{setting}={requested} but no CUDA GPU is visible to this worker; "
                              f"set {setting}=0 (one process per visible GPU) or 1.")
        return 1, {}
    if requested > visible:
        raise ConfigError(f"{setting}={requested} but this worker sees {visible} GPU(s); set it to at most "
                          f"{visible}, or 0 for all of them.")
    n = requested or visible
    if n == visible:
        return n, {}
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in listed.split(",") if d.strip()] if listed else [str(i) for i in range(visible)]
    return n, {"CUDA_VISIBLE_DEVICES": ",".join(devices[:n])}


def _load_prctl():
    """libc's prctl, looked up in the parent: the child between fork and exec should only call it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def _die_with_parent(parent_pid: int):
    """preexec_fn for the child: the kernel sends it SIGKILL when its parent dies.

    The child runs in its own session (so a timeout can kill its whole group), which also means a
    SIGKILLed flow-run process would leave it holding the GPU while a retry starts a second
    trainer on the same checkpoints. subprocess applies start_new_session (setsid) before
    preexec_fn, so this runs in the new session. The signal fires when the *thread* that forked
    exits; run_step's thread is blocked in wait() for the child's whole life, so that is the
    parent's lifetime here. Workers that `accelerate launch` starts are not covered; the stale
    child.pid cleanup in run_step catches those groups on the next attempt.
    """
    def preexec() -> None:
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)
    return preexec


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _gone(pid: int) -> bool:
    """True once pid no longer runs (absent, or a zombie waiting for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def kill_stale_child(step_dir: Path, wait_s: float = 10.0) -> bool:
    """Kill the process group of a step child left by a crashed parent (step_dir/child.pid); called while holding
    step_dir (owning), so a live parent's child is never taken for one.

    Only a live process whose command line runs vlmdet.pipeline.child is touched: a pid can be reused by an
    unrelated process after a reboot or a long time. Returns True when one was killed.
    """
    pidfile = step_dir / "child.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return False
    if pid <= 1 or _gone(pid) or "vlmdet.pipeline.child" not in _cmdline(pid):
        return False
    log.warning("step child %d from an earlier attempt is still running (its parent crashed); killing its "
                "process group before starting again so two runs do not share the GPU and %s", pid, step_dir)
    try:
        # Started with start_new_session, it leads its own group (its workers are in it too).
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + wait_s
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def run_step(step: str, request: dict[str, Any], step_dir: str | Path, timeout_s: float,
             num_processes: int = 1, env: dict[str, str] | None = None,
             on_progress: OnProgress | None = None) -> dict[str, Any]:
    """Run `python -m vlmdet.pipeline.child STEP` with `request`; return the record dict it wrote.

    on_progress(fraction, text): called while the child runs, once for every line it appends to
    STEP_DIR/progress.jsonl (vlmdet.run.progress: at most one a whole percent), and with 1.0 when the
    step succeeded. An error inside it is logged and never stops the step."""
    step_dir = Path(step_dir)
    step_dir.mkdir(parents=True, exist_ok=True)
    with owning(step, step_dir):  # a child.pid still running now is a crashed parent's, not a live run's
        kill_stale_child(step_dir)
        return _run_child(step, request, step_dir, timeout_s, num_processes, env, on_progress)


def _run_child(step: str, request: dict[str, Any], step_dir: Path, timeout_s: float, num_processes: int,
               env: dict[str, str] | None, on_progress: OnProgress | None) -> dict[str, Any]:
    req, res = step_dir / "request.json", step_dir / "result.json"
    req.write_text(json.dumps(request, indent=1, default=str))
    res.unlink(missing_ok=True)
    progress_file = step_dir / progress.FILE
    progress_file.unlink(missing_ok=True)  # an earlier attempt's lines would read as this one's
    spawned = time.time()  # the timeline's zero: start-up counts from here (vlmdet.run.timeline)
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", progress.ENV: str(progress_file),
                 timeline.SPAWNED_ENV: repr(spawned)}
    started = time.monotonic()
    # A new session: the child and its workers form one process group that a timeout kills at once;
    # the preexec hook makes the kernel kill the child if this process dies without cleaning up.
    proc = subprocess.Popen(command(step, req, res, num_processes), env=child_env, start_new_session=True,
                            preexec_fn=_die_with_parent(os.getpid()))
    (step_dir / "child.pid").write_text(str(proc.pid))
    forward = _Forwarder(progress.ProgressReader(progress_file), on_progress)
    try:
        rc = _wait(proc, timeout_s, forward)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise StepTimeout(step, f"step '{step}' timed out after {time.monotonic() - started:.0f}s "
                                f"(limit {timeout_s:.0f}s); its child process was killed. Raise the step's timeout_s "
                                "or give it less work.", kind="timeout") from None
    except BaseException:
        _kill(proc)
        raise
    result = json.loads(res.read_text()) if res.is_file() else None
    if result and "timeline" in result:
        write_json(step_dir / timeline.FILE, timeline.assemble(step, result["timeline"], spawned, time.time(),
                                                               result.get("written")), indent=1)
    if rc == 0 and result and "record" in result:
        forward.done(f"finished in {time.monotonic() - started:.0f}s")
        return result["record"]
    if result and result.get("kind") == "oom":
        raise OutOfMemory(step, f"step '{step}' ran out of GPU memory: {result.get('message', '')}. "
                                f"Knobs that lower memory: {OOM_KNOBS}.", kind="oom")
    if result and result.get("message"):
        raise StepFailed(step, f"step '{step}' failed: {result['message']}", kind=result.get("kind", "error"))
    how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with code {rc}"
    raise StepFailed(step, f"step '{step}' child process {how} without a result (see its output above; "
                           f"request in {req})", kind="crash")


class _Forwarder:
    """Hands the child's new progress lines to on_progress; a failing callback is logged, not raised."""

    def __init__(self, reader: progress.ProgressReader, on_progress: OnProgress | None):
        self.reader, self.on_progress, self.warned, self.last = reader, on_progress, False, ""

    def __call__(self) -> None:
        if self.on_progress is not None:
            for line in self.reader.read_new():
                self.last = line.text
                self._call(line.fraction, line.text)

    def done(self, text: str) -> None:
        """1.0 once the step succeeded, after its last lines: "step 20/20, loss 0.1234; finished in 80s"."""
        if self.on_progress is not None:
            self()
            self._call(1.0, f"{self.last}; {text}" if self.last else text)

    def _call(self, fraction: float, text: str) -> None:
        try:
            self.on_progress(fraction, text)
        except Exception as err:  # an unreachable UI must not fail hours of training
            if not self.warned:
                log.warning("progress callback failed (the step goes on; further failures are not logged): %s", err)
                self.warned = True


def _wait(proc: subprocess.Popen, timeout_s: float, forward: _Forwarder) -> int:
    """proc's exit code, forwarding its progress every PROGRESS_POLL_S; TimeoutExpired after timeout_s."""
    if forward.on_progress is None:
        return proc.wait(timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            rc = proc.wait(timeout=max(0.0, min(PROGRESS_POLL_S, left)))
        except subprocess.TimeoutExpired:
            if left <= PROGRESS_POLL_S:
                raise
            forward()
            continue
        forward()
        return rc


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
