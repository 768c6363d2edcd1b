"""Settings carry their metadata (vlmdet/config/settings.py): a role for every one, the lists derived from it,
allowed values checked generically before anything runs, presets that extend a base."""
from __future__ import annotations

import json
import sys
import typing

import pytest

import vlmdet.config.settings as C
from vlmdet.config.settings import ConfigError, RunConfig, keys_where, load_preset, settings

# What the code listed by hand before the lists were derived (main at 5e78b3c), to show that deriving
# them changed nothing but the fixes named in DELIBERATE_FIXES.
BEFORE = {
    "cli.INFERENCE_SETTINGS": {"model.family", "model.quantization", "model.quantize_vision", "model.dtype",
                               "model.min_pixels", "model.max_pixels", "model.attn_implementation", "model.prompt",
                               "data.category", "eval.batch_size", "eval.max_new_tokens"},
    "cli.SERVE_SETTINGS (beyond inference)": {"serve.max_batch_size", "serve.max_wait_ms", "serve.max_queue",
                                              "serve.max_body_mb", "serve.reload_interval_s", "publish.endpoint"},
    "keys.EVAL_EXECUTION_ONLY": {"timeout_s", "workers", "num_processes"},
    "keys.training_key execution-only": {"profile", "timeout_s", "num_processes", "dataloader_workers",
                                         "logging_steps"},
    "keys.evaluation_key leaves out": {"timeout_s", "workers", "num_processes", "preview_images"},
    "keys.decision_settings": {f"gate.{f}" for f in ("threshold", "metric", "min_delta", "min_probability",
                                                     "resamples", "seed")}
    | {f"publish.{f}" for f in ("target", "endpoint", "private", "token_secret", "license")},
    "champion._ANSWER_SETTINGS": {"family", "min_pixels", "max_pixels", "prompt", "dtype", "attn_implementation"},
    "evaluation.trained_model_settings": {"quantization", "dtype", "quantize_vision"},
    "prediction.cli.PUBLISHED_SETTINGS (now carried.PUBLISHED_SETTINGS)": {"model.prompt", "data.category"},
}
# eval.cache was documented as "same tokens" yet missing from EVAL_EXECUTION_ONLY, so changing it
# evaluated again (and changed the run key): it is execution, as its help says. Then eval.workers and
# eval.cache went altogether (measured slower; settings.REMOVED), so neither is listed anywhere.
DELIBERATE_FIXES = {"keys.EVAL_EXECUTION_ONLY": {"cache"}, "keys.evaluation_key leaves out": {"cache"}}
REMOVED = {"keys.EVAL_EXECUTION_ONLY": {"cache", "workers"}, "keys.evaluation_key leaves out": {"cache", "workers"}}


# The settings that existed then: a setting added since (a serve option, a gate option) joins the derived
# lists by its own declaration, which this comparison is not about.
BASELINE = {
    "data": "dataset seed val_fraction test_fraction category image_size max_images",
    "model": "base family quantization quantize_vision dtype min_pixels max_pixels attn_implementation prompt",
    "lora": "r alpha dropout target_modules exclude modules_to_save",
    "train": "epochs max_steps per_device_batch grad_accum learning_rate scheduler warmup_steps weight_decay bf16 "
             "gradient_checkpointing save_steps save_total_limit logging_steps seed num_processes timeout_s "
             "dataloader_workers adapter_dtype profile checkpoint_every group_by_length optim pre_resize",
    "eval": "batch_size max_new_tokens split eval_base preview_images timeout_s cache workers num_processes "
            "val_max_images",
    "gate": "threshold metric min_delta min_probability resamples seed",
    "publish": "target endpoint private token_secret license merge_timeout_s",
    "serve": "max_batch_size max_wait_ms max_queue max_body_mb reload_interval_s",
}
BASELINE_KEYS = {f"{section}.{name}" for section, names in BASELINE.items() for name in names.split()}


def _baseline(name: str, items: set[str]) -> set[str]:
    """`items` of list `name` that were settings at the baseline (items are dotted keys or, for the lists
    of one section, field names)."""
    section = {"keys.EVAL_EXECUTION_ONLY": "eval", "keys.evaluation_key leaves out": "eval",
               "keys.training_key execution-only": "train", "champion._ANSWER_SETTINGS": "model",
               "evaluation.trained_model_settings": "model"}.get(name)
    return {i for i in items if (f"{section}.{i}" if section else i) in BASELINE_KEYS}


