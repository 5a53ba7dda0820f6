"""Agent ``apply_retention_updates``: a promoted encoder re-indexes the corpus into its own collection, then swaps.

Other updates (rejections, memory events, ``reindexed``) are logged.
"""

from __future__ import annotations

import logging

from hybridrag.agents.app import app, retention_topic
from hybridrag.agents.kafka import metrics
from hybridrag.agents.kafka.schemas import RetentionUpdate, encode
from hybridrag.agents.runtime import Runtime, runtime
from hybridrag.agents.stream_processor import process

log = logging.getLogger("hybridrag")


@app.agent(retention_topic, name="apply_retention_updates")
async def apply_retention_updates(stream):
    await runtime.ready(app)
    async for events in stream.noack_take(1, within=1.0):
        await process("retention", stream, events, lambda items: apply_updates(runtime, items), RetentionUpdate, None)


async def apply_updates(rt: Runtime, items: list) -> None:
    for _, update in items:
        if update.kind == "encoder-promoted":
            await rebuild_for(rt, update)
        else:
            log.info("retention update: %s %s %s", update.kind, update.encoder_version, update.detail)


async def rebuild_for(rt: Runtime, update: RetentionUpdate) -> None:
    """Re-encode the corpus for a promoted encoder into its own collection, then swap."""
    old = rt.encoder.version
    if update.encoder_version == old:
        if rt.store.has_lexical:
            log.info("encoder %s already serves; nothing to re-index", old)
            return
        log.info("encoder %s serves %s, which has no lexical index: rebuilding it", old, rt.store.name)
    kind = "hybrid" if update.checkpoint else "original"
    rebuild, target = await rt.run(rt.start_reindex, kind, update.checkpoint, update.encoder_version, lane="ingest")
    log.info("re-indexing %d rows: %s -> %s", rebuild.total, old, update.encoder_version)
    try:
        while not rebuild.done:
            await rt.run(rebuild.copy_slice, lane="ingest")
        rows, _ = await rt.run(rt.finish_reindex, rebuild, target, lane="ingest")
    except BaseException:
        rt.abort_reindex()
        raise
    done = RetentionUpdate(kind="reindexed", encoder_version=update.encoder_version,
                           metrics={**rebuild.progress(), "rows": float(rows)}, checkpoint=update.checkpoint,
                           detail=f"serving alias moved from {old}")
    await (await retention_topic.send(key=update.encoder_version.encode(), value=encode(done)))
    metrics.REINDEXES.inc()
    log.info("re-indexed %d rows in %.1fs; now serving %s", rows, done.metrics["seconds"], update.encoder_version)
