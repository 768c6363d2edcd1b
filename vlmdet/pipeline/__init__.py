"""The run, top to bottom: each step declared once (steps.py), the sequence and its branches (run.py), and
the entry point of the step children (`python -m vlmdet.pipeline.child`). The drivers (flows/retrain.py,
`vlmdet train`, benchmarks/nightly_run.py) run it; nothing below this package imports it."""
