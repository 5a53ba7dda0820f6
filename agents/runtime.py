"""The runtime of one worker process: the models, the stores, the executor lanes and the re-index swap.

The agents share one :data:`runtime`, built on first use in the query lane.
Torch and Milvus run in its executor threads, so the event loop stays free for
heartbeats, polls and produces.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import faust
import numpy as np

from hybridrag.agents.app import settings
from hybridrag.agents.kafka import metrics
from hybridrag.agents.rag.chunking import chunk_id
from hybridrag.agents.settings import Settings

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
        self.reindex = None  # the rebuild in progress, if any (hybridrag.agents.rag.reindex.Reindex)
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

    def is_ready(self) -> bool:
        return self._ready is not None and self._ready.done() and self._ready.exception() is None

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

    def load_serving(self, encoder_kind: str, checkpoint: str, expect_version: str | None = None,
                     generation: str = "") -> Serving:
        """Load an encoder and open (or create) the collection of its version."""
        from hybridrag.models.encoders import load_encoder
        from hybridrag.agents.rag.store import VectorStore

        s = self.settings
        encoder = load_encoder(encoder_kind, device=s.device, checkpoint=checkpoint or None,
                               precision=s.encoder_precision)
        # a version names the weights; "-int8" only says how this worker runs them
        if expect_version is not None and encoder.version.removesuffix("-int8") != expect_version.removesuffix("-int8"):
            raise ValueError(f"{encoder_kind} encoder {checkpoint or '(default)'} is version {encoder.version}, "
                             f"not {expect_version}")
        store = VectorStore(s.milvus_uri, s.collection, encoder.version, encoder.dim,
                            s.milvus_token.get_secret_value(), encoder=encoder_kind, checkpoint=checkpoint,
                            hubness_k=s.hubness_k, hubness_refresh_growth=s.hubness_refresh_growth,
                            generation=generation)
        return self.make_serving(encoder, store, encoder_kind, checkpoint)

    def make_serving(self, encoder, store, encoder_kind: str, checkpoint: str) -> Serving:
        from hybridrag.agents.rag.pipeline import IngestPipeline, QueryPipeline, TopKRetriever

        s = self.settings
        tuner = None
        if s.retriever in ("hybrid", "lexical"):
            from hybridrag.agents.retention.adaptive_retriever import FusionConfig, FusionTuner, HybridRetriever

            tuner = FusionTuner(store, encoder, FusionConfig.from_settings(s))
            retriever = HybridRetriever(store, tuner)
        elif s.retriever == "adaptive":
            from hybridrag.agents.retention.adaptive_retriever import AdaptiveConfig, AdaptiveRetriever

            retriever = AdaptiveRetriever(store, encoder, AdaptiveConfig.from_settings(s))
        else:
            retriever = TopKRetriever(store, s.min_score)
        if s.expand:
            from hybridrag.agents.synthesis.expansion import ExpandingRetriever, ExpansionConfig
            from hybridrag.agents.synthesis.synthesizer import load_prior

            retriever = ExpandingRetriever(retriever, load_prior(encoder), ExpansionConfig(
                k=s.expand_k, weight=s.expand_weight, steps=s.expand_steps, guidance=s.expand_guidance,
                gate_threshold=s.expand_gate or None, seed=None))
        ingest = IngestPipeline(encoder, store, s.chunk_size, s.chunk_overlap, fusion_tuner=tuner)
        query = QueryPipeline(encoder, retriever, self.generator, s.top_k, s.max_top_k)
        return Serving(encoder, store, ingest, query, encoder_kind, checkpoint)

    def _build(self) -> None:
        import torch

        from hybridrag.agents.rag.generator import make_generator
        from hybridrag.agents.rag.store import milvus_client, resolve_serving

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
            from hybridrag.agents.retention.memory_manager import MemoryConfig, MemoryManager, MemoryUnavailable

            self.memory = MemoryManager(MemoryConfig.from_settings(s))
            try:
                # finish evictions a crash interrupted: nothing dangling in the store or Redis
                self.memory.recover(self.store)
            except MemoryUnavailable as exc:
                log.warning("memory manager degraded at start: %s", exc)
        self.report_state()
        log.info(
            "runtime ready in %.1fs: encoder %s, collection %s (%d rows)",
            time.perf_counter() - t0, self.encoder.version, self.store.name, self.store.count(),
        )

    def build_synthesizer(self):
        """The diffusion models for the serving encoder, loaded on first use (in the synth lane)."""
        from hybridrag.agents.synthesis.quality_filter import FilterConfig
        from hybridrag.agents.synthesis.synthesizer import SynthesisConfig, Synthesizer, load_prior, load_text_model

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
        from hybridrag.agents.rag.store import Row

        with self.swap_lock:
            serving = self.serving
            need = [d for d in docs if d.encoder_version != serving.encoder.version or not d.embedding]
            fresh = dict(zip((d.doc_id for d in need), serving.encoder.encode([d.text for d in need])))
            rows = [
                Row(chunk_id(d.doc_id, 0), d.doc_id, 0, d.text,
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
        from hybridrag.agents.rag.reindex import Reindex

        target = self.load_serving(encoder_kind, checkpoint, expect_version=version)
        if target.store.name == self.serving.store.name:
            if self.serving.store.has_lexical:
                raise ValueError(f"{version} already serves from {target.store.name}")
            # the same encoder over a collection older than the lexical index: rebuild it beside itself
            target = self.load_serving(encoder_kind, checkpoint, expect_version=version,
                                       generation=f"g{int(time.time())}")
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
        dropped = target.store.drop_old_collections(self.settings.reindex_keep_collections)
        if dropped:
            log.info("dropped %d old collections: %s", len(dropped), ", ".join(dropped))
        self.report_state()
        return counts

    def report_state(self) -> None:
        """Point the gauges of this worker's state at what serves now (read again at every scrape)."""
        serving = self.serving
        metrics.ENCODER_INFO.clear()  # one label: the version serving, not every version that ever did
        metrics.ENCODER_INFO.labels(serving.encoder.version).set(1)
        metrics.COLLECTIONS.set(len(serving.store.collections()))
        metrics.MIRROR_ROWS.labels("live").set_function(lambda: self._mirror_rows(live=True))
        metrics.MIRROR_ROWS.labels("dead").set_function(lambda: self._mirror_rows(live=False))
        if self.memory is not None:
            metrics.MEMORY_BUFFERED.set_function(lambda: self.memory.pending)

    def _mirror_rows(self, live: bool) -> int:
        store = self.store
        mirror = store.mirror if store is not None else None
        if mirror is None:
            return 0
        return mirror.count() if live else mirror.dead()

    def serving_info(self):
        from hybridrag.agents.rag.store import resolve_serving

        s = self.settings
        return resolve_serving(s.milvus_uri, s.collection, s.milvus_token.get_secret_value(), client=self.store.client)

    def abort_reindex(self) -> None:
        with self.swap_lock:
            self.reindex = None

    async def run(self, fn: Callable[..., T], *args: Any, lane: str = "query") -> T:
        pool = {"ingest": self.ingest_executor, "memory": self.memory_executor,
                "synth": self.synth_executor}.get(lane, self.executor)
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)



runtime = Runtime(settings)
