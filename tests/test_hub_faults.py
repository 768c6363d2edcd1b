"""A Hub target that cannot be read is never a champion without the file (issue 26): the real
huggingface_hub client against tests/hub_server.py, with faults on every endpoint a read of the
champion takes.

Only the server's 404 entry-not-found for a file at the champion's commit is "missing" (a content
fault, which gate.replace_unreadable_champion may replace). A 500, 503, 403, a timeout or a dropped
connection on model info, the card, vlmdet.json, the published predictions or the weights (HEAD
and GET, and the tree listing snapshot_download takes) is a transport fault: retried by our
backoff, then the gate closes with a reason that says the target could not be read, or the
fetch for measuring fails the step; with or without the override, nothing is committed.

Also here: "already committed?" is asked of the head only (re-publishing a run id replaced since
commits again; a retry after a lost reply still does not commit twice).
"""
from __future__ import annotations

import functools
import json
import time
import types
from pathlib import Path

import pytest

from hub_server import HubServer, resolve_path
from pubkit import NO_SLEEP, online_classic_lfs, records
from vlmdet import publishing
from vlmdet.pipeline import steps as runsteps
from vlmdet.config.settings import RunConfig
from vlmdet.decide.gate import decide
from vlmdet.publishing import PermanentPublishError, PublishError, TransientPublishError
from vlmdet.publishing.hub import RUN_MARKER, RetryPolicy

TOKEN = "hf_testwritetoken"
REPO = "acme/champion"  # published once per module, never written by a test
CLIENT_TIMEOUT_S = 0.2  # the client's timeouts (model_info, a file's HEAD and GET); a "timeout" fault holds longer
HOLD_S = CLIENT_TIMEOUT_S + 0.1  # then closes: what a client without a timeout (the tree listing) sees
POLICY = RetryPolicy(attempts=2, base_s=0.0, max_s=0.0, timeout_s=CLIENT_TIMEOUT_S)  # one retry of ours, no wait
FAULTS = [500, 503, 403, "timeout", "drop"]
REPLACE = {"gate.replace_unreadable_champion": True}


def _api(name: str) -> str:
    return rf"^/api/models/{REPO}/{name}/"


# Every request a read of the champion makes, as (method, path pattern), by what it reads (the server log
# of read_champion and fetch_champion (predictions, model): model_info, then HEAD + GET of each file;
# snapshot_download lists the tree at the commit, then HEAD + GET per file).
READ = {  # read by publishing.read_champion: a fault closes the gate
    "model-info": ("GET", rf"^/api/models/{REPO}$"),
    "README.md-HEAD": ("HEAD", resolve_path(REPO, "README.md")),
    "README.md-GET": ("GET", resolve_path(REPO, "README.md")),
    "vlmdet.json-HEAD": ("HEAD", resolve_path(REPO, "vlmdet.json")),
    "vlmdet.json-GET": ("GET", resolve_path(REPO, "vlmdet.json")),
}
FETCH = {  # fetched to measure the champion: a fault fails the step
    "predictions-HEAD": ("HEAD", resolve_path(REPO, "eval/predictions.json")),
    "predictions-GET": ("GET", resolve_path(REPO, "eval/predictions.json")),
    "weights-info": ("GET", _api("revision")),  # the file list the download is checked against
    "weights-tree": ("GET", _api("tree")),
    "weights-HEAD": ("HEAD", resolve_path(REPO, "model.safetensors")),
    "weights-GET": ("GET", resolve_path(REPO, "model.safetensors")),
}


