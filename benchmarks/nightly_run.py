"""The whole nightly run at the real dataset's size, timed step by step (issue 10's 15-minute target).

prepare_data -> train -> evaluate adapter -> find champion -> gate -> merge -> evaluate merged -> gate
-> publish, on the `qwen2-vl-7b-nutrition` preset with only model.base, data.dataset and
publish.target/endpoint overridden (plus gate.threshold, below), through vlmdet.pipeline.run.run, the
sequence flows/retrain.py runs: prepare, gate and publish in this process, train / evaluate / merge
each as the same `python -m vlmdet.pipeline.child` child process the flow's tasks start (vlmdet.run.runner.run_step).

What stands in for what a GPU machine cannot download:
- the base: the random-weight Qwen2-VL-7B-Instruct built from the published config
  (vlmdet.modeling.published; ~16.6 GB, built once in a child process, reused from --base);
- the data: synthetic nutrition-table photos (vlmdet.data.synth, rendered at about the model's pixel
  budget, scaled up to the photo's size, sensor noise, JPEG) with the real photos' size mix: 1,083
  training and 124 held-out images whose (width, height) are drawn from REAL_PHOTO_SIZES, written as
  a `coco:` dataset with the Hub dataset's split names, so prepare() splits it as it splits
  openfoodfacts/nutrition-table-detection (its val split becomes our test split, 10% of train
  becomes val). Generating them runs on every core and is timed apart from the run;
- the Hub: tests/hub_server.py (the Hub's HTTP API, in memory) started as a child process on
  loopback; the publication is one real huggingface_hub commit of the merged model to it.

A random model scores mAP 0, so the gate would close and merge + publish would never run: by
default gate.threshold is set to 0 (printed and recorded); --keep-gate leaves the preset's gate.

No Prefect: Prefect and its dependencies do not fit the 64 MiB of wheels that can travel to the GPU
machine beside bitsandbytes, so this script runs the flow's own pipeline (vlmdet.pipeline.run.run: the
same configuration resolution, steps, order and branches, the champion's lookup and comparison
included) with plain calls (vlmdet.pipeline.step.Plain) instead of Prefect tasks: no caching, retries
or artifacts, which a nightly run with new data does not use either. The run folder is emptied
first so nothing resumes or is reused.

Peak GPU memory per step: the child reports torch's peak allocated and reserved memory at exit
through a sitecustomize.py this script puts first on the child's PYTHONPATH (the library is not
changed for it); CPU runs report none.

On one H100/H200, in the background (one GPU command may run 10 minutes; the run takes longer):

    mkdir -p runs/nightly-out && setsid nohup python benchmarks/nightly_run.py --out runs/nightly-out \
        > runs/nightly-out/log 2>&1 < /dev/null &
    cat runs/nightly-out/progress.json; tail -3 runs/nightly-out/log      # later calls: follow it
    cp runs/nightly-out/nightly_run.* runs/nightly-out/log $OUT/            # when state is done/failed

Expected on main as of 2026-11-27 (train.profile not yet there): about 30 minutes of steps, ~25 of
them training (~975 training images after the 10% val hold-out x 3 epochs = 183 steps of 16 at the
2.25 samples/s measured on an H200, plus decoding the full-size photos on the main process), plus
~2-3 minutes of setup outside the total (random 7B build, data generation). A random model never
stops before eval.max_new_tokens (128) where a trained one answers in ~25 tokens, so both
evaluations are pessimistic. `--epochs 1` gives a third of the training (~15 minutes in all), and
the results then add the total extrapolated to the preset's 3 epochs.
Scaled down on a CPU (every code path in a few minutes, the micro model):

    python benchmarks/nightly_run.py --tiny --train-images 6 --test-images 2 --epochs 1 --out /tmp/n

Writes to --out: nightly_run.json (per-step seconds, share, peak memory, train samples/s, eval
ms/image, counts, versions, card, date), nightly_run.md (the table) and progress.json (after every
step; state running/done/failed). Models, data and the run folder live under --workdir.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (width, height) as displayed (EXIF orientation applied; none of them carries a rotating tag) of the
# 21 JPEGs in the project's /work/shared/data/real-photos (Open Food Facts nutrition photos), measured
# 2026-11-27 with Pillow. Hard-coded: that folder does not travel to the GPU machine. Mean 2.95 MP,
# 0.229 bytes a pixel (REAL_BYTES_PER_PIXEL), the largest 2309x4041.
REAL_PHOTO_SIZES = [
    (1200, 1600), (2448, 3264), (2448, 3264), (1500, 2000), (2000, 2666), (201, 528), (741, 1000),
    (741, 1000), (772, 796), (680, 540), (2097, 3347), (1000, 750), (1394, 644), (2000, 2666),
    (2498, 2482), (820, 860), (2309, 4041), (750, 1000), (750, 1000), (1000, 666), (750, 1000),
]
REAL_BYTES_PER_PIXEL = 0.229
RENDER_PIXELS = 1024 * 768  # about the preset's max_pixels: the model never sees more detail than this
NOISE = 10  # +-10 levels of uniform sensor noise: JPEG sizes near the real photos' bytes a pixel
DATA_VERSION = 1  # bump when the renderer changes: cached datasets are then regenerated

PRESET = "qwen2-vl-7b-nutrition"
HUB_REPO = "nightly-bench/qwen2-vl-7b-nutrition"
HUB_TOKEN = "nightly-bench-token"  # the local server takes any token; never a real one (HF_TOKEN is not read)
PEAK_ENV = "VLMDET_BENCH_PEAK"
PEAK_HOOK = '''"""Written by benchmarks/nightly_run.py: the step child's peak GPU memory, reported at exit."""
import atexit, json, os, sys

