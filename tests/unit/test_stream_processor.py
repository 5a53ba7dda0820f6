"""The stream processor's ordering of a batch's end: acks wait for the rest of its effect, which runs in order
beside the next batch; a rest that fails runs its records again, and dead-letters them if they keep failing."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from hybridrag.agents import app, stream_processor
from hybridrag.agents.kafka.schemas import DeadLetter, Query, encode
from hybridrag.agents.settings import Settings
from hybridrag.agents.stream_processor import InOrderTails, process


class FakeStream:
    def __init__(self):
        self.acked: list[int] = []

    async def ack(self, event):
        self.acked.append(event.message.offset)


def events(offsets):
    topic = app.topology["queries"].name
    return [SimpleNamespace(message=SimpleNamespace(
        value=encode(Query(query_id=f"q{o}", text=f"question {o}")), topic=topic, partition=0, offset=o,
        key=f"q{o}".encode(), timestamp=0.0)) for o in offsets]


@pytest.fixture
def dead_letters(monkeypatch):
    monkeypatch.setattr(stream_processor, "settings", Settings(retry_attempts=1, retry_backoff_s=0.0))
    letters: list[DeadLetter] = []

    async def send(key=None, value=None, **kw):
        letters.append(DeadLetter.model_validate_json(value))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    monkeypatch.setattr(app.dead_letter_topics[app.topology["queries"].name], "send", send)
    return letters


async def test_a_batch_is_acked_after_its_rest_and_the_next_batch_computes_meanwhile(dead_letters):
    """Batch 1's rest (its produce acknowledged, say) is held open; batch 2 still computes, and the acks come in
    order, each after its batch's rest."""
    stream, tails, log = FakeStream(), InOrderTails(), []
    release = asyncio.Event()

    async def rest(name):
        if name == "b1":
            await release.wait()
        log.append(f"{name} durable")

    def handler(name):
        async def handle(items):
            log.append(f"{name} computed")
            return rest(name)
        return handle

    await process("query", stream, events([0, 1]), handler("b1"), Query, None, tails)
    assert stream.acked == []  # b1's rest has not finished
    second = asyncio.create_task(process("query", stream, events([2]), handler("b2"), Query, None, tails))
    await asyncio.sleep(0.01)
    assert log == ["b1 computed", "b2 computed"]  # b2 computed while b1 was still finishing
    release.set()
    await second
    await tails.drain()
    assert log == ["b1 computed", "b2 computed", "b1 durable", "b2 durable"]
    assert stream.acked == [0, 1, 2]
    assert not dead_letters


async def test_a_rest_that_fails_runs_the_batch_again_and_dead_letters_what_keeps_failing(dead_letters):
    """The first produce of the batch fails: the batch is answered again and acked. A record whose every produce
    fails is dead-lettered as a processing error, then acked: nothing is lost, nothing retried forever."""
    stream, tails = FakeStream(), InOrderTails()
    attempts: dict[str, int] = {}

    async def rest(ids):
        for i in ids:
            attempts[i] = attempts.get(i, 0) + 1
        if "q1" in ids or attempts[ids[0]] == 1:
            raise ValueError(f"produce failed for {ids}")

    async def handle(items):
        return rest([q.query_id for _, q in items])

    await process("query", stream, events([0, 1]), handle, Query, None, tails)
    await tails.drain()
    assert stream.acked == [0, 1]
    assert attempts["q0"] >= 2  # answered again after the failed produce
    assert [(d.offset, d.error_type) for d in dead_letters] == [(1, "processing")]
    assert "produce failed" in dead_letters[0].reason


async def test_without_tails_the_batch_is_acked_before_process_returns(dead_letters):
    stream = FakeStream()

    async def handle(items):
        return None

    await process("ingest", stream, events([5]), handle, Query, None)
    assert stream.acked == [5]
