"""A malformed champion is a reason, not a crash (issue 26): whatever a target holds that vlmdet cannot
judge (a vlmdet.json or card of the wrong shape, pickle-only or no weights, no processor, an answer
setting missing) closes the gate with the file and the field named, fault "content", so that
`gate.replace_unreadable_champion` can replace exactly these on purpose. A champion vlmdet published
itself is complete, and it is evaluated with every one of its own answer settings.

Champions are real publications (vlmdet.publishing on a tiny model) damaged by hand, read back through
`read_champion_folder` (and through the Hub reader against tests/hub_server.py for two cases).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pubkit import NO_SLEEP, online_classic_lfs, records
from vlmdet import publishing
from vlmdet.modeling.carried import ANSWER_SETTINGS
from vlmdet.decide.champion import champion_config, needs_measuring
from vlmdet.config.settings import RunConfig
from vlmdet.decide.gate import decide
from vlmdet.publishing.local import read_champion_folder

REPLACE = {"gate.replace_unreadable_champion": True}
TOKEN = "hf_testwritetoken"
REPO = "acme/nutrition-detector"


def _cfg(target: str = "local:published", **over) -> RunConfig:
    return RunConfig(name="smoke").override({"publish.target": target, **over})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_model) -> Path:
    """A champion exactly as vlmdet publishes it to a local folder (map50 0.70)."""
    root = tmp_path_factory.mktemp("pristine")
    publishing.publish(*records(root / "run", Path(tiny_model), map50=0.70), _cfg(), root)
    return root / "published"


@pytest.fixture
def target(tmp_path, pristine) -> Path:
    """A copy of the pristine champion at tmp_path/published, to damage."""
    shutil.copytree(pristine, tmp_path / "published")
    return tmp_path / "published"


def _edit_meta(target: Path, edit) -> None:
    meta = json.loads((target / "vlmdet.json").read_text())
    edit(meta)
    (target / "vlmdet.json").write_text(json.dumps(meta))


def _front_matter(target: Path, front: str) -> None:
    """The card with its YAML front matter replaced by `front` (the body kept)."""
    card = (target / "README.md").read_text()
    body = card.split("\n---\n", 1)[1]
    (target / "README.md").write_text(f"---\n{front}\n---\n{body}")


def _unset(key: str):
    section, name = key.split(".")
    return lambda meta: meta["config"][section].pop(name)


def _set(field: str, value):
    return lambda meta: meta.__setitem__(field, value)


# (damage, what the reason must say: the file and the field)
CASES = {
    "eval a str": (lambda t: _edit_meta(t, _set("eval", "test")),
                   "vlmdet.json: `eval` is a string ('test'), expected a mapping"),
    "metrics a list": (lambda t: _edit_meta(t, _set("metrics", [0.7, 0.5])),
                       "vlmdet.json: `metrics` is a list ([0.7, 0.5]), expected a mapping"),
    "config a list": (lambda t: _edit_meta(t, _set("config", ["qwen2_vl"])),
                      "vlmdet.json: `config` is a list (['qwen2_vl']), expected a mapping"),
    "run_id a number": (lambda t: _edit_meta(t, _set("run_id", 7)),
                        "vlmdet.json: `run_id` is an integer (7), expected a string"),
    "a metric a str": (lambda t: _edit_meta(t, lambda m: m["metrics"].__setitem__("map50", "0.7")),
                       "vlmdet.json: `metrics.map50` is a string ('0.7'), expected a number"),
    "config.model a str": (lambda t: _edit_meta(t, lambda m: m["config"].__setitem__("model", "qwen2_vl")),
                           "vlmdet.json: `config.model` is a string ('qwen2_vl'), expected a mapping"),
    "a pixel budget a str": (lambda t: _edit_meta(t, lambda m: m["config"]["model"].__setitem__("max_pixels", "1M")),
                             "vlmdet.json: `config.model.max_pixels` is a string ('1M'), expected an integer"),
    "a pixel budget upside down": (
        lambda t: _edit_meta(t, lambda m: m["config"]["model"].__setitem__("min_pixels", 10 ** 9)),
        "vlmdet.json: `config.model` holds answer settings this vlmdet refuses: model.min_pixels=1000000000 exceeds "
        "model.max_pixels"),
    "front matter a list": (lambda t: _front_matter(t, "- license: apache-2.0\n- tags: [vlmdet]"),
                            "README.md: its front matter is a list ("),
    "front matter not YAML": (lambda t: _front_matter(t, "license: apache-2.0\ntags: [vlmdet, object-detection"),
                              "README.md: its front matter (between the two `---` lines) is not valid YAML at line 3"),
    "model-index results an int": (lambda t: _front_matter(t, "model-index:\n- name: x\n  results: 5"),
                                   "README.md: its front matter's `model-index[0].results` is an integer (5), "
                                   "expected a list"),
    "model-index a mapping": (lambda t: _front_matter(t, "model-index:\n  name: x"),
                              "README.md: its front matter's `model-index` is a mapping ({'name': 'x'}), "
                              "expected a non-empty list"),
    "model-index without a dataset name": (
        lambda t: _front_matter(t, "model-index:\n- name: x\n  results:\n  - task: {type: object-detection}\n"
                                   "    dataset: {type: x}\n    metrics: [{type: map50, value: 0.7}]"),
        "README.md: its front matter's `model-index` is not the Hub's shape"),
    "pickle-only weights": (lambda t: ((t / "model.safetensors").rename(t / "pytorch_model.bin")),
                            "its weights are pickle files only (pytorch_model.bin) and no *.safetensors"),
    "no weights": (lambda t: (t / "model.safetensors").unlink(), "it has no weights (no *.safetensors file)"),
    "no tokenizer": (lambda t: (t / "tokenizer.json").unlink(),
                     "it has no tokenizer (tokenizer.json or vocab.json + merges.txt)"),
    "no image processor config": (lambda t: (t / "processor_config.json").unlink(),
                                  "it has no image processor config (preprocessor_config.json or "
                                  "processor_config.json)"),
    **{f"no {key}": (lambda t, key=key: _edit_meta(t, _unset(key)), f"vlmdet.json: `config.{key}` is missing")
       for key in ANSWER_SETTINGS},
}


def test_the_cases_cover_every_answer_setting_the_issue_names():
    """family, prompt, category, pixel budget, answer length: each one declared an answer setting."""
    assert {"model.family", "model.prompt", "data.category", "model.min_pixels", "model.max_pixels",
            "eval.max_new_tokens"} <= set(ANSWER_SETTINGS)


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_champion_closes_the_gate_naming_the_file_and_field(tmp_path, target, case):
    """Fails on a9dd703: a str `eval`, a list `metrics`, a list front matter crashed the read (AttributeError,
    ValueError); a number run_id, a model-index of the wrong shape, pickle-only weights, no processor files and
    a missing answer setting were read as a judgeable champion (then evaluated with today's settings, or refused
    by evaluation: the step failed every night)."""
    damage, why = CASES[case]
    damage(target)
    held = {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    champ = read_champion_folder(target)
    assert champ is not None and champ.revision and champ.fault == "content"
    assert why in champ.unreadable, champ.unreadable
    assert not needs_measuring(champ)  # closed before anything is fetched or evaluated
    _, report, *_ = records(tmp_path / "new", target, map50=0.90)
    decision = decide(report, _cfg().gate, champ)
    assert not decision.passed and decision.champion_fault == "content" and not decision.replaced_unreadable
    assert why in decision.reason and "gate.replace_unreadable_champion=true" in decision.reason
    forced = decide(report, _cfg(**REPLACE).gate, champ)
    assert forced.passed and forced.replaced_unreadable and forced.champion_revision == champ.revision
    assert why in forced.champion_unreadable
    assert {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()} == held


def test_a_champion_vlmdet_published_is_readable_and_carries_every_answer_setting(pristine, tiny_model):
    champ = read_champion_folder(pristine)
    assert champ is not None and champ.unreadable == "" and champ.metrics["map50"] == pytest.approx(0.70)
    today = _cfg()
    cfg = champion_config(champ, today)
    for key in ANSWER_SETTINGS:
        section, name = key.split(".")
        assert champ.config[section][name] == getattr(getattr(cfg, section), name) == \
            getattr(getattr(today, section), name), key


def test_the_champion_is_evaluated_with_its_own_category_prompt_pixel_budget_and_answer_length(tmp_path, tiny_model):
    """Fails on a9dd703: category and answer length were today's (only config.model was carried over)."""
    from vlmdet.pipeline.steps import measure_champion

    theirs = {"data.category": "price-tag", "model.prompt": "Find every {category}.", "model.min_pixels": 4 * 28 * 28,
              "model.max_pixels": 128 * 28 * 28, "eval.max_new_tokens": 40}
    publishing.publish(*records(tmp_path / "old", Path(tiny_model), map50=0.70, fp="fp-old"), _cfg(**theirs),
                       tmp_path)
    today = _cfg(**{"eval.batch_size": 3})
    assert all(getattr(getattr(today, k.split(".")[0]), k.split(".")[1]) != v for k, v in theirs.items())
    champ = publishing.read_champion(today, tmp_path)
    assert champ.unreadable == "" and json.loads((tmp_path / "published" / "vlmdet.json").read_text())[
        "config"]["data"]["category"] == "price-tag"
    _, report, *_ = records(tmp_path / "new", Path(tiny_model), map50=0.90, fp="fp-today")  # other data: evaluate it
    seen = {}

    def evaluate_with(model: str, cfg: RunConfig):
        seen.update(model=model, cfg=cfg)
        return report

    measure_champion(champ, report, today, fetch=lambda c, only: c.location, evaluate_with=evaluate_with)
    cfg = seen["cfg"]
    assert seen["model"] == str(tmp_path / "published")
    got = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in theirs}
    assert got == theirs
    assert cfg.eval.batch_size == 3 and cfg.data.dataset == today.data.dataset  # today's run, its answers


