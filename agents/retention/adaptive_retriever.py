"""Adaptive retrieval: a coarse dense search, a finer re-score, a threshold set by each query.

    query vectors ─▶ coarse_stage: top 50 by cosine from the vector store
                  ─▶ fine_stage:   re-score the 50: cosine less each candidate's hubness (corpus and served queries)
                  ─▶ select:       keep at most 5 that pass this query's own threshold

**Fine signal.** Three are built in, each z-normalised over the query's
candidates so they share one scale without a constant per corpus:

- ``hubness`` (the default): ``cos(q, d) - beta * r(d) - gamma * b(d)``.
  ``r(d)`` is the mean cosine of ``d`` to its 20 nearest stored neighbours,
  kept with each row by the store (agents/rag/store.py). Some vectors are hubs,
  close to everything, and they take top places from the right answer for
  unrelated queries; discounting a candidate by its local density is CSLS
  (Conneau et al. 2018, https://arxiv.org/abs/1710.04087; hubness: Radovanović
  et al. 2010). It costs nothing at query time: ``r(d)`` comes back with the
  hit. ``b(d)`` is the same density measured against the queries this worker
  has served (its :class:`QueryBank`): a passage that sits close to many past
  questions is a hub *for questions*, which the corpus alone cannot show
  (QB-Norm, Bogolin et al. 2022, https://arxiv.org/abs/2112.12777). It needs
  the candidates' vectors and a bank of at least ``query_bank_min`` queries;
  until then only ``r(d)`` applies. This is how the retriever improves as it
  serves: the bank fills with the traffic's own questions.
- ``bm25``: ``(1 - w) * z(cosine) + w * z(bm25)``, BM25 (Robertson & Zaragoza
  2009, Lucene's idf) over the candidates' texts only, so it needs no corpus index.
- ``dense``: the cosine alone.

Measured on the held-out BEIR sets (``bench/adaptive_retrieval.py``, figures in
bench/results/adaptive.json, beta and gamma chosen on the dev half, each set
replayed as traffic): both corrections raise the fine ranking's nDCG@10 on all
three sets, the query bank most on foldoc; BM25 over the
50 candidates lifts foldoc slightly and lowers chatterbot and wordnet-revdict,
whose queries share few words with their answers by construction. Also tried
and not kept: MiniLM token-level late interaction (mixed, and a 50-document
encode per query), the INT8 hybrid's cosine as a second opinion, pseudo-relevance
feedback, neighbour smoothing among the candidates, and a MiniLM cross-scorer
trained here for 20 minutes (it ranked at chance on held-out pairs).

**Context-aware threshold.** Where to cut depends on this query's score
distribution, never on a global constant (pure functions below):

- ``margin``: keep a candidate within ``margin`` standard deviations of the top;
- ``zscore``: keep a candidate whose score is ``z`` standard deviations above the mean;
- ``gap``: cut at the largest drop among the leading scores.

**No confident context.** A query whose best candidate neither stands out of its
own candidates (top z-score under ``confidence_z``) nor reaches the absolute
``min_cosine`` floor gets an empty list: the answer then says there is no
confident context instead of inventing one.

**Lexical + dense fusion** (:class:`HybridRetriever`, ``HYBRIDRAG_RETRIEVER=hybrid``).
The store's dense top-50 and BM25 top-50, ranked by ``(1 - w) z(cosine) + w
z(BM25)`` over their union (:func:`fuse`). ``w`` is the collection's own,
chosen without labels by :func:`choose_fusion_weight` from pseudo-queries
the corpus gives (a sentence cut from its passage, or a crop of a one-line
entry) and kept by :class:`FusionTuner`. Measured (bench/results/eval-hybrid.json):
the best fixed weight gains up to 3.9 points nDCG@10, but the pseudo-queries
lean lexical and the chosen weight overshoots on three of four sets.

Everything is batched: one store call per distinct tenant filter for a
micro-batch of queries, one matrix product per tenant against the query bank,
and NumPy over (queries, candidates) arrays.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from hybridrag.agents.rag.chunking import chunk_id
from hybridrag.agents.rag.store import Hit

THRESHOLDS = ("margin", "zscore", "gap", "none")
FINE_SIGNALS = ("hubness", "bm25", "dense")


@dataclass(frozen=True)
class AdaptiveConfig:
    coarse_k: int = 50  # candidates the coarse stage takes from the store
    max_hits: int = 5  # most hits kept after the threshold
    fine: str = "hubness"  # hubness: cosine - beta * hubness; bm25: cosine blended with BM25; dense: cosine alone
    hubness_weight: float = 0.25  # beta, when fine is hubness (chosen on the dev halves, bench/adaptive_retrieval.py)
    query_bank_weight: float = 0.5  # gamma, when fine is hubness: the weight of density among served queries
    query_bank_k: int = 10  # nearest bank queries whose mean cosine is b(d)
    query_bank_size: int = 1000  # most recent query vectors kept per tenant (the bench measured banks of up to 999)
    query_bank_min: int = 20  # below this many banked queries, b(d) is off
    query_bank_tenants: int = 64  # most tenants banked at once (size x dim x 4 bytes each); the least recent goes
    bm25_weight: float = 0.1  # w in (1 - w) * z(cosine) + w * z(bm25), when fine is bm25
    bm25_k1: float = 1.5
    bm25_b: float = 0.75
    threshold: str = "margin"  # margin | zscore | gap | none
    margin: float = 3.0  # margin: keep fine >= top - margin * std(fine)
    z: float = 1.0  # zscore: keep z(fine) >= z
    confidence_z: float = 3.0  # no confident context when the top's z(cosine) is below this ...
    min_cosine: float = 0.3  # ... and its cosine is below this as well

    def __post_init__(self):
        if self.threshold not in THRESHOLDS:
            raise ValueError(f"{self.threshold} is not a valid threshold ({', '.join(THRESHOLDS)})")
        if self.fine not in FINE_SIGNALS:
            raise ValueError(f"{self.fine} is not a valid fine signal ({', '.join(FINE_SIGNALS)})")
        if not 0.0 <= self.bm25_weight <= 1.0:
            raise ValueError("bm25_weight must be in [0, 1]")
        if self.hubness_weight < 0.0 or self.query_bank_weight < 0.0:
            raise ValueError("hubness_weight and query_bank_weight must be >= 0")

    @classmethod
    def from_settings(cls, s: Any) -> "AdaptiveConfig":
        """Read the ``retriever_*`` fields of the typed settings, where present."""
        d = cls()
        return cls(
            coarse_k=getattr(s, "retriever_coarse_k", d.coarse_k),
            max_hits=getattr(s, "retriever_max_hits", d.max_hits),
            fine=getattr(s, "retriever_fine", d.fine),
            hubness_weight=getattr(s, "retriever_hubness_weight", d.hubness_weight),
            query_bank_weight=getattr(s, "retriever_query_bank_weight", d.query_bank_weight),
            query_bank_k=getattr(s, "retriever_query_bank_k", d.query_bank_k),
            query_bank_size=getattr(s, "retriever_query_bank_size", d.query_bank_size),
            query_bank_tenants=getattr(s, "retriever_query_bank_tenants", d.query_bank_tenants),
            bm25_weight=getattr(s, "retriever_bm25_weight", d.bm25_weight),
            threshold=getattr(s, "retriever_threshold", d.threshold),
            margin=getattr(s, "retriever_margin", d.margin),
            z=getattr(s, "retriever_z", d.z),
            confidence_z=getattr(s, "retriever_confidence_z", d.confidence_z),
            min_cosine=getattr(s, "retriever_min_cosine", d.min_cosine),
        )


@dataclass
class RankedHit(Hit):
    """A hit after the fine stage. ``score`` stays the cosine; ``fine_score`` ranks."""

    coarse_score: float = 0.0  # cosine from the store
    fine_score: float = 0.0  # the blended z-score the fine stage ranks by
    lexical_score: float = 0.0  # BM25, when the hit comes from lexical + dense fusion


# ------------------------------------------------------------------ text (pure)

# bm25s's English stop words, plus the question words our queries start with
STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these "
    "they this to was will with what which who whom how why when where does do did can".split()
)
_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def light_stem(w: str) -> str:
    """Strip an English plural: 'memories' -> 'memory', 'classes' -> 'class', 'tables' -> 'table'."""
    if len(w) > 3 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 4 and w.endswith(("sses", "ches", "shes", "xes")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def tokenize(text: str) -> list[str]:
    return [light_stem(t) for t in _TOKEN.findall(text.lower()) if t not in STOPWORDS]


# ------------------------------------------------------------------ scores (pure)


def bm25_scores(query: Sequence[str], docs: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """BM25 of one tokenised query against a small tokenised collection, idf from that collection.

    idf = ln(1 + (N - df + 0.5) / (df + 0.5)) (Lucene), always positive. float64 (len(docs),).
    """
    n = len(docs)
    out = np.zeros(n, dtype=np.float64)
    if n == 0 or not query:
        return out
    lengths = np.array([len(d) for d in docs], dtype=np.float64)
    avgdl = max(lengths.mean(), 1.0)
    counts = [Counter(d) for d in docs]
    for term in set(query):
        tf = np.array([c.get(term, 0) for c in counts], dtype=np.float64)
        df = np.count_nonzero(tf)
        if df == 0:
            continue
        idf = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
        out += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths / avgdl))
    return out


def zscore(x: np.ndarray, axis: int = -1, eps: float = 1e-6) -> np.ndarray:
    """(x - mean) / std along ``axis``; a constant row becomes zeros, not NaN."""
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=axis, keepdims=True)
    sd = x.std(axis=axis, keepdims=True)
    return (x - mu) / np.maximum(sd, eps)


def hubness_corrected(dense: np.ndarray, hubness: np.ndarray, weight: float,
                      bank_density: np.ndarray | None = None, bank_weight: float = 0.0) -> np.ndarray:
    """z(cosine - weight * hubness - bank_weight * bank_density) over one query's candidates.

    With weight 1 and no bank this is CSLS's document side (the query side is
    one constant per query, which no ranking sees).
    """
    score = np.asarray(dense, np.float64) - weight * np.asarray(hubness, np.float64)
    if bank_density is not None and bank_weight > 0:
        score = score - bank_weight * np.asarray(bank_density, np.float64)
    return zscore(score)


def blend(dense: np.ndarray, lexical: np.ndarray, weight: float) -> np.ndarray:
    """(1 - weight) * z(dense) + weight * z(lexical), over one query's candidates."""
    return (1.0 - weight) * zscore(dense) + weight * zscore(lexical)


