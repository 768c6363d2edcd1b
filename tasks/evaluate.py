"""Task: COCO mAP of a model on the held-out split, in a child process (vlmdet.pipeline.steps.EVALUATE).

The result persists, keyed on the model's files (names, sizes, times), the data fingerprint, the
evaluation and model settings and the output folder: a flow-run retry, or a run with nothing new,
returns the EvalReport without generating again.
"""
from tasks.common import task_of
from vlmdet.pipeline.steps import EVALUATE

evaluate = task_of(EVALUATE)
