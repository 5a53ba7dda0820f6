"""Agent ``ingest_documents``: documents are chunked, encoded and upserted into the vector store.

Batches form as the queries' do (:class:`~hybridrag.agents.stream_buffer.Overlapped`): a
document that arrives while the ingest lane is free is indexed at once, in a batch of
one, and the documents that arrive while a batch computes make the next batch, up to
``ingest_batch_max``. So a quiet topic gets fresh documents searchable within a few
milliseconds of their arrival, and a bulk load still runs in full batches.
"""

from __future__ import annotations

import logging

from hybridrag.agents.app import app, documents_topic, settings
from hybridrag.agents.kafka import metrics
from hybridrag.agents.kafka.schemas import Document
from hybridrag.agents.runtime import Runtime, runtime
from hybridrag.agents.stream_buffer import Overlapped
from hybridrag.agents.stream_processor import process

log = logging.getLogger("hybridrag")


@app.agent(documents_topic, name="ingest_documents")
async def ingest_documents(stream):
    await runtime.ready(app)

    async def ingest(events: list) -> None:
        await process("ingest", stream, events, lambda items: index_documents(runtime, items), Document,
                      settings.max_document_chars)

    async with Overlapped(ingest, max_batch=settings.ingest_batch_max) as batches:
        async for events in stream.noack_take(settings.ingest_batch_max, within=settings.ingest_batch_timeout_s):
            await batches.put(events)


async def index_documents(rt: Runtime, items: list) -> None:
    """Index a batch of ``(event, Document)`` in the ingest lane, then record it with the memory manager."""
    res = await rt.run(rt.ingest_documents, [doc for _, doc in items], lane="ingest")
    metrics.CHUNKS_INDEXED.inc(res.chunks)
    if rt.memory is not None:
        await rt.run(remember_ingest, rt, res.rows, lane="memory")
    log.info("indexed %d documents, %d chunks (%s)", res.documents, res.chunks,
             ", ".join(f"{k} {v:.0f}ms" for k, v in res.timings_ms.items()))


def remember_ingest(rt: Runtime, rows) -> None:
    """Record indexed documents, then evict under the capacity limit. Degrades, never fails."""
    from hybridrag.agents.retention.memory_manager import DocRecord, MemoryUnavailable

    s = rt.settings
    try:
        rt.memory.record_ingest(DocRecord.from_rows(rows))
        if s.memory_capacity_docs or s.memory_capacity_bytes:
            evicted = rt.memory.evict(rt)  # deletes reach a collection being rebuilt too
            if evicted:
                metrics.EVICTIONS.labels(s.memory_policy).inc(len(evicted))
                log.info("evicted %d documents (%s)", len(evicted), s.memory_policy)
    except MemoryUnavailable as exc:
        log.warning("memory manager unavailable, ingest continues: %s", exc)
