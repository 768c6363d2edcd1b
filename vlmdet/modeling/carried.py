"""The settings a model carries, one resolver: what a model folder (or a published model's
vlmdet.json) says about how it must be run, laid over a configuration.

- `trained_with`: an adapter's base-loading settings (vlmdet_trained_with.json; a speed profile may
  have loaded the base otherwise than the preset says): its evaluation loads the base alike;
- `answer_settings`: a published model's answer settings (family, pixel budget, prompt, category,
  answer length, ...) from its run configuration, every one of them: the champion is evaluated with
  its own, as it answers in production;
- `config_for_model`: what `vlmdet predict` and `vlmdet serve` detect with: family and pixel budget
  from the folder, prompt and category from its vlmdet.json, unless given explicitly.

Which settings each of these covers is declared with the fields (vlmdet/config/settings.py `applies`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vlmdet.config.settings import RunConfig, keys_where, names_where

log = logging.getLogger(__name__)

META_FILE = "vlmdet.json"  # what a published model carries beside its weights: its run's settings and numbers


def trained_with(model_path: str, config: RunConfig) -> RunConfig:
    """config with the base-loading settings the adapter at model_path was trained with, if it says.

    The train step applies a speed profile (train.profile) the preset does not show: an adapter
    trained on the bf16 base (profile large) is measured on the bf16 base, not on the preset's 4-bit one."""
    from vlmdet.config.profiles import TRAINED_WITH

    path = Path(model_path) / TRAINED_WITH
    if not path.is_file():
        return config
    trained = json.loads(path.read_text()).get("model", {})
    return config.override({f"model.{k}": trained[k] for k in names_where("model", applies="trained_with")
                            if k in trained})


# How a merged model answers (family, pixel budget, prompt, category, answer length, ...; declared with
# each field, vlmdet/config/settings.py applies=("answer",)): a champion is evaluated with its own, all of them.
ANSWER_SETTINGS = keys_where(applies="answer")


def held_answer_settings(run_config: dict[str, Any] | None) -> dict[str, Any]:
    """{dotted key: value} of the ANSWER_SETTINGS that another run's configuration (a vlmdet.json `config`) holds."""
    held = {}
    for key in ANSWER_SETTINGS:
        section, name = key.split(".", 1)
        part = run_config.get(section) if isinstance(run_config, dict) else None
        if isinstance(part, dict) and name in part:
            held[key] = part[name]
    return held


def answer_settings(run_config: dict[str, Any] | None, config: RunConfig) -> RunConfig:
    """config with every answer setting of another run's configuration (a champion's vlmdet.json `config`).

    All or nothing: one left at today's value (a prompt, a category, a pixel budget) would judge the model by
    an answer it was not trained to give. ValueError naming the missing ones."""
    held = held_answer_settings(run_config)
    missing = [key for key in ANSWER_SETTINGS if key not in held]
    if missing:
        raise ValueError(f"answer settings {', '.join(missing)} are missing from the run configuration")
    return config.override(held)


# What a published model was trained to answer: the publish step writes them into its vlmdet.json
# (the run's whole config). Another prompt or category gives worse boxes without any error.
# Declared with each field (vlmdet/config/settings.py, applies=("published",)).
PUBLISHED_SETTINGS = {key: tuple(key.split(".")) for key in keys_where(applies="published")}


def published_settings(model_path: str) -> dict[str, str]:
    """{dotted key: value} of PUBLISHED_SETTINGS from the model folder's vlmdet.json; {} for a folder
    without one (an adapter, a merged folder not yet published, a plain base) or an unreadable one."""

    meta = read_meta(model_path) or {}
    run = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    out = {}
    for key, (section, name) in PUBLISHED_SETTINGS.items():
        value = (run.get(section) or {}).get(name)
        if isinstance(value, str) and value:
            out[key] = value
    category = (meta.get("dataset") or {}).get("category")  # the data's category, where the config lacks it
    if "data.category" not in out and isinstance(category, str) and category:
        out["data.category"] = category
    return out


def config_for_model(model_path: str, config: RunConfig, explicit: set[str] = frozenset()) -> RunConfig:
    """`config` with the family and pixel budget the model folder was saved with, and the prompt and
    category it was published with (its vlmdet.json), unless set in `explicit` (the dotted keys the
    user gave): what `vlmdet predict` and `vlmdet serve` detect with. Logs where prompt and category came from."""
    from vlmdet.modeling.load import family_of, saved_pixel_budget

    overrides = {}
    if "model.family" not in explicit:
        overrides["model.family"] = family_of(model_path)
    budget = saved_pixel_budget(model_path)
    if budget and not explicit & {"model.min_pixels", "model.max_pixels"}:
        overrides.update({"model.min_pixels": budget[0], "model.max_pixels": budget[1]})
    published, sources = published_settings(model_path), {}
    for key in PUBLISHED_SETTINGS:
        if key in explicit:
            sources[key] = "given on the command line"
        elif key in published:
            overrides[key], sources[key] = published[key], f"the model's {META_FILE}"
        else:
            sources[key] = "the settings (preset or defaults; the model has no " + META_FILE + " saying)"
    config = config.override(overrides)
    log.info("prompt %r: %s; category %r: %s", config.model.prompt, sources["model.prompt"], config.data.category,
             sources["data.category"])
    return config


def read_meta(folder: str | Path) -> dict | None:
    """The folder's vlmdet.json, or None where there is none or it is not a readable JSON object."""
    meta = Path(folder) / META_FILE
    if not meta.is_file():
        return None
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError) as err:
        log.warning("%s cannot be read (%s); ignored", meta, err)
        return None
    return data if isinstance(data, dict) else None
