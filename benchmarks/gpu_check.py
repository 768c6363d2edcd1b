"""The GPU check: one command, one H100 or H200, one device call (540 s; a call is 600 s with the wheels'
install), one results file named by commit.

A change to training, evaluation, prediction, merging, modeling or publishing ends with this command
on the final commit (docs/gpu.md says how to send it to the lent GPU machine). It runs:

1. `tests/gpu` (pytest -m gpu): the nightly preset's code path on a random-weight Qwen2-VL-7B, and the
   smoke task trained fp32 vs the nightly QLoRA path;
2. a scaled nightly run, twice, through benchmarks/nightly_run.py (the same pipeline the flow runs:
   train with validation selection, both evaluations, merge, publish to tests/hub_server.py); the
   second run finds the first one's model at the target and its gate compares against it (paired
   bootstrap on the same test images). Scaled: 24 training and 8 test images, and a random Qwen2-VL-7B
   with 4 of its 28 decoder layers (vision tower, embeddings and LM head whole; 2.7B): the same code
   and layer shapes, a third of the 7B's minutes of loading, merging and uploading. The whole 7B's
   path is tests/gpu's; the whole night at full size is nightly_run.py's own measurement. Run 2 trains
   one optimizer step (run 1: two, with validation selection between checkpoints): its part is the
   champion's lookup and the paired comparison, and its gate closes (both random models score 0), so
   it neither merges nor publishes;
3. with --bench only: the bench rows `recipe,qlora,large` (benchmarks/bench.py), compared with each other
   in the same call. They do not fit beside 1 and 2 in one call on an H100 (71a01ce71783, 2026-12-07: 518 s
   with the recipe row cut), so the check leaves them out unless asked; a bench asked for and cut by the
   budget makes the check not green, as any part that did not run.

1 and 2 run side by side (one GPU has the memory for both; they are checks, not timings): the smoke
task's test starts at once (a few minutes of mostly Python on a 3.8M model), the nightly runs once their
small base is built, the 7B tests once the random 7B is. Each part has its own deadline, printed at the
start and written to the results ("budget"): run 1 must end --run2-s before the end so that run 2 has its
time; the tests and run 2 end by the end. On an H100 (71a01ce71783): base 38 s, run 1 256 s, run 2 ~95 s
(the H200's 64 s x the H100's 1.45), the tests 399 s beside them: ~400 s of the 540.
Writes OUT/gpu_check-<commit>.json (every phase: ok, seconds, counts, the nightly runs' step tables,
the bench rows) beside the logs, and exits 1 if anything failed or did not run.

    python benchmarks/gpu_check.py --out $OUT --commit $(git rev-parse --short=12 HEAD)
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # vlmdet from this checkout
sys.path.insert(0, str(REPO / "benchmarks"))
PRESET = "qwen2-vl-7b-nutrition"
BENCH_ROWS = "recipe,qlora,large"
NIGHTLY_LAYERS = 4  # decoder layers of the nightly runs' random base (the 7B's shapes; tests/gpu has all 28)


def commit_id(given: str | None) -> str:
    if given:
        return given[:12]
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("VLMDET_COMMIT", "unknown")[:12]


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "pycocotools"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def child_env(**extra: str) -> dict[str, str]:
    paths = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", **extra}


def start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    print(f"[gpu-check] start: {' '.join(cmd)}  (log {log.name})", flush=True)
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(**env), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait(proc: subprocess.Popen, deadline: float) -> int:
    try:
        return proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return 124


def tail(path: Path, n: int = 30) -> list[str]:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return [ln for ln in lines if not ln.startswith("import time:")][-n:]


def import_profile(log: Path, n: int = 8) -> dict[str, list[tuple[str, float]]]:
    """Per step of a nightly run logged with PYTHONPROFILEIMPORTTIME=1 (the step's child and anything the run
    imported meanwhile): the top-level packages whose own import seconds were largest. On 71a01ce the scaled
    run's children spent 71 s importing on an H100 against ~10 s each on a 2-core CPU: this says where."""
    step, own = "start", {}
    for line in log.read_text(errors="replace").splitlines() if log.is_file() else []:
        if m := re.match(r"\[nightly\] \S+ (.+?) \.\.\.$", line):
            step = m.group(1)
        elif m := re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line):
            counts = own.setdefault(step, collections.Counter())
            counts[m.group(2).split(".")[0]] += int(m.group(1)) / 1e6
    return {s: [(k, round(v, 2)) for k, v in c.most_common(n)] for s, c in own.items()}