def margin_cut(scores: np.ndarray, margin: float) -> int:
    """How many of the scores (sorted high to low) lie within ``margin`` std of the top."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 0:
        return 0
    return int(np.count_nonzero(s >= s[0] - margin * s.std()))


def zscore_cut(scores: np.ndarray, z: float) -> int:
    """How many of the scores (sorted high to low) are at least ``z`` std above their mean (the top always counts)."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 0:
        return 0
    return max(1, int(np.count_nonzero(zscore(s) >= z)))


def gap_cut(scores: np.ndarray, max_keep: int) -> int:
    """Cut the scores (sorted high to low) at the largest drop among the first ``max_keep + 1``."""
    s = np.asarray(scores, dtype=np.float64)[: max_keep + 1]
    if len(s) <= 1:
        return len(s)
    return int(np.argmax(s[:-1] - s[1:])) + 1


def cut(scores: np.ndarray, cfg: AdaptiveConfig, max_keep: int) -> int:
    """How many of one query's sorted fine scores to keep, at most ``max_keep``."""
    if cfg.threshold == "margin":
        n = margin_cut(scores, cfg.margin)
    elif cfg.threshold == "zscore":
        n = zscore_cut(scores, cfg.z)
    elif cfg.threshold == "gap":
        n = gap_cut(scores, max_keep)
    else:
        n = len(scores)
    return min(n, max_keep)


