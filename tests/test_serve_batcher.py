"""The batcher alone (no model): batches fill up to the size, one bad image fails only itself, a full
queue answers Busy at once, and a place reserved before decoding counts once."""
from __future__ import annotations

import asyncio
import time

import pytest

from vlmdet.serving.batcher import Batcher, Busy


def fake_run(calls: list[list[str]], seconds: float = 0.05):
    def run(images, names):
        calls.append(list(names))
        if "bad" in images:
            raise ValueError("the processor refused an image")
        time.sleep(seconds)  # a generate call: the event loop keeps accepting requests meanwhile
        return [f"boxes of {n}" for n in names], "rev-1"
    return run


def test_concurrent_requests_share_batches_up_to_the_size():
    calls: list[list[str]] = []

    async def main():
        b = Batcher(fake_run(calls), max_batch=4, max_wait_s=0.05, max_queue=100)
        b.start()
        results = await asyncio.gather(*(b.submit("img", f"r{i}") for i in range(10)))
        await b.stop()
        return results

    results = asyncio.run(main())
    assert results == [(f"boxes of r{i}", "rev-1") for i in range(10)]  # each request its own answer
    assert [len(c) for c in calls] == [4, 4, 2]
    assert sorted(n for c in calls for n in c) == sorted(f"r{i}" for i in range(10))


def test_one_bad_image_fails_only_its_own_request():
    calls: list[list[str]] = []

    async def main():
        b = Batcher(fake_run(calls, 0.0), max_batch=8, max_wait_s=0.05, max_queue=100)
        b.start()
        results = await asyncio.gather(*(b.submit("bad" if i == 2 else "img", f"r{i}") for i in range(4)),
                                       return_exceptions=True)
        await b.stop()
        return results

    results = asyncio.run(main())
    assert isinstance(results[2], ValueError)
    assert [r for i, r in enumerate(results) if i != 2] == [(f"boxes of r{i}", "rev-1") for i in (0, 1, 3)]
    assert calls[0] == ["r0", "r1", "r2", "r3"] and sorted(map(tuple, calls[1:])) == [("r0",), ("r1",), ("r2",), ("r3",)]


def test_a_full_queue_answers_busy_at_once():
    async def main():
        b = Batcher(fake_run([], 0.3), max_batch=1, max_wait_s=0.0, max_queue=2)
        b.start()
        first = asyncio.ensure_future(b.submit("img", "running"))
        await asyncio.sleep(0.05)  # the first one is in generate now; two may wait, the third may not
        waiting = [asyncio.ensure_future(b.submit("img", f"w{i}")) for i in range(2)]
        await asyncio.sleep(0)
        t0 = time.monotonic()
        with pytest.raises(Busy, match="serve.max_queue=2"):
            await b.submit("img", "one too many")
        assert time.monotonic() - t0 < 0.1
        done = await asyncio.gather(first, *waiting)
        await b.stop()
        return done

    assert [d[0] for d in asyncio.run(main())] == ["boxes of running", "boxes of w0", "boxes of w1"]


def test_a_reserved_place_counts_until_released_or_submitted():
    async def main():
        b = Batcher(fake_run([], 0.0), max_batch=4, max_wait_s=0.0, max_queue=2)
        b.start()
        first, second = b.reserve(), b.reserve()  # two requests decoding their images
        assert b.depth == 2
        with pytest.raises(Busy, match="serve.max_queue=2"):
            b.reserve()  # a third is refused before it decodes anything
        with pytest.raises(Busy):
            await b.submit("img", "no ticket")
        second.release()
        second.release()  # idempotent: a request's `finally` releases again after a failure
        assert b.depth == 1
        answer = await b.submit("img", "first", first)  # the ticket becomes the queued job: counted once
        first.release()  # after submit: a no-op
        assert b.depth == 0
        again = b.reserve()
        assert b.depth == 1
        again.release()
        await b.stop()
        return answer

    assert asyncio.run(main()) == ("boxes of first", "rev-1")
