"""The micro-batcher groups concurrent submissions into shared calls on one thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from disalign.service.batcher import BatcherStopped, MicroBatcher


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_concurrent_submissions_share_calls_on_one_thread():
    calls: list[list[int]] = []
    threads: set[int] = set()

    def fn(items):
        calls.append(list(items))
        threads.add(threading.get_ident())
        time.sleep(0.01)
        return [x * 10 for x in items]

    async def main():
        batcher = MicroBatcher(fn, max_batch=8, max_wait_ms=50)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in range(20)))
        finally:
            await batcher.stop()

    assert run(main()) == [i * 10 for i in range(20)]
    assert [len(c) for c in calls] == [8, 8, 4]
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_rows_count_towards_max_batch():
    sizes: list[int] = []

    async def main():
        batcher = MicroBatcher(lambda items: items, max_batch=5, max_wait_ms=50, rows=len, on_batch=sizes.append)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit([0] * n) for n in (3, 3, 1, 4)))
        finally:
            await batcher.stop()

    run(main())
    assert sizes == [6, 5]  # 3+3 reaches 5 → one call; then 1+4


def test_a_lone_request_waits_at_most_max_wait():
    async def main():
        batcher = MicroBatcher(lambda items: items, max_batch=64, max_wait_ms=20)
        await batcher.start()
        try:
            start = time.perf_counter()
            await batcher.submit(1)
            return time.perf_counter() - start
        finally:
            await batcher.stop()

    assert run(main()) < 0.5


def test_an_error_reaches_every_caller_of_the_batch_and_the_batcher_goes_on():
    def fn(items):
        if "bad" in items:
            raise ValueError("boom")
        return items

    async def main():
        batcher = MicroBatcher(fn, max_batch=4, max_wait_ms=20)
        await batcher.start()
        try:
            results = await asyncio.gather(batcher.submit("bad"), batcher.submit("ok"), return_exceptions=True)
            return results, await batcher.submit("later")
        finally:
            await batcher.stop()

    results, later = run(main())
    assert all(isinstance(r, ValueError) for r in results)
    assert later == "later"


def test_submit_before_start_and_after_stop_raises():
    async def main():
        batcher = MicroBatcher(lambda items: items, max_batch=4, max_wait_ms=1)
        with pytest.raises(BatcherStopped, match="not loaded"):
            await batcher.submit(1)
        await batcher.start()
        await batcher.stop()
        with pytest.raises(BatcherStopped):
            await batcher.submit(1)

    run(main())


def test_small_batches_run_inline_on_the_event_loop_and_large_ones_on_the_thread():
    where: list[tuple[int, bool]] = []  # (rows, ran on the event loop's thread)

    def fn(items):
        where.append((sum(items), threading.get_ident() == loop_thread))
        return [x for x in items]

    async def main():
        nonlocal loop_thread
        loop_thread = threading.get_ident()
        batcher = MicroBatcher(fn, max_batch=100, max_wait_ms=0, rows=lambda n: n, inline_rows=4)
        await batcher.start()
        try:
            assert await asyncio.gather(batcher.submit(1), batcher.submit(3)) == [1, 3]  # 4 rows: inline
            assert await batcher.submit(5) == 5  # 5 rows: on the thread
        finally:
            await batcher.stop()

    loop_thread = 0
    run(main())
    assert where == [(4, True), (5, False)]


def test_the_wait_counts_from_arrival_so_an_item_queued_during_a_batch_does_not_wait_again():
    calls: list[tuple[list[str], float]] = []

    def fn(items):
        calls.append((list(items), time.monotonic()))
        time.sleep(0.4 if items == ["a"] else 0.0)
        return items

    async def main():
        batcher = MicroBatcher(fn, max_batch=8, max_wait_ms=300)
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit("a"))
            while not calls:  # "a" waits 300 ms for company, then its batch runs for 400 ms
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            queued_during_batch = time.monotonic()
            assert await batcher.submit("b") == "b"
            await first
            return queued_during_batch
        finally:
            await batcher.stop()

    queued = run(main())
    (batch_a, started_a), (batch_b, started_b) = calls
    assert batch_a == ["a"] and batch_b == ["b"]
    # "b" arrived 50 ms into a 400 ms batch: by its end "b" had waited 350 ms > 300 ms, so it goes at once
    # (timed from when the batcher took it, it would wait another 300 ms).
    assert started_b - queued < 0.4 + 0.15
