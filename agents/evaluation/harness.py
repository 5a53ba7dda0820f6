"""Retrieval evaluation: pure ranking metrics, named systems, and the harness that runs them.

The metrics follow the TREC / BEIR definitions (https://github.com/beir-cellar/beir):
nDCG@k with linear gain and a log2 discount, MRR@k, Recall@k and Precision@k,
averaged over queries. A *system* turns a BEIR corpus into an index and
queries into ranked document ids:

- ``bm25``: lexical BM25 through the index the service searches (the store's
  :class:`~hybridrag.agents.rag.store.LexicalIndex`, which ranks as Milvus's BM25
  function does); ``bm25s``: the ``bm25s`` package, for reference.
- ``dense``: the original encoder (all-MiniLM-L6-v2), exact cosine.
- ``fused``: both, blended with the weight chosen for the corpus from its own
  pseudo-queries (no labels); also reported: fixed weights, and the best fixed
  weight in hindsight (``fused-oracle``, which reads the labels).
- a dense system around any :class:`hybridrag.models.encoders.Encoder`: exact cosine top-k
  with NumPy; corpus embeddings are cached per (encoder version, corpus).
- a dense system with a custom *retriever* (adaptive retrieval, diffusion
  expansion, ...): a factory gets the corpus embeddings and returns a callable
  ``(query_texts, query_vecs) -> ranked doc ids``.

Systems are named on the command line through :data:`SYSTEM_FACTORIES`; other
modules add theirs with :func:`register_system`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from hybridrag.models import corpora
from hybridrag.agents.evaluation import datasets
from hybridrag.models.encoders import Encoder

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Sequence[str]]

CUTOFFS_RECALL = (10, 50, 100)
TOP_K = 100  # deepest cutoff any metric reads


# ---------------------------------------------------------------- metrics (pure)


def dcg(gains: Sequence[float]) -> float:
    """Discounted cumulative gain of gains in rank order: sum(g_i / log2(i + 1)), i from 1."""
    return float(sum(g / math.log2(i + 2) for i, g in enumerate(gains)))


def ndcg_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int = 10) -> float:
    """nDCG@k: DCG of the ranking over DCG of the ideal ranking of the judged documents."""
    ideal = sorted((g for g in rels.values() if g > 0), reverse=True)[:k]
    if not ideal:
        return 0.0
    gains = [max(rels.get(d, 0), 0) for d in ranked[:k]]
    return dcg(gains) / dcg(ideal)


def mrr_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int = 10) -> float:
    """Reciprocal rank of the first relevant document within the top k (0 when none)."""
    for i, d in enumerate(ranked[:k]):
        if rels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def recall_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    """Share of the relevant documents found in the top k."""
    relevant = {d for d, g in rels.items() if g > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def precision_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    """Share of the top k that is relevant (k is the denominator even when fewer are ranked)."""
    return sum(1 for d in ranked[:k] if rels.get(d, 0) > 0) / k


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 2000, seed: int = 0
                     ) -> tuple[float, float, float]:
    """Mean of a - b over the same queries, and its 95% percentile bootstrap interval (Efron & Tibshirani 1993).

    Resampling the queries keeps each query's pair together, so the interval
    reflects how consistently one side beats the other. (0, 0, 0) when empty.
    """
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if len(d) == 0:
        return 0.0, 0.0, 0.0
    means = d[np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def evaluate_run(run: Run, qrels: Qrels) -> dict[str, float]:
    """Mean of every metric over the judged queries; an unranked query scores 0."""
    per_query = {
        "nDCG@10": lambda r, q: ndcg_at_k(r, q, 10),
        "MRR@10": lambda r, q: mrr_at_k(r, q, 10),
        **{f"R@{k}": (lambda k: lambda r, q: recall_at_k(r, q, k))(k) for k in CUTOFFS_RECALL},
        "P@5": lambda r, q: precision_at_k(r, q, 5),
    }
    judged = [q for q, rels in qrels.items() if any(g > 0 for g in rels.values())]
    if not judged:
        raise ValueError("qrels hold no relevant document")
    out = {}
    for name, fn in per_query.items():
        out[name] = float(np.mean([fn(list(run.get(q, ())), qrels[q]) for q in judged]))
    return out


def rank_data(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties share their average rank (what Spearman's rho needs)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / math.sqrt((a @ a) * (b @ b)))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    return pearson(rank_data(np.asarray(a)), rank_data(np.asarray(b)))


def top_k_cosine(query_vecs: np.ndarray, doc_vecs: np.ndarray, k: int, chunk: int = 512) -> np.ndarray:
    """Indices (Q, k) of the k highest inner products per query, best first (exact search)."""
    k = min(k, doc_vecs.shape[0])
    out = np.empty((query_vecs.shape[0], k), dtype=np.int64)
    for s in range(0, query_vecs.shape[0], chunk):
        scores = query_vecs[s : s + chunk] @ doc_vecs.T  # (q, N)
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        out[s : s + chunk] = np.take_along_axis(part, order, axis=1)
    return out


# ---------------------------------------------------------------- datasets


@dataclass
class Dataset:
    """A loaded BEIR dataset and the fingerprint that keys its embedding cache."""

    name: str
    doc_ids: list[str]
    doc_texts: list[str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    fingerprint: str

    @classmethod
    def load(cls, name_or_path: str, max_queries: int | None = None) -> "Dataset":
        path = datasets.dataset_path(name_or_path)
        corpus, queries, qrels = datasets.load_beir(path)
        if max_queries is not None and len(queries) > max_queries:
            keep = sorted(queries)[:max_queries]
            queries = {q: queries[q] for q in keep}
            qrels = {q: qrels[q] for q in keep}
        ids = list(corpus)
        texts = [doc_text(corpus[d]) for d in ids]
        digest = hashlib.sha1((path / "corpus.jsonl").read_bytes()).hexdigest()[:16]
        name = path.name if Path(name_or_path).exists() else name_or_path
        return cls(name, ids, texts, queries, qrels, digest)


def doc_text(doc: Mapping[str, str]) -> str:
    """Title and text as one passage (BEIR's convention), without repeating a title the text starts with."""
    title, text = (doc.get("title") or "").strip(), (doc.get("text") or "").strip()
    if not title or text.lower().startswith(title.lower()):
        return text
    return f"{title}. {text}"


# ---------------------------------------------------------------- systems


class System(Protocol):
    """A retrieval system under evaluation."""

    name: str

    def index(self, ds: Dataset) -> None: ...

    def search(self, query_texts: list[str], k: int) -> list[list[str]]: ...


class BM25System:
    """BM25 (Lucene variant, k1=1.5, b=0.75) over lower-cased tokens minus English stopwords."""

    def __init__(self, name: str = "bm25", k1: float = 1.5, b: float = 0.75):
        self.name, self.k1, self.b = name, k1, b
        self.timings: dict[str, float] = {}

    def index(self, ds: Dataset) -> None:
        import logging

        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs each index build at DEBUG
        t = time.perf_counter()
        self.doc_ids = ds.doc_ids
        self.retriever = bm25s.BM25(k1=self.k1, b=self.b)
        self.retriever.index(bm25s.tokenize(ds.doc_texts, stopwords="en", show_progress=False), show_progress=False)
        self.timings = {"index_s": time.perf_counter() - t}

    def search(self, query_texts: list[str], k: int) -> list[list[str]]:
        import bm25s

        t = time.perf_counter()
        k = min(k, len(self.doc_ids))
        tokens = bm25s.tokenize(query_texts, stopwords="en", show_progress=False)
        idx, scores = self.retriever.retrieve(tokens, k=k, show_progress=False)
        # a query with no indexed token scores 0 everywhere: it ranks nothing
        ranked = [[self.doc_ids[i] for i, s in zip(row, srow) if s > 0] for row, srow in zip(idx, scores)]
        self.timings["search_s"] = time.perf_counter() - t
        return ranked


class LexicalSystem:
    """BM25 through the service's own lexical index (what ``HYBRIDRAG_RETRIEVER=lexical`` serves)."""

    def __init__(self, name: str = "bm25"):
        self.name = name
        self.timings: dict[str, float] = {}

    def index(self, ds: Dataset) -> None:
        from hybridrag.agents.rag.store import ExactMirror

        t = time.perf_counter()
        self.mirror = ExactMirror(1)
        for doc_id, text in zip(ds.doc_ids, ds.doc_texts):
            self.mirror.put(doc_id, 0.0, doc_id, 0, "", "", "", False, lexical=text)
        self.timings = {"index_s": time.perf_counter() - t}

    def search(self, query_texts: list[str], k: int) -> list[list[str]]:
        t = time.perf_counter()
        hits = self.mirror.lexical_search(query_texts, k, "", True)
        self.timings["search_s"] = time.perf_counter() - t
        return [[h.doc_id for h in hs] for hs in hits]


FIXED_WEIGHTS_REPORTED = (0.1, 0.2, 0.3, 0.5)  # fixed-weight rows in the table; the oracle searches the whole grid


@dataclass
class FusedSystem:
    """Dense (exact cosine) and lexical (the service's BM25) candidates, fused as the hybrid retriever fuses them.

    The weight is chosen on the corpus alone (``choose_fusion_weight``: its own
    pseudo-queries, no labels). Rankings at every weight of the grid are kept as
    :attr:`variants`, so the harness can score fixed weights and the best in hindsight.
    """

    name: str
    encoder: Encoder
    depth: int = TOP_K  # candidates from each side (the harness reads up to 100)
    batch_size: int = 64
    cache: bool = True
    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)
    choice: object = None
    variants: dict[float, list[list[str]]] = field(default_factory=dict)

    def index(self, ds: Dataset) -> None:
        from hybridrag.agents.rag.store import ExactMirror
        from hybridrag.agents.retention.adaptive_retriever import FusionConfig, choose_fusion_weight

        t = time.perf_counter()
        vecs, cached = encode_corpus(self.encoder, ds, self.batch_size, self.cache, self.progress)
        t_enc = time.perf_counter()
        self.mirror = ExactMirror(vecs.shape[1])
        for doc_id, text, v in zip(ds.doc_ids, ds.doc_texts, vecs):
            self.mirror.put(doc_id, v, doc_id, 0, "", "", "", False, lexical=text)
        cfg = FusionConfig()  # as the service chooses
        self.choice = choose_fusion_weight(
            ds.doc_texts, vecs, lambda texts: self.encoder.encode(texts, batch_size=self.batch_size),
            n_queries=cfg.pseudo_queries, depth=cfg.depth)
        self.timings = {"corpus_encode_s": t_enc - t, "corpus_cached": float(cached),
                        "choose_weight_s": time.perf_counter() - t_enc,
                        "weight": self.choice.weight if self.choice else float("nan"),
                        "self_check": self.choice.check if self.choice else float("nan")}

    def search(self, query_texts: list[str], k: int) -> list[list[str]]:
        from hybridrag.agents.retention.adaptive_retriever import FUSION_GRID, union_scores, zscore

        t = time.perf_counter()
        qv = encode_texts(self.encoder, query_texts, self.batch_size, desc=f"{self.name} queries", progress=False)
        dense_top = self.mirror.search(qv, self.depth, "", True)
        lexical_top = self.mirror.lexical_search(query_texts, self.depth, "", True)
        self.variants = {w: [] for w in FUSION_GRID}
        for d, l, v in zip(dense_top, lexical_top, qv):
            hits, dense_s, lex_s = union_scores(d, l, v, self.depth)
            zd, zl = zscore(dense_s), zscore(lex_s)
            for w in FUSION_GRID:
                order = np.argsort(-((1.0 - w) * zd + w * zl), kind="stable")[:k]
                self.variants[w].append([hits[i].doc_id for i in order])
        self.timings["search_s"] = time.perf_counter() - t
        chosen = self.choice.weight if self.choice else 0.0
        return self.variants[min(FUSION_GRID, key=lambda w: abs(w - chosen))]


