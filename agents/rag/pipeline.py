"""The synchronous work behind the agents: ingest a batch, answer a batch.

The Faust agents run these in an executor (torch stays off the event loop);
tests and benchmarks call them directly. Each stage is timed, and the timings
travel in the answer so a user can see where the time went.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from hybridrag.agents.rag.chunking import chunk_document
from hybridrag.models.encoders import Encoder
from hybridrag.agents.rag.generator import NO_CONTEXT, Generator
from hybridrag.agents.kafka.schemas import Answer, Document, Query, Source
from hybridrag.agents.rag.store import Hit, Row, VectorStore

log = logging.getLogger(__name__)
WORKER_NAME = f"{socket.gethostname()}:{os.getpid()}"


class Retriever(Protocol):
    def retrieve(
        self, texts: Sequence[str], vectors: np.ndarray, top_k: Sequence[int], tenants: Sequence[str],
        include_synthetic: Sequence[bool],
    ) -> tuple[list[list[Hit]], dict[str, float]]:
        """Ranked hits per query and the time spent per stage (ms)."""
        ...


class TopKRetriever:
    """Plain top-k cosine search, one batched call per tenant."""

    def __init__(self, store: VectorStore, min_score: float):
        self.store = store
        self.min_score = min_score

    def retrieve(self, texts, vectors, top_k, tenants, include_synthetic):
        t0 = time.perf_counter()
        k = max(top_k)
        hits: list[list[Hit] | None] = [None] * len(texts)
        # group by the filter so that a batch is one search call in the common case
        groups: dict[tuple[str, bool], list[int]] = {}
        for i, key in enumerate(zip(tenants, include_synthetic)):
            groups.setdefault(key, []).append(i)
        for (tenant, synth), idx in groups.items():
            res = self.store.search(vectors[idx], k, tenant=tenant, include_synthetic=synth)
            for i, h in zip(idx, res):
                hits[i] = [x for x in h if x.score >= self.min_score][: top_k[i]]
        return [h or [] for h in hits], {"search": (time.perf_counter() - t0) * 1e3, "fine": 0.0}


@dataclass
class IngestResult:
    documents: int
    chunks: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    rows: list = field(default_factory=list)  # what was upserted, for the memory manager


class IngestPipeline:
    def __init__(self, encoder: Encoder, store: VectorStore, chunk_size: int, chunk_overlap: int, batch_size: int = 64,
                 fusion_tuner=None):
        self.encoder = encoder
        self.store = store
        self.fusion_tuner = fusion_tuner  # chooses the hybrid retriever's weight as the collection grows
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self.batch_size = batch_size

    def ingest_batch(self, docs: Sequence[Document]) -> IngestResult:
        t0 = time.perf_counter()
        # the last version of a document in a batch wins, as it would across batches
        latest = {d.doc_id: d for d in docs}
        chunks = []
        n_chunks = {}
        for d in latest.values():
            cs = chunk_document(d.doc_id, d.text, d.title, self.chunk_size, self.chunk_overlap)
            n_chunks[d.doc_id] = len(cs)
            chunks.extend((c, d) for c in cs)
        t1 = time.perf_counter()
        texts = [c.embed_text for c, _ in chunks]
        # one encoder call per slice: the encoder is shared with the query lane,
        # which gets its turn between slices instead of after the whole batch
        parts = [self.encoder.encode(texts[i : i + self.batch_size], batch_size=self.batch_size)
                 for i in range(0, len(texts), self.batch_size)]
        vecs = np.concatenate(parts) if parts else np.zeros((0, self.encoder.dim), np.float32)
        t2 = time.perf_counter()
        rows = [
            Row(c.id, c.doc_id, c.chunk, c.text, v, title=d.title, tenant=d.tenant)
            for (c, d), v in zip(chunks, vecs)
        ]
        self.store.upsert(rows)
        self.store.delete_stale_chunks(n_chunks)
        if self.fusion_tuner is not None:
            self.fusion_tuner.maybe_choose()
        t3 = time.perf_counter()
        return IngestResult(
            len(latest), len(rows), {"chunk": (t1 - t0) * 1e3, "encode": (t2 - t1) * 1e3, "upsert": (t3 - t2) * 1e3},
            rows,
        )


class QueryPipeline:
    def __init__(self, encoder: Encoder, retriever: Retriever, generator: Generator, default_top_k: int, max_top_k: int):
        self.encoder = encoder
        self.retriever = retriever
        self.generator = generator
        self.default_top_k = default_top_k
        self.max_top_k = max_top_k

    def answer_batch(self, queries: Sequence[Query], buffer_wait_ms: Sequence[float] | None = None) -> list[Answer]:
        t0 = time.perf_counter()
        texts = [q.text for q in queries]
        vecs = self.encoder.encode(texts)
        t1 = time.perf_counter()
        top_k = [min(q.top_k or self.default_top_k, self.max_top_k) for q in queries]
        hits, stage_ms = self.retriever.retrieve(
            texts, vecs, top_k, [q.tenant for q in queries], [q.include_synthetic for q in queries]
        )
        # synthetic documents may steer retrieval but are never cited as sources
        cited_hits = [[h for h in hs if not h.synthetic] for hs in hits]
        t2 = time.perf_counter()
        generated = self.generator.generate(texts, cited_hits)
        t3 = time.perf_counter()
        batch_ms = {
            "encode": (t1 - t0) * 1e3,
            "search": stage_ms.get("search", 0.0),
            "fine": stage_ms.get("fine", 0.0),
            **{k: v for k, v in stage_ms.items() if k not in ("search", "fine")},  # e.g. expand
            "generate": (t3 - t2) * 1e3,
        }
        answers = []
        for i, (q, hs, g) in enumerate(zip(queries, cited_hits, generated)):
            timings = dict(batch_ms)
            timings["buffer_wait"] = float(buffer_wait_ms[i]) if buffer_wait_ms is not None else 0.0
            timings["compute"] = (t3 - t0) * 1e3
            answers.append(
                Answer(
                    query_id=q.query_id,
                    answer=g.text if hs else NO_CONTEXT,
                    sources=[
                        Source(doc_id=h.doc_id, chunk=h.chunk, chunk_id=h.id, score=round(h.score, 6), title=h.title, text=h.text)
                        for h in hs
                    ],
                    confident=bool(hs) and g.confident,  # a citation outside the sources is not
                    encoder_version=self.encoder.version,
                    generator=g.generator or self.generator.name,  # a fallback names itself
                    timings_ms={k: round(v, 3) for k, v in timings.items()},
                    batch_size=len(queries),
                    worker=WORKER_NAME,
                )
            )
        return answers
