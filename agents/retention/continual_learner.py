"""The continual learner: fine-tune the hybrid encoder on what the service sees, keep it only if a canary agrees.

The pieces wrap each other:

- :class:`TrainingBuffer` collects training examples from ``generated-documents``
  in Redis: idempotent by ``doc_id``, so a replayed Kafka record counts once,
  and examples are dropped only after the update that used them has finished,
  so a crash mid-update loses nothing.
- :class:`ContinualLoss` owns the loss: ``loss, parts = loss_fn(batch)``;
- :func:`fine_tune` fine-tunes a *copy* of the hybrid encoder (fp32, never the
  quantized serving runtime) with gradient accumulation and experience replay,
  and writes a self-describing checkpoint (``hybridrag.models.hybrid_encoder.save_checkpoint``);
- :func:`canary_score` and :func:`should_promote` decide whether the new version serves;
- :func:`run_update` does both and returns an :class:`UpdateResult` that maps to a
  ``RetentionUpdate`` message; :func:`run_update_in_subprocess` runs it in its
  own OS process so that the worker's event loop and query latency are untouched.

What is learnt. The hybrid is distilled from all-MiniLM-L6-v2 (the teacher), so
the update distils again, on the texts this deployment sees now: the queries,
the kept generated documents, the documents the latest queries retrieved and
the query patterns that cited them (``Replay.recent``/``recent_pairs``, from
the memory manager) -- cosine and in-batch
similarity-matrix distillation (Park et al. 2019, https://arxiv.org/abs/1904.05068)
-- plus an in-batch contrastive loss on the (query, generated document) pairs
(InfoNCE, van den Oord et al. 2018, https://arxiv.org/abs/1807.03748). The
teacher is the label, so no human judgement is needed and a bad generated
document costs little: it is matched to the teacher's reading of it.

Forgetting. A ``replay_fraction`` share of every batch is experience replay
(Lin 1992; Rolnick et al. 2019, "Experience replay for continual learning",
https://arxiv.org/abs/1811.11682; Chaudhry et al. 2019, "On tiny episodic
memories in continual learning", https://arxiv.org/abs/1902.10486): the most
important past documents and query patterns of the memory manager
(:mod:`hybridrag.agents.retention.memory_manager`), or a sample of the base training corpus when the
memory has none. By default (``replay_target="base"``) a replayed text keeps
the embedding the base student gave it, as in learning without forgetting (Li &
Hoiem 2016, https://arxiv.org/abs/1606.09282): the student cannot match the
teacher everywhere, and pulling old texts towards the teacher moves the
trade-off the base training found; anchoring them to the old student keeps it
(``bench/continual.py`` measures both). The canary (nDCG@10 on held-out queries
of an old domain) is the gate: a version that loses more than
``canary_tolerance`` is not promoted.

Examples. A kept text sample is one training example: its query, its text and
the pair. Embedding-only samples (the embedding prior's output) carry no text;
they are not training examples (see :meth:`TrainingBuffer.add`). With
``distil_queries`` on, the query text of every sample, kept or not, is kept as
a distillation-only text: the query is the user's, not generated, and the
teacher labels it for free.

``python -m hybridrag.agents.retention.continual_learner run --input job.json --output result.json`` is the
subprocess entry point.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from hybridrag.agents.settings import Settings

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- config


def _setting(name: str):
    """The default of ``Settings.learner_<name>``, so that a learner default is set in one place."""
    return Settings.model_fields[f"learner_{name}"].default


@dataclass(frozen=True)
class LearnerConfig:
    # --- the defaults of these are the settings' learner_* fields (hybridrag.agents.settings), set there only
    enabled: bool = _setting("enabled")  # fine-tune the hybrid encoder on generated documents (encoder=hybrid only)
    min_examples: int = _setting("min_examples")  # buffered kept samples that trigger one update
    steps: int = _setting("steps")  # optimizer steps per update
    batch_size: int = _setting("batch_size")  # examples per micro-batch
    grad_accum: int = _setting("grad_accum")  # micro-batches accumulated into one optimizer step
    lr: float = _setting("lr")  # peak AdamW learning rate of an update
    replay_fraction: float = _setting("replay_fraction")  # share of every micro-batch replayed from important past texts
    canary_dataset: str = _setting("canary_dataset")  # held-out set of the canary score
    canary_queries: int = _setting("canary_queries")  # canary queries scored before a promotion
    canary_tolerance: float = _setting("canary_tolerance")  # most canary nDCG@10 a new version may lose and still be promoted
    buffer_max: int = _setting("buffer_max")  # most buffered examples of each kind; the oldest go first
    # --- fixed here, not deployment settings: the defaults below are what the canary and replay were tuned with
    canary_distractors: int = 2000  # corpus documents next to the relevant ones: the canary runs in seconds
    distil_queries: bool = True  # distil the query text of every sample, kept or not (user text, teacher-labelled)
    replay_pool: int = 512  # replay texts (and as many replay pairs) gathered per update
    warmup: int = 6  # linear warmup steps, then cosine decay (hybridrag.models.train_encoder.lr_at)
    weight_decay: float = 0.01
    w_nce: float = 0.1  # weight of the contrastive loss next to distillation (as in the base training)
    # base: replayed texts keep the base student's own embeddings (LwF); teacher: they are distilled to the teacher.
    # Measured on chatterbot -> wordnet (bench/continual.py): teacher targets cost the old domain ~1.3 nDCG points
    # where base targets cost ~0.2, at a larger gain on the new domain
    replay_target: str = "base"
    max_len: int = 128  # training truncation, as in the base training
    seed: int = 1234
    timeout_s: float = 1800.0  # the subprocess is killed after this long
    threads: int = 1  # torch intra-op threads of the update process
    device: str = "cpu"
    data_dir: str = "data"  # checkpoints go to <data_dir>/checkpoints, the teacher cache to <data_dir>/cache
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "hybridrag"

    def __post_init__(self):
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(f"replay_fraction must be in [0, 1), got {self.replay_fraction}")
        if self.replay_target not in ("teacher", "base"):
            raise ValueError(f"{self.replay_target} is not a valid replay target (teacher, base)")
        if self.batch_size < 2 or self.grad_accum < 1 or self.steps < 1:
            raise ValueError("batch_size >= 2, grad_accum >= 1 and steps >= 1 are required")
        if self.buffer_max < self.min_examples:
            raise ValueError(f"buffer_max ({self.buffer_max}) must be at least min_examples ({self.min_examples}), "
                             "or no update would ever start")

    @classmethod
    def from_settings(cls, s: Any, **overrides) -> "LearnerConfig":
        """Read the ``learner_*`` fields, ``device``, ``data_dir``, ``redis_url`` and ``redis_prefix``."""
        d = cls()
        values = {name: getattr(s, f"learner_{name}", getattr(d, name)) for name in (
            "enabled", "min_examples", "steps", "batch_size", "grad_accum", "lr", "replay_fraction", "buffer_max",
            "canary_dataset", "canary_queries", "canary_tolerance", "canary_distractors", "distil_queries",
            "replay_pool", "seed", "timeout_s")}
        for name in ("device", "data_dir", "redis_url", "redis_prefix"):
            values[name] = getattr(s, name, getattr(d, name))
        values.update(overrides)
        return cls(**values)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.data_dir) / "checkpoints"

    @property
    def teacher_cache_dir(self) -> Path:
        # the base training's cache: the replay fallback samples its corpus with its seed, so most are there
        return Path(self.data_dir) / "cache" / "encoder-train"


# ----------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One training example: a kept generated text and its query; ``text`` is '' for a query-only example."""

    doc_id: str  # the generated document's id, or "query:<query_id>" for a query-only example
    query_id: str
    query: str
    text: str = ""
    tenant: str = ""

    @property
    def is_pair(self) -> bool:
        return bool(self.text)


