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


class TargetChangedError(PermanentPublishError):
    """The target no longer holds the revision the gate measured (compare-and-swap refused).

    Permanent on purpose: retrying would publish over a model nobody compared against. The next
    run reads the new champion and decides again.
    """

    def __init__(self, target: str, was: str | None, now: str | None):
        self.target, self.was, self.now = target, was, now
        super().__init__(f"the target changed since the gate decided (was {was or 'empty'}, now {now or 'empty'}); "
                         f"not publishing to {target}. Another run or a person published there in between; run again "
                         "to compare against the model now there.")
