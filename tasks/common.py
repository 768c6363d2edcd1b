"""A Prefect task made from each step's declaration (vlmdet.pipeline.steps), and the artifacts it shows.

`task_of(step)` is the one place that turns a declaration into a task: its retries and the one retry
predicate (Retry.worth_retrying), its cache key and how long it keeps, its task-run name, the progress
artifact of a running child, the log line and the artifacts of a finished call, and the events an
Automation can act on (tasks/events.py). The tasks/ modules hold the tasks of the shipped steps.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from tasks.progress import progress_artifact
from vlmdet.pipeline.step import Show, Step

_TASKS: dict[str, Task] = {}


def task_of(step: Step) -> Task:
    """The Prefect task of `step` (one per step name: the flow and the tasks/ module share it)."""
    if step.name in _TASKS:
        return _TASKS[step.name]

    def run(*args: Any, **kwargs: Any) -> Any:
        from prefect.runtime import task_run

        from tasks import events

        arguments = step.arguments(*args, **kwargs)
        if step.retry.adjust and task_run.run_count > 1:
            arguments, note = step.retry.adjust(arguments, task_run.run_count)
            if note:
                get_run_logger().warning(note)
        if step.progress:
            arguments["on_progress"] = progress_artifact(*step.progress(arguments))
        record = step.call(**arguments)
        line = step.says(record, arguments) if step.says else None
        if line:
            get_run_logger().info(line)
        for item in step.shows(record, arguments) if step.shows else []:
            show(item)
        events.after(step.name, record, arguments)
        return record

    run.__name__ = run.__qualname__ = step.name.replace("-", "_")
    run.__doc__ = step.call.__doc__
    run.__signature__ = _signature(step)  # what Prefect binds and shows: the call's own parameters
    retry = step.retry
    options: dict[str, Any] = dict(name=step.name, retries=retry.attempts)
    if retry.attempts:
        options.update(retry_delay_seconds=[retry.delays[min(i, len(retry.delays) - 1)] for i in range(retry.attempts)],
                       retry_condition_fn=_retry_condition(step))
    if step.key:
        options.update(cache_key_fn=lambda context, parameters: step.cache_key(step.arguments(**parameters)),
                       persist_result=True, cache_expiration=timedelta(days=step.cache_days))
    else:  # the champion changes outside the run, and a token must never feed a key
        options.update(cache_policy=NONE)
    if step.run_name:
        options["task_run_name"] = step.run_name
    _TASKS[step.name] = task(**options)(run)
    return _TASKS[step.name]


def _signature(step: Step):
    import inspect

    sig = inspect.signature(step.call)
    # the child's environment and the progress callback are the driver's, never a task parameter
    return sig.replace(parameters=[p for name, p in sig.parameters.items() if name not in ("env", "on_progress")])


def _retry_condition(step: Step):
    def worth_retrying(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
        try:
            state.result()
        except BaseException as err:  # noqa: BLE001 - the declaration says which errors heal by waiting
            return step.retry.worth_retrying(err)
        return False

    return worth_retrying


def show(item: Show) -> None:
    """One artifact on the current task or flow run."""
    if item.kind == "table":
        create_table_artifact(item.body, key=item.key, description=item.description)
    elif item.kind == "link":
        create_link_artifact(item.body["url"], link_text=item.body["text"], key=item.key, description=item.description)
    else:
        create_markdown_artifact(item.body, key=item.key, description=item.description)


def read_secret(name: str) -> str | None:
    """A Prefect Secret block's value; None where there is no block of that name."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name, _sync=True).get()
    except ValueError:  # "Unable to find block document named ...": the environment is used instead
        return None
    return str(value) if value else None
