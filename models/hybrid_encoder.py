"""Hybrid convolutional-transformer sentence encoder, distilled from all-MiniLM-L6-v2.

The encoder reads top-down:

    token ids -> the teacher's WordPiece embedding + positions         (MiniLM's own tables)
              -> multi-scale 1-D convolution block: local features    (kernels 3, 5, 7)
              -> transformer blocks: global features                  (MiniLM's layers)
              -> fusion of local and global features                  (concat | weighted | attention)
              -> output projection to 384 -> masked mean pooling -> L2 norm  (Sentence-BERT)

The student starts as the teacher: its embedding tables and transformer blocks
are copies of all-MiniLM-L6-v2's, the convolution block's output weights start
at zero and the fusion starts by passing the transformer path through, so an
untrained student with all six layers computes the teacher's function. Two
profiles ship (``PROFILES``): ``hybrid`` keeps all six layers, ``hybrid-fast``
keeps fewer and is distilled back towards the teacher.

Papers:
- Attention is all you need, Vaswani et al. 2017, https://arxiv.org/abs/1706.03762
- BERT, Devlin et al. 2018, https://arxiv.org/abs/1810.04805 (post-LN blocks, so the
  student can start from the teacher's layers)
- ConvBERT, Jiang et al. 2020, https://arxiv.org/abs/2008.02496, and Conformer,
  Gulati et al. 2020, https://arxiv.org/abs/2005.08100 (convolution for local
  patterns next to self-attention for global ones)
- Multi-scale text convolutions, Kim 2014, https://arxiv.org/abs/1408.5882
- Sentence-BERT, Reimers & Gurevych 2019, https://arxiv.org/abs/1908.10084 (mean pooling)
- MiniLM, Wang et al. 2020, https://arxiv.org/abs/2002.10957, and DistilBERT, Sanh
  et al. 2019, https://arxiv.org/abs/1910.01108 (the teacher; layer-dropping init)
- Longformer, Beltagy et al. 2020, https://arxiv.org/abs/2004.05150 (sliding-window
  attention for inputs longer than ``Config.streaming_threshold``)

``HybridEncoderRuntime`` wraps a checkpoint behind the encoder interface,
``encode(texts) -> float32 (N, 384)``, in the precision the hardware runs best
(``select_precision``): BF16 activations and weights on a CPU with AVX-512 BF16,
FP16 on CUDA, FP32 elsewhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridrag.models.batching import length_buckets
from hybridrag.models.streaming_attention import sliding_window_attention

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "hybridrag-encoder/2"
TOKENIZER_ID = "sentence-transformers/all-MiniLM-L6-v2 wordpiece (uncased, 30522)"
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
# profile name -> shipped checkpoint
PROFILES = {"hybrid": CHECKPOINT_DIR / "hybrid.pt", "hybrid-fast": CHECKPOINT_DIR / "hybrid-fast.pt"}
DEFAULT_CHECKPOINT = PROFILES["hybrid"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
FUSIONS = ("concat", "weighted", "attention")
CONV_POSITIONS = ("input", "branch")


@dataclass
class Config:
    vocab_size: int = 30522  # all-MiniLM-L6-v2's WordPiece vocabulary
    d_model: int = 384  # the teacher's width, so its layers can seed ours
    n_heads: int = 12  # 32-dim heads, as in the teacher
    n_layers: int = 6  # transformer blocks (the teacher has 6)
    d_ff: int = 1536  # feed-forward width (the teacher's)
    conv_kernels: tuple[int, ...] = (3, 5, 7)  # parallel depthwise kernels of the conv block; () drops the block
    # where the conv block reads: "input" (token embeddings, before the transformer) or "branch" (the
    # transformer's output, a side path fused at the head: with the transformer frozen, training the
    # branch needs no backward pass through it, and the transformer's states can be cached)
    conv_position: str = "input"
    fusion: str = "concat"  # how local and global features combine: concat | weighted | attention
    out_dim: int = 384  # embedding width: the teacher's, so distillation compares directly
    max_positions: int = 512  # the teacher's position table; longer inputs reuse it cyclically
    max_seq_len: int = 256  # encode() truncates here, as the teacher does
    streaming_threshold: int = 512  # inputs longer than this use sliding-window attention
    streaming_window: int = 128  # half-width of the attention window for long inputs
    streaming_chunk: int = 256  # query chunk size for long inputs
    dropout: float = 0.0  # on embeddings, attention and feed-forward outputs; distilling a fixed teacher
    # for a few epochs needs little regularisation, and dropout costs ~8% of a CPU training step
    layer_norm_eps: float = 1e-12  # the teacher's
    pad_id: int = 0  # [PAD]

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"{self.fusion} is not a valid fusion ({', '.join(FUSIONS)})")
        if self.conv_position not in CONV_POSITIONS:
            raise ValueError(f"{self.conv_position} is not a valid conv position ({', '.join(CONV_POSITIONS)})")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        self.conv_kernels = tuple(int(k) for k in self.conv_kernels)
        if any(k % 2 == 0 for k in self.conv_kernels):
            raise ValueError(f"conv kernels must be odd, got {self.conv_kernels}")


# ----------------------------------------------------------------------------- maths


def mean_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, T, C) over the real tokens of mask (B, T) -> (B, C)."""
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows of x scaled to unit L2 norm."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def position_ids(T: int, max_positions: int, device=None) -> torch.Tensor:
    """0..T-1, wrapping around the learned table for inputs longer than it."""
    return torch.arange(T, device=device) % max_positions


