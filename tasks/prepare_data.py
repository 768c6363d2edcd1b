"""Task: materialize the dataset spec and prepare it (vlmdet.pipeline.steps.PREPARE).

Cached: a rerun with the same data settings and an unchanged source reuses the prepared data (a flow
retry after a crash does not redo it); a Hub download cut off is retried, bad data is not.
"""
from tasks.common import task_of
from vlmdet.pipeline.steps import PREPARE

prepare_data = task_of(PREPARE)
