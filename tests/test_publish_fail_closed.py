"""Publishing fails closed (issue 18): the real huggingface_hub client against tests/hub_server.py, and
real folders for the local target. Each test asserts what the target holds afterwards.

- compare-and-swap: a publication lands only over the exact revision the gate read;
- a publication replaces the model whole (sharded over single-file and back, loaded with transformers);
- anything at the target that cannot be read (no numbers, no settings, other family, 401, 5xx, a
  dropped connection, an interrupted local swap) is never "no champion";
- everything read from the champion comes from one commit;
- no local path in any published file.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from hub_server import HubServer
from data_fixtures import boxed_predictions, boxed_split
from pubkit import NO_SLEEP, online_classic_lfs, records
from vlmdet import publishing
from vlmdet.decide.champion import reuse_report
from vlmdet.config.settings import RunConfig
from vlmdet.decide.gate import Comparison, compare, decide
from vlmdet.modeling.tiny import build_tiny_model
from vlmdet.publishing import PermanentPublishError, TargetChangedError

TOKEN = "hf_testwritetoken"
REPO = "acme/nutrition-detector"
REPLACE = {"gate.replace_unreadable_champion": True}


@pytest.fixture
def hub(monkeypatch):
    online_classic_lfs(monkeypatch)
    with HubServer(tokens={TOKEN}) as srv:
        yield srv


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """Two different tiny models: one saved as a single model.safetensors, the other in shards."""
    from transformers import Qwen2VLForConditionalGeneration

    root = tmp_path_factory.mktemp("models")
    single = build_tiny_model(root / "single", size="micro", seed=0)
    source = build_tiny_model(root / "source", size="micro", seed=1)
    sharded = root / "sharded"
    Qwen2VLForConditionalGeneration.from_pretrained(source).save_pretrained(sharded, max_shard_size="300KB")
    for f in source.iterdir():  # the processor files
        if not (sharded / f.name).exists() and not f.name.startswith("model"):
            shutil.copy(f, sharded / f.name)
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    return single, sharded


def _hub_cfg(hub: HubServer, **over) -> RunConfig:
    return RunConfig(name="smoke").override({"publish.target": f"hub:{REPO}", "publish.endpoint": hub.url, **over})


def _local_cfg(**over) -> RunConfig:
    return RunConfig(name="smoke").override({"publish.target": "local:published", **over})


def _records(tmp_path: Path, model: Path, map50: float, champion_revision=None, predictions: str | None = None):
    """One run's records in its own folder; a distinct map50 gives a distinct run id."""
    run = tmp_path / f"run-{map50}"
    rec = records(run, model, map50=map50, champion_revision=champion_revision)
    if predictions is not None:
        Path(rec[1].predictions).write_text(predictions)
    return rec


def _publish(cfg, tmp_path, model, map50, champion_revision=None, predictions=None, token=TOKEN):
    rec = _records(tmp_path, model, map50, champion_revision, predictions)
    return publishing.publish(*rec, cfg, tmp_path, token, sleep=NO_SLEEP)


def _read(cfg, tmp_path, token=TOKEN):
    return publishing.read_champion(cfg, tmp_path, token, sleep=NO_SLEEP)


def _weights(folder) -> dict[str, torch.Tensor]:
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(folder).state_dict()


# --- 1. compare-and-swap -----------------------------------------------------------------------------

def test_hub_a_publish_landing_between_gate_and_commit_is_not_overwritten(hub, tmp_path, models):
    """Fails on main: the commit's parent was the head at publish time."""
    single, sharded = models
    cfg = _hub_cfg(hub)
    first = _publish(cfg, tmp_path, single, 0.70)
    seen = _read(cfg, tmp_path)
    assert seen.revision == first.revision
    other = _publish(cfg, tmp_path, sharded, 0.75, champion_revision=first.revision)  # lands while we merge
    repo = hub.state.repos[REPO]
    held = dict(repo.head.files)
    with pytest.raises(TargetChangedError) as err:
        _publish(cfg, tmp_path, single, 0.80, champion_revision=seen.revision)
    assert f"the target changed since the gate decided (was {first.revision}, now {other.revision}); " \
           "not publishing" in str(err.value)
    assert repo.head.oid == other.revision and repo.head.files == held and len(repo.commits) == 3
    assert len(hub.calls("POST", r"/commit/main$")) == 2  # refused before any upload, never retried
    # a gate that saw the target empty may not publish over a model that arrived since
    with pytest.raises(TargetChangedError, match=f"was empty, now {other.revision}"):
        _publish(cfg, tmp_path, single, 0.85, champion_revision=None)
    assert repo.head.oid == other.revision


