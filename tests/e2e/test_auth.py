"""The session server runs with basic authentication (tests/e2e/conftest.py, as docs/operations.md
sets it up). Without the secret nothing answers: not the REST API, not the Secret block that holds
the Hub token, not the websockets (events, logs). With it, the CLI, deploys and the worker work
(the other e2e tests)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import httpx
import pytest

pytestmark = pytest.mark.slow

HUB_TOKEN = "hf_e2e_not_a_real_token"
# What an operator runs to store the Hub token (docs/operations.md): the value comes from the
# environment, never from the command line.
SAVE_SECRET = "import os; from prefect.blocks.system import Secret; Secret(value=os.environ['HF_TOKEN']).save('hf-token', overwrite=True)"
LOAD_SECRET = "from prefect.blocks.system import Secret; print(Secret.load('hf-token').get())"


def _basic(auth_string: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}


def _python(env: dict, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_api_answers_401_without_the_secret(prefect_server, deployed):
    url = f"{prefect_server.api_url}/deployments/filter"
    assert httpx.post(url, json={}, timeout=10).status_code == 401
    assert httpx.post(url, json={}, headers=_basic("vlmdet:wrong"), timeout=10).status_code == 401
    ok = httpx.post(url, json={}, headers=_basic(prefect_server.auth_string), timeout=10)
    assert ok.status_code == 200 and {d["name"] for d in ok.json()} >= {"smoke", "nightly-gpu"}
    # Left open on purpose by Prefect (load-balancer probes); they tell nothing but "up".
    assert httpx.get(f"{prefect_server.api_url}/health", timeout=10).status_code == 200


def test_the_hub_token_secret_block_cannot_be_read_without_the_secret(prefect_server):
    env = {**prefect_server.env, "HF_TOKEN": HUB_TOKEN}
    saved = _python(env, SAVE_SECRET)
    assert saved.returncode == 0, saved.stderr
    env.pop("HF_TOKEN")

    no_auth = {k: v for k, v in env.items() if k != "PREFECT_API_AUTH_STRING"}
    refused = _python(no_auth, LOAD_SECRET)
    assert refused.returncode != 0 and "401" in refused.stderr and HUB_TOKEN not in refused.stdout
    raw = httpx.get(f"{prefect_server.api_url}/block_types/slug/secret/block_documents/name/hf-token",
                    params={"include_secrets": "true"}, timeout=10)
    assert raw.status_code == 401 and HUB_TOKEN not in raw.text

    loaded = _python(env, LOAD_SECRET)
    assert loaded.returncode == 0 and loaded.stdout.strip() == HUB_TOKEN, loaded.stderr


@pytest.mark.parametrize("path", ["events/out", "events/in", "logs/out"])
def test_websockets_need_the_secret_too(prefect_server, path):
    """Prefect issue 17687 (3.2: the events websocket took no auth) is fixed in the installed 3.x:
    a websocket must speak the 'prefect' subprotocol and send the auth string as its first message."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    url = prefect_server.api_url.replace("http://", "ws://") + "/" + path

    def first_answer(subprotocols, token):
        with connect(url, subprotocols=subprotocols, open_timeout=10, proxy=None) as ws:
            if token is not None:
                ws.send(json.dumps({"type": "auth", "token": token}))
            try:
                return json.loads(ws.recv(timeout=10))
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None

    with pytest.raises(InvalidStatus, match="403"):  # a legacy client without the handshake
        first_answer(None, None)
    assert first_answer(["prefect"], "vlmdet:wrong") == 1008
    assert first_answer(["prefect"], "") == 1008
    assert first_answer(["prefect"], prefect_server.auth_string) == {"type": "auth_success"}
