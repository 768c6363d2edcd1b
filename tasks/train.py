"""Task: QLoRA fine-tuning in a child process (vlmdet.pipeline.steps.TRAIN).

Not retried on ordinary failures: a flow-run retry restarts it and training resumes from the last
checkpoint of the same run folder. Out of GPU memory is retried once with half the per-device batch
and twice the accumulation (same effective batch, same key); the halving shows in the retry history.
The result persists under the key of its folder: a flow-run retry after a later step failed, or a new
run with nothing new, returns the AdapterRef without training.
"""
from tasks.common import task_of
from vlmdet.pipeline.steps import TRAIN

train = task_of(TRAIN)