# ----------------------------------------------------------------------------- layers


class TokenEmbedding(nn.Module):
    """WordPiece token embedding plus learned positions and LayerNorm, as in BERT.

    BERT also adds a token-type vector; every input here is one segment, so that
    vector is folded into the positions when the teacher's tables are copied.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.positions = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        x = self.tokens(ids)  # (B, T, d)
        x = x + self.positions(position_ids(T, self.cfg.max_positions, ids.device))  # (B, T, d)
        return self.drop(self.norm(x))


class MultiScaleConv(nn.Module):
    """Parallel depthwise 1-D convolutions (kernels 3, 5, 7), norm, GELU, pointwise mix, residual.

    Depthwise kernels keep the local receptive fields nearly free; the pointwise
    linear mixes channels and scales. Its output weights start at zero, so a
    fresh block is the identity and the teacher-initialised layers after it see
    the inputs they were trained on.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.d_model
        self.branches = nn.ModuleList(
            nn.Conv1d(d, d, k, padding=k // 2, groups=d) for k in cfg.conv_kernels
        )
        self.norm = nn.LayerNorm(d * len(cfg.conv_kernels), eps=cfg.layer_norm_eps)
        self.mix = nn.Linear(d * len(cfg.conv_kernels), d)
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def activations(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """GELU(LN(depthwise convolutions)) per token (B, T, k*d), before the pointwise mix."""
        # padding must not leak into real tokens through the kernels
        h = (x * mask.unsqueeze(-1).to(x.dtype)).transpose(1, 2)  # (B, d, T)
        h = torch.cat([conv(h) for conv in self.branches], dim=1).transpose(1, 2)  # (B, T, k*d)
        return F.gelu(self.norm(h))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.mix(self.activations(x, mask)))  # (B, T, d)

    def pooled(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """mean_pool(forward(x)) (B, d) without the per-token mix: the mix is linear, so it commutes with the
        mean; the branch then costs the depthwise kernels per token and one (k*d, d) product per text."""
        a = mean_pool(self.activations(x, mask).float(), mask)  # (B, k*d)
        dtype = next((p.dtype for p in self.mix.parameters()), torch.float32)
        return mean_pool(x.float(), mask) + self.mix(a.to(dtype)).float()  # (B, d)


class SelfAttention(nn.Module):
    """Multi-head self-attention; sliding-window attention past the streaming threshold."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """x (B, T, C), mask (B, T); ``dense`` says every token is real (the mask can be skipped)."""
        B, T, C = x.shape
        H = self.cfg.n_heads
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        if T > self.cfg.streaming_threshold:
            y = sliding_window_attention(
                q, k, v, mask, window=self.cfg.streaming_window, chunk=self.cfg.streaming_chunk
            )
        else:
            # without a mask the CPU flash kernel runs about 1.6x faster; length-sorted
            # batching makes unpadded batches the common case
            attn_mask = None if dense else mask[:, None, None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)


class TransformerBlock(nn.Module):
    """Post-LN block as in BERT: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.ff_in = nn.Linear(cfg.d_model, cfg.d_ff)
        self.ff_out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, dense: bool = False) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x, mask, dense)))  # (B, T, d)
        x = self.norm2(x + self.drop(self.ff_out(F.gelu(self.ff_in(x)))))  # (B, T, d)
        return x