def test_hub_a_parent_refused_at_commit_time_is_not_retried_onto_the_new_head(hub, tmp_path, models):
    """Fails on main: 412 was transient, and the retry committed on top of the other writer's commit."""
    single, sharded = models
    cfg = _hub_cfg(hub)
    first = _publish(cfg, tmp_path, single, 0.70)
    # another writer commits after this publish checked the head and before its commit reaches the Hub
    hub.when("POST", r"/preupload/", lambda: hub.land_commit(REPO, {"notes.md": b"edited by hand\n"}))
    with pytest.raises(TargetChangedError, match=f"was {first.revision}, now [0-9a-f]{{40}}"):
        _publish(cfg, tmp_path, sharded, 0.80, champion_revision=first.revision)
    repo = hub.state.repos[REPO]
    assert repo.head.title == "edited on the Hub" and len(repo.commits) == 3
    assert [c[2] for c in hub.calls("POST", r"/commit/main$")] == [200, 412]  # the refusal was not retried


@pytest.mark.parametrize("gate_saw", ["champion", "empty"])
def test_local_a_publish_landing_between_gate_and_swap_is_not_overwritten(tmp_path, models, gate_saw):
    """Fails on main: the local swap replaced whatever was there."""
    single, sharded = models
    cfg = _local_cfg()
    first = _publish(cfg, tmp_path, single, 0.70) if gate_saw == "champion" else None
    seen = _read(cfg, tmp_path)
    assert (seen.revision == first.revision) if first else seen is None
    other = _publish(cfg, tmp_path, sharded, 0.75, champion_revision=first.revision if first else None)
    with pytest.raises(TargetChangedError, match=f"was {first.revision if first else 'empty'}, now {other.revision}"):
        _publish(cfg, tmp_path, single, 0.80, champion_revision=seen.revision if seen else None)
    target = tmp_path / "published"
    assert json.loads((target / "vlmdet.json").read_text())["run_id"] == other.run_id
    assert (target / "model.safetensors.index.json").is_file() and not (target / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".published")] == []


# --- 2. a publication replaces the model whole ----------------------------------------------------------

@pytest.mark.parametrize("order", ["sharded-then-single", "single-then-sharded"])
def test_hub_a_publication_replaces_the_model_whole(hub, tmp_path, models, order):
    """Fails on main: commits only added files (a stale model.safetensors loads before a sharded index)."""
    from huggingface_hub import snapshot_download

    single, sharded = models
    old, new = (sharded, single) if order == "sharded-then-single" else (single, sharded)
    cfg = _hub_cfg(hub)
    first = _publish(cfg, tmp_path, old, 0.70, predictions="[]")
    assert "eval/predictions.json" in hub.state.repos[REPO].head.files
    second = _publish(cfg, tmp_path, new, 0.80, champion_revision=first.revision)  # publishes no predictions
    head = hub.state.repos[REPO].head
    assert head.oid == second.revision and set(head.files) == set(second.files) | {".gitattributes"}
    assert "eval/predictions.json" not in head.files  # the next gate would take them for the new model's
    local = snapshot_download(REPO, revision=second.revision, endpoint=hub.url, token=TOKEN,
                              cache_dir=str(tmp_path / "cache"))
    got, want, before = _weights(local), _weights(new), _weights(old)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(got[k], before[k]) for k in want)  # really the other model


# --- 3. fail closed on anything unreadable --------------------------------------------------------------

def test_hub_a_card_without_model_index_and_no_vlmdet_json_closes_the_gate(hub, tmp_path, models):
    """Fails on main: read_champion returned None ("no champion") and the threshold alone replaced it."""
    single, _ = models
    cfg = _hub_cfg(hub)
    _publish(cfg, tmp_path, single, 0.70)
    hand = hub.land_commit(REPO, {"README.md": b"# our detector\n\nHand-written card, no numbers.\n"},
                           delete={"vlmdet.json"})
    champ = _read(cfg, tmp_path)
    assert champ is not None and champ.revision == hand and "model-index" in champ.unreadable
    merged, report, dataset, adapter, _ = _records(tmp_path, single, 0.90)
    decision = decide(report, cfg.gate, champ)
    assert not decision.passed and "no champion" not in decision.reason
    assert "cannot be read" in decision.reason and "gate.replace_unreadable_champion=true" in decision.reason
    with pytest.raises(PermanentPublishError, match="gate did not pass"):
        publishing.publish(merged, report, dataset, adapter, decision, cfg, tmp_path, TOKEN, sleep=NO_SLEEP)
    assert hub.state.repos[REPO].head.oid == hand


