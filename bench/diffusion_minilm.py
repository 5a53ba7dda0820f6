"""Benchmark of the text-diffusion generator that starts from MiniLM, on the held-out domain (FOLDOC), references in the same run.

On FOLDOC (never trained on by any generator), one run:

- round trip (Alberti et al. 2019's consistency filter): a pseudo-query written
  for a passage retrieves that passage in MiniLM's top 10 among the 5,000
  candidate passages; against two references, the passage's own title (the
  FOLDOC headword) and a random sentence of the passage (ICT);
- kept by the quality filter: the new model's pseudo-queries (passage -> query,
  judged against the passage) and passages (term -> passage), against today's
  model (``text-diffusion-v1``) writing for the same terms, from scratch and
  rewriting the passage MiniLM retrieves for the term (its shipped default);
- throughput: pseudo-queries per second, batched, with and without the
  sampler's cache, FP32 and BF16, and the projected time for 5,000 passages x 3;
- from-teacher against from-scratch at equal training time: held-out loss and
  masked-token accuracy from the two runs' validation logs, and kept rate;
- the filter's calibration: real held-out text against the same text shuffled
  and word salad.

Twenty uncurated samples per direction (the first 20 passages by FOLDOC id, none
skipped) go to ``bench/results/diffusion_minilm_samples.md`` beside today's model;
every figure to ``bench/results/diffusion_minilm.json``.

    python bench/diffusion_minilm.py [--n-round-trip 300] [--n-kept 200]
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import typer

from hybridrag.agents.synthesis.quality_filter import Candidate, FilterConfig, judge, pass_rate, reason_counts
from hybridrag.models import corpora
from hybridrag.models import train_diffusion as T

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results"

app = typer.Typer(add_completion=False)


def foldoc_set(n: int = 5000) -> list[tuple[str, str, str]]:
    """(uid, title, passage) of the first ``n`` FOLDOC entries by id whose first paragraph has at least 8 words."""
    rows = []
    for e in sorted(corpora.foldoc_entries(), key=lambda e: e.uid):
        p = corpora.foldoc_first_paragraph(e)
        if len(p.split()) >= 8:
            rows.append((e.uid, e.names[0], p))
    return rows[:n]


def embed(encoder, texts: list[str]) -> np.ndarray:
    """MiniLM vectors through the diffusion trainer's content-keyed store (each text is encoded once, ever)."""
    q, _ = T.pair_embeddings([(t, t) for t in texts], encoder)
    return q


def recall_at(query_vecs: np.ndarray, passage_vecs: np.ndarray, gold: np.ndarray, k: int = 10) -> float:
    """Share of queries whose gold passage is among the ``k`` nearest by cosine."""
    sims = query_vecs @ passage_vecs.T  # (Q, N)
    gold_sim = sims[np.arange(len(gold)), gold]
    rank = (sims > gold_sim[:, None]).sum(1)
    return float((rank < k).mean())


def ict_sentence(passage: str, rng: random.Random) -> str:
    sents = [s for s in corpora.split_sentences(passage) if len(s.split()) >= 3] or [passage]
    return rng.choice(sents)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
