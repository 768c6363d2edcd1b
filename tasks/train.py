"""Task: QLoRA fine-tuning in a child process (vlmdet.pipeline.steps.train).

Not retried on ordinary failures: a flow-run retry restarts it and training resumes from the last
checkpoint of the same run folder. Out of GPU memory is retried once with half the per-device
batch and twice the accumulation (same effective batch); the halving shows in the retry history.

The result persists (Prefect result storage) under a key of the run folder, which is named by
keys.training_key (data fingerprint, base, LoRA and training settings; vlmdet.run.layout): a flow-run
retry after a later step failed, or a new run with nothing new, returns the AdapterRef without
training. The config arrives resolved (train.profile concrete, vlmdet.pipeline.run.resolve).
"""
from __future__ import annotations

from datetime import timedelta

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run, task_run

from tasks.common import image_markdown
from tasks.progress import progress_artifact
from vlmdet.pipeline import steps as runsteps
from vlmdet.config.settings import RunConfig
from vlmdet.run.layout import RunLayout
from vlmdet.run.records import AdapterRef, DatasetRef
from vlmdet.run.runner import OutOfMemory, StepFailed


def _retry_on_oom(task, task_run, state) -> bool:
    """Only an out-of-memory whose batch can still be halved is retried; anything else fails."""
    try:
        state.result()
    except OutOfMemory:
        return True
    except Exception:
        return False
    return False


def halved_for_retry(config: RunConfig, attempt: int) -> RunConfig:
    """Attempt 2+ after an OOM: the same effective batch in smaller pieces."""
    if attempt <= 1 or config.train.per_device_batch == 1:
        return config
    return config.override({"train.per_device_batch": max(1, config.train.per_device_batch // 2),
                            "train.grad_accum": config.train.grad_accum * 2})


def layout(workdir: str) -> RunLayout:
    """The run folder; a forced (fresh) run trains in a folder named by its flow run."""
    return RunLayout.at(workdir, str(flow_run.id or "manual"))


def _cache_key(context, parameters) -> str:
    return layout(parameters["workdir"]).train_key(parameters["dataset"], parameters["config"],
                                                   parameters.get("fresh", False))


@task(name="train", retries=1, retry_delay_seconds=0, retry_condition_fn=_retry_on_oom,
      cache_key_fn=_cache_key, persist_result=True, cache_expiration=timedelta(days=90))
def train(dataset: DatasetRef, config: RunConfig, workdir: str, fresh: bool = False) -> AdapterRef:
    """fresh: start from the base even where this configuration trained before (a forced rerun);
    a retry of the same flow run still resumes its own checkpoints."""
    log = get_run_logger()
    config = halved_for_retry(config, task_run.run_count)  # keeps the key: same effective batch
    if task_run.run_count > 1:
        log.warning("retrying after out of GPU memory with per_device_batch=%d grad_accum=%d",
                    config.train.per_device_batch, config.train.grad_accum)
    try:
        adapter = runsteps.train(dataset, config, layout(workdir), fresh,
                                 on_progress=progress_artifact("training-progress", "training"))
    except OutOfMemory as err:
        if config.train.per_device_batch > 1:
            raise  # retried once with half the batch (see _retry_on_oom)
        raise StepFailed("train", f"{err} Already at per_device_batch=1: not retrying.", kind="oom") from None
    log.info("adapter at %s after %d steps%s", adapter.path, adapter.global_step,
             f" (resumed from {adapter.resumed_from})" if adapter.resumed_from else "")
    losses = adapter.losses
    create_markdown_artifact(
        f"## Training\n\n- steps: {adapter.global_step}\n- loss: {losses[0]:.4f} -> {losses[-1]:.4f}\n"
        f"- adapter: `{adapter.path}`\n- resumed from: {adapter.resumed_from or 'no'}\n"
        f"- checkpoint kept: {adapter.selected_step} ({adapter.validation.get('rule', 'n/a')})\n\n"
        + _validation_table(adapter)
        + image_markdown(adapter.loss_curve, "loss curve"), key="training") if losses else None
    return adapter


def _validation_table(adapter: AdapterRef) -> str:
    rows = adapter.validation.get("checkpoints") or []
    if not any("val_loss" in r for r in rows):
        return ""
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    body = "\n".join(f"| {r['step']}{' (kept)' if r['step'] == adapter.selected_step else ''} | {fmt(r.get('val_loss'))} "
                     f"| {fmt(r.get('val_map50'))} | {fmt(r.get('val_map'))} |" for r in rows)
    return f"| checkpoint | val loss | val mAP50 | val mAP |\n|---|---|---|---|\n{body}\n\n"
