"""Tasks: find the champion, fetch its predictions or model, and the champion/challenger gate
(vlmdet.pipeline.steps FIND_CHAMPION, FETCH_CHAMPION, GATE).

Reading and downloading the champion are network calls, retried for transient errors only. The
decision (the pure `vlmdet.decide.gate.decide` on a paired bootstrap) is never retried; its numbers,
reason and a picture of the images the two models disagree on go into an artifact.
"""
from tasks.common import task_of
from vlmdet.pipeline.steps import FETCH_CHAMPION, FIND_CHAMPION, GATE

find_champion = task_of(FIND_CHAMPION)
fetch_champion = task_of(FETCH_CHAMPION)
gate = task_of(GATE)