def embeddings_cache_dir() -> Path:
    return corpora.data_dir() / "cache" / "embeddings"


def encode_corpus(
    encoder: Encoder,
    ds: Dataset,
    batch_size: int = 64,
    cache: bool = True,
    progress: bool = True,
) -> tuple[np.ndarray, bool]:
    """Corpus embeddings (N, dim) for ``ds``, cached per (encoder version, corpus digest).

    Returns the array and whether it came from the cache.
    """
    path = embeddings_cache_dir() / _safe(encoder.version) / f"{_safe(ds.name)}-{ds.fingerprint}.npy"
    if cache and path.exists():
        vecs = np.load(path)
        if vecs.shape == (len(ds.doc_ids), encoder.dim):
            return vecs, True
    vecs = encode_texts(encoder, ds.doc_texts, batch_size, desc=f"{encoder.version} {ds.name}", progress=progress)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, vecs)
        tmp.replace(path)
    return vecs, False


def encode_texts(
    encoder: Encoder, texts: Sequence[str], batch_size: int = 64, desc: str = "encode", progress: bool = True
) -> np.ndarray:
    """Encode in chunks so that a progress bar moves; float32 (N, dim)."""
    from tqdm.auto import tqdm

    chunk = max(batch_size * 8, 256)
    parts = []
    with tqdm(total=len(texts), desc=desc, unit="text", disable=not progress, leave=False) as bar:
        for s in range(0, len(texts), chunk):
            parts.append(np.asarray(encoder.encode(list(texts[s : s + chunk]), batch_size=batch_size), np.float32))
            bar.update(min(chunk, len(texts) - s))
    if not parts:
        return np.zeros((0, encoder.dim), np.float32)
    return np.concatenate(parts)


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def cached_corpus_embeddings(encoder_version: str, key: Callable[[str], bytes],
                             names: Sequence[str] = ("wordnet-revdict", "foldoc", "chatterbot")) -> dict[bytes, np.ndarray]:
    """Corpus embeddings cached for this encoder (only those already computed), by ``key(text)``."""
    out: dict[bytes, np.ndarray] = {}
    folder = embeddings_cache_dir() / _safe(encoder_version)
    for name in names:
        try:
            ds = Dataset.load(name)
        except (FileNotFoundError, ValueError):
            continue
        path = folder / f"{_safe(ds.name)}-{ds.fingerprint}.npy"
        if not path.exists():
            continue
        vecs = np.load(path)
        if len(vecs) == len(ds.doc_texts):
            out.update((key(t), v) for t, v in zip(ds.doc_texts, vecs))
    return out


