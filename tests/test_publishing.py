"""Local-folder publishing, the model card, reading the champion back, and the Prefect tasks on a local target."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, metadata_load

from pubkit import records
from vlmdet import publishing
from vlmdet.config.settings import ConfigError, RunConfig
from vlmdet.decide.gate import decide
from vlmdet.modeling.tiny import build_tiny_model
from vlmdet.publishing import PermanentPublishError
from vlmdet.publishing.target import target_of


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("merged") / "model", size="micro")


def _cfg(target: str = "local:published", **over) -> RunConfig:
    return RunConfig(name="smoke").override({"publish.target": target, **over})


def test_local_publication_is_a_repo_shaped_folder_with_card(tmp_path, merged_dir):
    merged, report, dataset, adapter, decision = records(tmp_path, merged_dir)
    pub = publishing.publish(merged, report, dataset, adapter, decision, _cfg(), tmp_path)
    out = tmp_path / "published"
    assert pub.kind == "local" and Path(pub.target) == out
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "vlmdet.json",
                 "assets/loss_curve.png", "assets/predictions.png"):
        assert (out / name).is_file(), name
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == pub.files
    assert (out / "model.safetensors").read_bytes() == (merged_dir / "model.safetensors").read_bytes()

    meta = metadata_load(out / "README.md")
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["openfoodfacts/nutrition-table-detection"]
    assert "base_model" not in meta  # tiny:qwen2_vl is no Hub id; the Hub would reject the card
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["split"] == "test" and result["dataset"]["args"] == {"fingerprint": "fp-test"}
    assert "revision" not in result["dataset"]  # a Hub dataset commit or nothing; these records carry none
    got = {m["type"]: m["value"] for m in result["metrics"]}
    assert got == pytest.approx(report.metrics())
    card = ModelCard.load(out / "README.md")
    for needle in ("Intended use and limits", "fp-test", "assets/predictions.png", "assets/loss_curve.png",
                   decision.reason, "lora:", "learning_rate"):
        assert needle in card.text, needle
    # the score as vlmdet.prediction.predict computes it, with this (Qwen2-VL) family's coordinate span
    assert "geometric-mean probability" in card.text and "`<|box_start|>...<|box_end|>`" in card.text
    assert "bbox_2d" not in card.text and "log-prob" not in card.text

    saved = json.loads((out / "vlmdet.json").read_text())
    assert saved["metrics"] == report.metrics() and saved["config"] == _cfg().to_dict()
    assert saved["eval"]["data_fingerprint"] == "fp-test" and saved["run_id"] == pub.run_id


def test_card_without_pictures_does_not_link_missing_files(tmp_path, merged_dir):
    rec = records(tmp_path, merged_dir, pictures=False)
    publishing.publish(*rec, _cfg(), tmp_path)
    text = (tmp_path / "published" / "README.md").read_text()
    assert "assets/" not in text and not (tmp_path / "published" / "assets").exists()


def test_champion_reads_back_with_where_to_fetch_it_and_its_predictions(tmp_path, merged_dir):
    cfg = _cfg(**{"gate.min_delta": 0.05})
    assert publishing.read_champion(cfg, tmp_path) is None
    first = records(tmp_path, merged_dir, map50=0.70)
    Path(first[1].predictions).write_text('[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}]')
    publishing.publish(*first, cfg, tmp_path)
    champ = publishing.read_champion(cfg, tmp_path)
    assert champ.metrics["map50"] == pytest.approx(0.70) and champ.data_fingerprint == "fp-test"
    assert champ.split == "test" and champ.kind == "local" and champ.location == str(tmp_path / "published")
    assert champ.config["gate"]["min_delta"] == 0.05  # its own settings, to evaluate it the way it answers
    # its test predictions travel with it: the next gate on the same data compares without re-evaluating it
    assert (tmp_path / "published" / "eval" / "predictions.json").read_text() == Path(first[1].predictions).read_text()
    _, same, *_ = records(tmp_path, merged_dir, map50=0.80)
    _, other, *_ = records(tmp_path, merged_dir, map50=0.60, fp="fp-other")
    assert champ.measured_on(same) and not champ.measured_on(other)
    # without both models measured on the same images, a champion is never replaced
    assert not decide(same, cfg.gate, champ).passed and not decide(other, cfg.gate, champ).passed


def test_republishing_replaces_the_whole_folder(tmp_path, merged_dir):
    publishing.publish(*records(tmp_path, merged_dir, map50=0.7), _cfg(), tmp_path)
    (tmp_path / "published" / "stale.bin").write_bytes(b"old")
    seen = publishing.read_champion(_cfg(), tmp_path).revision  # what the next gate reads, stale file included
    pub = publishing.publish(*records(tmp_path, merged_dir, map50=0.9, champion_revision=seen), _cfg(), tmp_path)
    assert not (tmp_path / "published" / "stale.bin").exists()
    assert json.loads((tmp_path / "published" / "vlmdet.json").read_text())["metrics"]["map50"] == 0.9
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".published")] == []
    assert pub.run_id and pub.tag == f"run-{pub.run_id}"


def test_closed_gate_writes_nothing(tmp_path, merged_dir):
    merged, report, dataset, adapter, decision = records(tmp_path, merged_dir)
    decision.passed = False
    with pytest.raises(PermanentPublishError, match="gate did not pass"):
        publishing.publish(merged, report, dataset, adapter, decision, _cfg(), tmp_path)
    assert not (tmp_path / "published").exists()


def test_unfinished_merge_folder_is_refused(tmp_path, merged_dir):
    merged, *rest = records(tmp_path, merged_dir)
    merged.path = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        publishing.publish(merged, *rest, _cfg(), tmp_path)


@pytest.mark.parametrize("target", ["published", "s3:bucket/x", "local:", "hub:"])
def test_bad_target_names_the_field(target):
    with pytest.raises(ConfigError, match="publish.target"):
        target_of(target)


def test_target_paths(tmp_path):
    def where(spec, workdir):
        target = target_of(spec)
        return target.kind, target.location(workdir)

    assert where("local:out", tmp_path) == ("local", str(tmp_path / "out"))
    assert where(f"local:{tmp_path}/abs", "/elsewhere") == ("local", f"{tmp_path}/abs")
    assert where("hub:org/name", tmp_path) == ("hub", "org/name")


def test_tasks_on_a_local_target(tmp_path, merged_dir, prefect_harness):
    """The tasks as the flow calls them: gate with no champion, publish, then the gate sees the champion."""
    from prefect import flow

    from tasks.gate import find_champion, gate
    from tasks.publish import publish
    from vlmdet.run.layout import RunLayout

    merged, report, dataset, adapter, _ = records(tmp_path, merged_dir, map50=0.7)
    cfg = _cfg(**{"gate.min_delta": 0.05})

    @flow
    def two_runs(workdir: str):
        layout = RunLayout.at(workdir)
        first = gate(report, cfg, layout, champion=find_champion(cfg, layout), dataset=dataset)
        pub = publish(merged, report, dataset, adapter, first, cfg, layout)
        second = gate(report, cfg, layout, champion=find_champion(cfg, layout), dataset=dataset)
        return first, pub, second

    first, pub, second = two_runs(str(tmp_path))
    assert first.passed and first.champion is None
    assert pub.kind == "local" and (tmp_path / "published" / "README.md").is_file()
    # a champion that was not measured on today's images is not replaced on a guess
    assert not second.passed and second.champion == pytest.approx(0.7) and "not measured" in second.reason


@pytest.mark.parametrize("same_run", [True, False])
def test_a_crash_between_the_renames_does_not_lose_the_champion(tmp_path, monkeypatch, same_run):
    from vlmdet.publishing.local import folder_revision, publish_folder

    dest = tmp_path / "pub" / "model"
    publish_folder(dest, {"weights.bin": b"champion"}, run_id="r1")
    seen = folder_revision(dest)  # what the gate of the next runs read
    real_rename = Path.rename

    def crash_on_swap_in(self, target):
        if ".staging-" in self.name:  # dest already moved aside: the state a crash here leaves
            raise KeyboardInterrupt("killed mid-swap")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_swap_in)
    with pytest.raises(KeyboardInterrupt):
        publish_folder(dest, {"weights.bin": b"challenger"}, run_id="r2", expected=seen)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not dest.exists()
    # The next attempt fails too (a missing source file) after its leftover cleanup: the champion
    # must be back in place, not deleted with the leftovers.
    retry_run = "r2" if same_run else "r3"
    with pytest.raises(FileNotFoundError):
        publish_folder(dest, {"weights.bin": tmp_path / "no-such-file"}, run_id=retry_run, expected=seen)
    assert (dest / "weights.bin").read_bytes() == b"champion"
    publish_folder(dest, {"weights.bin": b"challenger"}, run_id=retry_run, expected=seen)
    assert (dest / "weights.bin").read_bytes() == b"challenger"
    assert not list(dest.parent.glob(".model.old-*"))  # the backup went back into place, none is left
