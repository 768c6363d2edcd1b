"""Task: COCO mAP of a model on the held-out split, in a child process (vlmdet.steps evaluate)."""
from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks.common import image_markdown, step_dir
from vlmdet.config import RunConfig
from vlmdet.records import DatasetRef, EvalReport
from vlmdet.runner import run_step


@task(name="evaluate", task_run_name="evaluate-{name}")
def evaluate(model: str, dataset: DatasetRef, config: RunConfig, workdir: str, name: str = "adapter") -> EvalReport:
    """model: an adapter folder, a merged folder or a base model path."""
    out = step_dir(workdir, "eval", name)
    record = run_step("evaluate", {"model": model, "dataset": dataset.to_dict(), "config": config.to_dict(),
                                   "out": str(out), "split": config.eval.split}, out / "step", timeout_s=config.eval.timeout_s)
    report = EvalReport.from_dict(record)
    get_run_logger().info("%s: mAP %.4f, mAP50 %.4f, mAP75 %.4f on %d %s images (%d unparsable answers)", name,
                          report.map, report.map50, report.map75, report.num_images, report.split, report.parse_failures)
    create_markdown_artifact(
        f"## Evaluation: {name}\n\n| mAP | mAP50 | mAP75 | images | unparsable |\n|---|---|---|---|---|\n"
        f"| {report.map:.4f} | {report.map50:.4f} | {report.map75:.4f} | {report.num_images} | {report.parse_failures} |\n\n"
        "Green: ground truth; red: predictions with scores.\n\n" + image_markdown(report.preview, "predictions"),
        key=f"evaluation-{name}")
    return report
