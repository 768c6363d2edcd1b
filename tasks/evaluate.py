"""Task: COCO mAP of a model on the held-out split, in a child process (vlmdet.pipeline.steps.evaluate).

The result persists, keyed on the model's files (names, sizes, times), the data fingerprint,
the evaluation and model settings and the output folder (vlmdet.run.layout.RunLayout.eval_key): a
flow-run retry, or a run with nothing new, returns the EvalReport without generating again.
"""
from __future__ import annotations

from datetime import timedelta

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks.common import image_markdown
from tasks.progress import progress_artifact
from vlmdet.pipeline import steps as runsteps
from vlmdet.config.settings import RunConfig
from vlmdet.run.layout import RunLayout
from vlmdet.run.records import DatasetRef, EvalReport


def _cache_key(context, parameters) -> str:
    return RunLayout.at(parameters["workdir"]).eval_key(parameters["model"], parameters["dataset"],
                                                        parameters["config"], parameters.get("name", "adapter"))


@task(name="evaluate", task_run_name="evaluate-{name}", cache_key_fn=_cache_key, persist_result=True,
      cache_expiration=timedelta(days=90))
def evaluate(model: str, dataset: DatasetRef, config: RunConfig, workdir: str, name: str = "adapter") -> EvalReport:
    """model: an adapter folder, a merged folder or a base model path."""
    report = runsteps.evaluate(model, dataset, config, RunLayout.at(workdir), name,
                               on_progress=progress_artifact(f"evaluation-progress-{name}", f"evaluating {name}"))
    get_run_logger().info("%s: mAP %.4f, mAP50 %.4f, mAP75 %.4f on %d %s images (%d unparsable answers)", name,
                          report.map, report.map50, report.map75, report.num_images, report.split, report.parse_failures)
    create_markdown_artifact(
        f"## Evaluation: {name}\n\n| mAP | mAP50 | mAP75 | images | unparsable |\n|---|---|---|---|---|\n"
        f"| {report.map:.4f} | {report.map50:.4f} | {report.map75:.4f} | {report.num_images} | {report.parse_failures} |\n\n"
        "Green: ground truth; red: predictions with scores.\n\n" + image_markdown(report.preview, "predictions"),
        key=f"evaluation-{name}")
    return report
