"""`KIND:REST` values, split in one place: a dataset spec (`synth:240`, `hub:ORG/NAME`), a publish target
(`local:DIR`, `hub:ORG/NAME`), a model to serve (`hub:ORG/NAME`, or the bare id).

The part before the first colon says what kind of thing the value names, the rest where or which one
it is (a path may hold more colons: `coco:/data/a:b` is coco with the path `/data/a:b`). Each caller
says which kinds it takes; a value of no such kind fails with the setting, the value and the forms
it could take.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from vlmdet.config.errors import ConfigError


def split_spec(value: str, field: str, kinds: Mapping[str, str] | Sequence[str] = (), *, default: str | None = None,
               error: type[Exception] | None = None) -> tuple[str, str]:
    """(kind, rest) of `value`, which names the setting `field` (e.g. "publish.target").

    kinds: the kinds taken, as {kind: its form for the message, e.g. "coco:PATH"} or as names; empty takes
    any kind, so only the shape KIND:REST is checked (for a setting whose kinds are installed packages').
    default: for settings where the kind may be left out (`ORG/NAME` for `hub:ORG/NAME`), the kind of a
    value that names none of `kinds`, with the whole value as its rest, instead of an error.
    error: what is raised when the value is not understood (a ConfigError unless the caller's stage has
    its own user-facing error); the message names `field`, the value and the forms it takes.
    """
    kind, _, rest = value.partition(":") if isinstance(value, str) else ("", "", "")
    if rest and (kind in kinds if kinds else bool(kind)):
        return kind, rest
    if default is not None:
        return default, value
    forms = (", ".join(kinds.values() if isinstance(kinds, Mapping) else (f"{k}:..." for k in kinds)) if kinds
             else "KIND:REST")
    noun = field.rsplit(".", 1)[-1].lstrip("-")
    if error is None:
        error = ConfigError
    raise error(f"{field}={value!r} is not a {noun} spec; use {'one of: ' if kinds else ''}{forms}.")
