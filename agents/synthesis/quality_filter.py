"""Quality filter for synthetic documents: what the diffusion models write is kept only if it earns it.

A sample is dropped, with every reason recorded, when it is

* ``off_topic``: its encoder cosine to the query is below ``min_query_similarity``;
* ``duplicate_sample``: a near-duplicate (cosine >= ``max_sample_similarity``) of
  a sample kept before it in the same batch (samples are visited best first, by
  query similarity, so the best of a cluster survives);
* ``duplicate_store``: a near-duplicate (cosine >= ``max_store_similarity``) of
  a document already in the store, found through a search callable;
* ``repetitive``: too many repeated words or bigrams (degenerate loops such as
  "the the the" or "of the of the");
* ``unknown_tokens``: too many ``[UNK]`` tokens (words outside the model's vocabulary);
* ``disfluent``: its word order is no better than a shuffle of its own words
  (:func:`hybridrag.agents.synthesis.fluency.order_gain` below ``min_order_gain``):
  shuffled text and word salad, whose word-level statistics pass every other check;
* ``too_short``: fewer than ``min_words`` words (punctuation marks are not words);
* ``copy_of_context``: a sample rewritten from a context passage (the text
  diffusion model's partial denoising, SDEdit) that changed less than
  ``min_context_edit_rate`` of its words: a rewrite must not be a copy.

Embedding-only samples (the prior's output, no text) get the similarity and
duplicate checks only. Everything here is pure: NumPy in, decisions out.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from hybridrag.agents.synthesis.fluency import order_gain

# ``search(vecs (N, D)) -> (N,)``: the highest cosine of each vector to a stored document.
StoreSearch = Callable[[np.ndarray], np.ndarray]

_WORD = re.compile(r"[\w']+|[^\w\s]")


@dataclass
class FilterConfig:
    # cosine(sample, query), MiniLM: real held-out (query, passage) pairs sit at a
    # median 0.37, 25th percentile 0.24; shuffled pairs at a 95th percentile 0.22
    min_query_similarity: float = 0.25
    max_sample_similarity: float = 0.95  # cosine between two samples of one batch: above is a near-duplicate
    max_store_similarity: float = 0.95  # cosine to an existing document: above is a near-duplicate
    max_unigram_repetition: float = 0.5  # share of words that repeat an earlier word
    max_bigram_repetition: float = 0.2  # share of bigrams that repeat an earlier bigram
    max_unknown_rate: float = 0.1  # share of [UNK] tokens
    min_words: int = 3  # shorter texts say nothing (punctuation is not a word: "-bee ()" is one word)
    # word-level edit distance to the context the sample was rewritten from, over the longer length:
    # below this the sample is the context with a word or so swapped, i.e. a copy (one word in five must change)
    min_context_edit_rate: float = 0.2
    # bigram-over-unigram gain of the text's order over shuffles of its own words (nats/word), scored on texts of at
    # least min_order_words words. Held-out WordNet, Brown and chatterbot text: 5th percentile 0.4-0.8, median 2.3-2.7;
    # the same texts shuffled, or word salad: median ~0 (bench/results/diffusion_minilm.json, "filter_calibration")
    min_order_gain: float = 0.75
    min_order_words: int = 4  # distinct words


@dataclass
class Candidate:
    """One sample to judge: text (None for embedding-only), its encoder embedding, and its [UNK] count if known."""

    embedding: np.ndarray  # (D,) float32, L2-normalised
    text: str | None = None
    unknown_tokens: int = 0
    total_tokens: int = 0
    context: str | None = None  # the passage the sample was rewritten from (None: written from scratch)


@dataclass
class FilterScores:
    query_similarity: float
    max_sample_similarity: float = 0.0  # to the samples kept before it
    max_store_similarity: float | None = None  # None when no store was searched
    unigram_repetition: float | None = None
    bigram_repetition: float | None = None
    unknown_rate: float | None = None
    words: int | None = None
    context_edit_rate: float | None = None  # word-level edit rate to its context (None: no context)
    order_gain: float | None = None  # fluency of its word order over shuffles (None: too short to score)


@dataclass
class Decision:
    kept: bool
    reasons: list[str] = field(default_factory=list)
    scores: FilterScores | None = None

    def as_dict(self) -> dict:
        return {"kept": self.kept, "reasons": list(self.reasons), "scores": asdict(self.scores) if self.scores else None}


# ---------------------------------------------------------------- measures (pure)


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks."""
    return _WORD.findall(text.lower())


