"""Pinned inputs: the Hub dataset loads at the revision its stamp read, the base model's revision and
the library versions are recorded once and reach summary, vlmdet.json and the model card."""
from __future__ import annotations

import json
import time
import types
from importlib import metadata
from pathlib import Path

import pytest

from vlmdet.run.layout import RunLayout
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, metadata_load

from data_fixtures import off_dataset  # noqa: F401 - fixture
from hub_server import HubServer
from pubkit import records
from vlmdet import publishing
from vlmdet.config.settings import RunConfig, load_preset
from vlmdet.run.keys import source_stamp
from vlmdet.modeling.tiny import build_tiny_model
from vlmdet.run.provenance import PACKAGES, base_model_record, package_versions, provenance
from vlmdet.publishing.card import champion_from_card

TOKEN = "hf_testwritetoken"


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants as C
    import huggingface_hub.utils._detect_agent as detect_agent
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)  # CI sets HF_HUB_OFFLINE=1; this server is local
    monkeypatch.setattr(C, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(detect_agent, "_registry", detect_agent._EMPTY_REGISTRY)
    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.sleep = lambda s: None
    monkeypatch.setattr(http, "time", fake_time)
    with HubServer(tokens={TOKEN}) as srv:
        monkeypatch.setattr(C, "ENDPOINT", srv.url)  # what HfApi() without an endpoint talks to
        yield srv


def _commit(srv, repo_id: str, repo_type: str) -> str:
    api = HfApi(endpoint=srv.url, token=TOKEN)
    api.create_repo(repo_id, repo_type=repo_type)
    api.create_commit(repo_id, repo_type=repo_type, operations=[CommitOperationAdd("README.md", b"v1")],
                      commit_message="v1")
    info = api.create_commit(repo_id, repo_type=repo_type, operations=[CommitOperationAdd("README.md", b"v2")],
                             commit_message="v2")
    return info.oid


@pytest.mark.usefixtures("prefect_harness")
def test_hub_dataset_loads_at_the_revision_its_stamp_read(hub, off_dataset, tmp_path, monkeypatch):  # noqa: F811
    import datasets
    from prefect import flow

    from tasks.prepare_data import prepare_data

    sha = _commit(hub, "test/off", "dataset")
    assert source_stamp("hub:test/off") == f"hub:test/off@{sha}"
    assert source_stamp("hub:test/off@bbox=yxyx-norm") == f"hub:test/off@bbox=yxyx-norm@{sha}"
    disk, _, _ = off_dataset
    loads = []

    def load_dataset(target, **kwargs):  # the Hub's files are not on this server: the same data from disk
        loads.append((target, kwargs))
        return datasets.load_from_disk(str(disk))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    config = load_preset("smoke", {"data.dataset": "hub:test/off"})

    @flow
    def prep():
        return prepare_data(config, RunLayout.at(tmp_path))

    ref = prep()
    assert loads == [("test/off", {"revision": sha})]
    assert ref.revision == sha
    report = json.loads((Path(ref.root) / "report.json").read_text())
    assert report["revision"] == sha


def test_base_model_revision_hub_id_local_folder_and_cache_snapshot(hub, tmp_path):
    sha = _commit(hub, "test/base", "model")
    assert base_model_record("test/base", "test/base") == {"id": "test/base", "revision": sha, "files_hash": None}
    folder = build_tiny_model(tmp_path / "models" / "snapshots" / ("c" * 40), size="micro")
    snap = base_model_record("Qwen/X", str(folder))
    assert snap["revision"] == "c" * 40 and len(snap["files_hash"]) == 16
    local = build_tiny_model(tmp_path / "local", size="micro")
    rec = base_model_record(str(local), str(local))
    assert rec["revision"] is None and rec["files_hash"]  # no Hub revision for a local folder: a hash names it
    (local / "config.json").write_text((local / "config.json").read_text().replace("}", ', "x": 1}', 1))
    assert base_model_record(str(local), str(local))["files_hash"] != rec["files_hash"]


def test_versions_are_the_installed_ones():
    versions = package_versions()
    assert tuple(versions) == PACKAGES == ("torch", "transformers", "trl", "peft", "bitsandbytes", "vlmdet")
    for name in ("torch", "transformers", "trl", "peft", "vlmdet"):
        assert versions[name] == metadata.version(name)


def test_card_and_vlmdet_json_carry_the_provenance(tmp_path):
    merged_dir = build_tiny_model(tmp_path / "merged", size="micro")
    merged, report, dataset, adapter, decision = records(tmp_path, merged_dir)
    sha = "d" * 40
    dataset.revision = sha
    adapter.provenance = provenance(dataset, RunConfig(), "Qwen/Qwen2-VL-7B-Instruct") | {
        "base_model": {"id": "Qwen/Qwen2-VL-7B-Instruct", "revision": "e" * 40, "files_hash": None}}
    cfg = RunConfig().override({"publish.target": "local:published"})
    publishing.publish(merged, report, dataset, adapter, decision, cfg, tmp_path)
    out = tmp_path / "published"

    meta = metadata_load(out / "README.md")
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["revision"] == sha  # the Hub dataset's commit, not a hash of ours
    assert result["dataset"]["args"] == {"fingerprint": "fp-test"}
    assert meta["base_model_revision"] == "e" * 40
    text = ModelCard.load(out / "README.md").text
    versions = adapter.provenance["versions"]
    assert f"torch {versions['torch']}" in text and f"transformers {versions['transformers']}" in text
    assert f"revision `{sha}`" in text and f"revision `{'e' * 40}`" in text
    saved = json.loads((out / "vlmdet.json").read_text())
    assert saved["provenance"] == json.loads(json.dumps(adapter.provenance))

    # the next gate still finds the fingerprint the champion was measured on, in new and old cards
    champ = champion_from_card((out / "README.md").read_text(), None, str(out))
    assert champ.data_fingerprint == "fp-test" and champ.metrics["map50"] == pytest.approx(report.map50)
    legacy = (out / "README.md").read_text().replace(f"revision: {sha}", f"revision: {'f' * 64}")
    legacy = legacy.replace("fingerprint: fp-test", "note: old")
    assert champion_from_card(legacy, None, "old").data_fingerprint == "f" * 64
