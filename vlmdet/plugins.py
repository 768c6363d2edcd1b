"""What vlmdet ships and installed packages add, by name: model families' box formats (vlmdet.formats) and
publish targets (vlmdet.publishing.target). Each is registered as "module:Class"; a package adds its own
through an entry point in the group the registry names, without editing vlmdet."""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any


def installed(shipped: dict[str, str], group: str) -> dict[str, str]:
    """Name -> "module:Class": the shipped ones, then those installed packages declare in `group` (a shipped
    name is never replaced)."""
    found = dict(shipped)
    for ep in entry_points(group=group):
        found.setdefault(ep.name, ep.value)
    return found


def load(where: str) -> Any:
    """The class a "module:Class" names, its module imported."""
    module, name = where.split(":")
    return getattr(importlib.import_module(module), name)
