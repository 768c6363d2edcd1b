"""Hub publishing against tests/hub_server.py: round trip, champion gate, retries, permanent failures.

The client's path is pinned: HF_HUB_DISABLE_XET makes huggingface_hub take the classic LFS route
(preupload -> LFS batch "basic" -> PUT -> NDJSON commit) even where hf_xet is installed, and the server
never advertises Xet; the round-trip test asserts that route was the one taken.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from hub_server import HubServer
from pubkit import NO_SLEEP, online_classic_lfs, records
from vlmdet import publishing
from vlmdet.config.settings import RunConfig
from vlmdet.decide.gate import decide
from vlmdet.modeling.tiny import build_tiny_model
from vlmdet.publishing import PermanentPublishError, TransientPublishError
from vlmdet.publishing.hub import RUN_MARKER

TOKEN = "hf_testwritetoken"


@pytest.fixture(autouse=True)
def online(monkeypatch):
    online_classic_lfs(monkeypatch)


@pytest.fixture
def hub():
    with HubServer(tokens={TOKEN}) as srv:
        yield srv


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("merged") / "model", size="micro")


def _cfg(hub: HubServer, repo: str = "acme/nutrition-detector", **over) -> RunConfig:
    return RunConfig(name="smoke").override({"publish.target": f"hub:{repo}", "publish.endpoint": hub.url, **over})


def _publish(hub, tmp_path, merged_dir, token=TOKEN, repo="acme/nutrition-detector", map50=0.8, fp="fp-test",
             champion_revision=None, **kw):
    rec = records(tmp_path, merged_dir, map50=map50, fp=fp, champion_revision=champion_revision)
    return publishing.publish(*rec, _cfg(hub, repo), tmp_path, token, sleep=NO_SLEEP, **kw)


def _run_commits(hub, repo, run_id):
    return hub.state.commits_matching(repo, RUN_MARKER.format(run_id=run_id))


def _generate(path: str | Path) -> list[int]:
    from PIL import Image
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    model = Qwen2VLForConditionalGeneration.from_pretrained(path).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Detect the nutrition-table."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.new("RGB", (224, 224), (120, 30, 200))
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_round_trip_publish_download_load_same_answers(hub, tmp_path, merged_dir):
    from huggingface_hub import HfApi, snapshot_download

    pub = _publish(hub, tmp_path, merged_dir)
    repo = hub.state.repos["acme/nutrition-detector"]
    assert repo.private and pub.kind == "hub" and pub.revision == repo.head.oid
    assert repo.tags == {pub.tag: pub.revision}
    assert len(_run_commits(hub, "acme/nutrition-detector", pub.run_id)) == 1
    assert len(repo.commits) == 2  # the repo's initial commit and this publication's one commit
    head = repo.head
    assert "mAP 0.4800" in head.title and "mAP50 0.8000" in head.title
    assert "fp-test" in head.message and "map50 above threshold" in head.message
    # The classic LFS route, as pinned: weights went through the LFS batch API and a PUT, not Xet.
    assert hub.calls("POST", r"\.git/info/lfs/objects/batch") and hub.calls("PUT", r"^/lfs-upload/")
    assert head.files["model.safetensors"][1] is True and head.files["config.json"][1] is False

    local = snapshot_download("acme/nutrition-detector", revision=pub.tag, endpoint=hub.url, token=TOKEN,
                              cache_dir=str(tmp_path / "hf-cache"))
    assert (Path(local) / "model.safetensors").read_bytes() == (merged_dir / "model.safetensors").read_bytes()
    assert json.loads((Path(local) / "vlmdet.json").read_text())["run_id"] == pub.run_id
    assert (Path(local) / "assets" / "predictions.png").is_file()
    assert _generate(local) == _generate(merged_dir)
    info = HfApi(endpoint=hub.url, token=TOKEN).model_info("acme/nutrition-detector")
    assert info.sha == pub.revision


def test_gate_reads_the_champion_from_the_hub_card(hub, tmp_path, merged_dir):
    cfg = _cfg(hub, **{"gate.min_delta": 0.05})
    assert publishing.read_champion(cfg, tmp_path, TOKEN, sleep=NO_SLEEP) is None  # no repo yet
    _publish(hub, tmp_path, merged_dir, map50=0.70)
    hub.fail("GET", r"^/api/models/acme/nutrition-detector$", 503)  # the champion read is retried
    champ = publishing.read_champion(cfg, tmp_path, TOKEN, sleep=NO_SLEEP)
    assert hub.calls("GET", r"^/api/models/acme/nutrition-detector$")[-2][2] == 503
    assert champ.metrics["map50"] == pytest.approx(0.70) and champ.data_fingerprint == "fp-test"
    assert champ.source.startswith("hub:acme/nutrition-detector@")
    assert champ.kind == "hub" and champ.location == "acme/nutrition-detector"
    from huggingface_hub import HfApi

    head = HfApi(endpoint=hub.url, token=TOKEN).model_info("acme/nutrition-detector").sha
    assert champ.revision == head  # the full commit: the gate fetches the model at exactly this one
    _, same, *_ = records(tmp_path, merged_dir, map50=0.76)
    _, other_data, *_ = records(tmp_path, merged_dir, map50=0.55, fp="fp-new")
    assert champ.measured_on(same) and not champ.measured_on(other_data)
    assert not decide(other_data, cfg.gate, champ).passed  # never replaced without a comparison

    # the champion fetched to be evaluated again: its model at the card's revision, even after the repo moved on
    _publish(hub, tmp_path, merged_dir, map50=0.9, fp="fp-later", champion_revision=champ.revision)
    folder = publishing.fetch_champion(champ, cfg, tmp_path / "run", TOKEN)
    assert (Path(folder) / "model.safetensors").read_bytes() == (merged_dir / "model.safetensors").read_bytes()
    assert json.loads((Path(folder) / "vlmdet.json").read_text())["eval"]["data_fingerprint"] == "fp-test"
    assert publishing.fetch_champion(champ, cfg, tmp_path / "run", TOKEN, predictions_only=True) is None  # pred.json unwritten
    # the next champion's download replaces this one's in the run folder (a 7B is ~15 GB a revision)
    newer = publishing.read_champion(cfg, tmp_path, TOKEN, sleep=NO_SLEEP)
    assert newer.revision != champ.revision
    again = publishing.fetch_champion(newer, cfg, tmp_path / "run", TOKEN)
    assert [p.name for p in (tmp_path / "run" / "champion").iterdir()] == [Path(again).name] == [newer.revision[:12]]


@pytest.mark.parametrize("method,path,status,after", [
    ("POST", r"/commit/main$", 500, False),
    ("POST", r"/commit/main$", 429, False),
    ("POST", r"/commit/main$", "drop", False),
    ("POST", r"/commit/main$", "drop", True),  # the commit lands, the reply is lost: must not commit twice
    ("POST", r"/commit/main$", 503, True),  # same, answered with an error after the commit landed
    ("PUT", r"^/lfs-upload/", "drop", False),
    ("POST", r"/tag/", 502, True),  # the tag lands, its reply is lost
])
def test_transient_failure_then_success_leaves_exactly_one_commit(hub, tmp_path, merged_dir, method, path, status, after):
    hub.fail(method, path, status, times=1, after=after)
    pub = _publish(hub, tmp_path, merged_dir)
    repo = hub.state.repos["acme/nutrition-detector"]
    assert [c.oid for c in _run_commits(hub, "acme/nutrition-detector", pub.run_id)] == [pub.revision]
    assert len(repo.commits) == 2 and repo.head.oid == pub.revision
    assert repo.tags == {pub.tag: pub.revision}
    assert [f for f in hub.state.faults if f.times > 0] == []  # the fault was really hit
    if method == "POST" and path.endswith("main$") and after:
        assert pub.reused  # the retry found the landed commit instead of committing again


def test_a_failed_upload_leaves_the_previous_model_visible(hub, tmp_path, merged_dir):
    first = _publish(hub, tmp_path, merged_dir, map50=0.7)
    hub.fail("POST", r"/commit/main$", 500, times=100)
    with pytest.raises(TransientPublishError, match="HTTP 500"):
        _publish(hub, tmp_path, merged_dir, map50=0.9, champion_revision=first.revision)
    repo = hub.state.repos["acme/nutrition-detector"]
    assert repo.head.oid == first.revision and len(repo.commits) == 2
    assert json.loads(repo.head.files["vlmdet.json"][0])["metrics"]["map50"] == 0.7


def test_wrong_token_fails_fast_with_a_clear_message(hub, tmp_path, merged_dir):
    t0 = time.monotonic()
    with pytest.raises(PermanentPublishError, match="401") as err:
        _publish(hub, tmp_path, merged_dir, token="hf_wrongtoken")
    assert time.monotonic() - t0 < 5
    assert "HF_TOKEN" in str(err.value) and "hf_wrongtoken" not in str(err.value)
    assert len(hub.calls("POST", r"^/api/repos/create$")) == 1  # not retried


def test_forbidden_commit_fails_fast_without_retry(hub, tmp_path, merged_dir):
    hub.fail("POST", r"/commit/main$", 403, times=100)
    with pytest.raises(PermanentPublishError, match="403") as err:
        _publish(hub, tmp_path, merged_dir)
    assert "write access" in str(err.value)
    assert len(hub.calls("POST", r"/commit/main$")) == 1
    assert len(hub.state.repos["acme/nutrition-detector"].commits) == 1  # only the repo's initial commit


@pytest.mark.parametrize("repo", ["acme/bad name", "acme--x/..y", "noslash", "a/b/c"])
def test_invalid_repo_id_fails_before_any_request(hub, tmp_path, merged_dir, repo):
    with pytest.raises(PermanentPublishError, match="publish.target"):
        _publish(hub, tmp_path, merged_dir, repo=repo)
    assert hub.state.requests == []


def test_offline_mode_is_a_permanent_error_naming_the_switch(hub, tmp_path, merged_dir, monkeypatch):
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    with pytest.raises(PermanentPublishError, match="HF_HUB_OFFLINE"):
        _publish(hub, tmp_path, merged_dir)