# A retriever factory gets (doc ids, corpus embeddings, doc texts) and returns
# ``retrieve(query_texts, query_vecs, k) -> ranked doc ids per query``.
Retrieve = Callable[[list[str], np.ndarray, int], list[list[str]]]
RetrieverFactory = Callable[[list[str], np.ndarray, list[str]], Retrieve]


def exact_cosine_retriever(doc_ids: list[str], doc_vecs: np.ndarray, doc_texts: list[str]) -> Retrieve:
    """Exact top-k by inner product of L2-normalised vectors (the reference dense search)."""

    def retrieve(query_texts: list[str], query_vecs: np.ndarray, k: int) -> list[list[str]]:
        top = top_k_cosine(query_vecs, doc_vecs, k)
        return [[doc_ids[i] for i in row] for row in top]

    return retrieve


@dataclass
class DenseSystem:
    """An encoder plus a retriever over its corpus embeddings (exact cosine by default)."""

    name: str
    encoder: Encoder
    retriever_factory: RetrieverFactory = exact_cosine_retriever
    batch_size: int = 64
    cache: bool = True
    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)

    def index(self, ds: Dataset) -> None:
        t = time.perf_counter()
        vecs, cached = encode_corpus(self.encoder, ds, self.batch_size, self.cache, self.progress)
        self.timings = {"corpus_encode_s": time.perf_counter() - t, "corpus_cached": float(cached)}
        self.retrieve = self.retriever_factory(ds.doc_ids, vecs, ds.doc_texts)

    def search(self, query_texts: list[str], k: int) -> list[list[str]]:
        t = time.perf_counter()
        qv = encode_texts(self.encoder, query_texts, self.batch_size, desc=f"{self.name} queries", progress=False)
        t_enc = time.perf_counter()
        ranked = self.retrieve(query_texts, qv, k)
        self.timings["query_encode_s"] = t_enc - t
        self.timings["search_s"] = time.perf_counter() - t_enc
        return ranked


