"""The Hub token never leaves HfApi: not in a log line, an artifact, a state message, a written file, an
exception message or a repr. Runs the gate and publish tasks in a flow under a Prefect test API with a
recognisable token, through a success, a retried transient failure and a permanent failure.
"""
from __future__ import annotations

import logging
import time
import traceback
import types
from pathlib import Path

import pytest

from hub_server import HubServer
from pubkit import records
from vlmdet.config.settings import RunConfig
from vlmdet.modeling.tiny import build_tiny_model

SECRET = "hf_SECRETtoken123"
BLOCK = "hf-token-safety-test"


@pytest.fixture(autouse=True)
def online_classic_lfs(monkeypatch):
    import huggingface_hub.constants as C
    import huggingface_hub.utils._detect_agent as detect_agent
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(C, "HF_HUB_DISABLE_XET", True)
    # Online mode makes the client fetch an "agent harness" registry from huggingface.co for its
    # user agent; the tests stay hermetic with the empty registry it falls back to.
    monkeypatch.setattr(detect_agent, "_registry", detect_agent._EMPTY_REGISTRY)
    monkeypatch.setattr(C, "HF_DEBUG", True)  # the client's most verbose logging must be safe too
    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.sleep = lambda s: None
    monkeypatch.setattr(http, "time", fake_time)