def derived() -> dict[str, set[str]]:
    from vlmdet.modeling import carried
    from vlmdet import cli
    from vlmdet.run import keys

    base = RunConfig()
    return {
        "cli.INFERENCE_SETTINGS": set(cli.INFERENCE_SETTINGS),
        "cli.SERVE_SETTINGS (beyond inference)": set(cli.SERVE_SETTINGS) - set(cli.INFERENCE_SETTINGS),
        "keys.EVAL_EXECUTION_ONLY": set(keys.EVAL_EXECUTION_ONLY),
        "keys.training_key execution-only": set(keys.TRAIN_EXECUTION_ONLY),
        "keys.evaluation_key leaves out": {n for n in C.names_where("eval") if keys.evaluation_key(
            base.override({f"eval.{n}": _other(f"eval.{n}")}), "fp") == keys.evaluation_key(base, "fp")},
        "keys.decision_settings": {f"{s}.{n}" for s, d in keys.decision_settings(base).items() for n in d},
        "champion._ANSWER_SETTINGS": set(C.names_where("model", applies="answer")),
        "evaluation.trained_model_settings": set(C.names_where("model", applies="trained_with")),
        "prediction.cli.PUBLISHED_SETTINGS (now carried.PUBLISHED_SETTINGS)": set(carried.PUBLISHED_SETTINGS),
    }


# where the first other allowed value cannot stand in a built run: train.profile=auto is resolved before
# any step or key sees it (vlmdet.pipeline.run.resolve)
NO_GENERIC_FLIP = {"train.profile": "qlora"}


def _other(key: str, config: RunConfig | None = None):
    """A valid value of `key` other than its value in `config` (the defaults when None), built from the
    setting's declared allowed values, else its type."""
    section, name = key.split(".")
    current = getattr(getattr(config or RunConfig(), section), name)
    if key in NO_GENERIC_FLIP:
        return NO_GENERIC_FLIP[key]
    s = settings()[key]
    if s.choices:
        return next(c for c in s.choices if c != current)
    if isinstance(current, bool):
        return not current
    if isinstance(current, list):
        (inner,) = typing.get_args(C._field_types(type(getattr(RunConfig(), section)))[name])
        return current + [{int: 1, str: "x"}[inner]]
    if isinstance(current, float):
        return current / 2 if current else 0.5  # stays a probability, a fraction, a rate
    return current + 2 if isinstance(current, int) else current + "x"  # -1 + 2: max_steps stays valid


def test_every_setting_declares_a_role_and_where_it_applies():
    every = settings()
    assert set(every) == {k for k in C.all_keys() if "." in k}
    for key, s in every.items():
        assert s.role in C.ROLES and set(s.applies) <= set(C.APPLIES), key
        assert s.help, key


def test_the_derived_lists_equal_the_hand_written_ones_but_for_the_named_fixes():
    got = derived()
    for name, before in BEFORE.items():
        fix = DELIBERATE_FIXES.get(name, set())
        assert _baseline(name, got[name]) == (before | fix) - REMOVED.get(name, set()), name


# --- what flipping each setting moves: the product's own cache keys, against an independent statement ----------
# What each setting is for, written here independently of its declaration in vlmdet/config/settings.py (the keys are
# derived from that declaration, so comparing them with it alone could never fail): the role of its section,
# and the settings that differ from their section, each with why. A setting added to config.py takes its
# section's role here; one that differs must be named below too, where a reviewer sees it.
SECTION_ROLE = {"data": "learned", "model": "learned", "lora": "learned", "train": "learned", "eval": "measured",
                "gate": "decided", "publish": "decided", "serve": "execution"}
NOT_THEIR_SECTIONS = {
    "train.logging_steps": "execution",  # how often the loss is logged
    "train.num_processes": "execution",  # the effective batch is kept on any number of GPUs
    "train.timeout_s": "execution",
    "train.dataloader_workers": "execution",  # where images are decoded
    "train.profile": "execution",  # what a profile sets is in the fields it sets
    "train.ddp_find_unused": "execution",  # a graph walk; every trainable weight gets a gradient either way
    "train.report_to": "execution",  # which tracker shows the loss, not what is learned
    "eval.preview_images": "output",  # a picture beside the numbers
    "eval.timeout_s": "execution",
    "eval.num_processes": "execution",  # each process detects every Nth image: the same answers
    "eval.val_max_images": "learned",  # validation picks the checkpoint that becomes the adapter
    "publish.merge_timeout_s": "execution",
}
# measured, and also the validation that picks the checkpoint (vlmdet.training.select): the training key too
ALSO_PICKS_THE_CHECKPOINT = {"eval.batch_size", "eval.max_new_tokens"}


def expected_role(key: str) -> str:
    return NOT_THEIR_SECTIONS.get(key, SECTION_ROLE[key.split(".")[0]])


FP = "fingerprint-of-the-prepared-data"


