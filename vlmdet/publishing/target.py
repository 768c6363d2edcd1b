"""Where a merged model is published and its champion read: the `Target` interface, and the registry of kinds.

`publish.target` is `KIND:REST`: `local:DIR` (vlmdet.publishing.local) and `hub:ORG/NAME`
(vlmdet.publishing.hub) ship here. A kind shipped here is one module and one REGISTRY line; another
installed package adds one without editing vlmdet, with an entry point in the group `vlmdet.targets`
(`KIND = module:Class`), as model families do (vlmdet.formats.base). The configuration checks only the
shape KIND:REST; the kind is looked up here once, when the run resolves its configuration
(`resolve_target`), and that one Target serves the run.

What every kind promises, because the gate relies on it (DESIGN.md "The gate"):
- `read_champion` returns None only for a target that does not exist or holds nothing; anything there
  that cannot be read is a Champion marked unreadable with the fault where it happened (records.CONTENT:
  it answered and what it holds cannot be judged; records.TRANSPORT: it could not be read), never None.
  The Champion's `revision` names exactly the state that was read.
- `fetch` gets the champion's published predictions or its model at that revision; None only for
  predictions the target says it does not hold; any failure to get them raises.
- `publish` is a compare-and-swap on `Outgoing.expected` (the revision the gate read, None for a target
  it saw empty): a target that moved raises TargetChangedError and nothing is written. It replaces the
  model whole, and checks the pinned files' bytes where they are read last (`Outgoing.check`).
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from vlmdet.config.settings import PublishConfig, RunConfig
from vlmdet.config.specs import split_spec
from vlmdet.plugins import installed, load
from vlmdet.publishing.files import Source, check_pinned, check_staged, pinned_names
from vlmdet.run.records import Champion, MergedRef, Publication

FIELD = "publish.target"

# kind -> "module:Class"; adding a kind is one module and one line here (or an entry point elsewhere).
REGISTRY = {
    "local": "vlmdet.publishing.local:LocalTarget",
    "hub": "vlmdet.publishing.hub:HubTarget",
}
ENTRY_POINTS = "vlmdet.targets"


@dataclass
class Outgoing:
    """One publication as a target receives it."""

    files: dict[str, Source]  # path in the target -> the bytes, or a file to copy them from
    run_id: str  # the same on a retry of the same publication: a target can find its own earlier attempt
    expected: str | None  # the compare of the compare-and-swap: the revision the gate read (None: it saw none)
    meta: dict[str, Any]  # what vlmdet.json holds (a Hub commit message is written from it)
    merged: MergedRef  # the merge that pinned the model files' bytes

    @property
    def pinned(self) -> list[str]:
        """The files that must be the merged model's bytes, as the gate judged them."""
        return pinned_names(self.merged, self.files)

    def check(self, digests: dict[str, str]) -> None:
        """Raise MergedChangedError unless `digests` ({path: sha256 hex} of the pinned files as they go out)
        are the merge's own. Call it on what is read last: what is renamed into place, or what is sent."""
        check_pinned(self.merged, digests)

    def check_copy(self, folder: str | Path) -> None:
        """`check` on a copy of the publication in `folder` (the files at the same paths)."""
        check_staged(self.merged, self.files, Path(folder))


class Target(ABC):
    """One place a model is published to and its champion read from; built from `KIND:REST` without any
    I/O (a bad REST may fail here, or when the target is first used)."""

    kind: ClassVar[str] = ""  # KIND of publish.target
    form: ClassVar[str] = ""  # "KIND:REST (what REST is)", for messages

    def __init__(self, rest: str, publish: PublishConfig):
        self.rest, self.settings = rest, publish

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.rest}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    @abstractmethod
    def location(self, workdir: str | Path) -> str:
        """Where it is, as records and events name it (an absolute folder, a repo id); `workdir`: what a
        relative place is relative to."""

    def model_name(self, workdir: str | Path) -> str:
        """The name the card gives the model ("": the preset's name)."""
        return Path(self.location(workdir)).name

    def load_name(self) -> str | None:
        """What `from_pretrained` and `vlmdet serve --model` take to load the published model, as the card
        writes it; None where only the reader knows it (a folder on their machine)."""
        return None

    @abstractmethod
    def read_champion(self, workdir: str | Path, token: str | None = None, *, sleep: Callable[[float], None] = time.sleep,
                      retry_policy: Any = None) -> Champion | None:
        """The model there now, as the gate's champion (see the module's promises).

        token: the credential, never put in a message. sleep / retry_policy: how a remote target waits between
        and bounds its retries of transient faults (vlmdet.publishing.hub.RetryPolicy); others ignore them."""

    @abstractmethod
    def fetch(self, champion: Champion, workdir: str | Path, token: str | None = None, predictions_only: bool = False,
              *, sleep: Callable[[float], None] = time.sleep, retry_policy: Any = None) -> str | None:
        """A path to the champion's published test predictions (predictions_only; None when it published none),
        or to a local folder holding its model, at `champion.revision`; downloads go under `workdir`."""

    @abstractmethod
    def publish(self, out: Outgoing, workdir: str | Path, token: str | None = None, *,
                sleep: Callable[[float], None] = time.sleep, retry_policy: Any = None) -> Publication:
        """Replace the model there with `out.files` in one step if it still holds `out.expected` (else raise
        TargetChangedError), calling `out.check` or `out.check_copy` on the bytes last read before they land."""


def kinds() -> dict[str, str]:
    """Kind -> "module:Class": the shipped ones, then those installed packages declare."""
    return installed(REGISTRY, ENTRY_POINTS)


def target_class(kind: str) -> type[Target]:
    where = kinds().get(kind)
    if where is None:
        raise KeyError(kind)
    return load(where)


def _form(kind: str) -> str:
    try:
        return target_class(kind).form or f"{kind}:..."
    except Exception as err:  # noqa: BLE001 - a broken plugin is named, not a reason to hide the other kinds
        return f"{kind}:... (its package fails to import: {type(err).__name__}: {err})"


def target_of(spec: str, publish: PublishConfig | None = None) -> Target:
    """The Target `spec` names; `publish`: the rest of its settings (endpoint, privacy), defaults if None.
    A ConfigError naming publish.target, the value and the kinds installed when no kind is `spec`'s."""
    known = kinds()
    head, _, tail = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if head in known and tail:  # the common case: no forms to import for an error message
        return load(known[head])(tail, publish or PublishConfig(target=spec))
    kind, rest = split_spec(spec, FIELD, {k: _form(k) for k in ([head] if head in known else known)})
    return target_class(kind)(rest, publish or PublishConfig(target=spec))


def resolve_target(config: RunConfig) -> Target:
    """The run's Target, from config.publish; resolved once, when the run resolves its configuration."""
    return target_of(config.publish.target, config.publish)
