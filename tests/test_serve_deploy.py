"""deployments/serve/compose.yaml starts what `vlmdet serve` accepts, from the Prefect image."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from vlmdet.cli import cmd_serve, parser, settings_overrides
from vlmdet.config.settings import RunConfig

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "deployments" / "serve" / "compose.yaml"


def _defaults(text: str) -> str:
    """Compose's ${VAR:-default} with the default, as when the variable is unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def test_compose_command_is_a_valid_serve_invocation():
    compose = yaml.safe_load(COMPOSE.read_text())
    svc = compose["services"]["detector"]
    command = [_defaults(str(a)) for a in svc["command"]]
    assert command[:2] == ["vlmdet", "serve"]
    args = parser().parse_args(command[1:])
    assert args.fn is cmd_serve and args.host == "0.0.0.0" and args.port == 8000
    config = RunConfig().override(settings_overrides(args))  # a misspelt or invalid setting raises here
    assert config.serve.reload_interval_s > 0  # follows the repo: a new champion without a restart
    # the nightly deployment's preset publishes where this serves from
    nightly = yaml.safe_load((ROOT / "vlmdet" / "config" / "presets" / "qwen2-vl-7b-nutrition.yaml").read_text())
    assert nightly["publish"]["target"] == f"hub:{args.model}"
    # the token file is the compose secret, the image the one deployments/Dockerfile builds
    assert args.token_file == "/run/secrets/serve_token" and "serve_token" in compose["secrets"]
    assert _defaults(svc["image"]) == "vlmdet:latest"
    assert "-t vlmdet:latest" in (ROOT / "deployments" / "Dockerfile").read_text()
    assert f":{args.port}" in svc["ports"][0] and f":{args.port}/health" in " ".join(svc["healthcheck"]["test"])
