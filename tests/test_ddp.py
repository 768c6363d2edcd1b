"""Several processes (issue 21): the train step on 2 CPU processes (DDP over gloo), launched as the
train task launches it (runner.run_step -> `accelerate launch` -> vlmdet.pipeline.child train), against 1.

test_perf_levers.py deals micro-batches to simulated ranks (which samples each gets); here a real
DDP run shows the ranks' gradients all-reduced into the one-process step, with the wrapper built
without find_unused_parameters (train.ddp_find_unused, vlmdet/training/speed.py).
"""
from __future__ import annotations

import json
import os
import socket
import textwrap
from pathlib import Path

import pytest

from vlmdet.run import runner
from vlmdet.run.records import DatasetRef

# Loaded by every Python process of the launch (sitecustomize, from the children's PYTHONPATH): once a step
# child imports vlmdet.training.train, its build_trainer is wrapped to add a callback that writes what each
# rank's trainer holds (the DDP wrapper and its settings) and, on request, a trainable module the forward
# never calls. The command the product builds (runner.command) runs as it is.
PROBE = textwrap.dedent('''
    import importlib.machinery, json, os, sys
    from pathlib import Path


    def probe(train):
        import torch
        from transformers import TrainerCallback

        build = train.build_trainer

        def build_trainer(*args, **kwargs):
            trainer, processor, base = build(*args, **kwargs)
            if os.environ.get("PROBE_UNUSED"):  # as a modules_to_save entry naming a module forward never calls
                trainer.model.base_model.model.probe_unused = torch.nn.Linear(2, 2)

            class Seen(TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    ddp = trainer.model_wrapped
                    seen = {"wrapper": type(ddp).__name__, "world_size": args.world_size,
                            "find_unused_parameters": getattr(ddp, "find_unused_parameters", None),
                            "argv": sys.argv}
                    Path(os.environ["PROBE_DIR"], "rank%s.json" % os.environ.get("RANK", "0")).write_text(json.dumps(seen))

            trainer.add_callback(Seen())
            return trainer, processor, base

        train.build_trainer = build_trainer


    class Finder:
        def find_spec(self, name, path, target=None):
            if name != "vlmdet.training.train":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                probe(module)

            spec.loader.exec_module = exec_module
            return spec


    sys.meta_path.insert(0, Finder())
''')

# What a worker's `accelerate config` says on a host of several GPUs, for this CPU: one machine, several
# processes through torchrun (the trainer, use_cpu, joins them over gloo), a port of its own so that runs
# beside it do not collide. accelerate reads it from $HF_HOME/accelerate/default_config.yaml.
ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
gpu_ids: all
mixed_precision: 'no'
main_process_port: {port}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def launch(tmp_path):
    """runner.run_step as the train task calls it, so the command is runner.command's own (`accelerate launch
    --num_processes N --module vlmdet.pipeline.child` for N > 1); the probe comes in through the children's
    PYTHONPATH and the multi-process setting through accelerate's config file. One thread a process: 2 cores,
    no oversubscription."""
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "sitecustomize.py").write_text(PROBE)

    def run(config, coco: Path, n: int, env: dict | None = None) -> tuple[dict, dict]:
        """(the train step's record, {"rank0": what rank 0's trainer held at a step end, ...})."""
        out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}-{n}"
        (out / "probes").mkdir(parents=True)
        (out / "hf" / "accelerate").mkdir(parents=True)
        (out / "hf" / "accelerate" / "default_config.yaml").write_text(ACCELERATE_CONFIG.format(port=_free_port()))
        pythonpath = os.pathsep.join(filter(None, [str(tmp_path / "probe"), os.environ.get("PYTHONPATH")]))
        data = DatasetRef(fingerprint="test", root=str(coco.parent), splits={"train": str(coco), "test": str(coco)},
                          counts={})
        record = runner.run_step("train", {"dataset": data.to_dict(), "config": config.to_dict(),
                                           "out": str(out / "train")}, out / "step", timeout_s=600,
                                 num_processes=n, env={"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1",
                                                       "HF_HOME": str(out / "hf"), "PROBE_DIR": str(out / "probes"),
                                                       **(env or {})})
        seen = {p.stem: json.loads(p.read_text()) for p in (out / "probes").glob("rank*.json")}
        return record, seen

    return run


def _config(micro_config, steps: int):
    # 12 images at 1 x 4 = 3 optimizer steps an epoch on 1 process, 2 x 2 micro-batches on 2 (so
    # no_sync accumulation runs too). Dropout 0: a rank draws its masks from its own stream, so
    # with dropout the curves would differ by the masks, not by anything DDP does. Non-reentrant
    # checkpointing and length grouping as in the qlora profile; lm_head trained in full (smoke's
    # modules_to_save).
    run = micro_config.override({"train.max_steps": steps, "train.per_device_batch": 1, "train.grad_accum": 4,
                                 "train.warmup_steps": 0, "train.scheduler": "constant", "train.save_steps": 1000,
                                 "train.gradient_checkpointing": True, "train.group_by_length": True,
                                 "lora.dropout": 0.0})
    assert run.lora.modules_to_save and not run.train.ddp_find_unused  # what the runs below cover
    return run


def test_two_processes_train_the_one_process_curve_without_find_unused_parameters(launch, micro_config, synth_coco):
    config = _config(micro_config, steps=10)
    one, seen_one = launch(config, Path(synth_coco), 1)
    two, seen_two = launch(config, Path(synth_coco), 2)

    assert seen_one["rank0"]["wrapper"] != "DistributedDataParallel" and seen_one["rank0"]["world_size"] == 1
    assert set(seen_two) == {"rank0", "rank1"}
    for rank in seen_two.values():
        assert rank.pop("argv")[0].endswith("vlmdet/pipeline/child.py")  # the product's step module, started by the launcher
        assert rank == {"wrapper": "DistributedDataParallel", "world_size": 2, "find_unused_parameters": False}

    assert one["global_step"] == two["global_step"] == 10
    assert len(one["losses"]) == len(two["losses"]) == 10
    # Same samples in every optimizer step and the ranks' gradients summed into the one-process
    # gradient: equal up to fp32 summation order (1 process accumulates 4 micro-batch gradients in
    # turn; 2 accumulate 2 each and gloo sums the two). Measured 5e-7 at most (a few ulps of losses
    # near 5) over 10 steps; 1e-4 leaves Adam room to carry rounding further on another CPU. Each
    # rank stepping on its own gradient (no all-reduce) measured 3e-3 at step 2 and 0.29 by step 10;
    # ranks fed other samples than the one-process step differ from step 1. The curve falls by far
    # more than the tolerance (checked below), so this is not the equality of a flat line.
    diffs = [abs(a - b) for a, b in zip(one["losses"], two["losses"])]
    assert max(diffs) <= 1e-4, (one["losses"], two["losses"])
    assert max(one["losses"]) - min(one["losses"]) > 100 * 1e-4, one["losses"]


def test_a_trainable_weight_without_a_gradient_stops_the_first_step_naming_the_setting(launch, micro_config,
                                                                                    synth_coco):
    config = _config(micro_config, steps=2)
    with pytest.raises(runner.StepFailed, match=r"train\.ddp_find_unused=true") as err:
        launch(config, Path(synth_coco), 2, env={"PROBE_UNUSED": "1"})
    assert err.value.kind == "config"
    assert "base_model.model.probe_unused.weight" in str(err.value)
