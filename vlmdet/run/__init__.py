"""A run's bookkeeping, below every step: the records steps pass each other (records.py), the run folder
and what each step's output is keyed by (layout.py, keys.py), the child processes heavy steps run in
(runner.py), and what a run reports while and after it runs (timeline.py, progress.py, tracking.py,
provenance.py). Nothing here knows what a step computes."""