def pytest_counts(log: Path) -> dict[str, int]:
    """pytest's closing line ("5 passed, 1 failed in 418.00s") as numbers."""
    line = next((ln for ln in reversed(tail(log, 60)) if re.search(r"\d+ (passed|failed|error|skipped)", ln)), "")
    return {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", line)}


def find(obj: Any, key: str) -> list[Any]:
    """Every value of `key` anywhere in a JSON document."""
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == key] + [x for v in obj.values() for x in find(v, key)]
    if isinstance(obj, list):
        return [x for v in obj for x in find(v, key)]
    return []


# Run 2: one optimizer step, checkpointed (run 1's two steps and validation between them are run 1's to check)
RUN2_SETTINGS = ["--set", "train.max_steps=1", "--set", "train.save_steps=1"]


def nightly_cmd(out: Path, work: Path, base: Path | None, hub: str, args: argparse.Namespace,
                extra: list[str] | None = None) -> list[str]:
    model = ["--tiny", "--workers", "1"] if base is None else ["--base", str(base)]
    return [sys.executable, "benchmarks/nightly_run.py", "--out", str(out), "--workdir", str(work), *model,
            "--train-images", str(args.train_images), "--test-images", str(args.test_images), "--epochs", "1",
            "--hub-endpoint", hub,
            # checkpoints every 2 steps so that validation selection scores more than one; short answers.
            # lr 1e-3 constant, as tests/gpu's 7B tests: merge() refuses a merged model further from base +
            # adapter than half the adapter's own effect, and 2 steps at the preset's 2e-4 cosine moved a random
            # 7B's logits by 0.455 where bf16 rounding alone moves them ~0.49 (gpu_check of 4bffffe7727b)
            "--set", "train.save_steps=2", "--set", "train.warmup_steps=0", "--set", "train.learning_rate=1e-3",
            "--set", "train.scheduler=constant", "--set", "eval.max_new_tokens=24",
            "--set", "eval.val_max_images=8", *(extra or [])]


