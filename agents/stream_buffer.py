"""Overlapped micro-batching: the stream keeps taking while a batch computes.

Faust's ``stream.take(n, within=t)`` starts its ``within`` timer when the previous batch
has been handled. An agent that computes inside the ``async for`` body therefore runs
a cycle of *compute, then wait t*: a query that arrives as a batch starts waits for that
batch, then for the timer, then for its own batch, and the model sits idle during every
timer even when queries are queued.

:class:`Overlapped` takes the compute out of the body. The take loop only hands its
records over; one worker task handles them, one batch at a time, in arrival order. When
the worker is free it takes everything that has arrived (up to ``max_batch``) at once,
so a queued query waits for at most the batch in front of it, never for an idle timer.
This is the dynamic batching of inference servers (Triton's, for one) on top of Faust's
StreamBuffer. A batch's produce and acks still run in the worker, before the next batch.

Backpressure: once ``max_pending`` records wait, :meth:`Overlapped.put` blocks, so the
take loop stops and Faust stops fetching. Records are acked by the handler after their
batch, so a crash or a revocation leaves the unhandled ones uncommitted for the next owner.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Sequence


class Overlapped:
    """One worker task that handles the records :meth:`put` hands it, in batches of up to ``max_batch``."""

    def __init__(self, handle: Callable[[list], Awaitable[None]], max_batch: int, max_pending: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.handle = handle
        self.max_batch = max_batch
        self.max_pending = max(max_pending or 2 * max_batch, max_batch)
        self._pending: list[Any] = []
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._busy = False
        self.batches = 0  # handled so far; for tests and logs

    async def __aenter__(self) -> "Overlapped":
        self._task = asyncio.create_task(self._work(), name="overlapped-batches")
        return self

    async def __aexit__(self, *exc) -> None:
        # a stopping agent: what is still pending stays unacked and goes back to the group
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def put(self, records: Sequence[Any]) -> None:
        """Queue records for the worker; waits while ``max_pending`` are queued. Re-raises a dead worker's error."""
        while True:
            self._raise_if_dead()
            if len(self._pending) < self.max_pending:
                break
            self._room.clear()
            waiter = asyncio.ensure_future(self._room.wait())
            try:
                await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        self._pending.extend(records)
        if self._pending:
            self._arrived.set()

    async def drain(self) -> None:
        """Wait until every record put so far has been handled (for tests)."""
        while self._pending or self._busy:
            self._raise_if_dead()
            await asyncio.sleep(0.001)

    def _raise_if_dead(self) -> None:
        if self._task is None:
            raise RuntimeError("Overlapped used outside 'async with'")
        if self._task.done():
            exc = None if self._task.cancelled() else self._task.exception()
            raise RuntimeError("the batch worker stopped") from exc

    async def _work(self) -> None:
        while True:
            await self._arrived.wait()
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            if not self._pending:
                self._arrived.clear()
            self._room.set()
            self._busy = True
            try:
                await self.handle(batch)
            finally:
                self._busy = False
            self.batches += 1
