"""The two errors the data stage raises for bad input.

DataError: the dataset as a whole cannot be used (a missing path, a bad spec, nothing usable left);
the message names the value and the fix. ImageError: one image cannot be used; `reason` is the
machine-readable quarantine reason that prepare() records, `detail` says what Pillow reported.
"""
from __future__ import annotations


class DataError(ValueError):
    """A user-facing data problem, raised before any model is loaded."""


class ImageError(Exception):
    """One unusable image. reason is one of: unreadable, truncated, empty-file, too-large."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
