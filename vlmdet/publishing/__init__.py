"""Publishing a merged model with its card, to a local folder or a Hub repo, and reading the champion.

    publish(merged, report, dataset, adapter, decision, config, workdir, token) -> Publication
    read_champion(config, workdir, token) -> Champion | None

`config.publish.target` is `local:DIR` (DIR relative to the workdir unless absolute) or `hub:ORG/NAME`
(on `config.publish.endpoint`). Nothing is written when the gate decision did not pass.

Fail closed: read_champion returns None only for a target that does not exist or is empty; a target
holding anything it cannot read or judge is a Champion marked `unreadable`, which closes the gate.
publish is a compare-and-swap on `decision.champion_revision` (the revision the gate read; None for
an empty target) and replaces the model whole; a moved target raises TargetChangedError (permanent).
The model files published are the merged folder's bytes that the merge pinned (MergedRef.sha256),
checked on what goes out; any other bytes raise MergedChangedError (permanent).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from vlmdet.config.settings import ConfigError, RunConfig
from vlmdet.publishing import card as cardlib
from vlmdet.publishing.errors import PermanentPublishError, PublishError, TargetChangedError, TransientPublishError
from vlmdet.publishing.files import check_pinned, check_staged, make_run_id, pinned_names, plan
from vlmdet.run.records import AdapterRef, Champion, DatasetRef, EvalReport, GateDecision, MergedRef, Publication

__all__ = ["publish", "read_champion", "parse_target", "PublishError", "PermanentPublishError",
           "TransientPublishError", "TargetChangedError", "make_run_id"]


def parse_target(target: str, workdir: str | Path = ".") -> tuple[str, str]:
    """("local", absolute folder) or ("hub", repo id); a ConfigError naming publish.target otherwise."""
    kind, sep, where = target.partition(":")
    if not sep or not where or kind not in ("local", "hub"):
        raise ConfigError(f"publish.target={target!r} is not understood; use local:DIR (a folder, relative to the "
                          "workdir) or hub:ORG/NAME (a Hub model repo).")
    if kind == "local":
        path = Path(where).expanduser()
        return "local", str(path if path.is_absolute() else Path(workdir) / path)
    return "hub", where


def _model_name(config: RunConfig, kind: str, where: str) -> str:
    return where.split("/")[-1] if kind == "hub" else Path(where).name or config.name


def publish(merged: MergedRef, report: EvalReport, dataset: DatasetRef, adapter: AdapterRef, decision: GateDecision,
            config: RunConfig, workdir: str | Path = ".", token: str | None = None, run_id: str | None = None,
            sleep: Callable[[float], None] = time.sleep, retry_policy=None) -> Publication:
    """Publish the merged model with its card in one atomic step (a folder swap, or one Hub commit)."""
    if not decision.passed:
        raise PermanentPublishError(f"refusing to publish: the gate did not pass ({decision.reason})")
    if decision.champion_unreadable and not decision.replaced_unreadable:  # a decision not made by gate.decide
        raise PermanentPublishError(f"refusing to publish: the champion could not be read "
                                    f"({decision.champion_unreadable}) and replacing it was not asked for "
                                    "(gate.replace_unreadable_champion).")
    kind, where = parse_target(config.publish.target, workdir)
    run_id = run_id or make_run_id(merged, report, dataset, adapter)
    name = _model_name(config, kind, where)
    if not merged.sha256:  # nothing to check the bytes against: refused before anything is staged
        check_pinned(merged, {})
    files = plan(merged, report, dataset, adapter, decision, config, run_id, name)
    # The bytes that go out are checked against the merge's hashes where they are read last: the staged copy
    # that is renamed into place, or the sha256 each file of the Hub commit carries (files.check_pinned).
    if kind == "local":
        from vlmdet.publishing.local import publish_folder

        pub = publish_folder(Path(where), files, run_id, expected=decision.champion_revision,
                             check=lambda staged: check_staged(merged, files, staged))
    else:
        from vlmdet.publishing import hub

        meta = cardlib.build_metadata(report=report, dataset=dataset, adapter=adapter, decision=decision,
                                      config=config, run_id=run_id, model_name=name)
        names = pinned_names(merged, files)
        pub = hub.publish_repo(where, files, meta, run_id, endpoint=config.publish.endpoint, token=token,
                               private=config.publish.private, expected=decision.champion_revision,
                               policy=retry_policy, sleep=sleep,
                               check=lambda sent: check_pinned(merged, {n: sent[n] for n in names if n in sent}))
    pub.sha256 = merged.sha256
    return pub


def read_champion(config: RunConfig, workdir: str | Path = ".", token: str | None = None,
                  sleep: Callable[[float], None] = time.sleep, retry_policy=None) -> Champion | None:
    """The model now published at config.publish.target, as the gate's champion: None only when the
    target does not exist or is empty; marked `unreadable` when something is there that cannot be judged."""
    kind, where = parse_target(config.publish.target, workdir)
    if kind == "local":
        from vlmdet.publishing.local import read_champion_folder

        champion = read_champion_folder(where)  # recovers an interrupted swap first
    else:
        from vlmdet.publishing import hub

        champion = hub.read_champion_repo(where, endpoint=config.publish.endpoint, token=token, policy=retry_policy,
                                          sleep=sleep)
    if champion is not None:  # where the gate fetches the champion's model to evaluate it on today's data
        champion.kind, champion.location = kind, where
    return champion