def is_confident(coarse: np.ndarray, confidence_z: float, min_cosine: float) -> bool:
    """The top candidate stands out of the query's own candidates, or is close in absolute terms."""
    c = np.asarray(coarse, dtype=np.float64)
    if len(c) == 0:
        return False
    top = c.max()
    if top >= min_cosine:
        return True
    return len(c) > 1 and float(zscore(c).max()) >= confidence_z


# ------------------------------------------------------------------ the retriever


class QueryBank:
    """The most recent query vectors a worker has served, per tenant: a ring buffer of ``size`` each.

    The bank describes where questions land in the embedding space; the fine
    stage measures each candidate's density among them (QB-Norm). It holds
    vectors only, never text, and starts empty on every worker. At most
    ``max_tenants`` tenants are banked: a new one displaces the tenant served
    least recently, so the bank never holds more than
    ``max_tenants * size`` vectors.
    """

    def __init__(self, size: int = 1000, max_tenants: int = 64):
        if size < 1 or max_tenants < 1:
            raise ValueError("a query bank needs size >= 1 and max_tenants >= 1")
        self.size = size
        self.max_tenants = max_tenants
        self._vectors: dict[str, np.ndarray] = {}  # tenant -> (size, d), least recently served first
        self._filled: dict[str, int] = {}
        self._next: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, vectors: np.ndarray, tenants: Sequence[str]) -> list[str]:
        """Bank ``vectors`` (n, d) under their ``tenants``; returns the tenants displaced to make room."""
        vectors = np.asarray(vectors, np.float32)
        dropped: list[str] = []
        with self._lock:
            for v, t in zip(vectors, tenants):
                if t in self._vectors:
                    self._vectors[t] = self._vectors.pop(t)  # now the most recently served
                else:
                    if len(self._vectors) >= self.max_tenants:
                        old = next(iter(self._vectors))
                        del self._vectors[old], self._filled[old], self._next[old]
                        dropped.append(old)
                    self._vectors[t] = np.zeros((self.size, len(v)), np.float32)
                    self._filled[t] = self._next[t] = 0
                self._vectors[t][self._next[t]] = v
                self._next[t] = (self._next[t] + 1) % self.size
                self._filled[t] = min(self._filled[t] + 1, self.size)
        return [t for t in dropped if t not in self._vectors]

    def tenants(self) -> list[str]:
        with self._lock:
            return list(self._vectors)

    def get(self, tenant: str) -> np.ndarray:
        """The banked query vectors of ``tenant`` (n, d), a copy; (0, 0) when none."""
        with self._lock:
            if tenant not in self._vectors:
                return np.zeros((0, 0), np.float32)
            return self._vectors[tenant][: self._filled[tenant]].copy()

    def count(self, tenant: str = "") -> int:
        with self._lock:
            return self._filled.get(tenant, 0)

    def total(self) -> int:
        with self._lock:
            return sum(self._filled.values())


class _Store(Protocol):
    def search(self, vectors: np.ndarray, top_k: int, *, tenant: Any = "", include_synthetic: bool = True,
               with_vectors: bool = False) -> list[list[Hit]]: ...


