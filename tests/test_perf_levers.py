"""Speed levers change how fast training and evaluation run, never what they compute (issue 10).

Speed itself is measured by benchmarks/bench.py on a GPU; here each lever's correctness, on CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmdet.config.settings import ConfigError, load_preset
from vlmdet.run.records import DatasetRef
from vlmdet.run.runner import plan_processes
from vlmdet.config import profiles


def _dataset(coco_path) -> DatasetRef:
    return DatasetRef(fingerprint="test", root=str(coco_path.parent), splits={"train": str(coco_path), "test": str(coco_path)},
                      counts={})


# --- profiles: which settings, which machine -------------------------------------------------------------------

def test_profiles_keep_the_effective_batch_and_what_is_learned():
    seed = load_preset("qwen2-vl-7b-nutrition")  # per_device_batch 2 x grad_accum 8
    for name, want_batch in (("qlora", 8), ("large", 4)):
        cfg = profiles.apply(seed, name)
        assert cfg.train.profile == name
        assert cfg.train.per_device_batch == want_batch
        assert cfg.train.per_device_batch * cfg.train.grad_accum == 16
        changed = profiles.changes(seed, cfg)
        # never the learning: rate, schedule, LoRA, data, steps
        assert not any(k.startswith(("lora.", "data.")) for k in changed), changed
        assert not {"train.learning_rate", "train.scheduler", "train.warmup_steps", "train.epochs", "train.seed"} & set(changed)
    assert profiles.apply(seed, "large").model.quantization == "none"
    assert profiles.apply(seed, "large").model.dtype == "bfloat16"
    assert profiles.apply(seed, "qlora").model.quantization == "nf4"
    assert profiles.apply(seed, "preset").to_dict() == seed.override({"train.profile": "preset"}).to_dict()
    # an effective batch the profile's batch does not divide: the largest divisor below it
    odd = seed.override({"train.per_device_batch": 1, "train.grad_accum": 12})
    cfg = profiles.apply(odd, "large")
    assert (cfg.train.per_device_batch, cfg.train.grad_accum) == (4, 3)
    assert profiles.split_batch(3, 8) == (3, 1)
    assert profiles.split_batch(12, 8) == (6, 2)


def test_auto_profile_follows_free_gpu_memory():
    seed = load_preset("qwen2-vl-7b-nutrition")
    assert profiles.choose("auto", seed, 79.0) == "large"
    assert profiles.choose("auto", seed, 22.0) == "qlora"
    assert profiles.choose("auto", seed, None) == "preset"  # no GPU
    assert profiles.choose("qlora", seed, 79.0) == "qlora"  # a setting wins over the machine
    smoke = load_preset("smoke")  # not a 4-bit preset: left as written, even on a big GPU
    assert profiles.choose("auto", smoke, 79.0) == "preset"
    assert profiles.resolve(seed, free_gib=75.0).train.profile == "large"
    with pytest.raises(ConfigError, match="train.profile"):
        seed.override({"train.profile": "fast"})


def test_accumulation_is_split_over_processes():
    assert profiles.accumulation_per_process(8, 1) == 8
    assert profiles.accumulation_per_process(8, 2) == 4
    assert profiles.accumulation_per_process(16, 4) == 4
    assert profiles.accumulation_per_process(2, 4) == 1


# --- one process per GPU --------------------------------------------------------------------------------------

def test_processes_default_to_every_visible_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert plan_processes(0) == (2, {})
    # one GPU asked on a 2-GPU worker: pinned, so SFTTrainer never sees two devices (nn.DataParallel)
    assert plan_processes(1) == (1, {"CUDA_VISIBLE_DEVICES": "0"})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert plan_processes(0) == (4, {})
    assert plan_processes(2, environ={"CUDA_VISIBLE_DEVICES": "3,5,6,7"}) == (2, {"CUDA_VISIBLE_DEVICES": "3,5"})
    with pytest.raises(ConfigError, match="train.num_processes=8"):
        plan_processes(8)
    with pytest.raises(ConfigError, match="eval.num_processes=8"):  # the setting that asked is the one named
        plan_processes(8, setting="eval.num_processes")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert plan_processes(0) == (1, {})  # CPU: one plain process
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        plan_processes(2)


def test_how_an_evaluation_runs_is_not_what_it_measures(tmp_path):
    """eval.num_processes and eval.timeout_s change speed only: the same keys, so nothing re-evaluates."""
    from vlmdet.run.keys import evaluation_key
    from vlmdet.run.layout import RunLayout

    def task_key(model, ds, config, workdir, name):  # the evaluate step's cache key
        return RunLayout.at(workdir).eval_key(model, ds, config, name)

    cfg = load_preset("qwen2-vl-7b-nutrition")
    other = cfg.override({"eval.num_processes": 2, "eval.timeout_s": 60})
    ds = DatasetRef(fingerprint="f", root=str(tmp_path), splits={}, counts={})
    assert evaluation_key(other, "f") == evaluation_key(cfg, "f")
    assert task_key("m", ds, other, tmp_path, "adapter") == task_key("m", ds, cfg, tmp_path, "adapter")
    assert task_key("m", ds, cfg.override({"eval.batch_size": 3}), tmp_path, "adapter") != task_key(
        "m", ds, cfg, tmp_path, "adapter")  # while a setting that can change answers does


# --- training levers ------------------------------------------------------------------------------------------

def _run(config, coco, out, keep_tower_hook=False):
    """Two optimizer steps through build_trainer; returns (losses, LoRA weights, what the towers saw)."""
    from vlmdet.training.train import build_trainer

    torch.manual_seed(0)
    trainer, _, _ = build_trainer(_dataset(coco), config, out)
    if keep_tower_hook:  # the behaviour before the fix: TRL/transformers' hooks left in place
        trainer.callback_handler.callbacks = [c for c in trainer.callback_handler.callbacks
                                              if type(c).__name__ != "FrozenTowersOutOfBackward"]
    hf = trainer.model.get_base_model()
    seen = {"vision_out_requires_grad": [], "vision_backward": 0}
    hf.model.visual.merger.register_forward_hook(
        lambda m, a, o: seen["vision_out_requires_grad"].append(o.requires_grad))
    hf.model.visual.blocks[0].register_full_backward_hook(
        lambda *a: seen.__setitem__("vision_backward", seen["vision_backward"] + 1))
    trainer.train()
    seen["checkpointed"] = [layer.gradient_checkpointing for layer in hf.model.language_model.layers]
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, lora, seen


@pytest.fixture(scope="module")
def gc_runs(tiny_model, synth_coco, tmp_path_factory):
    """The same two steps three ways: checkpointing every layer with the tower hooks left in place
    (before the fix), every layer, and every second layer."""
    cfg = load_preset("smoke", {"model.base": tiny_model, "train.max_steps": 2, "train.per_device_batch": 2,
                                "train.save_steps": 100, "train.gradient_checkpointing": True,
                                "train.learning_rate": 1e-2, "train.warmup_steps": 0, "lora.dropout": 0.0})
    tmp = tmp_path_factory.mktemp("gc")
    return {"before": _run(cfg, synth_coco, tmp / "a", keep_tower_hook=True),
            "after": _run(cfg, synth_coco, tmp / "b"),
            "half": _run(cfg.override({"train.checkpoint_every": 2}), synth_coco, tmp / "c")}


def _same_learning(a, b) -> None:
    assert a[0] == pytest.approx(b[0], abs=1e-6)  # losses
    assert set(a[1]) == set(b[1]) and a[1]
    for name in a[1]:  # LoRA weights after the steps
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-5, atol=1e-6)


def test_frozen_vision_tower_gets_no_backward_and_learning_is_unchanged(gc_runs):
    before, after = gc_runs["before"], gc_runs["after"]
    # the waste being removed is real: with the hooks, autograd records and runs the vision tower
    assert all(before[2]["vision_out_requires_grad"]) and before[2]["vision_backward"] > 0
    assert not any(after[2]["vision_out_requires_grad"]) and after[2]["vision_backward"] == 0
    # and the LoRA weights, which live in the language model only, learn exactly the same
    _same_learning(after, before)


def test_checkpointing_every_second_layer_computes_the_same(gc_runs):
    full, half = gc_runs["after"], gc_runs["half"]
    assert all(full[2]["checkpointed"])
    assert half[2]["checkpointed"] == [i % 2 == 0 for i in range(len(half[2]["checkpointed"]))]
    _same_learning(half, full)


@pytest.mark.parametrize("compact", [False, True])
def test_loss_scores_the_answer_tokens_only_and_equals_full_logits(synth_coco, micro_config, tmp_path, monkeypatch,
                                                                   compact):
    """TRL >= 1.16 projects through the LM head only the positions whose label is not -100 (on
    CUDA; `compact`), instead of fp32 logits over the vocabulary at every position: the loss
    must equal the plain full-logits cross-entropy on the answer tokens."""
    import trl.trainer.utils as trl_utils

    from vlmdet.training.train import build_trainer

    if compact:  # the selection the CUDA path makes, with the kernel's torch fallback doing the maths
        monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)
    trainer, _, _ = build_trainer(_dataset(synth_coco), micro_config, tmp_path / "t")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    model = trainer.model.eval()
    with torch.no_grad():
        fused = trainer.compute_loss(model, dict(batch))
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()  # [b, seq, vocab]
    labels = batch["labels"][:, 1:]
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                              ignore_index=-100)
    assert (labels != -100).sum() < labels.numel() / 4  # the answer is a small part of the sequence
    assert fused.item() == pytest.approx(plain.item(), abs=1e-5)


def test_pre_resized_images_and_lengths(tmp_path, micro_config):
    from vlmdet.formats.resize import smart_resize
    from vlmdet.data.samples import load_split
    from vlmdet.training.train import build_dataset

    # two photos larger than the pixel budget, of different shapes, one box each
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "nutrition-table"}]}
    for i, (w, h) in enumerate([(1600, 1200), (900, 1500)]):
        arr = (torch.rand(h, w, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy()
        Image.fromarray(arr).save(tmp_path / f"p{i}.png")
        coco["images"].append({"id": i, "file_name": f"p{i}.png", "width": w, "height": h})
        coco["annotations"].append({"id": i, "image_id": i, "category_id": 1, "bbox": [100, 200, 300, 400]})
    path = tmp_path / "train.json"
    path.write_text(json.dumps(coco))
    m = micro_config.model
    plain = build_dataset(str(path), micro_config)
    fast = build_dataset(str(path), micro_config.override({"train.pre_resize": True, "train.group_by_length": True}),
                         image_cache=tmp_path / "cache")
    samples, _ = load_split(path)
    from transformers import AutoProcessor

    from vlmdet.modeling.load import load_processor

    processor = load_processor(m.base, m)
    assert isinstance(processor, type(AutoProcessor.from_pretrained(m.base)))
    for i, s in enumerate(samples):
        assert fast[i]["completion"] == plain[i]["completion"]  # boxes are rendered from the original size
        h, w = smart_resize(s.height, s.width, min_pixels=m.min_pixels, max_pixels=m.max_pixels)
        small = fast[i]["images"][0]
        assert small.size == (w, h) and plain[i]["images"][0].size == (s.width, s.height)
        a = processor.image_processor(images=[plain[i]["images"][0]], return_tensors="pt")
        b = processor.image_processor(images=[small], return_tensors="pt")
        # the same visual tokens; pixels equal up to the two resize implementations' rounding
        assert torch.equal(a["image_grid_thw"], b["image_grid_thw"])
        assert (a["pixel_values"] - b["pixel_values"]).abs().mean() < 0.02
        assert fast[i]["length"] == (h // 28) * (w // 28) + len(fast[i]["completion"][0]["content"][0]["text"])
    assert len(list((tmp_path / "cache").iterdir())) == 2
    for s, row in zip(samples, fast):  # stored losslessly: the copy's pixels are the bicubic resize's, exactly
        h, w = smart_resize(s.height, s.width, min_pixels=m.min_pixels, max_pixels=m.max_pixels)
        expected = Image.open(s.file).convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
        assert row["images"][0].convert("RGB").tobytes() == expected.tobytes()
    again = build_dataset(str(path), micro_config.override({"train.pre_resize": True}), image_cache=tmp_path / "cache")
    assert again[0]["images"][0].size == fast[0]["images"][0].size  # stored once, reused


def test_profile_settings_reach_the_trainer(synth_coco, micro_config, tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from vlmdet.training.train import build_trainer

    cfg = micro_config.override({"train.group_by_length": True, "train.optim": "adamw_torch_fused",
                                 "train.dataloader_workers": 2, "train.pre_resize": True})
    trainer, _, _ = build_trainer(_dataset(synth_coco), cfg, tmp_path / "t")
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    # one process: grouped by the effective batch, as transformers does (speed.grouping_independent_of_gpus)
    assert sampler.batch_size == cfg.train.per_device_batch * cfg.train.grad_accum
    assert trainer.args.optim == "adamw_torch_fused" and trainer.args.dataloader_persistent_workers
    # the collator takes rows with the extra length column
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert batch["input_ids"].shape[0] == 2


def _steps(per_device: int, accum_per_rank: int, world: int, lengths: list[int], fixed: bool) -> list[set[int]]:
    """The samples of each optimizer step on `world` processes: the length-grouped sampler as the Trainer
    builds it (per-process batch x accumulation), optionally regrouped by speed.grouping_independent_of_gpus,
    then micro-batches dealt to the ranks in turn as accelerate's sharded loader does."""
    from types import SimpleNamespace

    from transformers.trainer_pt_utils import LengthGroupedSampler

    from vlmdet.training.speed import grouping_independent_of_gpus

    sampler = LengthGroupedSampler(per_device * accum_per_rank, lengths=lengths)
    if fixed:
        grouping_independent_of_gpus(sampler, SimpleNamespace(train_batch_size=per_device,
                                                              gradient_accumulation_steps=accum_per_rank, world_size=world))
    torch.manual_seed(0)  # the Trainer seeds every rank alike
    order = list(sampler)
    micro = [order[k:k + per_device] for k in range(0, len(order), per_device)]
    per_step = per_device * accum_per_rank * world
    return [set(i for b in micro[k:k + accum_per_rank * world] for i in b) for k in range(0, len(micro), accum_per_rank * world)
            if len(micro[k:k + accum_per_rank * world]) * per_device == per_step]


