"""Overlapped batching: pure asyncio, an in-memory handler."""

import asyncio

import pytest

from hybridrag.agents.stream_buffer import Overlapped


def run(coro):
    return asyncio.run(coro)


def test_records_that_arrive_during_a_batch_form_the_next_batch_at_once():
    """While batch 1 computes, three puts arrive; the worker takes all three as batch 2, with no timer between."""
    seen: list[list[int]] = []

    async def scenario():
        release = asyncio.Event()

        async def handle(batch):
            seen.append(list(batch))
            if len(seen) == 1:
                await release.wait()

        async with Overlapped(handle, max_batch=10) as ov:
            await ov.put([1])
            await asyncio.sleep(0)  # the worker starts batch 1
            for r in ([2], [3, 4], [5]):
                await ov.put(r)
            assert ov.pending == 4
            release.set()
            await ov.drain()
            assert ov.batches == 2

    run(scenario())
    assert seen == [[1], [2, 3, 4, 5]]


def test_batches_are_capped_and_keep_arrival_order():
    seen: list[list[int]] = []

    async def scenario():
        async def handle(batch):
            seen.append(list(batch))
            await asyncio.sleep(0.001)

        async with Overlapped(handle, max_batch=3, max_pending=100) as ov:
            await ov.put(list(range(8)))
            await ov.drain()

    run(scenario())
    assert seen == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_put_blocks_when_max_pending_records_wait():
    """Backpressure: the take loop must stop (so Faust stops fetching) while the worker is behind."""

    async def scenario():
        release = asyncio.Event()

        async def handle(batch):
            await release.wait()

        async with Overlapped(handle, max_batch=2, max_pending=4) as ov:
            await ov.put([0, 1])
            await asyncio.sleep(0)  # worker holds [0, 1]
            await ov.put([2, 3, 4, 5])
            blocked = asyncio.create_task(ov.put([6]))
            await asyncio.sleep(0.01)
            assert not blocked.done() and ov.pending == 4
            release.set()
            await asyncio.wait_for(blocked, 1)
            await ov.drain()

    run(scenario())


def test_a_dead_worker_is_reported_to_the_take_loop():
    """A handler that raises stops the worker; the next put says so instead of queueing forever."""

    async def scenario():
        async def handle(batch):
            raise ValueError("boom")

        async with Overlapped(handle, max_batch=2) as ov:
            await ov.put([1])
            await asyncio.sleep(0.01)
            with pytest.raises(RuntimeError, match="worker stopped") as info:
                await ov.put([2])
            assert isinstance(info.value.__cause__, ValueError)

    run(scenario())


def test_leaving_cancels_the_worker_and_leaves_pending_records_unhandled():
    seen = []

    async def scenario():
        release = asyncio.Event()

        async def handle(batch):
            seen.append(list(batch))
            await release.wait()

        async with Overlapped(handle, max_batch=1) as ov:
            await ov.put([1, 2, 3])
            await asyncio.sleep(0.01)
        return ov.pending

    assert run(scenario()) == 2
    assert seen == [[1]]


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError):
        Overlapped(lambda b: None, max_batch=0)
