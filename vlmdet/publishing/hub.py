"""Publishing to a Hugging Face Hub repo (the `hub:ORG/NAME` target, HubTarget) and reading its champion.

One publication is one commit: the Hub applies a commit atomically, so a reader sees the previous
model or the new one. The commit replaces the model whole: it adds the new files and deletes every
file of the previous model the new one lacks (only `files.KEEP`, a user's `.gitattributes`, stays).

The commit is a compare-and-swap on the revision the gate measured: its `parent_commit` is that
commit (or, for a target the gate saw empty, the head checked to still be empty). If the repo moved
in between, or the Hub refuses the parent (409/412), the publish stops with a TargetChangedError and
is not retried onto the new head: nobody compared the new model with what is there now.

The commit title carries the run id. Each attempt reads the head first: the head the gate read (or
an empty repo) is committed over; a head that is itself this run's commit is an earlier attempt that
landed while its reply was lost, and is not committed twice (only the head is asked: the same content
published long ago and replaced since is published again); any other head is a TargetChangedError.
Transient errors (429, 5xx, dropped connections, timeouts) are retried here with backoff; permanent
ones (401, 403, invalid repo id, offline mode) fail at once with a message that says what to fix. The
token is handed to HfApi only and scrubbed from any message we raise.

Reading the champion fails closed, and every fault is classified where it happens:
- "no champion": only a repo that does not exist (404 from model_info) or holds nothing but keepers;
- "missing file" (a content fault: the target answered, gate.replace_unreadable_champion may replace
  it): only the server's 404 entry-not-found for that file at that commit, which huggingface_hub
  raises as RemoteEntryNotFoundError (`missing_file`). Its sibling LocalEntryNotFoundError is what
  the client raises when the HEAD of a file failed for any other reason (5xx, 403, refused
  connection, timeout) and no local copy exists: a transport fault, never "missing";
- a transport fault (nothing was learned about the model): 5xx, 429, a timeout, a dropped
  connection (retried, then "run again when it answers"), 401 (private repo without access, or a
  missing repo with a bad token: the Hub does not say which) and 403 ("fix the token"). It gives a
  Champion marked unreadable with fault TRANSPORT, which no setting replaces.
Card, vlmdet.json, predictions and weights are all read at the one commit sha model_info named;
fetching the predictions or the weights to measure the champion (`download`) follows the same
rule, and a transport fault there fails the step instead of passing for a champion without them.
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

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, OfflineModeIsEnabled, RemoteEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id

from vlmdet.publishing import card as cardlib
from vlmdet.publishing.errors import (PermanentPublishError, PublishError, TargetChangedError,
                                      TransientPublishError, scrub)
from vlmdet.publishing import digests
from vlmdet.publishing.files import KEEP, Source
from vlmdet.publishing.target import Outgoing, Target
from vlmdet.run.records import TRANSPORT, Champion, Publication

log = logging.getLogger(__name__)
T = TypeVar("T")

# huggingface_hub 1.x speaks through httpx, 2.x through its fork httpx2: a dropped connection is either's
# TransportError (ConnectError, ReadError, RemoteProtocolError, timeouts).
_TRANSPORT_ERRORS = tuple(m.TransportError for m in (importlib.util.find_spec(n) and importlib.import_module(n)
                                                     for n in ("httpx", "httpx2")) if m)
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
# A refused parent_commit: the head moved. Never transient: retrying would commit onto a head the gate never saw.
CONFLICT_STATUS = {409, 412}
RUN_MARKER = "[vlmdet-run {run_id}]"


@dataclass
class RetryPolicy:
    attempts: int = 5
    base_s: float = 1.0  # 1, 2, 4, 8 s (+ jitter): rides out a rate limit window without hammering
    max_s: float = 30.0
    # A model_info call that has not answered in this long is a timeout (retried), not a hang: the client's
    # own default for API calls is no timeout at all.
    timeout_s: float = 30.0


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


def missing_file(err: BaseException) -> bool:
    """True only for the server's answer "this file does not exist at this revision" (404 entry-not-found).

    huggingface_hub's EntryNotFoundError also covers LocalEntryNotFoundError, which hf_hub_download
    raises when the file's HEAD failed (5xx, 403, refused connection, timeout) and no cached copy
    exists: that says nothing about the file and is classified like any other transport error."""
    return (isinstance(err, RemoteEntryNotFoundError) and err.response is not None
            and err.response.status_code == 404)


def _head(api: HfApi, repo_id: str, timeout_s: float) -> tuple[str | None, list[str]]:
    """The head commit of main and the files it holds; (None, []) for a repo without a commit."""
    try:
        sha = api.model_info(repo_id, timeout=timeout_s).sha or None
    except RevisionNotFoundError:
        return None, []
    return sha, (api.list_repo_files(repo_id, revision=sha) if sha else [])


def _is_run_commit(api: HfApi, repo_id: str, head: str, run_id: str) -> bool:
    """Whether the head commit itself carries this run's marker (an earlier attempt's commit, reply lost)."""
    marker = RUN_MARKER.format(run_id=run_id)
    top = next(iter(api.list_repo_commits(repo_id, revision=head)), None)
    return top is not None and top.commit_id == head and (marker in (top.title or "") or marker in (top.message or ""))


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
                 token: str | None, private: bool, expected: str | None = None, policy: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 check: Callable[[dict[str, str]], None] | None = None) -> Publication:
    """Commit `files` as the whole model if the repo still holds revision `expected` (None: empty).

    check(digests): called right before each commit with the sha256 of every file the commit carries (path
    in repo -> hex, the oid its LFS pointer will name); raising stops the publication (files.check_pinned)."""
    check_repo_id(repo_id)
    policy = policy or RetryPolicy()
    api = HfApi(endpoint=endpoint or None, token=token)
    retry = lambda fn, what: with_retries(fn, what, repo_id, token, policy, sleep)  # noqa: E731
    retry(lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"), "create_repo")
    title, body = commit_message(meta, run_id)
    tag = f"run-{run_id}"
    state = {"reused": False}

    def attempt() -> str:
        head, present = _head(api, repo_id, policy.timeout_s)
        # The compare of the compare-and-swap: the head is the gate's revision, or the repo is still empty.
        unchanged = head == expected if expected is not None else not set(present) - KEEP
        if not unchanged:
            if head and _is_run_commit(api, repo_id, head, run_id):
                state["reused"] = True
                log.info("commit for run %s already on hub:%s (%s): not committing again", run_id, repo_id, head)
                return head
            raise TargetChangedError(f"hub:{repo_id}", expected, head)
        # Fresh operations on every attempt: a failed one may hold half-read file handles / upload state.
        ops: list = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=src if isinstance(src, bytes) else str(src))
                     for rel, src in files.items()]
        ops += [CommitOperationDelete(path_in_repo=rel, is_folder=False)
                for rel in present if rel not in files and rel not in KEEP]
        if check is not None:  # the sha256 each file's LFS pointer will name, as the client will send it
            # huggingface_hub >= 2 hashes a file when upload_info.sha256 is first read: give it this process's
            # digests instead (read in parallel, once a process while the file's stat is unchanged: digests.py)
            lazy = {op.path_in_repo: op for op in ops if isinstance(op, CommitOperationAdd)
                    and isinstance(op.path_or_fileobj, str) and not getattr(op.upload_info, "is_hashed", True)}
            hashed = digests.file_digests({rel: Path(op.path_or_fileobj) for rel, op in lazy.items()})
            for rel, hexdigest in hashed.items():
                lazy[rel].upload_info.sha256 = bytes.fromhex(hexdigest)
            check({op.path_in_repo: op.upload_info.sha256.hex() for op in ops if isinstance(op, CommitOperationAdd)})
        try:
            info = api.create_commit(repo_id, ops, commit_message=title, commit_description=body, parent_commit=head)
        except HfHubHTTPError as err:
            if err.response is None or err.response.status_code not in CONFLICT_STATUS:
                raise
            try:
                now = api.model_info(repo_id).sha
            except Exception:  # noqa: BLE001 - the message can do without the new head
                now = "a newer commit"
            raise TargetChangedError(f"hub:{repo_id}", expected, now) from None
        return info.oid

    oid = retry(attempt, "commit")

    def tag_it() -> str:
        tags = {t.name: t.target_commit for t in api.list_repo_refs(repo_id).tags}
        # run-ID names this commit, unless the same content was published before as another commit (then
        # replaced, now back): that tag keeps pointing at the old one and this commit gets its own.
        for name in (tag, f"{tag}-{oid[:12]}"):
            if tags.get(name) == oid:
                return name  # a previous attempt tagged it before its reply was lost
            if name not in tags:
                api.create_tag(repo_id, tag=name, revision=oid, tag_message=title, exist_ok=True)
                return name
        return oid  # both names taken by other commits (tagged by hand): the commit itself is the reference

    ref = retry(tag_it, "create_tag")
    base = (endpoint or api.endpoint).rstrip("/")
    return Publication(target=repo_id, kind="hub", revision=oid, url=f"{base}/{repo_id}/tree/{ref}",
                       files=sorted(files), tag=ref, run_id=run_id, reused=state["reused"])


def read_champion_repo(repo_id: str, *, endpoint: str | None, token: str | None,
                       policy: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep) -> Champion | None:
    """The model now in the repo, read at one commit; None only for a missing (404) or empty repo."""
    check_repo_id(repo_id)
    api = HfApi(endpoint=endpoint or None, token=token)
    policy = policy or RetryPolicy()
    where = f"hub:{repo_id}"

    def head() -> tuple[str, list[str]] | None:
        try:
            info = api.model_info(repo_id, timeout=policy.timeout_s)
        except RepositoryNotFoundError as err:
            if err.response is not None and err.response.status_code == 404:
                return None  # the Hub says it does not exist: the one "no champion" of a Hub target
            raise  # 401: private without access or missing with a bad token; the Hub does not say which
        except RevisionNotFoundError:
            return "", []  # a repo without a commit on main
        return info.sha or "", [s.rfilename for s in info.siblings or []]

    try:
        seen = with_retries(head, "read champion", repo_id, token, policy, sleep)
    except Exception as err:  # noqa: BLE001 - whatever it was, the target was not read: fail closed
        return Champion(metrics={}, source=where, kind=HubTarget.kind, location=repo_id,
                        unreadable=read_failure(err, repo_id, token), fault=TRANSPORT)
    if seen is None:
        return None
    sha, files = seen
    if not set(files) - KEEP:
        return None  # exists, holds no model (a fresh repo's .gitattributes at most)
    source = f"{where}@{sha[:12]}"

    def fetch(name: str) -> bytes | None:
        """The file's bytes; None only when the server says it does not exist at `sha` (missing_file)."""
        with tempfile.TemporaryDirectory(prefix="vlmdet-champion-") as cache:
            try:  # at `sha`, never "main": the card, vlmdet.json and the weights are one model
                return Path(api.hf_hub_download(repo_id, name, revision=sha, cache_dir=cache)).read_bytes()
            except Exception as err:  # noqa: BLE001 - everything but the server's 404 is retried, then closes
                if missing_file(err):
                    return None
                raise

    try:
        card_raw = with_retries(lambda: fetch(cardlib.CARD_FILE), "read champion card", repo_id, token, policy, sleep)
        meta_raw = with_retries(lambda: fetch(cardlib.META_FILE), "read champion vlmdet.json", repo_id, token, policy,
                                sleep)
    except Exception as err:  # noqa: BLE001 - the target was not read: nothing is known about its model
        return Champion(metrics={}, source=source, kind=HubTarget.kind, location=repo_id,
                        unreadable=read_failure(err, repo_id, token), fault=TRANSPORT)
    # What the files hold is content from here on: undecodable bytes are judged by the card reader, not retried.
    card_text = card_raw.decode("utf-8", errors="replace") if card_raw is not None else None
    meta = None
    if meta_raw:
        try:
            meta = json.loads(meta_raw)
        except ValueError:  # not JSON, or not UTF-8 text
            meta = None
    champion = cardlib.champion_from_card(card_text, meta if isinstance(meta, dict) else None, source, files=files)
    champion.kind, champion.location = HubTarget.kind, repo_id
    champion.revision = sha  # the gate reads, fetches and publishes over exactly this commit
    return champion


