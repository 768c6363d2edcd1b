"""Run configuration: one dataclass per stage, each field with its default, its reason and its metadata.

Presets (`vlmdet/config/presets/*.yaml`, which may extend another with `extends: NAME`) are data over these
dataclasses. The CLI options (`--train.max_steps 10`) and the flow's `overrides` parameter are
derived from the fields here, never re-typed, so a default lives in exactly one place.

Each field also declares, next to it (`_f`), its role (ROLES: what it changes: the adapter, a
measurement, the decision, the written outputs, or only how fast a step runs), where it applies
(APPLIES: the commands that run a trained model, serving, the settings a model carries) and its
allowed values. Every list of "which settings do X" (the CLI's inference options, the keys'
execution-only settings, the champion's answer settings, ...) is derived from them (`keys_where`),
and the allowed values are checked for every field as a section is built, before anything runs.
Adding a setting is one `_f(...)` line.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import yaml

from vlmdet.config.errors import ConfigError  # raised here; callers import it from here too
from vlmdet.config.specs import split_spec

PRESET_DIR = Path(__file__).parent / "presets"


# What changing a setting changes; the keys of vlmdet/run/keys.py and the run-folder layout follow from it.
ROLES = {
    "learned": "what is trained: the data, the base, LoRA and training settings (part of the training key)",
    "measured": "how a model is measured: an evaluation's numbers (part of the evaluation key)",
    "decided": "what the gate decides and where the model goes (decided again on saved results, no retraining)",
    "output": "what is written beside the numbers (previews, names), never the numbers",
    "execution": "only how fast, where or how long a step runs: never part of a key",
}
# Where a setting applies beyond the run that trains.
APPLIES = {
    "inference": "read by the commands that run a trained model (`vlmdet predict`, `vlmdet serve`)",
    "serve": "read by `vlmdet serve` only (with the inference settings)",
    "answer": "how a merged model answers: a champion is evaluated with its own, every one from its vlmdet.json "
              "(one missing there makes it unreadable)",
    "trained_with": "how the base was loaded for training (a speed profile may change it): evaluation of "
                    "the adapter loads it the same way (the adapter's vlmdet_trained_with.json)",
    "published": "what a published model was trained to answer: predict/serve read it from its vlmdet.json",
}
# transformers SchedulerType values that need no lr_scheduler_kwargs (others need settings we do not have)
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
# train.report_to: transformers' reporting integrations vlmdet supports, each named like the module it needs
TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")


def _installed(module: str) -> bool:
    """A real package, not a folder of that name in the working directory (wandb writes ./wandb), which
    Python would import as an empty namespace package."""
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.origin not in (None, "namespace")


# Settings taken out after measurement, each with what does its work: a preset or command line that still sets
# one stops with that message instead of running on a value nothing reads. The numbers are in benchmarks/RESULTS.md.
REMOVED = {
    "eval.workers": "the next batch's images are prepared by one background thread, which measured faster than "
                    "forked DataLoader workers (benchmarks/RESULTS.md)",
    "eval.cache": "generate keeps its dynamic KV cache, which measured faster than a static one "
                  "(benchmarks/RESULTS.md)",
}


def _refuse_removed(key: str) -> None:
    if key in REMOVED:
        raise ConfigError(f"{key} is not a setting any more: {REMOVED[key]}. Delete it from the preset or "
                          "the command line.")


def _families() -> tuple[str, ...]:
    from vlmdet.formats.base import families  # no heavy import: the registry, and installed plugins' entry points

    return tuple(families())


def _f(default: Any, help: str, role: str, *, choices: tuple | Callable[[], tuple] = (), applies: tuple[str, ...] = (),
       **kw: Any) -> Any:
    """A setting: its default, help, role (ROLES), where it applies (APPLIES) and allowed values (a tuple, or
    a function for lists known at run time)."""
    if role not in ROLES or set(applies) - set(APPLIES):
        raise ValueError(f"setting with role {role!r} / applies {applies!r}: use roles {list(ROLES)}, "
                         f"applies {list(APPLIES)}")
    meta = {"help": help, "role": role, "choices": choices, "applies": tuple(applies)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _serve(default: Any, help: str) -> Any:
    """A setting of the serve section: read by `vlmdet serve` only, and only about how it runs (never a key)."""
    return _f(default, help, "execution", applies=("serve",))


def allowed_values(f: dataclasses.Field) -> tuple:
    choices = f.metadata.get("choices") or ()
    return tuple(choices() if callable(choices) else choices)


class _Section:
    """Checks every field's allowed values (declared with the field), then the section's own rules."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value, key = getattr(self, f.name), f"{self.section}.{f.name}"
            allowed = allowed_values(f)
            if allowed and value not in allowed:
                raise ConfigError(f"{key}={value!r} is not allowed; use one of: {', '.join(map(str, allowed))}.")
        self.check()

    def check(self) -> None:
        """Rules between fields of the section (overridden where there are any)."""