@pytest.mark.parametrize("fault", [500, "401-no-token", "401-bad-token", "drop"])
def test_hub_errors_while_reading_the_champion_close_the_gate(hub, tmp_path, models, fault):
    """Fails on main: a 401 "repository not found" (private repo, no token) read as "no champion"; a
    wrong token, a 500 or a dropped connection failed the step instead of closing the gate with a reason."""
    single, _ = models
    cfg = _hub_cfg(hub)
    first = _publish(cfg, tmp_path, single, 0.70)  # a private repo
    token = {"401-no-token": None, "401-bad-token": "hf_wrongtoken"}.get(fault, TOKEN)
    if fault in (500, "drop"):
        hub.fail("GET", rf"^/api/models/{REPO}$", fault, times=100)
    champ = _read(cfg, tmp_path, token)
    assert champ is not None and champ.unreadable and not champ.revision
    assert {500: "HTTP 500", "drop": "failed after retries"}.get(fault, "HTTP 401") in champ.unreadable
    _, report, *_ = _records(tmp_path, single, 0.90)
    decision = decide(report, cfg.gate, champ)
    assert not decision.passed and "no champion" not in decision.reason and champ.unreadable in decision.reason
    # a target that could not be read says nothing about its model: replacing on purpose never applies
    forced = decide(report, _hub_cfg(hub, **REPLACE).gate, champ)
    assert not forced.passed and forced.champion_fault == "transport" and not forced.replaced_unreadable
    assert "applies only to a champion that was read" in forced.reason
    assert hub.state.repos[REPO].head.oid == first.revision


def test_hub_replacing_an_unreadable_champion_is_asked_for_by_name_recorded_and_whole(hub, tmp_path, models):
    """Fails on main: there was no such setting (and an unreadable champion was silently "none")."""
    single, sharded = models
    cfg = _hub_cfg(hub, **REPLACE)
    _publish(cfg, tmp_path, single, 0.70)
    hand = hub.land_commit(REPO, {}, delete={"README.md", "vlmdet.json"})  # weights and no card
    champ = _read(cfg, tmp_path)
    assert champ.revision == hand and "neither a model card" in champ.unreadable
    merged, report, dataset, adapter, _ = _records(tmp_path, sharded, 0.90)
    decision = decide(report, cfg.gate, champ)
    assert decision.passed and decision.replaced_unreadable and decision.champion_revision == hand
    assert "replacing it on purpose (gate.replace_unreadable_champion=true" in decision.reason
    pub = publishing.publish(merged, report, dataset, adapter, decision, cfg, tmp_path, TOKEN, sleep=NO_SLEEP)
    head = hub.state.repos[REPO].head
    assert head.oid == pub.revision and set(head.files) == set(pub.files) | {".gitattributes"}
    meta = json.loads(head.files["vlmdet.json"][0])
    assert meta["gate"]["replaced_unreadable"] is True and meta["gate"]["champion_revision"] == hand
    card = head.files["README.md"][0].decode()
    assert "replaced one that could not be read" in card and "gate.replace_unreadable_champion=true" in card


def _unmeta(target: Path) -> None:
    (target / "vlmdet.json").unlink()


def _other_family(target: Path) -> None:
    meta = json.loads((target / "vlmdet.json").read_text())
    meta["config"]["model"]["family"] = "llava"
    (target / "vlmdet.json").write_text(json.dumps(meta))


def _weights_only(target: Path) -> None:
    (target / "vlmdet.json").unlink()
    (target / "README.md").unlink()


def _no_weights(target: Path) -> None:
    (target / "model.safetensors").unlink()


@pytest.mark.parametrize("damage,why", [(_unmeta, "no readable vlmdet.json"), (_other_family, "family 'llava'"),
                                        (_weights_only, "neither a model card"), (_no_weights, "no weights")])
def test_local_a_champion_that_cannot_be_judged_closes_the_gate(tmp_path, models, damage, why):
    """Fails on main: weights-only read as no champion; without vlmdet.json it was evaluated with today's settings."""
    single, _ = models
    cfg = _local_cfg()
    _publish(cfg, tmp_path, single, 0.70)
    target = tmp_path / "published"
    damage(target)
    held = sorted(p.name for p in target.rglob("*"))
    champ = _read(cfg, tmp_path)
    assert champ is not None and why in champ.unreadable and champ.revision
    _, report, *_ = _records(tmp_path, single, 0.90)
    decision = decide(report, cfg.gate, champ)
    assert not decision.passed and "no champion" not in decision.reason and why in decision.reason
    assert sorted(p.name for p in target.rglob("*")) == held


