"""CPU probe for the LoRA-input lever's "same learning" (benchmarks/RESULTS.md): does taking autocast's
bf16 input in fp32 LoRA layers (`large`) move the loss curve more than a redraw of the dropout masks
(`large-cast-redraw`) does? The same rows as bench.py, on the tiny model with a bf16 base under CPU
bf16 autocast (where bench.py --tiny would train in fp32 and the lever would do nothing), the nightly
preset's LoRA (r 16 on all 7 linears, dropout 0.05, fp32 adapters, lr 2e-4), effective batch 16.

    python benchmarks/dropout_noise_cpu.py --steps 30      # ~3 minutes on 2 cores; prints the curves

`large-cast` runs twice: the second must equal the first (the comparison means nothing otherwise).
The GPU measurement is `python benchmarks/bench.py --rows large,large-cast,large-cast-redraw`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import bench  # noqa: E402

ROWS = ("large", "large-cast", "large-cast-redraw", "large-cast")


def main(argv: list[str] | None = None) -> dict:
    import vlmdet.training.train as train_mod
    from transformers import TrainerCallback

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "vlmdet-dropout-noise"))
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))

    sft_config, vlmdet_config = train_mod.sft_config, bench.vlmdet_config

    def sft_bf16(*args, **kwargs):  # bf16 mixed precision on the CPU: Accelerate wraps the forward in autocast
        targs = sft_config(*args, **kwargs)
        targs.bf16, targs.mixed_precision = True, "bf16"
        return targs

    class CpuRedraw(TrainerCallback):  # other dropout masks: the CPU generator reseeded as training starts
        def on_train_begin(self, args, state, control, **kw):
            torch.manual_seed(args.seed + 1)

    train_mod.sft_config = sft_bf16
    bench.vlmdet_config = lambda *args, **kw: vlmdet_config(*args, **kw).override(
        {"model.dtype": "bfloat16", "train.dataloader_workers": 0})
    bench.dropout_redraw = CpuRedraw
    work = Path(a.work)
    base, _ = bench.build_base(work, True, "cpu")
    data = bench.write_dataset(work, 16 * (a.steps + 2), (224, 168))
    curves: dict[str, list[float]] = {}
    for name in ROWS:
        rec = bench.vlmdet_row(name, base, data, a.steps, "cpu", work, None)
        curves[name if name not in curves else name + " (again)"] = rec["losses"]
    ref = curves["large-cast"]
    gap = {k: max(abs(x - y) for x, y in zip(v, ref)) for k, v in curves.items() if k != "large-cast"}
    for k, v in curves.items():
        print(f"{k:24s} {' '.join(f'{x:.3f}' for x in v)}", flush=True)
    print("largest difference from large-cast:", json.dumps({k: round(v, 4) for k, v in gap.items()}), flush=True)
    return {"curves": curves, "max_diff_vs_large_cast": gap}


if __name__ == "__main__":
    main()
