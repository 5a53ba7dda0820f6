"""The Faust app and its agents.

    documents ─▶ ingest_documents ─▶ chunk ─▶ encode ─▶ Milvus upsert
    queries   ─▶ answer_queries   ─▶ take(n, within=t) ─▶ encode ─▶ retrieve ─▶ generate ─▶ answers

Run it with ``hybridrag worker`` or ``faust -A agents.app worker``.

Delivery is at-least-once with idempotent effects. Agents take batches with
``noack_take`` and ack each record only after its effect is durable (the
answer produced and acknowledged by the broker, the vectors upserted) or
after it went to the dead-letter topic. A stopped or crashed worker hands its
unacked batch back to the group. No exception escapes an agent: Faust acks a
record whose agent raised, which would drop it silently.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import faust
import numpy as np

from agents import metrics
from agents.batching import Overlapped
from agents.schemas import (Document, GeneratedDocument, MessageError, Query, RetentionUpdate, dead_letter, decode,
                            encode)
from agents.settings import Settings

log = logging.getLogger("hybridrag")
T = TypeVar("T")


@dataclass(frozen=True)
class Serving:
    """The encoder and the collection it built, swapped together: a batch reads this once."""

    encoder: Any
    store: Any
    ingest: Any
    query: Any
    encoder_kind: str
    checkpoint: str


class Runtime:
    """The models and stores of one worker process, built once on first use."""

    def __init__(self, settings: Settings):
        self.settings = settings
        # torch and Milvus run in these threads, so the event loop stays free for
        # heartbeats, polls and produces. Queries get their own lane: a large
        # ingest batch must not hold answers back behind it.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridrag-query")
        self.ingest_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridrag-ingest")
        # Redis calls of the memory manager: never in the way of the model lanes
        self.memory_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridrag-memory")
        # the diffusion models: beside the answer path, never in it
        self.synth_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridrag-synth")
        self.memory = None
        self.synthesizer = None
        self.generator = None
        self.reindex = None  # the rebuild in progress, if any (agents.reindex.Reindex)
        # taken to start or finish a rebuild and by deletes, so a delete never misses the new collection
        self.swap_lock = threading.RLock()
        self._ready: asyncio.Future | None = None
        self.serving: Serving | None = None

    # the current serving pair's parts, for code that needs no consistency across a swap
    @property
    def encoder(self):
        return self.serving.encoder if self.serving else None

    @property
    def store(self):
        return self.serving.store if self.serving else None

    async def ready(self, app: faust.App) -> "Runtime":
        if self._ready is None:
            self._ready = asyncio.get_running_loop().run_in_executor(self.executor, self._build)
        try:
            await self._ready
        except Exception as exc:
            # a worker without its models or store can do nothing useful: stop
            # it loudly instead of letting the supervisor restart agents forever
            log.critical("cannot start the runtime: %s: %s", type(exc).__name__, exc)
            await app.crash(exc)
            raise
        return self

    def load_serving(self, encoder_kind: str, checkpoint: str, expect_version: str | None = None) -> Serving:
        """Load an encoder and open (or create) the collection of its version."""
        from agents.encoders import load_encoder
        from agents.store import VectorStore

        s = self.settings
        encoder = load_encoder(encoder_kind, device=s.device, checkpoint=checkpoint or None)
        # a version names the weights; "-int8" only says how this worker runs them
        if expect_version is not None and encoder.version.removesuffix("-int8") != expect_version.removesuffix("-int8"):
            raise ValueError(f"{encoder_kind} encoder {checkpoint or '(default)'} is version {encoder.version}, "
                             f"not {expect_version}")
        store = VectorStore(s.milvus_uri, s.collection, encoder.version, encoder.dim,
                            s.milvus_token.get_secret_value(), encoder=encoder_kind, checkpoint=checkpoint,
                            hubness_k=s.hubness_k, hubness_refresh_growth=s.hubness_refresh_growth)
        return self.make_serving(encoder, store, encoder_kind, checkpoint)

    def make_serving(self, encoder, store, encoder_kind: str, checkpoint: str) -> Serving:
        from agents.pipeline import IngestPipeline, QueryPipeline, TopKRetriever

        s = self.settings
        if s.retriever == "adaptive":
            from agents.retriever import AdaptiveConfig, AdaptiveRetriever

            retriever = AdaptiveRetriever(store, encoder, AdaptiveConfig.from_settings(s))
        else:
            retriever = TopKRetriever(store, s.min_score)
        if s.expand:
            from agents.synthesis import ExpansionConfig, ExpandingRetriever, load_prior

            retriever = ExpandingRetriever(retriever, load_prior(encoder), ExpansionConfig(
                k=s.expand_k, weight=s.expand_weight, steps=s.expand_steps, guidance=s.expand_guidance,
                gate_threshold=s.expand_gate or None, seed=None))
        ingest = IngestPipeline(encoder, store, s.chunk_size, s.chunk_overlap)
        query = QueryPipeline(encoder, retriever, self.generator, s.top_k, s.max_top_k)
        return Serving(encoder, store, ingest, query, encoder_kind, checkpoint)

    def _build(self) -> None:
        import torch

        from agents.generator import make_generator
        from agents.store import milvus_client, resolve_serving

        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        t0 = time.perf_counter()
        self.generator = make_generator(s)
        info = resolve_serving(s.milvus_uri, s.collection, s.milvus_token.get_secret_value(),
                               client=milvus_client(s.milvus_uri, s.milvus_token.get_secret_value()))
        if info is None:
            # a new deployment: the configured encoder builds the first collection
            self.serving = self.load_serving(s.encoder, s.encoder_checkpoint)
            self.serving.store.point_alias()
        else:
            # the alias records the version that was promoted last; it wins over the setting,
            # which chooses the encoder of a new deployment (`hybridrag reindex` switches one)
            if info.encoder != s.encoder:
                log.warning("the serving collection %s was built by the %s encoder; HYBRIDRAG_ENCODER=%s applies to a "
                            "new deployment (switch this one with `hybridrag reindex --encoder %s`)",
                            info.collection, info.encoder, s.encoder, s.encoder)
            self.serving = self.load_serving(info.encoder, info.checkpoint, expect_version=info.encoder_version)
        if s.memory_enabled:
            from agents.memory import MemoryConfig, MemoryManager, MemoryUnavailable

            self.memory = MemoryManager(MemoryConfig.from_settings(s))
            try:
                # finish evictions a crash interrupted: nothing dangling in the store or Redis
                self.memory.recover(self.store)
            except MemoryUnavailable as exc:
                log.warning("memory manager degraded at start: %s", exc)
        metrics.ENCODER_INFO.labels(self.encoder.version).set(1)
        log.info(
            "runtime ready in %.1fs: encoder %s, collection %s (%d rows)",
            time.perf_counter() - t0, self.encoder.version, self.store.name, self.store.count(),
        )

    def build_synthesizer(self):
        """The diffusion models for the serving encoder, loaded on first use (in the synth lane)."""
        from agents.quality_filter import FilterConfig
        from agents.synthesis import SynthesisConfig, Synthesizer, load_prior, load_text_model

        s = self.settings
        serving = self.serving
        if self.synthesizer is None or self.synthesizer.encoder is not serving.encoder:
            try:
                prior = load_prior(serving.encoder)
            except (FileNotFoundError, ValueError) as exc:
                log.warning("synthesizer without the embedding prior: %s", exc)
                prior = None
            store = serving.store

            def store_search(vecs):
                # near-duplicates of what the store already holds (the default tenant's documents)
                return np.array([hs[0].score if hs else 0.0 for hs in store.search(vecs, 1)], dtype=np.float32)

            self.synthesizer = Synthesizer(
                serving.encoder, load_text_model(), prior,
                FilterConfig(min_query_similarity=s.synth_min_query_similarity),
                SynthesisConfig(text_steps=s.synth_text_steps, strength=s.synth_strength, prior_steps=s.synth_prior_steps,
                                guidance=s.synth_guidance, seed=None),
                store_search=store_search,
            )
        return self.synthesizer

    def delete(self, ids: list[str]) -> int:
        """Delete from the serving collection, and from the one being rebuilt if any (memory evictions)."""
        with self.swap_lock:
            rebuild = self.reindex
            if rebuild is not None:
                return rebuild.delete(ids)
            return self.serving.store.delete(ids)

    # ------------------------------------------------------------ writes (ingest lane)

    def ingest_documents(self, docs):
        """Index documents in the serving collection, and in the one being rebuilt if any."""
        with self.swap_lock:
            rebuild = self.reindex
            if rebuild is None:
                return self.serving.ingest.ingest_batch(docs)
            with rebuild.lock:
                res = self.serving.ingest.ingest_batch(docs)
                rebuild.write_rows(res.rows)
                n_chunks: dict[str, int] = {}
                for r in res.rows:
                    n_chunks[r.doc_id] = n_chunks.get(r.doc_id, 0) + 1
                rebuild.delete_stale_chunks(n_chunks)
                return res

    def index_generated(self, docs) -> list:
        """Index kept synthetic text documents (``synthetic=true``); returns the rows written."""
        from agents.store import Row

        with self.swap_lock:
            serving = self.serving
            need = [d for d in docs if d.encoder_version != serving.encoder.version or not d.embedding]
            fresh = dict(zip((d.doc_id for d in need), serving.encoder.encode([d.text for d in need])))
            rows = [
                Row(f"{d.doc_id}#0", d.doc_id, 0, d.text,
                    fresh[d.doc_id] if d.doc_id in fresh else np.asarray(d.embedding, dtype=np.float32),
                    title=f"synthetic: {d.query[:200]}" if d.query else "synthetic", tenant=d.tenant, synthetic=True)
                for d in docs
            ]
            serving.store.upsert(rows)
            if self.reindex is not None:
                self.reindex.write_rows(rows)
            return rows

    def start_reindex(self, encoder_kind: str, checkpoint: str, version: str):
        """Open the new version's collection and snapshot the serving one; dual writes start here."""
        from agents.reindex import Reindex

        target = self.load_serving(encoder_kind, checkpoint, expect_version=version)
        if target.store.name == self.serving.store.name:
            raise ValueError(f"{version} already serves from {target.store.name}")
        # what an interrupted earlier attempt wrote is not to be trusted: start empty
        target.store.recreate()
        with self.swap_lock:
            if self.reindex is not None:
                raise RuntimeError(f"a re-index into {self.reindex.target.name} is already running")
            self.reindex = Reindex(self.serving.store, target.store, target.encoder, self.settings.reindex_batch)
        return self.reindex, target

    def finish_reindex(self, rebuild, target: Serving) -> tuple[int, int]:
        """Swap: alias and serving pair together, once the counts agree (and the new rows' hubness is exact)."""
        rebuild.target.refresh_hubness()
        with self.swap_lock, rebuild.lock:
            counts = rebuild.verify()
            target.store.point_alias()
            self.serving = target
            self.reindex = None
        metrics.ENCODER_INFO.labels(target.encoder.version).set(1)
        return counts

    def serving_info(self):
        from agents.store import resolve_serving

        s = self.settings
        return resolve_serving(s.milvus_uri, s.collection, s.milvus_token.get_secret_value(), client=self.store.client)

    def abort_reindex(self) -> None:
        with self.swap_lock:
            self.reindex = None

    async def run(self, fn: Callable[..., T], *args: Any, lane: str = "query") -> T:
        pool = {"ingest": self.ingest_executor, "memory": self.memory_executor,
                "synth": self.synth_executor}.get(lane, self.executor)
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