class AdaptiveRetriever:
    """Coarse dense top-50, fine re-score, per-query threshold, at most 5 hits.

    Implements the query pipeline's ``Retriever`` protocol (:meth:`retrieve`).
    Every query it serves goes into its :class:`QueryBank` after its own
    re-score, so a query is never measured against itself.
    """

    def __init__(self, store: _Store, encoder: Any = None, config: AdaptiveConfig | None = None,
                 bank: QueryBank | None = None):
        self.store = store
        self.encoder = encoder  # only needed when search() is given texts without vectors
        self.config = config or AdaptiveConfig()
        self.bank = bank if bank is not None else QueryBank(self.config.query_bank_size,
                                                            self.config.query_bank_tenants)

    @property
    def uses_bank(self) -> bool:
        return self.config.fine == "hubness" and self.config.query_bank_weight > 0

    def coarse_stage(
        self, query_vecs: np.ndarray, k: int | None = None, *, tenants: str | Sequence[str] = "",
        include_synthetic: bool | Sequence[bool] = True,
    ) -> list[list[Hit]]:
        """Top-``k`` by cosine for each query vector: one store call per distinct (tenant, synthetic) filter."""
        k = k or self.config.coarse_k
        n = len(query_vecs)
        ts, syn = _per_query(tenants, n), _per_query(include_synthetic, n)
        out: list[list[Hit]] = [[] for _ in range(n)]
        groups: dict[tuple[str, bool], list[int]] = {}
        for i, key in enumerate(zip(ts, syn)):
            groups.setdefault(key, []).append(i)
        for (tenant, synth), idx in groups.items():
            res = self.store.search(np.asarray(query_vecs)[idx], k, tenant=tenant, include_synthetic=synth,
                                    with_vectors=self.uses_bank)
            for i, hits in zip(idx, res):
                out[i] = hits
        return out

    def bank_densities(self, candidates: Sequence[Sequence[Hit]], tenants: Sequence[str]) -> list[np.ndarray | None]:
        """Each query's candidates' mean cosine to their nearest banked queries, (C,) per query.

        One matrix product per tenant for the whole batch. None for a query whose
        tenant has banked fewer than ``query_bank_min`` queries, or whose store
        returned no vectors (the corpus hubness alone applies there).
        """
        from hybridrag.agents.rag.store import mean_top_similarity

        cfg = self.config
        out: list[np.ndarray | None] = [None] * len(candidates)
        if not self.uses_bank:
            return out
        by_tenant: dict[str, list[int]] = {}
        for i, (cands, t) in enumerate(zip(candidates, tenants)):
            if cands and all(getattr(h, "vector", None) is not None for h in cands):
                by_tenant.setdefault(t, []).append(i)
        for t, idx in by_tenant.items():
            if self.bank.count(t) < cfg.query_bank_min:
                continue
            vecs = np.stack([h.vector for i in idx for h in candidates[i]]).astype(np.float32)  # (sum C, d)
            dens = mean_top_similarity(vecs, self.bank.get(t), cfg.query_bank_k)
            at = 0
            for i in idx:
                out[i] = dens[at : at + len(candidates[i])]
                at += len(candidates[i])
        return out

    def fine_stage(
        self, queries: Sequence[str], query_vecs: np.ndarray, candidates: Sequence[Sequence[Hit]],
        tenants: str | Sequence[str] = "",
    ) -> list[list[RankedHit]]:
        """Re-score every candidate of every query; each list sorted by fine score, best first.

        ``query_vecs`` is unused by the built-in signals (the coarse cosine, the
        hubness and the candidates' vectors come with each hit); it is part of
        the signature so a token-level signal can plug in.
        """
        cfg = self.config
        banked = self.bank_densities(candidates, _per_query(tenants, len(queries)))
        out = []
        for q, cands, density in zip(queries, candidates, banked):
            if not cands:
                out.append([])
                continue
            dense = np.array([h.score for h in cands], dtype=np.float64)
            if cfg.fine == "hubness":
                fine = hubness_corrected(dense, [getattr(h, "hubness", 0.0) for h in cands], cfg.hubness_weight,
                                         density, cfg.query_bank_weight)
            elif cfg.fine == "bm25" and cfg.bm25_weight > 0:
                lexical = bm25_scores(tokenize(q), [tokenize(_hit_text(h)) for h in cands], cfg.bm25_k1, cfg.bm25_b)
                fine = blend(dense, lexical, cfg.bm25_weight)
            else:
                fine = zscore(dense)
            order = np.argsort(-fine, kind="stable")
            out.append([_ranked(cands[i], float(fine[i])) for i in order])
        return out

    def select(self, ranked: Sequence[Sequence[RankedHit]], max_keep: int | Sequence[int] | None = None
               ) -> list[list[RankedHit]]:
        """Apply each query's threshold to its fine-ranked candidates; [] means no confident context."""
        cfg = self.config
        n = len(ranked)
        keeps = [max_keep or cfg.max_hits] * n if not isinstance(max_keep, Sequence) else list(max_keep)
        out = []
        for hits, keep in zip(ranked, keeps):
            coarse = np.array([h.coarse_score for h in hits], dtype=np.float64)
            if not is_confident(coarse, cfg.confidence_z, cfg.min_cosine):
                out.append([])
                continue
            fine = np.array([h.fine_score for h in hits], dtype=np.float64)
            out.append(list(hits[: cut(fine, cfg, keep)]))
        return out

    def search(
        self, queries: Sequence[str], query_vecs: np.ndarray | None = None, *, max_keep: int | Sequence[int] | None = None,
        tenants: str | Sequence[str] = "", include_synthetic: bool | Sequence[bool] = True, learn: bool = True,
    ) -> list[list[RankedHit]]:
        """The three stages for a batch of queries (encoded here when no vectors are given).

        ``learn`` banks the batch's vectors afterwards, as serving does.
        """
        if query_vecs is None:
            if self.encoder is None:
                raise ValueError("AdaptiveRetriever.search needs query vectors or an encoder")
            query_vecs = self.encoder.encode(list(queries))
        cands = self.coarse_stage(query_vecs, tenants=tenants, include_synthetic=include_synthetic)
        out = self.select(self.fine_stage(queries, query_vecs, cands, tenants), max_keep)
        if learn:
            self.learn(query_vecs, _per_query(tenants, len(queries)))
        return out

    def learn(self, query_vecs: np.ndarray, tenants: Sequence[str]) -> None:
        """Bank a batch of served queries (after their own re-score), when the fine signal uses the bank."""
        if not self.uses_bank:
            return
        from hybridrag.agents.kafka import metrics

        for gone in self.bank.add(query_vecs, tenants):
            try:
                metrics.QUERY_BANK.remove(gone)
            except KeyError:  # displaced within the batch that banked it: never reported
                pass
        for t in set(tenants):
            metrics.QUERY_BANK.labels(t).set(self.bank.count(t))

    def retrieve(self, texts, vectors, top_k, tenants, include_synthetic):
        """The query pipeline's Retriever protocol: ranked hits per query and stage timings (ms)."""
        t0 = time.perf_counter()
        cands = self.coarse_stage(vectors, tenants=list(tenants), include_synthetic=list(include_synthetic))
        t1 = time.perf_counter()
        hits = self.select(self.fine_stage(texts, vectors, cands, list(tenants)), list(top_k))
        self.learn(vectors, list(tenants))
        t2 = time.perf_counter()
        return hits, {"search": (t1 - t0) * 1e3, "fine": (t2 - t1) * 1e3}


