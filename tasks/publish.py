"""Task: publish the merged model (vlmdet.pipeline.steps.PUBLISH).

The token is resolved once a run (vlmdet.pipeline.step.resolve_token: the Secret block named
publish.token_secret, else HF_TOKEN) and passed as a plain argument; never logged, put into an artifact
or a message, and never part of a cache key (the task is not cached).
"""
from tasks.common import task_of
from vlmdet.pipeline.steps import PUBLISH

publish = task_of(PUBLISH)