def read_failure(err: BaseException, repo_id: str, token: str | None) -> str:
    """Why the repo could not be read (a transport fault), and what to do; never "no champion" or "missing"."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    cause = err.__cause__ or err.__context__
    status = status or getattr(getattr(cause, "response", None), "status_code", None)
    if status == 401 or (isinstance(err, PublishError) and "HTTP 401" in str(err)):
        return (f"the Hub answered HTTP 401 reading hub:{repo_id}: it is private and the token is missing or "
                "invalid, or it does not exist and the token is invalid (the Hub does not say which). Store a valid "
                "token in the Prefect Secret block named by publish.token_secret, or set HF_TOKEN")
    if status == 403 or (isinstance(err, PublishError) and "HTTP 403" in str(err)):
        return (f"the Hub answered HTTP 403 reading hub:{repo_id}: the token may not read it. Use a token with access "
                "to the repo")
    if isinstance(err, TransientPublishError):
        return (f"reading hub:{repo_id} failed after retries ({type(err).__name__}: {scrub(str(err), token)}); the "
                "Hub or the network is failing. Run again when it answers")
    return (f"reading hub:{repo_id} failed ({type(err).__name__}: {scrub(str(err), token)}); the target could not be "
            "read. Run again when it answers, and check the repo and the endpoint if it repeats")


def download(repo: str, champion: Champion, filename: str | None, out: Path, endpoint: str | None, token: str | None,
             policy: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep) -> str | None:
    """The champion's whole repo (filename None) or one file, at its revision, into `out`.

    None only when the Hub says the file does not exist at that revision (a 404 entry-not-found). A
    server error, a refused token, a timeout or a dropped connection is retried and then raised: a
    champion that could not be fetched is never taken for one without the file.
    """
    if not champion.revision:  # "main" could be another model than the card the gate read
        raise ValueError(f"champion {champion.source!r} has no revision; it is fetched only at the commit its card "
                         "was read at")
    revision = champion.revision
    policy = policy or RetryPolicy()
    api = HfApi(endpoint=endpoint or None, token=token)
    kw: dict[str, Any] = dict(revision=revision, endpoint=endpoint or None, token=token, local_dir=str(out))
    _drop_other_revisions(out)

    def fetch() -> str | None:
        if filename is None:
            listed = [s.rfilename for s in api.model_info(repo, revision=revision, timeout=policy.timeout_s).siblings
                      or []]
            folder = snapshot_download(repo, **kw)
            absent = [name for name in listed if not (Path(folder) / name).is_file()]
            if absent:
                # snapshot_download returns a non-empty local_dir as it is when it cannot list the repo (and only
                # logs why): list it again to raise that error, classified; else the files did not come.
                list(api.list_repo_tree(repo, recursive=True, revision=revision))
                raise TransientPublishError(f"{len(absent)} of the {len(listed)} files of hub:{repo} at "
                                            f"{revision[:12]} did not download ({', '.join(absent[:3])})")
            return folder
        try:
            return hf_hub_download(repo, filename, **kw)
        except Exception as err:  # noqa: BLE001 - only the server's "no such file" is an answer; the rest is retried
            if missing_file(err):
                return None
            raise

    what = f"the champion's {filename or 'model'}"
    try:
        return with_retries(fetch, f"download {what}", repo, token, policy, sleep)
    except PublishError as err:  # the same kind (a transient one is worth the task's retry), said as a read
        kind = TransientPublishError if isinstance(err, TransientPublishError) else PermanentPublishError
        raise kind(f"could not download {what} from hub:{repo} at {revision[:12]}: "
                   f"{read_failure(err, repo, token)}") from None


def _drop_other_revisions(out: Path) -> None:
    """Delete the downloads of other champion revisions beside `out` (WORKDIR/champion/<revision>): the gate
    only ever compares with the model at the target now, and a 7B download is ~15 GB, one more each time
    a run publishes."""
    import shutil

    if out.parent.is_dir():
        for old in out.parent.iterdir():
            if old.is_dir() and old.name != out.name:
                shutil.rmtree(old, ignore_errors=True)


class HubTarget(Target):
    """`hub:ORG/NAME`: a model repo on publish.endpoint, one commit a publication."""

    kind = "hub"
    form = "hub:ORG/NAME (a Hub model repo)"

    def location(self, workdir: str | Path = ".") -> str:
        return self.rest

    def load_name(self) -> str:
        return self.rest

    def read_champion(self, workdir, token=None, *, sleep=time.sleep, retry_policy=None) -> Champion | None:
        return read_champion_repo(self.rest, endpoint=self.settings.endpoint, token=token, policy=retry_policy,
                                  sleep=sleep)

    def fetch(self, champion, workdir, token=None, predictions_only=False, *, sleep=time.sleep,
              retry_policy=None) -> str | None:
        out = Path(workdir) / "champion" / champion.revision[:12]
        return download(self.rest, champion, cardlib.PREDICTIONS if predictions_only else None, out,
                        self.settings.endpoint, token, retry_policy, sleep)

    def publish(self, out: Outgoing, workdir, token=None, *, sleep=time.sleep, retry_policy=None) -> Publication:
        # the bytes are checked by the sha256 each file of the commit carries, hashed from what is uploaded
        names = out.pinned
        return publish_repo(self.rest, out.files, out.meta, out.run_id, endpoint=self.settings.endpoint, token=token,
                            private=self.settings.private, expected=out.expected, policy=retry_policy, sleep=sleep,
                            check=lambda sent: out.check({n: sent[n] for n in names if n in sent}))
