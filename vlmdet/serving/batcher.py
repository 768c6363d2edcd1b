"""Gathers concurrent requests into batches for one generate call each.

The first request of a batch waits up to `max_wait_s` for others, then up to `max_batch` images go
to the model together in a single worker thread (the model is never called from two threads at
once). While a batch runs, new requests queue; the next batch starts from them at once. A batch
that raises is retried one image at a time, so one bad image fails only its own request.

A request claims its place in the queue (`reserve`) before its image is decoded, so a full queue
is answered at once without spending the memory of one more decoded image: `max_queue` bounds the
images that are being decoded and waiting together.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)


class Busy(Exception):
    """No room (the queue is full, or serve.max_uploads bodies are being read): answered 503 with Retry-After
    at once instead of waiting for minutes. `reason` is the response's error."""

    def __init__(self, message: str, reason: str = "busy"):
        super().__init__(message)
        self.reason = reason


@dataclass
class _Job:
    image: Any
    name: str
    future: asyncio.Future
    queued: float = field(default_factory=time.monotonic)


class Ticket:
    """A place in the queue held while the request's image is decoded; `submit` turns it into the queued job."""

    def __init__(self, batcher: "Batcher"):
        self._batcher: Batcher | None = batcher

    def release(self) -> None:
        """Give the place back (idempotent: a no-op once submitted or released)."""
        if self._batcher is not None:
            self._batcher._reserved -= 1
            self._batcher = None


class Batcher:
    def __init__(self, run: Callable[[list, list[str]], tuple[list, Any]], max_batch: int, max_wait_s: float,
                 max_queue: int, on_batch: Callable[[int, float], None] = lambda n, s: None):
        self.run, self.max_batch, self.max_wait_s, self.max_queue = run, max_batch, max_wait_s, max_queue
        self.on_batch = on_batch
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="vlmdet-generate")
        self._task: asyncio.Task | None = None
        self._reserved = 0  # tickets out: requests decoding their image, not yet queued

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def depth(self) -> int:
        """Requests holding a place: queued, or decoding their image with a ticket."""
        return self.queue.qsize() + self._reserved

    def check(self) -> None:
        """Busy when every place is taken (claims nothing: `reserve` does)."""
        if self.depth >= self.max_queue:
            raise Busy(f"{self.depth} requests are waiting or being decoded (serve.max_queue={self.max_queue})")

    def reserve(self) -> Ticket:
        """A place in the queue, or Busy at once. Claimed before decoding: the event loop runs one request at a
        time between awaits, so the check and the claim cannot interleave with another request's."""
        self.check()
        self._reserved += 1
        return Ticket(self)

    async def submit(self, image: Any, name: str, ticket: Ticket | None = None) -> tuple[Any, Any]:
        """(prediction, what `run` returned beside the predictions) for one image. With a ticket from
        `reserve` the place is already held; without one the queue is checked now."""
        if ticket is not None:
            ticket.release()  # the queued job takes over the place: depth stays the same
        else:
            self.check()
        job = _Job(image, name, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(job)
        return await job.future

    async def _gather(self) -> list[_Job]:
        batch = [await self.queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        # Short sleeps rather than wait_for(queue.get()): cancelling a get can lose an item on Python < 3.12.
        while self.queue.qsize() < self.max_batch - len(batch) and time.monotonic() < deadline:
            await asyncio.sleep(min(0.001, max(0.0, deadline - time.monotonic())))
        while len(batch) < self.max_batch and not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return [j for j in batch if not j.future.done()]  # a client that went away cancelled its future

    async def _loop(self) -> None:
        while True:
            batch = await self._gather()
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        try:
            preds, extra = await loop.run_in_executor(self.executor, self.run, [j.image for j in batch],
                                                      [j.name for j in batch])
        except Exception as err:  # noqa: BLE001 - the server must go on; the request gets the error
            if len(batch) > 1:
                log.warning("a batch of %d failed (%s: %s); running its images one at a time", len(batch),
                            type(err).__name__, err)
                for j in batch:
                    await self._run([j])
                return
            log.exception("detection failed for %s", batch[0].name)
            if not batch[0].future.done():
                batch[0].future.set_exception(err)
            return
        self.on_batch(len(batch), time.monotonic() - t0)
        for j, p in zip(batch, preds):
            if not j.future.done():
                j.future.set_result((p, extra))