def _per_query(value, n: int) -> list:
    """One value for every query of a batch, or the per-query sequence as a list."""
    return [value] * n if isinstance(value, (str, bool)) else list(value)


def _hit_text(h: Hit) -> str:
    title = getattr(h, "title", "")
    return f"{title} {h.text}" if title and not h.text.lower().startswith(title.lower()) else h.text


def _ranked(h: Hit, fine: float) -> RankedHit:
    return RankedHit(
        id=h.id, doc_id=h.doc_id, chunk=h.chunk, text=h.text, score=h.score, synthetic=h.synthetic,
        tenant=h.tenant, title=getattr(h, "title", ""), hubness=getattr(h, "hubness", 0.0), coarse_score=h.score,
        fine_score=fine,
    )


# ------------------------------------------------------------------ exact in-memory index


class NumpyIndex:
    """Exact cosine search over an in-memory matrix, with the store's ``search`` signature.

    The evaluation's coarse stage: what Milvus Lite's FLAT index computes,
    without a database, so the BEIR sets can be scored quickly. Each hit
    carries its hubness over the whole corpus, as a refreshed store has it.
    """

    def __init__(self, doc_ids: Sequence[str], vectors: np.ndarray, texts: Sequence[str], hubness_k: int = 20):
        from hybridrag.agents.rag.store import mean_top_similarity

        self.doc_ids, self.vectors, self.texts = list(doc_ids), np.asarray(vectors, np.float32), list(texts)
        self.hubness = (mean_top_similarity(self.vectors, self.vectors, hubness_k, np.arange(len(self.vectors)))
                        if hubness_k > 0 else np.zeros(len(self.vectors), np.float32))

    def search(self, vectors: np.ndarray, top_k: int, *, tenant: Any = "", include_synthetic: bool = True,
               with_vectors: bool = False) -> list[list[Hit]]:
        from hybridrag.agents.evaluation.harness import top_k_cosine

        vectors = np.asarray(vectors, np.float32)
        top = top_k_cosine(vectors, self.vectors, top_k)  # (Q, k)
        scores = np.einsum("qd,qkd->qk", vectors, self.vectors[top])  # (Q, k)
        return [
            [Hit(chunk_id(self.doc_ids[d], 0), self.doc_ids[d], 0, self.texts[d], float(s), hubness=float(self.hubness[d]),
                 vector=self.vectors[d] if with_vectors else None)
             for d, s in zip(row, srow)]
            for row, srow in zip(top, scores)
        ]

    def count(self) -> int:
        return len(self.doc_ids)


# ------------------------------------------------------------------ evaluation systems


ONLINE_BATCH = 16  # queries per micro-batch when an evaluation replays a query set as traffic


def serve_as_traffic(retriever: AdaptiveRetriever, texts: Sequence[str], vecs: np.ndarray) -> list[list[RankedHit]]:
    """Replay a query set as served: micro-batches in order, each banked after its own re-score."""
    out: list[list[RankedHit]] = []
    for s in range(0, len(texts), ONLINE_BATCH):
        out.extend(retriever.search(texts[s : s + ONLINE_BATCH], vecs[s : s + ONLINE_BATCH]))
    return out


def adaptive_retriever_factory(config: AdaptiveConfig | None = None):
    """A factory for :class:`hybridrag.agents.evaluation.harness.DenseSystem`: adaptive retrieval over an exact index."""

    def factory(doc_ids: list[str], doc_vecs: np.ndarray, doc_texts: list[str]):
        retriever = AdaptiveRetriever(NumpyIndex(doc_ids, doc_vecs, doc_texts), config=config)

        def retrieve(query_texts: list[str], query_vecs: np.ndarray, k: int) -> list[list[str]]:
            # as served, with a bank that starts empty; the adaptive retriever decides how many
            # to return (at most max_hits), whatever k is
            return [[h.doc_id for h in hs] for hs in serve_as_traffic(retriever, query_texts, query_vecs)]

        return retrieve

    return factory


