"""Distil the hybrid encoder from all-MiniLM-L6-v2: ``hybridrag train encoder``.

Layers wrap each other (see ../shared/STYLE.md):

- ``HybridEncoder`` (models/hybrid_encoder.py) is the backbone;
- ``Distiller(student)`` owns the loss: ``loss, parts = distiller(batch)``;
- ``Trainer`` owns the data, the optimiser, resume and checkpoints.

The student starts from the teacher (layer dropping as in DistilBERT, Sanh et
al. 2019, https://arxiv.org/abs/1910.01108): the token table is the rank-r SVD
of the teacher's (ALBERT-style factorisation), the transformer blocks are
teacher layers with their feed-forward neurons pruned by weight magnitude
(Michel et al. 2019, https://arxiv.org/abs/1905.10650, prune heads; the same
importance idea applies to neurons), and the conv block and fusion start as
pass-throughs. Training then matches

- the teacher's sentence embeddings (cosine), and the teacher's in-batch
  similarity matrix (relational distillation, Park et al. 2019,
  https://arxiv.org/abs/1904.05068);
- an in-batch contrastive loss on (query, passage) pairs (InfoNCE, van den
  Oord et al. 2018, https://arxiv.org/abs/1807.03748; multiple negatives
  ranking as in Henderson et al. 2017, https://arxiv.org/abs/1705.00652).

Teacher embeddings are computed once and cached under
``<data_dir>/cache/encoder-train/``: the teacher (~230 sentences/s on two
cores) is the slowest part of the budget.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import typer
from tqdm import tqdm

from hybridrag.models.encoders import ORIGINAL_VERSION
from hybridrag.models.hybrid_encoder import DEFAULT_CHECKPOINT, Config, HybridEncoder, save_checkpoint, tokenizer_path

app = typer.Typer(help="Train models.", no_args_is_help=True)


@app.callback()
def _train() -> None:
    """Train models (a group, so that ``encoder`` stays a named sub-command)."""


# ----------------------------------------------------------------------------- teacher init


def teacher_state_dict() -> dict[str, torch.Tensor]:
    """all-MiniLM-L6-v2's BERT weights, read offline from its package."""
    from safetensors.torch import load_file

    from hybridrag.models.tokenizer import minilm_model_dir

    return load_file(str(Path(minilm_model_dir()) / "model.safetensors"))


