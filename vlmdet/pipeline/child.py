"""Entry point of the child processes: `python -m vlmdet.pipeline.child STEP REQUEST.json RESULT.json`.

Each step's child function (declared with the step, vlmdet.pipeline.steps; a step declared elsewhere names
it as MODULE:FUNCTION) reads its input records from the request, calls one library function and writes
{"record": ...} or {"kind": "oom"|"config"|"error", "message": ..., "traceback": ...}.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from vlmdet.config.settings import ConfigError
from vlmdet.run.records import write_json
from vlmdet.run.timeline import take


def _steps() -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    """The child function of every step that declares one (vlmdet.pipeline.steps)."""
    from vlmdet.pipeline.steps import ALL

    return {step.name: step.child for step in ALL if step.child}


STEPS = _steps()


def child_of(step: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    if step in STEPS:
        return STEPS[step]
    module, sep, name = step.partition(":")
    if not sep:
        raise KeyError(f"no step {step!r} runs in a child; known: {', '.join(STEPS)} (or MODULE:FUNCTION)")
    import importlib

    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    step, request, result = (argv or sys.argv[1:])[:3]
    logging.basicConfig(level=logging.INFO, format=f"[{step}] %(levelname)s %(name)s: %(message)s")
    rank0 = int(os.environ.get("RANK", 0)) == 0
    out: dict[str, Any]
    try:
        out = {"record": child_of(step)(json.loads(Path(request).read_text()))}
        code = 0
    except Exception as err:  # the parent turns this into a clear task failure
        import torch

        kind = "oom" if isinstance(err, torch.cuda.OutOfMemoryError) else "config" if isinstance(err, ConfigError) else "error"
        out = {"kind": kind, "message": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        if kind == "config":  # a user error: its message says what to fix; the traceback stays in the result
            print(f"[{step}] {' '.join(out['message'].split())}", file=sys.stderr)
        else:
            traceback.print_exc()
        code = 1
    if rank0:
        # where the step's seconds went (vlmdet.run.timeline); the parent adds start-up and exit
        write_json(result, {**out, "timeline": take(), "written": time.time()}, indent=1)
    return code


def _exit_now(code: int) -> None:
    """End the child without the interpreter's teardown of torch, transformers, PEFT and TRL (3.95 s against
    0.39 s for this exit, benchmarks/child_startup.py), after every exit handler has run (TensorBoard's and
    MLflow's flushes, a sitecustomize's memory report) and every non-daemon thread has ended, as at a normal
    exit: the result file is already written."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
