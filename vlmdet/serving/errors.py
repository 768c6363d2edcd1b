"""The one error a request can end in before the model: an HTTP status, a short reason, and why."""
from __future__ import annotations


class RequestError(Exception):
    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.status, self.reason, self.detail = status, reason, detail
