"""`vlmdet serve`: load the model, then answer HTTP with uvicorn until stopped."""
from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from vlmdet.config.settings import ConfigError, RunConfig
from vlmdet.serving.engine import Engine
from vlmdet.serving.source import ModelSource

log = logging.getLogger(__name__)


def read_token(path: str | None) -> str | None:
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as err:
        raise ConfigError(f"--token-file {path!r} cannot be read: {err.strerror}") from None
    if not token:
        raise ConfigError(f"--token-file {path!r} is empty; write the bearer token clients must send into it.")
    return token


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def build(model: str, config: RunConfig, explicit: set[str] = frozenset(), token: str | None = None,
          revision: str = "main"):
    """The FastAPI app with the model loaded (the newest revision of a Hub repo)."""
    from vlmdet.serving.app import create_app

    # The Hub token comes from HF_TOKEN or `hf auth login`, as for every huggingface_hub call.
    source = ModelSource(model, endpoint=config.publish.endpoint or None, revision=revision)
    engine = Engine(source, config, explicit)
    engine.load()
    return create_app(engine, config.serve, token)


def serve(model: str, config: RunConfig, explicit: set[str] = frozenset(), host: str = "127.0.0.1",
          port: int = 8000, token_file: str | None = None, revision: str = "main") -> None:
    import uvicorn

    token = read_token(token_file)
    if not token and not _is_loopback(host):
        log.warning("serving on %s without --token-file: anyone who can reach the port can use the model", host)
    app = build(model, config, explicit, token, revision)
    # One process: the model is loaded once, and batching needs every request in the same process.
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