@dataclass
class DataConfig(_Section):
    section: ClassVar[str] = "data"
    dataset: str = _f("synth:240", "Dataset spec: synth:N (generated, seeded), coco:PATH, hub:ORG/NAME, hf-disk:PATH (save_to_disk), parquet:PATH; append @bbox=yxyx-norm|xyxy-norm|xyxy-abs|xywh-abs for datasets with an objects column.", "learned")
    seed: int = _f(0, "Seed for synthetic data and the train/val/test split.", "learned")
    val_fraction: float = _f(0.1, "Share of images held out for validation (training-time eval).", "learned")
    test_fraction: float = _f(0.15, "Share of images held out for the reported mAP; never trained on.", "learned")
    category: str = _f("nutrition-table", "The category to detect; the label written in answers.", "learned",
                       applies=("inference", "answer", "published"))
    image_size: list[int] = _f([320, 240], "Synthetic images only: width, height in pixels.", "learned")
    max_images: int = _f(0, "Use at most this many images after validation (0 = all): quick checks.", "learned")

    def check(self) -> None:
        if not 0 <= self.val_fraction < 1 or not 0 < self.test_fraction < 1 or self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"data.val_fraction={self.val_fraction} and data.test_fraction={self.test_fraction} must each be in "
                "[0, 1) with test > 0 and their sum < 1 so that some images remain for training.")


@dataclass
class ModelConfig(_Section):
    section: ClassVar[str] = "model"
    base: str = _f("tiny:qwen2_vl", "Base model: a Hub id, a local folder, or tiny:FAMILY for a random tiny model built in-process.", "learned")
    family: str = _f("qwen2_vl", "Model family: its answer format and prompt (vlmdet/formats).", "learned",
                     choices=_families, applies=("inference", "answer"))
    quantization: str = _f("none", "nf4 (4-bit QLoRA, needs CUDA) or none. nf4 uses double quant and bf16 compute.",
                           "learned", choices=("nf4", "none"), applies=("inference", "trained_with"))
    quantize_vision: bool = _f(False, "With nf4: quantize the vision tower and its merger too. Off: they stay bf16 "
                                      "(about +0.9 GiB for Qwen2-VL-7B) so the model measured during training sees "
                                      "images as the merged bf16 model that ships does (docs/recipe.md).", "learned",
                               applies=("inference", "trained_with"))
    dtype: str = _f("auto", "Weights dtype when not quantized: auto (bf16 on CUDA, fp32 on CPU).", "learned",
                    choices=("auto", "bfloat16", "float16", "float32"), applies=("inference", "answer", "trained_with"))
    min_pixels: int = _f(64 * 28 * 28, "Processor pixel budget, lower bound (multiples of 28x28 = one visual token after the 2x2 merge).",
                         "learned", applies=("inference", "answer"))
    max_pixels: int = _f(1024 * 28 * 28, "Processor pixel budget, upper bound: larger photos are resized to fit, boxes mapped back.",
                         "learned", applies=("inference", "answer"))
    attn_implementation: str = _f("sdpa", "Attention kernel.", "learned", choices=("sdpa", "eager", "flash_attention_2"),
                                  applies=("inference", "answer"))
    prompt: str = _f("Detect the {category} in this image.", "User prompt; {category} is filled in.", "learned",
                     applies=("inference", "answer", "published"))

    def check(self) -> None:
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"model.min_pixels={self.min_pixels} exceeds model.max_pixels={self.max_pixels}.")