class Sleeps(list):
    """Our backoff's sleep, recorded: one call per retry of ours."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _short_timeouts(mp: pytest.MonkeyPatch) -> None:
    """The client's file timeouts short (HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT: a held request
    times out in a fraction of a second) and its own waits instant (file_download sleeps 1 s before
    resuming a dropped GET)."""
    import huggingface_hub.constants as C
    import huggingface_hub.file_download as fd

    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.sleep = NO_SLEEP
    mp.setattr(fd, "time", fake_time)
    mp.setattr(C, "HF_HUB_ETAG_TIMEOUT", CLIENT_TIMEOUT_S)
    mp.setattr(C, "HF_HUB_DOWNLOAD_TIMEOUT", CLIENT_TIMEOUT_S)
    mp.setattr(fd, "_ETAG_RETRY_TIMEOUT", CLIENT_TIMEOUT_S)  # the HEAD's second try after a failed first


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_model):
    """One server with the champion published (model, card, vlmdet.json, predictions), for every test."""
    with pytest.MonkeyPatch.context() as mp, HubServer(tokens={TOKEN}) as srv:
        online_classic_lfs(mp)
        root = tmp_path_factory.mktemp("champion")
        srv.champion = _publish(srv, root, Path(tiny_model), 0.70, REPO)
        assert {"README.md", "vlmdet.json", "eval/predictions.json", "model.safetensors"} <= set(
            srv.state.repos[REPO].head.files)
        _short_timeouts(mp)
        yield srv


@pytest.fixture(autouse=True)
def clean(hub):
    hub.state.faults.clear()
    hub.state.hooks.clear()
    hub.state.requests.clear()
    yield
    hub.state.faults.clear()


def _cfg(hub: HubServer, repo: str = REPO, **over) -> RunConfig:
    return _config(hub.url, repo, tuple(sorted(over.items())))


@functools.lru_cache
def _config(url: str, repo: str, over: tuple) -> RunConfig:  # a config costs ~0.2 s on a busy 2-core machine
    return RunConfig(name="smoke").override({"publish.target": f"hub:{repo}", "publish.endpoint": url, **dict(over)})


def _publish(hub: HubServer, root: Path, model: Path, map50: float, repo: str, champion_revision=None, **kw):
    """Publish one run (its records in root/run-MAP50, with predictions); the same map50 is the same run id."""
    rec = records(root / f"run-{map50}", model, map50=map50, champion_revision=champion_revision)
    Path(rec[1].predictions).write_text("[]")
    return publishing.publish(*rec, _cfg(hub, repo), root, TOKEN, sleep=NO_SLEEP, **kw)


def _faulted(hub: HubServer, method: str, path: str) -> list:
    return [r for r in hub.calls(method, path) if r[2] != 200]


def _fetch(hub: HubServer, champ, work: Path, predictions_only: bool, sleep, repo: str = REPO):
    """The champion's predictions or model, fetched as the run's gate fetches them."""
    return publishing.fetch_champion(champ, _cfg(hub, repo), work, TOKEN, predictions_only, sleep=sleep,
                                     retry_policy=POLICY)


def _assert_untouched(hub: HubServer) -> None:
    repo = hub.state.repos[REPO]
    assert repo.head.oid == hub.champion.revision and len(repo.commits) == 2  # the initial commit and the champion


# --- a fault while reading the champion closes the gate, whatever the override says -----------------------

@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("where", sorted(READ))
def test_a_fault_reading_the_champion_closes_the_gate_as_transport_not_missing(hub, tmp_path, tiny_model,
                                                                               where, fault):
    """The HEAD cases with 500, 503, 403 or a timeout fail on a9dd703 (and on 412b456): huggingface_hub's
    LocalEntryNotFoundError (its answer to a failed HEAD) was caught as EntryNotFoundError, so the card or
    vlmdet.json read as missing: a content fault the override replaced, or, for the card, a champion read
    from vlmdet.json alone. The other cases (model info, GET, a dropped HEAD) held there and guard the rest."""
    method, path = READ[where]
    hub.fail(method, path, fault, times=10_000, hold_s=HOLD_S)
    sleeps = Sleeps()
    champ = publishing.read_champion(_cfg(hub), tmp_path, TOKEN, sleep=sleeps, retry_policy=POLICY)
    assert _faulted(hub, method, path), "the fault was never hit"
    assert champ is not None and champ.fault == "transport" and champ.unreadable
    if fault == 403:  # permanent: not retried by us
        assert sleeps == [] and "HTTP 403" in champ.unreadable and "token" in champ.unreadable
    else:  # transient: retried once by our policy, then closed with "run again"
        assert len(sleeps) == POLICY.attempts - 1
        assert "failed after retries" in champ.unreadable and "Run again when it answers" in champ.unreadable
    merged, report, dataset, adapter, _ = records(tmp_path / "challenger", Path(tiny_model), map50=0.95)
    for over in ({}, REPLACE):
        decision = decide(report, _cfg(hub, **over).gate, champ)
        assert not decision.passed and not decision.replaced_unreadable
        assert decision.champion_fault == "transport" and decision.champion_unreadable == champ.unreadable
        assert "The target could not be read" in decision.reason
        for content_reason in ("no readable vlmdet.json", "neither a model card", "no champion", "missing"):
            assert content_reason not in decision.reason
        with pytest.raises(PermanentPublishError, match="gate did not pass"):
            publishing.publish(merged, report, dataset, adapter, decision, _cfg(hub, **over), tmp_path, TOKEN,
                               sleep=NO_SLEEP)
    _assert_untouched(hub)


# --- a fault while fetching the champion to measure it fails the step, never reads as "absent" ---------------

@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("where", sorted(FETCH))
def test_a_fault_fetching_the_champion_to_measure_it_fails_the_step(hub, tmp_path, tiny_model, where, fault):
    """Fails on a9dd703: a failed HEAD of the predictions read as "published none" (the champion's model was
    fetched to evaluate it again instead), a snapshot_download that could not list the repo returned the
    folder holding only the predictions as the champion's model, and a 403 read said "cannot write"."""
    champ = publishing.read_champion(_cfg(hub), tmp_path, TOKEN, sleep=NO_SLEEP, retry_policy=POLICY)
    assert not champ.unreadable and champ.revision == hub.champion.revision
    work = tmp_path / "run"
    if where.startswith("weights"):  # the run folder already holds the predictions, as after a measured_on miss
        assert Path(_fetch(hub, champ, work, True, NO_SLEEP)).read_text() == "[]"
    method, path = FETCH[where]
    hub.fail(method, path, fault, times=10_000, hold_s=HOLD_S)
    sleeps = Sleeps()
    evaluated = []

    def fetch(c, predictions_only: bool):
        return _fetch(hub, c, work, predictions_only, sleeps)

    _, report, *_ = records(tmp_path / "challenger", Path(tiny_model), map50=0.95,
                            fp="fp-test" if where.startswith("predictions") else "fp-other")
    assert champ.measured_on(report) == where.startswith("predictions")
    with pytest.raises(PublishError, match=rf"could not download the champion's .* from hub:{REPO}") as err:
        runsteps.measure_champion(champ, report, _cfg(hub), fetch, lambda model, cfg: evaluated.append(model))
    assert evaluated == [] and _faulted(hub, method, path)
    if fault == 403:
        assert isinstance(err.value, PermanentPublishError) and sleeps == [] and "HTTP 403" in str(err.value)
    else:
        assert isinstance(err.value, TransientPublishError) and len(sleeps) == POLICY.attempts - 1
        assert "Run again when it answers" in str(err.value)
    _assert_untouched(hub)


