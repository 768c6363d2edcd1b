"""Issue 10's benchmark: the original recipe (plain TRL) and vlmdet's profiles side by side, in one
process on one card, then vlmdet's detection path before and after the evaluation levers.

    python benchmarks/bench.py                 # GPU: random-weight Qwen2-VL-7B, < 8 minutes on an H100
    python benchmarks/bench.py --tiny          # CPU: a tiny model through every code path (~3 minutes)

Every training row: the same synthetic 1024x768 images (the recipe's own generator), the same seed,
effective batch 16, `--steps` measured optimizer steps after one warm-up step (median reported).
The random 7B is built from the published config once, saved, and loaded by every row. Results are
printed row by row and rewritten to $OUT/results.json after each row, so a timeout still returns
what was measured. Files under $OUT (or --out): results.json, table.md, loss_curves.png (.svg
without matplotlib), profile_<row>.txt (one step under torch.profiler).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# progress bars would fill the GPU run's 12,000-character output tail; the rows print their own lines
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the DataLoader workers fork after the tokenizer ran
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # vlmdet from this checkout
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

PRESET = "qwen2-vl-7b-nutrition"  # the nightly preset: the profiles apply over it
SEED_PRESET = "seed-recipe"  # the original design's settings, as a vlmdet preset
T0 = time.time()
# Rough seconds a row takes on an H100 (load + steps); a row that would end past --budget-s is skipped.
ESTIMATE_S = {"recipe": 110, "qlora": 70, "large": 50, "eval": 200, "nightly-preset": 90, "qlora-b8-gc": 60,
              "qlora-b2-half": 70, "qlora-b1": 75, "large-b8": 50, "seed-settings": 100, "seed-settings-no-tower-fix": 110}
# a row not listed takes its profile's estimate (large-cast: large's)
# vlmdet rows: (profile, extra settings, what the row shows)
VLMDET_ROWS = {
    "qlora": ("qlora", {}, "the default profile"),
    "large": ("large", {}, "the 80 GB profile"),
    # the same-learning reference of both: the nightly preset exactly as written (nf4, checkpointing, batch 2 x 8)
    "nightly-preset": ("preset", {}, "the nightly preset as written, no profile"),
    # qlora alternatives: which split of memory and speed meets 2x within 12 GiB
    "qlora-b8-gc": ("qlora", {"train.per_device_batch": 8, "train.grad_accum": 2}, "batch 8, checkpointing"),
    "large-b8": ("large", {"train.per_device_batch": 8, "train.grad_accum": 2}, "large at batch 8"),
    # large with PEFT's cast of every LoRA input to fp32 left on (speed.adapter_inputs_uncast off); Liger off in
    # all three, as when that lever was first measured (compare with large-unfused)
    "large-cast": ("large", {"train.liger_kernels": False},
                   "large, LoRA inputs cast to the fp32 adapters' dtype (lever off), Liger off"),
    # the noise that large vs large-cast is judged against: large-cast with other dropout masks only
    # (the CUDA generator reseeded when training starts; data order and LoRA init come from the CPU's)
    "large-cast-redraw": ("large", {"train.liger_kernels": False},
                          "large-cast with the GPU's dropout masks drawn from another seed"),
    # Liger Kernel's fused RMSNorm / SwiGLU / LayerNorm (train.liger_kernels) on and off, whatever the profile
    # says, and the dropout-redraw noise its curve is judged against
    "large-liger": ("large", {"train.liger_kernels": True}, "large with Liger's fused kernels"),
    "large-unfused": ("large", {"train.liger_kernels": False}, "large without Liger's kernels"),
    "large-liger-redraw": ("large", {"train.liger_kernels": True}, "large-liger, other dropout masks"),
    "qlora-liger": ("qlora", {"train.liger_kernels": True}, "qlora with Liger's fused kernels"),
    "qlora-unfused": ("qlora", {"train.liger_kernels": False}, "qlora without Liger's kernels"),
    "qlora-liger-redraw": ("qlora", {"train.liger_kernels": True}, "qlora-liger, other dropout masks"),
    "qlora-b2-half": ("qlora", {"train.per_device_batch": 2, "train.grad_accum": 8, "train.checkpoint_every": 2},
                      "batch 2, checkpointing every 2nd layer"),
    "qlora-b1": ("qlora", {"train.per_device_batch": 1, "train.grad_accum": 16, "train.gradient_checkpointing": False},
                 "batch 1, no checkpointing"),
    # the seed-recipe preset through vlmdet's train(): the recipe's settings, with and without the tower fix
    "seed-settings": ("preset", {}, "seed-recipe preset through vlmdet train() (tower fix on)"),
    "seed-settings-no-tower-fix": ("preset", {}, "seed-recipe preset, frozen vision tower hook left in (lever off)"),
}
DEFAULT_ROWS = ("recipe,qlora,large,eval,nightly-preset,qlora-b8-gc,large-b8,seed-settings,seed-settings-no-tower-fix,"
                "qlora-b2-half,qlora-b1")


def say(msg: str) -> None:
    print(f"[bench {time.time() - T0:6.0f}s] {msg}", flush=True)


def gib(n: float) -> float:
    return round(n / 2**30, 2)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class Results:
    def __init__(self, out: Path, meta: dict):
        self.out, self.data = out, {"meta": meta, "rows": {}, "eval": {}}
        out.mkdir(parents=True, exist_ok=True)

    def row(self, name: str, rec: dict) -> None:
        self.data["rows"][name] = rec
        self.save()

    def save(self) -> None:
        self.data["meta"]["elapsed_s"] = round(time.time() - T0, 1)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.out / "results.json")


# --- the shared base model and data ------------------------------------------------------------------------------

def build_base(root: Path, tiny: bool, dev: str) -> tuple[str, float]:
    """The recipe's random model (published config; tiny config with --tiny) and processor, saved once."""
    from seed_recipe_train import make_processor, model_config
    from transformers import Qwen2VLForConditionalGeneration

    path = root / ("q2vl-random-tiny" if tiny else "q2vl-random-7b")
    t = time.time()
    if not (path / "config.json").is_file():
        proc = make_processor(max_pixels=1024 * 28 * 28)
        cfg = model_config(proc, tiny)
        with torch.device(dev):  # random init on the GPU: seconds instead of minutes
            model = Qwen2VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
        model.generation_config.eos_token_id = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
        model.generation_config.pad_token_id = proc.tokenizer.pad_token_id
        model.save_pretrained(path)
        proc.save_pretrained(path)
        del model
        free_memory()
    return str(path), round(time.time() - t, 1)