class Fusion(nn.Module):
    """Combine local (conv) and global (transformer) features, each (B, T, d) -> (B, T, d).

    - ``concat``: Linear([local; global]) -> d.
    - ``weighted``: softmax-normalised learned scalar weights per source.
    - ``attention``: per token, a learned scorer attends over the two sources.

    Every method starts out passing the global features through (almost)
    unchanged, so a student seeded from the teacher starts where the teacher is.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.d_model
        self.method = cfg.fusion
        if self.method == "concat":
            self.proj = nn.Linear(2 * d, d)
            with torch.no_grad():
                self.proj.weight.zero_()
                self.proj.weight[:, d:] = torch.eye(d)
                self.proj.bias.zero_()
        elif self.method == "weighted":
            self.logits = nn.Parameter(torch.tensor([-3.0, 3.0]))  # (local, global)
        else:  # attention
            self.score = nn.Linear(d, 1, bias=False)
            nn.init.zeros_(self.score.weight)
            self.source_bias = nn.Parameter(torch.tensor([-3.0, 3.0]))  # (local, global)

    def forward(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        if self.method == "concat":
            return self.proj(torch.cat([local, global_], dim=-1))  # (B, T, d)
        if self.method == "weighted":
            w = torch.softmax(self.logits, dim=0)  # (2,)
            return w[0] * local + w[1] * global_
        sources = torch.stack([local, global_], dim=2)  # (B, T, 2, d)
        scores = self.score(sources).squeeze(-1) + self.source_bias  # (B, T, 2)
        alpha = torch.softmax(scores, dim=-1).unsqueeze(-1)  # (B, T, 2, 1)
        return (alpha * sources).sum(dim=2)  # (B, T, d)


# ----------------------------------------------------------------------------- model


class HybridEncoder(nn.Module):
    """The backbone: token ids (B, T) and mask (B, T) -> unit-norm sentence embeddings (B, out_dim).

    With ``conv_kernels=()`` there is no convolution block and no fusion: the
    transformer path alone feeds the output projection (the ablation).
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = TokenEmbedding(cfg)
        self.conv = MultiScaleConv(cfg) if cfg.conv_kernels else None
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.fusion = Fusion(cfg) if cfg.conv_kernels else None
        self.out = nn.Linear(cfg.d_model, cfg.out_dim)
        if cfg.out_dim == cfg.d_model:
            with torch.no_grad():  # start as the identity: the teacher pools its last layer as-is
                self.out.weight.copy_(torch.eye(cfg.d_model))
                self.out.bias.zero_()

    def body(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings, input conv block (``conv_position="input"``) and transformer: (local, hidden), each (B, T, d).

        With the conv block as a branch, ``local`` is the embeddings' output (unused by the head).
        """
        mask = mask.bool()
        dense = bool(mask.all())
        x = self.embed(ids)  # (B, T, d)
        local = self.conv(x, mask) if self.conv is not None and self.cfg.conv_position == "input" else x
        h = local
        for block in self.blocks:
            h = block(h, mask, dense)  # (B, T, d)
        return local, h

    def features(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local (convolution) and global (transformer) features, each (B, T, d), before fusion."""
        local, h = self.body(ids, mask)
        return self.branch(h, mask.bool()) if self.cfg.conv_position == "branch" else local, h

    def branch(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The conv branch over the transformer's output (B, T, d) -> (B, T, d); the identity without one."""
        if self.conv is None or self.cfg.conv_position != "branch":
            return hidden
        return self.conv(hidden, mask.bool())

    def head(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        """Fusion then output projection, in the head's own dtype (the runtime keeps it FP32)."""
        dtype = next((p.dtype for p in self.out.parameters()), torch.float32)  # INT8 linears hold none
        fused = global_.to(dtype) if self.fusion is None else self.fusion(local.to(dtype), global_.to(dtype))
        return self.out(fused)

    def token_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token output vectors (B, T, out_dim), before pooling."""
        local, h = self.features(ids, mask)
        return self.head(local, h)  # (B, T, out_dim)

    def pooled(self, local: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unit sentence embeddings (B, out_dim) from local and global features (B, T, d)."""
        if self.fusion is not None and self.fusion.method == "attention":  # per-token softmax: fuse, then pool
            return l2_normalize(mean_pool(self.head(local, h), mask))  # (B, out_dim)
        # concat and weighted fusion and the output projection are affine per token, and
        # the masked mean is a weighted average of tokens with weights summing to one, so
        # pooling first gives the same vector with (B, d) products instead of (B, T, d).
        # Pooling sums up to T half-precision rows: do it in FP32.
        return l2_normalize(self.head(mean_pool(local.float(), mask), mean_pool(h.float(), mask)))  # (B, out_dim)

    def from_hidden(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unit embeddings (B, out_dim) from the transformer's output (B, T, d): what a frozen body caches.

        Only for models whose local features derive from the hidden states (a conv branch, or no conv).
        """
        if self.conv is not None and self.cfg.conv_position == "input":
            raise ValueError("an input conv block needs the token embeddings, not the transformer's output")
        mask = mask.bool()
        if self.conv is None or (self.fusion is not None and self.fusion.method == "attention"):
            return self.pooled(self.branch(hidden, mask), hidden, mask)
        # an affine head: pool the branch before its pointwise mix (MultiScaleConv.pooled)
        return l2_normalize(self.head(self.conv.pooled(hidden, mask), mean_pool(hidden.float(), mask)))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        local, h = self.body(ids, mask)
        if self.conv is None or self.cfg.conv_position == "branch":
            return self.from_hidden(h, mask)  # (B, out_dim)
        return self.pooled(local, h, mask)  # (B, out_dim)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def with_conv_branch(model: HybridEncoder, kernels: tuple[int, ...] = (3, 5, 7), fusion: str = "concat"
                     ) -> HybridEncoder:
    """A copy of ``model`` with a zero-initialised conv branch on its transformer's output.

    The branch's output weights are zero and the fusion passes the transformer
    path through, so the copy computes ``model``'s function: adaptation starts
    from the serving encoder. A model that already has a branch is copied as is.
    """
    if model.conv is not None and model.cfg.conv_position == "branch":
        cfg = model.cfg
    elif model.conv is not None:
        raise ValueError("the model has an input conv block; a branch would sit next to it untested")
    else:
        cfg = Config(**{**asdict(model.cfg), "conv_kernels": tuple(kernels), "conv_position": "branch",
                        "fusion": fusion})
    new = HybridEncoder(cfg)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith(("conv.", "fusion.")) for k in missing):
        raise ValueError(f"cannot graft a branch: missing {missing}, unexpected {unexpected}")
    return new.to(next(model.parameters()).dtype)


# ----------------------------------------------------------------------------- checkpoints


def tokenizer_path() -> Path:
    from hybridrag.models.tokenizer import minilm_model_dir

    return Path(minilm_model_dir()) / "tokenizer.json"


def tokenizer_sha256() -> str:
    return hashlib.sha256(tokenizer_path().read_bytes()).hexdigest()


def state_version(packed: dict, cfg: Config) -> str:
    """``hybrid-<12 hex>``: a hash of the config and the stored weights, so it names them."""
    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode())
    for name in sorted(packed):
        entry = packed[name]
        for part in sorted(entry) if isinstance(entry, dict) else [None]:
            t = entry[part] if part is not None else entry
            h.update(name.encode())
            h.update(t.contiguous().cpu().numpy().tobytes())
    return f"hybrid-{h.hexdigest()[:12]}"


def save_checkpoint(path: str | Path, model: HybridEncoder, step: int, metrics: dict | None = None,
                    space: str | None = None) -> dict:
    """Write a compact, self-describing checkpoint: int8 matrices, everything else as stored.

    ``space`` names the embedding space the weights produce when it is another
    encoder's: a student that is still the teacher (all six layers, untrained)
    embeds in MiniLM's space, so what was built for MiniLM (the embedding prior)
    serves it too. By default a checkpoint is its own space.
    Returns the metadata it wrote (format, version, space, config, tokenizer, step, metrics).
    """
    from hybridrag.models.quantization import pack_state_dict

    packed = pack_state_dict(model.state_dict())
    version = state_version(packed, model.cfg)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": version,
        "space": space or version,
        "config": asdict(model.cfg),
        "tokenizer": {"id": TOKENIZER_ID, "sha256": tokenizer_sha256()},
        "step": int(step),
        "metrics": dict(metrics or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({**meta, "state": packed}, buf)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return meta


def load_checkpoint(path: str | Path, map_location: str = "cpu", dtype: torch.dtype = torch.float32
                    ) -> tuple[HybridEncoder, dict]:
    """Rebuild the model from a checkpoint written by ``save_checkpoint``; returns (model, meta).

    The weights are dequantized straight into ``dtype``: a BF16 runtime never
    holds an FP32 copy of the model.
    """
    from hybridrag.models.quantization import unpack_state_dict

    ckpt = torch.load(str(path), map_location=map_location, weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (format={ckpt.get('format')!r})")
    cfg = Config(**ckpt["config"])
    with torch.device("meta"):
        model = HybridEncoder(cfg)
    state = unpack_state_dict(ckpt.pop("state"), dtype=dtype)
    model.load_state_dict(state, assign=True)
    meta = {k: v for k, v in ckpt.items() if k != "state"}
    return model, meta


def checkpoint_path(name_or_path: str | Path | None) -> Path:
    """A profile name (``hybrid``, ``hybrid-fast``), a checkpoint path, or None (the default profile)."""
    if name_or_path is None:
        return DEFAULT_CHECKPOINT
    if str(name_or_path) in PROFILES:
        return PROFILES[str(name_or_path)]
    return Path(name_or_path)


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def select_precision(device: torch.device | str, requested: str = "auto") -> str:
    """The precision a runtime uses on ``device``: ``requested`` unless it is ``auto``.

    ``auto`` picks what the hardware runs natively, measured in bench/encoder.py:
    FP16 on CUDA; BF16 on a CPU with AVX-512 BF16 or AMX (about 2.8x FP32 on
    2 EPYC cores); FP32 elsewhere, since BF16 without those units is emulated
    and slower than FP32. Dynamic INT8 (``int8``) lost to BF16 on every CPU we
    measured, so it is never picked automatically.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"{requested} is not a valid precision ({', '.join(PRECISIONS)})")
    device = torch.device(device)
    if requested != "auto":
        if device.type == "cpu" and requested == "fp16":
            raise ValueError("fp16 needs CUDA; on a CPU use bf16 or fp32")
        return requested
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "fp32"


# ----------------------------------------------------------------------------- runtime

def legacy_precision(quantize: bool | None, precision: str) -> str:
    """The older ``quantize`` switch, where a caller still passes it: True is ``auto``, False ``fp32``."""
    return precision if quantize is None else ("auto" if quantize else "fp32")


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}


def cast_for_inference(model: HybridEncoder, device: torch.device, precision: str) -> HybridEncoder:
    """The body in ``precision`` on ``device``, the pooled head (fusion, output projection) in FP32."""
    if precision == "int8":
        from hybridrag.models.quantization import quantize_encoder

        return quantize_encoder(model, device, inplace=True)
    model = model.to(device=device, dtype=_DTYPES[precision])
    for head in (model.fusion, model.out):
        if head is not None:
            head.float()
    return model


class HybridEncoderRuntime:
    """A hybrid encoder checkpoint behind the ``encode(texts)`` interface; thread-safe.

    ``precision`` is ``auto`` (see ``select_precision``), ``fp32``, ``bf16``,
    ``fp16`` (CUDA) or ``int8`` (dynamic INT8 linears on the CPU). The body
    (embeddings, convolution, transformer blocks) runs in that precision; the
    pooled head stays FP32. ``quantize`` is the older switch: True means
    ``auto``, False means ``fp32``.
    """

    dim: int
    version: str

    def __init__(self, model: HybridEncoder, meta: dict, device: str = "cpu", quantize: bool | None = None,
                 precision: str = "auto"):
        from tokenizers import Tokenizer

        self.meta = meta
        self.cfg = model.cfg
        self.device = torch.device(device)
        self.precision = select_precision(self.device, legacy_precision(quantize, precision))
        self.model = cast_for_inference(model.eval(), self.device, self.precision)
        self.dim = self.cfg.out_dim
        # BF16/FP16 embeddings agree with FP32 to cosine > 0.9999, so they share the weights'
        # version; dynamic INT8 does not (cosine ~0.99), so its vectors are versioned apart
        self.version = meta["version"] + ("-int8" if self.precision == "int8" else "")
        # the embedding space: another encoder's version when these weights still compute it
        self.space = self.version if self.precision == "int8" else meta.get("space", meta["version"])
        want = meta.get("tokenizer", {}).get("sha256")
        if want and want != tokenizer_sha256():
            raise ValueError(f"checkpoint {meta['version']} was trained with another tokenizer ({want[:12]})")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path()))
        self.tokenizer.no_padding()
        self._lock = threading.Lock()
        log.info("hybrid encoder %s: %s on %s (CPU flags: %s)", self.version, self.precision, self.device,
                 ", ".join(sorted(cpu_flags() & {"avx512_bf16", "avx512_vnni", "amx_bf16", "avx2"})) or "none")

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "cpu", quantize: bool | None = None,
             precision: str = "auto") -> "HybridEncoderRuntime":
        """Load a profile or checkpoint (None: the default profile) onto ``device``."""
        chosen = select_precision(device, legacy_precision(quantize, precision))
        body = torch.float32 if chosen in ("fp32", "int8") else _DTYPES[chosen]
        model, meta = load_checkpoint(checkpoint_path(path), dtype=body)
        return cls(model, meta, device=device, precision=chosen)

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """WordPiece ids per text, [CLS] ... [SEP], truncated to ``max_length`` (default cfg.max_seq_len)."""
        limit = max_length or self.cfg.max_seq_len
        with self._lock:  # the Rust tokenizer's truncation state is shared
            self.tokenizer.enable_truncation(limit)
            encodings = self.tokenizer.encode_batch(list(texts))
        return [e.ids for e in encodings]

    def _batches(self, ids: list[list[int]], batch_size: int):
        """Yield (indices, ids (B, T), mask (B, T)) in buckets of similar length, to cut padding."""
        for idx in length_buckets([len(x) for x in ids], batch_size):
            T = max(len(ids[i]) for i in idx)
            batch = torch.full((len(idx), T), self.cfg.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.bool)
            for row, i in enumerate(idx):
                batch[row, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
                mask[row, : len(ids[i])] = True
            yield idx, batch.to(self.device), mask.to(self.device)

    def encode(self, texts: Sequence[str], batch_size: int = 64, max_length: int | None = None) -> np.ndarray:
        """Encode ``texts`` into float32 (N, 384), rows L2-normalised."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids = self.tokenize(texts, max_length)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        with self._lock, torch.inference_mode():
            for idx, batch, mask in self._batches(ids, batch_size):
                emb = self.model(batch, mask)
                out[idx] = emb.float().cpu().numpy()
        return out

    def token_embeddings(
        self, texts: Sequence[str], batch_size: int = 64, max_length: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-token unit vectors for late interaction (ColBERT-style).

        Returns (vectors float32 (N, T, 384), mask bool (N, T)), T the longest text.
        """
        ids = self.tokenize(texts, max_length)
        T = max((len(x) for x in ids), default=0)
        vecs = np.zeros((len(ids), T, self.dim), dtype=np.float32)
        masks = np.zeros((len(ids), T), dtype=bool)
        with self._lock, torch.inference_mode():
            for idx, batch, mask in self._batches(ids, batch_size):
                tok = l2_normalize(self.model.token_states(batch, mask)).float().cpu().numpy()
                t = batch.shape[1]
                vecs[idx, :t] = tok * mask.cpu().numpy()[..., None]
                masks[idx, :t] = mask.cpu().numpy()
        return vecs, masks
