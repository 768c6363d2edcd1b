"""Gathers concurrent requests into batches for one generate call each.

The first request of a batch waits up to `max_wait_s` for others, then up to `max_batch` images go
to the model together in a single worker thread (the model is never called from two threads at
once). While a batch runs, new requests queue; the next batch starts from them at once. A batch
that raises is retried one image at a time, so one bad image fails only its own request.

With `prepare` (serve.prepare_ahead), a batch is made ready on the CPU (the processor's resize and
patches, ~30 ms an image for a 7B's 1024x768) in a second thread while the GPU thread generates the
batch before it: batch N+1 is gathered and prepared as soon as batch N starts, and waits, prepared,
for the GPU. Without it one thread prepares and generates in turn and the GPU idles meanwhile.

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
    """The queue is full: answered 503 at once instead of waiting for minutes."""


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
    """run(images, names) -> (predictions, extra); with `prepare`, run(images, names, prepare(images)) where
    `prepare` runs in its own thread, ahead of the GPU (`run` must accept None there: prepare it yourself)."""

    def __init__(self, run: Callable[..., tuple[list, Any]], max_batch: int, max_wait_s: float,
                 max_queue: int, on_batch: Callable[[int, float], None] = lambda n, s: None,
                 prepare: Callable[[list], Any] | None = None):
        self.run, self.max_batch, self.max_wait_s, self.max_queue = run, max_batch, max_wait_s, max_queue
        self.on_batch, self.prepare = on_batch, prepare
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="vlmdet-generate")
        self.prep_executor = ThreadPoolExecutor(1, thread_name_prefix="vlmdet-prepare") if prepare else None
        self._task: asyncio.Task | None = None
        self._reserved = 0  # tickets out: requests decoding their image, not yet queued
        self._staged = 0  # taken from the queue and being prepared, or prepared and waiting for the GPU

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.prep_executor:
            self.prep_executor.shutdown(wait=False, cancel_futures=True)

    @property
    def depth(self) -> int:
        """Requests holding a place: queued, decoding their image with a ticket, or in the next batch (being
        prepared, or prepared and waiting for the GPU)."""
        return self.queue.qsize() + self._reserved + self._staged

    def _check(self) -> None:
        if self.depth >= self.max_queue:
            raise Busy(f"{self.depth} requests are waiting or being decoded (serve.max_queue={self.max_queue})")

    def reserve(self) -> Ticket:
        """A place in the queue, or Busy at once. Claimed before decoding: the event loop runs one request at a
        time between awaits, so the check and the claim cannot interleave with another request's."""
        self._check()
        self._reserved += 1
        return Ticket(self)

    async def submit(self, image: Any, name: str, ticket: Ticket | None = None) -> tuple[Any, Any]:
        """(prediction, what `run` returned beside the predictions) for one image. With a ticket from
        `reserve` the place is already held; without one the queue is checked now."""
        if ticket is not None:
            ticket.release()  # the queued job takes over the place: depth stays the same
        else:
            self._check()
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
        running: asyncio.Task | None = None  # the batch the GPU thread is generating (prepare_ahead only)
        try:
            while True:
                batch = await self._gather()
                if not batch:
                    continue
                if self.prepare is None:
                    await self._run(batch)
                    continue
                self._staged = len(batch)
                prepared = await self._prepare(batch)  # meanwhile the GPU generates `running`
                if prepared is _FAILED:
                    self._staged = 0
                    continue  # its one request already has its error
                if running is not None:
                    await running  # never raises: _run answers every request itself
                    running = None
                self._staged = 0  # the GPU takes them now
                if prepared is None:  # preparing them together failed: each alone, prepared in the GPU thread
                    for j in batch:
                        await self._run([j])
                    continue
                running = asyncio.create_task(self._run(batch, prepared))
        finally:
            if running is not None:
                running.cancel()

    async def _prepare(self, batch: list[_Job]) -> Any:
        """The batch's prepared inputs; None when preparing it together failed (each image is then prepared
        and run alone, so one bad image fails only itself); _FAILED when a lone image failed (answered)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.prep_executor, self.prepare,
                                                                    [j.image for j in batch])
        except Exception as err:  # noqa: BLE001 - as in _run: the request gets the error, the server goes on
            if len(batch) > 1:
                log.warning("preparing a batch of %d failed (%s: %s); its images go one at a time", len(batch),
                            type(err).__name__, err)
                return None
            log.exception("preparing %s failed", batch[0].name)
            if not batch[0].future.done():
                batch[0].future.set_exception(err)
            return _FAILED

    async def _run(self, batch: list[_Job], prepared: Any = None) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        args = ([j.image for j in batch], [j.name for j in batch])
        if self.prepare is not None:
            args += (prepared,)  # None: run prepares the images itself
        try:
            preds, extra = await loop.run_in_executor(self.executor, self.run, *args)
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


_FAILED = object()