def test_length_grouping_gives_every_gpu_count_the_one_gpu_steps():
    """Effective batch 16 as 4 x 4 on one GPU, 4 x 2 on two, 4 x 1 on four: the same samples in every step."""
    lengths = [1000 + (i * 37) % 300 for i in range(960)]  # the real split's size; visual tokens + answer length
    one = _steps(4, 4, 1, lengths, fixed=True)
    assert len(one) == 60
    assert _steps(4, 2, 2, lengths, fixed=True) == one
    assert _steps(4, 1, 4, lengths, fixed=True) == one
    assert _steps(4, 4, 1, lengths, fixed=False) == one  # one GPU: unchanged by the fix
    assert _steps(4, 1, 4, lengths, fixed=False) != one  # transformers alone: four GPUs see other steps


def test_fp32_lora_takes_bf16_inputs_under_autocast_with_identical_results():
    """speed.adapter_inputs_uncast: no fp32 copy of each adapted activation; same outputs and grads."""
    from peft import LoraConfig, get_peft_model

    from vlmdet.training.speed import adapter_inputs_uncast

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["0", "2"]))
    for p in model.parameters():
        if p.requires_grad:  # fp32 adapters (train.adapter_dtype), non-zero B so both grads flow
            p.data = p.data.float()
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(8, 64).bfloat16()
    lora_a = model.base_model.model[0].lora_A["default"]

    def run(uncast: bool):
        model.zero_grad()
        seen = []
        hook = lora_a.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16), adapter_inputs_uncast(model, autocast=uncast):
            y = model(x)
        y.float().pow(2).sum().backward()
        hook.remove()
        return y.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad], seen

    y_cast, g_cast, seen_cast = run(False)
    y_lean, g_lean, seen_lean = run(True)
    assert seen_cast == [torch.float32] and seen_lean == [torch.bfloat16]
    assert torch.equal(y_cast, y_lean)
    assert all(torch.equal(a, b) for a, b in zip(g_cast, g_lean))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))  # restored


