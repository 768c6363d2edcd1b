"""Publishing errors, split by what the caller should do: retry (transient) or fix something (permanent)."""
from __future__ import annotations


class PublishError(RuntimeError):
    """Publishing failed; the message names the target and the fix, never the token."""


class PermanentPublishError(PublishError):
    """Retrying cannot help (401, 403, invalid repo id, offline): fail at once."""


class TransientPublishError(PublishError):
    """Rate limit, server error or dropped connection: worth retrying with backoff."""


def scrub(text: str, token: str | None) -> str:
    """Remove the token from a message; a defence in depth, our messages never format it in."""
    if token and token in text:
        text = text.replace(token, "***")
    return text