def step_keys(config: RunConfig, root) -> dict[str, object]:
    """Every cache key a run is looked up by (tasks/*.py cache_key_fn, the markers of vlmdet.pipeline.steps, and
    the two halves of the pipeline's "nothing new since" check), for one configuration."""
    from vlmdet.run.keys import decision_settings, evaluation_key
    from vlmdet.run.layout import RunLayout
    from vlmdet.run.records import AdapterRef, DatasetRef

    layout = RunLayout.at(root)
    data = DatasetRef(fingerprint=FP, root=str(root), splits={}, counts={})
    # a fixed adapter folder: that training changed reaches the evaluate and merge keys through the
    # folder's files (keys.path_stamp), which this comparison holds still
    adapter = AdapterRef(path=str(root / "adapter"), base_model=config.model.base, family=config.model.family,
                         global_step=1)
    return {"prepare": layout.prepare_key(config, config.data.dataset),
            "train": layout.train_key(data, config),
            "evaluate": layout.eval_key(adapter.path, data, config, "adapter"),
            "merge": layout.merge_key(adapter, data, config),
            "run": evaluation_key(config, FP),
            "decide": decision_settings(config)}


# A run configuration the layout accepts (train.profile=auto is resolved before any key is made).
def _base() -> RunConfig:
    return RunConfig().override({"train.profile": "preset"})


def _moved(key: str, root) -> set[str]:
    base = _base()
    before, after = step_keys(base, root), step_keys(base.override({key: _other(key, base)}), root)
    return {step for step in before if before[step] != after[step]}


@pytest.fixture
def families_listed_once(monkeypatch):
    """Every configuration built checks model.family against the installed families, an entry-point scan
    (~0.1 s); these tests build a few hundred with the same packages installed."""
    from vlmdet.formats import base

    monkeypatch.setattr(base, "families", lambda known=base.families(): dict(known))


def test_each_settings_flip_moves_the_keys_its_role_promises(tmp_path, families_listed_once):
    """Flip every setting to another valid value and watch which of the product's cache keys move: learned
    ones retrain (the prepare key for data, the training key otherwise), measured ones evaluate again
    without retraining, decided ones decide again on the saved results and nothing else, output ones
    touch no result, execution ones no key at all. A setting declared with a role its effect does not
    have (a decided one declared execution: changing it would skip the run as "nothing new") fails here."""
    wrong = {}
    for key, s in settings().items():
        role, moved = expected_role(key), _moved(key, tmp_path)
        if role == "learned":
            ok = ("prepare" if key.startswith("data.") else "train") in moved and "decide" not in moved
        elif role == "measured":
            ok = {"evaluate", "run"} <= moved and "decide" not in moved \
                and ("train" in moved) == (key in ALSO_PICKS_THE_CHECKPOINT)
        elif role == "decided":
            ok = moved == {"decide"}
        elif role == "output":
            ok = not moved & {"prepare", "train", "run", "decide"}
        else:
            ok = moved == set()
        if not ok or s.role != role:
            wrong[key] = f"declared {s.role}, is {role}; flipping it moved {sorted(moved) or 'no key'}"
    assert not wrong, wrong


def test_the_batch_split_is_execution_and_the_effective_batch_learned(tmp_path, families_listed_once):
    base = _base()
    same = base.override({"train.per_device_batch": base.train.per_device_batch * 2,
                          "train.grad_accum": base.train.grad_accum // 2})
    assert step_keys(same, tmp_path) == step_keys(base, tmp_path)
    assert {"train", "run"} <= _moved("train.grad_accum", tmp_path)


def _gate_scenarios(tmp_path):
    """The gate's inputs in each of its branches: no champion, a champion that cannot be judged (content,
    with the revision seen), and a readable one scored on the same images with the paired bootstrap."""
    from PIL import Image

    from vlmdet.run.records import CONTENT, Champion, EvalReport

    images, anns = [], []
    for i in range(1, 9):
        Image.new("RGB", (100, 80)).save(tmp_path / f"im{i}.png")
        images.append({"id": i, "file_name": f"im{i}.png", "width": 100, "height": 80})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0})
    gt = tmp_path / "test.json"
    gt.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "t"}]}))

    def report(name: str, hits: set[int]) -> EvalReport:
        preds = [{"image_id": i, "category_id": 1, "bbox": [10 if i in hits else 50, 10, 40, 30], "score": 0.5 + i / 100}
                 for i in range(1, 9)]
        (tmp_path / f"{name}.json").write_text(json.dumps(preds))
        share = len(hits) / 8
        return EvalReport(map=share / 2, map50=share, map75=share / 3, split="test", num_images=8, parse_failures=0,
                          predictions=str(tmp_path / f"{name}.json"))

    new, old = report("new", {1, 2, 3, 4, 5, 6}), report("old", {1, 2, 3, 7})
    unreadable = Champion(metrics={}, source="local:published", revision="r1", unreadable="no vlmdet.json",
                          fault=CONTENT)
    readable = Champion(metrics={"map50": 0.5}, source="local:published", revision="r1")
    return str(gt), new, old, unreadable, readable