# --- evaluation levers ---------------------------------------------------------------------------------------

class _NoHead:
    """The same model seen through an object without get_output_embeddings: Detector falls back to
    generate's output_logits of every step (the path before the lever)."""

    def __init__(self, model):
        self.model = model
        self.device = model.device

    def generate(self, **kw):
        return self.model.generate(**kw)


def test_chosen_token_logprobs_sorting_and_prefetch_change_no_detection(tiny_model):
    from vlmdet.config.settings import RunConfig
    from vlmdet.formats import get_format
    from vlmdet.modeling.load import load_for_inference
    from vlmdet.prediction.predict import Detector

    model, processor = load_for_inference(tiny_model, RunConfig().model)
    fmt = get_format("qwen2_vl")
    lean = Detector(model, processor, fmt, "Detect the {category}.", "nutrition table", max_new_tokens=10)
    full = Detector(_NoHead(model), processor, fmt, "Detect the {category}.", "nutrition table", max_new_tokens=10)
    gen = torch.Generator().manual_seed(1)
    sizes = [(160, 120), (300, 200), (120, 200), (200, 150)]
    images = [Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).byte().numpy()) for w, h in sizes]
    files = [f"im{i}.png" for i in range(len(images))]
    seq_full, lp_full = full._generate(full.inputs(images))
    seq_lean, lp_lean = lean._generate(lean.inputs(images))
    assert torch.equal(seq_full, seq_lean)
    torch.testing.assert_close(lp_lean, lp_full, rtol=0, atol=1e-6)
    # a static (preallocated) KV cache, measured slower and kept in the benchmark (rejected_detect.py):
    # the same tokens and log-probabilities, so bench.py's static rows compare like with like
    RejectedDetector = _bench_module("rejected_detect").RejectedDetector
    static = RejectedDetector(model, processor, fmt, "Detect the {category}.", "nutrition table", max_new_tokens=10,
                              cache="static")
    seq_static, lp_static = static._generate(static.inputs(images))
    assert torch.equal(seq_static, seq_lean)
    torch.testing.assert_close(lp_static, lp_lean, rtol=0, atol=1e-5)
    # the compiled decoder under measurement (compiled_detect.py: static cache, compiled on CUDA, eager here):
    # its logits processor reads the same log-probabilities as the library's hooks
    compiled = _bench_module("compiled_detect").CompiledDetector(model, processor, fmt, "Detect the {category}.",
                                                                 "nutrition table", max_new_tokens=10)
    seq_compiled, lp_compiled = compiled._generate(compiled.inputs(images))
    assert torch.equal(seq_compiled, seq_lean)
    torch.testing.assert_close(lp_compiled, lp_lean, rtol=0, atol=1e-5)
    # the processor on the model's device (gpuprep rows; the CPU here): the processor takes `device=` and,
    # on the same device, makes the same tensors
    gpuprep = _bench_module("compiled_detect").GpuPrepDetector(model, processor, fmt, "Detect the {category}.",
                                                               "nutrition table", max_new_tokens=10)
    on_device, on_cpu = gpuprep.inputs(images), lean.inputs(images)
    assert on_device.keys() == on_cpu.keys() and all(torch.equal(on_device[k], on_cpu[k]) for k in on_cpu)
    assert on_device["pixel_values"].device == model.device
    # batched largest first with the next batch prepared in a thread: same predictions, input order
    sorted_preds = lean.detect_all([(f, lambda im=im: im) for f, im in zip(files, images)], len(images), 2,
                                   sizes=[w * h for w, h in sizes])
    alone = [lean.detect([im], [f])[0] for f, im in zip(files, images)]
    assert [p.file for p in sorted_preds] == files
    for p, q in zip(sorted_preds, alone):
        assert p.answer == q.answer
        assert [b.score for b in p.boxes] == pytest.approx([b.score for b in q.boxes], abs=1e-4)
    # forked DataLoader workers (the benchmark's workers rows): batches decoded and processed there, not here
    import os

    loaded_by = []

    def loader(im):
        def load():
            loaded_by.append(os.getpid())  # appended in the process that loads (a worker's own copy)
            return im
        return load

    pids = []
    forked = RejectedDetector(model, processor, fmt, "Detect the {category}.", "nutrition table", max_new_tokens=10,
                              workers=2)
    real_inputs = forked.inputs
    forked.inputs = lambda imgs: (pids.append(os.getpid()), real_inputs(imgs))[1]  # noqa: E731
    worker_preds = forked.detect_all([(f, loader(im)) for f, im in zip(files, images)], len(images), 2,
                                     sizes=[w * h for w, h in sizes])
    assert [p.to_dict() for p in worker_preds] == [p.to_dict() for p in sorted_preds]
    assert pids == [] and loaded_by == []  # neither loading nor the processor ran in this process