def served_top_k_factory(top_k: int, min_score: float):
    """A factory for :class:`hybridrag.agents.evaluation.harness.DenseSystem`: the plain top-k the service serves
    (``top_k`` hits with cosine >= ``min_score``), whatever depth the harness asks for."""

    def factory(doc_ids: list[str], doc_vecs: np.ndarray, doc_texts: list[str]):
        index = NumpyIndex(doc_ids, doc_vecs, doc_texts, hubness_k=0)

        def retrieve(query_texts: list[str], query_vecs: np.ndarray, k: int) -> list[list[str]]:
            return [[h.doc_id for h in hits if h.score >= min_score] for hits in index.search(query_vecs, top_k)]

        return retrieve

    return factory



# ------------------------------------------------------------------ lexical + dense fusion

FUSION_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # the blend weights a collection chooses among


def union_scores(dense: Sequence[Hit], lexical: Sequence[Hit], query_vec: np.ndarray | None, depth: int
                 ) -> tuple[list[Hit], np.ndarray, np.ndarray]:
    """One query's candidates from both lists, with a cosine and a BM25 score for each.

    A lexical-only candidate's cosine comes from its stored vector when the hit
    carries one, else it takes the lowest cosine of the dense list (it ranked
    below all of them). A dense-only candidate's BM25 is 0 when the lexical list
    is shorter than ``depth`` (every other row matched no term), else the lowest
    BM25 of the list. Returns (hits, cosine (C,), bm25 (C,)), dense hits first.
    """
    by_id: dict[str, Hit] = {}
    cos: dict[str, float] = {}
    lex: dict[str, float] = {}
    for h in dense:
        by_id.setdefault(h.id, h)
        cos[h.id] = h.score
    for h in lexical:
        by_id.setdefault(h.id, h)
        lex[h.id] = h.score
    floor_cos = min(cos.values()) if cos else 0.0
    floor_lex = min(lex.values()) if len(lexical) >= depth else 0.0
    hits = list(by_id.values())
    dense_s = np.empty(len(hits), np.float64)
    lex_s = np.empty(len(hits), np.float64)
    for i, h in enumerate(hits):
        if h.id in cos:
            dense_s[i] = cos[h.id]
        elif query_vec is not None and getattr(h, "vector", None) is not None:
            dense_s[i] = float(np.dot(query_vec, h.vector))
        else:
            dense_s[i] = floor_cos
        lex_s[i] = lex.get(h.id, floor_lex)
    return hits, dense_s, lex_s


def fuse(dense: Sequence[Hit], lexical: Sequence[Hit], weight: float, query_vec: np.ndarray | None = None,
         depth: int = 50) -> list[RankedHit]:
    """Rank one query's dense and lexical candidates by (1 - w) z(cosine) + w z(BM25), best first.

    Per-query z-scores put a cosine and a BM25 score, whose scales differ by
    corpus and by query, on one scale (a normalised linear blend beats rank
    fusion when one side is weak; Bruch et al. 2023, https://arxiv.org/abs/2210.11934).
    ``score`` stays the cosine; ``fine_score`` is the blend.
    """
    hits, dense_s, lex_s = union_scores(dense, lexical, query_vec, depth)
    if not hits:
        return []
    fused = blend(dense_s, lex_s, weight)
    order = np.argsort(-fused, kind="stable")
    out = []
    for i in order:
        r = _ranked(hits[i], float(fused[i]))
        r.score = r.coarse_score = float(dense_s[i])
        r.lexical_score = float(lex_s[i])
        out.append(r)
    return out