@dataclass
class Replay:
    """What the memory adds to an update.

    ``texts`` and ``pairs``: important past documents and (query, cited document)
    pairs, replayed to limit forgetting. ``recent``: the documents the latest
    queries retrieved, the current traffic's side of the corpus, and
    ``recent_pairs``: the query patterns whose cited document is one of them;
    both are new data, distilled to the teacher like the examples.
    """

    texts: list[str] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)
    source: str = "none"  # memory | corpus | none
    recent: list[str] = field(default_factory=list)
    recent_pairs: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"texts": self.texts, "pairs": [list(p) for p in self.pairs], "source": self.source,
                "recent": self.recent, "recent_pairs": [list(p) for p in self.recent_pairs]}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Replay | None":
        if d is None:
            return None
        return cls(list(d.get("texts", [])), [(q, p) for q, p in d.get("pairs", [])], d.get("source", "none"),
                   list(d.get("recent", [])), [(q, p) for q, p in d.get("recent_pairs", [])])


def examples_from_messages(messages: Iterable[Any], distil_queries: bool = True) -> tuple[list[Example], dict[str, int]]:
    """Training examples from ``GeneratedDocument`` messages, and what was skipped and why.

    A kept text sample with its query is an example (a pair). Dropped samples and
    embedding-only samples are not; with ``distil_queries``, their query text
    still becomes one query-only example per query.
    """
    out: list[Example] = []
    skipped = {"dropped": 0, "embedding_only": 0, "no_query": 0}
    queries_seen: set[str] = set()
    for m in messages:
        if m.kept and m.text.strip() and m.query.strip():
            out.append(Example(m.doc_id, m.query_id, m.query, m.text, m.tenant))
        else:
            if not m.query.strip():
                skipped["no_query"] += 1
            elif not m.text.strip():
                skipped["embedding_only"] += 1
            else:
                skipped["dropped"] += 1
        if distil_queries and m.query.strip() and m.query_id not in queries_seen:
            queries_seen.add(m.query_id)
            out.append(Example(f"query:{m.query_id}", m.query_id, m.query, "", m.tenant))
    return out, skipped


# ----------------------------------------------------------------------------- the buffer (Redis)

# One script per batch: an example is added only if it is neither buffered nor
# already trained on (``done`` remembers trained ids for the topic's retention),
# so a replayed Kafka record never counts twice. Each kind keeps its newest
# ARGV[2] examples: the oldest beyond that go, text and all.
_LUA_ADD = r"""
local added = 0
local now, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 3, #ARGV, 3 do
  local id, kind, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if not redis.call('ZSCORE', KEYS[4], id) and redis.call('HSETNX', KEYS[1], id, payload) == 1 then
    local seq = redis.call('INCR', KEYS[5])
    if kind == 'pair' then redis.call('ZADD', KEYS[2], seq, id) else redis.call('ZADD', KEYS[3], seq, id) end
    added = added + 1
  end
end
for _, z in ipairs({KEYS[2], KEYS[3]}) do
  local extra = redis.call('ZCARD', z) - keep
  if extra > 0 then
    for _, id in ipairs(redis.call('ZRANGE', z, 0, extra - 1)) do redis.call('HDEL', KEYS[1], id) end
    redis.call('ZREMRANGEBYRANK', z, 0, extra - 1)
  end
end
return added
"""

# ARGV: now, most trained ids remembered, then the ids
_LUA_DROP = r"""
local now = tonumber(ARGV[1])
local n = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  n = n + redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZADD', KEYS[4], now, id)
end
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -(tonumber(ARGV[2]) + 1))
return n
"""


