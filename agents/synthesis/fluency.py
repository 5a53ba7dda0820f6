"""Fluency of a text by how much a word-bigram model beats a unigram model on it: real text passes, shuffled and salad do not.

A sample of the text diffusion model is English when its words follow each
other the way English words do. The score is the mean, over a text's words,
of ``log P(w_i | w_{i-1}) - log P(w_i)``: the pointwise mutual information
of each word with the one before it under a bigram model with Dirichlet
smoothing toward the unigram model (MacKay & Peto 1995). Real text scores well
above zero (its neighbours predict each other); the same words shuffled, or
words drawn at random ("word salad"), score near or below zero, and their
unigram statistics, which the other checks read, are unchanged.

The counts come from the project's general-domain training text (Brown,
WordNet glosses and examples, chatterbot, Wikipedia and Lee paragraphs; never
FOLDOC, man pages, Python's documentation or Debian package descriptions),
hashed into fixed tables that ship beside this file (``fluency_table.npz``,
built by :func:`build_table`, ``python -m hybridrag.agents.synthesis.fluency``).
Scoring is pure NumPy.
"""

from __future__ import annotations

import re
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np

TABLE = Path(__file__).resolve().parent / "fluency_table.npz"
UNI_BUCKETS = 1 << 18
BI_BUCKETS = 1 << 21
PRIOR = 4.0  # Dirichlet pseudo-count of the bigram model toward the unigram model
START = "<s>"

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[.,;:!?()]")


def tokens(text: str) -> list[str]:
    """Lower-cased words and the punctuation marks that order words (brackets, stops, commas)."""
    return _TOKEN.findall(text.lower())


def _h(s: str, buckets: int) -> int:
    return zlib.crc32(s.encode("utf-8")) % buckets


def build_table(texts: Iterable[str]) -> dict[str, np.ndarray]:
    """Hashed unigram and bigram counts of ``texts`` (uint32), and the total count."""
    uni_idx: list[int] = []
    bi_idx: list[int] = []
    for text in texts:
        toks = [START, *tokens(text)]
        uni_idx += [_h(t, UNI_BUCKETS) for t in toks]
        bi_idx += [_h(f"{a} {b}", BI_BUCKETS) for a, b in zip(toks, toks[1:])]
    uni = np.bincount(np.asarray(uni_idx, dtype=np.int64), minlength=UNI_BUCKETS).astype(np.uint32)
    bi = np.bincount(np.asarray(bi_idx, dtype=np.int64), minlength=BI_BUCKETS).astype(np.uint32)
    return {"uni": uni, "bi": bi, "total": np.array([uni.sum()], dtype=np.int64)}


@lru_cache(maxsize=2)
def load_table(path: str = str(TABLE)) -> dict[str, np.ndarray]:
    z = np.load(path)
    return {k: z[k] for k in z.files}


def fluency(text: str, table: dict[str, np.ndarray] | None = None) -> tuple[float, int]:
    """Mean bigram-over-unigram log gain per word of ``text`` (nats), and the number of words scored.

    Words are scored from the second on (the first has only the start symbol
    before it, which would reward any common first word).
    """
    table = table if table is not None else load_table()
    toks = [START, *tokens(text)]
    if len(toks) < 3:
        return 0.0, 0
    uni, bi, total = table["uni"], table["bi"], float(table["total"][0])
    u = np.array([uni[_h(t, UNI_BUCKETS)] for t in toks], dtype=np.float64)
    b = np.array([bi[_h(f"{x} {y}", BI_BUCKETS)] for x, y in zip(toks, toks[1:])], dtype=np.float64)
    p_uni = (u[1:] + 0.5) / (total + 0.5 * UNI_BUCKETS)
    p_bi = (b + PRIOR * p_uni) / (u[:-1] + PRIOR)
    gain = np.log(p_bi) - np.log(p_uni)
    return float(gain[1:].mean()), len(gain) - 1


def order_gain(text: str, shuffles: int = 8, table: dict[str, np.ndarray] | None = None) -> tuple[float, int]:
    """:func:`fluency` of ``text`` minus its mean over ``shuffles`` seeded shuffles of its own words, and the words scored.

    The text is its own baseline, so a domain's rare words (unseen bigrams
    lower every order alike) do not count against it: English order scores
    ~2 nats above its shuffles; a shuffled text or word salad scores ~0.
    """
    f0, n = fluency(text, table)
    if n == 0:
        return 0.0, 0
    words = text.split()
    rng = np.random.default_rng(zlib.crc32(text.encode("utf-8")))
    fs = [fluency(" ".join(rng.permutation(words).tolist()), table)[0] for _ in range(shuffles)]
    return f0 - float(np.mean(fs)), n


def training_texts() -> list[str]:
    """The general-domain text the table counts: training splits only, FOLDOC never."""
    from hybridrag.models import corpora

    texts = corpora.training_texts(sources=("wordnet", "chatterbot", "brown", "lee", "wiki"))
    return texts


def main() -> None:
    texts = training_texts()
    table = build_table(texts)
    np.savez_compressed(TABLE, **table)
    print(f"wrote {TABLE} from {len(texts)} texts, {int(table['total'][0])} tokens")


if __name__ == "__main__":
    main()
