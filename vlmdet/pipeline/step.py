"""What a step is: one declaration that every driver runs the same way.

A `Step` says what it needs and returns (its `call`'s typed signature: records in, a record out), its
cache key and done-check over the run folder, whether it runs in a child process (`python -m
vlmdet.pipeline.child`), when a failure is worth another attempt, and what it shows an owner (a log
line, and the artifacts the Prefect UI draws). The declarations themselves are vlmdet/pipeline/steps.py;
the drivers are `Plain` (here: direct calls) and flows/retrain.py (a Prefect task a step, tasks/).

A driver is a callable `driver(step, *args, **kwargs) -> (record, cached)`: `cached` says the record came
from the driver's cache, not from running the step. vlmdet/pipeline/run.py calls nothing else, so a new
step is its declaration and the line of the run that calls it.
"""
from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("vlmdet.pipeline")


@dataclass(frozen=True)
class Retry:
    """When a failed attempt is worth another: an error of `when` that is not one of `unless`.

    adjust(arguments, attempt) -> (arguments, note): what attempt 2+ changes (train halves its batch after an
    out-of-memory), and a line saying so for the run's log; arguments are the call's bound arguments by name."""

    attempts: int = 0  # retries after the first attempt
    delays: tuple[float, ...] = (0,)  # seconds before each retry (the last one repeats)
    when: tuple[type[BaseException], ...] = ()
    unless: tuple[type[BaseException], ...] = ()
    adjust: Callable[[dict[str, Any], int], tuple[dict[str, Any], str | None]] | None = None

    def worth_retrying(self, err: BaseException) -> bool:
        return isinstance(err, self.when) and not isinstance(err, self.unless)


@dataclass(frozen=True)
class Show:
    """An artifact the Prefect UI draws on the step's task run: markdown, a table (rows of dicts) or a link."""

    key: str
    kind: str  # "markdown" | "table" | "link"
    body: Any
    description: str | None = None


@dataclass(frozen=True)
class Step:
    """One step of the run, declared once.

    call(*args, **kwargs) -> record: the work (in this process, or starting its child). A child step's
    call takes `env` (extra environment of the child) and, with `progress`, `on_progress(fraction, text)`.
    key / done: the cache key of the call's arguments and whether the run folder still holds what that key
    produced (a cache is trusted only then: it keeps the record, not the files); None: never cached.
    child: the function the child process runs on the request's dict (vlmdet.pipeline.child), or None.
    child_dir: where the child's request, result and timeline go, from the call's arguments.
    says / shows: the line logged and the artifacts shown for a finished call (record, arguments by name).
    """

    name: str
    call: Callable[..., Any]
    key: Callable[..., str] | None = None
    done: Callable[..., bool] | None = None
    cache_days: int = 90
    child: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    child_dir: Callable[..., Path] | None = None
    retry: Retry = field(default_factory=Retry)
    progress: Callable[[dict[str, Any]], tuple[str, str]] | None = None  # (artifact key, title) of a running call
    says: Callable[[Any, dict[str, Any]], str | None] | None = None
    shows: Callable[[Any, dict[str, Any]], list[Show]] | None = None
    run_name: str | None = None  # the task run's name, formatted with the arguments ("evaluate-{name}")

    def arguments(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The call's arguments by name, defaults applied: what key, done, says and shows are given."""
        bound = inspect.signature(self.call).bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def cache_key(self, arguments: dict[str, Any]) -> str | None:
        return _call_with(self.key, arguments) if self.key else None

    def is_done(self, arguments: dict[str, Any]) -> bool:
        return bool(self.done and _call_with(self.done, arguments))

    def step_dir(self, arguments: dict[str, Any]) -> Path | None:
        return _call_with(self.child_dir, arguments) if self.child_dir else None


def _call_with(fn: Callable[..., Any], arguments: dict[str, Any]) -> Any:
    """fn called with the arguments its signature names (a key needs fewer than the call takes)."""
    names = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in arguments.items() if k in names})


class Plain:
    """The steps as direct calls, without an orchestrator (no caching, retries or artifacts): `vlmdet train`,
    `vlmdet evaluate` and benchmarks/nightly_run.py. env(step_dir): extra environment of a step's child;
    read_secret(name): a secret store for publish.token_secret (None: the environment only)."""

    run_id: str | None = None  # the publication's run id: a Prefect driver names its flow run
    read_secret: Callable[[str], str | None] | None = None

    def env(self, step_dir: Path | None) -> dict[str, str]:
        return {}

    def __call__(self, step: Step, *args: Any, **kwargs: Any) -> tuple[Any, bool]:
        bound = step.arguments(*args, **kwargs)
        if step.child:
            kwargs.setdefault("env", self.env(step.step_dir(bound)))
        record = step.call(*args, **kwargs)
        line = step.says(record, bound) if step.says else None
        if line:
            log.info("%s: %s", step.name, line)
        return record, False


def resolve_token(config: Any, read_secret: Callable[[str], str | None] | None) -> str | None:
    """The Hub token, one policy for every driver: the secret named publish.token_secret where the driver has
    a secret store (Prefect's Secret blocks), else HF_TOKEN, else None. Never logged."""
    name = config.publish.token_secret
    if name and read_secret is not None:
        value = read_secret(name)
        if value:
            return str(value)
    elif name and not os.environ.get("HF_TOKEN"):
        log.info("publish.token_secret=%r names a Prefect Secret block, read only when the run goes through Prefect "
                 "(vlmdet retrain); this run has no HF_TOKEN either, so it publishes without a token", name)
    return os.environ.get("HF_TOKEN") or None