@dataclass
class LoraSettings(_Section):
    section: ClassVar[str] = "lora"
    r: int = _f(64, "LoRA rank: more capacity for spatial detail, more memory.", "learned")
    alpha: int = _f(16, "LoRA scaling numerator (scale = alpha / r).", "learned")
    dropout: float = _f(0.1, "Dropout on the LoRA input.", "learned")
    target_modules: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "Linear layers that get adapters.", "learned")
    exclude: str = _f(".*visual.*", "Regex (full match on the module name) of modules never adapted: the vision "
                                    "tower stays as pretrained (Qwen2.5-VL's vision MLP also has gate/up/down_proj). "
                                    "Empty = none excluded.", "learned")
    modules_to_save: list[str] = _f([], "Modules trained in full beside the adapters (e.g. lm_head when the label's "
                                        "tokens were rare in pretraining); merged like the adapters.", "learned")

    def check(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lora.r={self.r} must be a positive integer.")


@dataclass
class TrainConfig(_Section):
    section: ClassVar[str] = "train"
    epochs: float = _f(3.0, "Passes over the training split (ignored when max_steps > 0).", "learned")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1 = use epochs). 10 is a good first check of a preset.", "learned")
    # per_device_batch x grad_accum is what is learned; how it is split is execution (keys.training_key)
    per_device_batch: int = _f(2, "Samples per device per forward pass.", "learned")
    grad_accum: int = _f(8, "Gradient accumulation steps on one GPU: effective batch = per_device_batch x grad_accum, "
                                "kept on N GPUs (each accumulates grad_accum / N).", "learned")
    learning_rate: float = _f(1e-5, "Peak learning rate.", "learned")
    scheduler: str = _f("cosine", "Learning-rate schedule (transformers SchedulerType).", "learned", choices=SCHEDULERS)
    warmup_steps: int = _f(50, "Linear warm-up steps.", "learned")
    weight_decay: float = _f(0.0, "AdamW weight decay.", "learned")
    bf16: bool = _f(True, "bf16 autocast (on CUDA only; CPU runs fp32).", "learned")
    gradient_checkpointing: bool = _f(True, "Recompute activations in backward: ~half the memory, ~30% slower.", "learned")
    # which checkpoints exist to choose from: the validation picks one of them (vlmdet.training.select)
    save_steps: int = _f(50, "Checkpoint every N steps; a crashed or killed run resumes from the last one.", "learned")
    save_total_limit: int = _f(2, "Keep this many checkpoints.", "learned")
    logging_steps: int = _f(1, "Log the loss every N steps.", "execution")
    report_to: str = _f("tensorboard", "Experiment tracker the trainer logs to (TRL's report_to), and the run's mAP, "
                                       "gate decision, publication and Prefect flow run after it (vlmdet/run/tracking.py): "
                                       "tensorboard (event files in the run folder, train/<key>/tensorboard), mlflow "
                                       "(MLFLOW_TRACKING_URI, else WORKDIR/mlflow.db), wandb, trackio, or none. All "
                                       "but tensorboard are extras: pip install vlmdet[mlflow].", "execution",
                        choices=TRACKERS + ("none",))
    seed: int = _f(0, "Training seed.", "learned")
    num_processes: int = _f(0, "Training processes, one per GPU: 0 = every GPU this worker can see (CUDA_VISIBLE_DEVICES "
                               "respected; >1 launches the child with `accelerate launch`); N pins the first N GPUs. "
                               "grad_accum is divided by N so the effective batch stays the same.", "execution")
    timeout_s: int = _f(6 * 3600, "Kill the training child after this many seconds.", "execution")
    dataloader_workers: int = _f(0, "DataLoader worker processes (decode and process images beside the GPU).", "execution")
    adapter_dtype: str = _f("float32", "dtype of the trainable LoRA weights (master weights; compute stays bf16 under "
                                       "autocast). TRL casts them to bfloat16 on 4-bit bases, where a step of AdamW at "
                                       "lr<=1e-4 is below half a bf16 ulp of a LoRA weight and rounds to nothing "
                                       "(docs/recipe.md); bfloat16 reproduces that.", "learned",
                            choices=("float32", "bfloat16"))
    # --- speed levers (vlmdet/config/profiles.py sets them together; benchmarks/RESULTS.md measures them) ---
    # profile is execution: what it changes (quantization, batch split, the levers) is in the fields it sets
    profile: str = _f("auto", "Speed/memory profile applied over the preset: auto (large when the GPU has >= 70 GiB "
                              "free, else qlora), qlora (4-bit base, peak <= 12 GiB), large (bf16 base, no "
                              "checkpointing, 80 GB cards) or preset (the preset's settings exactly, e.g. seed-recipe).",
                      "execution", choices=("auto", "qlora", "large", "preset"))
    checkpoint_every: int = _f(1, "With gradient_checkpointing: checkpoint every Nth decoder layer only (1 = all); "
                                  "the others keep their activations, trading memory for less recomputation.", "learned")
    group_by_length: bool = _f(False, "Batch samples of similar length (visual tokens of the resized image) together: "
                                      "less padding when photo sizes vary.", "learned")
    optim: str = _f("adamw_torch", "Optimizer (transformers OptimizerNames).", "learned",
                    choices=("adamw_torch", "adamw_torch_fused"))
    pre_resize: bool = _f(False, "Store training images resized to the pixel budget once (boxes unchanged) instead "
                                 "of decoding full-size photos every epoch.", "learned")
    liger_kernels: bool = _f(False, "Fused Triton kernels from Liger Kernel (TRL's use_liger_kernel) for the decoder's "
                                    "RMSNorm and SiLU x up (and the vision tower's LayerNorm): fewer elementwise passes "
                                    "over the activations. CUDA with liger-kernel installed only; elsewhere training runs "
                                    "without them and says so.", "learned")
    ddp_find_unused: bool = _f(False, "Several processes: DDP walks the autograd graph after every forward to find "
                                      "trainable weights without a gradient (transformers' choice for any PEFT model). "
                                      "Off: every LoRA and modules_to_save weight gets a gradient every step, which "
                                      "the first step checks (it stops naming this setting if one got none).",
                               "execution")

    def check(self) -> None:
        for name in ("per_device_batch", "grad_accum", "save_steps", "timeout_s", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1.")
        if self.num_processes < 0:
            raise ConfigError(f"train.num_processes={self.num_processes}: use 0 (every visible GPU) or a count >= 1.")
        if self.max_steps == 0 or (self.max_steps < 0 and self.epochs <= 0):
            raise ConfigError(f"train.max_steps={self.max_steps}, train.epochs={self.epochs}: set max_steps > 0 or epochs > 0.")
        # checked here, where the configuration is built, so a missing tracker fails before any data or training
        if self.report_to in TRACKERS and not _installed(self.report_to):
            fix = "pip install tensorboard" if self.report_to == "tensorboard" else f"pip install vlmdet[{self.report_to}]"
            raise ConfigError(f"train.report_to={self.report_to!r} but {self.report_to} is not installed; install it "
                              f"({fix}) or choose another tracker (train.report_to=tensorboard or none).")


@dataclass
class EvalConfig(_Section):
    section: ClassVar[str] = "eval"
    batch_size: int = _f(8, "Images per generate call.", "measured", applies=("inference",))
    max_new_tokens: int = _f(128, "Longest answer; a one-box Qwen2-VL answer is ~24 tokens.", "measured",
                             applies=("inference", "answer"))
    split: str = _f("test", "Split the reported mAP is measured on.", "measured")
    eval_base: bool = _f(False, "Also measure the base model (no adapter) on the same split, for comparison.", "measured")
    preview_images: int = _f(8, "Draw predictions on this many images into a preview picture.", "output")
    timeout_s: int = _f(3600, "Kill the evaluation child after this many seconds.", "execution")
    num_processes: int = _f(0, "Evaluation processes, one per GPU: 0 = every GPU this worker can see (each detects "
                               "every Nth image, rank 0 writes the report); N pins the first N GPUs.", "execution")
    # learned: it picks which checkpoint becomes the adapter (vlmdet.training.select)
    val_max_images: int = _f(32, "Validation mAP of each kept checkpoint on at most this many validation images picks "
                                 "the checkpoint that is published (val mAP50, then val loss, then the later step); "
                                 "0 = pick by val loss alone. The test split only judges.", "learned")

    def check(self) -> None:
        if self.num_processes < 0:
            raise ConfigError(f"eval.num_processes={self.num_processes}: use 0 (every visible GPU) or a count >= 1.")
        if self.val_max_images < 0:
            raise ConfigError(f"eval.val_max_images={self.val_max_images} must be >= 0 (0 = choose by val loss).")


@dataclass
class GateConfig(_Section):
    section: ClassVar[str] = "gate"
    threshold: float = _f(0.5, "Publish only when the metric is at least this.", "decided")
    metric: str = _f("map50", "Which metric the gate reads.", "decided", choices=("map", "map50", "map75"))
    min_delta: float = _f(0.0, "Margin: a bootstrap resample counts the new model as better only when it beats the "
                               "champion by more than this (0 = any gain). Set it when a replacement has a cost "
                               "(downstream re-validation) that only a material gain repays.", "decided")
    min_probability: float = _f(0.9, "Publish over a champion only when a paired bootstrap over the test images "
                                     "finds the new model better (by more than min_delta) in at least this share of "
                                     "resamples. On ~120 test images one image moves mAP50 by ~0.008, so a point "
                                     "difference alone would replace a model on noise.", "decided")
    resamples: int = _f(1000, "Bootstrap resamples of the test images (1000: P and the 95% interval to about +-0.01).",
                        "decided")
    seed: int = _f(0, "Seed of the bootstrap resampling: the same evaluations give the same decision.", "decided")
    replace_unreadable_champion: bool = _f(False, "Replace a model at the target that cannot be judged (no numbers "
                                                  "in its card or vlmdet.json, no vlmdet.json, a family this vlmdet "
                                                  "cannot parse, no weights), deciding by the threshold alone. Off: "
                                                  "such a target closes the gate (fail closed), since 'unreadable' is "
                                                  "not 'absent'. Turn on for one run to replace it on purpose; it is "
                                                  "recorded in the summary and card. Never applies to a 401/403 or "
                                                  "network error (nothing was seen to replace).", "decided")

    def check(self) -> None:
        if not 0.0 <= self.min_probability <= 1.0:
            raise ConfigError(f"gate.min_probability={self.min_probability} is not a probability; use a value in "
                              "[0, 1], e.g. 0.9.")
        if self.resamples < 100:
            raise ConfigError(f"gate.resamples={self.resamples} is too few for a 95% interval; use at least 100 "
                              "(default 1000).")


@dataclass
class PublishConfig(_Section):
    section: ClassVar[str] = "publish"
    target: str = _f("local:published", "Where the merged model goes: local:DIR (relative to the workdir), hub:ORG/NAME, "
                                        "or KIND:REST of a target kind an installed package registers.", "decided")
    endpoint: str = _f("", "Hub endpoint URL (empty = huggingface_hub's default / HF_ENDPOINT).", "decided",
                       applies=("serve",))
    private: bool = _f(True, "Create the Hub repo private.", "decided")
    token_secret: str = _f("hf-token", "Prefect Secret block holding the Hub token (HF_TOKEN is used when absent).",
                           "decided")
    license: str = _f("apache-2.0", "License written in the model card.", "decided")
    merge_timeout_s: int = _f(3600, "Kill the merge child after this many seconds.", "execution")

    def check(self) -> None:
        # Only the shape: the kinds are registered by the publishing layer and installed packages, and looked
        # up when the run resolves its configuration (vlmdet.publishing.resolve_target).
        split_spec(self.target, "publish.target")


@dataclass
class ServeConfig(_Section):
    section: ClassVar[str] = "serve"
    max_batch_size: int = _serve(8, "`vlmdet serve`: most images in one generate call; concurrent requests share it. "
                                 "More raises images/s until the GPU is full, and each request's latency with it.")
    max_wait_ms: float = _serve(5.0, "`vlmdet serve`: how long the first request of a batch waits for others to join "
                                "it; a few ms costs a lone request little and lets a burst share one generate call.")
    max_queue: int = _serve(64, "`vlmdet serve`: images waiting beyond this are answered 503 (busy) at once instead "
                            "of queueing for minutes; each holds its decoded pixels (36 MB for a 12 MP photo).")
    max_body_mb: float = _serve(20.0, "`vlmdet serve`: largest request body (upload or JSON with base64) in MB; "
                                "larger is refused with 413 and never stored. Bodies are held in memory only, never "
                                "on disk.")
    max_uploads: int = _serve(32, "`vlmdet serve`: request bodies being read at once; one more is answered 503 with "
                              "Retry-After before a byte of its body is read. Each holds up to 2 x serve.max_body_mb "
                              "while it is read and checked (40 MB at the default), so 32 bound that to 1.3 GB "
                              "however many clients connect, and a burst of 32 clients (a full batch of 32 on a GPU) "
                              "is read without a 503. Raise it with the clients you expect at once; a proxy that "
                              "buffers bodies (nginx does by default) keeps slow clients from holding places.")
    reload_interval_s: float = _serve(0.0, "`vlmdet serve` of a Hub repo or published folder: look for a newer "
                                      "revision every N seconds and swap it in without a restart (0 = only on POST "
                                      "/reload).")
    pixel_cap_factor: float = _serve(16.0, "`vlmdet serve`: images with more pixels than this times the model's "
                                     "model.max_pixels are refused with 413, read from the file's header before any "
                                     "decoding (the processor shrinks every image to max_pixels, so more only costs "
                                     "memory: 3 bytes a pixel decoded). 16 x the nightly presets' 0.8 MP is 12.8 MP, "
                                     "so a 12 MP phone photo passes while a 100 KB PNG claiming 400 MP does not; 4 "
                                     "would refuse every phone photo.")
    keep_revisions: int = _serve(2, "`vlmdet serve` of a Hub repo: once a revision serves, keep this many revisions "
                                 "of the repo in the Hugging Face cache (the one serving and the one before it, to "
                                 "roll back to) and delete older ones through huggingface_hub's cache API (a 7B "
                                 "revision is ~15 GB). 0 keeps every revision.")

    def check(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_uploads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name}={getattr(self, name)} must be >= 1.")
        if self.pixel_cap_factor < 1:
            raise ConfigError(f"serve.pixel_cap_factor={self.pixel_cap_factor} must be >= 1: below 1 it refuses "
                              "images the model takes (it resizes them to model.max_pixels itself).")
        if self.keep_revisions < 0:
            raise ConfigError(f"serve.keep_revisions={self.keep_revisions} must be >= 0 (0 keeps every revision).")
        for name in ("max_wait_ms", "max_body_mb", "reload_interval_s"):
            if getattr(self, name) < 0 or (name == "max_body_mb" and self.max_body_mb == 0):
                raise ConfigError(f"serve.{name}={getattr(self, name)} must be positive"
                                  f"{'' if name == 'max_body_mb' else ' or 0'}.")


@dataclass
class RunConfig:
    name: str = _f("custom", "Preset name, recorded in the model card and summary.", "output")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        return _build(cls, data, "")

    def override(self, overrides: dict[str, Any]) -> "RunConfig":
        """Return a copy with dotted keys set, e.g. {"train.max_steps": 10}; values may be strings."""
        data = self.to_dict()
        for key, value in overrides.items():
            _refuse_removed(key)
            section, _, name = key.partition(".")
            hints = _field_types(RunConfig)
            if section not in hints or (name and not dataclasses.is_dataclass(hints[section])):
                raise ConfigError(f"unknown setting {key!r}; known: {', '.join(sorted(all_keys()))}")
            if not name:
                data[section] = _coerce(value, hints[section], key)
                continue
            sub = _field_types(hints[section])
            if name not in sub:
                raise ConfigError(f"unknown setting {key!r}; {section} has: {', '.join(sorted(sub))}")
            data[section][name] = _coerce(value, sub[name], key)
        return RunConfig.from_dict(data)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)  # resolved annotations; the fields only (not ClassVars such as `section`)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = _field_types(cls)
    for key in data:
        _refuse_removed(prefix + key)
    unknown = set(data) - set(hints)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(prefix + u for u in sorted(unknown))}; "
                          f"{prefix.rstrip('.') or 'the preset'} has: {', '.join(sorted(hints))}")
    kwargs = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hints[name], prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Turn a CLI string (or YAML scalar) into the field's type, with an error naming the field."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ, origin = args[0], typing.get_origin(args[0])
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ in (int, float, str):
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return typ(value)
        if origin is list:
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            (inner,) = typing.get_args(typ)
            return [_coerce(v, inner, key) for v in value]
        if origin is dict or typ is dict:
            return dict(yaml.safe_load(value) if isinstance(value, str) else value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}={value!r} is not a valid {getattr(typ, '__name__', typ)}") from err
    return value