class TrainingBuffer:
    """Training examples for the continual learner, held in Redis under ``<prefix>:learn:``.

    Redis layout:

        ex          hash  doc_id -> JSON example
        pairs       zset  doc_id -> arrival sequence (kept text samples: what ``size()`` counts)
        queries     zset  doc_id -> arrival sequence (query-only examples)
        done        zset  doc_id -> time it was trained on (trimmed after ``done_ttl_s``)
        seq         counter

    ``add`` is idempotent by doc_id (and remembers trained ids for ``done_ttl_s``,
    the retention of ``generated-documents``, so a replay after an update does not
    count either); ``snapshot`` reads without removing; ``drop`` removes after an
    update has finished.

    Bounded by construction: each kind holds at most ``max_examples`` (the
    oldest go first, so an update that keeps failing cannot grow it), and
    ``done`` the ``2 * max_examples`` latest trained ids: a replay comes from
    records not yet committed, far fewer than one update trains on.
    """

    def __init__(self, redis_url: str = "redis://127.0.0.1:6379/0", prefix: str = "hybridrag",
                 client=None, done_ttl_s: float = 7 * 86_400.0, distil_queries: bool = True,
                 max_examples: int = 4096):
        import redis

        self.client = client or redis.Redis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
        self.ns = f"{prefix}:learn:"
        self.done_ttl_s = done_ttl_s
        self.distil_queries = distil_queries
        self.max_examples = max_examples
        self._add = self.client.register_script(_LUA_ADD)
        self._drop = self.client.register_script(_LUA_DROP)

    @classmethod
    def from_config(cls, cfg: LearnerConfig, **kw) -> "TrainingBuffer":
        return cls(cfg.redis_url, cfg.redis_prefix, distil_queries=cfg.distil_queries, max_examples=cfg.buffer_max, **kw)

    def _keys(self) -> list[str]:
        return [self.ns + k for k in ("ex", "pairs", "queries", "done", "seq")]

    def add(self, generated_docs: Iterable[Any], now: float | None = None) -> int:
        """Buffer the examples of ``GeneratedDocument`` messages; returns how many were new.

        Only kept text samples become pairs. Embedding-only samples (the prior's,
        in MiniLM's space) are not used: the hybrid's space is only distilled
        towards MiniLM's, and a vector target without a text cannot be re-labelled
        by the teacher, so it would pull the student towards a prior's guess, not
        towards the teacher.
        """
        examples, _ = examples_from_messages(generated_docs, self.distil_queries)
        return self.add_examples(examples, now)

    def add_examples(self, examples: Sequence[Example], now: float | None = None) -> int:
        if not examples:
            return 0
        now = time.time() if now is None else now
        args: list = [repr(now), self.max_examples]
        for e in examples:
            args += [e.doc_id, "pair" if e.is_pair else "query", json.dumps(asdict(e), ensure_ascii=False)]
        return int(self._add(keys=self._keys(), args=args))

    def size(self) -> int:
        """Buffered kept text samples (pairs): what ``learner_min_examples`` is compared with."""
        return int(self.client.zcard(self.ns + "pairs"))

    def query_count(self) -> int:
        """Buffered query-only examples."""
        return int(self.client.zcard(self.ns + "queries"))

    def sizes(self) -> dict[str, int]:
        """Entries of each part: ``pairs``, ``queries`` and ``done`` (trained ids remembered)."""
        pipe = self.client.pipeline(transaction=False)
        for k in ("pairs", "queries", "done"):
            pipe.zcard(self.ns + k)
        return dict(zip(("pairs", "queries", "done"), map(int, pipe.execute())))

    def snapshot(self, n: int, n_queries: int | None = None) -> list[Example]:
        """The oldest ``n`` pairs and ``n_queries`` (default ``n``) query-only examples, left in the buffer."""
        ids = [m.decode() for m in self.client.zrange(self.ns + "pairs", 0, n - 1)]
        nq = n if n_queries is None else n_queries
        if nq > 0:
            ids += [m.decode() for m in self.client.zrange(self.ns + "queries", 0, nq - 1)]
        if not ids:
            return []
        rows = self.client.hmget(self.ns + "ex", ids)
        return [Example(**json.loads(r)) for r in rows if r is not None]

    def drop(self, doc_ids: Sequence[str], now: float | None = None) -> int:
        """Remove trained examples (and remember them as done); returns how many were buffered."""
        if not doc_ids:
            return 0
        now = time.time() if now is None else now
        n = int(self._drop(keys=self._keys()[:4], args=[repr(now), 2 * self.max_examples, *doc_ids]))
        self.client.zremrangebyscore(self.ns + "done", "-inf", now - self.done_ttl_s)
        return n

    def clear(self) -> int:
        return int(self.client.delete(*self._keys()))


# ----------------------------------------------------------------------------- replay


def corpus_replay(n: int, seed: int = 1234) -> Replay:
    """``n`` texts and ``n`` pairs of the base training corpus (never a held-out item)."""
    from hybridrag.models import corpora

    return Replay(corpora.training_texts(limit=n, seed=seed), corpora.training_pairs(limit=n, seed=seed), "corpus")


