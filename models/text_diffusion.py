"""Text-to-text diffusion: a masked (absorbing-state) diffusion language model that writes a document for a query.

MDLM (Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language
Models", https://arxiv.org/abs/2406.07524), conditioned on a query. The forward
process replaces each document token by ``[MASK]`` independently with
probability ``1 - alpha_t``; the reverse process fills masks back in. With the
SUBS parameterisation (the denoiser never predicts ``[MASK]``, and tokens that
are already unmasked are copied through) the continuous-time NELBO is a
weighted masked-language-modelling loss:

    NELBO = E_{t ~ U(0, 1)} [ -alpha'_t / (1 - alpha_t) * sum_{i masked} log p_theta(x0_i | x_t) ]

and with the log-linear schedule ``alpha_t = 1 - t`` the weight is ``1 / t``.

Conditioning: the sequence is ``[CLS] query [SEP] <pad to query_len> | document
(doc_len tokens, ending in [SEP] then [PAD])``. Query tokens are never masked:
they are the condition (as in DiffuSeq, Gong et al. 2022,
https://arxiv.org/abs/2210.08933). Document padding *is* modelled, so the
model decides the document's length by where it puts ``[SEP]`` and ``[PAD]``.

Vocabulary: MiniLM's WordPiece (30,522 ids, ``minilm_model_dir()/"tokenizer.json"``),
restricted to the ids the training text uses at least ``min_count`` times
(:class:`Vocab` keeps the remap table; every other id becomes ``[UNK]``), and
the embedding is factorised, V x E then E x d, and tied to the output (ALBERT,
Lan et al. 2019, https://arxiv.org/abs/1909.11942), so the checkpoint stays a
few MB.

No time conditioning: MDLM shows the masked denoiser does not need ``t`` (the
number of masks tells it), and that is what makes the sampler's cache exact:
when a step unmasks nothing, the input is unchanged, so the denoiser's output
is too and is reused instead of recomputed (MDLM Sec. 3.3, "caching").

Writing from context (SDEdit for masked diffusion; Meng et al. 2021,
https://arxiv.org/abs/2108.01073): instead of starting the reverse process at
t = 1 from an all-``[MASK]`` document, start it at t0 = ``strength`` from a given
document (a passage retrieved for the query) passed through the forward
process, so that a fraction ~t0 of its tokens is masked, and run the same
sampler from t0 to 0. Each token is masked with the probability the denoiser
was trained on at t0 (MDLM trains on every t), so nothing new is learned; by
default a word's WordPiece pieces are masked together, so that no word is
left half old, half new. ``strength = 1`` is the from-scratch sampler. A small
model that cannot write readable text from nothing can still rewrite real text
toward the query.

Layers wrap each other: :class:`Denoiser` (transformer backbone),
:class:`MaskedDiffusion` (noise, ``loss = diffusion(batch)``, the NELBO and the
sampler), and :class:`TextDiffusionModel` (tokenizer + vocab + diffusion: text in,
text out) for the query path.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Special ids in the remapped vocabulary; WordPiece ids follow from index 5.
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
N_SPECIAL = len(SPECIAL_TOKENS)


# ---------------------------------------------------------------- noise schedule


def loglinear_alpha(t: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Probability that a token is still unmasked at time t: ``1 - (1 - eps) t`` (MDLM's log-linear schedule).

    ``eps`` keeps alpha_1 > 0 so that the weight below stays finite near t = 1.
    """
    return 1 - (1 - eps) * t


