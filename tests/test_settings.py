"""Settings carry their metadata (vlmdet/config.py): a role for every one, the lists derived from it,
allowed values checked generically before anything runs, presets that extend a base."""
from __future__ import annotations

import sys

import pytest

from vlmdet import config as C
from vlmdet.config import ConfigError, RunConfig, keys_where, load_preset, settings

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
# eval.cache went altogether (measured slower; config.DEPRECATED), so neither is listed anywhere now.
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
    from vlmdet import carried, cli, keys

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


def _other(key: str):
    """A valid value of `key` other than its default."""
    s = settings()[key]
    if s.choices:
        return next(c for c in s.choices if c != s.default)
    if isinstance(s.default, bool):
        return not s.default
    if isinstance(s.default, list):
        return s.default + ["x"]
    if isinstance(s.default, float):
        return s.default / 2 if s.default else 0.5  # stays a probability, a fraction, a rate
    return s.default + 2 if isinstance(s.default, int) else s.default + "x"  # -1 + 2: max_steps stays valid


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


def test_a_setting_of_another_role_changes_the_key_it_should():
    """What the roles promise, on the keys: learned settings change the training key, measured ones the
    evaluation key only, decided ones neither, execution ones nothing."""
    from vlmdet.keys import decision_settings, evaluation_key, training_key

    base = RunConfig()
    for key, s in settings().items():
        if key.startswith(("serve.", "data.")) or key in ("train.per_device_batch", "train.grad_accum"):
            continue  # serve: no run key; data: through the fingerprint; the batch split: as its product
        other = base.override({key: _other(key)})
        train_moved = training_key(other, "fp") != training_key(base, "fp")
        eval_moved = evaluation_key(other, "fp") != evaluation_key(base, "fp")
        decided_moved = decision_settings(other) != decision_settings(base)
        expected = {"learned": (True, True, False), "measured": (False, True, False),
                    "decided": (False, False, True), "output": (False, False, False),
                    "execution": (False, False, False)}[s.role]
        # batch size and answer length also measure the validation that picks the checkpoint
        if key in ("eval.batch_size", "eval.max_new_tokens"):
            expected = (True, True, False)
        assert (train_moved, eval_moved, decided_moved) == expected, key


@pytest.mark.parametrize("key,value", [("model.family", "qwen9_vl"), ("train.scheduler", "cosin"),
                                       ("model.attn_implementation", "flash"), ("train.profile", "fast"),
                                       ("gate.metric", "map90"), ("model.dtype", "fp8")])
def test_an_unknown_value_fails_when_the_config_is_built_naming_the_allowed_ones(key, value):
    with pytest.raises(ConfigError) as err:
        load_preset("smoke", {key: value})
    message = str(err.value)
    assert f"{key}={value!r}" in message
    assert all(str(c) in message for c in settings()[key].choices)


def test_a_wrong_publish_target_fails_with_the_forms_it_takes():
    with pytest.raises(ConfigError, match=r"publish.target='hf:org/x'.*local:DIR.*hub:ORG/NAME"):
        RunConfig().override({"publish.target": "hf:org/x"})


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


def test_a_removed_setting_still_loads_with_a_one_line_warning(tmp_path, caplog, capsys):
    from vlmdet.cli import main, parser, settings_overrides

    (tmp_path / "old.yaml").write_text("extends: smoke\neval:\n  workers: 4\n  cache: static\n")
    with caplog.at_level("WARNING", logger="vlmdet.config"):
        old = load_preset(str(tmp_path / "old.yaml"), {"eval.workers": 2})
    assert old.eval == load_preset("smoke").eval
    warned = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("eval.workers is deprecated and ignored") for m in warned)
    assert any(m.startswith("eval.cache is deprecated and ignored") for m in warned)
    # the command line takes them too (not listed in --help)
    args = parser().parse_args(["predict", "--model", "m", "--out", "o", "--eval.workers", "4",
                                "--set", "eval.cache=static", "x.jpg"])
    assert settings_overrides(args) == {"eval.workers": "4", "eval.cache": "static"}
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "eval.workers" not in capsys.readouterr().out
