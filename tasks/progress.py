"""A step's progress as a Prefect progress artifact, fed by the child's progress lines (vlmdet.run.runner)."""
from __future__ import annotations

from typing import Callable

from prefect.artifacts import create_progress_artifact, update_progress_artifact


def progress_artifact(key: str, title: str) -> Callable[[float, str], None]:
    """Create the artifact `key` at 0 on the current task run; returns on_progress(fraction, text).

    Each call sets the value (percent) and the description ("training: step 3/20, loss 1.2345") that
    the run page shows; vlmdet.run.runner calls it for every line the child writes and with 1.0 once the
    step succeeded."""
    artifact_id = create_progress_artifact(0.0, key=key, description=f"{title}: starting")

    def on_progress(fraction: float, text: str) -> None:
        update_progress_artifact(artifact_id, round(100.0 * fraction, 1), description=f"{title}: {text}")

    return on_progress
