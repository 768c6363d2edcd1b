"""Run a heavy step (train, evaluate, merge) in a child process.

The child returns its GPU memory to the system when it ends, a crash or an out-of-memory is seen
as such instead of poisoning the parent, a timeout really stops it (the whole process group is
killed), and the same command scales to several GPUs with `accelerate launch`. The child writes
its result record as JSON; the parent reads it back.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


def command(step: str, request: Path, result: Path, num_processes: int = 1) -> list[str]:
    if num_processes > 1:
        # accelerate starts one process per GPU (torchrun underneath); only rank 0 writes the result.
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
                "--module", "vlmdet.steps", step, str(request), str(result)]
    return [sys.executable, "-m", "vlmdet.steps", step, str(request), str(result)]


def run_step(step: str, request: dict[str, Any], step_dir: str | Path, timeout_s: float,
             num_processes: int = 1, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python -m vlmdet.steps STEP` with `request`; return the record dict it wrote."""
    step_dir = Path(step_dir)
    step_dir.mkdir(parents=True, exist_ok=True)
    req, res = step_dir / "request.json", step_dir / "result.json"
    req.write_text(json.dumps(request, indent=1, default=str))
    res.unlink(missing_ok=True)
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    # A new session: the child and its workers form one process group that a timeout kills at once.
    proc = subprocess.Popen(command(step, req, res, num_processes), env=child_env, start_new_session=True)
    (step_dir / "child.pid").write_text(str(proc.pid))
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise StepTimeout(step, f"step '{step}' timed out after {time.monotonic() - started:.0f}s "
                                f"(limit {timeout_s:.0f}s); its child process was killed. Raise the step's timeout_s "
                                "or give it less work.", kind="timeout") from None
    except BaseException:
        _kill(proc)
        raise
    result = json.loads(res.read_text()) if res.is_file() else None
    if rc == 0 and result and "record" in result:
        return result["record"]
    if result and result.get("kind") == "oom":
        raise OutOfMemory(step, f"step '{step}' ran out of GPU memory: {result.get('message', '')}. "
                                f"Knobs that lower memory: {OOM_KNOBS}.", kind="oom")
    if result and result.get("message"):
        raise StepFailed(step, f"step '{step}' failed: {result['message']}", kind=result.get("kind", "error"))
    how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with code {rc}"
    raise StepFailed(step, f"step '{step}' child process {how} without a result (see its output above; "
                           f"request in {req})", kind="crash")


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def clean(step_dir: str | Path) -> None:
    shutil.rmtree(step_dir, ignore_errors=True)
