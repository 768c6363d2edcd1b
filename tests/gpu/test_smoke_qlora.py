"""Issue 9 item 4: the real (QLoRA) code path learns on a pretrained base.

The smoke task (600 synthetic tables, the shipped pretrained tiny Qwen2-VL, 400 steps) trained twice on the
GPU, side by side in two child processes (the same `python -m vlmdet.pipeline.child` the flow runs):
- reference: fp32 weights and compute, as on the CPU (the smoke preset as shipped);
- nightly path: the base in nf4 (bitsandbytes, double quant, bf16 compute), bf16 autocast,
  gradient checkpointing, the nightly preset's LoRA targets, vision-tower precision and fp32 adapter
  master weights; learning rate, rank and the fully trained lm_head stay the smoke preset's, which
  the 3.8M tiny base needs (docs/tiny-base.md).
The nightly path must reach an mAP50 within 0.1 of the reference. Numbers and both loss curves go
to VLMDET_GPU_REPORT / VLMDET_GPU_PLOTS when set (docs/gpu.md).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _run_steps(step: str, requests: dict[str, dict], folder: Path) -> dict[str, dict]:
    """Run one step for every request at once in child processes; their result records."""
    procs = {}
    for name, req in requests.items():
        rq, rs = folder / f"{step}-{name}.request.json", folder / f"{step}-{name}.result.json"
        rq.write_text(json.dumps(req, default=str))
        log = open(folder / f"{step}-{name}.log", "w")
        procs[name] = (subprocess.Popen([sys.executable, "-m", "vlmdet.pipeline.child", step, str(rq), str(rs)],
                                        stdout=log, stderr=subprocess.STDOUT), rs, log)
    out = {}
    for name, (proc, rs, log) in procs.items():
        code = proc.wait(timeout=900)
        log.close()
        result = json.loads(rs.read_text())
        assert code == 0 and "record" in result, (name, result.get("message"), result.get("traceback", "")[-2000:])
        out[name] = result["record"]
    return out


def test_nightly_code_path_learns_the_smoke_task_like_fp32(tmp_path):
    from vlmdet.config.settings import load_preset
    from vlmdet.data import materialize, prepare

    nightly = load_preset("qwen2-vl-7b-nutrition")
    smoke = load_preset("smoke")
    # 400 of the preset's 600 steps (checkpoints at 200 and 400, both scored by validation): the test must fit
    # beside the 7B's in one 9-minute GPU check; on the CPU the shipped 600-step demo chooses step 400 anyway
    smoke = smoke.override({"train.max_steps": 400, "train.save_steps": 200})
    reference = smoke.override({"model.dtype": "float32", "train.bf16": False})
    qlora = smoke.override({
        "model.quantization": nightly.model.quantization, "model.quantize_vision": nightly.model.quantize_vision,
        "train.bf16": True, "train.gradient_checkpointing": True, "train.adapter_dtype": nightly.train.adapter_dtype,
        "lora.target_modules": nightly.lora.target_modules, "lora.exclude": nightly.lora.exclude,
    })
    raw = materialize(smoke.data.dataset, tmp_path / "raw", seed=smoke.data.seed, image_size=smoke.data.image_size)
    data = prepare(raw, tmp_path / "prepared", smoke.data, source=smoke.data.dataset).to_dict()
    configs = {"fp32": reference, "nightly-path": qlora}

    t = time.perf_counter()
    adapters = _run_steps("train", {k: {"dataset": data, "config": c.to_dict(), "out": str(tmp_path / k / "train")}
                                    for k, c in configs.items()}, tmp_path)
    train_s = round(time.perf_counter() - t, 1)
    reports = _run_steps("evaluate", {k: {"model": adapters[k]["path"], "dataset": data, "config": c.to_dict(),
                                          "out": str(tmp_path / k / "eval")} for k, c in configs.items()}, tmp_path)
    result = {k: {"map": round(r["map"], 4), "map50": round(r["map50"], 4), "map75": round(r["map75"], 4),
                  "images": r["num_images"], "loss_first": round(adapters[k]["losses"][0], 3),
                  "loss_last": round(adapters[k]["losses"][-1], 3), "losses": adapters[k]["losses"]}
              for k, r in reports.items()}
    result["train_wall_s_both_in_parallel"] = train_s
    print("[gpu] smoke_qlora:", json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "losses"}
                                             if isinstance(v, dict) else v for k, v in result.items()}), flush=True)
    if os.environ.get("VLMDET_GPU_REPORT"):
        Path(os.environ["VLMDET_GPU_REPORT"]).with_name("smoke_qlora.json").write_text(json.dumps(result, indent=1))
    if os.environ.get("VLMDET_GPU_PLOTS"):
        _plot_both(adapters, Path(os.environ["VLMDET_GPU_PLOTS"]) / "smoke_qlora_loss.png")

    assert result["fp32"]["map50"] >= smoke.gate.threshold, "the fp32 reference itself did not learn the task"
    assert abs(result["nightly-path"]["map50"] - result["fp32"]["map50"]) <= 0.1, result


def _plot_both(adapters: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, a in adapters.items():
        steps = [10 * (i + 1) for i in range(len(a["losses"]))]  # smoke logs every 10 steps
        ax.plot(steps, a["losses"], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_yscale("log")
    ax.set_title("smoke task on the GPU: fp32 vs the nightly QLoRA path")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
