"""Publishing a merged model with its card to the run's target, and reading and fetching its champion.

    resolve_target(config) -> Target                  once, when the run resolves its configuration
    read_champion(config, workdir, token) -> Champion | None
    fetch_champion(champion, config, workdir, token, predictions_only) -> str | None
    publish(merged, report, dataset, adapter, decision, config, workdir, token) -> Publication

`config.publish.target` is `KIND:REST`: `local:DIR` (DIR relative to the workdir unless absolute),
`hub:ORG/NAME` (on `config.publish.endpoint`), or a kind an installed package registers
(vlmdet.publishing.target). Each call takes the run's resolved Target as `target=`, or resolves
it from the configuration. Nothing is written when the gate decision did not pass.

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

from vlmdet.config.settings import RunConfig
from vlmdet.publishing import card as cardlib
from vlmdet.publishing.errors import PermanentPublishError, PublishError, TargetChangedError, TransientPublishError
from vlmdet.publishing.files import check_pinned, make_run_id, plan
from vlmdet.publishing.target import Outgoing, Target, resolve_target
from vlmdet.run.records import AdapterRef, Champion, DatasetRef, EvalReport, GateDecision, MergedRef, Publication

__all__ = ["publish", "read_champion", "fetch_champion", "resolve_target", "Target", "PublishError",
           "PermanentPublishError", "TransientPublishError", "TargetChangedError", "make_run_id"]


def publish(merged: MergedRef, report: EvalReport, dataset: DatasetRef, adapter: AdapterRef, decision: GateDecision,
            config: RunConfig, workdir: str | Path = ".", token: str | None = None, run_id: str | None = None,
            sleep: Callable[[float], None] = time.sleep, retry_policy=None, *, target: Target | None = None
            ) -> Publication:
    """Publish the merged model with its card in one atomic step (a folder swap, one Hub commit)."""
    if not decision.passed:
        raise PermanentPublishError(f"refusing to publish: the gate did not pass ({decision.reason})")
    if decision.champion_unreadable and not decision.replaced_unreadable:  # a decision not made by gate.decide
        raise PermanentPublishError(f"refusing to publish: the champion could not be read "
                                    f"({decision.champion_unreadable}) and replacing it was not asked for "
                                    "(gate.replace_unreadable_champion).")
    target = target or resolve_target(config)
    run_id = run_id or make_run_id(merged, report, dataset, adapter)
    name = target.model_name(workdir) or config.name
    if not merged.sha256:  # nothing to check the bytes against: refused before anything is staged
        check_pinned(merged, {})
    files = plan(merged, report, dataset, adapter, decision, config, run_id, name, load_name=target.load_name())
    meta = cardlib.build_metadata(report=report, dataset=dataset, adapter=adapter, decision=decision, config=config,
                                  run_id=run_id, model_name=name)
    pub = target.publish(Outgoing(files, run_id, decision.champion_revision, meta, merged), workdir, token,
                         sleep=sleep, retry_policy=retry_policy)
    pub.sha256 = merged.sha256
    return pub


def read_champion(config: RunConfig, workdir: str | Path = ".", token: str | None = None,
                  sleep: Callable[[float], None] = time.sleep, retry_policy=None, *,
                  target: Target | None = None) -> Champion | None:
    """The model now published at config.publish.target, as the gate's champion: None only when the
    target does not exist or is empty; marked `unreadable` when something is there that cannot be judged."""
    return (target or resolve_target(config)).read_champion(workdir, token, sleep=sleep, retry_policy=retry_policy)


def fetch_champion(champion: Champion, config: RunConfig, workdir: str | Path, token: str | None = None,
                   predictions_only: bool = False, *, target: Target | None = None,
                   sleep: Callable[[float], None] = time.sleep, retry_policy=None) -> str | None:
    """The champion's published predictions (predictions_only; None when it published none) or a local
    folder with its model, at the revision the gate read; a failure to get them raises (never None)."""
    return (target or resolve_target(config)).fetch(champion, workdir, token, predictions_only, sleep=sleep,
                                                    retry_policy=retry_policy)