def sampled(query_id: str, rate: float) -> bool:
    """A stable coin flip per query id: a replayed query is sampled again, or again not."""
    if rate <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(query_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < rate


def is_transient(exc: BaseException) -> bool:
    """Errors of the infrastructure (worth waiting out), as opposed to errors of a record."""
    from pymilvus.exceptions import MilvusException

    from agents.generator import GeneratorError

    if isinstance(exc, GeneratorError):
        return exc.transient
    if isinstance(exc, MilvusException):
        return True
    try:
        import redis

        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False  # a missing checkpoint does not come back by waiting
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


def _faust_broker_credentials(s: Settings):
    if s.kafka_security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=s.kafka_sasl_username,
            password=s.kafka_sasl_password.get_secret_value(),
            ssl_context=s.ssl_context(),
            mechanism=s.kafka_sasl_mechanism,
        )
    if s.kafka_security_protocol == "SSL":
        return faust.SSLCredentials(s.ssl_context())
    return None


def faust_settings(s: Settings) -> dict:
    """Keyword arguments for ``faust.App`` from our settings."""
    servers = s.kafka_bootstrap_servers or "127.0.0.1:9092"
    return dict(
        broker=[f"kafka://{h.strip()}" for h in servers.split(",") if h.strip()],
        broker_credentials=_faust_broker_credentials(s),
        value_serializer="raw",
        key_serializer="raw",
        # read from the beginning of a partition the group has never committed,
        # so records published before the worker joined are answered
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=s.kafka_session_timeout_s,
        broker_rebalance_timeout=s.kafka_rebalance_timeout_s,
        broker_heartbeat_interval=s.kafka_heartbeat_interval_s,
        broker_commit_interval=s.kafka_commit_interval_s,
        broker_max_poll_interval=s.kafka_max_poll_interval_s,
        producer_acks=-1,  # an answer counts as produced once all in-sync replicas have it
        topic_disable_leader=True,
        topic_allow_declare=False,  # topics come from topics.yaml via `hybridrag topics create`
        web_enabled=True,
        web_port=s.web_port,
        web_host=s.web_host,
        web_bind=s.web_host,
        # we do not use tables, so no changelog topics or RocksDB
        store="memory://",
        # Faust's default waits on stop and on every revocation until each
        # message a stream took is acked. A query goes to two agents (the answer
        # path and the synthesizer), and a message counts as acked only when
        # both have acked it; the queue flush at stop or revocation discards the
        # copy the other agent had not taken yet, so the wait never ends (seen as
        # workers that hang on SIGTERM and stall in a rebalance). Unacked records
        # are not committed either way: they are redelivered to the next owner,
        # and answers and upserts are idempotent (at least once).
        stream_wait_empty=False,
    )