def repetition_rate(tokens: Sequence[str], n: int = 1) -> float:
    """Share of n-grams that already occurred earlier in the sequence: 0 for none, -> 1 for a loop."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences: insertions, deletions and substitutions, each 1."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def edit_rate(sample: Sequence[str], context: Sequence[str]) -> float:
    """Share of the sample that differs from its context: edit distance over the longer length, in [0, 1].

    0 for a verbatim copy; 1 when no word survives in place.
    """
    longest = max(len(sample), len(context))
    return edit_distance(sample, context) / longest if longest else 0.0


def unknown_rate(unknown_tokens: int, total_tokens: int) -> float:
    return unknown_tokens / total_tokens if total_tokens > 0 else 0.0


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, D) x (M, D) -> (N, M) cosines (rows need not be normalised)."""
    a = a / np.linalg.norm(a, axis=-1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True).clip(1e-12)
    return a @ b.T


def matrix_store_search(doc_vecs: np.ndarray) -> StoreSearch:
    """A :data:`StoreSearch` over an in-memory (M, D) matrix of L2-normalised document vectors."""

    def search(vecs: np.ndarray) -> np.ndarray:
        if len(doc_vecs) == 0:
            return np.zeros(len(vecs), dtype=np.float32)
        return (vecs @ doc_vecs.T).max(axis=1)

    return search


# ---------------------------------------------------------------- the filter


def judge(
    query_vec: np.ndarray,
    candidates: Sequence[Candidate],
    cfg: FilterConfig = FilterConfig(),
    store_search: StoreSearch | None = None,
) -> list[Decision]:
    """Decisions for one query's samples, in the order of ``candidates``."""
    if not candidates:
        return []
    vecs = np.stack([c.embedding for c in candidates]).astype(np.float32)  # (N, D)
    q_sim = cosine_matrix(vecs, query_vec[None])[:, 0]  # (N,)
    store_sim = np.asarray(store_search(vecs), dtype=np.float32) if store_search is not None else None
    pair_sim = cosine_matrix(vecs, vecs)  # (N, N)

    decisions: list[Decision | None] = [None] * len(candidates)
    kept: list[int] = []
    for i in np.argsort(-q_sim, kind="stable"):
        c = candidates[i]
        scores = FilterScores(query_similarity=float(q_sim[i]))
        reasons: list[str] = []
        if q_sim[i] < cfg.min_query_similarity:
            reasons.append("off_topic")
        if kept:
            scores.max_sample_similarity = float(pair_sim[i, kept].max())
            if scores.max_sample_similarity >= cfg.max_sample_similarity:
                reasons.append("duplicate_sample")
        if store_sim is not None:
            scores.max_store_similarity = float(store_sim[i])
            if store_sim[i] >= cfg.max_store_similarity:
                reasons.append("duplicate_store")
        if c.text is not None:
            w = words(c.text)
            scores.words = sum(1 for t in w if any(ch.isalnum() for ch in t))
            scores.unigram_repetition = repetition_rate(w, 1)
            scores.bigram_repetition = repetition_rate(w, 2)
            scores.unknown_rate = unknown_rate(c.unknown_tokens, c.total_tokens)
            if scores.words < cfg.min_words:
                reasons.append("too_short")
            if scores.unigram_repetition > cfg.max_unigram_repetition or scores.bigram_repetition > cfg.max_bigram_repetition:
                reasons.append("repetitive")
            if scores.unknown_rate > cfg.max_unknown_rate:
                reasons.append("unknown_tokens")
            # a text of few distinct words has no order to judge (a loop is the repetition check's)
            if len({t for t in w if any(ch.isalnum() for ch in t)}) >= cfg.min_order_words:
                gain, _ = order_gain(c.text)
                scores.order_gain = gain
                if gain < cfg.min_order_gain:
                    reasons.append("disfluent")
            if c.context is not None:
                scores.context_edit_rate = edit_rate(w, words(c.context))
                if scores.context_edit_rate < cfg.min_context_edit_rate:
                    reasons.append("copy_of_context")
        if not reasons:
            kept.append(int(i))
        decisions[i] = Decision(kept=not reasons, reasons=reasons, scores=scores)
    return decisions  # type: ignore[return-value]


def pass_rate(decisions: Sequence[Decision]) -> float:
    return sum(d.kept for d in decisions) / len(decisions) if decisions else 0.0


def reason_counts(decisions: Sequence[Decision]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in decisions:
        for r in d.reasons:
            out[r] = out.get(r, 0) + 1
    return out
