"""Agent ``index_generated``: kept synthetic text documents are indexed (``synthetic=true``) beside the real ones."""

from __future__ import annotations

import logging

from hybridrag.agents.app import app, generated_topic, settings
from hybridrag.agents.kafka import metrics
from hybridrag.agents.kafka.schemas import GeneratedDocument
from hybridrag.agents.runtime import Runtime, runtime
from hybridrag.agents.stream_processor import process

log = logging.getLogger("hybridrag")


@app.agent(generated_topic, name="index_generated")
async def index_generated(stream):
    await runtime.ready(app)
    async for events in stream.noack_take(settings.ingest_batch_max, within=settings.ingest_batch_timeout_s):
        await process("generated", stream, events, lambda items: index_kept(runtime, items), GeneratedDocument,
                      settings.max_document_chars)


async def index_kept(rt: Runtime, items: list) -> None:
    """Index the kept samples with text of a batch of ``(event, GeneratedDocument)``."""
    docs = [d for _, d in items if d.kept and d.text.strip()]
    if not docs:
        return
    rows = await rt.run(rt.index_generated, docs, lane="ingest")
    metrics.CHUNKS_INDEXED.inc(len(rows))
    if rt.memory is not None:
        await rt.run(remember_generated, rt, rows, docs, lane="memory")
    log.info("indexed %d synthetic documents", len(rows))


def remember_generated(rt: Runtime, rows, docs) -> None:
    """Record synthetic documents with the memory manager, their query similarity as their quality."""
    from hybridrag.agents.retention.memory_manager import DocRecord, MemoryUnavailable

    quality = {d.doc_id: min(1.0, max(0.0, d.scores.get("query_similarity", 0.0))) for d in docs}
    try:
        rt.memory.record_ingest(DocRecord.from_rows(rows, quality=quality))
    except MemoryUnavailable as exc:
        log.warning("memory manager unavailable, synthetic documents indexed without a record: %s", exc)