def gather_replay(memory, n: int, store=None, seed: int = 1234, recent: int | None = None) -> Replay:
    """Replay from the memory manager: the ``n`` most important real documents and query patterns,
    and the ``recent`` (default ``n``) most recently retrieved real documents.

    Cheap (a few Redis reads): call it in the worker and pass the result to the
    update. Synthetic documents are left out (they are the generated data, not
    past knowledge). ``store`` (a :class:`hybridrag.agents.rag.store.VectorStore`) supplies
    texts the memory holds no sample of. Falls back to :func:`corpus_replay`
    when the memory is unreachable or holds nothing.
    """
    from hybridrag.agents.retention.memory_manager import MemoryUnavailable

    try:
        docs = [d for d in memory.top_important(n) if not d.synthetic]
        patterns = memory.top_patterns(n)
        k = n if recent is None else recent
        # synthetic documents are recent too (they are indexed as they are generated): read past them
        latest = [d for d in memory.most_recent(4 * k) if not d.synthetic][:k]
    except MemoryUnavailable:
        log.warning("memory unavailable: replaying the base corpus")
        return corpus_replay(n, seed)
    text_of = {d.doc_id: d.sample.strip() for d in [*docs, *latest] if d.sample.strip()}
    wanted = {d for p in patterns for d in p.doc_ids[:1]} | {d.doc_id for d in [*docs, *latest]}
    missing = [d for d in wanted if d not in text_of]
    if missing and store is not None:
        text_of.update({k: v for k, v in store.texts(missing).items() if v.strip()})
    texts = [text_of[d.doc_id] for d in docs if d.doc_id in text_of]
    latest_ids = {d.doc_id for d in latest}
    pairs, recent_pairs = [], []
    for p in patterns:
        if p.query and p.doc_ids and p.doc_ids[0] in text_of:
            # a pattern whose answer cited a recently retrieved document belongs to the current traffic
            (recent_pairs if p.doc_ids[0] in latest_ids else pairs).append((p.query, text_of[p.doc_ids[0]]))
    latest_texts = [text_of[d.doc_id] for d in latest if d.doc_id in text_of]
    if not texts:
        r = corpus_replay(n, seed)
        r.recent, r.recent_pairs = latest_texts, recent_pairs
        return r
    return Replay(texts, pairs, "memory", latest_texts, recent_pairs)


# ----------------------------------------------------------------------------- batch composition (pure)


def replay_split(batch_size: int, replay_fraction: float, replay_available: int) -> tuple[int, int]:
    """(new, replay) items of one micro-batch: ``round(batch_size * fraction)`` replayed, if there are any."""
    n_replay = min(int(round(batch_size * replay_fraction)), replay_available) if replay_available else 0
    return batch_size - n_replay, n_replay


class PoolSampler:
    """Endless draws without replacement from ``range(n)``, reshuffled on every pass (seeded).

    A draw of ``k`` never repeats an index within itself (in-batch negatives must be distinct),
    so ``k`` is capped at ``n``.
    """

    def __init__(self, n: int, rng: random.Random):
        self.n, self.rng = n, rng
        self.order: list[int] = []

    def take(self, k: int) -> list[int]:
        k = min(k, self.n)
        out: list[int] = []
        while len(out) < k:
            if not self.order:
                nxt = list(range(self.n))
                self.rng.shuffle(nxt)
                # what this draw already holds goes to the back of the next pass (pop takes from the end)
                self.order = [i for i in nxt if i in out] + [i for i in nxt if i not in out]
            out.append(self.order.pop())
        return out


def compose_micro_batch(new: PoolSampler, replay: PoolSampler | None, batch_size: int,
                        replay_fraction: float) -> tuple[list[int], list[int]]:
    """Indices into the new pool and the replay pool for one micro-batch of ``batch_size``."""
    n_new, n_replay = replay_split(batch_size, replay_fraction, replay.n if replay is not None else 0)
    if new.n == 0:  # nothing new of this kind: the batch is replay alone (or empty)
        n_new, n_replay = 0, (min(batch_size, replay.n) if replay is not None and replay_fraction > 0 else 0)
    return new.take(n_new), (replay.take(n_replay) if replay is not None and n_replay else [])


# ----------------------------------------------------------------------------- the loss


class ContinualLoss:
    """Owns the update's loss: ``loss, parts = loss_fn(batch)``.

    Distillation to the teacher (cosine on every text, in-batch similarity
    matrices ×10) plus InfoNCE on the (query, passage) pairs, with the base
    training's loss functions and weights (:class:`hybridrag.models.train_encoder.Distiller`).
    Unlike the Distiller, a batch may hold no pairs (only queries are new).
    """

    def __init__(self, student, w_cos: float = 1.0, w_sim: float = 1.0, w_nce: float = 0.1, temperature: float = 0.05):
        self.student = student
        self.w_cos, self.w_sim, self.w_nce, self.temperature = w_cos, w_sim, w_nce, temperature

    def __call__(self, b):
        import torch.nn.functional as F

        from hybridrag.models.train_encoder import cosine_loss, info_nce, similarity_matrix_loss

        s_text = self.student(b.text_ids, b.text_mask)  # (B, 384)
        cos_terms = [cosine_loss(s_text, b.text_teacher)]
        sim = similarity_matrix_loss(s_text, b.text_teacher)
        nce = s_text.new_zeros(())
        if b.query_ids is not None and len(b.query_ids) >= 2:
            s_q = self.student(b.query_ids, b.query_mask)  # (P, 384)
            s_p = self.student(b.passage_ids, b.passage_mask)  # (P, 384)
            cos_terms += [cosine_loss(s_q, b.query_teacher), cosine_loss(s_p, b.passage_teacher)]
            sim = sim + F.mse_loss(s_q @ s_p.T, b.query_teacher @ b.passage_teacher.T)
            nce = info_nce(s_q, s_p, self.temperature)
        cos = sum(cos_terms) / len(cos_terms)
        sim = 10.0 * sim  # the matrices' entries differ by little: the raw MSE would barely register
        loss = self.w_cos * cos + self.w_sim * sim + self.w_nce * nce
        parts = {"loss": loss, "cos": cos, "sim": sim, "nce": nce}
        return loss, {k: float(v.detach()) for k, v in parts.items()}


