"""Zero-shot domain adaptation: the serving encoder learns a corpus from the corpus alone.

The recipe is GPL (Wang et al. 2022, "GPL: Generative Pseudo Labeling for
unsupervised domain adaptation of dense retrieval", https://arxiv.org/abs/2112.07577):

1. pseudo-queries per passage (:func:`pseudo_queries`): a sentence against its
   passage (the inverse cloze task, Lee et al. 2019, https://arxiv.org/abs/1906.00300)
   and the passage's title;
2. hard negatives mined from the current index (:func:`mine_negatives`): the base
   encoder's own nearest passages, minus the positive and its siblings;
3. pseudo-labels (:func:`pseudo_margins`): the margin score(q, pos) - score(q, neg)
   of a labeller. GPL labels with a cross-encoder; none ships offline, so the
   labeller is the base encoder (``dense``), BM25 (``bm25``) or both (``ensemble``),
   or no margin at all (``infonce``: contrastive loss on the mined negatives);
4. a student trained on them with replay of general texts anchored to the base
   (:class:`hybridrag.models.train_encoder.DomainAdaptLoss`).

What the student trains (``mode``):

- ``branch``: a zero-initialised conv(3, 5, 7) branch on the transformer's output
  (:func:`hybridrag.models.hybrid_encoder.with_conv_branch`), the fusion and the
  output projection; the transformer is frozen, so its states are computed once
  per text (the pass that indexes the corpus) and every step after that costs
  the branch alone;
- ``head``: the output projection alone, on the same cached states (adapting
  without the branch);
- ``full``: every weight, no branch (full fine-tuning, a forward and backward
  pass through the transformer per step).

:func:`adapt` runs it within a time budget and writes a checkpoint; the domain
self-check scores held-out pseudo-pairs before and after, with the paired
bootstrap interval. ``hybridrag adapt`` (``hybridrag.agents.cli.adapt``) is the
command line, and the worker runs the same code in a subprocess.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

MODES = ("branch", "head", "full")
QUERY_KINDS = ("ict", "title", "ict+title")
LABELS = ("infonce", "dense", "bm25", "ensemble")


@dataclass(frozen=True)
class AdaptConfig:
    mode: str = "branch"  # what trains: branch | head | full (see the module docstring)
    queries: str = "ict+title"  # pseudo-queries: ict | title | ict+title
    labels: str = "ensemble"  # pseudo-labels: infonce | dense | bm25 | ensemble
    # training budget in CPU minutes of this process (equal budgets stay equal on a shared machine),
    # after the corpus has been encoded once
    minutes: float = 10.0
    max_steps: int = 5000  # optimizer steps at most, whatever the budget
    batch_size: int = 32  # pseudo-queries per step (with one positive and one mined negative each)
    lr: float = 0.0  # peak AdamW learning rate; 0 picks the mode's (branch/head 1e-3, full 2e-5)
    warmup: int = 20  # linear warmup steps, then constant
    ict_per_passage: int = 2  # ICT sentences drawn per passage
    min_query_words: int = 4  # shorter sentences are not queries
    mine_depth: int = 30  # hard negatives come from the base encoder's top mine_depth
    mine_skip: int = 2  # ... past its top mine_skip (most likely false negatives: GPL skips none, with a cross-encoder)
    bm25_weight: float = 0.5  # ensemble label: base cosine + bm25_weight * BM25 / the query's best BM25
    w_nce: float = 0.1  # InfoNCE next to MarginMSE (1.0 and no margin with labels=infonce)
    w_anchor: float = 1.0  # cosine anchor of replayed general texts to the base encoder
    replay: int = 256  # general texts replayed (the memory's most important ones, else the training corpus)
    replay_per_step: int = 8
    holdout: float = 0.1  # share of passages whose pseudo-pairs only score the self-check
    max_passages: int = 20000  # a larger corpus is sampled (seeded)
    max_len: int = 256  # the runtime's truncation: cached states are what the runtime computes
    train_max_len: int = 128  # full fine-tuning truncates here (as the base training does)
    threads: int = 1  # torch intra-op threads
    seed: int = 1234
    device: str = "cpu"

    def __post_init__(self):
        for name, value, valid in (("mode", self.mode, MODES), ("queries", self.queries, QUERY_KINDS),
                                   ("labels", self.labels, LABELS)):
            if value not in valid:
                raise ValueError(f"{value} is not a valid {name} ({', '.join(valid)})")
        if self.batch_size < 2 or self.minutes <= 0 or not 0.0 <= self.holdout < 1.0:
            raise ValueError("batch_size >= 2, minutes > 0 and 0 <= holdout < 1 are required")

    @property
    def peak_lr(self) -> float:
        return self.lr or (2e-5 if self.mode == "full" else 1e-3)


# ----------------------------------------------------------------------------- the corpus (pure)


@dataclass
class Corpus:
    """Passages of the target domain: ids, texts, titles (may be '') and a group per passage.

    Passages of one group (one source document) are never each other's negatives.
    """

    ids: list[str]
    texts: list[str]
    titles: list[str]
    groups: list[str]

    @classmethod
    def from_jsonl(cls, path: str | Path, max_passages: int | None = None, seed: int = 0) -> "Corpus":
        """A BEIR ``corpus.jsonl`` (``_id``, ``title``, ``text``); the group is the title (else the id)."""
        from hybridrag.agents.evaluation.harness import doc_text

        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    rows.append((str(d["_id"]), doc_text(d), (d.get("title") or "").strip()))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: not a corpus record ({type(e).__name__}: {e})") from None
        rows = [r for r in rows if r[1].strip()]
        if not rows:
            raise ValueError(f"{path} holds no passage")
        if max_passages is not None and len(rows) > max_passages:
            rows = random.Random(seed).sample(rows, max_passages)
        return cls([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[2] or r[0] for r in rows])


@dataclass(frozen=True)
class PseudoPair:
    query: str
    passage: int  # index into the corpus
    kind: str  # ict | title


def pseudo_queries(corpus: Corpus, kinds: str, per_passage: int = 2, min_words: int = 4,
                   seed: int = 0) -> list[PseudoPair]:
    """Pseudo-queries per passage: ICT sentences (the passage keeps them) and the title.

    A title is a query only when the passage says more than it; a sentence only
    when it is shorter than its passage, so a one-sentence passage gives none.
    """
    from hybridrag.models.corpora import split_sentences

    rng = random.Random(seed)
    out: list[PseudoPair] = []
    for i, (text, title) in enumerate(zip(corpus.texts, corpus.titles)):
        if "title" in kinds and title and len(text.split()) > len(title.split()) + 2:
            out.append(PseudoPair(title, i, "title"))
        if "ict" in kinds:
            sentences = [s for s in split_sentences(text) if len(s.split()) >= min_words]
            if len(sentences) >= 2 or (sentences and len(sentences[0]) < 0.8 * len(text)):
                for s in rng.sample(sentences, min(per_passage, len(sentences))):
                    out.append(PseudoPair(s, i, "ict"))
    return out


def split_holdout(pairs: Sequence[PseudoPair], n_passages: int, share: float, seed: int = 0
                  ) -> tuple[list[PseudoPair], list[PseudoPair]]:
    """(train, held-out) by passage: a held-out passage's pairs are never trained on."""
    rng = random.Random(seed)
    held = {i for i in range(n_passages) if rng.random() < share}
    return [p for p in pairs if p.passage not in held], [p for p in pairs if p.passage in held]


