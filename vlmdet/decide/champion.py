"""Getting the champion (the model now at the target) ready to be measured on today's test split.

The gate compares both models on the same images. A published model carries its own test
predictions (`eval/predictions.json`); when its card says they were measured on today's split of
the same prepared data they are reused as they are. Otherwise the model itself is fetched (the
local target folder, or the Hub repo at the exact commit its card was read from) and evaluated
again, with its own answer settings (family, pixel budget, prompt, category, answer length) from its
`vlmdet.json`, every one of them, since that is how it answers in production. A champion lacking
one is never evaluated with today's (after a family or prompt change it would score ~0 and be
replaced): it is unreadable, and `needs_measuring` says so before anything is fetched.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from vlmdet.modeling.carried import ANSWER_SETTINGS, answer_settings, held_answer_settings
from vlmdet.config.settings import RunConfig
from vlmdet.publishing.card import PREDICTIONS
from vlmdet.run.records import Champion, EvalReport

if TYPE_CHECKING:  # the Hub client is imported only where a Hub champion is fetched
    from vlmdet.publishing.hub import RetryPolicy

def needs_measuring(champion: Champion | None) -> bool:
    """Whether there is a champion to measure: none at an empty target, none that cannot be read
    (the gate closes on it, or replaces it by the threshold alone when asked to)."""
    return champion is not None and not champion.unreadable


def champion_config(champion: Champion, config: RunConfig) -> RunConfig:
    """Today's configuration with every one of the champion's own answer settings (vlmdet.modeling.carried:
    family, pixel budget, prompt, category, answer length, ...), to evaluate it. A champion lacking one
    is not judged by today's (after a family, prompt or category change it would score ~0 and be
    replaced); reading it already marked it unreadable (publishing.card), so this only guards the call."""
    missing = [key for key in ANSWER_SETTINGS if key not in held_answer_settings(champion.config)]
    if missing:
        raise ValueError(f"the champion at {champion.source} has no model settings {', '.join(missing)} in its "
                         "vlmdet.json (or no vlmdet.json); evaluating it with today's would judge it by an answer it "
                         "was not trained to give. Set gate.replace_unreadable_champion=true to replace it on purpose.")
    return answer_settings(champion.config, config)


def _download(champion: Champion, filename: str | None, out: Path, endpoint: str, token: str | None,
              policy: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep) -> str | None:
    """The champion's whole repo (filename None) or one file, at its revision.

    None only when the Hub says the file does not exist at that revision (a 404 entry-not-found). A
    server error, a refused token, a timeout or a dropped connection is retried (vlmdet.publishing.hub)
    and then raised: a champion that could not be fetched is never taken for one without the file.
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    from vlmdet.publishing.errors import PermanentPublishError, PublishError, TransientPublishError
    from vlmdet.publishing.hub import RetryPolicy, missing_file, read_failure, with_retries

    if not champion.revision:  # "main" could be another model than the card the gate read
        raise ValueError(f"champion {champion.source!r} has no revision; it is fetched only at the commit its card "
                         "was read at")
    repo, revision = champion.location, champion.revision
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


def published_predictions(champion: Champion, workdir: str | Path, endpoint: str = "", token: str | None = None,
                          policy: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep) -> str | None:
    """The champion's published test predictions (path), or None when it published none (the Hub answered
    404 for the file at the champion's commit); any other failure to fetch them raises."""
    if champion.kind == "local":
        path = Path(champion.location) / PREDICTIONS
        return str(path) if path.is_file() else None
    return _download(champion, PREDICTIONS, Path(workdir) / "champion" / champion.revision[:12], endpoint, token,
                     policy, sleep)


def champion_model(champion: Champion, workdir: str | Path, endpoint: str = "", token: str | None = None,
                   policy: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep) -> str:
    """A local folder holding the champion's model: the target folder itself, or a Hub download."""
    if champion.kind == "local":
        return champion.location
    if champion.kind != "hub":
        raise ValueError(f"champion {champion.source!r} has no known location (kind={champion.kind!r})")
    return _download(champion, None, Path(workdir) / "champion" / champion.revision[:12], endpoint, token,
                     policy, sleep)


REUSED = "published predictions of "  # EvalReport.model of a champion that was not evaluated again


def reuse_report(champion: Champion, report: EvalReport, predictions: str) -> EvalReport:
    """An EvalReport for the champion from its card's numbers and its published predictions."""
    m = champion.metrics
    return EvalReport(map=m.get("map", float("nan")), map50=m.get("map50", float("nan")),
                      map75=m.get("map75", float("nan")), split=champion.split, num_images=report.num_images,
                      parse_failures=0, predictions=predictions, model=REUSED + champion.source,
                      data_fingerprint=champion.data_fingerprint)


def was_evaluated(champion_report: EvalReport) -> bool:
    """True when the champion's report comes from an evaluation in this run, not from its publication."""
    return not champion_report.model.startswith(REUSED)
