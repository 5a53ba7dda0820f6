"""Agent ``answer_queries``: batches of queries are encoded, retrieved, answered and published to ``answers``.

With ``query_overlap`` the next batch is taken while the current one runs
(:mod:`hybridrag.agents.stream_buffer`). A batch's end (its answers acknowledged
by the broker, its hits counted in Redis, then its acks) runs beside the next
batch's compute, in order (:class:`~hybridrag.agents.stream_processor.InOrderTails`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable

from hybridrag.agents.app import answers_topic, app, queries_topic, settings
from hybridrag.agents.kafka import metrics
from hybridrag.agents.kafka.schemas import Query, encode
from hybridrag.agents.runtime import Runtime, runtime
from hybridrag.agents.stream_buffer import Overlapped
from hybridrag.agents.stream_processor import InOrderTails, process

log = logging.getLogger("hybridrag")


@app.agent(queries_topic, name="answer_queries")
async def answer_queries(stream):
    await runtime.ready(app)
    tails = InOrderTails()

    async def answer(events: list) -> None:
        await process("query", stream, events, lambda items: answer_batch(runtime, items), Query,
                      settings.max_query_chars, tails)

    takes = stream.noack_take(settings.query_batch_max, within=settings.query_batch_timeout_s)
    try:
        if not settings.query_overlap:
            async for events in takes:
                await answer(events)
            return
        async with Overlapped(answer, max_batch=settings.query_batch_max) as batches:
            async for events in takes:
                await batches.put(events)
    finally:
        tails.cancel()  # a batch not yet acked goes back to the group


async def answer_batch(rt: Runtime, items: list) -> Awaitable[None]:
    """Answer a batch of ``(event, Query)`` and hand the answers to the producer.

    Returns the rest of the batch's effect, which the queries' acks wait for: the
    answers acknowledged by the broker (durable), then the hits counted.
    """
    now = time.time()
    waits = [max(0.0, (now - ev.message.timestamp) * 1e3) for ev, _ in items]
    serving = rt.serving  # one encoder and the collection it built, for the whole batch
    answers_out = await rt.run(serving.query.answer_batch, [q for _, q in items], waits)
    futures = [await answers_topic.send(key=ans.query_id.encode(), value=encode(ans)) for ans in answers_out]
    log.info("answered %d queries", len(answers_out), extra={
        "query_ids": [a.query_id for a in answers_out],
        "compute_ms": answers_out[0].timings_ms.get("compute") if answers_out else None,
    })
    return answers_durable(rt, items, answers_out, futures)


async def answers_durable(rt: Runtime, items: list, answers_out: list, futures: list) -> None:
    await asyncio.gather(*futures)
    done = time.time()
    for ev, _ in items:
        metrics.ANSWER_LATENCY.observe(max(0.0, done - ev.message.timestamp))
    if rt.memory is not None:
        await rt.run(remember_hits, rt, [(record_position(ev), q.text) for ev, q in items], answers_out,
                     lane="memory")


def record_position(event):
    """The Kafka position of a query's record, which makes counting its hits idempotent on replay."""
    from hybridrag.agents.retention.memory_manager import RecordPosition

    msg = event.message
    return RecordPosition(settings.app_id, msg.topic, msg.partition, msg.offset)


def remember_hits(rt: Runtime, queries, answers_out) -> None:
    """Count retrievals and citations per document, one round trip a batch.

    ``queries`` are (position, text), in offset order per partition.
    """
    from hybridrag.agents.retention.memory_manager import MemoryUnavailable

    try:
        rt.memory.record_hits_many([(ans.sources, position, text) for (position, text), ans in zip(queries, answers_out)])
    except MemoryUnavailable as exc:
        # answering goes on; the updates are buffered and replayed when Redis is back
        log.warning("memory manager unavailable, answering continues: %s", exc)
        metrics.MEMORY_DEGRADED.inc(len(answers_out))
