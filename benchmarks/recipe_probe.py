"""Issue 9's evidence for the nightly recipe, on the random-weight Qwen2-VL-7B (no download needed).

1. Memorisation: 32 fixed synthetic 1024x768 samples, the same steps, seed and data order for every
   variant, through vlmdet's own trainer (`build_trainer`, the nightly code path). Prints and plots
   the answer-token loss of the original recipe and of the nightly one side by side, with the
   variants between them that say which change matters, and how many adapter entries moved.
2. Vision-tower precision: the trained nightly adapter on the 4-bit base with the vision tower in
   bf16 and in nf4, each compared with the merged bf16 model (what ships) on the same images:
   logit difference and greedy-token agreement, and peak memory of training and inference.

    python benchmarks/recipe_probe.py --out $OUT            # one H100/H200, ~5 minutes
    python benchmarks/recipe_probe.py --tiny --out /tmp/p    # CPU: every code path on a micro model

Random weights: the loss says whether and how fast the adapter moves the model, not what a
pretrained model would reach. Results: docs/recipe.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmdet.config.settings import load_preset  # noqa: E402
from vlmdet.run.records import DatasetRef  # noqa: E402

CUDA = torch.cuda.is_available()


def common(steps: int) -> dict:
    # same steps, batch, data order and a short warm-up for every variant: only the recipe differs
    return {"train.max_steps": steps, "train.per_device_batch": 2, "train.grad_accum": 1, "train.warmup_steps": 3,
            "train.scheduler": "constant", "train.logging_steps": 1, "train.save_steps": 10 ** 6, "train.seed": 0}


def variants(base: str, steps: int, tiny: bool) -> dict:
    c = dict(common(steps), **{"model.base": base})
    if tiny:
        c.update({"model.quantization": "none", "model.min_pixels": 64 * 28 * 28, "model.max_pixels": 256 * 28 * 28})
    return {
        "seed-recipe (lr 1e-5, r64/a16 q,k,v,o, bf16 adapter, all nf4)": load_preset("seed-recipe", c),
        "seed-recipe, lr 2e-4": load_preset("seed-recipe", dict(c, **{"train.learning_rate": 2e-4})),
        "nightly (lr 2e-4, r16/a32 all linears, fp32 adapter, vision bf16)": load_preset("qwen2-vl-7b-nutrition", c),
        "nightly, vision tower nf4": load_preset("qwen2-vl-7b-nutrition", dict(c, **{"model.quantize_vision": True})),
    }


def peak_reset() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None


def memorise(name: str, config, dataset: DatasetRef, out: Path, save_adapter: Path | None) -> dict:
    from transformers import TrainerCallback

    from vlmdet.training.train import build_trainer

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if CUDA:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if CUDA:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    peak_reset()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    trainer, processor, _ = build_trainer(dataset, config, out)
    load_s = time.perf_counter() - t0
    trainer.add_callback(Timer())
    init = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    moved = {}
    for kind in ("lora_A", "lora_B"):
        names = [n for n in init if kind in n]
        moved[kind] = sum(int((params[n].detach() != init[n]).sum()) for n in names) / sum(init[n].numel() for n in names)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    res = {"variant": name, "losses": losses, "load_s": round(load_s, 1),
           "step_s_median": round(sorted(times[1:] or times)[len(times[1:] or times) // 2], 3),
           "peak_train_GiB": peak_gib(), "lora_A_changed": round(moved["lora_A"], 4),
           "lora_B_changed": round(moved["lora_B"], 4),
           "largest_lora_B": float(max(params[n].detach().abs().max() for n in init if "lora_B" in n)),
           "trainable_M": round(sum(p.numel() for p in params.values() if p.requires_grad) / 1e6, 1),
           "adapter_dtype": str(next(p.dtype for p in params.values() if p.requires_grad)),
           "tokens_per_sample": int(trainer.data_collator([trainer.train_dataset[0]])["input_ids"].shape[1])}
    if save_adapter is not None:
        trainer.save_model(str(save_adapter))
        processor.save_pretrained(str(save_adapter))
    del trainer, params, init
    peak_reset()
    return res


@torch.no_grad()
def vision_table(base: str, adapter: Path, config, images: list) -> list[dict]:
    """The trained adapter as the gate measures it (4-bit base, vision bf16 or nf4) vs the merged bf16 model."""
    from peft import PeftModel

    from vlmdet.publishing.merge import check_batch
    from vlmdet.modeling.load import load_model, load_processor

    processor = load_processor(str(adapter), config.model)
    batch = check_batch(processor, images, config)
    last = 32  # the text positions after the image: every one of them has attended to the visual tokens

    def logits(model):
        b = batch.to(model.device)
        return model(**b).logits[:, -last:, :].float().cpu()

    rows = []
    peak_reset()
    merged = PeftModel.from_pretrained(load_model(base, config.model, quantize=False, dtype=torch.bfloat16 if CUDA else torch.float32), str(adapter)).merge_and_unload().eval()
    ref = logits(merged)
    rows.append({"model": "merged, bf16 (what ships)", "peak_infer_GiB": peak_gib(), "max_abs_diff": 0.0, "mean_abs_diff": 0.0, "argmax_agree": 1.0})
    del merged
    for label, quantize_vision in (("4-bit base + adapter, vision bf16", False), ("4-bit base + adapter, vision nf4", True)):
        peak_reset()
        cfg = config.model.__class__(**dict(config.model.__dict__, quantize_vision=quantize_vision))
        model = PeftModel.from_pretrained(load_model(base, cfg), str(adapter)).eval()
        got = logits(model)
        rows.append({"model": label, "peak_infer_GiB": peak_gib(), "max_abs_diff": round((got - ref).abs().max().item(), 4),
                     "mean_abs_diff": round((got - ref).abs().mean().item(), 5),
                     "argmax_agree": round((got.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4)})
        del model
    peak_reset()
    return rows


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4), dpi=110)
    for r in results:
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["variant"])
    ax.set_xlabel("optimizer step (batch 2, 32 fixed samples)")
    ax.set_ylabel("answer-token loss")
    ax.set_title("memorisation on the random-weight Qwen2-VL-7B")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/recipe-probe"))
    ap.add_argument("--tiny", action="store_true", help="micro model on CPU: check the code paths")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--base", default=os.environ.get("VLMDET_RANDOM_7B", "runs/gpu-cache/qwen2-vl-7b-random"))
    ap.add_argument("--only", default="", help="comma-separated parts: memorise,vision")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="recipe-probe-"))
    from vlmdet.data.images import open_image
    from vlmdet.data.synth import generate
    from vlmdet.data.samples import load_split

    if a.tiny:
        from vlmdet.modeling.tiny import build_tiny_model

        base = str(build_tiny_model(work / "tiny", size="micro"))
        size, steps = (160, 120), min(a.steps, 3)
    else:
        from vlmdet.modeling.published import build_random_qwen2_vl_7b

        base = str(build_random_qwen2_vl_7b(a.base))
        size, steps = (1024, 768), a.steps
    coco = generate(work / "data", 32, seed=0, size=size)
    dataset = DatasetRef(fingerprint="probe", root=str(coco.parent), splits={"train": str(coco)}, counts={})
    import transformers, peft, trl  # noqa: E401

    report: dict = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "date": time.strftime("%Y-%m-%d"),
                    "versions": {m.__name__: m.__version__ for m in (torch, transformers, peft, trl)}, "memorise": [],
                    "vision": []}
    parts = set(a.only.split(",")) if a.only else {"memorise", "vision"}
    adapter = work / "nightly-adapter"
    vs = variants(base, steps, a.tiny)
    nightly_cfg = next(c for n, c in vs.items() if n.startswith("nightly (") )
    for name, config in vs.items():
        if "memorise" not in parts and not name.startswith("nightly ("):
            continue
        t = time.perf_counter()
        try:
            r = memorise(name, config, dataset, work / name.split(" ")[0], adapter if name.startswith("nightly (") else None)
        except Exception as err:  # keep the other rows: a failure costs one row, not the GPU call
            r = {"variant": name, "error": f"{type(err).__name__}: {err}", "losses": []}
            peak_reset()
        report["memorise"].append(r)
        print(f"[probe] {name}: {json.dumps({k: v for k, v in r.items() if k != 'losses'})} "
              f"losses {[round(x, 3) for x in r['losses'][:3]]} ... {[round(x, 3) for x in r['losses'][-3:]]} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        (out / "recipe_probe.json").write_text(json.dumps(report, indent=1))
    if "vision" in parts and adapter.is_dir():
        samples, _ = load_split(coco)
        images = [open_image(s.file) for s in samples[:4]]
        try:
            report["vision"] = vision_table(base, adapter, nightly_cfg, images)
        except Exception as err:
            report["vision"] = [{"error": f"{type(err).__name__}: {err}"}]
        (out / "recipe_probe.json").write_text(json.dumps(report, indent=1))
    plot([r for r in report["memorise"] if r["losses"]], out / "memorisation.png")

    print(f"\n{report['device']}, {report['date']}, {report['versions']}")
    print("\n| variant | loss step 1 | loss last | min loss | LoRA-A changed | LoRA-B changed | largest LoRA-B | "
          "trainable M | s/step | peak train GiB |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in report["memorise"]:
        if r["losses"]:
            print(f"| {r['variant']} | {r['losses'][0]:.3f} | {r['losses'][-1]:.3f} | {min(r['losses']):.3f} | "
                  f"{r['lora_A_changed']:.1%} | {r['lora_B_changed']:.1%} | {r['largest_lora_B']:.2e} | "
                  f"{r['trainable_M']} | {r['step_s_median']} | {r['peak_train_GiB']} |")
        else:
            print(f"| {r['variant']} | failed: {r.get('error')} |")
    print("\n| model | max abs logit diff vs merged | mean abs diff | argmax agree | peak inference GiB |\n|---|---|---|---|---|")
    for r in report["vision"]:
        print(f"| {r.get('model', 'failed')} | {r.get('max_abs_diff', r.get('error'))} | {r.get('mean_abs_diff')} | "
              f"{r.get('argmax_agree')} | {r.get('peak_infer_GiB')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