def all_keys() -> list[str]:
    """Every overridable dotted key, e.g. train.max_steps."""
    keys = []
    for section, typ in _field_types(RunConfig).items():
        if dataclasses.is_dataclass(typ):
            keys += [f"{section}.{f.name}" for f in dataclasses.fields(typ)]
        else:
            keys.append(section)
    return keys


@dataclass(frozen=True)
class Setting:
    """One dotted setting and what its field declares."""

    key: str
    default: Any
    help: str
    role: str
    applies: tuple[str, ...]
    choices: tuple


def settings() -> dict[str, Setting]:
    """dotted key -> Setting, in declaration order (sections in RunConfig's order)."""
    out = {}
    for section, typ in _field_types(RunConfig).items():
        if dataclasses.is_dataclass(typ):
            default = typ()
            for f in dataclasses.fields(typ):
                out[f"{section}.{f.name}"] = Setting(f"{section}.{f.name}", getattr(default, f.name),
                                                     f.metadata["help"], f.metadata["role"], f.metadata["applies"],
                                                     allowed_values(f))
    return out


def keys_where(role: str | None = None, applies: str | None = None, section: str | None = None) -> tuple[str, ...]:
    """The dotted keys with that role / applying there / in that section, in declaration order."""
    if role is not None and role not in ROLES or applies is not None and applies not in APPLIES:
        raise ValueError(f"keys_where(role={role!r}, applies={applies!r}): roles {list(ROLES)}, applies {list(APPLIES)}")
    return tuple(k for k, s in settings().items() if (role is None or s.role == role)
                 and (applies is None or applies in s.applies) and (section is None or k.startswith(section + ".")))