def _transport_with_fetch_wait(fetch_max_wait_ms: int):
    """Faust's aiokafka transport with the consumer's fetch wait made configurable.

    Faust hard-codes ``fetch_max_wait_ms=1500``. A broker that holds a fetch
    for its whole window when little data is waiting (Tansu does) then adds up
    to that much latency to every lightly loaded hop; on Apache Kafka a fetch
    returns as soon as data arrives, so a short wait costs only idle polls.
    """
    from faust.transport.drivers import aiokafka as faust_aiokafka

    class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport):
            consumer = super()._create_worker_consumer(transport)
            consumer._fetch_max_wait_ms = fetch_max_wait_ms  # read when the fetcher starts
            return consumer

    class Consumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self):
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    class Transport(faust_aiokafka.Transport):
        pass

    Transport.Consumer = Consumer
    return Transport


class HybridApp(faust.App):
    fetch_max_wait_ms: int = 1500

    def _new_transport(self):
        return _transport_with_fetch_wait(self.fetch_max_wait_ms)(self.conf.broker_consumer, self)


def create_app(settings: Settings | None = None) -> faust.App:
    s = settings or Settings()
    topo = s.topology
    app = HybridApp(s.app_id, **faust_settings(s))
    app.fetch_max_wait_ms = s.kafka_fetch_max_wait_ms
    runtime = Runtime(s)
    app.runtime = runtime  # type: ignore[attr-defined]

    def topic(name: str) -> faust.TopicT:
        return app.topic(name, value_type=bytes, key_type=bytes, value_serializer="raw", key_serializer="raw")

    documents = topic(topo["documents"].name)
    queries = topic(topo["queries"].name)
    answers = topic(topo["answers"].name)
    generated = topic(topo["generated-documents"].name)
    retention = topic(topo["retention-updates"].name)
    dlq = {spec.name: topic(spec.dlq) for spec in topo.topics.values()}

    async def send_dead_letter(event, reason: str, error_type: str) -> None:
        msg = event.message
        record = dead_letter(
            msg.value, reason=reason, error_type=error_type, topic=msg.topic, partition=msg.partition,
            offset=msg.offset, key=msg.key, worker=app.conf.id,
        )
        fut = await dlq[msg.topic].send(key=msg.key, value=encode(record))
        await fut
        metrics.DEAD_LETTERS.labels(msg.topic, error_type).inc()
        log.warning("dead-lettered %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, reason,
                    extra={"topic": msg.topic, "partition": msg.partition, "offset": msg.offset,
                           "key": msg.key.decode("utf-8", "replace") if msg.key else None})

    def decode_events(events, model, max_text_chars):
        good, bad = [], []
        for ev in events:
            try:
                good.append((ev, decode(model, ev.message.value, max_bytes=s.max_message_bytes, max_text_chars=max_text_chars)))
            except MessageError as e:
                bad.append((ev, e.reason))
        return good, bad

    async def with_retries(agent: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Retry ``fn`` with exponential backoff.

        A transient error (store or broker unreachable, endpoint overloaded) is
        retried until it passes: the batch stays unacked, so an outage delays
        records but never drops or dead-letters them. Any other error is
        retried ``retry_attempts`` times, then propagates to be isolated and
        dead-lettered.
        """
        delay = s.retry_backoff_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return await fn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                transient = is_transient(exc)
                if not transient and attempt >= s.retry_attempts:
                    raise
                metrics.RETRIES.labels(agent).inc()
                log.warning("%s: attempt %d failed (%s: %s), %s in %.2fs", agent, attempt, type(exc).__name__, exc,
                            "transient, retrying" if transient else "retrying", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, s.retry_backoff_max_s)

    async def process(agent: str, stream, events: Sequence, handle: Callable[[list], Awaitable[None]], model, max_chars):
        """Decode, dead-letter the bad records, run ``handle`` on the good ones, then ack all."""
        metrics.BATCH_SIZE.labels(agent).observe(len(events))
        good, bad = decode_events(events, model, max_chars)
        for ev, reason in bad:
            await send_dead_letter(ev, reason, "validation")
        if good:
            try:
                await with_retries(agent, lambda: handle(good))
            except asyncio.CancelledError:
                raise  # stopping: the unacked batch goes back to the group
            except Exception as exc:
                if len(good) == 1:
                    await send_dead_letter(good[0][0], f"{type(exc).__name__}: {exc}", "processing")
                else:
                    # isolate the poison: one bad record must not dead-letter its batch
                    log.warning("%s: batch of %d failed, retrying one by one", agent, len(good))
                    for item in good:
                        try:
                            await with_retries(agent, lambda item=item: handle([item]))
                        except asyncio.CancelledError:
                            raise
                        except Exception as one_exc:
                            await send_dead_letter(item[0], f"{type(one_exc).__name__}: {one_exc}", "processing")
        for ev in events:
            await stream.ack(ev)
        metrics.PROCESSED.labels(agent).inc(len(events))

    def remember_ingest(rows) -> None:
        """Record indexed documents, then evict under the capacity limit. Degrades, never fails."""
        from agents.memory import DocRecord, MemoryUnavailable

        try:
            runtime.memory.record_ingest(DocRecord.from_rows(rows))
            if s.memory_capacity_docs or s.memory_capacity_bytes:
                evicted = runtime.memory.evict(runtime)  # deletes reach a collection being rebuilt too
                if evicted:
                    metrics.EVICTIONS.labels(s.memory_policy).inc(len(evicted))
                    log.info("evicted %d documents (%s)", len(evicted), s.memory_policy)
        except MemoryUnavailable as exc:
            log.warning("memory manager unavailable, ingest continues: %s", exc)

    def remember_hits(queries, answers_out) -> None:
        """Count retrievals and citations per document; idempotent per query id on replay."""
        from agents.memory import MemoryUnavailable

        for (query_id, text), ans in zip(queries, answers_out):
            try:
                runtime.memory.record_hits(query_id, ans.sources, query=text)
            except MemoryUnavailable as exc:
                # answering goes on; the update is buffered and replayed when Redis is back
                log.warning("memory manager unavailable, answering continues: %s", exc)
                metrics.MEMORY_DEGRADED.inc()

    async def handle_documents(items: list) -> None:
        res = await runtime.run(runtime.ingest_documents, [doc for _, doc in items], lane="ingest")
        metrics.CHUNKS_INDEXED.inc(res.chunks)
        if runtime.memory is not None:
            await runtime.run(remember_ingest, res.rows, lane="memory")
        log.info("indexed %d documents, %d chunks (%s)", res.documents, res.chunks,
                 ", ".join(f"{k} {v:.0f}ms" for k, v in res.timings_ms.items()))

    async def handle_queries(items: list) -> None:
        now = time.time()
        waits = [max(0.0, (now - ev.message.timestamp) * 1e3) for ev, _ in items]
        serving = runtime.serving  # one encoder and the collection it built, for the whole batch
        answers_out = await runtime.run(serving.query.answer_batch, [q for _, q in items], waits)
        futures = []
        for ans in answers_out:
            futures.append(await answers.send(key=ans.query_id.encode(), value=encode(ans)))
        await asyncio.gather(*futures)  # durable before the queries are acked
        for (ev, _), ans in zip(items, answers_out):
            metrics.ANSWER_LATENCY.observe(max(0.0, time.time() - ev.message.timestamp))
        log.info("answered %d queries", len(answers_out), extra={
            "query_ids": [a.query_id for a in answers_out],
            "compute_ms": answers_out[0].timings_ms.get("compute") if answers_out else None,
        })
        if runtime.memory is not None:
            await runtime.run(remember_hits, [(q.query_id, q.text) for _, q in items], answers_out, lane="memory")

    def synthesize(queries: list[Query]) -> list[GeneratedDocument]:
        synth = runtime.build_synthesizer()
        serving = runtime.serving
        # the text model rewrites passages retrieved for the query toward it (SDEdit); real documents only
        hits = serving.store.search(serving.encoder.encode([q.text for q in queries]), s.synth_samples,
                                    tenant=[q.tenant for q in queries], include_synthetic=False)
        contexts = [[h.text for h in hs] for hs in hits]
        samples = synth.synthesize([(q.query_id, q.text) for q in queries], n_per_query=s.synth_samples,
                                   contexts=contexts)
        tenants = {q.query_id: q.tenant for q in queries}
        return [
            GeneratedDocument(
                query_id=d.query_id, query=d.query[:2000], doc_id=f"synth:{d.query_id}:{d.kind}:{d.sample_index}",
                text=d.text or "", embedding=[float(x) for x in d.embedding], kept=d.kept, drop_reasons=list(d.reasons),
                scores={k: float(v) for k, v in d.scores.items() if v is not None},
                model_versions={d.kind: d.model_version}, encoder_version=d.encoder_version,
                tenant=tenants.get(d.query_id, ""),
            )
            for d in samples
        ]

    async def handle_synthesis(events: Sequence) -> None:
        """Synthesize for the sampled queries of a batch; never dead-letters a query (the answer agent owns that)."""
        picked = []
        for ev in events:
            try:
                q = decode(Query, ev.message.value, max_bytes=s.max_message_bytes, max_text_chars=s.max_query_chars)
            except MessageError:
                continue  # the answer agent dead-letters it
            if sampled(q.query_id, s.synth_sample_rate):
                picked.append(q)
        if not picked:
            return
        t0 = time.perf_counter()
        try:
            docs = await with_retries("synth", lambda: runtime.run(synthesize, picked, lane="synth"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            metrics.SYNTH_FAILURES.inc(len(picked))
            log.error("synthesis failed for %d queries (%s: %s); their answers are unaffected", len(picked),
                      type(exc).__name__, exc, extra={"query_ids": [q.query_id for q in picked]})
            return
        futures = [await generated.send(key=d.query_id.encode(), value=encode(d)) for d in docs]
        await asyncio.gather(*futures)
        kept = sum(d.kept for d in docs)
        metrics.SYNTH_SAMPLES.labels("kept").inc(kept)
        metrics.SYNTH_SAMPLES.labels("dropped").inc(len(docs) - kept)
        log.info("synthesized %d samples for %d queries, %d kept (%.0f ms)", len(docs), len(picked), kept,
                 (time.perf_counter() - t0) * 1e3)

    async def handle_generated(items: list) -> None:
        docs = [d for _, d in items if d.kept and d.text.strip()]
        if not docs:
            return
        rows = await runtime.run(runtime.index_generated, docs, lane="ingest")
        metrics.CHUNKS_INDEXED.inc(len(rows))
        if runtime.memory is not None:
            await runtime.run(remember_generated, rows, docs, lane="memory")
        log.info("indexed %d synthetic documents", len(rows))

    def remember_generated(rows, docs) -> None:
        from agents.memory import DocRecord, MemoryUnavailable

        quality = {d.doc_id: min(1.0, max(0.0, d.scores.get("query_similarity", 0.0))) for d in docs}
        try:
            runtime.memory.record_ingest(DocRecord.from_rows(rows, quality=quality))
        except MemoryUnavailable as exc:
            log.warning("memory manager unavailable, synthetic documents indexed without a record: %s", exc)

    async def rebuild_for(update: RetentionUpdate) -> None:
        """Re-encode the corpus for a promoted encoder into its own collection, then swap."""
        old = runtime.encoder.version
        if update.encoder_version == old:
            log.info("encoder %s already serves; nothing to re-index", old)
            return
        kind = "hybrid" if update.checkpoint else "original"
        rebuild, target = await runtime.run(runtime.start_reindex, kind, update.checkpoint, update.encoder_version,
                                            lane="ingest")
        log.info("re-indexing %d rows: %s -> %s", rebuild.total, old, update.encoder_version)
        try:
            while not rebuild.done:
                await runtime.run(rebuild.copy_slice, lane="ingest")
            rows, _ = await runtime.run(runtime.finish_reindex, rebuild, target, lane="ingest")
        except BaseException:
            runtime.abort_reindex()
            raise
        done = RetentionUpdate(kind="reindexed", encoder_version=update.encoder_version,
                               metrics={**rebuild.progress(), "rows": float(rows)}, checkpoint=update.checkpoint,
                               detail=f"serving alias moved from {old}")
        await (await retention.send(key=update.encoder_version.encode(), value=encode(done)))
        metrics.REINDEXES.inc()
        log.info("re-indexed %d rows in %.1fs; now serving %s", rows, done.metrics["seconds"], update.encoder_version)

    async def handle_retention(items: list) -> None:
        for _, update in items:
            if update.kind == "encoder-promoted":
                await rebuild_for(update)
            else:
                log.info("retention update: %s %s %s", update.kind, update.encoder_version, update.detail)

    @app.agent(documents, name="ingest_documents")
    async def ingest_documents(stream):
        await runtime.ready(app)
        async for events in stream.noack_take(s.ingest_batch_max, within=s.ingest_batch_timeout_s):
            await process("ingest", stream, events, handle_documents, Document, s.max_document_chars)

    @app.agent(queries, name="answer_queries")
    async def answer_queries(stream):
        await runtime.ready(app)

        async def answer(events: list) -> None:
            await process("query", stream, events, handle_queries, Query, s.max_query_chars)

        takes = stream.noack_take(s.query_batch_max, within=s.query_batch_timeout_s)
        if not s.query_overlap:
            async for events in takes:
                await answer(events)
            return
        async with Overlapped(answer, max_batch=s.query_batch_max) as batches:
            async for events in takes:
                await batches.put(events)

    @app.agent(queries, name="synthesize_documents")
    async def synthesize_documents(stream):
        """Beside the answer path: its own stream of the queries, its own executor lane."""
        await runtime.ready(app)
        async for events in stream.noack_take(s.synth_batch_max * 8, within=s.synth_batch_timeout_s):
            if s.synth_sample_rate > 0:
                await handle_synthesis(events)
            for ev in events:
                await stream.ack(ev)

    @app.agent(generated, name="index_generated")
    async def index_generated(stream):
        await runtime.ready(app)
        async for events in stream.noack_take(s.ingest_batch_max, within=s.ingest_batch_timeout_s):
            await process("generated", stream, events, handle_generated, GeneratedDocument, s.max_document_chars)

    learner: dict[str, Any] = {"buffer": None, "task": None, "idle_logged": False}

    def learner_active() -> bool:
        """The learner fine-tunes the hybrid encoder; MiniLM is the teacher and the fallback."""
        active = s.learner_enabled and runtime.serving is not None and runtime.serving.encoder_kind == "hybrid"
        if not active and s.learner_enabled and not learner["idle_logged"]:
            learner["idle_logged"] = True
            log.info("continual learner idle: it fine-tunes the hybrid encoder, and this worker serves %s",
                     runtime.encoder.version if runtime.encoder else "nothing yet")
        return active

    def buffer_examples(docs) -> int:
        from agents.continual import LearnerConfig, TrainingBuffer

        if learner["buffer"] is None:
            learner["buffer"] = TrainingBuffer.from_config(LearnerConfig.from_settings(s))
        learner["buffer"].add(docs)
        return learner["buffer"].size()

    async def learner_update() -> None:
        """One update: snapshot the buffer, fine-tune in a subprocess, publish the decision, drop what it used."""
        from agents.continual import LearnerConfig, gather_replay, run_update_in_subprocess

        cfg = LearnerConfig.from_settings(s)
        buf = learner["buffer"]
        serving = runtime.serving
        examples = await runtime.run(buf.snapshot, max(cfg.min_examples, 1) * 4, lane="memory")
        replay = None
        if runtime.memory is not None and cfg.replay_fraction > 0:
            replay = await runtime.run(gather_replay, runtime.memory, cfg.replay_pool, serving.store, lane="memory")
        log.info("continual learner: fine-tuning %s on %d examples", serving.encoder.version, len(examples))
        result = await run_update_in_subprocess(serving.checkpoint or None, examples, replay, cfg)
        if result.error:
            metrics.LEARNER_UPDATES.labels("failed").inc()
            log.error("continual learner update failed: %s (the examples stay buffered)", result.error)
            return
        update = result.to_retention_update()
        await (await retention.send(key=update.encoder_version.encode(), value=encode(update)))
        await runtime.run(buf.drop, [e.doc_id for e in examples], lane="memory")
        metrics.LEARNER_UPDATES.labels("promoted" if result.promoted else "rejected").inc()
        log.info("continual learner: %s %s (%s)", update.kind, update.encoder_version, result.detail)

    async def handle_learning(events: Sequence) -> None:
        docs = []
        for ev in events:
            try:
                docs.append(decode(GeneratedDocument, ev.message.value, max_bytes=s.max_message_bytes,
                                   max_text_chars=s.max_document_chars))
            except MessageError:
                continue  # the indexer dead-letters it
        if not docs or not learner_active():
            return
        size = await with_retries("learner", lambda: runtime.run(buffer_examples, docs, lane="memory"))
        task = learner["task"]
        if size >= s.learner_min_examples and (task is None or task.done()):
            # in the background: buffered examples are in Redis, so the stream's records can be acked now
            learner["task"] = asyncio.create_task(learner_update())

    @app.agent(generated, name="learn_from_generated")
    async def learn_from_generated(stream):
        """Generated documents into the learner's buffer (Redis); an update when enough are there."""
        await runtime.ready(app)
        async for events in stream.noack_take(s.ingest_batch_max, within=s.ingest_batch_timeout_s):
            try:
                await handle_learning(events)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # learning is an improvement, never a reason to stop the stream
                log.error("continual learner could not buffer %d records: %s: %s", len(events), type(exc).__name__, exc)
            for ev in events:
                await stream.ack(ev)

    @app.agent(retention, name="apply_retention_updates")
    async def apply_retention_updates(stream):
        await runtime.ready(app)
        async for events in stream.noack_take(1, within=1.0):
            await process("retention", stream, events, handle_retention, RetentionUpdate, None)

    @app.timer(s.alias_poll_s)
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

    @app.page("/health")
    async def health(web, request):
        ready = runtime._ready is not None and runtime._ready.done() and runtime._ready.exception() is None
        body = {
            "status": "ok" if ready else "starting",
            "encoder_version": runtime.encoder.version if runtime.encoder else None,
            "collection": runtime.store.name if runtime.store else None,
            "rows": await runtime.run(runtime.store.count) if ready else None,
        }
        return web.json(body, status=200 if ready else 503)

    @app.page("/metrics")
    async def prometheus(web, request):
        return web.bytes(metrics.render(), content_type="text/plain; version=0.0.4")

    app.agents_by_name = {  # type: ignore[attr-defined]
        "ingest_documents": ingest_documents, "answer_queries": answer_queries,
        "synthesize_documents": synthesize_documents, "index_generated": index_generated,
        "apply_retention_updates": apply_retention_updates, "learn_from_generated": learn_from_generated,
    }
    return app


app = create_app()