# --- the server's own "no such file" is content -----------------------------------------------------------

def test_a_real_404_for_vlmdet_json_is_a_content_fault_the_override_may_replace(hub, tmp_path, tiny_model):
    """The counterpart: vlmdet.json deleted in a commit is missing (404 entry-not-found), not a transport fault."""
    repo = "acme/hand-edited"
    first = _publish(hub, tmp_path, Path(tiny_model), 0.70, repo)
    hand = hub.land_commit(repo, {}, delete={"vlmdet.json"})
    champ = publishing.read_champion(_cfg(hub, repo), tmp_path, TOKEN, sleep=NO_SLEEP, retry_policy=POLICY)
    assert (hub.calls("HEAD", resolve_path(repo, "vlmdet.json"))[-1][2]) == 404
    assert champ.fault == "content" and champ.revision == hand and champ.unreadable and hand != first.revision
    merged, report, dataset, adapter, _ = records(tmp_path / "challenger", Path(tiny_model), map50=0.95)
    closed = decide(report, _cfg(hub, repo).gate, champ)
    assert not closed.passed and closed.champion_fault == "content"
    assert "gate.replace_unreadable_champion=true" in closed.reason
    forced = decide(report, _cfg(hub, repo, **REPLACE).gate, champ)
    assert forced.passed and forced.replaced_unreadable and forced.champion_revision == hand
    pub = publishing.publish(merged, report, dataset, adapter, forced, _cfg(hub, repo, **REPLACE), tmp_path, TOKEN,
                             sleep=NO_SLEEP)
    assert hub.state.repos[repo].head.oid == pub.revision != hand


def test_a_real_404_for_the_predictions_is_published_none(hub, tmp_path, tiny_model):
    """Predictions deleted in a commit: None (the gate evaluates the champion again), not an error."""
    repo = "acme/no-predictions"
    _publish(hub, tmp_path, Path(tiny_model), 0.70, repo)
    hub.land_commit(repo, {}, delete={"eval/predictions.json"})
    champ = publishing.read_champion(_cfg(hub, repo), tmp_path, TOKEN, sleep=NO_SLEEP, retry_policy=POLICY)
    assert not champ.unreadable
    assert _fetch(hub, champ, tmp_path / "run", True, NO_SLEEP, repo) is None
    assert [r[2] for r in hub.calls("HEAD", resolve_path(repo, "eval/predictions.json"))] == [404]


# --- "already committed?" is asked of the head only ----------------------------------------------------------

def test_republishing_a_run_replaced_since_commits_again(hub, tmp_path, tiny_model):
    """Fails on a9dd703: the whole history was searched for the run id, so publishing X's content over Y
    reported `reused` with X's old commit and committed nothing: Y stayed, reported as X."""
    repo = "acme/rollback"
    model = Path(tiny_model)
    x = _publish(hub, tmp_path, model, 0.70, repo)
    y = _publish(hub, tmp_path, model, 0.80, repo, champion_revision=x.revision)
    again = _publish(hub, tmp_path, model, 0.70, repo, champion_revision=y.revision)  # X's content, over Y
    state = hub.state.repos[repo]
    assert again.run_id == x.run_id and not again.reused
    assert state.head.oid == again.revision and again.revision not in (x.revision, y.revision)
    assert len(state.commits) == 4 and json.loads(state.head.files["vlmdet.json"][0])["run_id"] == x.run_id
    # the run's tag keeps naming its first commit; the new commit gets its own, and the url names it
    assert state.tags[f"run-{x.run_id}"] == x.revision and state.tags[again.tag] == again.revision
    assert again.url.endswith(f"/tree/{again.tag}")

    # a retry after a lost reply (the commit landed, the client never heard) still does not commit twice
    hub.fail("POST", rf"^/api/models/{repo}/commit/main$", 503, times=1, after=True)
    z = _publish(hub, tmp_path, model, 0.90, repo, champion_revision=again.revision)
    marked = hub.state.commits_matching(repo, RUN_MARKER.format(run_id=z.run_id))
    assert z.reused and [c.oid for c in marked] == [z.revision] == [state.head.oid] and len(state.commits) == 5