def names_where(section: str, **where: str) -> tuple[str, ...]:
    """keys_where within one section, as field names (e.g. the eval fields that are execution-only)."""
    return tuple(k.split(".", 1)[1] for k in keys_where(section=section, **where))


def field_help() -> dict[str, tuple[Any, str]]:
    """dotted key -> (default, help) for CLI generation; the help ends with the allowed values, if listed."""
    return {k: (s.default, s.help + (f" One of: {', '.join(map(str, s.choices))}." if s.choices else ""))
            for k, s in settings().items()}


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name_or_path: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """A preset by name (vlmdet/config/presets/NAME.yaml) or by path, then the overrides."""
    # A preset name wins; only then is the argument a path. Path.suffix cannot tell the two apart:
    # "qwen2.5-vl-7b-nutrition" has the suffix ".5-vl-7b-nutrition".
    path = Path(name_or_path)
    if name_or_path in list_presets():
        path = PRESET_DIR / f"{name_or_path}.yaml"
    elif not (path.suffix.lower() in (".yaml", ".yml") or path.is_file()):
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"preset {name_or_path!r} not found; choose one of: {', '.join(list_presets())} "
                          "or pass a path to a YAML file.")
    data = _preset_data(path, [])
    data.setdefault("name", path.stem)
    return RunConfig.from_dict(data).override(overrides or {})