def test_only_a_missing_or_empty_target_is_no_champion(hub, tmp_path):
    """The one case the threshold alone decides. Fails on main: a folder holding any file but no card or
    vlmdet.json read as "no champion"."""
    from huggingface_hub import HfApi

    cfg = _local_cfg()
    assert _read(cfg, tmp_path) is None  # missing
    (tmp_path / "published").mkdir()
    assert _read(cfg, tmp_path) is None  # empty
    (tmp_path / "published" / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    assert _read(cfg, tmp_path) is None  # nothing but a keeper
    (tmp_path / "published" / "notes.md").write_text("x")
    assert _read(cfg, tmp_path).unreadable  # anything else is something
    hcfg = _hub_cfg(hub)
    assert _read(hcfg, tmp_path) is None  # 404
    HfApi(endpoint=hub.url, token=TOKEN).create_repo(REPO)
    assert _read(hcfg, tmp_path) is None  # a fresh repo: .gitattributes only


def test_local_a_crash_between_the_renames_then_a_new_run_recovers_and_compares_the_champion(tmp_path, models,
                                                                                                monkeypatch):
    """Fails on main: recovery ran only inside a publish, after the gate had read "no champion"."""
    single, sharded = models
    cfg = _local_cfg(**{"gate.resamples": 200})
    gt = boxed_split(tmp_path)
    first = _publish(cfg, tmp_path, single, 0.70, predictions=boxed_predictions({1, 2, 3}))
    target = tmp_path / "published"
    real_rename = Path.rename

    def crash_on_swap_in(self, dest):
        if ".staging-" in self.name:  # the champion is already moved aside
            raise KeyboardInterrupt("killed mid-swap")
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", crash_on_swap_in)
    with pytest.raises(KeyboardInterrupt):
        _publish(cfg, tmp_path, sharded, 0.75, champion_revision=first.revision)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not target.exists()

    # the next run: its gate finds the champion back in place and compares against it
    merged, report, dataset, adapter, _ = _records(tmp_path, single, 0.90,
                                                     predictions=boxed_predictions({1, 2, 3, 4, 5, 6}))
    champ = _read(cfg, tmp_path)
    assert champ is not None and not champ.unreadable and champ.revision == first.revision
    assert champ.measured_on(report)
    champion_report = reuse_report(champ, report, publishing.fetch_champion(champ, cfg, tmp_path, predictions_only=True))
    comparison, _, _ = compare(report, champion_report, gt, cfg.gate, champion_evaluated=False)
    decision = decide(report, cfg.gate, champ, comparison)
    assert decision.passed and decision.images == 6 and decision.champion_revision == first.revision
    pub = publishing.publish(merged, report, dataset, adapter, decision, cfg, tmp_path)
    assert json.loads((target / "vlmdet.json").read_text())["run_id"] == pub.run_id
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".published")] == []


# --- 4. one revision for everything read from the champion ----------------------------------------------

def test_hub_everything_read_from_the_champion_comes_from_one_commit(hub, tmp_path, models):
    """Fails on main: the card and vlmdet.json were read at "main", after another commit had landed."""
    single, sharded = models
    cfg = _hub_cfg(hub)
    first = _publish(cfg, tmp_path, single, 0.70)
    a = dict(hub.state.repos[REPO].head.files)
    second = _publish(cfg, tmp_path, sharded, 0.95, champion_revision=first.revision)
    b = hub.state.repos[REPO].head.files
    # right after the gate learns the head (B), someone restores A: card, vlmdet.json and weights change
    hub.when("HEAD", rf"^/{REPO}/resolve/", lambda: hub.land_commit(REPO, {p: d for p, (d, _) in a.items()},
                                                                    title="revert", delete=set(b) - set(a)))
    champ = _read(cfg, tmp_path)
    assert hub.state.repos[REPO].head.title == "revert"  # it did land in between
    assert champ.revision == second.revision and champ.metrics["map50"] == pytest.approx(0.95)
    assert champ.run_id == second.run_id and not champ.unreadable
    folder = Path(publishing.fetch_champion(champ, cfg, tmp_path / "run", TOKEN))
    assert json.loads((folder / "vlmdet.json").read_text())["run_id"] == second.run_id
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()


# --- 5. no local paths in published files ---------------------------------------------------------------

