"""The worker's timers: follow the serving alias another worker moved, and report consumer lag."""

from __future__ import annotations

import logging

from hybridrag.agents.app import app, settings
from hybridrag.agents.kafka import metrics
from hybridrag.agents.runtime import runtime

log = logging.getLogger("hybridrag")


@app.timer(settings.alias_poll_s)
async def follow_serving_alias():
    """Another worker (sharing a Milvus server) may have promoted a version: follow the alias."""
    if runtime.serving is None or runtime.reindex is not None:
        return
    try:
        # not the ingest lane: a long ingest batch would hold the check back
        info = await runtime.run(runtime.serving_info, lane="memory")
        if info is not None and info.collection != runtime.store.name and runtime.reindex is None:
            target = await runtime.run(runtime.load_serving, info.encoder, info.checkpoint, info.encoder_version,
                                       lane="ingest")
            with runtime.swap_lock:
                runtime.serving = target
            runtime.report_state()
            log.info("following the serving alias to %s", info.collection)
    except Exception as exc:  # the next tick tries again; serving goes on with what it has
        log.warning("cannot follow the serving alias: %s: %s", type(exc).__name__, exc)


@app.timer(5.0)
async def report_lag():
    """Consumer lag per assigned partition: the end of the log minus the committed offset."""
    consumer = app.consumer
    committed = getattr(consumer, "_committed_offset", {})
    for tp in consumer.assignment():
        end = consumer.highwater(tp)
        if end is not None:
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, end - (committed.get(tp) or 0)))