def accumulate_gradients(loss_fn, micro_batches: Sequence[Any]) -> dict[str, float]:
    """Backward each micro-batch's loss / k: the gradients sum to those of their mean loss.

    Equal-sized micro-batches of a per-example loss give the gradient of one big batch.
    Returns the mean of each loss part.
    """
    k = len(micro_batches)
    totals: dict[str, float] = {}
    for mb in micro_batches:
        loss, parts = loss_fn(mb)
        (loss / k).backward()
        for name, v in parts.items():
            totals[name] = totals.get(name, 0.0) + v / k
    return totals


# ----------------------------------------------------------------------------- fine-tuning


@dataclass
class FineTuneResult:
    checkpoint: str
    version: str
    base_version: str
    steps: int
    history: list[dict]
    examples: int  # pairs + query-only examples trained on
    pairs: int
    new_texts: int
    replay_texts: int
    replay_pairs: int
    recent_documents: int
    replay_source: str
    loss_first: float
    loss_last: float
    seconds: float


def embed_ids(model, ids: Sequence[list[int]], device, batch_size: int = 128) -> np.ndarray:
    """Embeddings float32 (N, out_dim) of token id lists with ``model`` in eval mode (no gradients)."""
    import torch

    from hybridrag.models.train_encoder import pad

    was_training = model.training
    model.eval()
    out = np.zeros((len(ids), model.cfg.out_dim), dtype=np.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            x, mask = pad([ids[i] for i in chunk])
            out[chunk] = model(x.to(device), mask.to(device)).float().cpu().numpy()
    model.train(was_training)
    return out


def _tokenize(strings: Sequence[str], max_len: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    from hybridrag.models.hybrid_encoder import tokenizer_path

    tok = Tokenizer.from_file(str(tokenizer_path()))
    tok.no_padding()
    tok.enable_truncation(max_len)
    return [e.ids for e in tok.encode_batch(list(strings))]


def _training_pools(examples: Sequence[Example], replay: Replay | None, cfg: LearnerConfig):
    """The distinct strings of an update and the pools that index into them: new and replayed texts and pairs.

    Returns ``(strings, new_texts, new_pairs, replay_texts, replay_pairs, recent, replay)``; a text is either
    new (the teacher's target) or replayed, never both.
    """
    index: dict[str, int] = {}

    def at(s: str) -> int:
        return index.setdefault(s, len(index))

    pairs = [e for e in examples if e.is_pair]
    recent = [t for t in (replay.recent if replay is not None else []) if t.strip()]
    recent_pairs = [(q, p) for q, p in (replay.recent_pairs if replay is not None else [])
                    if q.strip() and p.strip() and q != p]
    new_texts = sorted({at(e.query) for e in examples} | {at(e.text) for e in pairs} | {at(t) for t in recent}
                       | {at(x) for p in recent_pairs for x in p})
    new_pairs = sorted({(at(e.query), at(e.text)) for e in pairs} | {(at(q), at(p)) for q, p in recent_pairs})
    replay = replay if replay is not None and cfg.replay_fraction > 0 else Replay(source="none")
    fresh = set(new_texts)
    replay_texts = sorted({at(t) for t in replay.texts if t.strip()} - fresh)
    replay_pairs = sorted({(at(q), at(p)) for q, p in replay.pairs if q.strip() and p.strip() and q != p}
                          - set(new_pairs))
    if not new_texts:
        raise ValueError("no examples to train on")
    return list(index), new_texts, new_pairs, replay_texts, replay_pairs, recent, replay


def _train_steps(model, loss_fn, micro_batch, cfg: LearnerConfig, progress: bool) -> list[dict]:
    """``cfg.steps`` AdamW steps of ``cfg.grad_accum`` micro-batches each, warmup then cosine decay, clipped at 1."""
    import torch

    from hybridrag.models.train_encoder import lr_at

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict] = []
    for step in range(cfg.steps):
        lr = lr_at(step, cfg.lr, min(cfg.warmup, max(1, cfg.steps // 4)), cfg.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        parts = accumulate_gradients(loss_fn, [micro_batch() for _ in range(cfg.grad_accum)])
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        history.append({"step": step + 1, "lr": lr, "grad_norm": grad_norm, **parts})
        if progress and (step + 1) % 10 == 0:
            print(f"step {step + 1}/{cfg.steps} loss {parts['loss']:.4f} cos {parts['cos']:.4f}", file=sys.stderr)
    return history


def _save_update(model, base_meta: dict, learner: dict, history: list[dict], cfg: LearnerConfig,
                 out_dir: str | Path | None) -> tuple[Path, str]:
    """Write the updated checkpoint as ``<version>.pt`` with its loss history and metadata; return (path, version)."""
    from hybridrag.models.hybrid_encoder import save_checkpoint

    out_dir = Path(out_dir) if out_dir else cfg.checkpoint_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    base_step = int(base_meta.get("step", 0))
    model = model.cpu().eval()
    tmp = out_dir / f".update-{uuid.uuid4().hex[:8]}.pt"
    meta = save_checkpoint(tmp, model, base_step + cfg.steps, {**base_meta.get("metrics", {}), "learner": learner})
    version = meta["version"]  # a hash of the new weights: a new version whenever they changed
    final = out_dir / f"{version}.pt"
    tmp.replace(final)
    _write_history(history, out_dir / f"{version}.loss.csv")
    (out_dir / f"{version}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return final, version


def fine_tune(base_checkpoint: str | Path | None, examples: Sequence[Example], replay: Replay | None,
              cfg: LearnerConfig, out_dir: str | Path | None = None, progress: bool = False) -> FineTuneResult:
    """Fine-tune a copy of the hybrid at ``base_checkpoint`` on ``examples`` with ``replay``; write a checkpoint.

    Every micro-batch holds ``cfg.batch_size`` texts and up to as many pairs, a
    ``cfg.replay_fraction`` share of each from ``replay``; ``cfg.grad_accum``
    micro-batches make one AdamW step. The checkpoint goes to
    ``<out_dir>/<version>.pt`` (default ``<data_dir>/checkpoints``) with its
    loss history in ``<version>.loss.csv`` and its metadata in ``<version>.json``.
    """
    import torch

    from hybridrag.models.hybrid_encoder import DEFAULT_CHECKPOINT, load_checkpoint
    from hybridrag.models.train_encoder import Batch, pad, teacher_embeddings

    t0 = time.monotonic()
    torch.set_num_threads(max(1, cfg.threads))
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    base_path = Path(base_checkpoint or DEFAULT_CHECKPOINT)
    model, base_meta = load_checkpoint(base_path)  # a fresh fp32 copy: the serving runtime is never touched
    device = torch.device(cfg.device)
    model = model.to(device).train()

    strings, new_texts, new_pairs, replay_texts, replay_pairs, recent, replay = _training_pools(examples, replay, cfg)
    fresh = set(new_texts)
    ids = _tokenize(strings, cfg.max_len)
    teacher = teacher_embeddings(strings, cfg.teacher_cache_dir, device=cfg.device, max_len=cfg.max_len)
    # replayed texts keep the teacher as their target, or (LwF) the base student's own embeddings
    anchor = teacher
    if cfg.replay_target == "base" and (replay_texts or replay_pairs):
        anchor = teacher.copy()
        rows = sorted((set(replay_texts) | {i for p in replay_pairs for i in p}) - fresh)
        anchor[rows] = embed_ids(model, [ids[i] for i in rows], device)

    samplers = {
        "new_texts": PoolSampler(len(new_texts), rng),
        "replay_texts": PoolSampler(len(replay_texts), rng) if replay_texts else None,
        "new_pairs": PoolSampler(len(new_pairs), rng),
        "replay_pairs": PoolSampler(len(replay_pairs), rng) if replay_pairs else None,
    }

    def micro_batch() -> Batch:
        tn, tr = compose_micro_batch(samplers["new_texts"], samplers["replay_texts"], cfg.batch_size,
                                     cfg.replay_fraction)
        pn, pr = compose_micro_batch(samplers["new_pairs"], samplers["replay_pairs"], cfg.batch_size,
                                     cfg.replay_fraction)
        texts = [new_texts[i] for i in tn] + [replay_texts[i] for i in tr]
        prs = [new_pairs[i] for i in pn] + [replay_pairs[i] for i in pr]
        t_ids, t_mask = pad([ids[i] for i in texts])

        def target(new_idx: list[int], replay_idx: list[int]) -> torch.Tensor:
            return torch.from_numpy(np.concatenate([teacher[new_idx], anchor[replay_idx]]).reshape(-1, teacher.shape[1]))

        t_target = target([new_texts[i] for i in tn], [replay_texts[i] for i in tr])
        if len(prs) >= 2:
            q_ids, q_mask = pad([ids[q] for q, _ in prs])
            p_ids, p_mask = pad([ids[p] for _, p in prs])
            q_new, q_rep = [new_pairs[i][0] for i in pn], [replay_pairs[i][0] for i in pr]
            p_new, p_rep = [new_pairs[i][1] for i in pn], [replay_pairs[i][1] for i in pr]
            return Batch(t_ids, t_mask, t_target, q_ids, q_mask, target(q_new, q_rep),
                         p_ids, p_mask, target(p_new, p_rep)).to(device)
        return Batch(t_ids, t_mask, t_target, None, None, None, None, None, None).to(device)

    loss_fn = ContinualLoss(model, w_nce=cfg.w_nce)
    history = _train_steps(model, loss_fn, micro_batch, cfg, progress)

    learner = {
        "parent": base_meta["version"], "parent_step": int(base_meta.get("step", 0)), "steps": cfg.steps,
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "lr": cfg.lr, "replay_fraction": cfg.replay_fraction,
        "replay_source": replay.source, "replay_target": cfg.replay_target, "examples": len(examples),
        "pairs": len(new_pairs), "recent_documents": len(recent), "seed": cfg.seed,
        "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"]}
    final, version = _save_update(model, base_meta, learner, history, cfg, out_dir)
    return FineTuneResult(
        checkpoint=str(final), version=version, base_version=base_meta["version"], steps=cfg.steps, history=history,
        examples=len(examples), pairs=len(new_pairs), new_texts=len(new_texts), replay_texts=len(replay_texts),
        replay_pairs=len(replay_pairs), recent_documents=len(recent), replay_source=replay.source, loss_first=history[0]["loss"],
        loss_last=history[-1]["loss"], seconds=time.monotonic() - t0,
    )


def _write_history(history: list[dict], path: Path) -> None:
    keys = list(history[0]) if history else []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


# ----------------------------------------------------------------------------- the canary


@dataclass
class CanarySet:
    """Held-out queries, their qrels, and a fixed sub-corpus: the relevant documents plus seeded distractors."""

    name: str
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, int]]
    doc_ids: list[str]
    doc_texts: list[str]


_CANARIES: dict[tuple, CanarySet] = {}


def canary_set(dataset: str, n_queries: int, n_distractors: int, seed: int = 0) -> CanarySet:
    """The first ``n_queries`` queries (by id) of ``dataset`` against relevant docs + ``n_distractors`` others."""
    key = (dataset, n_queries, n_distractors, seed)
    if key not in _CANARIES:
        from hybridrag.agents.evaluation.harness import Dataset

        ds = Dataset.load(dataset, max_queries=n_queries)
        relevant = {d for rels in ds.qrels.values() for d, g in rels.items() if g > 0}
        others = [d for d in ds.doc_ids if d not in relevant]
        random.Random(seed).shuffle(others)
        keep = relevant | set(others[:n_distractors])
        doc_ids = [d for d in ds.doc_ids if d in keep]
        text_of = dict(zip(ds.doc_ids, ds.doc_texts))
        qids = list(ds.queries)
        _CANARIES[key] = CanarySet(ds.name, qids, [ds.queries[q] for q in qids], ds.qrels, doc_ids,
                                   [text_of[d] for d in doc_ids])
    return _CANARIES[key]


def ndcg_per_query(encoder, queries: Sequence[str], query_ids: Sequence[str], qrels, doc_ids: Sequence[str],
                   doc_texts: Sequence[str], k: int = 10) -> np.ndarray:
    """nDCG@k (Q,) of each query under exact cosine search with ``encoder`` over the given corpus."""
    from hybridrag.agents.evaluation.harness import ndcg_at_k, top_k_cosine

    doc_vecs = encoder.encode(list(doc_texts))
    q_vecs = encoder.encode(list(queries))
    top = top_k_cosine(q_vecs, doc_vecs, k)
    return np.array([ndcg_at_k([doc_ids[i] for i in row], qrels[q], k) for q, row in zip(query_ids, top)])


def canary_per_query(checkpoint: str | Path | None, cfg: LearnerConfig, quantize: bool = True) -> np.ndarray:
    """nDCG@10 (Q,) of ``checkpoint`` on each canary query, as it would serve (INT8 by default)."""
    from hybridrag.models.hybrid_encoder import HybridEncoderRuntime

    c = canary_set(cfg.canary_dataset, cfg.canary_queries, cfg.canary_distractors)
    enc = HybridEncoderRuntime.load(str(checkpoint) if checkpoint else None, device=cfg.device, quantize=quantize)
    return ndcg_per_query(enc, c.queries, c.query_ids, c.qrels, c.doc_ids, c.doc_texts)


def canary_score(checkpoint: str | Path | None, cfg: LearnerConfig, quantize: bool = True) -> float:
    """Mean nDCG@10 of ``checkpoint`` on the canary set."""
    return float(canary_per_query(checkpoint, cfg, quantize).mean())


def should_promote(new_score: float, base_score: float, tolerance: float) -> bool:
    """Promote iff the new version loses at most ``tolerance`` of the canary score."""
    return new_score >= base_score - tolerance


def paired_interval(new: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """95% paired bootstrap interval of the canary's mean per-query change, new - base.

    Reported with every canary decision, so a rejection (or a promotion) can be
    told apart from the canary's own noise; the decision itself stays
    :func:`should_promote` on the means.
    """
    from hybridrag.agents.evaluation.harness import paired_bootstrap

    _, lo, hi = paired_bootstrap(new, base)
    return lo, hi


# ----------------------------------------------------------------------------- one update


@dataclass
class UpdateResult:
    """What an update did; :meth:`to_retention_update` is its ``retention-updates`` message."""

    promoted: bool
    base_version: str
    new_version: str  # '' when no checkpoint was written
    checkpoint: str  # '' when no checkpoint was written
    metrics: dict[str, float]
    detail: str
    seconds: float
    error: str = ""  # why the update failed; '' when it ran to a decision

    def to_retention_update(self):
        from hybridrag.agents.kafka.schemas import RetentionUpdate

        return RetentionUpdate(
            kind="encoder-promoted" if self.promoted else "encoder-rejected",
            encoder_version=self.new_version or self.base_version or "unknown",
            metrics={k: float(v) for k, v in self.metrics.items()},
            checkpoint=self.checkpoint,
            detail=self.detail,
        )

    @classmethod
    def failed(cls, error: str, base_version: str = "", seconds: float = 0.0) -> "UpdateResult":
        return cls(False, base_version, "", "", {"seconds": seconds}, f"update failed: {error}", seconds, error)


def run_update(base_checkpoint: str | Path | None, examples: Sequence[Example], replay: Replay | None,
               cfg: LearnerConfig, out_dir: str | Path | None = None, base_scores: np.ndarray | None = None,
               progress: bool = False) -> UpdateResult:
    """Fine-tune, score both versions on the canary, and decide. ``replay=None`` replays the base corpus.

    ``base_scores``, the base's per-query canary nDCG@10 when known (the same
    base and canary), saves one canary run.
    """
    t0 = time.monotonic()
    if replay is None and cfg.replay_fraction > 0:
        replay = corpus_replay(cfg.replay_pool, cfg.seed)
    ft = fine_tune(base_checkpoint, examples, replay, cfg, out_dir, progress=progress)
    base_q = canary_per_query(base_checkpoint, cfg) if base_scores is None else np.asarray(base_scores)
    new_q = canary_per_query(ft.checkpoint, cfg)
    base, new = float(base_q.mean()), float(new_q.mean())
    lo, hi = paired_interval(new_q, base_q)
    changed = ft.version != ft.base_version
    promoted = changed and should_promote(new, base, cfg.canary_tolerance)
    seconds = time.monotonic() - t0
    metrics = {
        "canary_base": base, "canary_new": new, "canary_delta": new - base, "canary_delta_lo": lo,
        "canary_delta_hi": hi, "canary_tolerance": cfg.canary_tolerance,
        "canary_queries": float(cfg.canary_queries), "steps": float(ft.steps), "loss_first": ft.loss_first,
        "loss_last": ft.loss_last, "examples": float(ft.examples), "pairs": float(ft.pairs),
        "replayed": float(ft.replay_texts + ft.replay_pairs), "replay_fraction": cfg.replay_fraction,
        "recent_documents": float(ft.recent_documents),
        "train_seconds": ft.seconds, "seconds": seconds,
    }
    verdict = ("promoted" if promoted else
               "rejected: the weights did not change" if not changed else
               f"rejected: canary lost {base - new:.4f} > tolerance {cfg.canary_tolerance}")
    detail = (f"{verdict}; {cfg.canary_dataset} nDCG@10 {base:.4f} -> {new:.4f} on {cfg.canary_queries} queries "
              f"(paired 95% interval of the change [{lo:+.4f}, {hi:+.4f}]); "
              f"{ft.steps} steps on {ft.examples} examples ({ft.pairs} pairs), replay {ft.replay_source}; "
              f"parent {ft.base_version}")
    return UpdateResult(promoted, ft.base_version, ft.version, ft.checkpoint, metrics, detail, seconds)


# ----------------------------------------------------------------------------- in a subprocess


def write_job(path: Path, base_checkpoint: str | None, examples: Sequence[Example], replay: Replay | None,
              cfg: LearnerConfig, out_dir: str | None = None) -> Path:
    path.write_text(json.dumps({
        "base_checkpoint": base_checkpoint, "examples": [asdict(e) for e in examples],
        "replay": replay.as_dict() if replay is not None else None, "config": asdict(cfg), "out_dir": out_dir,
    }, ensure_ascii=False))
    return path


def run_job(job_path: Path, result_path: Path) -> UpdateResult:
    """The subprocess side: read a job, run the update, write the result (also on failure)."""
    t0 = time.monotonic()
    job = json.loads(Path(job_path).read_text())
    try:
        cfg = LearnerConfig(**job["config"])
        result = run_update(job["base_checkpoint"], [Example(**e) for e in job["examples"]],
                            Replay.from_dict(job["replay"]), cfg, job.get("out_dir"), progress=True)
    except Exception as e:  # the worker needs a result either way
        log.exception("update failed")
        result = UpdateResult.failed(f"{type(e).__name__}: {e}", seconds=time.monotonic() - t0)
    tmp = Path(result_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(result)))
    tmp.replace(result_path)
    return result


async def run_update_in_subprocess(base_checkpoint: str | None, examples: Sequence[Example], replay: Replay | None,
                                   cfg: LearnerConfig, out_dir: str | None = None,
                                   timeout_s: float | None = None) -> UpdateResult:
    """:func:`run_update` in a separate OS process (OMP_NUM_THREADS=cfg.threads); never raises, never hangs.

    A crash, a non-zero exit or ``timeout_s`` (default ``cfg.timeout_s``; the
    process is killed) returns a failed :class:`UpdateResult` whose ``error``
    says what happened, with the tail of the process's log.
    """
    job_dir = Path(cfg.data_dir) / "cache" / "continual" / "jobs" / uuid.uuid4().hex[:12]
    job_dir.mkdir(parents=True, exist_ok=True)
    write_job(job_dir / "job.json", base_checkpoint, examples, replay, cfg, out_dir)
    return await run_job_in_subprocess("hybridrag.agents.retention.continual_learner", job_dir, cfg.threads,
                                       cfg.timeout_s if timeout_s is None else timeout_s)


async def run_job_in_subprocess(module: str, job_dir: Path, threads: int, timeout_s: float,
                                niceness: int = 0) -> UpdateResult:
    """``python -m <module> run`` on ``job_dir/job.json`` at ``niceness``; the :class:`UpdateResult` it wrote.

    Never raises, never hangs: a crash, a non-zero exit or the timeout (the
    process is killed) is a failed result with the tail of the process's log.
    """
    t0 = time.monotonic()
    job, result_path, log_path = job_dir / "job.json", job_dir / "result.json", job_dir / "update.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    prefix = ["nice", "-n", str(niceness)] if niceness else []
    with open(log_path, "wb") as logf:
        proc = await asyncio.create_subprocess_exec(
            *prefix, sys.executable, "-m", module, "run", "--input", str(job), "--output", str(result_path),
            stdout=logf, stderr=asyncio.subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
        try:
            rc = await asyncio.wait_for(proc.wait(), timeout=timeout_s)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return UpdateResult.failed(f"timed out after {timeout_s:.0f}s (killed); log {log_path}",
                                       seconds=time.monotonic() - t0)
        except asyncio.CancelledError:  # the worker is shutting down: do not leave an orphan training
            proc.kill()
            await proc.wait()
            raise
    if not result_path.exists():  # it died before it could say why (killed, out of memory, import error)
        return UpdateResult.failed(f"update process exited with {rc} and no result: {_tail(log_path)}",
                                   seconds=time.monotonic() - t0)
    result = UpdateResult(**json.loads(result_path.read_text()))
    if not result.error:
        job.unlink(missing_ok=True)  # the inputs are in Redis; the log stays for the record
    return result


def _die_with_parent() -> None:
    """In the child before exec: a SIGKILLed worker takes its training process with it (Linux prctl)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the timeout still bounds an orphan
        pass


def _tail(path: Path, n: int = 800) -> str:
    try:
        return path.read_bytes()[-n:].decode("utf-8", "replace").strip()
    except OSError:
        return ""


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m hybridrag.agents.retention.continual_learner", description="Continual learner update.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run one update from a job file (what the worker's subprocess does)")
    run.add_argument("--input", required=True, type=Path)
    run.add_argument("--output", required=True, type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "run":
        result = run_job(args.input, args.output)
        print(json.dumps({"promoted": result.promoted, "version": result.new_version, "detail": result.detail,
                          "error": result.error}))
        return 0 if not result.error else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