def _bench_module(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- evaluation over several processes ------------------------------------------------------------------------

class _IndexDetector:
    """Stands in for the model: 'detects' the image's index, so the gathered order can be checked."""

    def detect_all(self, items, total, batch_size, desc="", sizes=None, on_done=None):
        from vlmdet.prediction.predict import Prediction

        items = list(items)
        if on_done is not None:
            on_done(len(items))
        assert len(items) == total and len(sizes) == total
        return [Prediction(f, 1, 1, answer=f"rank-seen {f}") for f, _ in items]


def _shard_worker(rank: int, world: int, port: int, coco: str, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    from vlmdet.config.settings import RunConfig
    from vlmdet.prediction.evaluate import detect_sharded
    from vlmdet.data.samples import load_split

    samples, _ = load_split(coco)
    preds = detect_sharded(_IndexDetector(), samples, RunConfig(), desc="test")
    with open(f"{out}.{rank}", "w") as fh:  # and the group it made is gone: left to the exit, gloo can abort
        json.dump({"files": [p.file for p in preds], "group_left": dist.is_initialized()}, fh)


@pytest.mark.slow  # two spawned processes with a gloo group: ~20 s of CPU
def test_evaluation_shards_images_over_processes_and_gathers_them_in_order(synth_coco, tmp_path):
    import socket

    import torch.multiprocessing as mp

    from vlmdet.data.samples import load_split

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_shard_worker, args=(2, port, str(synth_coco), str(tmp_path / "files")), nprocs=2, join=True)
    samples, _ = load_split(synth_coco)
    for rank in range(2):  # every rank ends with every image's prediction, in the split's order
        seen = json.loads((tmp_path / f"files.{rank}").read_text())
        assert seen == {"files": [s.file for s in samples], "group_left": False}


def test_an_adapter_is_evaluated_on_the_base_it_was_trained_on(tmp_path, micro_config):
    """A profile (large: bf16 base) the flow's config does not show travels with the adapter."""
    from vlmdet.modeling.carried import trained_with as trained_model_settings
    from vlmdet.config.profiles import TRAINED_WITH

    preset = load_preset("qwen2-vl-7b-nutrition")  # nf4 base as written
    trained = profiles.apply(preset, "large")
    (tmp_path / TRAINED_WITH).write_text(json.dumps({"profile": "large", "model": trained.to_dict()["model"]}))
    seen = trained_model_settings(str(tmp_path), preset)
    assert (seen.model.quantization, seen.model.dtype) == ("none", "bfloat16")
    assert trained_model_settings(str(tmp_path / "elsewhere"), preset).model.quantization == "nf4"  # no record: as is


def test_liger_kernels_fall_back_where_they_cannot_run(synth_coco, micro_config, tmp_path, monkeypatch, caplog):
    """train.liger_kernels needs CUDA and the package: without either the trainer gets the plain modules (Liger
    would swap their forwards for Triton kernels, which fail on a CPU) and the log says why."""
    import logging
    import sys
    import types

    from vlmdet.training import speed
    from vlmdet.training.train import build_trainer

    cfg = micro_config.override({"train.liger_kernels": True})
    with caplog.at_level(logging.INFO):
        trainer, _, _ = build_trainer(_dataset(synth_coco), cfg, tmp_path / "t")
    assert trainer.args.use_liger_kernel is False
    assert "Triton kernels need CUDA" in caplog.text
    layer = trainer.model.get_base_model().model.language_model.layers[0]
    for module in (layer.input_layernorm, layer.mlp):  # Liger patches these instances' forward
        assert "forward" not in vars(module) and type(module).__module__.startswith("transformers.")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert torch.isfinite(trainer.model(**batch).loss)  # and the model runs

    # a CUDA machine without the package: off, naming the fix
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)  # import raises ImportError
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert speed.liger_kernels_usable(True, cuda=True) is False
    assert "pip install liger-kernel" in caplog.text
    # with it: on, unless the setting is off
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", types.ModuleType("liger_kernel.transformers"))
    assert speed.liger_kernels_usable(True, cuda=True) is True
    assert speed.liger_kernels_usable(False, cuda=True) is False
