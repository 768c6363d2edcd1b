"""Prefect's console output for the `vlmdet` commands that run a flow or read the Prefect API.

A user error (a bad dataset, model or token) is printed once by the CLI as one line with its exit
code; Prefect's own task/flow failure lines and tracebacks about it are dropped from the console
only (the API handler is not filtered, so the Prefect UI keeps the full log). Offline runs start
Prefect's temporary server without telemetry noise.
"""
from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from typing import Callable, Iterator

# Class names of the user errors, to recognise Prefect's log lines about them (the exception object
# itself is not on every such record: "Finished in state Failed('... DataError: ...')").
USER_ERROR_NAMES = ("ConfigError", "DataError", "ModelError", "PermanentPublishError", "TransientPublishError")


def quiet_offline() -> None:
    """Offline runs without noise. No telemetry from Prefect: the temporary server a run starts
    (it inherits this environment) would post a heartbeat each start, log "Failed to send
    telemetry" offline, and its first SQLite write races the flow's ("database is locked", a
    ~100-line traceback). The user's own setting wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the server's heartbeat service
    os.environ.setdefault("DO_NOT_TRACK", "1")  # the client's SDK analytics (prefect._internal.analytics)
    # The first start in a fresh PREFECT_HOME migrates a new database: past Prefect's 20 s default on
    # a busy 2-core machine, which then fails the run with "Timed out ... ephemeral Prefect API server".
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


class DropUserErrorLogs(logging.Filter):
    """Console only: Prefect's task/flow failure lines and their tracebacks for a user error."""

    _names = re.compile(r"\b(" + "|".join(USER_ERROR_NAMES) + r")\b")

    def __init__(self, is_user_error: Callable[[BaseException], bool]):
        super().__init__()
        self.is_user_error = is_user_error

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        if record.exc_info and record.exc_info[1] is not None and self.is_user_error(record.exc_info[1]):
            return False
        return not self._names.search(record.getMessage())


@contextmanager
def prefect_console(verbose: bool, is_user_error: Callable[[BaseException], bool]) -> Iterator[None]:
    """Prefect imported quietly, its console handlers filtered for the block (all of it with -v)."""
    quiet_offline()
    import prefect  # noqa: F401 - installs its console handler on the root logger: filter it after

    added = []
    if not verbose:
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, DropUserErrorLogs) for f in handler.filters):
                handler.addFilter(drop := DropUserErrorLogs(is_user_error))
                added.append((handler, drop))
    try:
        yield
    finally:  # main() may run again in the same process (tests): leave logging as it was
        for handler, drop in added:
            handler.removeFilter(drop)