def test_a_category_with_a_slash_is_published_as_written(tmp_path, tiny_model):
    """The category is the model's contract, like the prompt: public_text never rewrites it."""
    publishing.publish(*records(tmp_path / "run", Path(tiny_model)), _cfg(**{"data.category": "/nutrition/table"}),
                       tmp_path)
    meta = json.loads((tmp_path / "published" / "vlmdet.json").read_text())
    assert meta["config"]["data"]["category"] == "/nutrition/table"


# --- the same, read from the Hub -----------------------------------------------------------------------

@pytest.fixture
def hub(monkeypatch):
    from hub_server import HubServer

    online_classic_lfs(monkeypatch)
    with HubServer(tokens={TOKEN}) as srv:
        yield srv


@pytest.mark.parametrize("case,files,delete,why", [
    ("eval a str", None, set(), CASES["eval a str"][1]),
    ("pickle-only weights", {"pytorch_model.bin": b"not really a pickle"}, {"model.safetensors"},
     CASES["pickle-only weights"][1]),
])
def test_hub_a_malformed_champion_closes_the_gate_naming_the_file_and_field(hub, tmp_path, tiny_model, case, files,
                                                                          delete, why):
    cfg = _cfg(f"hub:{REPO}", **{"publish.endpoint": hub.url})
    publishing.publish(*records(tmp_path / "old", Path(tiny_model), map50=0.70), cfg, tmp_path, TOKEN, sleep=NO_SLEEP)
    if files is None:
        meta = json.loads(hub.state.repos[REPO].head.files["vlmdet.json"][0])
        meta["eval"] = "test"
        files = {"vlmdet.json": json.dumps(meta).encode()}
    hand = hub.land_commit(REPO, files, delete=delete)
    champ = publishing.read_champion(cfg, tmp_path, TOKEN, sleep=NO_SLEEP)
    assert champ.revision == hand and champ.fault == "content" and why in champ.unreadable
    _, report, *_ = records(tmp_path / "new", Path(tiny_model), map50=0.90)
    decision = decide(report, cfg.gate, champ)
    assert not decision.passed and decision.champion_fault == "content" and why in decision.reason
    forced = decide(report, cfg.override(REPLACE).gate, champ)
    assert forced.passed and forced.replaced_unreadable and forced.champion_revision == hand
    assert hub.state.repos[REPO].head.oid == hand
