"""Agent ``synthesize_documents``: for a sample of the queries, synthetic documents from the diffusion models.

It reads the queries beside the answer path (its own stream, its own executor
lane) and publishes every sample, kept or dropped, to ``generated-documents``.
It never dead-letters a query: the answer agent owns that.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Sequence

from hybridrag.agents.app import app, generated_topic, queries_topic, settings
from hybridrag.agents.kafka import metrics
from hybridrag.agents.kafka.schemas import GeneratedDocument, Query, encode
from hybridrag.agents.runtime import Runtime, runtime
from hybridrag.agents.stream_processor import ack_all, decode_valid, with_retries
from hybridrag.agents.synthesis.synthesizer import generated_document

log = logging.getLogger("hybridrag")


@app.agent(queries_topic, name="synthesize_documents")
async def synthesize_documents(stream):
    await runtime.ready(app)
    async for events in stream.noack_take(settings.synth_batch_max * 8, within=settings.synth_batch_timeout_s):
        if settings.synth_sample_rate > 0:
            await synthesize_sampled(runtime, events)
        await ack_all(stream, events)


def sampled(query_id: str, rate: float) -> bool:
    """A stable coin flip per query id: a replayed query is sampled again, or again not."""
    if rate <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(query_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < rate


async def synthesize_sampled(rt: Runtime, events: Sequence) -> None:
    """Synthesize for the sampled queries of a batch and publish the samples; a failure costs only the samples."""
    s = rt.settings
    picked = [q for q in decode_valid(events, Query, s.max_query_chars) if sampled(q.query_id, s.synth_sample_rate)]
    if not picked:
        return
    t0 = time.perf_counter()
    try:
        docs = await with_retries("synth", lambda: rt.run(synthesize, rt, picked, lane="synth"))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        metrics.SYNTH_FAILURES.inc(len(picked))
        log.error("synthesis failed for %d queries (%s: %s); their answers are unaffected", len(picked),
                  type(exc).__name__, exc, extra={"query_ids": [q.query_id for q in picked]})
        return
    futures = [await generated_topic.send(key=d.query_id.encode(), value=encode(d)) for d in docs]
    await asyncio.gather(*futures)
    kept = sum(d.kept for d in docs)
    metrics.SYNTH_SAMPLES.labels("kept").inc(kept)
    metrics.SYNTH_SAMPLES.labels("dropped").inc(len(docs) - kept)
    log.info("synthesized %d samples for %d queries, %d kept (%.0f ms)", len(docs), len(picked), kept,
             (time.perf_counter() - t0) * 1e3)


def synthesize(rt: Runtime, queries: list[Query]) -> list[GeneratedDocument]:
    """The synthesizer's samples for ``queries`` as the records ``generated-documents`` carries (synth lane)."""
    s = rt.settings
    synth = rt.build_synthesizer()
    serving = rt.serving
    # the text model rewrites passages retrieved for the query toward it (SDEdit); real documents only
    hits = serving.store.search(serving.encoder.encode([q.text for q in queries]), s.synth_samples,
                                tenant=[q.tenant for q in queries], include_synthetic=False)
    contexts = [[h.text for h in hs] for hs in hits]
    samples = synth.synthesize([(q.query_id, q.text) for q in queries], n_per_query=s.synth_samples,
                               contexts=contexts)
    tenants = {q.query_id: q.tenant for q in queries}
    return [generated_document(d, tenants.get(d.query_id, "")) for d in samples]

