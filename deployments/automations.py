"""Create or update the Automations of deployments/automations.yaml on the Prefect server.

    python deployments/automations.py [--serve-url URL --serve-token-file FILE] [--only NAME ...]

Run from the repository root after `prefect deploy`, against the server of PREFECT_API_URL (and
PREFECT_API_AUTH_STRING, as every Prefect command). Each automation is matched by name: a second
run updates it in place instead of adding a copy. A `block_document_id` of the form `TYPE/NAME` or
`NAME` is replaced by that block's id; an automation whose block does not exist yet is not applied,
and the message says which block to create.

--serve-url writes the webhook block `vlmdet-serve-reload` (POST URL/reload, with the bearer token
of `vlmdet serve --token-file` read from --serve-token-file, kept in the block's secret headers).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
DEFINITIONS = HERE / "automations.yaml"
RELOAD_BLOCK = "vlmdet-serve-reload"


class MissingBlock(LookupError):
    pass


@dataclass
class Applied:
    name: str
    id: str | None
    action: str  # "created", "updated" or "skipped"
    why: str = ""


def definitions(path: Path = DEFINITIONS) -> list[dict[str, Any]]:
    return yaml.safe_load(path.read_text())["automations"]


def save_reload_webhook(serve_url: str, token: str | None, name: str = RELOAD_BLOCK) -> None:
    """The webhook block the reload automation calls: POST SERVE_URL/reload with the server's token."""
    from prefect.blocks.webhook import Webhook

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    Webhook(url=serve_url.rstrip("/") + "/reload", method="POST", headers=headers).save(name, overwrite=True)


def _block_id(client, ref: str) -> str:
    """The id of block `TYPE/NAME` (or a `NAME` held by exactly one block type)."""
    from prefect.exceptions import ObjectNotFound

    slug, _, name = ref.rpartition("/")
    if slug:
        try:
            return str(client.read_block_document_by_name(name, block_type_slug=slug).id)
        except ObjectNotFound:
            raise MissingBlock(f"no {slug} block named {name!r}") from None
    found = [d for d in client.read_block_documents(include_secrets=False) if d.name == name]
    if len(found) != 1:
        raise MissingBlock(f"no block named {name!r}" if not found else
                           f"{len(found)} blocks are named {name!r}; write TYPE/{name} in {DEFINITIONS.name}")
    return str(found[0].id)


def resolve(definition: dict[str, Any], client) -> dict[str, Any]:
    out = dict(definition, actions=[dict(a) for a in definition["actions"]])
    for action in out["actions"]:
        ref = action.get("block_document_id")
        if isinstance(ref, str) and not _is_uuid(ref):
            action["block_document_id"] = _block_id(client, ref)
    return out


def _is_uuid(text: str) -> bool:
    from uuid import UUID

    try:
        UUID(text)
        return True
    except ValueError:
        return False


def apply(path: Path = DEFINITIONS, only: list[str] | None = None, client=None) -> list[Applied]:
    """Create or update (by name) each automation of `path`; those whose block is missing are skipped."""
    from prefect import get_client
    from prefect.events.schemas.automations import AutomationCore

    done: list[Applied] = []
    owned = client is None
    client = client or get_client(sync_client=True)
    try:
        if owned:
            client.__enter__()
        for definition in definitions(path):
            name = definition["name"]
            if only and name not in only:
                continue
            try:
                automation = AutomationCore.model_validate(resolve(definition, client))
            except MissingBlock as err:
                done.append(Applied(name, None, "skipped", f"{err}; create it (see {path.name}'s header) and run "
                                                           "this again"))
                continue
            existing = client.read_automations_by_name(name)
            if existing:
                client.update_automation(existing[0].id, automation)
                for extra in existing[1:]:  # copies made by hand or by an older apply: one automation a name
                    client.delete_automation(extra.id)
                done.append(Applied(name, str(existing[0].id), "updated"))
            else:
                done.append(Applied(name, str(client.create_automation(automation)), "created"))
    finally:
        if owned:
            client.__exit__(None, None, None)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, default=DEFINITIONS, help="automation definitions (YAML)")
    parser.add_argument("--serve-url", help="`vlmdet serve`'s base URL, e.g. http://gpu-box:8000: writes the "
                                            f"webhook block {RELOAD_BLOCK}")
    parser.add_argument("--serve-token-file", help="the file `vlmdet serve --token-file` reads (bearer token)")
    parser.add_argument("--only", action="append", help="apply only this automation (repeatable)")
    args = parser.parse_args(argv)
    if args.serve_url:
        token = Path(args.serve_token_file).read_text().strip() if args.serve_token_file else None
        save_reload_webhook(args.serve_url, token)
        print(f"webhook block {RELOAD_BLOCK}: POST {args.serve_url.rstrip('/')}/reload"
              + (" with the bearer token" if token else " without a token"))
    results = apply(args.file, args.only)
    for r in results:
        print(f"{r.action}: {r.name}" + (f" ({r.id})" if r.id else "") + (f": {r.why}" if r.why else ""))
    return 1 if any(r.action == "skipped" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