def loglinear_weight(t: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """NELBO weight ``-alpha'_t / (1 - alpha_t)`` of the log-linear schedule: ``1 / t``."""
    return (1 - eps) / ((1 - eps) * t)


def antithetic_times(batch: int, eps: float = 1e-3, generator: torch.Generator | None = None) -> torch.Tensor:
    """Low-discrepancy t in [eps, 1): one uniform offset, then evenly spaced (MDLM's variance reduction)."""
    u = torch.rand(1, generator=generator)
    t = (u + torch.arange(batch) / batch) % 1
    return eps + (1 - eps) * t


def reverse_times(steps: int, t_start: float = 1.0) -> list[float]:
    """The sampler's time grid from ``t_start`` down to 0: ``n + 1`` times, ``n = ceil(steps * t_start)``.

    Uniform steps of width ~1/steps, so a partial run (SDEdit, t_start < 1)
    keeps the step density of a full one and costs a fraction t_start of it;
    ``t_start = 1`` gives the full grid ``1 - i / steps`` exactly.
    """
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n = max(1, math.ceil(steps * t_start - 1e-9))
    return [t_start * (1 - i / n) for i in range(n + 1)]


def unmask_probability(t: float, s: float, eps: float = 1e-3) -> float:
    """Probability that a masked token is revealed stepping back from t to s < t: ``(alpha_s - alpha_t) / (1 - alpha_t)``."""
    a_t = 1 - (1 - eps) * t
    a_s = 1 - (1 - eps) * s
    return (a_s - a_t) / (1 - a_t)


# ---------------------------------------------------------------- vocabulary


class Vocab:
    """Remap between MiniLM WordPiece ids and the model's compact ids.

    ``wordpiece_ids[i]`` is the WordPiece id of compact id ``N_SPECIAL + i``.
    """

    def __init__(self, wordpiece_ids: Sequence[int], wordpiece_size: int = 30522):
        self.wordpiece_ids = np.asarray(wordpiece_ids, dtype=np.int64)
        self.to_compact = np.full(wordpiece_size, UNK, dtype=np.int64)
        self.to_compact[self.wordpiece_ids] = np.arange(N_SPECIAL, N_SPECIAL + len(self.wordpiece_ids))

    def __len__(self) -> int:
        return N_SPECIAL + len(self.wordpiece_ids)

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[int]], min_count: int = 2, wordpiece_size: int = 30522,
              reserved: Iterable[int] = ()) -> "Vocab":
        """Keep the WordPiece ids seen at least ``min_count`` times, most frequent first.

        ``reserved`` are WordPiece ids of the tokenizer's own specials (dropped:
        the compact vocabulary has its own).
        """
        counts = np.zeros(wordpiece_size, dtype=np.int64)
        for ids in token_lists:
            np.add.at(counts, np.asarray(ids, dtype=np.int64), 1)
        counts[list(reserved)] = 0
        keep = np.flatnonzero(counts >= min_count)
        keep = keep[np.argsort(-counts[keep], kind="stable")]
        return cls(keep, wordpiece_size)

    def encode(self, wordpiece: Sequence[int]) -> np.ndarray:
        return self.to_compact[np.asarray(wordpiece, dtype=np.int64)]

    def decode(self, compact: Sequence[int]) -> list[int]:
        """WordPiece ids of the compact ids that are words (specials dropped)."""
        c = np.asarray(compact, dtype=np.int64)
        c = c[c >= N_SPECIAL]
        return self.wordpiece_ids[c - N_SPECIAL].tolist()


def layout(query: Sequence[int], doc: Sequence[int] | None, query_len: int, doc_len: int) -> np.ndarray:
    """One model row from compact ids: ``[CLS] q [SEP] PAD.. | d [SEP] PAD..`` (query_len + doc_len,).

    The query is cut to fit ``query_len``; the document to ``doc_len`` (a cut
    document loses its closing ``[SEP]``). ``doc=None`` leaves the document
    region all ``[MASK]``, ready for sampling.
    """
    row = np.full(query_len + doc_len, PAD, dtype=np.int64)
    q = list(query)[: query_len - 2]
    row[: len(q) + 2] = [CLS, *q, SEP]
    if doc is None:
        row[query_len:] = MASK
    else:
        d = [*list(doc)[:doc_len], SEP][:doc_len]
        row[query_len : query_len + len(d)] = d
    return row


# ---------------------------------------------------------------- backbone