def _preset_data(path: Path, seen: list[Path]) -> dict[str, Any]:
    """A preset file's settings over those of the preset it `extends:` (a name, or a path relative to it)."""
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("extends", None)
    if base is None:
        return data
    seen = seen + [path.resolve()]
    base_path = PRESET_DIR / f"{base}.yaml" if base in list_presets() else (path.parent / base)
    if not base_path.is_file():
        raise ConfigError(f"preset {path}: extends {base!r}, which is neither a shipped preset "
                          f"({', '.join(list_presets())}) nor a file next to it.")
    if base_path.resolve() in seen:
        raise ConfigError(f"preset {path}: extends {base!r}, which extends it back ({' -> '.join(map(str, seen))}).")
    merged = _preset_data(base_path, seen)
    merged.pop("name", None)  # a preset is named after its own file unless it says otherwise
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


CHECK_RUN_TARGET = "local:check-published"


def guard_check_run(config: RunConfig, explicit: set[str] | frozenset[str] = frozenset()) -> tuple[RunConfig, str | None]:
    """A check run (train.max_steps or data.max_images set) never publishes beyond a local folder by accident.

    Returns the config to run and, when it was redirected, a sentence saying so. Any target but a local
    folder (the Hub, or a kind an installed package adds) is replaced by CHECK_RUN_TARGET (a folder under
    the workdir) unless publish.target is among the `explicit` keys (named on the command line or in the
    flow's overrides). A local target is left alone: it is not production.
    """
    reasons = [f"train.max_steps={config.train.max_steps}" if config.train.max_steps > 0 else "",
               f"data.max_images={config.data.max_images}" if config.data.max_images > 0 else ""]
    reasons = [r for r in reasons if r]
    kind, _ = split_spec(config.publish.target, "publish.target")
    if not reasons or kind == "local" or "publish.target" in explicit:
        return config, None
    note = (f"check run ({', '.join(reasons)}): publishing to {CHECK_RUN_TARGET} under the workdir instead of "
            f"{config.publish.target}; pass publish.target explicitly to publish a check run there.")
    return config.override({"publish.target": CHECK_RUN_TARGET}), note