class RandomSystem:
    """Uniformly random rankings (seeded): the floor every real system must clear."""

    def __init__(self, name: str = "random", seed: int = 0):
        self.name, self.seed, self.timings = name, seed, {}

    def index(self, ds: Dataset) -> None:
        self.doc_ids = ds.doc_ids

    def search(self, query_texts: list[str], k: int) -> list[list[str]]:
        rng = np.random.default_rng(self.seed)
        k = min(k, len(self.doc_ids))
        return [[self.doc_ids[i] for i in rng.choice(len(self.doc_ids), k, replace=False)] for _ in query_texts]


# ---------------------------------------------------------------- named systems

SystemFactory = Callable[["SystemOptions"], System]
SYSTEM_FACTORIES: dict[str, SystemFactory] = {}


@dataclass
class SystemOptions:
    """What a system factory may need from the command line."""

    device: str = "cpu"
    checkpoint: str | None = None  # hybrid encoder checkpoint (None: the shipped default)
    batch_size: int = 64
    cache: bool = True
    progress: bool = True
    extra: dict = field(default_factory=dict)


def register_system(name: str) -> Callable[[SystemFactory], SystemFactory]:
    """Decorator: make ``hybridrag eval --systems <name>`` build a system with this factory."""

    def deco(factory: SystemFactory) -> SystemFactory:
        SYSTEM_FACTORIES[name] = factory
        return factory

    return deco


