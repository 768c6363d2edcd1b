"""Task: merge the adapter into the unquantized base and check it (vlmdet.pipeline.steps.MERGE).

The result persists, keyed on the adapter's files, the model settings and the check images: a flow-run
retry after a failed publish does not merge again; the cache is refreshed when its folder is gone.
"""
from tasks.common import task_of
from vlmdet.pipeline.steps import MERGE

merge = task_of(MERGE)