def _report():
    rec = {"pid": os.getpid(), "rank": int(os.environ.get("RANK", 0)), "cuda": False}
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():  # not on a CPU, nor in the accelerate launcher
            rec.update(cuda=True, device=torch.cuda.get_device_name(),
                       peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                       peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))
    except Exception as err:  # never let the report break the step
        rec["error"] = repr(err)
    with open(os.environ["%s"] + ".%%d.json" %% os.getpid(), "w") as fh:
        json.dump(rec, fh)

if os.environ.get("%s"):
    atexit.register(_report)
''' % (PEAK_ENV, PEAK_ENV)


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- data ------------------------------------------------------------------------------------------------------
def sample_sizes(n: int, seed: int, salt: str) -> list[tuple[int, int]]:
    import random

    rng = random.Random(f"nightly-sizes:{seed}:{salt}")
    return [rng.choice(REAL_PHOTO_SIZES) for _ in range(n)]


def render_photo(job: tuple) -> dict[str, Any]:
    """One synthetic photo at a real photo's size; runs in a worker process."""
    import numpy as np
    from PIL import Image

    from vlmdet.data.synth import render

    index, (w, h), split, seed, folder = job
    scale = min(1.0, math.sqrt(RENDER_PIXELS / (w * h)))
    sw, sh = max(64, round(w * scale)), max(64, round(h * scale))
    im, boxes = render(seed, index, (sw, sh))
    if (sw, sh) != (w, h):
        im = im.resize((w, h), Image.Resampling.BILINEAR)
    rng = np.random.default_rng([seed, index, 7])
    arr = np.asarray(im, dtype=np.int16)
    arr += rng.integers(-NOISE, NOISE + 1, size=arr.shape, dtype=np.int16)  # photo-like entropy for the JPEG
    name = f"images/{split}/{index:06d}.jpg"
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(
        Path(folder) / name, "JPEG", quality=int(rng.integers(80, 93)))
    sx, sy = w / sw, h / sh
    xywh = [[round(x1 * sx, 2), round(y1 * sy, 2), round((x2 - x1) * sx, 2), round((y2 - y1) * sy, 2)]
            for x1, y1, x2, y2 in boxes]
    return {"file_name": name, "width": w, "height": h, "split": split, "boxes": xywh,
            "bytes": (Path(folder) / name).stat().st_size}


def make_dataset(folder: Path, n_train: int, n_test: int, seed: int, workers: int) -> tuple[Path, dict[str, Any]]:
    """A COCO dataset of n_train + n_test photos (reused when the same one exists); its annotations.json and stats."""
    ann = folder / "annotations.json"
    want = {"version": DATA_VERSION, "train": n_train, "test": n_test, "seed": seed}
    if ann.is_file():
        info = json.loads(ann.read_text()).get("info", {})
        if info.get("params") == want:
            return ann, dict(info["stats"], reused=True)
    shutil.rmtree(folder, ignore_errors=True)
    for split in ("train", "val"):
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
    # the Hub dataset's own split names: prepare() makes its "val" our test split, as for the real data
    jobs = [(i, wh, "train", seed, str(folder)) for i, wh in enumerate(sample_sizes(n_train, seed, "train"))]
    jobs += [(n_train + i, wh, "val", seed, str(folder)) for i, wh in enumerate(sample_sizes(n_test, seed, "test"))]
    t = time.perf_counter()
    with Pool(max(1, min(workers, len(jobs)))) as pool:
        rows = pool.map(render_photo, jobs, chunksize=max(1, len(jobs) // (8 * max(1, workers))))
    seconds = time.perf_counter() - t
    images, annotations = [], []
    for image_id, row in enumerate(rows, start=1):
        images.append({"id": image_id, "file_name": row["file_name"], "width": row["width"], "height": row["height"],
                       "split": row["split"]})
        for box in row["boxes"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "bbox": box,
                                "area": round(box[2] * box[3], 2), "iscrowd": 0})
    pixels = sum(r["width"] * r["height"] for r in rows)
    stats = {"images": len(rows), "seconds": round(seconds, 1), "workers": workers,
             "mean_megapixels": round(pixels / len(rows) / 1e6, 2),
             "largest": max((r["width"], r["height"]) for r in rows),
             "gigabytes": round(sum(r["bytes"] for r in rows) / 1e9, 2),
             "bytes_per_pixel": round(sum(r["bytes"] for r in rows) / pixels, 3),
             "real_bytes_per_pixel": REAL_BYTES_PER_PIXEL}
    coco = {"info": {"description": "nightly_run.py: synthetic photos at the real photos' sizes", "params": want,
                     "stats": stats},
            "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "nutrition-table", "supercategory": "none"}]}
    tmp = ann.with_name(".annotations.json.tmp")
    tmp.write_text(json.dumps(coco))
    tmp.replace(ann)  # written last: a folder without it is an interrupted generation
    return ann, dict(stats, reused=False)


# --- machine ---------------------------------------------------------------------------------------------------
def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "huggingface_hub",
                 "datasets", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def card() -> str:
    """The GPU as nvidia-smi names it (no CUDA context in this process), else "cpu"."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        return "; ".join(lines) if out.returncode == 0 and lines else "cpu"
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"


def build_base(path: Path) -> float | None:
    """The random-weight 7B at `path`, built in a child (this process keeps no CUDA context); seconds, None if reused."""
    if (path / "config.json").is_file():
        return None
    t = time.perf_counter()
    code = ("import sys; from vlmdet.modeling.published import build_random_qwen2_vl_7b; "
            "build_random_qwen2_vl_7b(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=child_env(), cwd=REPO)
    return round(time.perf_counter() - t, 1)


def child_env(**extra: str) -> dict[str, str]:
    paths = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


class LocalHub:
    """tests/hub_server.py as a child process on loopback (what `python tests/hub_server.py` starts)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "hub_server.py")], stdout=subprocess.PIPE,
                                     text=True, env=child_env(), cwd=REPO)
        self.url = (self.proc.stdout.readline() if self.proc.stdout else "").strip()
        if not self.url.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"tests/hub_server.py did not start (said {self.url!r})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- the run ---------------------------------------------------------------------------------------------------
class Recorder:
    """Per-step times, written to progress.json after every step so a background run can be followed."""

    def __init__(self, out: Path, meta: dict[str, Any]):
        self.out, self.meta, self.steps, self.current = out, meta, [], None
        self.started = time.perf_counter()
        self.write("running")

    def run(self, name: str, fn: Callable[[], Any], **info: Any) -> Any:
        self.current = name
        self.write("running")
        print(f"[nightly] {now()} {name} ...", flush=True)
        t = time.perf_counter()
        result = fn()
        row = {"step": name, "seconds": round(time.perf_counter() - t, 3), **info}
        self.steps.append(row)
        self.current = None
        print(f"[nightly] {now()} {name}: {row['seconds']:.1f} s", flush=True)
        self.write("running")
        return result

    def add(self, name: str, **info: Any) -> None:
        next(r for r in self.steps if r["step"] == name).update(info)

    @property
    def total(self) -> float:
        return round(sum(r["seconds"] for r in self.steps), 3)

    def summary(self, state: str) -> dict[str, Any]:
        total = self.total
        steps = [dict(r, share=round(r["seconds"] / total, 4) if total else None) for r in self.steps]
        return {**self.meta, "state": state, "current_step": self.current, "updated": now(), "steps": steps,
                "total_seconds": total, "wall_seconds": round(time.perf_counter() - self.started, 2)}

    def write(self, state: str) -> dict[str, Any]:
        from vlmdet.run.records import write_json

        data = self.summary(state)
        write_json(self.out / "progress.json", data)
        return data


def peak_of(step_dir: Path) -> dict[str, Any]:
    """What the step's processes reported at exit: how many, and the largest peak among those on a GPU."""
    reports = [json.loads(p.read_text()) for p in sorted(step_dir.glob("peak.json.*.json"))]
    out: dict[str, Any] = {"reports": len(reports)}
    gpu = [r for r in reports if r.get("cuda")]
    if gpu:
        top = max(gpu, key=lambda r: r["peak_allocated_gib"])
        out.update(peak_allocated_gib=top["peak_allocated_gib"], peak_reserved_gib=top["peak_reserved_gib"],
                   device=top["device"], gpu_processes=len(gpu))
    return out


def timeline_of(step_dir: Path) -> dict[str, Any]:
    """The step child's phases (vlmdet.run.timeline), as the row's `timeline`; nothing for an in-process step."""
    from vlmdet.run import timeline

    path = Path(step_dir) / timeline.FILE
    return {"timeline": json.loads(path.read_text())} if path.is_file() else {}


def timelines(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """A bar a step for the picture: a child's phases, or one "in process" segment for a step run in the
    driver's process (prepare_data, the gates, publish)."""
    bars = []
    for r in summary["steps"]:
        t = r.get("timeline") or {"wall_s": r["seconds"], "accounted_s": r["seconds"],
                                  "phases": [{"name": "in process", "s": r["seconds"], "bytes": None}]}
        bars.append(dict(t, label=r["step"], wall_s=r["seconds"]))  # the bar's length: the step as the driver saw it
    return bars


def bench_driver(rec: Recorder, hook: Path):
    """vlmdet.pipeline.step.Plain timed: each step a row of `rec` (named by the step, and by the model for
    evaluate and gate), each step child with the peak-memory hook; rows get what each step's record says."""
    from huggingface_hub import HfApi

    from vlmdet.pipeline.step import Plain
    from vlmdet.run.runner import plan_processes

    def size_gb(path: str) -> float:
        return round(sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e9, 2)

    def prepare_data(data, a, row, step_dir):
        driver.out["counts"] = data.counts
        rec.add(row, images=sum(c["images"] for c in data.counts.values()), quarantined=len(data.quarantine))

    def train(adapter, a, row, step_dir):
        config, dataset = a["config"], a["dataset"]
        train_out = step_dir.parent
        history = json.loads((train_out / "log_history.json").read_text()) \
            if (train_out / "log_history.json").is_file() else []
        final = next((h for h in reversed(history) if "train_runtime" in h), {})
        t, processes = config.train, plan_processes(config.train.num_processes)[0]
        rec.add(row, **peak_of(step_dir), **timeline_of(step_dir), global_step=adapter.global_step,
                train_images=dataset.counts["train"]["images"], epochs=t.epochs, max_steps=t.max_steps,
                processes=processes, effective_batch=t.per_device_batch * t.grad_accum * processes,
                trainer_runtime_s=final.get("train_runtime"), samples_per_s=final.get("train_samples_per_second"),
                loss_first=adapter.losses[0] if adapter.losses else None,
                loss_last=adapter.losses[-1] if adapter.losses else None, profile=t.profile)
        driver.out["train_config"] = config.to_dict()

    def evaluate(report, a, row, step_dir):
        seconds = next(r for r in rec.steps if r["step"] == row)["seconds"]
        rec.add(row, **peak_of(step_dir), **timeline_of(step_dir), images=report.num_images,
                ms_per_image=round(1000 * seconds / max(1, report.num_images), 1),
                processes=plan_processes(a["config"].eval.num_processes, setting="eval.num_processes")[0],
                map=report.map, map50=report.map50, parse_failures=report.parse_failures)

    def find_champion(champion, a, row, step_dir):
        rec.add(row, found=champion.source if champion else None)

    def gate(decision, a, row, step_dir):
        rec.add(row, passed=decision.passed, reason=decision.reason)
        print(f"[nightly] {row}: {'passed' if decision.passed else 'closed'}: {decision.reason}", flush=True)

    def merge(merged, a, row, step_dir):
        rec.add(row, **peak_of(step_dir), **timeline_of(step_dir), merged_gb=size_gb(merged.path),
                max_abs_logit_diff=merged.max_abs_logit_diff)

    def publish(pub, a, row, step_dir):
        commits = HfApi(endpoint=a["config"].publish.endpoint, token=a["token"]).list_repo_commits(pub.target)
        landed = any(c.commit_id == pub.revision for c in commits)
        rec.add(row, target=f"hub:{pub.target}", revision=pub.revision, files=len(pub.files),
                uploaded_gb=size_gb(a["merged"].path), commit_found=landed)
        driver.out.update(published=pub.to_dict(), commit_found=landed)

    notes = {"prepare_data": prepare_data, "train": train, "evaluate": evaluate, "find-champion": find_champion,
             "gate": gate, "merge": merge, "publish": publish}

    class BenchDriver(Plain):
        out: dict[str, Any] = {"published": None}  # what the steps produced, for the results file

        @staticmethod
        def read_secret(name: str) -> str | None:
            return HUB_TOKEN  # the local Hub server's token, whatever the preset's secret is called

        def env(self, step_dir: Path | None) -> dict[str, str]:
            for old in Path(step_dir).glob("peak.json.*.json"):
                old.unlink()
            paths = [str(hook), str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            # the children load local folders only; nothing may wait on a network
            return {"PYTHONPATH": os.pathsep.join(paths), PEAK_ENV: str(Path(step_dir) / "peak.json"),
                    "HF_HUB_OFFLINE": "1"}

        def __call__(self, step, *args, **kwargs):
            a = step.arguments(*args, **kwargs)
            row = step.name.replace("-", " ") + (f" {a['name']}" if "name" in a else "")
            record, cached = rec.run(row, lambda: super(BenchDriver, self).__call__(step, *args, **kwargs))
            if step.name in notes:
                notes[step.name](record, a, row, step.step_dir(a))  # where the step's child wrote, if it has one
            return record, cached

    driver = BenchDriver()
    return driver


def nightly(resolved, workdir: Path, rec: Recorder) -> dict[str, Any]:
    """vlmdet.pipeline.run.run (the flow's steps, order and branches, champion comparison included) with the
    steps timed; returns what they produced (records as dicts)."""
    from vlmdet.pipeline import run as pipeline

    hook = workdir.parent / "peak-hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(PEAK_HOOK)
    driver = bench_driver(rec, hook)
    run = pipeline.run(resolved, pipeline.RunLayout.at(workdir), driver)
    # the gate as the run decided it (summary.json's `gate`: threshold, champion revision, the paired
    # bootstrap against the champion when there was one) and the champion's numbers on today's images
    return dict(driver.out, gate=run.gate, champion_metrics=run.champion_metrics)


def table(summary: dict[str, Any]) -> str:
    rows = ["| step | seconds | share | peak GiB (allocated) | notes |", "| --- | ---: | ---: | ---: | --- |"]
    for r in summary["steps"]:
        notes = []
        if r.get("samples_per_s") is not None:
            notes.append(f"{r['samples_per_s']:.2f} samples/s over {r['global_step']} steps "
                         f"(trainer {r['trainer_runtime_s']:.0f} s)")
        if r.get("ms_per_image") is not None:
            notes.append(f"{r['ms_per_image']:.0f} ms/image incl. loading, {r['images']} images, mAP50 {r['map50']:.3f}")
        if "passed" in r:
            notes.append("passed" if r["passed"] else "closed")
        if r.get("revision"):
            notes.append(f"{r['uploaded_gb']} GB, commit {r['revision'][:10]} found: {r['commit_found']}")
        if r.get("images") is not None and r["step"] == "prepare_data":
            notes.append(f"{r['images']} images, {r['quarantined']} quarantined")
        peak = r.get("peak_allocated_gib")
        rows.append(f"| {r['step']} | {r['seconds']:.1f} | {100 * (r['share'] or 0):.1f}% | "
                    f"{'' if peak is None else f'{peak:.2f}'} | {'; '.join(notes)} |")
    rows.append(f"| **total** | **{summary['total_seconds']:.1f}** ({summary['total_seconds'] / 60:.1f} min) | 100% | | |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="results folder (a few small files)")
    p.add_argument("--workdir", type=Path, default=Path("runs/nightly-run"),
                   help="base model, generated data and the run folder (tens of GB for the 7B)")
    p.add_argument("--base", help="model.base: a folder (the random 7B is built there unless it holds a model), or "
                                  "a tiny:/asset: spec (default: WORKDIR/random-qwen2-vl-7b; --tiny: tiny:qwen2_vl)")
    p.add_argument("--train-images", type=int, default=1083, help="training-split images (real dataset: 1,083)")
    p.add_argument("--test-images", type=int, default=124, help="held-out images (real dataset: 124)")
    p.add_argument("--epochs", type=float, help="train.epochs (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes generating the data "
                   "(default: the CPUs this process may run on)")
    p.add_argument("--keep-gate", action="store_true",
                   help="keep the preset's gate threshold (a random model then stops at the gate)")
    p.add_argument("--tiny", action="store_true",
                   help="CPU check of every code path: the micro model, quantization none, small pixel budget")
    p.add_argument("--hub-endpoint", help="publish to this Hub-API server instead of starting tests/hub_server.py")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other preset override, e.g. --set train.max_steps=20 (recorded in the results)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out, workdir = args.out.resolve(), args.workdir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_DISABLE_XET"] = "1"  # the local server speaks classic LFS only, as tests/hub_server.py says
    os.environ.pop("HF_HUB_OFFLINE", None)  # this process publishes; the step children get HF_HUB_OFFLINE=1
    from vlmdet.pipeline import run as pipeline
    from vlmdet.config.settings import load_preset

    data_dir = workdir / "data" / f"photos-{args.train_images}-{args.test_images}-seed{args.seed}"
    base = args.base or ("tiny:qwen2_vl" if args.tiny else str(workdir / "random-qwen2-vl-7b"))
    overrides: dict[str, Any] = {"model.base": base, "data.dataset": f"coco:{data_dir / 'annotations.json'}",
                                 "publish.target": f"hub:{HUB_REPO}", "publish.endpoint": "http://127.0.0.1:0"}
    if not args.keep_gate:
        overrides["gate.threshold"] = 0.0
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    if args.tiny:  # the micro model on a CPU: fp32, a small pixel budget, short answers
        overrides.update({"model.quantization": "none", "model.min_pixels": 64 * 28 * 28,
                          "model.max_pixels": 256 * 28 * 28, "eval.max_new_tokens": 32})
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: use KEY=VALUE, e.g. --set train.max_steps=20")
        overrides[key] = value
    preset = load_preset(PRESET)  # read once: checked with the overrides now, its epochs for the extrapolation
    preset.override(overrides)  # a bad setting fails here, before minutes of setup (data and base come later)

    meta: dict[str, Any] = {"preset": PRESET, "overrides": {k: v for k, v in overrides.items()
                                                            if k != "publish.endpoint"},
                            "gate_forced": None if args.keep_gate else
                            "gate.threshold forced to 0 so that merge and publish run on a random-weight model "
                            "(mAP 0): a real run publishes only above the preset's threshold",
                            "date": now(), "card": card(), "versions": versions(), "argv": sys.argv[1:] if argv is None
                            else argv, "setup": {}}
    print(f"[nightly] {now()} {meta['card']}; preset {PRESET}; {meta['gate_forced'] or 'gate as in the preset'}",
          flush=True)
    rec = Recorder(out, meta)  # progress.json from the first second: setup can take minutes too
    hub = None
    try:
        rec.current = "setup: data generation"
        rec.write("running")
        t = time.perf_counter()
        _, gen = make_dataset(data_dir, args.train_images, args.test_images, args.seed, args.workers)
        meta["setup"]["data"] = dict(gen, wall_s=round(time.perf_counter() - t, 1))
        how = "reused" if gen["reused"] else f"generated in {gen['seconds']} s on {gen['workers']} processes"
        print(f"[nightly] data: {gen['images']} photos, {gen['mean_megapixels']} MP mean, {how}", flush=True)
        if not args.tiny and ":" not in base:  # a folder: the random 7B is built there unless it holds a model
            rec.current = "setup: base model"
            rec.write("running")
            meta["setup"]["base_build_s"] = build_base(Path(base).resolve())
            overrides["model.base"] = str(Path(base).resolve())
        if args.hub_endpoint:
            hub_url = args.hub_endpoint
        else:
            hub = LocalHub()
            hub_url = hub.url
        overrides["publish.endpoint"] = hub_url
        resolved = pipeline.resolve(PRESET, overrides)  # checked, check-run guard, train.profile: as the flow
        config = resolved.config
        run_dir = workdir / "run"
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing resumes or is reused: a night with new data
        run_dir.mkdir(parents=True)
        rec.started = time.perf_counter()  # wall_seconds: the run itself, setup excluded
        result = nightly(resolved, run_dir, rec)
        summary = rec.summary("done")
        summary.update(result, extrapolated=extrapolate(summary, preset.train, config.train))
        finish(out, summary)
        return summary
    except BaseException as err:
        summary = rec.summary("failed")
        summary["error"] = f"{type(err).__name__}: {err}"
        summary["traceback"] = traceback.format_exc()
        finish(out, summary)
        raise
    finally:
        if hub is not None:
            hub.stop()


def extrapolate(summary: dict[str, Any], preset_train, train) -> dict[str, Any] | None:
    """With --epochs below the preset's: the total had training run the preset's epochs (the trainer's
    own time scaled by the epoch ratio; loading and every other step as measured)."""
    row = next((r for r in summary["steps"] if r["step"] == "train"), None)
    if row is None or not row.get("trainer_runtime_s") or train.max_steps > 0 or train.epochs == preset_train.epochs:
        return None
    extra = row["trainer_runtime_s"] * (preset_train.epochs / train.epochs - 1)
    return {"epochs": preset_train.epochs, "measured_epochs": train.epochs,
            "train_seconds": round(row["seconds"] + extra, 1), "total_seconds": round(summary["total_seconds"] + extra, 1)}


def finish(out: Path, summary: dict[str, Any]) -> None:
    from vlmdet.run.records import write_json

    text = table(summary)
    failed = summary["state"] == "failed"
    head = (f"Nightly run ({summary['preset']}), {summary['card']}, {summary['date']}"
            + (f" -- FAILED in step {summary['current_step']}: {summary.get('error')}" if failed else ""))
    notes = [summary["gate_forced"]] if summary.get("gate_forced") else []
    data = summary["setup"].get("data", {})
    notes.append(f"not in the total: data generation {data.get('seconds')} s ({'reused' if data.get('reused') else 'new'}), "
                 f"base build {summary['setup'].get('base_build_s') or 'none (reused or not needed)'} s")
    if summary.get("extrapolated"):
        x = summary["extrapolated"]
        notes.append(f"trained {x['measured_epochs']:g} of the preset's {x['epochs']:g} epochs: at {x['epochs']:g} the "
                     f"train step would take ~{x['train_seconds']:.0f} s and the total ~{x['total_seconds']:.0f} s "
                     f"({x['total_seconds'] / 60:.1f} min), the trainer's time scaled by the epochs")
    from vlmdet.run import timeline

    bars = timelines(summary)
    picture = timeline.draw(bars, out / "nightly_run_timeline.png", title=head.split(" -- ")[0])
    where = ["", "Where each step's seconds went (the step children's phases; `vlmdet.run.timeline`):", "",
             f"![timeline]({Path(picture).name})" if picture else "", "", timeline.markdown(bars), ""]
    md = "\n".join([head, "", text, ""] + [f"- {n}" for n in notes] + where) + "\n"
    (out / "nightly_run.md").write_text(md)
    write_json(out / "nightly_run.json", summary)
    write_json(out / "progress.json", summary)
    print("\n" + md, flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001 - already recorded in progress.json and nightly_run.json
        traceback.print_exc()
        sys.exit(1)
