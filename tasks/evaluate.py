"""Task: COCO mAP of a model on the held-out split, in a child process (vlmdet.steps evaluate).

The result persists, keyed on the model's files (names, sizes, times), the data fingerprint,
the evaluation and model settings and the output folder: a flow-run retry, or a run with nothing
new, returns the EvalReport without generating again. The flow refreshes the cache when the
output folder no longer holds what the key produced (evaluation_done).
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks.common import image_markdown, step_dir
from vlmdet.config import RunConfig
from vlmdet.keys import EVAL_EXECUTION_ONLY, marker_matches, path_stamp, step_key, write_marker
from vlmdet.records import DatasetRef, EvalReport
from vlmdet.runner import plan_processes, run_step


def evaluation_key(model: str, dataset: DatasetRef, config: RunConfig, workdir: str | Path, name: str) -> str:
    cfg = config.to_dict()
    return step_key("evaluate", step_dir(workdir, "eval", name), model=path_stamp(model), data=dataset.fingerprint,
                    eval={k: v for k, v in cfg["eval"].items() if k not in EVAL_EXECUTION_ONLY}, model_settings=cfg["model"],
                    category=cfg["data"]["category"])


def _cache_key(context, parameters) -> str:
    return evaluation_key(parameters["model"], parameters["dataset"], parameters["config"], parameters["workdir"],
                          parameters.get("name", "adapter"))


def evaluation_done(model: str, dataset: DatasetRef, config: RunConfig, workdir: str | Path, name: str = "adapter") -> bool:
    """True while WORKDIR/eval/NAME holds the evaluation this key produced (not another model's)."""
    out = step_dir(workdir, "eval", name)
    return (out / "predictions.json").is_file() and marker_matches(out, evaluation_key(model, dataset, config, workdir, name))


@task(name="evaluate", task_run_name="evaluate-{name}", cache_key_fn=_cache_key, persist_result=True,
      cache_expiration=timedelta(days=90))
def evaluate(model: str, dataset: DatasetRef, config: RunConfig, workdir: str, name: str = "adapter") -> EvalReport:
    """model: an adapter folder, a merged folder or a base model path."""
    out = step_dir(workdir, "eval", name)
    # one process per visible GPU (accelerate launch), each detecting every Nth image; rank 0 writes
    processes, env = plan_processes(config.eval.num_processes, setting="eval.num_processes")
    record = run_step("evaluate", {"model": model, "dataset": dataset.to_dict(), "config": config.to_dict(),
                                   "out": str(out), "split": config.eval.split}, out / "step", timeout_s=config.eval.timeout_s,
                      num_processes=processes, env=env)
    report = EvalReport.from_dict(record)
    write_marker(out, evaluation_key(model, dataset, config, workdir, name))
    get_run_logger().info("%s: mAP %.4f, mAP50 %.4f, mAP75 %.4f on %d %s images (%d unparsable answers)", name,
                          report.map, report.map50, report.map75, report.num_images, report.split, report.parse_failures)
    create_markdown_artifact(
        f"## Evaluation: {name}\n\n| mAP | mAP50 | mAP75 | images | unparsable |\n|---|---|---|---|---|\n"
        f"| {report.map:.4f} | {report.map50:.4f} | {report.map75:.4f} | {report.num_images} | {report.parse_failures} |\n\n"
        "Green: ground truth; red: predictions with scores.\n\n" + image_markdown(report.preview, "predictions"),
        key=f"evaluation-{name}")
    return report