def write_dataset(root: Path, n: int, size: tuple[int, int]):
    """The recipe's synthetic images (seed 0, the same ones its row trains on) as a COCO split for train()."""
    from seed_recipe_train import synth

    from vlmdet.run.records import DatasetRef

    folder = root / f"data-{n}-{size[0]}x{size[1]}"
    ann = folder / "train.json"
    if not ann.is_file():
        (folder / "images").mkdir(parents=True, exist_ok=True)
        coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "nutrition-table"}]}
        for i, row in enumerate(synth(n, *size)):
            img = row["images"][0]
            img.save(folder / "images" / f"{i:04d}.png")
            w, h = img.size
            answer = row["messages"][1]["content"][0]["text"]
            x1, y1, x2, y2 = (int(v) for v in re.findall(r"\d+", answer.split("<|box_start|>")[1]))
            box = [x1 / 1000 * w, y1 / 1000 * h, x2 / 1000 * w, y2 / 1000 * h]  # 0-1000 back to pixels
            coco["images"].append({"id": i, "file_name": f"images/{i:04d}.png", "width": w, "height": h})
            coco["annotations"].append({"id": i, "image_id": i, "category_id": 1,
                                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
        ann.write_text(json.dumps(coco))
    return DatasetRef(fingerprint="bench", root=str(folder), splits={"train": str(ann), "test": str(ann)}, counts={})


# --- timing helpers -----------------------------------------------------------------------------------------------

def step_timer(dev: str, times: list[float]):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if dev == "cuda":
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    return StepTimer()


def step_profiler(at_step: int, path: Path, dev: str):
    """torch.profiler over optimizer step `at_step` (1-based): where one step's time goes."""
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step + 1 == at_step:
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
                try:
                    self.prof = torch.profiler.profile(activities=acts)
                    self.prof.__enter__()
                except Exception as err:  # a profiler that cannot start must not cost the row
                    say(f"profiler did not start: {err}")
                    self.prof = None

        def on_step_end(self, args, state, control, **kw):
            if self.prof is None:
                return
            try:
                self.prof.__exit__(None, None, None)
                key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
                table = self.prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)
                path.write_text(f"optimizer step {at_step}, 16 samples\n{table}\n")
            except Exception as err:
                say(f"profiler table failed: {err}")
            self.prof = None

    return Profile()


def dropout_redraw():
    """Reseed the CUDA generator as training starts: other dropout masks, the same data and LoRA init."""
    from transformers import TrainerCallback

    class Redraw(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.manual_seed_all(args.seed + 1)

    return Redraw()


def summarise(times: list[float], measured: slice, tokens: int) -> dict:
    kept = times[measured]
    med = statistics.median(kept) if kept else float("nan")
    return {"step_s": [round(t, 3) for t in times], "step_s_median": round(med, 3),
            "samples_per_s": round(16 / med, 2), "tokens_per_s": round(16 * tokens / med), "tokens_per_sample": tokens}


# --- training rows ------------------------------------------------------------------------------------------------

def recipe_row(base: str, steps: int, dev: str, tiny: bool, profile_path: Path | None) -> dict:
    from seed_recipe_train import run_recipe

    cbs = [step_profiler(steps + 2, profile_path, dev)] if profile_path else []
    res = run_recipe(base, steps + (1 if profile_path else 0), dev, tiny=tiny, callbacks=cbs)
    times = [float(t) for t in res.pop("step_s")]
    # run_recipe's own median drops the warm-up step; recompute without the profiled last step too
    res.update(summarise(times, slice(1, steps + 1), res["tokens_per_sample"]))
    res["losses"] = res["losses"][: steps + 1]
    res["peak_alloc_GiB"] = res.pop("train_peak_alloc_GiB", None)
    res["adapter_dtype"] = "torch.bfloat16" if dev == "cuda" else "torch.float32"  # TRL casts LoRA to bf16 for 4-bit
    return res


def vlmdet_config(name: str, base: str, steps: int, dev: str, extra_steps: int):
    from vlmdet.config.settings import load_preset
    from vlmdet.config import profiles

    profile, extra, _ = VLMDET_ROWS[name]
    preset = SEED_PRESET if name.startswith("seed-settings") else PRESET
    cfg = load_preset(preset, {"model.base": base, "train.max_steps": steps + 1 + extra_steps, "train.save_steps": 100000,
                               "train.logging_steps": 1, "train.warmup_steps": 0})
    # all images here have one size: grouping by length has nothing to group and would only reorder the
    # batches, which the loss curves of "same learning" compare step by step
    cfg = profiles.apply(cfg, profile).override({**extra, "train.group_by_length": False})
    if dev != "cuda":  # CPU: no bitsandbytes, no bf16; every other setting of the profile stays
        cfg = cfg.override({"model.quantization": "none", "model.dtype": "auto"})
    return cfg


def vlmdet_row(name: str, base: str, dataset, steps: int, dev: str, root: Path, profile_path: Path | None) -> dict:
    import vlmdet.training.train as train_mod
    from vlmdet.config import profiles
    from vlmdet.training import speed

    extra = 1 if profile_path else 0
    cfg = vlmdet_config(name, base, steps, dev, extra)
    times: list[float] = []
    seen: dict = {}
    original = train_mod.build_trainer

    def spy(*args, **kwargs):
        trainer, processor, b = original(*args, **kwargs)
        trainer.add_callback(step_timer(dev, times))
        if profile_path:
            trainer.add_callback(step_profiler(steps + 2, profile_path, dev))
        if name.endswith("-redraw"):
            trainer.add_callback(dropout_redraw())
        if name.endswith("no-tower-fix"):
            trainer.callback_handler.callbacks = [c for c in trainer.callback_handler.callbacks
                                                  if not isinstance(c, speed.FrozenTowersOutOfBackward)]
        seen["tokens"] = int(trainer.data_collator([trainer.train_dataset[i] for i in range(2)])["input_ids"].shape[1])
        seen["model"] = trainer.model
        seen["load_s"] = round(time.time() - t, 1)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()  # as the recipe: training only, after the model is loaded
        return trainer, processor, b

    shutil.rmtree(root / f"run-{name}", ignore_errors=True)  # never resume a previous bench run's checkpoint
    t = time.time()
    train_mod.build_trainer = spy
    uncast = speed.adapter_inputs_uncast
    if "-cast" in name:  # the lever off: PEFT casts each LoRA input to fp32 as before
        speed.adapter_inputs_uncast = lambda model, autocast: uncast(model, autocast=False)
    try:
        adapter = train_mod.train(dataset, cfg, root / f"run-{name}")
    finally:
        train_mod.build_trainer = original
        speed.adapter_inputs_uncast = uncast
    model = seen.pop("model")
    lora = next((p for n, p in model.named_parameters() if "lora_A" in n), None)
    reference = vlmdet_config("seed-settings" if name.startswith("seed-settings") else "nightly-preset", base, steps,
                              dev, extra)
    rec = {"preset": SEED_PRESET if name.startswith("seed-settings") else PRESET, "profile": cfg.train.profile,
           "settings": {k: v for k, (_, v) in profiles.changes(reference, cfg).items() if k != "train.max_steps"},
        "losses": [round(v, 3) for v in adapter.losses[: steps + 1]], "load_s": seen["load_s"],
        "adapter_dtype": str(lora.dtype) if lora is not None else None, "wall_s": round(time.time() - t, 1),
        **summarise(times, slice(1, steps + 1), seen["tokens"])}
    if dev == "cuda":
        rec["peak_alloc_GiB"] = gib(torch.cuda.max_memory_allocated())
        rec["peak_reserved_GiB"] = gib(torch.cuda.max_memory_reserved())
    del model, lora, adapter
    return rec


# --- evaluation ---------------------------------------------------------------------------------------------------

EVAL_ROWS = ("thread", "workers", "generate", "prefill")  # default; also known: before, static


def eval_rows(base: str, n: int, batches: list[int], dev: str, tiny: bool, res: Results, work: Path,
              rows: tuple[str, ...] = EVAL_ROWS, workers: int = 4) -> dict:
    """Detection as evaluate() runs it: JPEG files on disk, decoded and processed batch by batch.

    thread@B   Detector.detect_all: the next batch prepared by one thread (the library's path)
    workers@B  the same with 4 forked DataLoader workers (rejected: benchmarks/rejected_detect.py)
    generate@B every batch's processor tensors made before the clock starts: what the GPU side costs
               (generate + parsing), the floor of any input pipeline
    prefill@B  one forward pass over a batch's prompts, no decoding: the prefill floor of generate
    before@B   the detection methods before the earlier levers (benchmarks/old_detect.py)
    static@B   the KV cache preallocated (rejected: benchmarks/rejected_detect.py)
    compiled@B static cache with the decode steps compiled by transformers (benchmarks/compiled_detect.py):
               the first pass, torch.compile's time included; compiled-again@B the same detector once more
    gpuprep@B  thread@B with the image processor on the model's device (benchmarks/compiled_detect.py)
    """
    from compiled_detect import CompiledDetector, GpuPrepDetector
    from old_detect import OldDetector
    from rejected_detect import RejectedDetector
    from seed_recipe_train import synth

    from vlmdet.config.settings import load_preset
    from vlmdet.data.images import open_image
    from vlmdet.formats import get_format
    from vlmdet.modeling.load import load_for_inference
    from vlmdet.prediction.predict import Detector
    from vlmdet.formats.resize import visual_tokens

    cfg = load_preset(PRESET, {"model.base": base, "eval.max_new_tokens": 24})
    if dev != "cuda":
        cfg = cfg.override({"model.quantization": "none"})
    m = cfg.model
    t = time.time()
    model, processor = load_for_inference(base, m)  # a full model folder: the merged-model path, bf16 on CUDA
    out: dict = {"load_s": round(time.time() - t, 1), "images": n, "max_new_tokens": 24, "workers": workers, "rows": {}}
    res.data["eval"] = out  # filled in place and saved after every row: a timeout keeps what was measured
    fmt = get_format(m.family, m.min_pixels, m.max_pixels)
    args = (processor, fmt, m.prompt, cfg.data.category, 24)
    det = {"thread": Detector(model, *args), "workers": RejectedDetector(model, *args, workers=workers),
           "static": RejectedDetector(model, *args, cache="static", workers=workers), "before": OldDetector(model, *args),
           "compiled": CompiledDetector(model, *args), "gpuprep": GpuPrepDetector(model, *args)}
    det["compiled-again"] = det["compiled"]
    W, H = (1024, 768) if not tiny else (224, 168)
    folder = work / f"eval-jpeg-{W}x{H}-{n}"
    if not (folder / f"im{n - 1:04d}.jpg").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(synth(n, W, H, seed=1)):
            r["images"][0].save(folder / f"im{i:04d}.jpg", quality=90)
    files = [str(folder / f"im{i:04d}.jpg") for i in range(n)]
    items = [(f, lambda f=f: open_image(f)) for f in files]
    sizes = [visual_tokens(W, H, m.family, m.min_pixels, m.max_pixels)] * n
    det["thread"].detect([open_image(files[0]), open_image(files[1])], files[:2])  # warm-up: kernels, cuBLAS handles
    preds = {}

    def timed(label: str, fn, images: int = n) -> None:
        free_memory()
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        preds[label] = fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        rec = {"ms_per_image": round(1000 * wall / images, 1)}
        if dev == "cuda":
            rec["peak_alloc_GiB"] = gib(torch.cuda.max_memory_allocated())
        out["rows"][label] = rec
        res.save()
        say(f"eval {label}: {rec}")

    def compare(label: str, ref: str) -> None:
        a, b = preds[ref], preds[label]
        r = out["rows"][label]
        r["same_answers_as"] = ref
        r["same_answers"] = sum(p.answer == q.answer for p, q in zip(a, b)) / len(a)
        scores = [(x.score, y.score) for p, q in zip(a, b) if len(p.boxes) == len(q.boxes) for x, y in zip(p.boxes, q.boxes)]
        r["boxes_compared"] = len(scores)
        r["max_score_diff"] = max((abs(x - y) for x, y in scores), default=0.0)

    def generate_only(bs: int):
        ready = []
        for k in range(0, n, bs):
            imgs = [open_image(f) for f in files[k:k + bs]]
            ready.append((imgs, files[k:k + bs], det["thread"].inputs(imgs)))
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        got = [p for imgs, fs, inputs in ready for p in det["thread"].detect(imgs, fs, inputs)]
        return got, time.perf_counter() - t

    for bs in batches:
        for row in rows:
            label = f"{row}@{bs}"
            try:
                if row in ("thread", "workers", "static", "compiled", "compiled-again", "gpuprep"):
                    timed(label, lambda: det[row].detect_all(items, n, bs, sizes=sizes))
                elif row == "before":
                    timed(label, lambda: det["before"].detect_all(iter(items), n, bs))
                elif row == "generate":
                    got, secs = generate_only(bs)
                    preds[label] = got
                    out["rows"][label] = {"ms_per_image": round(1000 * secs / n, 1)}
                    say(f"eval {label}: {out['rows'][label]}")
                elif row == "prefill":
                    imgs = [open_image(f) for f in files[:bs]]
                    inputs = det["thread"].inputs(imgs).to(model.device)
                    with torch.no_grad():
                        timed(label, lambda: model(**inputs).logits[:, -1].float().sum().item(), images=bs)
                        if bs == batches[0]:  # where a prefill's time goes: the floor under generate
                            acts = [torch.profiler.ProfilerActivity.CPU] + (
                                [torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
                            with torch.profiler.profile(activities=acts) as prof:
                                model(**inputs).logits[:, -1].float().sum().item()
                            key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
                            (res.out / f"profile_prefill_b{bs}.txt").write_text(
                                f"one prefill, batch {bs}\n" + prof.key_averages().table(
                                    sort_by=key, row_limit=25, max_name_column_width=70) + "\n")
                if label in preds and row != "thread" and f"thread@{bs}" in preds and row != "prefill":
                    compare(label, f"thread@{bs}")
            except Exception as err:  # one row's failure must not cost the others
                traceback.print_exc()
                out["rows"][label] = {"ms_per_image": None, "error": f"{type(err).__name__}: {str(err)[:200]}"}
            res.save()
    del model, det
    return out


# --- report -------------------------------------------------------------------------------------------------------

# (lever on, lever off, the row that differs from one of them in its dropout masks only): a lever learns the
# same when its curve lies no further from the curve without it than a dropout redraw's does
SAME_LEARNING = (("large-liger", "large-unfused", "large-liger-redraw", "Liger kernels, large"),
                 ("qlora-liger", "qlora-unfused", "qlora-liger-redraw", "Liger kernels, qlora"),
                 ("large-unfused", "large-cast", "large-cast-redraw", "LoRA inputs uncast, large"))


def curve_distance(a: list[float], b: list[float]) -> dict:
    """Mean and largest |a - b| over the steps both curves have."""
    d = [abs(x - y) for x, y in zip(a, b)]
    return {"steps": len(d), "mean": round(sum(d) / len(d), 4) if d else None, "max": round(max(d), 4) if d else None}


def same_learning(rows: dict) -> list[dict]:
    out = []
    for on, off, redraw, what in SAME_LEARNING:
        curves = {n: rows.get(n, {}).get("losses") for n in (on, off, redraw)}
        if not all(curves.values()):
            continue
        twin = on if redraw.startswith(on) else off  # the row the redraw repeats with other masks
        lever, noise = curve_distance(curves[on], curves[off]), curve_distance(curves[twin], curves[redraw])
        out.append({"lever": what, "on": on, "off": off, "redraw": redraw, "lever_distance": lever,
                    "redraw_distance": noise, "within_redraw": lever["mean"] <= noise["mean"]})
    return out


def table(results: dict) -> str:
    rows = results["rows"]
    ref = rows.get("recipe", {}).get("samples_per_s")
    lines = ["| row | samples/s | tokens/s | peak GiB (allocated) | x recipe | loss first -> last | adapter dtype | settings |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        if "error" in r or "skipped" in r:
            lines.append(f"| {name} | {r.get('error') or r.get('skipped')} | | | | | | |")
            continue
        ratio = f"{r['samples_per_s'] / ref:.2f}" if ref else "-"
        loss = f"{r['losses'][0]} -> {r['losses'][-1]}" if r.get("losses") else "-"
        settings = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in (r.get("settings") or {}).items() if k != "train.profile")
        lines.append(f"| {name} | {r['samples_per_s']} | {r['tokens_per_s']:,} | {r.get('peak_alloc_GiB', '-')} | {ratio} | "
                     f"{loss} | {r.get('adapter_dtype', '-')} | {settings or '-'} |")
    pairs = same_learning(rows)
    if pairs:
        lines += ["", "| same learning | lever on vs off: mean (max) abs loss diff | dropout redraw: mean (max) | within? |",
                  "| --- | --- | --- | --- |"]
        for p in pairs:
            a, b = p["lever_distance"], p["redraw_distance"]
            lines.append(f"| {p['lever']} ({p['on']} vs {p['off']}, {a['steps']} steps) | {a['mean']} ({a['max']}) | "
                         f"{b['mean']} ({b['max']}) | {'yes' if p['within_redraw'] else 'no'} |")
    ev = results.get("eval") or {}
    if ev.get("rows"):
        lines += ["", f"| detection ({ev['images']} images, 24 new tokens) | ms / image | peak GiB | same answers as thread@ (max score diff) |",
                  "| --- | --- | --- | --- |"]
        for label, r in ev["rows"].items():
            same = f"{r['same_answers']:.0%} ({r['max_score_diff']:.2g})" if "same_answers" in r else "-"
            lines.append(f"| {label} | {r['ms_per_image']} | {r.get('peak_alloc_GiB', '-')} | {same} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    series = {n: r["losses"] for n, r in results["rows"].items() if r.get("losses")}
    labels = {n: f"{n} ({results['rows'][n].get('adapter_dtype', '?').replace('torch.', '')} adapter)" for n in series}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:  # no matplotlib on the GPU machine: a hand-written SVG says the same
        return _svg(series, labels, path.with_suffix(".svg"))
    # left: the nightly preset as written vs its profiles; right: the seed recipe as plain TRL vs vlmdet
    groups = [("nightly preset: as written vs profiles", [n for n in series if not n.startswith(("recipe", "seed"))]),
              ("seed recipe: plain TRL vs vlmdet train()", [n for n in series if n.startswith(("recipe", "seed"))])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for ax, (title, names) in zip(axes, groups):
        for n in names:
            ax.plot(range(1, len(series[n]) + 1), series[n], marker=".", label=labels[n])
        ax.set_xlabel("optimizer step (effective batch 16; step 1 = warm-up)")
        ax.set_ylabel("training loss (answer tokens)")
        ax.set_title(title, fontsize=9)
        if names:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("same data and seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _svg(series: dict, labels: dict, path: Path) -> Path:
    ys = [v for s in series.values() for v in s] or [0.0, 1.0]
    lo, hi = min(ys), max(ys) + 1e-9
    steps = max((len(s) for s in series.values()), default=2)
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="640" height="360" font-size="11">',
             f'<text x="10" y="15">training loss, {lo:.3f} (bottom) to {hi:.3f} (top), steps 1-{steps}</text>']
    for k, (n, s) in enumerate(series.items()):
        pts = " ".join(f"{40 + 560 * i / max(steps - 1, 1):.1f},{330 - 290 * (v - lo) / (hi - lo):.1f}" for i, v in enumerate(s))
        c = colours[k % len(colours)]
        parts += [f'<polyline fill="none" stroke="{c}" points="{pts}"/>',
                  f'<text x="420" y="{30 + 14 * k}" fill="{c}">{labels[n]}</text>']
    path.write_text("\n".join(parts + ["</svg>"]))
    return path


def report(res: Results, out: Path) -> str:
    res.data["same_learning"] = same_learning(res.data["rows"])
    md = table(res.data)
    (out / "table.md").write_text(md + "\n")
    try:
        res.data["meta"]["loss_curves"] = plot(res.data, out / "loss_curves.png").name
    except Exception as err:  # a plotting problem must not cost the numbers
        say(f"plot failed: {err}")
    res.save()
    return md


# --- main ---------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model and 224x168 images (CPU check of every path)")
    ap.add_argument("--steps", type=int, default=5, help="measured optimizer steps per row (after one warm-up step)")
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma list, run in order; known: recipe, eval, {', '.join(VLMDET_ROWS)}")
    ap.add_argument("--profile", default="qlora", help="row whose extra last step runs under torch.profiler ('' = none)")
    ap.add_argument("--eval-images", type=int, default=256, help="JPEG files detected by every detection row")
    ap.add_argument("--eval-batches", default="16,64", help="batch sizes for the detection rows")
    ap.add_argument("--eval-rows", default=",".join(EVAL_ROWS), help="detection rows: thread, workers, generate, prefill, "
                                                                     "before, static, compiled, compiled-again, gpuprep (see eval_rows)")
    ap.add_argument("--eval-workers", type=int, default=4, help="eval.workers of the workers@ rows")
    ap.add_argument("--budget-s", type=float, default=480, help="skip a row that would end after this many seconds")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "vlmdet-bench"))
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(tempfile.gettempdir(), "vlmdet-bench-out"))
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":  # a shared CPU: OpenMP threads spinning against other processes cost 5-8x
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    if a.tiny:
        a.steps = a.steps if "--steps" in (argv or sys.argv) else 2
        a.eval_images = min(a.eval_images, 8)
        a.eval_batches = "4,8"
    import peft
    import transformers
    import trl

    versions = {m.__name__: m.__version__ for m in (torch, transformers, peft, trl)}
    try:
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    out, work = Path(a.out), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": a.steps, "tiny": a.tiny,
            "effective_batch": 16, "preset": PRESET, "argv": sys.argv[1:]}
    res = Results(out, meta)
    say(f"{meta['device']}, {versions}")
    base, build_s = build_base(work, a.tiny, dev)
    meta["build_base_s"] = build_s
    say(f"random base at {base} ({build_s}s)")
    size = (224, 168) if a.tiny else (1024, 768)
    dataset = write_dataset(work, 16 * (a.steps + 2), size)
    scale = 1.0 if dev == "cuda" else 0.0  # estimates are for the GPU; a CPU run is never cut short

    for name in [r.strip() for r in a.rows.split(",") if r.strip()]:
        left = a.budget_s - (time.time() - T0)
        need = ESTIMATE_S.get(name) or ESTIMATE_S.get(VLMDET_ROWS.get(name, ("",))[0], 80)
        if name != "eval":
            need *= (a.steps + 3) / 8  # the estimates are for 5 measured steps
        if scale and need > left:
            say(f"{name}: skipped, ~{need:.0f}s needed and {left:.0f}s of the budget left")
            res.row(name, {"skipped": f"budget ({left:.0f}s left)"}) if name != "eval" else None
            continue
        say(f"{name}: start")
        prof = out / f"profile_{name}.txt" if name == a.profile else None
        try:
            if name == "recipe":
                res.row(name, recipe_row(base, a.steps, dev, a.tiny, prof))
            elif name == "eval":
                eval_rows(base, a.eval_images, [int(b) for b in a.eval_batches.split(",")], dev, a.tiny, res, work,
                          tuple(r for r in a.eval_rows.split(",") if r), a.eval_workers)
                res.save()
            elif name in VLMDET_ROWS:
                res.row(name, vlmdet_row(name, base, dataset, a.steps, dev, work, prof))
            else:
                raise ValueError(f"unknown row {name!r}")
            if name != "eval":
                r = res.data["rows"][name]
                say(f"{name}: {r['samples_per_s']} samples/s, {r.get('peak_alloc_GiB')} GiB, median step {r['step_s_median']}s, "
                    f"losses {r['losses']}")
        except Exception as err:  # out of memory or a bug in one row: record it, free the card, go on
            traceback.print_exc()
            kind = "OOM" if isinstance(err, torch.cuda.OutOfMemoryError) else type(err).__name__
            res.row(name, {"error": f"{kind}: {str(err)[:300]}"})
        free_memory()
        report(res, out)  # after every row: a run cut short by its time limit still returns table and plot
    md = report(res, out)
    print("\n" + md + "\n", flush=True)
    say(f"done; files in {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
