"""Agents ``learn_from_generated`` and ``adapt_to_documents``: the service learns while it serves.

- Generated documents fill the continual learner's buffer; enough of them, an
  update: the learner fine-tunes the hybrid encoder (MiniLM is the teacher and
  the fallback) in a subprocess.
- Ingested passages fill the domain adapter's buffer; once
  ``learner_adapt_after`` new ones have arrived, a zero-shot domain adaptation
  (:mod:`hybridrag.agents.retention.domain_adaptation`) trains a conv branch on
  the serving encoder in a subprocess at low priority.

Both publish their decision, promoted or rejected, to ``retention-updates``,
where a promotion re-indexes and swaps the alias. Learning is an improvement,
never a reason to stop the stream: a failure is logged and the records are acked.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

from hybridrag.agents.app import app, documents_topic, generated_topic, retention_topic, settings
from hybridrag.agents.kafka import metrics
from hybridrag.agents.kafka.schemas import Document, GeneratedDocument, encode
from hybridrag.agents.runtime import Runtime, runtime
from hybridrag.agents.stream_processor import ack_all, decode_valid, with_retries

log = logging.getLogger("hybridrag")


class Learner:
    """The learner's state in one worker: its buffer (in Redis) and the update running, if any."""

    def __init__(self, rt: Runtime):
        self.runtime = rt
        self.buffer = None
        self.task: asyncio.Task | None = None
        self.idle_logged = False

    def active(self) -> bool:
        """The learner fine-tunes the hybrid encoder; MiniLM is the teacher and the fallback."""
        rt, s = self.runtime, self.runtime.settings
        active = s.learner_enabled and rt.serving is not None and rt.serving.encoder_kind.startswith("hybrid")
        if not active and s.learner_enabled and not self.idle_logged:
            self.idle_logged = True
            log.info("continual learner idle: it fine-tunes the hybrid encoder, and this worker serves %s",
                     rt.encoder.version if rt.encoder else "nothing yet")
        return active

    def buffer_examples(self, docs) -> int:
        from hybridrag.agents.retention.continual_learner import LearnerConfig, TrainingBuffer

        if self.buffer is None:
            self.buffer = TrainingBuffer.from_config(LearnerConfig.from_settings(self.runtime.settings))
        self.buffer.add(docs)
        sizes = self.buffer.sizes()
        for kind, n in sizes.items():
            metrics.LEARNER_BUFFER.labels(kind).set(n)
        return sizes["pairs"]

    async def take(self, events: Sequence) -> None:
        """Buffer a batch's generated documents; start an update in the background once enough are buffered."""
        docs = decode_valid(events, GeneratedDocument, self.runtime.settings.max_document_chars)
        if not docs or not self.active():
            return
        size = await with_retries("learner", lambda: self.runtime.run(self.buffer_examples, docs, lane="memory"))
        if size >= self.runtime.settings.learner_min_examples and (self.task is None or self.task.done()):
            # in the background: buffered examples are in Redis, so the stream's records can be acked now
            self.task = asyncio.create_task(self.update())

    async def update(self) -> None:
        """One update: snapshot the buffer, fine-tune in a subprocess, publish the decision, drop what it used."""
        from hybridrag.agents.retention.continual_learner import (LearnerConfig, gather_replay,
                                                                  run_update_in_subprocess)

        rt = self.runtime
        cfg = LearnerConfig.from_settings(rt.settings)
        buf = self.buffer
        serving = rt.serving
        examples = await rt.run(buf.snapshot, max(cfg.min_examples, 1) * 4, lane="memory")
        replay = None
        if rt.memory is not None and cfg.replay_fraction > 0:
            replay = await rt.run(gather_replay, rt.memory, cfg.replay_pool, serving.store, lane="memory")
        log.info("continual learner: fine-tuning %s on %d examples", serving.encoder.version, len(examples))
        result = await run_update_in_subprocess(serving.checkpoint or None, examples, replay, cfg)
        if result.error:
            metrics.LEARNER_UPDATES.labels("failed").inc()
            log.error("continual learner update failed: %s (the examples stay buffered)", result.error)
            return
        update = result.to_retention_update()
        await (await retention_topic.send(key=update.encoder_version.encode(), value=encode(update)))
        await rt.run(buf.drop, [e.doc_id for e in examples], lane="memory")
        metrics.LEARNER_UPDATES.labels("promoted" if result.promoted else "rejected").inc()
        log.info("continual learner: %s %s (%s)", update.kind, update.encoder_version, result.detail)