@dataclass
class Config:
    vocab_size: int = 8192  # compact vocabulary incl. the 5 specials (set from Vocab)
    query_len: int = 12  # [CLS] + query + [SEP], padded
    doc_len: int = 24  # document tokens incl. its [SEP] and padding (a WordNet gloss is ~11)
    d_model: int = 160  # transformer width: sized to train in ~20 minutes on two shared CPU cores
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 384  # feed-forward width (with the above: ~0.5M parameters in the transformer)
    emb_dim: int = 64  # factorised token embedding width (ALBERT); tied to the output
    dropout: float = 0.1
    eps: float = 1e-3  # alpha_1 = eps: keeps the 1/t weight finite


class Denoiser(nn.Module):
    """Bidirectional transformer: tokens (B, L) -> logits over the compact vocab for the document (B, doc_len, V)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        L = cfg.query_len + cfg.doc_len
        self.tok = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.up = nn.Linear(cfg.emb_dim, cfg.d_model, bias=False)
        self.pos = nn.Parameter(torch.randn(L, cfg.d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.down = nn.Linear(cfg.d_model, cfg.emb_dim, bias=False)
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        nn.init.normal_(self.tok.weight, std=0.02)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Document features in the embedding space: (B, L) -> (B, doc_len, E)."""
        cfg = self.cfg
        h = self.up(self.tok(x)) + self.pos  # (B, L, d)
        # query padding is not content; document padding is (it encodes the length)
        ignore = torch.zeros_like(x, dtype=torch.bool)
        ignore[:, : cfg.query_len] = x[:, : cfg.query_len] == PAD
        h = self.blocks(h, src_key_padding_mask=ignore)  # (B, L, d)
        return self.down(self.norm(h[:, cfg.query_len :]))  # (B, doc_len, E)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Tied output layer: (..., E) -> (..., V)."""
        return feats @ self.tok.weight.T + self.out_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x))  # (B, doc_len, V)

    @torch.no_grad()
    def init_token_embedding(self, table: torch.Tensor) -> None:
        """Start the (V, E) token table from given vectors (e.g. the teacher's word embeddings, reduced)."""
        self.tok.weight.copy_(table * (0.02 / table.std().clamp_min(1e-8)))


# ---------------------------------------------------------------- diffusion


