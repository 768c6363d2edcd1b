"""Prefect task: publish the merged model (local folder or Hub repo), and the token resolution.

The token comes from a Prefect Secret block (name: publish.token_secret), else HF_TOKEN, else None.
It is passed as a plain argument to the library and never logged, put into an artifact or a message.
Transient Hub errors are retried inside the library (with a check that this run's commit has not
already landed, so a retry cannot commit twice); the task adds one slower retry for longer outages.
"""
from __future__ import annotations

import os

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from vlmdet import publishing
from vlmdet.config.settings import RunConfig
from vlmdet.run.records import AdapterRef, DatasetRef, EvalReport, GateDecision, MergedRef, Publication
from tasks import events
from tasks.gate import retry_transient_only


def resolve_token(config: RunConfig) -> str | None:
    """The Hub token: Secret block `config.publish.token_secret`, else env HF_TOKEN, else None."""
    name = config.publish.token_secret
    if name:
        from prefect.blocks.system import Secret

        try:
            value = Secret.load(name, _sync=True).get()
        except ValueError:  # "Unable to find block document named ...": fall back to the environment
            value = None
        if value:
            return str(value)
    return os.environ.get("HF_TOKEN") or None


def _run_id() -> str | None:
    """The flow run's id: stable across task and flow retries, distinct between runs."""
    from prefect.runtime import flow_run

    fid = flow_run.id
    return str(fid).replace("-", "")[:12] if fid else None


# cache_policy=NONE: a cached publish would skip the upload, and the token must not feed a cache key.
@task(name="publish", retries=1, retry_delay_seconds=60, retry_condition_fn=retry_transient_only, cache_policy=NONE)
def publish(merged: MergedRef, report: EvalReport, dataset: DatasetRef, adapter: AdapterRef, decision: GateDecision,
            config: RunConfig, workdir: str, token: str | None = None) -> Publication:
    logger = get_run_logger()
    pub = publishing.publish(merged, report, dataset, adapter, decision, config, workdir, token, run_id=_run_id())
    logger.info("published %s to %s %s (revision %s%s)", config.name, pub.kind, pub.target, pub.revision,
                ", commit found from an earlier attempt" if pub.reused else "")
    events.published(pub, report, config, workdir)
    m = report.metrics()
    create_markdown_artifact(
        key="publication",
        description=f"Where run {pub.run_id} was published",
        markdown=(f"### Published to {pub.kind}: `{pub.target}`\n\n"
                  f"- revision: `{pub.revision}`\n- tag: `{pub.tag}`\n- url: {pub.url}\n"
                  f"- mAP {m['map']:.4f}, mAP50 {m['map50']:.4f}, mAP75 {m['map75']:.4f} on `{report.split}`\n"
                  f"- gate: {decision.reason}\n- files: {len(pub.files)}\n"))
    return pub