def mine_negatives(query_vecs: np.ndarray, doc_vecs: np.ndarray, positives: Sequence[int], groups: Sequence[str],
                   depth: int, skip: int, seed: int = 0) -> np.ndarray:
    """One hard negative per query (Q,): a random passage of the index's top ``depth`` past its top ``skip``,
    never the positive nor a passage of its group; a random passage when the top holds none."""
    from hybridrag.agents.evaluation.harness import top_k_cosine

    rng = np.random.default_rng(seed)
    top = top_k_cosine(query_vecs, doc_vecs, min(depth, len(doc_vecs)))
    out = np.empty(len(positives), dtype=np.int64)
    for qi, (row, pos) in enumerate(zip(top, positives)):
        pool = [int(d) for d in row[skip:] if d != pos and groups[d] != groups[pos]]
        if not pool:
            pool = [d for d in rng.integers(0, len(doc_vecs), 8).tolist() if groups[d] != groups[pos]] or [int(row[-1])]
        out[qi] = pool[int(rng.integers(0, len(pool)))]
    return out


def bm25_pair_scores(doc_texts: Sequence[str], queries: Sequence[str], pairs: Sequence[tuple[int, int]]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """BM25 (Lucene, k1=1.5, b=0.75, English stopwords) of each query against two passages, and its best score.

    ``pairs`` (Q,) of (positive, negative) passage indices; returns scores (Q, 2) and best (Q,).
    """
    import logging as _logging

    import bm25s

    _logging.getLogger("bm25s").setLevel(_logging.WARNING)
    retriever = bm25s.BM25(k1=1.5, b=0.75)
    retriever.index(bm25s.tokenize(list(doc_texts), stopwords="en", show_progress=False), show_progress=False)
    tokens = bm25s.tokenize(list(queries), stopwords="en", show_progress=False, return_ids=False)
    vocab = retriever.vocab_dict
    scores = np.zeros((len(queries), 2), dtype=np.float32)
    best = np.zeros(len(queries), dtype=np.float32)
    for qi, (toks, (p, n)) in enumerate(zip(tokens, pairs)):
        known = [t for t in toks if t in vocab]
        if not known:
            continue
        s = retriever.get_scores(known)
        scores[qi] = s[p], s[n]
        best[qi] = s.max()
    return scores, best


def pseudo_margins(labels: str, dense: np.ndarray, bm25: np.ndarray | None, bm25_best: np.ndarray | None,
                   bm25_weight: float) -> np.ndarray:
    """Target margins (Q,) from (Q, 2) scores of (positive, negative): ``dense`` cosine, ``bm25``, or both.

    BM25 is divided by the query's best score over the corpus, so its margin is
    in [-1, 1] like a cosine's; ``infonce`` has no margin (zeros, unused).
    """
    if labels == "infonce":
        return np.zeros(len(dense), dtype=np.float32)
    scale = np.maximum(bm25_best, 1e-6)[:, None] if bm25 is not None else None
    if labels == "dense":
        s = dense
    elif labels == "bm25":
        s = bm25 / scale
    else:
        s = dense + bm25_weight * bm25 / scale
    return (s[:, 0] - s[:, 1]).astype(np.float32)


# ----------------------------------------------------------------------------- the adapter


def _tokenize(texts: Sequence[str], max_len: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    from hybridrag.models.hybrid_encoder import tokenizer_path

    tok = Tokenizer.from_file(str(tokenizer_path()))
    tok.no_padding()
    tok.enable_truncation(max_len)
    return [e.ids for e in tok.encode_batch(list(texts))]


def encode_states(model, ids: Sequence[list[int]], batch_size: int = 64):
    """The frozen body's output per text, [(T_i, d) float32], and the model's embeddings (N, D), in one pass."""
    import torch

    from hybridrag.models.train_encoder import pad

    states: list = [None] * len(ids)
    vecs = np.zeros((len(ids), model.cfg.out_dim), dtype=np.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            x, mask = pad([ids[i] for i in chunk])
            _, h = model.body(x, mask)  # (B, T, d)
            vecs[chunk] = model.from_hidden(h, mask).float().numpy()
            for row, i in enumerate(chunk):
                states[i] = h[row, : len(ids[i])].clone()
    return states, vecs


def pad_states(states: Sequence):
    """Cached states [(T_i, d)] -> hidden (B, T, d) and mask (B, T)."""
    import torch

    T = max(len(s) for s in states)
    hidden = torch.zeros(len(states), T, states[0].shape[-1], dtype=states[0].dtype)
    mask = torch.zeros(len(states), T, dtype=torch.bool)
    for i, s in enumerate(states):
        hidden[i, : len(s)] = s
        mask[i, : len(s)] = True
    return hidden, mask


@dataclass
class AdaptResult:
    checkpoint: str
    version: str
    base_version: str
    mode: str
    queries: str
    labels: str
    steps: int
    train_pairs: int
    heldout_pairs: int
    encode_seconds: float  # the base encoder's pass over corpus, pseudo-queries and replay (the index pass)
    train_seconds: float
    self_check: dict = field(default_factory=dict)  # held-out pseudo-pairs: base and adapted nDCG@10, interval
    history: list[dict] = field(default_factory=list)


class DomainAdapter:
    """Prepare once (encode the corpus, write pseudo-queries, mine, label), then train one or more students.

    ``prepare`` is the expensive part, one pass of the base encoder over the
    corpus and the pseudo-queries; :meth:`train` runs a variant (mode, query
    kinds, labels, budget) on what it prepared.
    """

    def __init__(self, corpus: Corpus, base_checkpoint: str | Path | None, cfg: AdaptConfig,
                 replay_texts: Sequence[str] | None = None):
        self.corpus, self.cfg, self.base_checkpoint = corpus, cfg, base_checkpoint
        self.replay_texts = list(replay_texts) if replay_texts is not None else None

    # -- preparation
    def prepare(self, progress: bool = False) -> "DomainAdapter":
        import torch

        from hybridrag.models.hybrid_encoder import DEFAULT_CHECKPOINT, load_checkpoint

        cfg = self.cfg
        torch.set_num_threads(max(1, cfg.threads))
        t0 = time.monotonic()
        self.base, self.base_meta = load_checkpoint(self.base_checkpoint or DEFAULT_CHECKPOINT)
        self.base.eval()
        if self.base.conv is not None and self.base.cfg.conv_position == "input":
            raise ValueError("the base encoder has an input conv block: its states cannot be cached")
        pairs = pseudo_queries(self.corpus, "ict+title", cfg.ict_per_passage, cfg.min_query_words, cfg.seed)
        if not pairs:
            raise ValueError("the corpus gives no pseudo-query (passages of one short sentence, no titles)")
        self.train_pairs, self.heldout = split_holdout(pairs, len(self.corpus.texts), cfg.holdout, cfg.seed)
        if self.replay_texts is None:
            from hybridrag.models.corpora import training_texts

            self.replay_texts = training_texts(limit=cfg.replay, seed=cfg.seed)
        self.doc_ids = _tokenize(self.corpus.texts, cfg.max_len)
        queries = [p.query for p in self.train_pairs]
        self.query_ids = _tokenize(queries, cfg.max_len)
        self.replay_ids = _tokenize(self.replay_texts, cfg.max_len)
        if progress:
            print(f"encoding {len(self.doc_ids)} passages, {len(queries)} pseudo-queries, "
                  f"{len(self.replay_ids)} replay texts", file=sys.stderr)
        self.doc_states, self.doc_vecs = encode_states(self.base, self.doc_ids)
        self.query_states, self.query_vecs = encode_states(self.base, self.query_ids)
        self.replay_states, self.replay_vecs = encode_states(self.base, self.replay_ids)
        self.heldout_ids = _tokenize([p.query for p in self.heldout], cfg.max_len) if self.heldout else []
        self.heldout_states, self.heldout_vecs = encode_states(self.base, self.heldout_ids)
        pos = np.array([p.passage for p in self.train_pairs])
        self.negatives = mine_negatives(self.query_vecs, self.doc_vecs, pos, self.corpus.groups, cfg.mine_depth,
                                        cfg.mine_skip, cfg.seed)
        self.dense_scores = np.stack([(self.query_vecs * self.doc_vecs[pos]).sum(1),
                                      (self.query_vecs * self.doc_vecs[self.negatives]).sum(1)], 1)
        self.bm25_scores, self.bm25_best = bm25_pair_scores(self.corpus.texts, queries,
                                                            list(zip(pos.tolist(), self.negatives.tolist())))
        self.encode_seconds = time.monotonic() - t0
        return self

    # -- students
    def student(self, mode: str):
        """A trainable copy of the base for ``mode``, with only what that mode trains requiring gradients."""
        import copy

        from hybridrag.models.hybrid_encoder import with_conv_branch

        model = with_conv_branch(self.base) if mode == "branch" else copy.deepcopy(self.base)
        trains = {"branch": (model.conv, model.fusion, model.out), "head": (model.out,), "full": (model,)}[mode]
        for p in model.parameters():
            p.requires_grad_(False)
        for part in trains:
            for p in part.parameters():
                p.requires_grad_(True)
        return model.train()

    def _inputs(self, mode: str, states: Sequence, ids: Sequence[list[int]], rows: Sequence[int]):
        from hybridrag.models.train_encoder import pad

        if mode == "full":
            return pad([ids[i][: self.cfg.train_max_len] for i in rows])
        return pad_states([states[i] for i in rows])

    def batch(self, mode: str, rows: Sequence[int], margins: np.ndarray, rng: random.Random):
        import torch

        from hybridrag.models.train_encoder import AdaptBatch

        pos = [self.train_pairs[i].passage for i in rows]
        neg = [int(self.negatives[i]) for i in rows]
        rep = rng.sample(range(len(self.replay_ids)), min(self.cfg.replay_per_step, len(self.replay_ids)))
        return AdaptBatch(
            queries=self._inputs(mode, self.query_states, self.query_ids, rows),
            positives=self._inputs(mode, self.doc_states, self.doc_ids, pos),
            negatives=self._inputs(mode, self.doc_states, self.doc_ids, neg),
            margin=torch.from_numpy(margins[list(rows)]),
            replay=self._inputs(mode, self.replay_states, self.replay_ids, rep) if rep else None,
            anchor=torch.from_numpy(self.replay_vecs[rep]) if rep else None)

    def train(self, variant: AdaptConfig | None = None, progress: bool = False):
        """Train one student within ``variant.minutes`` of CPU time; returns (student, history, wall seconds)."""
        import torch

        from hybridrag.models.train_encoder import DomainAdaptLoss

        v = variant or self.cfg
        torch.manual_seed(v.seed)
        rng = random.Random(v.seed)
        rows = [i for i, p in enumerate(self.train_pairs) if p.kind in v.queries]
        if len(rows) < 2:
            raise ValueError(f"fewer than two {v.queries} pseudo-queries to train on")
        margins = pseudo_margins(v.labels, self.dense_scores, self.bm25_scores, self.bm25_best, v.bm25_weight)
        model = self.student(v.mode)
        embed = model if v.mode == "full" else model.from_hidden
        w_margin, w_nce = (0.0, 1.0) if v.labels == "infonce" else (1.0, v.w_nce)
        loss_fn = DomainAdaptLoss(embed, w_margin=w_margin, w_nce=w_nce, w_anchor=v.w_anchor)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=v.peak_lr, weight_decay=0.01)
        history: list[dict] = []
        order: list[int] = []
        t0, c0 = time.monotonic(), time.process_time()
        step = 0
        while step < v.max_steps and time.process_time() - c0 < 60.0 * v.minutes:
            if len(order) < v.batch_size:
                order += rng.sample(rows, len(rows))
            take, order = order[: v.batch_size], order[v.batch_size :]
            lr = v.peak_lr * min(1.0, (step + 1) / max(1, v.warmup))
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss, parts = loss_fn(self.batch(v.mode, take, margins, rng))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            history.append({"step": step, "lr": lr, "seconds": time.monotonic() - t0,
                            "cpu_seconds": time.process_time() - c0, **parts})
            if progress and step % 25 == 0:
                print(f"{v.mode}/{v.queries}/{v.labels} step {step} loss {parts['loss']:.4f} "
                      f"({time.monotonic() - t0:.0f}s)", file=sys.stderr)
        return model.eval(), history, time.monotonic() - t0

    # -- scoring
    def embed_queries(self, model, mode: str, ids: Sequence[list[int]], states: Sequence | None = None) -> np.ndarray:
        """Texts under ``model`` (N, D): from the base body's states when the body stayed frozen."""
        if mode == "full" or states is None:
            return encode_states(model, ids)[1]
        return embed_cached(model, states)

    def corpus_vectors(self, model, mode: str) -> np.ndarray:
        """The corpus under ``model`` (N, D): from the cached states, or re-encoded when the body trained."""
        if mode == "full":
            return encode_states(model, self.doc_ids)[1]
        return embed_cached(model, self.doc_states)

    def self_check(self, model, mode: str, doc_vecs: np.ndarray | None = None) -> dict:
        """nDCG@10 of the held-out pseudo-queries (one relevant passage each), base and adapted, and the
        paired 95% bootstrap interval of the change: the domain's own canary."""
        from hybridrag.agents.evaluation.harness import paired_bootstrap

        if not self.heldout:
            return {"pairs": 0}
        new_q = self.embed_queries(model, mode, self.heldout_ids, self.heldout_states)
        new_d = self.corpus_vectors(model, mode) if doc_vecs is None else doc_vecs
        pos = np.array([p.passage for p in self.heldout])
        base = heldout_ndcg(self.heldout_vecs, self.doc_vecs, pos)
        new = heldout_ndcg(new_q, new_d, pos)
        mean, lo, hi = paired_bootstrap(new, base)
        return {"pairs": len(pos), "base": float(base.mean()), "adapted": float(new.mean()), "delta": mean,
                "delta_lo": lo, "delta_hi": hi}

    def save(self, model, path: str | Path, variant: AdaptConfig, history: list[dict], seconds: float,
             check: dict) -> AdaptResult:
        from hybridrag.models.hybrid_encoder import save_checkpoint

        v = variant
        meta = {"parent": self.base_meta["version"], "mode": v.mode, "queries": v.queries, "labels": v.labels,
                "steps": len(history), "train_seconds": seconds, "encode_seconds": self.encode_seconds,
                "passages": len(self.corpus.texts), "train_pairs": len(self.train_pairs),
                "self_check": check, "config": asdict(v)}
        written = save_checkpoint(path, model.cpu().eval(), int(self.base_meta.get("step", 0)) + len(history),
                                  {**self.base_meta.get("metrics", {}), "adapt": meta})
        return AdaptResult(str(path), written["version"], self.base_meta["version"], v.mode, v.queries, v.labels,
                           len(history), len(self.train_pairs), len(self.heldout), self.encode_seconds, seconds,
                           check, history)


def embed_cached(model, states: Sequence, batch_size: int = 128) -> np.ndarray:
    """Embeddings (N, D) of cached body states under ``model``'s branch and head."""
    import torch

    out = np.zeros((len(states), model.cfg.out_dim), dtype=np.float32)
    order = sorted(range(len(states)), key=lambda i: len(states[i]))
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            h, mask = pad_states([states[i] for i in chunk])
            out[chunk] = model.from_hidden(h, mask).float().numpy()
    return out


def heldout_ndcg(query_vecs: np.ndarray, doc_vecs: np.ndarray, positives: np.ndarray, k: int = 10) -> np.ndarray:
    """nDCG@k (Q,) with one relevant passage per query: 1 / log2(rank + 1) when it ranks within k."""
    scores = query_vecs @ doc_vecs.T  # (Q, N)
    rank = (scores > scores[np.arange(len(positives)), positives][:, None]).sum(1) + 1  # (Q,) 1-based
    return np.where(rank <= k, 1.0 / np.log2(rank + 1), 0.0)


def adapt(corpus_path: str | Path, out: str | Path, cfg: AdaptConfig, base_checkpoint: str | Path | None = None,
          replay_texts: Sequence[str] | None = None, progress: bool = False) -> AdaptResult:
    """Adapt ``base_checkpoint`` (default: the shipped encoder) to the passages of ``corpus_path``; write ``out``."""
    corpus = Corpus.from_jsonl(corpus_path, cfg.max_passages, cfg.seed)
    adapter = DomainAdapter(corpus, base_checkpoint, cfg, replay_texts).prepare(progress)
    model, history, seconds = adapter.train(progress=progress)
    check = adapter.self_check(model, cfg.mode)
    return adapter.save(model, out, cfg, history, seconds, check)


# ----------------------------------------------------------------------------- in the service

# One script per batch: a passage counts once by id (a replayed Kafka record adds nothing);
# ``pending`` counts the new ones since the last adaptation; the oldest beyond ARGV[1] go.
_LUA_ADD_PASSAGES = r"""
local keep = tonumber(ARGV[1])
local added = 0
for i = 2, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), ARGV[i])
    added = added + 1
  end
end
local extra = redis.call('ZCARD', KEYS[2]) - keep
if extra > 0 then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, extra - 1)) do redis.call('HDEL', KEYS[1], id) end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1)
end
return redis.call('INCRBY', KEYS[3], added)
"""


class PassageBuffer:
    """The passages the service ingested, for domain adaptation, in Redis under ``<prefix>:adapt:``.

        passages  hash  chunk id -> JSON {title, text}
        order     zset  chunk id -> arrival sequence (the newest ``max_passages`` are kept)
        pending   counter: new passages since the last adaptation started
    """

    def __init__(self, redis_url: str, prefix: str, max_passages: int, client=None):
        import redis

        self.client = client or redis.Redis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
        self.ns = f"{prefix}:adapt:"
        self.max_passages = max_passages
        self._add = self.client.register_script(_LUA_ADD_PASSAGES)

    def _keys(self) -> list[str]:
        return [self.ns + k for k in ("passages", "order", "pending", "seq")]

    def add(self, passages: Sequence[tuple[str, str, str]]) -> int:
        """Buffer (id, title, text) passages; returns the pending count."""
        if not passages:
            return self.pending()
        args: list = [self.max_passages]
        for pid, title, text in passages:
            args += [pid, json.dumps({"title": title, "text": text}, ensure_ascii=False)]
        return int(self._add(keys=self._keys(), args=args))

    def pending(self) -> int:
        return int(self.client.get(self.ns + "pending") or 0)

    def consume(self, n: int) -> int:
        """Take ``n`` off the pending count when an adaptation starts on them; returns what is left."""
        return int(self.client.decrby(self.ns + "pending", n))

    def write_corpus(self, path: Path) -> int:
        """Every buffered passage as a BEIR corpus.jsonl; returns how many."""
        ids = [m.decode() for m in self.client.zrange(self.ns + "order", 0, -1)]
        rows = self.client.hmget(self.ns + "passages", ids) if ids else []
        n = 0
        with open(path, "w", encoding="utf-8") as f:
            for pid, row in zip(ids, rows):
                if row is not None:
                    f.write(json.dumps({"_id": pid, **json.loads(row)}, ensure_ascii=False) + "\n")
                    n += 1
        return n

    def clear(self) -> int:
        return int(self.client.delete(*self._keys()))


def general_canary(base_checkpoint: str | None, adapted: str | Path, lcfg, cfg: AdaptConfig
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per-query canary nDCG@10 (Q,) of the base and the adapted encoder on the learner's general canary.

    A branch or head adaptation leaves the body frozen: one pass of the base body
    over the canary serves both, the adapted encoder reading the cached states.
    """
    from hybridrag.agents.retention.continual_learner import canary_per_query, canary_set, ndcg_per_query
    from hybridrag.models.hybrid_encoder import DEFAULT_CHECKPOINT, load_checkpoint

    if cfg.mode == "full":
        return canary_per_query(base_checkpoint, lcfg), canary_per_query(adapted, lcfg)
    c = canary_set(lcfg.canary_dataset, lcfg.canary_queries, lcfg.canary_distractors)
    base = load_checkpoint(base_checkpoint or DEFAULT_CHECKPOINT)[0].eval()
    new = load_checkpoint(adapted)[0].eval()
    d_states, d_base = encode_states(base, _tokenize(c.doc_texts, cfg.max_len))
    q_states, q_base = encode_states(base, _tokenize(c.queries, cfg.max_len))

    class Fixed:  # the canary's scorer takes an encoder; these are its vectors
        def __init__(self, vecs: dict[str, np.ndarray]):
            self.vecs = vecs

        def encode(self, texts):
            return np.stack([self.vecs[t] for t in texts])

    def scores(d_vecs, q_vecs):
        return ndcg_per_query(Fixed({**dict(zip(c.doc_texts, d_vecs)), **dict(zip(c.queries, q_vecs))}),
                              c.queries, c.query_ids, c.qrels, c.doc_ids, c.doc_texts)

    return scores(d_base, q_base), scores(embed_cached(new, d_states), embed_cached(new, q_states))


def run_adapt_update(job: dict):
    """The subprocess side: adapt, then gate on the general canary and the domain self-check.

    Promoted iff the weights changed, the general canary loses at most its
    tolerance, and the held-out pseudo-pairs do not fall.
    """
    from hybridrag.agents.retention.continual_learner import (LearnerConfig, UpdateResult, paired_interval,
                                                             should_promote)

    t0 = time.monotonic()
    cfg, lcfg = AdaptConfig(**job["adapt"]), LearnerConfig(**job["learner"])
    out = Path(job["out_dir"]) / f"adapt-{int(time.time())}.pt"
    result = adapt(job["corpus"], out, cfg, job.get("base_checkpoint"), job.get("replay_texts") or None, progress=True)
    final = out.with_name(f"{result.version}.pt")
    out.replace(final)
    base_q, new_q = general_canary(job.get("base_checkpoint"), final, lcfg, cfg)
    base, new = float(base_q.mean()), float(new_q.mean())
    lo, hi = paired_interval(new_q, base_q)
    check = result.self_check
    domain_ok = check.get("pairs", 0) == 0 or check["delta"] >= 0.0
    changed = result.version != result.base_version
    promoted = changed and domain_ok and should_promote(new, base, lcfg.canary_tolerance)
    verdict = ("promoted" if promoted else "rejected: the weights did not change" if not changed else
               "rejected: the domain self-check fell" if not domain_ok else
               f"rejected: canary lost {base - new:.4f} > tolerance {lcfg.canary_tolerance}")
    metrics = {"canary_base": base, "canary_new": new, "canary_delta": new - base, "canary_delta_lo": lo,
               "canary_delta_hi": hi, "steps": float(result.steps), "passages": float(job.get("passages", 0)),
               "train_seconds": result.train_seconds, "encode_seconds": result.encode_seconds,
               **{f"self_check_{k}": float(v) for k, v in check.items()}, "seconds": time.monotonic() - t0}
    detail = (f"domain adaptation {verdict}; {lcfg.canary_dataset} nDCG@10 {base:.4f} -> {new:.4f} "
              f"[{lo:+.4f}, {hi:+.4f}]; self-check {check.get('base', 0):.4f} -> {check.get('adapted', 0):.4f} on "
              f"{check.get('pairs', 0)} held-out pseudo-queries; {result.mode}/{result.queries}/{result.labels}, "
              f"{result.steps} steps; parent {result.base_version}")
    return UpdateResult(promoted, result.base_version, result.version, str(final), metrics, detail,
                        time.monotonic() - t0)


async def run_adapt_in_subprocess(buffer: PassageBuffer, base_checkpoint: str | None, cfg: AdaptConfig, lcfg,
                                  replay_texts: Sequence[str] = (), timeout_s: float | None = None):
    """Snapshot the buffered passages and adapt in a separate process at low priority (nice 10)."""
    import uuid

    from hybridrag.agents.retention.continual_learner import run_job_in_subprocess

    job_dir = Path(lcfg.data_dir) / "cache" / "adapt" / "jobs" / uuid.uuid4().hex[:12]
    job_dir.mkdir(parents=True, exist_ok=True)
    n = buffer.write_corpus(job_dir / "corpus.jsonl")
    (job_dir / "job.json").write_text(json.dumps({
        "corpus": str(job_dir / "corpus.jsonl"), "passages": n, "base_checkpoint": base_checkpoint,
        "adapt": asdict(cfg), "learner": asdict(lcfg), "out_dir": str(lcfg.checkpoint_dir),
        "replay_texts": list(replay_texts)}, ensure_ascii=False))
    budget = 60.0 * cfg.minutes + lcfg.timeout_s  # the training budget plus the passes and the canary
    return await run_job_in_subprocess(__name__, job_dir, cfg.threads, budget if timeout_s is None else timeout_s,
                                       niceness=10)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from hybridrag.agents.retention.continual_learner import UpdateResult

    ap = argparse.ArgumentParser(prog=f"python -m {__name__}", description="One domain adaptation job.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run one adaptation from a job file (what the worker's subprocess does)")
    run.add_argument("--input", required=True, type=Path)
    run.add_argument("--output", required=True, type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.monotonic()
    try:
        result = run_adapt_update(json.loads(args.input.read_text()))
    except Exception as e:  # the worker needs a result either way
        log.exception("domain adaptation failed")
        result = UpdateResult.failed(f"{type(e).__name__}: {e}", seconds=time.monotonic() - t0)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(result)))
    tmp.replace(args.output)
    print(json.dumps({"promoted": result.promoted, "version": result.new_version, "detail": result.detail,
                      "error": result.error}))
    return 0 if not result.error else 1


if __name__ == "__main__":
    sys.exit(main())