def pseudo_queries(texts: Sequence[str], n: int, seed: int = 0, min_words: int = 4) -> list[tuple[int, str, str]]:
    """Label-free (passage index, query, what is left of the passage) triples that a corpus gives for free.

    A passage of two or more sentences gives one of its sentences as the query
    and the rest as the passage to find: the inverse cloze task (Lee et al.
    2019, https://arxiv.org/abs/1906.00300). A one-sentence passage gives a
    contiguous third of its words, and the other words are the passage
    (cropping, Izacard et al. 2021, https://arxiv.org/abs/2112.09118). The query
    never stays inside its passage, so BM25 cannot win by copying it.
    """
    from hybridrag.models.corpora import split_sentences

    rng = np.random.default_rng(seed)
    out: list[tuple[int, str, str]] = []
    for i in rng.permutation(len(texts)):
        if len(out) >= n:
            break
        sentences = split_sentences(texts[i])
        usable = [j for j, s in enumerate(sentences) if len(s.split()) >= min_words]
        if len(sentences) >= 2 and usable:
            j = int(rng.choice(usable))
            out.append((int(i), sentences[j], " ".join(sentences[:j] + sentences[j + 1:])))
            continue
        words = texts[i].split()
        if len(words) >= 3 * min_words // 2 + 2:
            span = max(2, len(words) // 3)
            at = int(rng.integers(0, len(words) - span + 1))
            out.append((int(i), " ".join(words[at:at + span]), " ".join(words[:at] + words[at + span:])))
    return out


def fusion_curve(dense_top: Sequence[Sequence[Hit]], lexical_top: Sequence[Sequence[Hit]],
                 relevant: Sequence[str], grid: Sequence[float] = FUSION_GRID, depth: int = 50) -> np.ndarray:
    """Mean nDCG@10 (one relevant id per query) of the fused ranking at every weight of ``grid``. (len(grid),)"""
    out = np.zeros(len(grid), np.float64)
    for d, l, rel in zip(dense_top, lexical_top, relevant):
        hits, dense_s, lex_s = union_scores(d, l, None, depth)
        target = [i for i, h in enumerate(hits) if h.id == rel]
        if not target:
            continue
        zd, zl = zscore(dense_s), zscore(lex_s)
        for gi, w in enumerate(grid):
            fused = (1.0 - w) * zd + w * zl
            rank = int(np.count_nonzero(fused > fused[target[0]]))  # ties go to the relevant one
            if rank < 10:
                out[gi] += 1.0 / math.log2(rank + 2)
    return out / max(len(relevant), 1)


def pick_weight(curve: np.ndarray, grid: Sequence[float] = FUSION_GRID) -> int:
    """Index of the best weight on a 3-point moving average of the curve (a few hundred pseudo-queries are noisy)."""
    c = np.asarray(curve, np.float64)
    padded = np.concatenate([c[:1], c, c[-1:]])
    smooth = (padded[:-2] + padded[1:-1] + padded[2:]) / 3
    return int(np.argmax(smooth))


@dataclass
class FusionChoice:
    weight: float
    check: float  # the pseudo-queries' nDCG@10 at that weight: the self-check
    curve: dict  # weight -> pseudo-query nDCG@10
    queries: int
    seconds: float


def choose_fusion_weight(texts: Sequence[str], vectors: np.ndarray, encode, groups: Sequence[str] | None = None,
                         n_queries: int = 200, n_distractors: int = 5000, depth: int = 50, seed: int = 0,
                         grid: Sequence[float] = FUSION_GRID) -> FusionChoice | None:
    """Choose the blend weight for a corpus without labels, from its own pseudo-queries.

    The pseudo-queries' passages (re-encoded without their query) join up to
    ``n_distractors`` other passages of the corpus (stored vectors), none from
    the same document (``groups``: a chunk's neighbours share its text). Both
    searches run over that corpus as serving runs them (exact cosine; the
    store's BM25), and the weight with the best nDCG@10 wins. None when the
    corpus gives too few pseudo-queries (under 20).
    """
    from hybridrag.agents.rag.store import ExactMirror

    t0 = time.perf_counter()
    triples = pseudo_queries(texts, n_queries, seed)
    if len(triples) < 20:
        return None
    groups = list(groups) if groups is not None else [str(i) for i in range(len(texts))]
    taken = {groups[i] for i, _, _ in triples}
    rng = np.random.default_rng(seed + 1)
    others = [j for j in rng.permutation(len(texts)) if groups[j] not in taken][:n_distractors]
    queries = [q for _, q, _ in triples]
    enc = np.asarray(encode(queries + [p for _, _, p in triples]), np.float32)
    q_vecs, p_vecs = enc[: len(triples)], enc[len(triples):]
    index = ExactMirror(vectors.shape[1])
    for k, (_, _, passage) in enumerate(triples):
        index.put(f"p{k}", p_vecs[k], f"p{k}", 0, passage, "", "", False, lexical=passage)
    for j in others:
        index.put(f"d{j}", vectors[j], f"d{j}", 0, texts[j], "", "", False, lexical=texts[j])
    dense_top = index.search(q_vecs, depth, "", True)
    lexical_top = index.lexical_search(queries, depth, "", True)
    curve = fusion_curve(dense_top, lexical_top, [f"p{k}" for k in range(len(triples))], grid, depth)
    best = pick_weight(curve, grid)
    return FusionChoice(float(grid[best]), float(curve[best]), {float(w): float(c) for w, c in zip(grid, curve)},
                        len(triples), time.perf_counter() - t0)


# ------------------------------------------------------------------ serving: the hybrid retriever


@dataclass(frozen=True)
class FusionConfig:
    depth: int = 50  # candidates taken from each of the dense and the lexical search
    weight: float = -1.0  # the blend weight; < 0: the one chosen for the collection (default_weight until then)
    default_weight: float = 0.2  # before a collection has chosen (the middle of the weights the eval sets choose)
    min_score: float = 0.2  # a source is cited when its cosine reaches this ...
    lexical_min_z: float = 2.0  # ... or its BM25 stands this many std above the query's lexical candidates
    rechoose_growth: float = 4.0  # choose again when the collection has grown by this factor
    min_rows: int = 200  # fewer rows give too few distractors to choose against
    pseudo_queries: int = 100  # pseudo-queries per choice (each re-encodes its passage: the cost of a choice)

    @classmethod
    def from_settings(cls, s: Any) -> "FusionConfig":
        d = cls()
        weight = getattr(s, "retriever_fusion_weight", d.weight)
        if getattr(s, "retriever", "") == "lexical":
            weight = 1.0
        return cls(depth=getattr(s, "retriever_fusion_depth", d.depth), weight=weight,
                   min_score=getattr(s, "min_score", d.min_score),
                   lexical_min_z=getattr(s, "retriever_lexical_min_z", d.lexical_min_z),
                   rechoose_growth=getattr(s, "retriever_fusion_rechoose_growth", d.rechoose_growth))


class FusionTuner:
    """Owns a collection's blend weight: chosen from the corpus's pseudo-queries, kept in its properties.

    :meth:`maybe_choose` (called after each ingest batch) chooses it, in a
    background thread so that ingest goes on, once the collection holds
    ``min_rows`` rows and again each time it has grown by ``rechoose_growth``
    (a geometric schedule: a handful of choices over a collection's life). The weight, its self-check nDCG@10 and the row count go
    into the collection's properties (so a restarted or second worker reads the
    same), ``/health`` and the ``hybridrag_fusion_weight`` metric.
    """

    def __init__(self, store: Any, encoder: Any, config: FusionConfig | None = None):
        self.store = store
        self.encoder = encoder
        self.config = config or FusionConfig()
        state = store.fusion_state() if hasattr(store, "fusion_state") else None
        self.weight, self.check, self.rows = state if state else (self.config.default_weight, float("nan"), 0)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._report()

    def due(self) -> bool:
        n = self.store.count()
        return n >= self.config.min_rows and (self.rows == 0 or n >= self.config.rechoose_growth * self.rows)

    def maybe_choose(self, wait: bool = False) -> FusionChoice | None:
        """Start a choice when one is due; ``wait`` runs it here and returns it."""
        if self.config.weight >= 0 or not getattr(self.store, "has_lexical", False) or not self.due():
            return None
        if wait:
            return self.choose()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._choose_logged, name="fusion-weight", daemon=True)
            self._thread.start()
        return None

    def _choose_logged(self) -> None:
        try:
            self.choose()
        except Exception:  # a failed choice keeps the current weight; the next ingest batch tries again
            import logging

            logging.getLogger(__name__).exception("choosing the fusion weight failed; keeping %.2f", self.weight)

    def choose(self) -> FusionChoice | None:
        with self._lock:
            if not self.due():
                return None
            n = self.store.count()
            texts, vectors, groups = self.store.sample_rows(max(self.config.pseudo_queries * 25, 5000))
            choice = choose_fusion_weight(texts, vectors, self.encoder.encode, groups,
                                          n_queries=self.config.pseudo_queries, depth=self.config.depth)
            if choice is None:
                return None
            self.weight, self.check, self.rows = choice.weight, choice.check, n
            self.store.set_fusion_state(choice.weight, choice.check, n)
            self._report()
        import logging

        logging.getLogger(__name__).info(
            "fusion weight of %s: %.2f (self-check nDCG@10 %.3f on %d pseudo-queries, %d rows, %.1fs)",
            getattr(self.store, "name", "?"), choice.weight, choice.check, choice.queries, n, choice.seconds)
        return choice

    def current(self) -> float:
        return self.config.weight if self.config.weight >= 0 else self.weight

    def _report(self) -> None:
        from hybridrag.agents.kafka import metrics

        metrics.FUSION_WEIGHT.set(self.current())
        if self.check == self.check:  # not NaN
            metrics.FUSION_CHECK.set(self.check)

    def health(self) -> dict:
        return {"weight": self.current(), "chosen": self.config.weight < 0 and self.rows > 0,
                "self_check_ndcg10": None if self.check != self.check else round(self.check, 4),
                "rows_when_chosen": self.rows}


