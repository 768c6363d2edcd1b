"""Several GPUs: vlmdet's train step (the child process the flow runs) on 1 GPU, then on N, same
data, seed and effective batch 16; prints samples/s, the speed-up and the loss difference.

    python benchmarks/multi_gpu.py                      # every visible GPU vs one (a 2- or 4-GPU machine)
    python benchmarks/multi_gpu.py --processes 1,2,4 --profile qlora
    python benchmarks/multi_gpu.py --tiny --processes 1 # CPU check of the path
    python benchmarks/multi_gpu.py --eval-images 256    # then evaluation sharded over 1 and N processes
    python benchmarks/multi_gpu.py --processes 1,2,4 --also-find-unused --torch-profile   # issue 21

--also-find-unused runs every N > 1 a second time with train.ddp_find_unused=true (transformers'
default for a PEFT model, vlmdet's before issue 21), labelled "N+find_unused". --torch-profile runs
one optimizer step more and profiles it on every rank (vlmdet.training.speed.StepProfile):
profile-LABEL/rankR.txt under $OUT; that step is left out of the timings. --set KEY=VALUE (repeatable)
changes a setting in every run, e.g. lora.dropout=0 for curves free of the ranks' dropout masks.

Evaluation (--eval-images N > 0): the `evaluate` step child as tasks/evaluate.py starts it
(plan_processes(eval.num_processes)), on the base folder as a merged model would be (bf16), N
synthetic images, 24-token answers; load and detection time from the child (VLMDET_STEP_TIMES),
the answers compared with the one-process run's.

It goes through vlmdet.run.runner.plan_processes and run_step exactly as tasks/train.py does (one
process per GPU with `accelerate launch`, grad_accum divided by the process count); per-step times
come from the child via VLMDET_STEP_TIMES. Writes multi_gpu.json under $OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench import PRESET, build_base, say, write_dataset  # noqa: E402


def step(name: str, request: dict, run: Path, processes: int, env: dict, times_file: Path) -> dict:
    """The step child as the task starts it, reporting its timings to times_file (VLMDET_STEP_TIMES)."""
    from vlmdet.run.runner import run_step

    shutil.rmtree(run, ignore_errors=True)  # never resume an earlier run's checkpoints: every step is timed
    run.mkdir(parents=True)
    return run_step(name, request, run / "step", timeout_s=1200, num_processes=processes,
                    env={**env, "VLMDET_STEP_TIMES": str(times_file),  # the child imports this checkout
                         "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))})


def main(argv: list[str] | None = None) -> int:
    import torch

    from vlmdet.config.settings import load_preset
    from vlmdet.run.runner import plan_processes
    from vlmdet.config import profiles

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is the warm-up)")
    ap.add_argument("--processes", default="", help="comma list of process counts (default: 1 and every visible GPU)")
    ap.add_argument("--profile", default="qlora")
    ap.add_argument("--eval-images", type=int, default=0, help="also time evaluation sharded over the same process counts")
    ap.add_argument("--train", default="yes", choices=("yes", "no"), help="no: only the evaluation part")
    ap.add_argument("--also-find-unused", action="store_true",
                    help="every N > 1 again with train.ddp_find_unused=true, as 'N+find_unused'")
    ap.add_argument("--torch-profile", action="store_true", help="profile one extra step on every rank")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting over the profile for every run, e.g. lora.dropout=0 (curves free of dropout noise)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "vlmdet-bench"))
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(tempfile.gettempdir(), "vlmdet-bench-out"))
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gpus = torch.cuda.device_count()
    counts = [int(n) for n in a.processes.split(",")] if a.processes else sorted({1, max(gpus, 1)})
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    base, _ = build_base(work, a.tiny, dev)
    extra = 1 if a.torch_profile else 0  # the profiled step, after the timed ones
    dataset = write_dataset(work, 16 * (a.steps + extra), (224, 168) if a.tiny else (1024, 768))
    cfg = load_preset(PRESET, {"model.base": base, "train.max_steps": a.steps + extra, "train.save_steps": 100000,
                               "train.logging_steps": 1, "train.warmup_steps": 0})
    cfg = profiles.apply(cfg, a.profile)
    cfg = cfg.override(dict(kv.split("=", 1) for kv in a.set))
    if dev != "cuda":
        cfg = cfg.override({"model.quantization": "none", "model.dtype": "auto", "train.dataloader_workers": 0})
    result = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "visible_gpus": gpus,
              "profile": a.profile, "set": a.set, "effective_batch": cfg.train.per_device_batch * cfg.train.grad_accum, "runs": {}}
    runs = [(n, n, {}) for n in counts]
    if a.also_find_unused:
        runs += [(f"{n}+find_unused", n, {"train.ddp_find_unused": True}) for n in counts if n > 1]
    for label, n, overrides in runs if a.train == "yes" else []:
        processes, env = plan_processes(n)
        run = work / f"multi-{label}"
        times_file = run / "step_times.json"
        if a.torch_profile:
            env = {**env, "VLMDET_PROFILE_STEP": str(a.steps + 1), "VLMDET_PROFILE_DIR": str(out / f"profile-{label}")}
        say(f"{label} process(es): start ({env or 'all visible GPUs'})")
        t = time.time()
        try:
            rec = step("train", {"dataset": dataset.to_dict(), "config": cfg.override(overrides).to_dict(),
                                 "out": str(run / "train")}, run, processes, env, times_file)
        except Exception as err:
            result["runs"][label] = {"error": str(err)[:500]}
            say(f"{label}: failed: {err}")
            continue
        timing = json.loads(times_file.read_text()) if times_file.is_file() else {"step_s": []}
        timing["step_s"] = timing["step_s"][:a.steps]  # not the profiled step
        steady = timing["step_s"][1:]
        med = statistics.median(steady) if steady else float("nan")
        result["runs"][label] = {"processes": processes, "wall_s": round(time.time() - t, 1), "step_s": timing["step_s"],
                                 "samples_per_s": round(result["effective_batch"] / med, 2),
                                 "samples_per_s_with_warmup": round(result["effective_batch"] * len(timing["step_s"])
                                                                    / max(sum(timing["step_s"]), 1e-9), 2),
                                 "peak_alloc_GiB_rank0": timing.get("peak_alloc_GiB"),
                                 "losses": [round(v, 4) for v in rec["losses"][:a.steps]]}
        say(f"{label}: {result['runs'][label]}")
        (out / "multi_gpu.json").write_text(json.dumps(result, indent=1))
    one = result["runs"].get(1, {})
    for n, r in result["runs"].items():
        if n != 1 and "samples_per_s" in r and "samples_per_s" in one:
            r["speedup"] = round(r["samples_per_s"] / one["samples_per_s"], 2)
            r["max_loss_diff_vs_1"] = round(max(abs(x - y) for x, y in zip(r["losses"], one["losses"])), 4)
    (out / "multi_gpu.json").write_text(json.dumps(result, indent=1))
    if a.eval_images:
        result["eval"] = eval_runs(a, base, counts, work, out, result)
    (out / "multi_gpu.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), flush=True)
    return 0


def eval_runs(a, base: str, counts: list[int], work: Path, out: Path, result: dict) -> dict:
    from vlmdet.config.settings import load_preset
    from vlmdet.run.runner import plan_processes

    data = write_dataset(work, a.eval_images, (224, 168) if a.tiny else (1024, 768))
    cfg = load_preset(PRESET, {"model.base": base, "eval.max_new_tokens": 24, "eval.preview_images": 0})
    if a.tiny:
        cfg = cfg.override({"model.quantization": "none", "model.dtype": "auto"})
    runs: dict = {}
    for n in counts:
        processes, env = plan_processes(n, setting="eval.num_processes")
        run = work / f"eval-{n}"
        times_file = run / "times.json"
        say(f"evaluate on {n} process(es): start")
        t = time.time()
        try:
            rec = step("evaluate", {"model": base, "dataset": data.to_dict(), "out": str(run / "out"), "split": "test",
                                    "config": cfg.override({"eval.num_processes": n}).to_dict()},
                       run, processes, env, times_file)
        except Exception as err:
            runs[n] = {"error": str(err)[:500]}
            say(f"evaluate {n}: failed: {err}")
            continue
        times = json.loads(times_file.read_text())
        answers = [p["answer"] for p in json.loads(Path(rec["per_image"]).read_text())]
        runs[n] = {"processes": times["processes"], "wall_s": round(time.time() - t, 1), "load_s": round(times["load_s"], 1),
                   "detect_s": round(times["detect_s"], 1),
                   "detect_ms_per_image": round(1000 * times["detect_s"] / a.eval_images, 1),
                   "map50": rec["map50"], "answers": answers}
        say(f"evaluate {n}: " + json.dumps({k: v for k, v in runs[n].items() if k != "answers"}))
        result["eval"] = runs
        (out / "multi_gpu.json").write_text(json.dumps(result, indent=1))
    one = runs.get(counts[0], {})
    for n, r in runs.items():
        if "answers" in r and "answers" in one and n != counts[0]:
            r["detect_speedup"] = round(one["detect_s"] / max(r["detect_s"], 1e-9), 2)
            r["same_answers_as_first"] = sum(x == y for x, y in zip(r["answers"], one["answers"])) / len(one["answers"])
    for r in runs.values():
        r.pop("answers", None)
    return runs


if __name__ == "__main__":
    sys.exit(main())