def ffn_keep_indices(w_in: torch.Tensor, w_out: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` feed-forward neurons with the largest |w_in row| * |w_out column|, in order."""
    importance = w_in.norm(dim=1) * w_out.norm(dim=0)  # (d_ff,)
    return importance.topk(keep).indices.sort().values


@torch.no_grad()
def init_from_teacher(model: HybridEncoder, layers: Sequence[int], teacher: dict | None = None) -> HybridEncoder:
    """Seed ``model`` with MiniLM's embedding tables and the given teacher ``layers`` (one per block)."""
    cfg = model.cfg
    sd = teacher if teacher is not None else teacher_state_dict()
    layers = list(layers)
    if len(layers) != cfg.n_layers:
        raise ValueError(f"need {cfg.n_layers} teacher layers, got {list(layers)}")
    if cfg.d_model != sd["embeddings.word_embeddings.weight"].shape[1]:
        raise ValueError("teacher init needs d_model equal to the teacher's width (384)")
    model.embed.tokens.weight.copy_(sd["embeddings.word_embeddings.weight"])
    # BERT adds token-type 0 to every token: fold it into the positions
    pos = sd["embeddings.position_embeddings.weight"] + sd["embeddings.token_type_embeddings.weight"][0]
    model.embed.positions.weight.copy_(pos[: cfg.max_positions])
    model.embed.norm.weight.copy_(sd["embeddings.LayerNorm.weight"])
    model.embed.norm.bias.copy_(sd["embeddings.LayerNorm.bias"])
    for block, i in zip(model.blocks, layers):
        p = f"encoder.layer.{i}."
        qkv = [sd[p + f"attention.self.{n}.weight"] for n in ("query", "key", "value")]
        block.attn.qkv.weight.copy_(torch.cat(qkv, dim=0))
        block.attn.qkv.bias.copy_(torch.cat([sd[p + f"attention.self.{n}.bias"] for n in ("query", "key", "value")]))
        block.attn.proj.weight.copy_(sd[p + "attention.output.dense.weight"])
        block.attn.proj.bias.copy_(sd[p + "attention.output.dense.bias"])
        block.norm1.weight.copy_(sd[p + "attention.output.LayerNorm.weight"])
        block.norm1.bias.copy_(sd[p + "attention.output.LayerNorm.bias"])
        w_in, b_in = sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"]
        w_out, b_out = sd[p + "output.dense.weight"], sd[p + "output.dense.bias"]
        keep = ffn_keep_indices(w_in, w_out, cfg.d_ff)
        block.ff_in.weight.copy_(w_in[keep])
        block.ff_in.bias.copy_(b_in[keep])
        block.ff_out.weight.copy_(w_out[:, keep])
        block.ff_out.bias.copy_(b_out)
        block.norm2.weight.copy_(sd[p + "output.LayerNorm.weight"])
        block.norm2.bias.copy_(sd[p + "output.LayerNorm.bias"])
    return model


@torch.no_grad()
def fit_output_projection(model: HybridEncoder, ids: Sequence[list[int]], teacher: np.ndarray,
                          ridge: float = 1e-3, batch_size: int = 128) -> float:
    """Set the output projection to the ridge-regression map from the student's pooled
    features to the teacher's embeddings (closed form, one pass over ``ids``).

    Mean pooling and the projection are both linear, so pooling first is exact.
    Returns the mean cosine to the teacher after the fit.
    """
    from hybridrag.models.hybrid_encoder import mean_pool

    was_training = model.training
    model.eval()
    out, feats = model.out, []
    model.out = nn.Identity()  # token_states then stops at the fused features
    try:
        for s in range(0, len(ids), batch_size):
            x, mask = pad(ids[s : s + batch_size])
            feats.append(mean_pool(model.token_states(x, mask), mask))
    finally:
        model.out = out
    X = torch.cat(feats).double()  # (N, d)
    Y = torch.from_numpy(teacher).double()  # (N, out_dim)
    x_mean, y_mean = X.mean(0), Y.mean(0)
    Xc, Yc = X - x_mean, Y - y_mean
    W = torch.linalg.solve(Xc.T @ Xc + ridge * len(X) * torch.eye(X.shape[1], dtype=X.dtype), Xc.T @ Yc)  # (d, out)
    out.weight.copy_(W.T.float())
    out.bias.copy_((y_mean - x_mean @ W).float())
    pred = torch.nn.functional.normalize((X @ W + (y_mean - x_mean @ W)).float(), dim=-1)
    model.train(was_training)
    return float((pred * torch.from_numpy(teacher)).sum(-1).mean())


# ----------------------------------------------------------------------------- losses


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean 1 - cos between unit rows (B, D); equals MSE/2 between unit vectors."""
    return (1.0 - (student * teacher).sum(dim=-1)).mean()


def similarity_matrix_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the in-batch cosine matrices (B, B) of student and teacher."""
    return F.mse_loss(student @ student.T, teacher @ teacher.T)


def info_nce(queries: torch.Tensor, passages: torch.Tensor, temperature: float) -> torch.Tensor:
    """In-batch contrastive loss: query i's positive is passage i, the rest are negatives."""
    logits = queries @ passages.T / temperature  # (B, B)
    return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))


def info_nce_with_negatives(queries: torch.Tensor, passages: torch.Tensor, negatives: torch.Tensor,
                            temperature: float) -> torch.Tensor:
    """InfoNCE over in-batch passages (B, D) plus mined hard negatives (M, D): query i's positive is passage i."""
    logits = queries @ torch.cat([passages, negatives]).T / temperature  # (B, B + M)
    return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))


def margin_mse(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
               target_margin: torch.Tensor) -> torch.Tensor:
    """MarginMSE (Hofstätter et al. 2020, https://arxiv.org/abs/2010.02666), as GPL trains with it.

    queries, positives, negatives (B, D) unit rows; target_margin (B,) the pseudo-labeller's
    score(q, pos) - score(q, neg). The student's margin is in cosine units.
    """
    margin = (queries * positives).sum(-1) - (queries * negatives).sum(-1)  # (B,)
    return F.mse_loss(margin, target_margin)


@dataclass
class AdaptBatch:
    """One step of domain adaptation: pseudo-queries, their passages, a mined negative each, replayed texts.

    Each field is an encoder input the student embeds: ``(ids, mask)`` token tensors
    (B, T), or ``(hidden, mask)`` cached transformer states (B, T, d) when the
    transformer is frozen. ``margin`` (B,) is the pseudo-label; ``anchor`` (R, D)
    the replayed texts' embeddings under the base encoder.
    """

    queries: tuple[torch.Tensor, torch.Tensor]
    positives: tuple[torch.Tensor, torch.Tensor]
    negatives: tuple[torch.Tensor, torch.Tensor]
    margin: torch.Tensor
    replay: tuple[torch.Tensor, torch.Tensor] | None = None
    anchor: torch.Tensor | None = None


class DomainAdaptLoss(nn.Module):
    """Owns the adaptation loss, GPL-style (Wang et al. 2022, https://arxiv.org/abs/2112.07577).

    ``w_margin`` MarginMSE on the pseudo-labels, ``w_nce`` InfoNCE with in-batch
    and mined negatives, and ``w_anchor`` a cosine anchor of replayed texts to the
    base encoder's embeddings (learning without forgetting, Li & Hoiem 2016,
    https://arxiv.org/abs/1606.09282). ``embed(x, mask)`` is the student's
    ``forward`` on token ids or its ``from_hidden`` on cached states.
    """

    def __init__(self, embed, w_margin: float = 1.0, w_nce: float = 0.0, w_anchor: float = 1.0,
                 temperature: float = 0.05):
        super().__init__()
        self.embed = embed
        self.w_margin, self.w_nce, self.w_anchor, self.temperature = w_margin, w_nce, w_anchor, temperature

    def forward(self, b: AdaptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        q, p, n = self.embed(*b.queries), self.embed(*b.positives), self.embed(*b.negatives)  # (B, D) each
        zero = q.new_zeros(())
        margin = margin_mse(q, p, n, b.margin) if self.w_margin else zero
        nce = info_nce_with_negatives(q, p, n, self.temperature) if self.w_nce else zero
        anchor = cosine_loss(self.embed(*b.replay), b.anchor) if b.replay is not None and self.w_anchor else zero
        loss = self.w_margin * margin + self.w_nce * nce + self.w_anchor * anchor
        parts = {"loss": loss, "margin": margin, "nce": nce, "anchor": anchor}
        return loss, {k: float(v.detach()) for k, v in parts.items()}


@dataclass
class Batch:
    """Token ids, masks (B, T) and teacher embeddings (B, 384) for texts, queries and passages.

    Pairs sampled beyond the teacher budget have no teacher embedding (``*_known`` False):
    they still feed the contrastive loss, which needs none.
    """

    text_ids: torch.Tensor
    text_mask: torch.Tensor
    text_teacher: torch.Tensor
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    query_teacher: torch.Tensor
    passage_ids: torch.Tensor
    passage_mask: torch.Tensor
    passage_teacher: torch.Tensor
    query_known: torch.Tensor | None = None  # (B,) bool: has a teacher embedding (None: all do)
    passage_known: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        return Batch(**{k: None if v is None else v.to(device) for k, v in self.__dict__.items()})


class Distiller(nn.Module):
    """Owns the loss: embedding distillation + similarity-matrix distillation + InfoNCE."""

    def __init__(self, student: HybridEncoder, w_cos: float = 1.0, w_sim: float = 1.0, w_nce: float = 0.1,
                 temperature: float = 0.05):
        super().__init__()
        self.student = student
        self.w_cos, self.w_sim, self.w_nce, self.temperature = w_cos, w_sim, w_nce, temperature

    def forward(self, b: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        s_text = self.student(b.text_ids, b.text_mask)  # (B, 384)
        s_q = self.student(b.query_ids, b.query_mask)  # (B, 384)
        s_p = self.student(b.passage_ids, b.passage_mask)  # (B, 384)
        qk = b.query_known if b.query_known is not None else torch.ones(len(s_q), dtype=torch.bool, device=s_q.device)
        pk = b.passage_known if b.passage_known is not None else torch.ones(len(s_p), dtype=torch.bool, device=s_p.device)
        cos_terms = [cosine_loss(s_text, b.text_teacher)]
        cos_terms += [cosine_loss(s[k], t[k]) for s, t, k in ((s_q, b.query_teacher, qk), (s_p, b.passage_teacher, pk))
                      if bool(k.any())]
        cos = sum(cos_terms) / len(cos_terms)
        # x10: the matrices' entries differ by little, so the raw MSE would barely register
        sim = similarity_matrix_loss(s_text, b.text_teacher)
        if bool(qk.any()) and bool(pk.any()):
            sim = sim + F.mse_loss(s_q[qk] @ s_p[pk].T, b.query_teacher[qk] @ b.passage_teacher[pk].T)
        sim = 10.0 * sim
        nce = info_nce(s_q, s_p, self.temperature)
        loss = self.w_cos * cos + self.w_sim * sim + self.w_nce * nce
        parts = {"loss": loss, "cos": cos, "sim": sim, "nce": nce}
        return loss, {k: float(v.detach()) for k, v in parts.items()}


# ----------------------------------------------------------------------------- data


def data_root() -> Path:
    from hybridrag.models.corpora import data_dir

    return data_dir() / "cache" / "encoder-train"


def string_key(s: str) -> bytes:
    """20-byte content key of one string in the teacher cache."""
    return hashlib.sha1(s.encode("utf-8", "replace")).digest()


def _load_teacher_store(store: Path) -> dict[bytes, np.ndarray]:
    known: dict[bytes, np.ndarray] = {}
    for shard in sorted(store.glob("shard-*.npz")):
        z = np.load(shard)
        for k, v in zip(z["keys"], z["emb"]):
            known[k.tobytes()] = v
    return known


def teacher_runtime(device: str = "cpu") -> "HybridEncoderRuntime":
    """all-MiniLM-L6-v2 itself, rebuilt from its weights in this file's backbone: all six
    layers, no convolution block. In the hardware's native precision (BF16 on a CPU with
    AVX-512 BF16) it embeds ~2.8x faster than sentence-transformers' FP32, at cosine
    > 0.9999 to it, which makes the one-off teacher pass of a training set affordable."""
    from hybridrag.models.hybrid_encoder import HybridEncoderRuntime

    model = init_from_teacher(HybridEncoder(Config(n_layers=6, conv_kernels=())), range(6))
    return HybridEncoderRuntime(model, {"version": "minilm-l6-v2"}, device=device)


def teacher_embeddings(strings: Sequence[str], cache_dir: Path, chunk: int = 2048, device: str = "cpu",
                       max_len: int = 128) -> np.ndarray:
    """Teacher embeddings float32 (N, 384) of ``strings``.

    Cached by content in ``cache_dir/teacher-store/`` (one shard per computed chunk),
    so an interrupted run, or a run on another sample, reuses what is done.
    The teacher reads at most ``max_len`` tokens, as the student does in training.
    """
    store = cache_dir / f"teacher-store-{max_len}"
    store.mkdir(parents=True, exist_ok=True)
    known = _load_teacher_store(store)
    keys = [string_key(s) for s in strings]
    first_seen: dict[bytes, int] = {}
    for i, k in enumerate(keys):
        if k not in known:
            first_seen.setdefault(k, i)
    todo = list(first_seen.values())
    if todo:
        teacher = teacher_runtime(device)
        n_shards = len(list(store.glob("shard-*.npz")))
        for c in tqdm(range(0, len(todo), chunk), desc="teacher embeddings", unit="chunk",
                      total=math.ceil(len(todo) / chunk)):
            idx = todo[c : c + chunk]
            emb = teacher.encode([strings[i] for i in idx], batch_size=64, max_length=max_len)
            shard_keys = np.frombuffer(b"".join(keys[i] for i in idx), dtype="V20")
            tmp = store / f"shard-{n_shards:05d}.tmp.npz"
            np.savez(tmp, keys=shard_keys, emb=emb)
            tmp.replace(store / f"shard-{n_shards:05d}.npz")
            n_shards += 1
            for i, e in zip(idx, emb):
                known[keys[i]] = e
    return np.stack([known[k] for k in keys]).astype(np.float32)


@dataclass
class TrainingData:
    """Every distinct string once, its token ids and teacher embedding; texts and pairs index into it."""

    strings: list[str]
    ids: list[list[int]]
    teacher: np.ndarray  # (N, 384) float32; zero rows where ``known`` is False
    known: np.ndarray  # (N,) bool: the teacher embedded this string
    texts: list[int]  # indices of distillation texts
    pairs: list[tuple[int, int]]  # (query index, passage index)
    val_texts: list[int]
    val_pairs: list[tuple[int, int]]


def load_training_data(max_texts: int, max_pairs: int, max_len: int, seed: int, device: str = "cpu",
                       n_val: int = 1000, extra_pairs: int = 0, sources: Sequence[str] | None = None,
                       long_passages: int = 0) -> TrainingData:
    """Sample the offline corpora (never a held-out item), tokenize, and fetch cached teacher embeddings.

    ``sources`` names the corpora to read (default: all training sources); a
    domain left out here is never seen in training. ``long_passages``
    multi-paragraph passages join the texts, each also paired with one of its
    own sentences, so the student sees the long inputs it will serve.
    The teacher embeds the texts and the first ``max_pairs`` pairs; ``extra_pairs`` more
    pairs come without teacher embeddings, for the contrastive loss only.
    """
    from tokenizers import Tokenizer

    from hybridrag.models import corpora

    sources = tuple(sources or corpora.TRAINING_SOURCES)
    pair_sources = [x for x in sources if x in corpora.PAIR_SOURCES]
    texts = corpora.training_texts(limit=max_texts + n_val, seed=seed, sources=sources)
    pairs = corpora.training_pairs(limit=max_pairs + n_val + extra_pairs, seed=seed, sources=pair_sources)
    if long_passages:
        # mixed in at random (validation included), so every slice of the stream has its share
        rng = random.Random(seed)
        long_pairs = corpora.training_passages(limit=long_passages, seed=seed, sources=sources)
        texts = texts + [p for _, p in long_pairs]
        rng.shuffle(texts)
        taught = pairs[: max_pairs + n_val] + long_pairs
        rng.shuffle(taught)
        pairs = taught + pairs[max_pairs + n_val :]
        max_pairs += len(long_pairs)
    index: dict[str, int] = {}
    for s in [*texts, *(x for p in pairs[: max_pairs + n_val] for x in p)]:
        index.setdefault(s, len(index))
    n_taught = len(index)
    for s in (x for p in pairs[max_pairs + n_val :] for x in p):
        index.setdefault(s, len(index))
    strings = list(index)
    tok = Tokenizer.from_file(str(tokenizer_path()))
    tok.no_padding()
    tok.enable_truncation(max_len)
    ids = [e.ids for e in tok.encode_batch(strings)]
    teacher = np.zeros((len(strings), 384), dtype=np.float32)
    teacher[:n_taught] = teacher_embeddings(strings[:n_taught], data_root(), device=device, max_len=max_len)
    known = np.arange(len(strings)) < n_taught
    text_idx = [index[s] for s in texts]
    pair_idx = [(index[q], index[p]) for q, p in pairs]
    # validation: a slice of the training stream kept out of the gradient steps
    # (the evaluation sets' held-out items are never loaded here at all)
    return TrainingData(strings, ids, teacher, known, text_idx[n_val:], pair_idx[n_val:], text_idx[:n_val], pair_idx[:n_val])


def pad(seqs: Sequence[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (B, T) ids and a bool mask."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


def length_bucketed(indices: list[int], lengths: Sequence[int], batch_size: int, rng: random.Random,
                    pool: int = 50) -> list[list[int]]:
    """Shuffle, sort within pools of ``pool`` batches by length, cut batches, shuffle batches (less padding)."""
    order = indices[:]
    rng.shuffle(order)
    batches = []
    span = batch_size * pool
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return [b for b in batches if len(b) == batch_size]


def batch_stream(data: TrainingData, batch_size: int, seed: int, epoch: int = 0, start: int = 0):
    """Endless (epoch, position, text batch, pair batch); epoch-seeded, so a resumed run continues the same order."""
    text_len = [len(data.ids[i]) for i in range(len(data.strings))]
    pair_len = [len(data.ids[q]) + len(data.ids[p]) for q, p in data.pairs]
    while True:
        rng = random.Random(seed * 1_000_003 + epoch)
        tb = length_bucketed(list(range(len(data.texts))), [text_len[i] for i in data.texts], batch_size, rng)
        pb = length_bucketed(list(range(len(data.pairs))), pair_len, batch_size, rng)
        for k in range(start, min(len(tb), len(pb))):
            yield epoch, k, [data.texts[i] for i in tb[k]], [data.pairs[i] for i in pb[k]]
        epoch, start = epoch + 1, 0


def make_batch(data: TrainingData, texts: list[int], pairs: list[tuple[int, int]]) -> Batch:
    t_ids, t_mask = pad([data.ids[i] for i in texts])
    q_ids, q_mask = pad([data.ids[q] for q, _ in pairs])
    p_ids, p_mask = pad([data.ids[p] for _, p in pairs])
    teach = lambda idx: torch.from_numpy(data.teacher[idx])  # noqa: E731
    qs, ps = [q for q, _ in pairs], [p for _, p in pairs]
    return Batch(t_ids, t_mask, teach(texts), q_ids, q_mask, teach(qs), p_ids, p_mask, teach(ps),
                 torch.from_numpy(data.known[qs]), torch.from_numpy(data.known[ps]))


# ----------------------------------------------------------------------------- schedule and metrics


def lr_at(step: int, base_lr: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warmup then cosine decay to ``floor * base_lr``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def embed_indices(model: HybridEncoder, data: TrainingData, idx: Sequence[int], device, batch_size: int = 128) -> np.ndarray:
    out = np.zeros((len(idx), model.cfg.out_dim), dtype=np.float32)
    order = sorted(range(len(idx)), key=lambda i: len(data.ids[idx[i]]))
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        ids, mask = pad([data.ids[idx[i]] for i in chunk])
        out[chunk] = model(ids.to(device), mask.to(device)).float().cpu().numpy()
    return out


def validate(model: HybridEncoder, data: TrainingData, device) -> dict[str, float]:
    """Cosine to the teacher on validation texts, and pair recall@1 of student vs teacher."""
    was_training = model.training
    model.eval()
    s = embed_indices(model, data, data.val_texts, device)
    cos = float((s * data.teacher[data.val_texts]).sum(1).mean())
    q_idx = [q for q, _ in data.val_pairs]
    p_idx = [p for _, p in data.val_pairs]
    sq, sp = embed_indices(model, data, q_idx, device), embed_indices(model, data, p_idx, device)
    target = np.arange(len(q_idx))
    r1 = float(((sq @ sp.T).argmax(1) == target).mean())
    tq, tp = data.teacher[q_idx], data.teacher[p_idx]
    r1_teacher = float(((tq @ tp.T).argmax(1) == target).mean())
    model.train(was_training)
    return {"val_cos": cos, "val_pair_r1": r1, "val_pair_r1_teacher": r1_teacher}


def plot_history(history: list[dict], csv_path: Path, png_path: Path) -> Path | None:
    """Write the loss history as CSV, and as a PNG when matplotlib is installed."""
    if not history:
        return None
    keys = sorted({k for row in history for k in row})
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in history if "loss" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for k in ("loss", "cos", "sim", "nce"):
        ax1.plot(steps, [r[k] for r in history if "loss" in r], label=k)
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_title("training loss (smoothed)")
    ax1.legend()
    val = [r for r in history if "val_cos" in r]
    if val:
        ax2.plot([r["step"] for r in val], [r["val_cos"] for r in val], marker="o", label="cos to teacher")
        ax2.plot([r["step"] for r in val], [r["val_pair_r1"] for r in val], marker="o", label="pair recall@1")
        ax2.axhline(val[-1]["val_pair_r1_teacher"], ls="--", c="grey", label="teacher recall@1")
        ax2.set_xlabel("step")
        ax2.set_title("validation")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


# ----------------------------------------------------------------------------- trainer


# the teacher layers each profile starts from, chosen by measurement (see bench/README.md)
PROFILE_LAYERS = {"hybrid": (0, 1, 2, 3, 4, 5), "hybrid-fast": (0, 2, 4, 5)}


@dataclass
class TrainConfig:
    out: str = str(DEFAULT_CHECKPOINT)  # the compact checkpoint written at every validation and at the end
    steps: int = 3000  # optimiser steps (the LR schedule spans them)
    minutes: float = 60.0  # wall-clock budget of this invocation: stop cleanly (and save) when it runs out
    batch_size: int = 32  # texts and pairs per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-4  # peak AdamW learning rate; higher undoes the teacher init faster than it learns
    warmup: int = 100  # linear warmup steps
    w_nce: float = 0.1  # weight of the contrastive loss next to the distillation losses
    weight_decay: float = 0.01
    max_texts: int = 24000  # distillation texts sampled from the corpora (the teacher embeds each)
    max_pairs: int = 8000  # (query, passage) pairs the teacher embeds too
    extra_pairs: int = 40000  # more pairs for the contrastive loss only (no teacher cost)
    long_passages: int = 3000  # multi-paragraph passages (up to max_len tokens) among the texts
    max_len: int = 256  # training truncation: the serving limit, so long passages are seen whole
    teacher_layers: tuple[int, ...] = PROFILE_LAYERS["hybrid-fast"]  # teacher layers that seed the blocks
    held_out_source: str = "foldoc"  # a whole domain kept out of training, scored as its own row
    freeze_token_embeddings: bool = True  # tokens unseen in training keep the teacher's vectors
    amp: bool = True  # BF16 autocast on CPUs with native BF16 (FP16 on CUDA); FP32 master weights
    val_every: int = 100  # steps between validations and checkpoint saves
    fit_samples: int = 4000  # texts for the closed-form fit of the output projection at init
    seed: int = 1234
    device: str = "auto"  # auto: cuda when available
    model: dict = field(default_factory=dict)  # overrides of hybrid_encoder.Config

    def sources(self) -> tuple[str, ...]:
        from hybridrag.models.corpora import TRAINING_SOURCES

        return tuple(x for x in TRAINING_SOURCES if x != self.held_out_source)


def same_run(saved: dict, now: dict) -> bool:
    """Whether a saved trainer state can be resumed under ``now``: everything but the budgets
    must match. A larger ``steps`` extends the run (the cosine schedule stretches from
    the step reached); ``minutes`` is per invocation."""
    budgets = ("steps", "minutes")
    return {k: v for k, v in saved.items() if k not in budgets} == {k: v for k, v in now.items() if k not in budgets}


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The half precision autocast should use on ``device``, or None where it would be emulated."""
    from hybridrag.models.hybrid_encoder import select_precision

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(select_precision(device))


class Trainer:
    """Runs the distillation: data, AdamW, gradient accumulation, resume, checkpoints, plots."""

    def __init__(self, tc: TrainConfig, work_dir: Path | None = None):
        self.tc = tc
        self.device = torch.device("cuda" if tc.device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if tc.device == "auto" else tc.device))
        self.work_dir = Path(work_dir or data_root())
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.work_dir / "trainer-state.pt"
        self.out = Path(tc.out)

    def _fresh_model(self, data: "TrainingData", fit: bool = True) -> HybridEncoder:
        torch.manual_seed(self.tc.seed)
        model = HybridEncoder(Config(**self.tc.model))
        model = init_from_teacher(model, self.tc.teacher_layers)
        if not fit or tuple(self.tc.teacher_layers) == PROFILE_LAYERS["hybrid"]:
            return model  # with every teacher layer the identity projection is already exact
        # the dropped layers leave the pooled features far from the teacher's; a closed-form
        # output map closes most of that gap before the first gradient step
        idx = data.texts[: self.tc.fit_samples] + [p for pair in data.pairs[: self.tc.fit_samples // 2] for p in pair]
        idx = [i for i in idx if data.known[i]]
        amp_dtype = autocast_dtype(self.device) if self.tc.amp else None
        with torch.autocast(self.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            cos = fit_output_projection(model, [data.ids[i] for i in idx], data.teacher[idx])
        print(f"output projection fitted on {len(idx)} texts: train cos to teacher {cos:.3f}")
        return model

    def run(self, resume: bool = True) -> dict:
        tc = self.tc
        random.seed(tc.seed)
        np.random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        data = load_training_data(tc.max_texts, tc.max_pairs, tc.max_len, tc.seed, device=str(self.device),
                                  extra_pairs=tc.extra_pairs, sources=tc.sources(), long_passages=tc.long_passages)
        state = None
        if resume and self.state_path.exists():
            state = torch.load(self.state_path, map_location=self.device, weights_only=False)
            if not same_run(state["train_config"], asdict(tc)):
                print(f"{self.state_path} belongs to another configuration: starting afresh")
                state = None
        shipped = self._shipped_start() if resume and state is None else None
        model = self._fresh_model(data, fit=state is None and shipped is None).to(self.device)
        if tc.freeze_token_embeddings:
            model.embed.tokens.weight.requires_grad_(False)
        distiller = Distiller(model, w_nce=tc.w_nce)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr,
                                weight_decay=tc.weight_decay)
        amp_dtype = autocast_dtype(self.device) if tc.amp else None
        step, position, history = 0, (0, 0), []
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            step, position, history = state["step"], tuple(state["position"]), state["history"]
            torch.set_rng_state(state["torch_rng"])
            print(f"resumed from {self.state_path} at step {step}")
        elif shipped is not None:
            weights, step, history = shipped
            model.load_state_dict(weights)
            position = (0, step * tc.grad_accum)
            print(f"resumed from the weights of {self.out} at step {step} (no trainer state here: fresh optimiser)")
        metrics = validate(model, data, self.device) if step == 0 else {}
        if metrics:
            history.append({"step": 0, **metrics})
            print(f"step 0 (teacher init + fitted projection): {metrics}")
        started = time.monotonic()
        stream = batch_stream(data, tc.batch_size, tc.seed, *position)
        model.train()
        smooth: dict[str, float] = {}
        bar = tqdm(total=tc.steps, initial=step, desc="train encoder", unit="step")
        while step < tc.steps:
            if (time.monotonic() - started) / 60 > tc.minutes:
                print(f"time budget of {tc.minutes} min reached at step {step}")
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step, tc.lr, tc.warmup, tc.steps)
            opt.zero_grad(set_to_none=True)
            for _ in range(tc.grad_accum):
                epoch, k, texts, pairs = next(stream)
                position = (epoch, k + 1)
                batch = make_batch(data, texts, pairs).to(self.device)
                with torch.autocast(self.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss, parts = distiller(batch)
                (loss / tc.grad_accum).backward()
                for name, v in parts.items():
                    smooth[name] = v if name not in smooth else 0.98 * smooth[name] + 0.02 * v
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{smooth['loss']:.4f}", cos=f"{smooth['cos']:.4f}", nce=f"{smooth['nce']:.3f}")
            if step % 25 == 0:
                history.append({"step": step, "lr": opt.param_groups[0]["lr"], **smooth})
            if step % tc.val_every == 0 or step == tc.steps:
                metrics = self._checkpoint(model, opt, data, step, position, history)
        bar.close()
        if not history or history[-1].get("step") != step or "val_cos" not in history[-1]:
            metrics = self._checkpoint(model, opt, data, step, position, history)
        return metrics

    def _shipped_start(self) -> tuple[dict, int, list[dict]] | None:
        """(weights, step, history) of the checkpoint at ``out`` when it is this run's model: how a
        run continues on a machine that has the checkpoint but not the trainer state (which stays
        under the data directory and is never committed). The optimiser starts afresh."""
        from hybridrag.models.hybrid_encoder import load_checkpoint

        if not self.out.exists():
            return None
        shipped, meta = load_checkpoint(self.out)
        if meta.get("config") != asdict(Config(**self.tc.model)) or not meta.get("step"):
            return None
        stem = self.out.with_suffix("")
        history = []
        if Path(f"{stem}.loss.csv").exists():
            with open(f"{stem}.loss.csv") as f:
                history = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
        return shipped.state_dict(), int(meta["step"]), history

    def _checkpoint(self, model, opt, data, step, position, history) -> dict:
        metrics = validate(model, data, self.device)
        history.append({"step": step, **metrics})
        tqdm.write(f"step {step}: {metrics}")
        state = {"train_config": asdict(self.tc), "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "step": step, "position": list(position), "history": history, "torch_rng": torch.get_rng_state()}
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)
        cpu_model = HybridEncoder(model.cfg)
        cpu_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
        train = {k: v for k, v in asdict(self.tc).items() if k != "out"}
        # untrained with every teacher layer, the student computes MiniLM's function (checked by a unit test)
        teacher_equal = step == 0 and tuple(self.tc.teacher_layers) == PROFILE_LAYERS["hybrid"]
        meta = save_checkpoint(self.out, cpu_model, step, {**metrics, "train": train},
                               space=ORIGINAL_VERSION if teacher_equal else None)
        stem = self.out.with_suffix("")
        plot_history(history, Path(f"{stem}.loss.csv"), Path(f"{stem}.loss.png"))
        (Path(f"{stem}.json")).write_text(json.dumps({k: v for k, v in meta.items()}, indent=2) + "\n")
        return metrics


# ----------------------------------------------------------------------------- CLI


@app.command("encoder")
def train_encoder(
    profile: str = typer.Option("hybrid-fast", help="hybrid | hybrid-fast: the teacher layers and the output name"),
    out: Optional[Path] = typer.Option(None, help="checkpoint to write (default: the profile's shipped checkpoint)"),
    steps: int = typer.Option(TrainConfig.steps, help="optimiser steps"),
    minutes: float = typer.Option(TrainConfig.minutes, help="wall-clock budget; saves and stops when spent"),
    batch_size: int = typer.Option(TrainConfig.batch_size),
    grad_accum: int = typer.Option(TrainConfig.grad_accum, help="micro-batches per optimiser step"),
    lr: float = typer.Option(TrainConfig.lr),
    w_nce: float = typer.Option(TrainConfig.w_nce, help="weight of the contrastive loss"),
    max_texts: int = typer.Option(TrainConfig.max_texts, help="distillation texts to sample"),
    max_pairs: int = typer.Option(TrainConfig.max_pairs, help="(query, passage) pairs the teacher embeds"),
    extra_pairs: int = typer.Option(TrainConfig.extra_pairs, help="more pairs for the contrastive loss only"),
    long_passages: int = typer.Option(TrainConfig.long_passages, help="multi-paragraph passages among the texts"),
    held_out: str = typer.Option(TrainConfig.held_out_source, help="a training source kept out entirely"),
    val_every: int = typer.Option(TrainConfig.val_every),
    seed: int = typer.Option(TrainConfig.seed),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    fusion: str = typer.Option(Config.fusion, help="concat | weighted | attention"),
    conv: bool = typer.Option(True, help="the multi-scale convolution block (--no-conv: the ablation)"),
    teacher_layers: Optional[str] = typer.Option(None, help="teacher layers that seed the blocks (default: the profile's)"),
    work_dir: Optional[Path] = typer.Option(None, help="resume state (default <data>/cache/encoder-train/<out name>)"),
    resume: bool = typer.Option(True, help="continue from the saved trainer state when its configuration matches"),
):
    """Distil a hybrid encoder profile from all-MiniLM-L6-v2 and write a compact checkpoint."""
    from hybridrag.models.hybrid_encoder import PROFILES

    if profile not in PROFILES:
        raise typer.BadParameter(f"{profile} is not a profile ({', '.join(PROFILES)})")
    layers = tuple(int(x) for x in teacher_layers.split(",")) if teacher_layers else PROFILE_LAYERS[profile]
    out = Path(out or PROFILES[profile])
    model = {"fusion": fusion, "n_layers": len(layers), "conv_kernels": (3, 5, 7) if conv else ()}
    tc = TrainConfig(out=str(out), steps=steps, minutes=minutes, batch_size=batch_size, grad_accum=grad_accum,
                     lr=lr, w_nce=w_nce, max_texts=max_texts, max_pairs=max_pairs, extra_pairs=extra_pairs,
                     long_passages=long_passages, held_out_source=held_out, val_every=val_every, seed=seed,
                     device=device, teacher_layers=layers, model=model)
    metrics = Trainer(tc, work_dir or data_root() / out.stem).run(resume=resume)
    typer.echo(json.dumps(metrics, indent=2))
