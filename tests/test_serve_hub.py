"""A published model right by itself, and `vlmdet serve` following its Hub repo.

Against the local Hub-API server (tests/hub_server.py): a base whose generation_config.json samples
with a repetition penalty (as Qwen2-VL-7B-Instruct's does) is merged and published; the "How to use"
code of its card, run as written in a fresh process with plain transformers, gives the boxes of
`vlmdet predict`. Then a server of the repo swaps in a newly published revision on POST /reload and
on its schedule, and keeps serving when the Hub fails.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from huggingface_hub import snapshot_download

from hub_server import HubServer
from pubkit import records
from vlmdet import publishing
from vlmdet.config.settings import load_preset

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "vlmdet" / "assets" / "tiny-qwen2-vl-grounding"
TOKEN = "hf_servetoken"
REPO = "acme/table-detector"
NO_SLEEP = lambda s: None  # noqa: E731
# A budget other than the base processor's (200704), so the published one is visibly the run's.
MAX_PIXELS = 192 * 28 * 28


@pytest.fixture(scope="module", autouse=True)
def online_hub(tmp_path_factory):
    """Online against the local server only (as tests/test_hub_roundtrip.py), a private HF cache."""
    import huggingface_hub.constants as C
    import huggingface_hub.utils._detect_agent as detect_agent
    import huggingface_hub.utils._http as http

    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.sleep = NO_SLEEP
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_serve.py: OpenMP threads spin against each other on a busy CPU
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C, "HF_HUB_OFFLINE", False)
        mp.setattr(C, "HF_HUB_DISABLE_XET", True)
        mp.setattr(C, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
        mp.setattr(detect_agent, "_registry", detect_agent._EMPTY_REGISTRY)
        mp.setattr(http, "time", fake_time)
        mp.setenv("HF_TOKEN", TOKEN)
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hub():
    with HubServer(tokens={TOKEN}) as srv:
        yield srv


@pytest.fixture(scope="module")
def config(hub, tmp_path_factory):
    """The smoke preset on a local copy of the shipped base whose generation config samples."""
    base = tmp_path_factory.mktemp("base") / "sampling-base"
    shutil.copytree(ASSET, base)
    gc = json.loads((base / "generation_config.json").read_text())
    gc.update(do_sample=True, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.5)
    (base / "generation_config.json").write_text(json.dumps(gc))
    return load_preset("smoke", {"model.base": str(base), "data.category": "table", "model.max_pixels": MAX_PIXELS,
                                 "publish.target": f"hub:{REPO}", "publish.endpoint": hub.url})


@pytest.fixture(scope="module")
def merged(config, tmp_path_factory):
    """merge() of a fresh LoRA adapter (B = 0: the merged weights are the base's) over that base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmdet.data.synth import render
    from vlmdet.publishing.merge import merge

    tmp = tmp_path_factory.mktemp("merge")
    model = AutoModelForImageTextToText.from_pretrained(config.model.base)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft.save_pretrained(tmp / "adapter")
    AutoProcessor.from_pretrained(config.model.base).save_pretrained(tmp / "adapter")
    return merge(str(tmp / "adapter"), config, tmp / "merged", [render(1, 0)[0]])


def _publish(hub, config, merged, tmp: Path, map50: float):
    seen = publishing.read_champion(config, tmp, TOKEN, sleep=NO_SLEEP)  # as the gate: publish over exactly this
    merged_ref, report, dataset, adapter, decision = records(tmp, Path(merged.path), map50=map50,
                                                             champion_revision=seen.revision if seen else None)
    adapter = dataclasses.replace(adapter, base_model=config.model.base)  # the resolved local folder, as train() records
    return publishing.publish(merged_ref, report, dataset, adapter, decision, config, tmp, TOKEN, sleep=NO_SLEEP)


@pytest.fixture(scope="module")
def published(hub, config, merged, tmp_path_factory):
    return _publish(hub, config, merged, tmp_path_factory.mktemp("pub1"), map50=0.70)


def photo(path: Path) -> Path:
    from vlmdet.data.synth import render

    image, _ = render(seed=11, index=4, size=(400, 300))
    image.save(path, quality=92)
    return path


def test_the_cards_snippet_gives_predicts_boxes(hub, config, published, tmp_path):
    from vlmdet.cli import main
    from vlmdet.modeling.load import saved_pixel_budget
    from vlmdet.prediction.predict import stop_token_ids
    from transformers import AutoTokenizer

    local = snapshot_download(REPO, revision=published.revision, endpoint=hub.url, token=TOKEN)
    # generation_config.json: vlmdet's greedy decoding, not the base's sampling and penalty
    gc = json.loads((Path(local) / "generation_config.json").read_text())
    assert gc["do_sample"] is False and gc["repetition_penalty"] == 1.0 and "top_k" not in gc
    assert gc["eos_token_id"] == sorted(stop_token_ids(AutoTokenizer.from_pretrained(local))) and len(gc["eos_token_id"]) == 2
    assert gc["max_new_tokens"] == config.eval.max_new_tokens
    assert saved_pixel_budget(local) == (config.model.min_pixels, MAX_PIXELS)

    card = (Path(local) / "README.md").read_text()
    front, body = card.split("\n---", 1)
    assert "\nbase_model:" not in front  # a local base has no Hub id to name
    (base_line,) = re.findall(r"^Base model: .*$", body, re.M)
    assert base_line.startswith("Base model: `a local folder named 'sampling-base'") and "/tmp" not in base_line
    meta = json.loads((Path(local) / "vlmdet.json").read_text())
    assert meta["base_model"] == base_line.split("`")[1]
    assert "`Detect the table in this image.`" in card
    (snippet,) = re.findall(r"## How to use\n.*?```python\n(.*?)```", card, re.S)
    assert f'repo = "{REPO}"' in snippet and "generate(**inputs)" in snippet

    image = photo(tmp_path / "photo.jpg")
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
               HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1", PYTHONPATH="")
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    snippet_boxes = ast.literal_eval(run.stdout.strip().splitlines()[-1])

    out = tmp_path / "pred"
    assert main(["predict", "--model", local, "--out", str(out), "--data.category", "table", str(image)]) == 0
    (rec,) = json.loads((out / "predictions.json").read_text())["images"]
    assert rec["boxes"], f"the model should find the table: {rec['answer']!r}"
    assert [[round(v, 2) for v in b] for b in snippet_boxes] == [b["xyxy"] for b in rec["boxes"]]


def test_serve_follows_the_repo_to_its_newest_revision(hub, config, merged, published, tmp_path):
    from fastapi.testclient import TestClient

    from vlmdet.serving.server import build

    app = build(REPO, config, {"data.category"})
    image = photo(tmp_path / "photo.jpg").read_bytes()
    with TestClient(app) as client:
        assert client.get("/health").json()["revision"] == published.revision
        assert client.post("/reload").json() == {"changed": False, "revision": published.revision,
                                                 "previous": published.revision}
        v2 = _publish(hub, config, merged, tmp_path / "pub2", map50=0.75)
        assert v2.revision != published.revision
        assert client.get("/health").json()["revision"] == published.revision  # nothing moves until asked
        assert client.post("/reload").json() == {"changed": True, "revision": v2.revision, "previous": published.revision}
        assert client.get("/health").json()["revision"] == v2.revision
        r = client.post("/detect", files={"file": ("photo.jpg", image)})
        assert r.status_code == 200 and r.json()["revision"] == v2.revision and r.json()["boxes"]

        hub.fail("GET", rf"^/api/models/{REPO}", 503, times=100)  # the Hub is down: keep serving v2
        try:
            r = client.post("/reload")
            assert r.status_code == 502 and r.json()["error"] == "reload-failed" and v2.revision in r.json()["detail"]
            assert client.post("/detect", files={"file": ("photo.jpg", image)}).json()["revision"] == v2.revision
        finally:
            hub.state.faults.clear()
        metrics = client.get("/metrics").text
    for outcome, n in (("unchanged", 1), ("changed", 1), ("failed", 1)):
        assert f'vlmdet_serve_reloads_total{{outcome="{outcome}"}} {n}.0' in metrics


def test_serve_reloads_on_its_schedule(hub, config, merged, published, tmp_path):
    from fastapi.testclient import TestClient

    from vlmdet.serving.server import build

    app = build(REPO, config.override({"serve.reload_interval_s": 0.2}), {"data.category"})
    with TestClient(app) as client:
        before = client.get("/health").json()["revision"]
        v3 = _publish(hub, config, merged, tmp_path / "pub3", map50=0.8)
        assert v3.revision != before
        deadline = time.monotonic() + 60
        while client.get("/health").json()["revision"] != v3.revision:
            assert time.monotonic() < deadline, "the scheduled reload did not pick up the new revision"
            time.sleep(0.1)


def test_a_published_folder_is_followed_by_its_run_id(tmp_path):
    from vlmdet.config.settings import ConfigError
    from vlmdet.serving.source import ModelSource

    folder = tmp_path / "published"
    shutil.copytree(ASSET, folder)
    (folder / "vlmdet.json").write_text(json.dumps({"run_id": "aaa"}))
    source = ModelSource(str(folder))
    assert source.latest() == "run-aaa" and source.fetch("run-aaa") == str(folder.resolve())
    (folder / "vlmdet.json").write_text(json.dumps({"run_id": "bbb"}))
    assert source.latest() == "run-bbb"
    for bad in ("no/such/folder/here", "not a repo", str(tmp_path)):
        with pytest.raises(ConfigError, match="--model"):
            ModelSource(bad)


def test_serve_asks_with_the_prompt_and_category_the_model_was_published_with(tmp_path):
    """As `vlmdet predict`: the published vlmdet.json's prompt and category, unless given explicitly;
    the serve settings' own prompt and category only for a model without the file."""
    from vlmdet.config.settings import RunConfig
    from vlmdet.serving.engine import Engine
    from vlmdet.serving.source import ModelSource

    folder = tmp_path / "published"
    shutil.copytree(ASSET, folder)
    (folder / "vlmdet.json").write_text(json.dumps(
        {"run_id": "aaa", "config": {"model": {"prompt": "Find every {category} here."}, "data": {"category": "table"}}}))
    settings = RunConfig().override({"model.prompt": "Detect the {category} in this image.",
                                     "data.category": "nutrition-table"})

    det = Engine(ModelSource(str(folder)), settings).load().detector
    assert (det.prompt, det.category) == ("Find every {category} here.", "table")
    assert "Find every table here." in det.text

    det = Engine(ModelSource(str(folder)), settings, {"data.category"}).load().detector
    assert (det.prompt, det.category) == ("Find every {category} here.", "nutrition-table")

    det = Engine(ModelSource(str(ASSET)), settings).load().detector  # no vlmdet.json
    assert (det.prompt, det.category) == ("Detect the {category} in this image.", "nutrition-table")


def test_serve_prunes_the_cache_to_the_serving_and_previous_revisions(hub, config, merged, published, tmp_path):
    """Each publication is a full snapshot in the Hugging Face cache (~15 GB for a 7B); after a reload
    only the revision serving and the one before it stay, and no blob of a deleted one is left."""
    from fastapi.testclient import TestClient
    from huggingface_hub import scan_cache_dir

    from vlmdet.serving.server import build

    def cached():
        (repo,) = [r for r in scan_cache_dir().repos if r.repo_id == REPO]
        return repo

    app = build(REPO, config, {"data.category"})
    image = photo(tmp_path / "photo.jpg").read_bytes()
    with TestClient(app) as client:
        served = [client.get("/health").json()["revision"]]
        for i, map50 in enumerate((0.81, 0.82)):
            pub = _publish(hub, config, merged, tmp_path / f"pub-prune{i}", map50=map50)
            assert client.post("/reload").json()["changed"] is True
            served.append(pub.revision)
            repo = cached()
            assert {r.commit_hash for r in repo.revisions} == set(served[-2:]), "kept: the serving and the previous"
            # the weights are shared by every revision (same merged model); each card and vlmdet.json is
            # its own: the deleted revision's are gone, and every kept file still resolves
            assert set((repo.repo_path / "blobs").iterdir()) == {f.blob_path for r in repo.revisions for f in r.files}
            assert all(f.file_path.resolve().is_file() for r in repo.revisions for f in r.files)
        previous = next(r for r in repo.revisions if r.commit_hash == served[-2])
        assert (previous.snapshot_path / "model.safetensors").resolve().is_file()  # ready to roll back to
        r = client.post("/detect", files={"file": ("photo.jpg", image)})
        assert r.status_code == 200 and r.json()["revision"] == served[-1]


def test_prune_keeps_the_named_revisions_first_and_touches_no_other_repo(hub, tmp_path):
    """ModelSource.prune on small repos: the revisions named in `keep` (serving, previous) stay even
    when another one was downloaded later, a blob shared with a kept revision stays, another repo's
    revisions and a count of 0 delete nothing."""
    from huggingface_hub import HfApi, scan_cache_dir

    from vlmdet.serving.source import ModelSource

    api = HfApi(endpoint=hub.url, token=TOKEN)

    def commits(repo: str, n: int) -> list[str]:
        api.create_repo(repo, exist_ok=True)
        api.upload_file(path_or_fileobj=b"the same in every revision", path_in_repo="shared.txt", repo_id=repo)
        return [api.upload_file(path_or_fileobj=f"revision {i}".encode(), path_in_repo="own.txt", repo_id=repo).oid
                for i in range(n)]

    def cached(repo: str) -> set[str]:
        return {r.commit_hash for r in scan_cache_dir().repos if r.repo_id == repo for r in r.revisions}

    mine, other = ModelSource("acme/prune-a", endpoint=hub.url), ModelSource("acme/prune-b", endpoint=hub.url)
    revs, other_revs = commits("acme/prune-a", 4), commits("acme/prune-b", 2)
    for rev in revs:  # downloaded oldest first: revs[2] is the newest other than revs[3]
        mine.fetch(rev)
    for rev in other_revs:
        other.fetch(rev)

    assert mine.prune([revs[3]], 0) == [] and cached("acme/prune-a") == set(revs)
    assert sorted(mine.prune([revs[3], revs[0]], 2)) == sorted([revs[1], revs[2]])  # the named previous stays
    assert cached("acme/prune-a") == {revs[3], revs[0]} and cached("acme/prune-b") == set(other_revs)
    for rev in (revs[0], revs[3]):
        snap = Path(mine.fetch(rev))  # already cached: no download, the files resolve
        assert (snap / "shared.txt").read_bytes() == b"the same in every revision"
        assert (snap / "own.txt").read_text() == f"revision {revs.index(rev)}"
    # `keep` is in order (serving, previous): with one place, the first named stays though it is older
    assert mine.prune([revs[0], revs[3]], 1) == [revs[3]] and cached("acme/prune-a") == {revs[0]}