@register_system("bm25")
def _bm25(opts: SystemOptions) -> System:
    return LexicalSystem()


@register_system("bm25s")
def _bm25s(opts: SystemOptions) -> System:
    return BM25System("bm25s")


@register_system("dense")
def _dense(opts: SystemOptions) -> System:
    from hybridrag.models.encoders import OriginalEncoder

    return DenseSystem("dense", OriginalEncoder(device=opts.device), batch_size=opts.batch_size,
                       cache=opts.cache, progress=opts.progress)


@register_system("fused")
def _fused(opts: SystemOptions) -> System:
    """``hybridrag eval --systems bm25,dense,fused``: MiniLM and BM25 fused with the weight chosen without labels,
    plus rows for fixed weights and the best fixed weight in hindsight."""
    from hybridrag.models.encoders import OriginalEncoder

    return FusedSystem("fused", OriginalEncoder(device=opts.device), batch_size=opts.batch_size,
                       cache=opts.cache, progress=opts.progress)


@register_system("random")
def _random(opts: SystemOptions) -> System:
    return RandomSystem()


@register_system("original")
def _original(opts: SystemOptions) -> System:
    from hybridrag.models.encoders import OriginalEncoder

    return DenseSystem("original", OriginalEncoder(device=opts.device), batch_size=opts.batch_size,
                       cache=opts.cache, progress=opts.progress)


def _hybrid(name: str, profile: str | None, precision: str) -> SystemFactory:
    def factory(opts: SystemOptions) -> System:
        from hybridrag.models.hybrid_encoder import HybridEncoderRuntime

        enc = HybridEncoderRuntime.load(opts.checkpoint or profile, device=opts.device, precision=precision)
        return DenseSystem(name, enc, batch_size=opts.batch_size, cache=opts.cache, progress=opts.progress)

    return factory


# the shipped profiles in the precision the runtime picks on this machine; hybrid-fp32 and
# hybrid-int8 are the default profile (or --checkpoint) in FP32 and with dynamic INT8 linears
for _name, _profile, _precision in (("hybrid", "hybrid", "auto"), ("hybrid-fast", "hybrid-fast", "auto"),
                                    ("hybrid-fp32", None, "fp32"), ("hybrid-int8", None, "int8")):
    register_system(_name)(_hybrid(_name, _profile, _precision))


@register_system("topk")
def _topk(opts: SystemOptions) -> System:
    """``hybridrag eval --systems topk``: the original encoder, plain top-k as served (HYBRIDRAG_TOP_K, _MIN_SCORE)."""
    from hybridrag.agents.retention.adaptive_retriever import served_top_k_factory
    from hybridrag.agents.settings import Settings
    from hybridrag.models.encoders import OriginalEncoder

    s = Settings()
    return DenseSystem("topk", OriginalEncoder(device=opts.device), served_top_k_factory(s.top_k, s.min_score),
                       batch_size=opts.batch_size, cache=opts.cache, progress=opts.progress)


@register_system("adaptive")
def _adaptive(opts: SystemOptions) -> System:
    """``hybridrag eval --systems original,adaptive``: the original encoder, adaptive retrieval."""
    from hybridrag.agents.retention.adaptive_retriever import AdaptiveConfig, adaptive_retriever_factory
    from hybridrag.agents.settings import Settings
    from hybridrag.models.encoders import OriginalEncoder

    # the deployment's HYBRIDRAG_RETRIEVER_* settings, unless the caller passes a config
    extra = opts.extra.get("adaptive")
    cfg = AdaptiveConfig(**extra) if extra is not None else AdaptiveConfig.from_settings(Settings())
    return DenseSystem("adaptive", OriginalEncoder(device=opts.device), adaptive_retriever_factory(cfg),
                       batch_size=opts.batch_size, cache=opts.cache, progress=opts.progress)


def make_system(name: str, opts: SystemOptions | None = None) -> System:
    if name not in SYSTEM_FACTORIES:
        raise ValueError(f"{name} is not a valid system ({', '.join(SYSTEM_FACTORIES)})")
    return SYSTEM_FACTORIES[name](opts or SystemOptions())


# ---------------------------------------------------------------- harness