class HybridRetriever:
    """Dense and lexical search over the same collection, fused per query (the query pipeline's Retriever).

    One dense and one lexical store call per distinct (tenant, synthetic) filter
    of a batch; the tuner's weight blends them (:func:`fuse`). A collection
    without a lexical index serves the dense ranking alone.
    """

    def __init__(self, store: Any, tuner: FusionTuner, config: FusionConfig | None = None):
        self.store = store
        self.tuner = tuner
        self.config = config or tuner.config

    def retrieve(self, texts, vectors, top_k, tenants, include_synthetic):
        t0 = time.perf_counter()
        cfg = self.config
        n = len(texts)
        dense: list[list[Hit]] = [[] for _ in range(n)]
        lexical: list[list[Hit]] = [[] for _ in range(n)]
        groups: dict[tuple[str, bool], list[int]] = {}
        for i, key in enumerate(zip(tenants, include_synthetic)):
            groups.setdefault(key, []).append(i)
        for (tenant, synth), idx in groups.items():
            vecs = np.asarray(vectors)[idx]
            for i, hs in zip(idx, self.store.search(vecs, cfg.depth, tenant=tenant, include_synthetic=synth)):
                dense[i] = hs
            lex = self.store.lexical_search([texts[i] for i in idx], cfg.depth, tenant=tenant,
                                            include_synthetic=synth, with_vectors=True)
            for i, hs in zip(idx, lex):
                lexical[i] = hs
        t1 = time.perf_counter()
        weight = self.tuner.current()
        out = []
        for i in range(n):
            ranked = fuse(dense[i], lexical[i], weight, np.asarray(vectors[i]), cfg.depth)
            out.append([h for h in ranked if self._citable(h, lexical[i])][: top_k[i]])
        return out, {"search": (t1 - t0) * 1e3, "fine": (time.perf_counter() - t1) * 1e3}

    def _citable(self, h: RankedHit, lexical: Sequence[Hit]) -> bool:
        """Close enough by cosine, or a lexical match that stands out of the query's lexical candidates."""
        if h.score >= self.config.min_score:
            return True
        if self.tuner.current() <= 0 or not lexical or h.lexical_score <= 0:
            return False
        lex = np.array([x.score for x in lexical], np.float64)
        if len(lex) == 1:
            return True  # the only row that shares a term with the query
        return (h.lexical_score - lex.mean()) / max(lex.std(), 1e-6) >= self.config.lexical_min_z
