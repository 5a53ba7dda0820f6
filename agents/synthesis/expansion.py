"""Query expansion with the embedding prior: search with the query blended with hypothetical document embeddings.

HyDE (https://arxiv.org/abs/2212.10496) with a diffusion prior in place of an
LLM: :class:`ExpandingRetriever` wraps the deployment's retriever
(``HYBRIDRAG_EXPAND``), :func:`expansion_retriever` is the same search for the
evaluation harness (``eval --expand diffusion``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class ExpansionConfig:
    k: int = 4  # generated document embeddings per query
    weight: float = 0.5  # blend: (1 - weight) * query + weight * mean(generated)
    steps: int = 10  # DDIM steps
    guidance: float = 1.0  # classifier-free guidance scale
    gate_threshold: float | None = None  # expand only queries whose samples agree at least this much
    seed: int | None = 0


def expansion_retriever(prior, cfg: ExpansionConfig | None = None):
    """A retriever factory for :class:`hybridrag.agents.evaluation.harness.DenseSystem`: exact cosine top-k with expanded queries."""
    from hybridrag.agents.evaluation.harness import top_k_cosine
    from hybridrag.models.embedding_diffusion import expand_queries

    cfg = cfg or ExpansionConfig()

    def factory(doc_ids: list[str], doc_vecs: np.ndarray, doc_texts: list[str]):
        def retrieve(query_texts: list[str], query_vecs: np.ndarray, k: int) -> list[list[str]]:
            vecs = expand_queries(query_vecs, prior, k=cfg.k, weight=cfg.weight, steps=cfg.steps,
                                  guidance=cfg.guidance, gate_threshold=cfg.gate_threshold, seed=cfg.seed)
            return [[doc_ids[i] for i in row] for row in top_k_cosine(vecs, doc_vecs, k)]

        return retrieve

    return factory


class ExpandingRetriever:
    """A :class:`hybridrag.agents.rag.pipeline.Retriever` that searches with diffusion-expanded query vectors.

    The query is blended with ``cfg.k`` hypothetical document embeddings from
    the prior (HyDE, https://arxiv.org/abs/2212.10496, with a diffusion prior
    in place of an LLM), then handed to the wrapped retriever.
    """

    def __init__(self, inner, prior, cfg: ExpansionConfig | None = None):
        self.inner = inner
        self.prior = prior
        self.cfg = cfg or ExpansionConfig()

    def retrieve(self, texts, vectors, top_k, tenants, include_synthetic):
        from hybridrag.models.embedding_diffusion import expand_queries

        t0 = time.perf_counter()
        c = self.cfg
        vecs = expand_queries(vectors, self.prior, k=c.k, weight=c.weight, steps=c.steps, guidance=c.guidance,
                              gate_threshold=c.gate_threshold, seed=c.seed)
        expand_ms = (time.perf_counter() - t0) * 1e3
        hits, stage_ms = self.inner.retrieve(texts, vecs, top_k, tenants, include_synthetic)
        return hits, {**stage_ms, "expand": expand_ms}
