"""The command-line contracts other tools rely on (DESIGN.md), and settings derived from the config."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from vlmdet.cli import main, parser
from vlmdet.config.settings import ConfigError, RunConfig, all_keys, list_presets, load_preset


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmdet.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands():
    out = _run("--help")
    assert out.returncode == 0
    for command in ("synth", "score", "retrain", "train", "evaluate", "predict", "retries"):
        assert command in out.stdout


def test_synth_then_score_perfect_predictions(tmp_path):
    assert _run("synth", "--out", str(tmp_path / "d"), "--num", "6", "--seed", "2").returncode == 0
    coco = json.loads((tmp_path / "d" / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["nutrition-table"]
    assert all((tmp_path / "d" / im["file_name"]).is_file() for im in coco["images"])
    preds = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
             for a in coco["annotations"]]
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    out = _run("score", "--gt", str(tmp_path / "d" / "annotations.json"), "--pred", str(tmp_path / "pred.json"))
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(scores) == {"map", "map50", "map75"} and scores["map"] == pytest.approx(1.0)


def test_every_setting_is_an_option_with_the_dataclass_default():
    commands = parser()._subparsers._group_actions[0].choices
    # retrain takes every setting but serve.*, which only `vlmdet serve` reads
    actions = {a.dest: a for name in ("retrain", "serve") for a in commands[name]._actions}
    for key in all_keys():
        if key == "name":
            continue
        assert f"set:{key}" in actions, key
    assert "[default 64]" in actions["set:lora.r"].help  # help and default come from config.py


def test_overrides_are_typed_and_checked():
    cfg = RunConfig().override({"train.max_steps": "10", "train.bf16": "false", "lora.target_modules": "q_proj,v_proj",
                                "model.max_pixels": "401408"})
    assert cfg.train.max_steps == 10 and cfg.train.bf16 is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.model.max_pixels == 401408
    with pytest.raises(ConfigError, match="unknown setting 'train.max_step'"):
        RunConfig().override({"train.max_step": 3})
    with pytest.raises(ConfigError, match="train.max_steps='ten' is not a valid int"):
        RunConfig().override({"train.max_steps": "ten"})
    with pytest.raises(ConfigError, match="model.quantization='int3'"):
        RunConfig().override({"model.quantization": "int3"})


def test_presets_load_and_the_seed_recipe_is_the_seed_recipe():
    assert {"smoke", "qwen2-vl-7b-nutrition", "seed-recipe"} <= set(list_presets())
    seed = load_preset("seed-recipe")
    assert (seed.model.base, seed.model.quantization) == ("Qwen/Qwen2-VL-7B-Instruct", "nf4")
    assert (seed.lora.r, seed.lora.alpha, seed.lora.dropout) == (64, 16, 0.1)
    assert seed.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (seed.train.per_device_batch, seed.train.grad_accum, seed.train.learning_rate) == (2, 8, 1e-5)
    assert (seed.train.scheduler, seed.train.epochs, seed.train.warmup_steps) == ("cosine", 3, 50)
    assert seed.train.bf16 and seed.train.gradient_checkpointing
    # exactly as originally run: the whole model nf4, adapters in the bf16 TRL casts them to
    assert seed.model.quantize_vision and seed.train.adapter_dtype == "bfloat16"


def test_bad_setting_on_the_command_line_is_a_clear_error(capsys):
    assert main(["retrain", "--preset", "smoke", "--set", "train.max_steps=ten"]) == 2
    assert "train.max_steps='ten' is not a valid int" in capsys.readouterr().err
    assert main(["retrain", "--preset", "no-such-preset"]) == 2
    assert "choose one of" in capsys.readouterr().err


def test_every_preset_loads_by_name_even_with_dots_and_paths_still_work(tmp_path, monkeypatch):
    # "qwen2.5-vl-7b-nutrition" has a Path suffix (".5-vl-7b-nutrition"); a name must still win.
    for name in list_presets():
        assert load_preset(name).name == name
    assert "qwen2.5-vl-7b-nutrition" in list_presets()
    assert load_preset("qwen2.5-vl-7b-nutrition").model.family == "qwen2_5_vl"
    (tmp_path / "mine.yml").write_text("name: mine\ntrain:\n  max_steps: 3\n")
    assert load_preset(str(tmp_path / "mine.yml")).train.max_steps == 3
    # An existing file is a path whatever its ending.
    (tmp_path / "my.v2").write_text("train:\n  max_steps: 5\n")
    assert load_preset(str(tmp_path / "my.v2")).train.max_steps == 5
    with pytest.raises(ConfigError, match="choose one of"):
        load_preset("qwen9.9-vl-nothing")
    with pytest.raises(ConfigError, match="choose one of"):
        load_preset(str(tmp_path / "missing.yaml"))


def test_predict_uses_the_built_in_defaults_unless_a_preset_is_named(tmp_path, monkeypatch):
    # The smoke preset's short answers cut a JSON box; without --preset predict takes RunConfig's.
    import vlmdet.prediction.files as pcli

    seen = {}

    def fake_predict_files(model, files, out, config, explicit, echo=None):
        seen.update(config=config, explicit=explicit)
        return out / "predictions.json"

    monkeypatch.setattr(pcli, "predict_files", fake_predict_files)
    img = tmp_path / "a.jpg"
    img.write_bytes(b"")
    base = ["predict", "--model", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(base + [str(img)]) == 0
    assert seen["config"] == RunConfig()
    assert seen["config"].eval.max_new_tokens != load_preset("smoke").eval.max_new_tokens
    assert main(base + ["--preset", "smoke", "--eval.batch_size", "3", str(img)]) == 0
    assert seen["config"] == load_preset("smoke", {"eval.batch_size": 3})
    assert seen["explicit"] == {"eval.batch_size"}
    assert main(base + ["--eval.max_new_tokens", "200", str(img)]) == 0
    assert seen["config"].eval.max_new_tokens == 200 and seen["config"].data == RunConfig().data


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        parser().parse_args([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_every_commands_help_is_readable(capsys):
    # argparse %-formats help text: train.gradient_checkpointing's "~30% slower" once printed the
    # argparse action's dict in place of "30%".
    commands = parser()._subparsers._group_actions[0].choices
    for command in commands:
        text = _help(capsys, command)
        assert "{'option_strings'" not in text and "%(" not in text, command
    assert "~30% slower" in _help(capsys, "retrain")


def test_predict_help_lists_only_the_settings_prediction_reads(capsys):
    from vlmdet.cli import INFERENCE_SETTINGS

    text = _help(capsys, "predict")
    listed = set(re.findall(r"--((?:model|data|eval|train|lora|gate|publish|serve)\.\w+)", text))
    assert listed == set(INFERENCE_SETTINGS)
    assert {"model.prompt", "data.category", "eval.batch_size", "eval.max_new_tokens"} <= listed
    retrain = set(re.findall(r"--((?:model|data|eval|train|lora|gate|publish|serve)\.\w+)", _help(capsys, "retrain")))
    assert retrain == {k for k in all_keys() if "." in k and not k.startswith("serve.")}  # retrain: all but serve's


def test_add_settings_is_the_hook_for_another_command():
    # what `vlmdet serve` does: its own parser, the inference settings, inference_config()
    import argparse

    from vlmdet.cli import INFERENCE_SETTINGS, add_settings, inference_config

    p = argparse.ArgumentParser()
    p.add_argument("--preset", default=None)
    add_settings(p, INFERENCE_SETTINGS)
    args = p.parse_args(["--eval.batch_size", "3", "--set", "model.prompt=Find the {category}."])
    args.command = "serve"
    cfg = inference_config(args)
    assert cfg.eval.batch_size == 3 and cfg.model.prompt == "Find the {category}."
    args = p.parse_args(["--set", "lora.r=4"])
    args.command = "serve"
    with pytest.raises(ConfigError, match="`vlmdet serve` does not use this setting"):
        inference_config(args)


def test_a_skipped_rerun_says_the_gate_and_publication_are_the_earlier_runs(capsys, tmp_path):
    # "no champion published at the target yet" was true when that run decided, not now that it published
    from vlmdet.pipeline.show import summary_text

    m = {"map": 0.7, "map50": 0.9, "map75": 0.8}
    summary = {"metrics": m, "adapter": "a", "published": {"target": "local:published"}, "skipped": True,
               "skip_reason": "data, configuration and base model unchanged since 2026-11-27T02:00:00",
               "gate": {"passed": True, "reason": "map50=0.9000 >= threshold 0.5000; no champion published at the target yet."}}
    print(summary_text(summary, tmp_path / "summary.json"))
    out = capsys.readouterr().out
    assert "Nothing new: data, configuration and base model unchanged since 2026-11-27T02:00:00" in out
    assert "gate (that run): PASSED" in out and "published (that run): local:published" in out
    print(summary_text(dict(summary, skipped=False), tmp_path / "summary.json"))
    out = capsys.readouterr().out
    assert "gate:      PASSED" in out and "(that run)" not in out


def test_the_summary_table_has_the_champions_row_when_the_gate_measured_one(capsys, tmp_path):
    from vlmdet.pipeline.show import summary_text

    summary = {"metrics": {"map": 0.71, "map50": 0.9, "map75": 0.8}, "adapter": "a", "published": None,
               "champion_metrics": {"map": 0.655, "map50": 0.812, "map75": 0.7},
               "gate": {"passed": False, "reason": "map50=0.9000 vs champion 0.8120: not better often enough"}}
    print(summary_text(summary, tmp_path / "summary.json"))
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(f"{'model':<12}{'mAP':>8}{'mAP50':>8}{'mAP75':>8}") + 1:][:2]
    assert table == ["fine-tuned     0.710   0.900   0.800",
                     "champion       0.655   0.812   0.700"]
    print(summary_text(dict(summary, champion_metrics=None), tmp_path / "summary.json"))  # no champion at the target: no row
    assert "champion  " not in capsys.readouterr().out