def _decisions(config: RunConfig, scenarios) -> list[dict]:
    from vlmdet.decide.gate import compare, decide

    gt, new, old, unreadable, readable = scenarios
    comparison, _, _ = compare(new, old, gt, config.gate)
    return [decide(new, config.gate, None).to_dict(), decide(new, config.gate, unreadable).to_dict(),
            decide(new, config.gate, readable, comparison).to_dict()]


def test_every_gate_setting_changes_a_decision_and_so_the_decision_key(tmp_path, families_listed_once):
    """Independent of any declaration: the real gate (vlmdet.decide.gate.compare and decide) is run in each branch
    with each gate setting flipped; a setting that changes a decision must move the key the pipeline
    decides again on, or a run with it changed would be skipped as already decided."""
    base, scenarios = _base().override({"gate.resamples": 200}), _gate_scenarios(tmp_path)
    before = _decisions(base, scenarios)
    unmoved = {}
    for key in keys_where(section="gate"):
        changed = _decisions(base.override({key: _other(key, base)}), scenarios) != before
        moves = "decide" in _moved(key, tmp_path)
        if not (changed and moves):
            unmoved[key] = f"changes a decision: {changed}; moves the decision key: {moves}"
    assert not unmoved, unmoved


@pytest.mark.parametrize("key,value", [("model.family", "qwen9_vl"), ("train.scheduler", "cosin"),
                                       ("model.attn_implementation", "flash"), ("train.profile", "fast"),
                                       ("gate.metric", "map90"), ("model.dtype", "fp8")])
def test_an_unknown_value_fails_when_the_config_is_built_naming_the_allowed_ones(key, value):
    with pytest.raises(ConfigError) as err:
        load_preset("smoke", {key: value})
    message = str(err.value)
    assert f"{key}={value!r}" in message
    assert all(str(c) in message for c in settings()[key].choices)


def test_a_publish_target_without_a_kind_fails_when_the_config_is_built():
    # an unknown kind fails where the run resolves its target, which knows the installed kinds (tests/test_targets.py)
    with pytest.raises(ConfigError, match=r"publish.target='org/x' is not a target spec; use KIND:REST"):
        RunConfig().override({"publish.target": "org/x"})


def test_the_retrain_command_fails_on_a_wrong_family_before_prefect_or_torch(capsys, monkeypatch):
    from vlmdet.cli import main

    monkeypatch.delitem(sys.modules, "flows.retrain", raising=False)
    assert main(["retrain", "--model.family", "llava", "--workdir", "unused"]) == 2
    err = capsys.readouterr().err
    assert "model.family='llava'" in err and "qwen2_5_vl" in err
    assert "flows.retrain" not in sys.modules


def test_the_allowed_schedulers_are_transformers_ones():
    from transformers.trainer_utils import SchedulerType

    assert set(C.SCHEDULERS) <= {s.value for s in SchedulerType}


def test_a_preset_extends_a_base_and_overrides_only_what_it_names(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  max_steps: 7\n  learning_rate: 0.01\nlora:\n  r: 4\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain:\n  max_steps: 9\n")
    child = load_preset(str(tmp_path / "child.yaml"))
    assert (child.train.max_steps, child.train.learning_rate, child.lora.r, child.name) == (9, 0.01, 4, "child")
    (tmp_path / "shipped.yaml").write_text("extends: smoke\nlora:\n  r: 2\n")
    shipped = load_preset(str(tmp_path / "shipped.yaml"))
    assert shipped.lora.r == 2 and shipped.model.base == load_preset("smoke").model.base
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends"):
        load_preset(str(tmp_path / "loop.yaml"))
    assert keys_where(role="execution", section="serve")  # serve.* are execution settings


def test_a_removed_setting_stops_the_run_naming_what_replaced_it(tmp_path):
    """eval.workers and eval.cache were taken out after measurement: a preset or override that still sets one is
    refused at load, by name, with what does its work, instead of running on a value nothing reads."""
    (tmp_path / "old.yaml").write_text("extends: smoke\neval:\n  workers: 4\n")
    with pytest.raises(ConfigError, match=r"^eval\.workers is not a setting any more: .*one background thread"):
        load_preset(str(tmp_path / "old.yaml"))
    with pytest.raises(ConfigError, match=r"^eval\.cache is not a setting any more: .*dynamic KV cache"):
        load_preset("smoke").override({"eval.cache": "static"})