learner = Learner(runtime)


@app.agent(generated_topic, name="learn_from_generated")
async def learn_from_generated(stream):
    await runtime.ready(app)
    async for events in stream.noack_take(settings.ingest_batch_max, within=settings.ingest_batch_timeout_s):
        try:
            await learner.take(events)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # learning is an improvement, never a reason to stop the stream
            log.error("continual learner could not buffer %d records: %s: %s", len(events), type(exc).__name__, exc)
        await ack_all(stream, events)


class DomainLearner:
    """Ingested passages in Redis; enough new ones, a domain adaptation of the serving hybrid encoder."""

    def __init__(self, rt: Runtime):
        self.runtime = rt
        self.buffer = None
        self.task: asyncio.Task | None = None

    def active(self) -> bool:
        rt, s = self.runtime, self.runtime.settings
        return s.learner_adapt_after > 0 and rt.serving is not None and rt.serving.encoder_kind.startswith("hybrid")

    def buffer_passages(self, docs: Sequence[Document]) -> int:
        """Chunk the documents as the store does and buffer the chunks; returns the pending count."""
        from hybridrag.agents.rag.chunking import chunk_document
        from hybridrag.agents.retention.domain_adaptation import PassageBuffer

        s = self.runtime.settings
        if self.buffer is None:
            self.buffer = PassageBuffer(s.redis_url, s.redis_prefix, s.learner_adapt_max_passages)
        chunks = [c for d in docs for c in chunk_document(d.doc_id, d.text, d.title, s.chunk_size, s.chunk_overlap)]
        pending = self.buffer.add([(c.id, c.title, c.text) for c in chunks])
        metrics.LEARNER_BUFFER.labels("passages").set(pending)
        return pending

    async def take(self, events: Sequence) -> None:
        docs = decode_valid(events, Document, self.runtime.settings.max_document_chars)
        if not docs or not self.active():
            return
        pending = await with_retries("adapter", lambda: self.runtime.run(self.buffer_passages, docs, lane="memory"))
        if pending >= self.runtime.settings.learner_adapt_after and (self.task is None or self.task.done()):
            self.task = asyncio.create_task(self.update(pending))

    async def update(self, pending: int) -> None:
        """Adapt in a subprocess on every buffered passage, then publish the canary's decision."""
        from hybridrag.agents.retention.continual_learner import LearnerConfig, gather_replay
        from hybridrag.agents.retention.domain_adaptation import AdaptConfig, run_adapt_in_subprocess

        rt, s = self.runtime, self.runtime.settings
        lcfg = LearnerConfig.from_settings(s)
        # general texts replayed: as many as the new passages (at least 32), up to the default
        cfg = AdaptConfig(minutes=s.learner_adapt_minutes, max_passages=s.learner_adapt_max_passages,
                          threads=lcfg.threads, device=s.device, replay=min(AdaptConfig.replay, max(32, pending)))
        serving = rt.serving
        await rt.run(self.buffer.consume, pending, lane="memory")
        replay = []
        if rt.memory is not None:
            r = await rt.run(gather_replay, rt.memory, cfg.replay, serving.store, lane="memory")
            replay = r.texts if r.source == "memory" else []
        log.info("domain adaptation: adapting %s after %d new passages", serving.encoder.version, pending)
        result = await run_adapt_in_subprocess(self.buffer, serving.checkpoint or None, cfg, lcfg, replay)
        if result.error:
            metrics.LEARNER_UPDATES.labels("failed").inc()
            log.error("domain adaptation failed: %s", result.error)
            return
        update = result.to_retention_update()
        await (await retention_topic.send(key=update.encoder_version.encode(), value=encode(update)))
        metrics.LEARNER_UPDATES.labels("promoted" if result.promoted else "rejected").inc()
        log.info("domain adaptation: %s %s (%s)", update.kind, update.encoder_version, result.detail)


domain_learner = DomainLearner(runtime)


@app.agent(documents_topic, name="adapt_to_documents")
async def adapt_to_documents(stream):
    await runtime.ready(app)
    async for events in stream.noack_take(settings.ingest_batch_max, within=settings.ingest_batch_timeout_s):
        try:
            await domain_learner.take(events)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # learning is an improvement, never a reason to stop the stream
            log.error("domain adapter could not buffer %d records: %s: %s", len(events), type(exc).__name__, exc)
        await ack_all(stream, events)