def nightly_phase(work: Path, logs: Path, base: Path | None, args: argparse.Namespace,
                  deadlines: tuple[float, float]) -> dict[str, Any]:
    """Two scaled nightly runs on one Hub server: the first publishes, the second measures against it.
    deadlines: when each run is stopped (run 1's leaves run 2 its time)."""
    from nightly_run import LocalHub  # tests/hub_server.py on loopback, as nightly_run starts it

    hub = LocalHub()
    runs: list[dict[str, Any]] = []
    try:
        for k, deadline, extra in ((1, deadlines[0], []), (2, deadlines[1], RUN2_SETTINGS)):
            out = work / f"nightly-{k}"
            out.mkdir(parents=True, exist_ok=True)
            t = time.time()
            if deadline - t < 30:  # not started: a run cut by the budget has not checked anything
                runs.append({"exit": None, "state": f"not run: {deadline - t:.0f} s of its budget left",
                             "seconds": 0.0, "p_better": [], "published": False, "revision": None,
                             "champion_revision": None})
                break
            # run 1's processes log their imports (python -X importtime), summed per step into "imports"
            profile = {"PYTHONPROFILEIMPORTTIME": "1"} if k == 1 else {}
            code = wait(start(nightly_cmd(out, work / "nightly-work", base, hub.url, args, extra),
                              logs / f"nightly{k}.log", **profile), deadline)
            result = json.loads((out / "nightly_run.json").read_text()) if (out / "nightly_run.json").is_file() else {}
            shutil.copy(out / "nightly_run.json", args.out / f"nightly{k}.json") if result else None
            runs.append({"exit": code, "seconds": round(time.time() - t, 1), "state": result.get("state"),
                         "steps": [(s.get("step"), s.get("seconds")) for s in result.get("steps", [])],
                         "p_better": [p for p in find(result, "p_better") if p is not None],
                         "gate": (result.get("gate") or {}).get("reason"),
                         "champion_revision": (result.get("gate") or {}).get("champion_revision"),
                         "revision": (result.get("published") or {}).get("revision"),
                         "published": any(find(result, "published")) or any(
                             s.get("step") == "publish" for s in result.get("steps", [])),
                         "budget_s": round(deadline - t, 1), "cut_by_budget": code == 124,
                         **({"imports": import_profile(logs / f"nightly{k}.log")} if k == 1 else {}),
                         "tail": [] if code == 0 else tail(logs / f"nightly{k}.log")})
            if code != 0:
                break
    finally:
        hub.stop()
    ok = (len(runs) == 2 and all(r["exit"] == 0 and r["state"] == "done" for r in runs) and runs[0]["published"]
          and bool(runs[1]["p_better"])  # the second run's gate compared both models on the same images...
          and runs[1]["champion_revision"] == runs[0]["revision"])  # ...the one the first run committed
    return {"ok": ok, "runs": runs,
            "checks": "run 1 published to the local Hub-API server; run 2's gate compared with run 1's model, "
                      "at the revision run 1 committed"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "benchmarks/results"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/vlmdet-gpu-check"), help="scratch (~50 GB at the peak)")
    ap.add_argument("--commit", help="the commit checked out (default: git rev-parse; the GPU copy has no .git)")
    ap.add_argument("--logs", type=Path, help="child logs (default: beside --work)")
    ap.add_argument("--skip", default="", help="comma list of phases not to run: tests, nightly, bench")
    ap.add_argument("--train-images", type=int, default=24)
    ap.add_argument("--test-images", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="CPU rehearsal: the micro model, bench --tiny, no 7B")
    ap.add_argument("--bench", action="store_true", help="also the bench rows (does not fit one H100 call beside 1 and 2)")
    ap.add_argument("--bench-min-s", type=float, default=150, help="--bench: the least time the rows need")
    ap.add_argument("--run2-s", type=float, default=150, help="seconds kept for nightly run 2 after run 1's deadline")
    ap.add_argument("--budget-s", type=float, default=540, help="everything ends by then (device calls: 600 s)")
    args = ap.parse_args(argv)
    t0 = time.time()
    deadline = t0 + args.budget_s
    skip = {s for s in args.skip.split(",") if s}
    commit = commit_id(args.commit)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # logs beside the scratch (a device call returns at most 8 files: the results and the reports go to --out,
    # the logs' ends into the results file)
    logs = args.logs or work.with_name(work.name + "-logs")
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)

    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    report: dict[str, Any] = {"commit": commit, "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                              "card": card, "versions": versions(), "phases": {}}
    path = args.out / f"gpu_check-{commit}.json"
    bench_asked = args.bench and "bench" not in skip
    # Each part's deadline, in seconds from the start: run 1 leaves run 2 its time, everything ends by the budget.
    report["budget"] = {"total_s": args.budget_s, "nightly_run_1_by_s": args.budget_s - args.run2_s,
                        "nightly_run_2_by_s": args.budget_s - 10, "tests_by_s": args.budget_s - 5,
                        "bench": f"needs {args.bench_min_s:.0f} s left after 1 and 2" if bench_asked else "not asked"}
    print(f"[gpu-check] budget: {json.dumps(report['budget'])}", flush=True)

    def save() -> None:
        report["wall_s"] = round(time.time() - t0, 1)
        report["ok"] = bool(report["phases"]) and all(p.get("ok") for p in report["phases"].values())
        path.write_text(json.dumps(report, indent=1, default=str))

    if not torch.cuda.is_available() and not args.tiny:
        report["phases"]["cuda"] = {"ok": False, "reason": "no CUDA device: the GPU check needs one"}
        save()
        print(f"[gpu-check] {card}: nothing checked", flush=True)
        return 1

    # the smoke task's test needs no 7B: it starts first, beside the 7B's build
    ended: dict[str, float] = {}  # seconds from the check's start at which each pytest child ended

    def pytest(target: str, name: str, **env: str) -> tuple[subprocess.Popen, Path]:
        log = logs / f"{name}.log"
        proc = start([sys.executable, "-m", "pytest", "-m", "gpu", target, "-q", "-p", "no:cacheprovider",
                      "--basetemp", str(work / name), "-o", "addopts=-ra", "--timeout", str(int(args.budget_s))],
                     log, VLMDET_GPU_REPORT=str(args.out / f"{name}_report.json"), **env)
        def watch() -> None:
            proc.wait()
            ended[name] = round(time.time() - t0, 1)

        threading.Thread(target=watch, daemon=True).start()
        return proc, log

    tests: list[tuple[subprocess.Popen, Path]] = []
    t_tests = time.time()
    if "tests" not in skip:
        tests.append(pytest("tests/gpu/test_smoke_qlora.py", "gpu_smoke"))

    from vlmdet.config.settings import load_preset

    # the nightly runs' small base first (seconds), then the runs in a thread while the random 7B is built
    def build(path: Path, layers: int | None, phase: str) -> int:
        t = time.time()
        cfg = load_preset(PRESET).model
        code = subprocess.run([sys.executable, "-c", "import sys; from vlmdet.modeling.published import "
                               "build_random_qwen2_vl_7b as b; b(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), "
                               "text_layers=int(sys.argv[4]) or None)", str(path), str(cfg.min_pixels),
                               str(cfg.max_pixels), str(layers or 0)], cwd=REPO, env=child_env()).returncode
        report["phases"][phase] = {"ok": code == 0, "seconds": round(time.time() - t, 1)}
        save()
        return code

    small = None if args.tiny else work / f"random-qwen2-vl-7b-{NIGHTLY_LAYERS}-layers"
    nightly = None
    if "nightly" not in skip and (small is None or build(small, NIGHTLY_LAYERS, "base_nightly") == 0):
        def nightly_thread() -> None:
            t = time.time()
            runs_by = (t0 + report["budget"]["nightly_run_1_by_s"], t0 + report["budget"]["nightly_run_2_by_s"])
            report["phases"]["nightly"] = {**nightly_phase(work, logs, small, args, runs_by),
                                           "seconds": round(time.time() - t, 1)}
            save()

        nightly = threading.Thread(target=nightly_thread)
        nightly.start()
    base = None if args.tiny else work / "random-qwen2-vl-7b"
    code = 0
    if "tests" not in skip and base is not None:
        code = build(base, None, "base")
    if "tests" not in skip and code == 0:
        tests.append(pytest("tests/gpu/test_qwen2_vl_7b.py", "gpu_7b", VLMDET_RANDOM_7B=str(base or "")))
    if nightly is not None:
        nightly.join()
    # 3 (asked for) once the 7B work is done; the smoke task's test (a 3.8M model: light on the GPU, mostly
    # Python) may still run beside the bench, whose rows are compared with each other only
    bench = None
    if bench_asked and len(tests) > 1:
        wait(tests[1][0], deadline - args.bench_min_s)
    if bench_asked and deadline - time.time() < args.bench_min_s:
        report["phases"]["bench"] = {"ok": False, "seconds": 0.0, "skipped": f"budget: {deadline - time.time():.0f} s "
                                     f"left after the tests and the nightly runs, the rows need {args.bench_min_s:.0f}"}
    elif bench_asked:
        for leftover in work.iterdir():  # the 7B, the merged models (~50 GB): the bench needs the disk
            if leftover.name != "gpu_smoke":
                shutil.rmtree(leftover, ignore_errors=True)
        t_bench = time.time()
        bench_out = work / "bench-out"
        bench = start([sys.executable, "benchmarks/bench.py", "--rows", BENCH_ROWS, "--steps", "5", "--profile", "",
                       *(["--tiny"] if args.tiny else []),
                       "--work", str(work / "bench"), "--out", str(bench_out),
                       "--budget-s", str(max(30, int(deadline - time.time() - 15)))], logs / "bench.log")
    if tests:
        codes = [wait(proc, deadline - 5) for proc, _ in tests]
        counts: dict[str, int] = {}
        with open(args.out / "tests.log", "w") as both:
            for _, log in tests:
                for k, v in pytest_counts(log).items():
                    counts[k] = counts.get(k, 0) + v
                both.write(f"==> {log.name}\n{log.read_text(errors='replace')}\n")
        ran = counts.get("passed", 0) > 0 or (args.tiny and set(codes) <= {0, 5})  # --tiny: no CUDA, all skip
        report["phases"]["tests"] = {"ok": (set(codes) == {0} or args.tiny) and ran and not counts.get("failed"),
                                     "exit": codes, "counts": counts, "seconds": round(time.time() - t_tests, 1),
                                     "files": {log.stem: {"exit": c, **pytest_counts(log), "seconds": ended.get(log.stem)}
                                               for (_, log), c in zip(tests, codes)},
                                     "tail": [ln for (_, log), c in zip(tests, codes) if c for ln in tail(log, 30)]}
        save()
    if bench is not None:
        rc = wait(bench, deadline)
        rows = json.loads((bench_out / "results.json").read_text()) if (bench_out / "results.json").is_file() else {}
        for name in ("results.json", "table.md"):
            if (bench_out / name).is_file():
                shutil.copy(bench_out / name, args.out / f"bench_{name}")
        got = find(rows, "samples_per_s")
        report["phases"]["bench"] = {"ok": rc == 0 and len(got) >= len(BENCH_ROWS.split(",")), "exit": rc,
                                     "seconds": round(time.time() - t_bench, 1), "rows": rows.get("rows", rows),
                                     "tail": [] if rc == 0 else tail(logs / "bench.log", 30)}
    shutil.rmtree(work, ignore_errors=True)
    report["not_asked"] = [] if bench_asked else ["bench (--bench)"]
    save()
    print(f"[gpu-check] {card} commit {commit}: {'OK' if report['ok'] else 'FAILED'} in {report['wall_s']} s -> {path}",
          flush=True)
    for name, phase in report["phases"].items():
        print(f"[gpu-check]   {name}: {'ok' if phase.get('ok') else 'FAILED'} {phase.get('seconds', '')} s "
              f"{phase.get('counts', '')}{phase.get('skipped', '')}", flush=True)
        for k, run in enumerate(phase.get("runs", []), 1):
            print(f"[gpu-check]     run {k}: {run.get('state')} (exit {run.get('exit')}) in {run.get('seconds')} s "
                  f"of its {run.get('budget_s', 0)} s", flush=True)
    if report["not_asked"]:
        print(f"[gpu-check]   not asked, not part of this verdict: {', '.join(report['not_asked'])}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