def test_no_local_path_in_any_published_file(tmp_path, models):
    """Fails on main: vlmdet.json and README carried coco:/abs/path, the target folder and the gate picture path.
    Fails on a9dd703: a `file://` URL was left whole, and a path with a space (`/home/John Smith/x`) kept the
    part after the space (issue 26)."""
    single, sharded = models
    target = tmp_path / "target"
    data = tmp_path / "John Smith" / "data"  # a user name with a space in the path
    cfg = RunConfig(name="smoke").override({"publish.target": f"local:{target}", "data.dataset": f"coco:{data}",
                                            "model.base": str(single)})
    needles = {str(tmp_path), str(single.parent), str(data), "John Smith", "Smith/"}
    home = str(Path.home())
    if home not in ("/", ""):
        needles.add(home)
    if os.getcwd() != "/":
        needles.add(os.getcwd())

    def run(cfg: RunConfig, model: Path, map50: float, comparison: Comparison | None = None) -> None:
        merged, report, dataset, adapter, _ = _records(tmp_path, model, map50)
        dataset.source, dataset.root = f"coco:{data}", str(data)
        adapter.validation = {"checkpoints": [{"path": str(tmp_path / "adapter" / "checkpoint-5"), "map50": 0.5},
                                              {"path": (tmp_path / "adapter" / "checkpoint-9").as_uri(), "map50": 0.6}]}
        decision = decide(report, cfg.gate, _read(cfg, tmp_path), comparison)
        assert decision.passed, decision.reason
        publishing.publish(merged, report, dataset, adapter, decision, cfg, tmp_path)
        for f in sorted(p for p in target.rglob("*") if p.is_file()):
            blob = f.read_bytes()
            for needle in needles:
                assert needle.encode() not in blob, f"{f.relative_to(target)} holds the local path {needle}"

    run(cfg, single, 0.70)  # the first model at an empty target
    picture = tmp_path / "gate" / "disagreements.png"
    picture.parent.mkdir()
    Image.new("RGB", (20, 10)).save(picture)
    comparison = Comparison(champion=0.70, challenger=0.90, p_better=1.0, ci_low=0.1, ci_high=0.3, resamples=1000,
                            images=12, picture=str(picture))
    run(cfg, sharded, 0.90, comparison)  # over a champion read from a folder, with the gate's picture
    meta = json.loads((target / "vlmdet.json").read_text())
    assert meta["config"]["data"]["dataset"] == "coco:<local>/data" and meta["gate"]["picture"] == \
        "assets/gate_disagreements.png" and meta["gate"]["champion_source"] == "<local>/target"
    assert meta["config"]["model"]["prompt"] == cfg.model.prompt
    assert (target / "assets" / "gate_disagreements.png").is_file()
    (target / "vlmdet.json").unlink()  # now unreadable, replaced on purpose: the reason names the folder
    run(cfg.override(REPLACE), single, 0.95)


# --- the flow's tasks on an unreadable target ----------------------------------------------------------

def test_the_flows_gate_tasks_close_on_an_unreadable_target_without_evaluating_it(tmp_path, models, prefect_harness):
    """Fails on main: weights without card or vlmdet.json were "no champion" and the gate passed."""
    from prefect import flow

    from tasks.gate import fetch_champion, find_champion, gate
    from vlmdet.pipeline.steps import measure_champion
    from vlmdet.run.layout import RunLayout

    single, _ = models
    cfg = _local_cfg()
    _publish(cfg, tmp_path, single, 0.70)
    _weights_only(tmp_path / "published")
    _, report, dataset, *_ = _records(tmp_path, single, 0.90)

    def must_not_evaluate(model, config):
        raise AssertionError(f"an unreadable champion was evaluated: {model}")

    @flow
    def gate_step(workdir: str):
        layout = RunLayout.at(workdir)
        champion = find_champion(cfg, layout)
        measured = measure_champion(champion, report, cfg, evaluate_with=must_not_evaluate,
                                    fetch=lambda c, only: fetch_champion(c, cfg, layout, predictions_only=only))
        return champion, measured, gate(report, cfg, layout, champion=champion, champion_report=measured,
                                        dataset=dataset)

    champion, measured, decision = gate_step(str(tmp_path))
    assert champion.unreadable and measured is None
    assert not decision.passed and "neither a model card" in decision.reason and "no champion" not in decision.reason
    assert decision.champion_revision == champion.revision and decision.champion_unreadable == champion.unreadable
    assert "champion unreadable" in (tmp_path / "gate" / "adapter" / "decision.md").read_text()