class Collect(logging.Handler):
    """Every record, at every level. pytest's caplog sees nothing once Prefect has configured logging
    (its handler is not on the root logger during the call), so the test attaches its own."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


LOGGERS = ["", "prefect", "prefect.flow_runs", "prefect.task_runs", "huggingface_hub", "vlmdet", "httpx", "httpx2"]


@pytest.fixture
def all_logs():
    """Collect at DEBUG on every logger that matters. Prefect re-applies its logging config when a flow
    starts (levels back to INFO, handlers replaced), so the flow body calls install() again."""
    collect = Collect()
    saved = {n: logging.getLogger(n).level for n in LOGGERS}

    def install() -> None:
        for n in LOGGERS:
            lg = logging.getLogger(n)
            if collect not in lg.handlers:
                lg.addHandler(collect)
            lg.setLevel(logging.DEBUG)

    collect.install = install  # type: ignore[attr-defined]
    install()
    yield collect
    for n, level in saved.items():
        logging.getLogger(n).removeHandler(collect)
        logging.getLogger(n).setLevel(level)


def _texts_of_dir(root: Path) -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in root.rglob("*") if p.is_file()]


def test_resolve_token_prefers_the_secret_block_then_env(prefect_harness, monkeypatch):
    from prefect.blocks.system import Secret

    from tasks.common import read_secret
    from vlmdet.pipeline.step import resolve_token

    cfg = RunConfig().override({"publish.token_secret": "no-such-block-here"})
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert resolve_token(cfg, read_secret) is None
    monkeypatch.setenv("HF_TOKEN", "hf_fromenv")
    assert resolve_token(cfg, read_secret) == "hf_fromenv"
    Secret(value="hf_fromblock").save("hf-token-precedence-test", overwrite=True)
    assert resolve_token(cfg.override({"publish.token_secret": "hf-token-precedence-test"}), read_secret) == "hf_fromblock"
    # without a secret store (the plain driver) the environment decides
    assert resolve_token(cfg.override({"publish.token_secret": "hf-token-precedence-test"}), None) == "hf_fromenv"


def test_token_appears_nowhere(prefect_harness, tmp_path, all_logs, monkeypatch):
    from prefect import flow
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    from tasks.common import read_secret
    from tasks.gate import find_champion, gate
    from tasks.publish import publish
    from vlmdet.pipeline.step import resolve_token
    from vlmdet.run.layout import RunLayout

    monkeypatch.delenv("HF_TOKEN", raising=False)
    Secret(value=SECRET).save(BLOCK, overwrite=True)
    merged_dir = build_tiny_model(tmp_path / "merged", size="micro")

    with HubServer(tokens={SECRET}) as hub:
        cfg = RunConfig(name="smoke").override({
            "publish.target": "hub:acme/token-safety", "publish.endpoint": hub.url, "publish.token_secret": BLOCK})

        @flow(name="token-safety")
        def run(workdir: str, map50: float, repo: str = "acme/token-safety"):
            all_logs.install()
            token = resolve_token(cfg, read_secret)
            merged, report, dataset, adapter, _ = records(Path(workdir), merged_dir, map50=map50)
            target = cfg.override({"publish.target": f"hub:{repo}"})  # an empty repo: no champion blocks the gate
            layout = RunLayout.at(workdir)
            decision = gate(report, target, layout, champion=find_champion(target, layout, token), dataset=dataset)
            return decision, publish(merged, report, dataset, adapter, decision, target, layout, token)

        hub.fail("POST", r"/commit/main$", 500, times=1)  # a retried transient error: warnings get logged
        decision, pub = run(str(tmp_path / "run1"), 0.8)
        assert decision.passed and pub.kind == "hub"
        hub.fail("POST", r"/commit/main$", 403, times=5)  # a permanent failure: exception text and state
        with pytest.raises(Exception) as failure:
            run(str(tmp_path / "run2"), 0.9, "acme/token-safety-2")
        assert SECRET in hub.state.tokens_seen  # the token really was resolved and used
        hub_texts = [hub.state.repos["acme/token-safety"].head.title, hub.state.repos["acme/token-safety"].head.message]
        hub_texts += [data.decode("latin-1") for data, _ in hub.state.repos["acme/token-safety"].head.files.values()]

    APILogHandler().flush()  # logs reach the API in background batches: send them before reading back
    haystack: list[tuple[str, str]] = [("hub file/commit", t) for t in hub_texts]
    haystack += [(f"log {r.name}", r.getMessage()) for r in all_logs.records]
    haystack += [(f"log {r.name} exc", "".join(traceback.format_exception(*r.exc_info))) for r in all_logs.records
                 if r.exc_info]
    haystack += [("exception", str(failure.value)), ("exception repr", repr(failure.value)),
                 ("traceback", "".join(traceback.format_exception(failure.value))),
                 ("config repr", repr(cfg)), ("config dict", str(cfg.to_dict())),
                 ("decision repr", repr(decision)), ("publication repr", repr(pub))]
    with get_client(sync_client=True) as client:
        logs = client.read_logs()
        artifacts = client.read_artifacts()
        flow_runs = client.read_flow_runs()
        task_runs = client.read_task_runs()
        haystack += [("api log", log.message) for log in logs]
        haystack += [("artifact", f"{a.key} {a.description} {a.data}") for a in artifacts]
        for fr in flow_runs:
            haystack += [("flow run", fr.model_dump_json())]
            haystack += [("flow state", s.model_dump_json()) for s in client.read_flow_run_states(fr.id)]
        for tr in task_runs:
            haystack += [("task run", tr.model_dump_json())]
            haystack += [("task state", s.model_dump_json()) for s in client.read_task_run_states(tr.id)]
    assert any(a.key == "gate-decision" for a in artifacts) and any(a.key == "publication" for a in artifacts)
    # A record appears once per handler it reaches (root, prefect, ...): dedupe before the coverage checks.
    names = {r.name for r in all_logs.records}
    assert {"vlmdet.publishing.hub", "huggingface_hub.utils._http"} <= names, names
    assert any("retrying" in r.getMessage() for r in all_logs.records)
    assert any("403" in s for _, s in haystack if _ == "exception")
    assert len(haystack) > 40  # the search really covered logs, artifacts and states
    haystack += [(path, data.decode("latin-1")) for path, data in _texts_of_dir(tmp_path)]

    leaks = [where for where, text in haystack if SECRET in text]
    assert leaks == []
