"""Publishing to a Hugging Face Hub repo (the `hub:ORG/NAME` target) and reading its champion.

One publication is one commit: the Hub applies a commit atomically, so a reader sees the previous
model or the new one. The commit title carries the run id; before every attempt we look for a commit
with that id, so a retry after a lost response (the commit landed, the reply did not) never commits
twice. `parent_commit` pins the head we checked, so a concurrent writer makes the commit fail (and be
re-checked) instead of interleaving. Transient errors (429, 5xx, dropped connections) are retried here
with backoff; permanent ones (401, 403, invalid repo id, offline mode) fail at once with a message
that says what to fix. The token is handed to HfApi only and scrubbed from any message we raise.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id

from vlmdet.gate import Champion
from vlmdet.publishing import card as cardlib
from vlmdet.publishing.errors import PermanentPublishError, TransientPublishError, scrub
from vlmdet.publishing.files import Source
from vlmdet.records import Publication

log = logging.getLogger(__name__)
T = TypeVar("T")

# huggingface_hub 1.x speaks through httpx, 2.x through its fork httpx2: a dropped connection is either's
# TransportError (ConnectError, ReadError, RemoteProtocolError, timeouts).
_TRANSPORT_ERRORS = tuple(m.TransportError for m in (importlib.util.find_spec(n) and importlib.import_module(n)
                                                     for n in ("httpx", "httpx2")) if m)
TRANSIENT_STATUS = {408, 409, 412, 429, 500, 502, 503, 504}  # 409/412: head moved under parent_commit
RUN_MARKER = "[vlmdet-run {run_id}]"


@dataclass
class RetryPolicy:
    attempts: int = 5
    base_s: float = 1.0  # 1, 2, 4, 8 s (+ jitter): rides out a rate limit window without hammering
    max_s: float = 30.0


def check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PermanentPublishError(f"publish.target=hub:{repo_id} is not a valid Hub repo id ({err}); "
                                    "use hub:ORG/NAME with letters, digits, '-', '_' and '.'.") from None
    if "/" not in repo_id:
        raise PermanentPublishError(f"publish.target=hub:{repo_id} has no namespace; use hub:ORG/NAME so the "
                                    "model lands in a known account or organisation.")


def classify(err: BaseException, repo_id: str, token: str | None) -> Exception:
    """Map a client error to Transient/PermanentPublishError with a message that names the fix."""
    if isinstance(err, (PermanentPublishError, TransientPublishError)):
        return err
    # The client wraps some failures (an LFS upload: RuntimeError("Error while uploading ...") from the HTTP
    # error); classify by the first HTTP or connection error in the chain.
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, (HfHubHTTPError, *_TRANSPORT_ERRORS, ConnectionError,
                                                       TimeoutError, HFValidationError)):
        cause = cause.__cause__ or cause.__context__
    err = cause or err
    if isinstance(err, OfflineModeIsEnabled):
        return PermanentPublishError("cannot reach the Hub: HF_HUB_OFFLINE=1 is set; unset it to publish to "
                                     f"hub:{repo_id}, or use a local:DIR target.")
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        detail = scrub(str(err).splitlines()[0] if str(err) else "", token)
        if status in TRANSIENT_STATUS:
            return TransientPublishError(f"Hub returned HTTP {status} for hub:{repo_id} (transient): {detail}")
        if status == 401:
            return PermanentPublishError(
                f"Hub refused hub:{repo_id} with HTTP 401 (unauthorized): the token is missing, expired or invalid. "
                "Store a write token in the Prefect Secret block named by publish.token_secret, or set HF_TOKEN.")
        if status == 403:
            return PermanentPublishError(
                f"Hub refused hub:{repo_id} with HTTP 403 (forbidden): the token cannot write to this repo or "
                "namespace. Use a token with write access to it, or change publish.target.")
        return PermanentPublishError(f"Hub refused hub:{repo_id} with HTTP {status}: {detail}")
    if isinstance(err, (*_TRANSPORT_ERRORS, ConnectionError, TimeoutError)):
        return TransientPublishError(f"connection to the Hub dropped while publishing hub:{repo_id}: "
                                     f"{type(err).__name__}: {scrub(str(err), token)}")
    return err if isinstance(err, Exception) else RuntimeError(str(err))


def with_retries(fn: Callable[[], T], what: str, repo_id: str, token: str | None, policy: RetryPolicy,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as raw:  # noqa: BLE001 - every error is classified below
            err = classify(raw, repo_id, token)
            if not isinstance(err, TransientPublishError) or attempt == policy.attempts:
                if err is raw:
                    raise
                raise err from None  # `from None`: the client's chained error may echo request details
            wait = min(policy.max_s, policy.base_s * 2 ** (attempt - 1)) * (1 + 0.25 * random.random())
            log.warning("%s failed (attempt %d/%d): %s; retrying in %.1fs", what, attempt, policy.attempts, err, wait)
            sleep(wait)
    raise AssertionError("unreachable")


def _find_run_commit(api: HfApi, repo_id: str, run_id: str) -> tuple[str | None, str | None]:
    """(oid of this run's commit if it already landed, current head oid); (None, None) for an empty repo."""
    marker = RUN_MARKER.format(run_id=run_id)
    try:
        commits = api.list_repo_commits(repo_id)
    except RevisionNotFoundError:
        return None, None
    for c in commits:
        if marker in (c.title or "") or marker in (c.message or ""):
            return c.commit_id, commits[0].commit_id
    return None, commits[0].commit_id if commits else None


def commit_message(meta: dict[str, Any], run_id: str) -> tuple[str, str]:
    m = meta["metrics"]
    gate = meta["gate"]
    title = (f"Publish {meta['model_name']}: mAP {m['map']:.4f}, mAP50 {m['map50']:.4f} on "
             f"{meta['eval']['split']} {RUN_MARKER.format(run_id=run_id)}")
    body = (f"Why: {gate['reason']}\n\nData fingerprint: {meta['eval']['data_fingerprint']}\n"
            f"Dataset: {meta['dataset']['source']}\nBase model: {meta['base_model']}\nRun: {run_id}\n"
            f"Metrics: mAP {m['map']:.4f}, mAP50 {m['map50']:.4f}, mAP75 {m['map75']:.4f}\n")
    return title, body


def publish_repo(repo_id: str, files: dict[str, Source], meta: dict[str, Any], run_id: str, *, endpoint: str | None,
                 token: str | None, private: bool, policy: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> Publication:
    check_repo_id(repo_id)
    policy = policy or RetryPolicy()
    api = HfApi(endpoint=endpoint or None, token=token)
    retry = lambda fn, what: with_retries(fn, what, repo_id, token, policy, sleep)  # noqa: E731
    retry(lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"), "create_repo")
    title, body = commit_message(meta, run_id)
    tag = f"run-{run_id}"
    state = {"reused": False}

    def attempt() -> str:
        landed, head = _find_run_commit(api, repo_id, run_id)
        if landed:
            state["reused"] = True
            log.info("commit for run %s already on hub:%s (%s): not committing again", run_id, repo_id, landed)
            return landed
        # Fresh operations on every attempt: a failed one may hold half-read file handles / upload state.
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=src if isinstance(src, bytes) else str(src))
               for rel, src in files.items()]
        info = api.create_commit(repo_id, ops, commit_message=title, commit_description=body, parent_commit=head)
        return info.oid

    oid = retry(attempt, "commit")

    def tag_it() -> None:
        refs = api.list_repo_refs(repo_id)
        if any(t.name == tag for t in refs.tags):
            return  # a previous attempt tagged it before its reply was lost
        api.create_tag(repo_id, tag=tag, revision=oid, tag_message=title, exist_ok=True)

    retry(tag_it, "create_tag")
    base = (endpoint or api.endpoint).rstrip("/")
    return Publication(target=repo_id, kind="hub", revision=oid, url=f"{base}/{repo_id}/tree/{tag}",
                       files=sorted(files), tag=tag, run_id=run_id, reused=state["reused"])


def read_champion_repo(repo_id: str, *, endpoint: str | None, token: str | None,
                       policy: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep) -> Champion | None:
    """The champion's metrics from the repo's card (and vlmdet.json), or None for a missing/empty repo."""
    check_repo_id(repo_id)
    api = HfApi(endpoint=endpoint or None, token=token)

    def fetch(name: str, cache: str) -> str | None:
        try:
            return Path(api.hf_hub_download(repo_id, name, cache_dir=cache)).read_text()
        except (EntryNotFoundError, RevisionNotFoundError):
            return None

    def read() -> Champion | None:
        with tempfile.TemporaryDirectory(prefix="vlmdet-champion-") as cache:
            try:
                sha = api.model_info(repo_id).sha
                card_text = fetch(cardlib.CARD_FILE, cache)
                meta_text = fetch(cardlib.META_FILE, cache)
            except RepositoryNotFoundError as err:
                # The Hub answers 401 "repository not found" for a private repo without access too, so a
                # wrong token reads as "no champion" here; the upload then fails with a clear 401/403.
                if err.response is not None and err.response.status_code == 403:
                    raise
                return None
            except RevisionNotFoundError:
                return None
        meta = None
        if meta_text:
            try:
                meta = json.loads(meta_text)
            except json.JSONDecodeError:
                meta = None
        champion = cardlib.champion_from_card(card_text, meta, f"hub:{repo_id}@{(sha or '')[:12]}")
        if champion is not None:
            champion.revision = sha or ""  # the gate downloads the model at exactly this commit
        return champion

    return with_retries(read, "read champion", repo_id, token, policy or RetryPolicy(), sleep)