class MaskedDiffusion(nn.Module):
    """Absorbing-state diffusion over the document region: owns masking, the NELBO and the sampler."""

    def __init__(self, model: Denoiser):
        super().__init__()
        self.model = model
        self.cfg = model.cfg

    def subs_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """SUBS parameterisation: log p_theta(x0 | x_t) for the document, never ``[MASK]`` (B, doc_len, V) float32."""
        logits = self.model(x).float()
        logits[..., MASK] = -torch.inf
        return logits.log_softmax(-1)

    def mask(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None,
             word_start: torch.Tensor | None = None) -> torch.Tensor:
        """x_t: each document token becomes ``[MASK]`` with probability 1 - alpha_t; t is (B,).

        ``word_start``: (B, doc_len) int64, the position of the first piece of
        the word each document token belongs to; a word's pieces are then
        masked together (whole-word masking), each still with probability 1 - alpha_t.
        """
        doc = x0[:, self.cfg.query_len :]
        p_mask = 1 - loglinear_alpha(t, self.cfg.eps)  # (B,)
        u = torch.rand(doc.shape, generator=generator, device=x0.device)
        if word_start is not None:
            u = u.gather(1, word_start)  # a word's pieces share their first piece's draw
        masked = u < p_mask[:, None]
        x_t = x0.clone()
        x_t[:, self.cfg.query_len :] = torch.where(masked, MASK, doc)
        return x_t

    def nelbo(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sequence NELBO estimate in nats (B,), one t per row (continuous-time MDLM bound).

        Only masked positions contribute, so logits are computed for those alone.
        """
        x_t = self.mask(x0, t.to(x0.device), generator)
        doc0 = x0[:, self.cfg.query_len :]
        masked = x_t[:, self.cfg.query_len :] == MASK  # (B, doc_len)
        feats = self.model.features(x_t)[masked]  # (M, E)
        logits = self.model.logits(feats).float()
        logits[:, MASK] = -torch.inf  # SUBS: never predict the mask
        ce = F.cross_entropy(logits, doc0[masked], reduction="none")  # (M,)
        nll = torch.zeros(x0.shape[0], device=x0.device).index_add_(0, masked.nonzero()[:, 0], ce)  # (B,)
        return loglinear_weight(t.to(x0.device), self.cfg.eps) * nll

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """Training loss: the NELBO per document token, averaged over the batch (scalar)."""
        t = antithetic_times(x0.shape[0], self.cfg.eps).to(x0.device)
        return self.nelbo(x0, t).mean() / self.cfg.doc_len

    def noise(self, x0: torch.Tensor, t0: float, generator: torch.Generator | None = None,
              word_start: torch.Tensor | None = None) -> torch.Tensor:
        """The start of a partial reverse run (SDEdit): x_t0 ~ q(x_t0 | x0) on the document region, (B, L) int64.

        Each document token (its words, closing ``[SEP]`` and padding alike, as
        in training) is masked with probability ``1 - alpha_t0``, independently
        or, given ``word_start`` (see :meth:`mask`), by whole words; the query
        is untouched. ``t0 >= 1`` masks every document token without drawing
        from ``generator``: the from-scratch start of :meth:`sample`.
        """
        if t0 >= 1.0:
            x = x0.clone()
            x[:, self.cfg.query_len :] = MASK
            return x
        return self.mask(x0, torch.full((x0.shape[0],), float(t0), device=x0.device), generator, word_start)

    @torch.no_grad()
    def sample(
        self,
        x: torch.Tensor,
        steps: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        t_start: float = 1.0,
    ) -> tuple[torch.Tensor, int]:
        """Ancestral MDLM sampling from t = ``t_start`` to 0 on the grid of :func:`reverse_times`.

        x: (B, L) int64 rows from :func:`layout`: with the document all ``[MASK]``
        for ``t_start = 1``, or a start from :meth:`noise` at ``t0 = t_start``.
        Only ``[MASK]`` positions are ever written: the query and every document
        token that is not masked at the start come out unchanged.
        Returns the filled rows (B, L) and the number of denoiser
        row-evaluations made (with the cache, rows whose input did not change
        since the last step reuse their probabilities).
        """
        x = x.clone()
        qlen = self.cfg.query_len
        B = x.shape[0]
        probs: torch.Tensor | None = None
        stale = torch.ones(B, dtype=torch.bool, device=x.device)  # rows whose cached probs are out of date
        evals = 0
        times = reverse_times(steps, t_start)
        for t, s in zip(times[:-1], times[1:]):
            if probs is None or not use_cache:
                probs = self._probs(x, temperature, top_p)
                evals += B
            elif stale.any():
                probs[stale] = self._probs(x[stale], temperature, top_p)
                evals += int(stale.sum())
            doc = x[:, qlen:]
            masked = doc == MASK
            reveal = masked & (torch.rand(doc.shape, generator=generator, device=x.device) < unmask_probability(t, s, self.cfg.eps))
            if s == 0:
                reveal = masked  # the last step fills every remaining mask
            drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).reshape(doc.shape)
            x[:, qlen:] = torch.where(reveal, drawn, doc)
            stale = reveal.any(-1)
        return x, evals

    def _probs(self, x: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
        logp = self.subs_log_probs(x) / max(temperature, 1e-6)
        probs = logp.softmax(-1)
        if top_p < 1.0:
            probs = nucleus(probs, top_p)
        return probs

    def checkpoint(self, **extra) -> dict:
        """Self-describing checkpoint; weights stored in float16 to keep it small."""
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in self.state_dict().items()}
        return {"kind": "text-diffusion", "config": asdict(self.cfg), "state_dict": state, **extra}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "MaskedDiffusion":
        if ckpt.get("kind") != "text-diffusion":
            raise ValueError(f"not a text-diffusion checkpoint (kind={ckpt.get('kind')!r})")
        diffusion = cls(Denoiser(Config(**ckpt["config"])))
        diffusion.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()})
        return diffusion.eval()


def nucleus(probs: torch.Tensor, top_p: float, k: int = 512) -> torch.Tensor:
    """Top-p filtering (Holtzman et al. 2019, https://arxiv.org/abs/1904.09751) of (..., V) probabilities, renormalised.

    A row whose ``k`` most likely tokens hold at least ``top_p`` of its mass
    has its nucleus inside them, so only those are ranked; the other rows sort
    the whole vocabulary. Same result; sorting every 17k-token row at every
    sampler step was most of the sampling time.
    """
    shape, V = probs.shape, probs.shape[-1]
    flat = probs.reshape(-1, V)
    out = torch.zeros_like(flat)
    if k < V:
        top_p_, top_i = flat.topk(k, -1)  # (N, k) descending
        short = top_p_.sum(-1) >= top_p  # rows whose nucleus lies in their top k
        out[short] = _keep_nucleus(flat[short], top_p_[short], top_i[short], top_p)
        rest = ~short
    else:
        rest = torch.ones(len(flat), dtype=torch.bool, device=probs.device)
    if rest.any():
        sorted_p, order = flat[rest].sort(-1, descending=True)
        out[rest] = _keep_nucleus(flat[rest], sorted_p, order, top_p)
    return (out / out.sum(-1, keepdim=True)).reshape(shape)


def _keep_nucleus(probs: torch.Tensor, sorted_p: torch.Tensor, order: torch.Tensor, top_p: float) -> torch.Tensor:
    """(N, V) probabilities zeroed outside the nucleus, given the rows' (N, k) leading probabilities and their ids."""
    before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
    sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


# ---------------------------------------------------------------- text in, text out


def load_tokenizer(path=None):
    """MiniLM's WordPiece tokenizer (``tokenizers``), with no padding or truncation of its own.

    ``path``: a ``tokenizer.json``; by default the one shipped with all-MiniLM-L6-v2.
    """
    from tokenizers import Tokenizer

    if path is None:
        from hybridrag.models.tokenizer import minilm_model_dir

        path = minilm_model_dir() / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


def wordpiece(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """WordPiece ids of each text, without [CLS]/[SEP]."""
    return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


class TextDiffusionModel:
    """A trained text diffusion model for the query path: queries in, documents out (CPU, no grad)."""

    def __init__(self, diffusion: MaskedDiffusion, vocab: Vocab, version: str, tokenizer=None, meta: dict | None = None):
        self.diffusion = diffusion.eval()
        self.vocab = vocab
        self.version = version
        self.tokenizer = tokenizer or load_tokenizer()
        self.meta = meta or {}
        self.cfg = diffusion.cfg
        # compact id -> is a WordPiece "##" continuation (for whole-word noising)
        self.continuation = np.zeros(len(vocab), dtype=bool)
        self.continuation[N_SPECIAL:] = [self.tokenizer.id_to_token(int(w)).startswith("##")
                                         for w in vocab.wordpiece_ids]

    @classmethod
    def load(cls, path) -> "TextDiffusionModel":
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        diffusion = MaskedDiffusion.from_checkpoint(ckpt)
        vocab = Vocab(ckpt["vocab"])
        return cls(diffusion, vocab, ckpt["version"], meta=ckpt.get("meta", {}))

    def rows(self, queries: Sequence[str], docs: Sequence[str] | None = None) -> torch.Tensor:
        """Model rows (B, L) int64 for queries (and documents, for scoring)."""
        q_ids = wordpiece(self.tokenizer, queries)
        d_ids = wordpiece(self.tokenizer, docs) if docs is not None else [None] * len(queries)
        rows = [
            layout(self.vocab.encode(q), None if d is None else self.vocab.encode(d), self.cfg.query_len, self.cfg.doc_len)
            for q, d in zip(q_ids, d_ids)
        ]
        return torch.from_numpy(np.stack(rows)) if rows else torch.zeros((0, self.cfg.query_len + self.cfg.doc_len), dtype=torch.long)

    def fit_document(self, text: str) -> list[int]:
        """Compact ids of the part of ``text`` the document region holds: whole sentences (:func:`fit_sentences`)."""
        from hybridrag.models.corpora import split_sentences

        sentences = split_sentences(text) or [text]
        return fit_sentences([self.vocab.encode(ids).tolist() for ids in wordpiece(self.tokenizer, sentences)],
                             self.cfg.doc_len - 1)

    def as_seen(self, docs: Sequence[str]) -> list["Generated"]:
        """Documents as :meth:`generate` starts from them: cut to whole sentences (:meth:`fit_document`) and decoded."""
        rows = [layout([], self.fit_document(d), self.cfg.query_len, self.cfg.doc_len) for d in docs]
        return [self.decode(row[self.cfg.query_len :]) for row in rows]

    def generate(
        self,
        queries: Sequence[str],
        n: int = 1,
        steps: int = 64,
        temperature: float = 1.0,
        top_p: float = 0.9,
        use_cache: bool = True,
        seed: int | None = 0,
        init_docs: Sequence[str] | None = None,
        strength: float = 1.0,
        whole_words: bool = True,
    ) -> list[list["Generated"]]:
        """``n`` documents per query: a list (per query) of ``n`` :class:`Generated`.

        ``init_docs``: documents to start from (SDEdit; e.g. passages retrieved
        for the query), either one per generated document in query-major order
        (``len(queries) * n``: sample j of query i starts from
        ``init_docs[i * n + j]``) or one per query, shared by its ``n`` samples.
        Each is cut to the whole sentences that fit the document region
        (:meth:`fit_document`). ``strength`` in (0, 1] is the time t0 the reverse
        process starts from: about that fraction of the document region is
        masked and rewritten, the rest is kept. ``strength = 1`` or no
        ``init_docs`` writes from scratch (the same samples, for a seed, as
        before init documents existed). ``whole_words``: noise an init document
        by whole words (:meth:`MaskedDiffusion.mask`), so that a word is kept or
        rewritten, never left half a word with a new ending.
        """
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if not queries:
            return []
        rows_q = [q for q in queries for _ in range(n)]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        inits: list[Generated | None] = [None] * len(rows_q)
        if init_docs is None:
            x = self.rows(rows_q)
        else:
            if len(init_docs) == len(queries):
                init_docs = [d for d in init_docs for _ in range(n)]
            elif len(init_docs) != len(rows_q):
                raise ValueError(f"init_docs: expected {len(queries)} (one per query) or {len(rows_q)} "
                                 f"(one per sample), got {len(init_docs)}")
            q_ids = wordpiece(self.tokenizer, rows_q)
            x0 = torch.from_numpy(np.stack([
                layout(self.vocab.encode(q), self.fit_document(d), self.cfg.query_len, self.cfg.doc_len)
                for q, d in zip(q_ids, init_docs)]))
            inits = [self.decode(row[self.cfg.query_len :]) for row in x0.numpy()]
            starts = torch.from_numpy(word_starts(self.continuation[x0[:, self.cfg.query_len :].numpy()])) \
                if whole_words else None
            x = self.diffusion.noise(x0, strength, generator=gen, word_start=starts)
        with torch.inference_mode():
            out, _ = self.diffusion.sample(x, steps=steps, temperature=temperature, top_p=top_p,
                                           use_cache=use_cache, generator=gen, t_start=strength)
        docs = [self.decode(row[self.cfg.query_len :]) for row in out.numpy()]
        for d, init in zip(docs, inits):
            d.init_text = None if init is None else init.text
        return [docs[i * n : (i + 1) * n] for i in range(len(queries))]

    def decode(self, doc: np.ndarray) -> "Generated":
        """Cut at the first [SEP]/[PAD] and detokenise. Keeps the compact ids for the degeneracy checks."""
        stop = np.flatnonzero((doc == SEP) | (doc == PAD))
        body = doc[: stop[0]] if len(stop) else doc
        text = self.tokenizer.decode(self.vocab.decode(body), skip_special_tokens=True) if len(body) else ""
        text = tidy_spacing(text)
        return Generated(text=text, token_ids=body.tolist(), unk_count=int((body == UNK).sum()))

    @torch.no_grad()
    def nll_bound(self, queries: Sequence[str], docs: Sequence[str], samples_per_doc: int = 8, seed: int = 0) -> dict:
        """Monte-Carlo NELBO of ``docs`` given ``queries`` (held-out text): nats per real doc token and the perplexity bound.

        Averaged over ``samples_per_doc`` antithetic t per document. Real tokens
        are the document's tokens and its closing [SEP]; the padding is modelled
        too and its (small) cost is included in the numerator, so the figure is
        an upper bound on the model's NLL of the documents as laid out.
        """
        x0 = self.rows(queries, docs)
        gen = torch.Generator().manual_seed(seed)
        total, count = 0.0, 0
        for start in range(0, len(x0), 64):
            xb = x0[start : start + 64]
            real = (xb[:, self.cfg.query_len :] != PAD).sum().item()
            acc = torch.zeros(len(xb))
            for _ in range(samples_per_doc):
                t = antithetic_times(len(xb), self.cfg.eps, generator=gen)
                acc += self.diffusion.nelbo(xb, t, generator=gen)
            total += (acc / samples_per_doc).sum().item()
            count += real
        nats = total / max(count, 1)
        return {"nats_per_token": nats, "perplexity_bound": math.exp(nats), "tokens": count, "documents": len(x0)}


@dataclass
class Generated:
    """One generated document: its text and its compact token ids (for repetition / unknown-token rates)."""

    text: str
    token_ids: list[int]
    unk_count: int
    init_text: str | None = None  # the document it was rewritten from, as the model saw it (None: from scratch)


def word_starts(is_continuation: np.ndarray) -> np.ndarray:
    """For each position, the position of the first piece of its word: (..., N) bool -> (..., N) int64.

    ``is_continuation``: WordPiece "##" pieces, which continue the word before
    them; a continuation at position 0 starts its own word.
    """
    idx = np.broadcast_to(np.arange(is_continuation.shape[-1]), is_continuation.shape)
    starts = np.where(is_continuation, 0, idx)
    starts[..., 0] = 0
    return np.maximum.accumulate(starts, axis=-1)


def fit_sentences(sentences: Sequence[Sequence[int]], budget: int) -> list[int]:
    """The ids of the longest run of leading sentences whose total length is at most ``budget``.

    A first sentence longer than the budget is cut to it: the layout would
    cut it anyway, and a start of a sentence beats no context.
    """
    out: list[int] = []
    for ids in sentences:
        if len(out) + len(ids) > budget:
            break
        out.extend(ids)
    if not out and sentences:
        out = list(sentences[0])[:budget]
    return out


_TIDY = [
    (re.compile(r"([(\[{]) "), r"\1"),  # "( noun )" -> "(noun)"
    (re.compile(r" ([)\]}])"), r"\1"),
    (re.compile(r"(\w) ([:;])(?= |$)"), r"\1\2"),  # "compiler : a program" -> "compiler: a program"
    (re.compile(r"(\w) ' (?=(?:s|t|re|ve|ll|d|m)\b)"), r"\1'"),  # "don ' t" -> "don't"
    (re.compile(r"(\w) ([-/]) (?=\w)"), r"\1\2"),  # "real - time" -> "real-time", "x / y" -> "x/y"
    (re.compile(r"(\d)([.,:]) (?=\d)"), r"\1\2"),  # "3. 5" -> "3.5"
    (re.compile(r"\b(\w)\. (\w)\."), r"\1.\2."),  # "e. g." -> "e.g."
    (re.compile(r'" ([^"]*?) "'), r'"\1"'),  # '" quoted "' -> '"quoted"'
    (re.compile(r"(\w) \+ \+"), r"\1++"),  # "C + +" -> "C++"
]


def tidy_spacing(text: str) -> str:
    """Undo the spaces WordPiece decoding puts inside brackets, quotes, contractions, hyphens and numbers.

    The tokenizer does not keep the original spacing; these are the cases its
    own clean-up misses that the corpora (FOLDOC, WordNet) are full of.
    """
    for pattern, repl in _TIDY:
        text = pattern.sub(repl, text)
    return text
