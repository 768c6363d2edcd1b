"""The experiment tracker of a run (train.report_to): TensorBoard by default, MLflow, W&B, trackio.

The training itself is logged by the trainer's own integrations (TRL's `report_to`): the training
child sets them up with `trainer_env` and records where they wrote (`record_location`, TRAIN_DIR/tracker.json).
After the gate and the publication, `log_run` adds what only the pipeline knows to that same tracker
run: the evaluation's mAP per model, the gate's decision, the published revision and the Prefect flow
run, so one place shows tonight's loss curve and what came of it beside last week's.

The Prefect flow run arrives as a plain value (the library never imports Prefect): the environment
variable VLMDET_FLOW_RUN_ID (and VLMDET_FLOW_RUN_URL) that the flow sets, else PREFECT__FLOW_RUN_ID,
which Prefect's workers set in the flow run's process.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

from vlmdet.config.settings import RunConfig

log = logging.getLogger(__name__)
RECORD = "tracker.json"  # in the training folder: which tracker run the training logged to
TENSORBOARD_DIR = "tensorboard"


def report_to(config: RunConfig) -> str | list[str]:
    """TrainingArguments.report_to for this run."""
    return "none" if config.train.report_to == "none" else [config.train.report_to]


def _workdir(train_dir: Path) -> Path:
    return train_dir.parent.parent  # vlmdet.run.layout: WORKDIR/train/<training key>


def mlflow_store(train_dir: Path) -> str:
    """The tracking URI when MLFLOW_TRACKING_URI is unset: a sqlite store in the work folder, beside the
    runs it describes (MLflow's own default is ./mlflow.db in whatever folder the worker started in)."""
    return f"sqlite:///{_workdir(Path(train_dir)).resolve() / 'mlflow.db'}"


def flow_run() -> tuple[str | None, str | None]:
    """(id, UI address) of the Prefect flow run this process serves, as the environment says."""
    return (os.environ.get("VLMDET_FLOW_RUN_ID") or os.environ.get("PREFECT__FLOW_RUN_ID") or None,
            os.environ.get("VLMDET_FLOW_RUN_URL") or None)


def _tags(config: RunConfig, train_dir: Path) -> dict[str, str]:
    run_id, url = flow_run()
    tags = {"vlmdet.preset": config.name, "vlmdet.train_dir": str(train_dir)}
    tags.update({k: v for k, v in (("prefect.flow_run_id", run_id), ("prefect.flow_run_url", url)) if v})
    return tags


@contextlib.contextmanager
def trainer_env(config: RunConfig, train_dir: Path) -> Iterator[None]:
    """The environment the trainer's integration reads (transformers 5 reads the TensorBoard folder from
    TENSORBOARD_LOGGING_DIR when the callback is built, MLflow's settings when training begins), set for
    the block and restored after it: a test or benchmark training in-process leaks nothing.

    A training resumed from a checkpoint starts a new MLflow run (tracker.json then names it): continuing
    the old one (MLFLOW_RUN_ID) would fail on its params when an out-of-memory retry halved the batch."""
    train_dir, kind, env = Path(train_dir), config.train.report_to, {}
    if kind == "tensorboard":
        env["TENSORBOARD_LOGGING_DIR"] = str(train_dir / TENSORBOARD_DIR)
    elif kind == "mlflow":
        env["MLFLOW_TRACKING_URI"] = os.environ.get("MLFLOW_TRACKING_URI") or mlflow_store(train_dir)
        env["MLFLOW_EXPERIMENT_NAME"] = os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"vlmdet-{config.name}"
        env["MLFLOW_TAGS"] = json.dumps({**_tags(config, train_dir), **json.loads(os.environ.get("MLFLOW_TAGS") or "{}")})
    elif kind == "wandb":
        env["WANDB_DIR"] = os.environ.get("WANDB_DIR") or str(train_dir)  # not ./wandb where the worker started
        env["WANDB_PROJECT"] = os.environ.get("WANDB_PROJECT") or "vlmdet"
    with scoped_env(env):
        yield


@contextlib.contextmanager
def scoped_env(env: dict[str, str]) -> Iterator[None]:
    """os.environ with `env` set for the block (child processes started in it inherit it), then as it was."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def flow_run_env(run_id: Any, url: str | None = None) -> contextlib.AbstractContextManager:
    """The Prefect flow run's id (and UI address) for the run inside the block: the tracker run is tagged with
    it, at training (the child inherits it) and after the gate. Without an id, nothing is set."""
    env = {"VLMDET_FLOW_RUN_ID": str(run_id)} if run_id else {}
    return scoped_env({**env, **({"VLMDET_FLOW_RUN_URL": url} if run_id and url else {})})


def read_record(train_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(train_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def record_location(config: RunConfig, train_dir: Path) -> None:
    """Write TRAIN_DIR/tracker.json: where the trainer's integration logs (vlmdet.training.train calls it when
    training begins, after the integrations set up their runs), so the parent finds the same run."""
    kind, train_dir = config.train.report_to, Path(train_dir)
    if kind == "none":
        return
    record: dict[str, Any] = {"report_to": kind}
    if kind == "tensorboard":
        record["log_dir"] = os.environ.get("TENSORBOARD_LOGGING_DIR") or str(train_dir / TENSORBOARD_DIR)
    elif kind == "mlflow":
        import mlflow

        run = mlflow.active_run()
        if run is not None:
            record.update(tracking_uri=mlflow.get_tracking_uri(), experiment_id=run.info.experiment_id,
                          run_id=run.info.run_id)
    (train_dir / RECORD).write_text(json.dumps(record, indent=1))


# --- after the gate --------------------------------------------------------------------------------------------
def run_numbers(summary: Any) -> dict[str, float]:
    """The run's numbers as tracker metrics: mAP per model on the judged split, the gate's decision."""
    split = (summary.evaluation or {}).get("split") or "test"
    out: dict[str, float] = {}
    for model, metrics in (("adapter", summary.metrics), ("merged", summary.merged_metrics),
                           ("champion", summary.champion_metrics), ("base", summary.base_metrics)):
        for name, value in (metrics or {}).items():
            out[f"{split}/{model}/{name}"] = float(value)
    g = summary.gate
    for key, value in (("challenger", g.get("value")), ("champion", g.get("champion")), ("p_better", g.get("p_better")),
                       ("threshold", g.get("threshold")), ("passed", g.get("passed")),
                       ("ci_low", g.get("ci_low")), ("ci_high", g.get("ci_high"))):
        if value is not None:
            out[f"gate/{key}"] = float(value)
    return out


def run_texts(summary: Any, flow_run_id: str | None, flow_run_url: str | None) -> dict[str, str]:
    """The decision and the publication in words (tags in MLflow, text in TensorBoard)."""
    published = summary.published or {}
    texts = {"gate/reason": summary.gate.get("reason") or "", "gate/metric": summary.gate.get("metric") or "",
             "published/target": published.get("target") or "nothing",
             "published/revision": published.get("revision") or "", "prefect/flow_run_id": flow_run_id or "",
             "prefect/flow_run_url": flow_run_url or ""}
    return {k: str(v) for k, v in texts.items() if v}


def log_run(summary: Any, config: RunConfig, flow_run_id: str | None = None,
            flow_run_url: str | None = None) -> dict[str, Any]:
    """Log the run's numbers (vlmdet.pipeline.run.RunSummary) to the tracker run its training logged to.

    Returns where that run is (summary.json's `tracker`); {} with train.report_to=none. A tracker that
    cannot be written is a warning, never a failed run: the model may already be published."""
    kind = config.train.report_to
    if kind == "none":
        return {}
    env_id, env_url = flow_run()
    flow_run_id, flow_run_url = flow_run_id or env_id, flow_run_url or env_url
    train_dir = Path(summary.adapter).parent
    record = read_record(train_dir)
    if record.get("report_to") != kind:  # trained before this tracker was chosen (or came from a cache)
        record = {"report_to": kind}
    step = int((summary.training or {}).get("global_step") or 0)  # beside the loss curve's last step
    try:
        if kind == "tensorboard":
            return _tensorboard(record, train_dir, summary, step, flow_run_id, flow_run_url)
        if kind == "mlflow":
            return _mlflow(record, train_dir, summary, config, step, flow_run_id, flow_run_url)
    except Exception as err:  # noqa: BLE001 - a tracker outage must not fail a run that may have published
        log.warning("could not log the run's results to %s: %s: %s", kind, type(err).__name__, err)
        return {**record, "error": f"{type(err).__name__}: {err}"}
    # W&B and trackio: the trainer's logging only (resuming their runs from here is not built: untested
    # without their services)
    log.info("%s has the training logs; the run's mAP and gate decision are in summary.json", kind)
    return record


def _tensorboard(record: dict[str, Any], train_dir: Path, summary: Any, step: int, flow_run_id: str | None,
                 flow_run_url: str | None) -> dict[str, Any]:
    from torch.utils.tensorboard import SummaryWriter

    log_dir = record.get("log_dir") or str(train_dir / TENSORBOARD_DIR)
    with SummaryWriter(log_dir=log_dir) as writer:  # a new event file beside the trainer's; TensorBoard reads both
        for key, value in run_numbers(summary).items():
            writer.add_scalar(key, value, step)
        for key, text in run_texts(summary, flow_run_id, flow_run_url).items():
            writer.add_text(key, text, step)
    # WORKDIR/train: every training of this work folder is one run in TensorBoard's run selector
    return {"report_to": "tensorboard", "log_dir": log_dir,
            "command": f"tensorboard --logdir {Path(log_dir).parent.parent}"}


def _mlflow(record: dict[str, Any], train_dir: Path, summary: Any, config: RunConfig, step: int,
            flow_run_id: str | None, flow_run_url: str | None) -> dict[str, Any]:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    uri = record.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or mlflow_store(train_dir)
    client = MlflowClient(tracking_uri=uri)
    run_id = record.get("run_id")
    if not run_id:  # the training did not log here (report_to changed since): a run of its own for the results
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"vlmdet-{config.name}"
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        run_id = client.create_run(experiment_id, run_name=f"{config.name} {train_dir.name}").info.run_id
        client.set_terminated(run_id)
        if train_dir.is_dir():  # a later decision on the same training finds this run
            (train_dir / RECORD).write_text(json.dumps({"report_to": "mlflow", "tracking_uri": uri,
                                                        "experiment_id": experiment_id, "run_id": run_id}, indent=1))
    run = client.get_run(run_id)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v in run_numbers(summary).items()]
    tags = [RunTag(k, v[:5000]) for k, v in {**_tags(config, train_dir),
                                             **{f"vlmdet.{k.replace('/', '.')}": v
                                                for k, v in run_texts(summary, flow_run_id, flow_run_url).items()
                                                if not k.startswith("prefect/")}}.items()]
    if flow_run_id:
        tags.append(RunTag("prefect.flow_run_id", flow_run_id))
    if flow_run_url:
        tags.append(RunTag("prefect.flow_run_url", flow_run_url))
    # vlmdet's own settings beside the trainer's arguments; a param is immutable in MLflow, so one already
    # there (an earlier decision on the same training) stays as logged
    params = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in _flat_settings(config).items() if k not in run.data.params]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[i:i + 100])
    client.log_batch(run_id, metrics=metrics, tags=tags)
    experiment_id = run.info.experiment_id
    url = (f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
           if uri.startswith(("http://", "https://")) else None)
    return {"report_to": "mlflow", "tracking_uri": uri, "experiment_id": experiment_id, "run_id": run_id, "url": url,
            "command": f"mlflow ui --backend-store-uri {uri}"}


def _flat_settings(config: RunConfig) -> dict[str, str]:
    return {f"vlmdet.{section}.{name}": value if isinstance(value, str) else json.dumps(value)
            for section, values in config.to_dict().items() if isinstance(values, dict)
            for name, value in values.items()}