def evaluate_system(system: System, ds: Dataset, k: int = TOP_K) -> dict[str, float]:
    """Index ``ds``, rank every query and return metrics plus the system's timings."""
    system.index(ds)
    qids = list(ds.queries)
    ranked = system.search([ds.queries[q] for q in qids], k)
    run = dict(zip(qids, ranked))
    metrics = evaluate_run(run, ds.qrels)
    metrics.update({k_: float(v) for k_, v in getattr(system, "timings", {}).items()})
    return metrics


def variant_rows(system: System, ds: Dataset) -> dict[str, dict[str, float]]:
    """Rows for a system's fixed-weight rankings (``variants``, weight -> rankings of ``ds.queries`` in order):
    the reported fixed weights, and ``<name>-oracle``, the best weight in hindsight (it reads the labels)."""
    variants = getattr(system, "variants", None)
    if not variants:
        return {}
    qids = list(ds.queries)
    scored = {w: evaluate_run(dict(zip(qids, ranked)), ds.qrels) for w, ranked in variants.items()}
    rows = {f"{system.name}-w{w:.2f}": m for w, m in scored.items()
            if any(abs(w - f) < 1e-9 for f in FIXED_WEIGHTS_REPORTED)}
    best = max(scored, key=lambda w: scored[w]["nDCG@10"])
    rows[f"{system.name}-oracle"] = {**scored[best], "weight": float(best)}
    rows[f"{system.name}-oracle"]["curve"] = {f"{w:.2f}": m["nDCG@10"] for w, m in scored.items()}
    return rows


def lee_correlation(encoder: Encoder) -> dict[str, float]:
    """Pearson and Spearman between encoder cosine and mean human ratings on the 50 Lee documents."""
    docs = corpora.lee_documents()
    human = np.asarray(corpora.lee_similarities())
    vecs = encoder.encode(docs)
    sims = vecs @ vecs.T
    iu = np.triu_indices(len(docs), k=1)
    return {"pearson": pearson(sims[iu], human[iu]), "spearman": spearman(sims[iu], human[iu]), "pairs": float(len(iu[0]))}


def run_evaluation(
    dataset_names: Sequence[str],
    systems: Sequence[System],
    max_queries: int | None = None,
    lee: bool = True,
    out_path: Path | str | None = None,
) -> dict:
    """Evaluate every system on every dataset; write and return the JSON report."""
    import os

    report: dict = {"datasets": {}, "lee": {}, "meta": {"max_queries": max_queries, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                         "load_average_at_start": list(os.getloadavg())}}
    for name in dataset_names:
        ds = Dataset.load(name, max_queries=max_queries)
        entry = {"queries": len(ds.queries), "corpus": len(ds.doc_ids), "systems": {}}
        for system in systems:
            entry["systems"][system.name] = evaluate_system(system, ds)
            entry["systems"].update(variant_rows(system, ds))
        report["datasets"][ds.name] = entry
    if lee:
        for system in systems:
            encoder = getattr(system, "encoder", None)
            if encoder is not None:
                report["lee"][system.name] = lee_correlation(encoder)
    report["meta"]["load_average_at_end"] = list(os.getloadavg())
    if out_path is not None:
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


METRIC_COLUMNS = ("nDCG@10", "MRR@10", "R@10", "R@50", "R@100", "P@5")


def format_table(report: dict, baseline: str = "original") -> str:
    """Plain-text table of a report; ``vs base`` is nDCG@10 relative to ``baseline``."""
    head = ["dataset", "system", *METRIC_COLUMNS, "vs " + baseline, "weight"]
    rows = [head]
    for ds_name, entry in report["datasets"].items():
        base = entry["systems"].get(baseline, {}).get("nDCG@10")
        for sys_name, m in entry["systems"].items():
            ratio = f"{m['nDCG@10'] / base:.3f}" if base else "-"
            weight = f"{m['weight']:.2f}" if m.get("weight") == m.get("weight") and "weight" in m else ""
            rows.append([f"{ds_name} ({entry['queries']}q/{entry['corpus']}d)", sys_name,
                         *(f"{m[c]:.4f}" for c in METRIC_COLUMNS), ratio, weight])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if report.get("lee"):
        lines.append("")
        lines.append("Lee corpus (50 docs, 1225 pairs): correlation of cosine with human ratings")
        for sys_name, c in report["lee"].items():
            lines.append(f"  {sys_name:<14} pearson {c['pearson']:.4f}  spearman {c['spearman']:.4f}")
    return "\n".join(lines)
