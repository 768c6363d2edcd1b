"""Detection levers that measurement rejected, kept here (not in the library) so bench.py can still measure them.

- `workers`: the next batches' images decoded and processed by forked DataLoader workers instead of
  one background thread; measured slower than the thread on an H100 (benchmarks/RESULTS.md, 2026-11-28).
- `cache="static"`: generate's KV cache preallocated (no torch.cat of the cache every step), eager;
  measured slower than the dynamic cache (RESULTS.md, 2026-11-27).
Everything else (prompt, parsing, scores, batching) is the library's Detector.
"""
from __future__ import annotations

from typing import Any

import torch

from vlmdet.prediction.predict import Detector


class _Batches(torch.utils.data.Dataset):
    """Batch k of detect_all as (images, processor tensors): what a DataLoader worker prepares."""

    def __init__(self, load, batches: list[list[int]]):
        self.load, self.batches = load, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        return self.load(self.batches[k])


def _as_is(batch):
    return batch


class RejectedDetector(Detector):
    def __init__(self, *args: Any, cache: str = "dynamic", workers: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.cache, self.workers = cache, workers

    def generate_options(self) -> dict[str, Any]:
        if self.cache == "dynamic":
            return {}
        # eager: transformers would otherwise torch.compile the forward on CUDA (minutes at a new batch
        # shape, and the score hooks would run inside a compiled graph)
        return {"cache_implementation": self.cache, "disable_compile": True}

    def _prepared(self, load, batches: list[list[int]]):
        workers = min(self.workers, len(batches) - 1)
        if workers <= 0:
            yield from super()._prepared(load, batches)
            return
        # fork: the workers inherit the items' loaders (closures) and the processor without pickling; they
        # never touch CUDA. The tensors come back through shared memory.
        yield from torch.utils.data.DataLoader(_Batches(load, batches), batch_size=None, collate_fn=_as_is,
                                               num_workers=workers, prefetch_factor=2, multiprocessing_context="fork")
