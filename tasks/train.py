"""Task: QLoRA fine-tuning in a child process (vlmdet.steps train).

Not retried on ordinary failures: a flow-run retry restarts it and training resumes from the last
checkpoint of the same run folder. Out of GPU memory is retried once with half the per-device
batch and twice the accumulation (same effective batch); the halving shows in the retry history.

The result persists (Prefect result storage) under a key of the run folder, which is named by
keys.training_key (data fingerprint, base, LoRA and training settings): a flow-run retry after a
later step failed, or a new run with nothing new, returns the AdapterRef without training.
The flow passes refresh_cache when the folder no longer holds what the key produced (train_done).
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run, task_run

from tasks.common import image_markdown, step_dir
from vlmdet.keys import marker_matches, step_key, training_key, write_marker
from vlmdet.config import RunConfig
from vlmdet.records import AdapterRef, DatasetRef
from vlmdet.runner import OutOfMemory, StepFailed, plan_processes, run_step
from vlmdet.training import profiles


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


def train_dir(workdir: str | Path, dataset: DatasetRef, config: RunConfig, fresh: bool = False) -> Path:
    """WORKDIR/train/<training_key>; a forced (fresh) run gets a folder of its own flow run."""
    if config.train.profile == "auto":  # the flow asks before the task resolved it: the folder it will use
        config = profiles.resolve(config)
    key = training_key(config, dataset.fingerprint)
    if fresh:
        key += "-" + str(flow_run.id or "manual").replace("-", "")[:8]
    return step_dir(workdir, "train", key)


def _cache_key(context, parameters) -> str:
    return step_key("train", train_dir(parameters["workdir"], parameters["dataset"], parameters["config"],
                                       parameters.get("fresh", False)))


def train_done(workdir: str | Path, dataset: DatasetRef, config: RunConfig, fresh: bool = False) -> bool:
    """True while the run folder still holds the adapter its cache key produced."""
    out = train_dir(workdir, dataset, config, fresh)
    return (out / "adapter" / "adapter_config.json").is_file() and marker_matches(out, step_key("train", out))


@task(name="train", retries=1, retry_delay_seconds=0, retry_condition_fn=_retry_on_oom,
      cache_key_fn=_cache_key, persist_result=True, cache_expiration=timedelta(days=90))
def train(dataset: DatasetRef, config: RunConfig, workdir: str, fresh: bool = False) -> AdapterRef:
    """fresh: start from the base even where this configuration trained before (a forced rerun);
    a retry of the same flow run still resumes its own checkpoints."""
    log = get_run_logger()
    # the profile first (auto: from the GPU's free memory), then the out-of-memory halving over it
    config = halved_for_retry(profiles.resolve(config), task_run.run_count)
    processes, env = plan_processes(config.train.num_processes)
    if task_run.run_count > 1:
        log.warning("retrying after out of GPU memory with per_device_batch=%d grad_accum=%d",
                    config.train.per_device_batch, config.train.grad_accum)
    out = train_dir(workdir, dataset, config, fresh)  # halved_for_retry keeps the key: same effective batch
    try:
        record = run_step("train", {"dataset": dataset.to_dict(), "config": config.to_dict(), "out": str(out)},
                          out / "step", timeout_s=config.train.timeout_s, num_processes=processes, env=env)
    except OutOfMemory as err:
        if config.train.per_device_batch > 1:
            raise  # retried once with half the batch (see _retry_on_oom)
        raise StepFailed("train", f"{err} Already at per_device_batch=1: not retrying.", kind="oom") from None
    adapter = AdapterRef.from_dict(record)
    write_marker(out, step_key("train", out))
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
