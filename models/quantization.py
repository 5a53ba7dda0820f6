"""INT8 weights for the hybrid encoder, and the compact checkpoint format.

Weights are quantized symmetrically per output channel: ``w ~= q * scale`` with
``q`` in [-127, 127] and one float scale per row (Jacob et al. 2018,
https://arxiv.org/abs/1712.05877; per-channel as in Krishnamoorthi 2018,
https://arxiv.org/abs/1806.08342). Weight-only symmetric quantization needs no
calibration data: the scale is the row's max magnitude. Activations are
quantized on the fly per batch (dynamic quantization), so no calibration pass
is needed there either.

- CPU: ``torch.ao.quantization.quantize_dynamic`` swaps the linears for
  fbgemm/x86 INT8 GEMMs with per-channel weights and dynamic activation scales.
- CUDA: ``Int8Linear`` keeps INT8 weights and dequantizes them to FP16 for each
  matmul; activations run in FP16.
- Both: the token table is stored INT8 and dequantized per looked-up row.

The serving runtime's default on a CPU is BF16, not these INT8 GEMMs: the
checkpoint stores INT8 matrices and the runtime dequantizes them once, at load,
into BF16 (see ``hybrid_encoder.select_precision`` for the measurements).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

# matrices at least this big are stored INT8 in checkpoints and quantized at run time
MIN_QUANT_NUMEL = 4096


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 per row: w (R, C) float -> (q int8 (R, C), scale float32 (R,))."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (R,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(q int8 (R, C), scale (R,)) -> float (R, C)."""
    return (q.float() * scale.float()[:, None]).to(dtype)  # one rounding, in FP32


def pack_state_dict(state: dict[str, torch.Tensor]) -> dict:
    """Checkpoint form: every float matrix of >= MIN_QUANT_NUMEL becomes {"q", "scale"}."""
    packed: dict = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if t.is_floating_point() and t.dim() == 2 and t.numel() >= MIN_QUANT_NUMEL:
            q, scale = quantize_per_channel(t)
            packed[name] = {"q": q, "scale": scale}
        else:
            packed[name] = t.clone()
    return packed


def unpack_state_dict(packed: dict, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Inverse of ``pack_state_dict``: every float tensor comes back in ``dtype``.

    Entries are popped as they are converted, so the packed and the unpacked
    copies of a tensor are never both alive.
    """
    out = {}
    for name in list(packed):
        v = packed.pop(name)
        if isinstance(v, dict):
            out[name] = dequantize_per_channel(v["q"], v["scale"], dtype=dtype)
        else:
            out[name] = v.to(dtype) if v.is_floating_point() else v
    return out


class Int8Embedding(nn.Module):
    """An embedding table held as INT8 rows with one scale per row."""

    def __init__(self, table: nn.Embedding):
        super().__init__()
        q, scale = quantize_per_channel(table.weight)
        self.register_buffer("q", q)  # (V, r) int8
        self.register_buffer("scale", scale)  # (V,) float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.q[ids].to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)  # (B, T, r)


class Int8Linear(nn.Module):
    """Weight-only INT8 linear: dequantizes its weight to the input's dtype per call (CUDA FP16 path)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_per_channel(linear.weight)
        self.register_buffer("q", q)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_per_channel(self.q, self.scale, dtype=x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, w, b)


def _quantizable_linears(model: nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.weight.numel() >= MIN_QUANT_NUMEL
    ]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_encoder(model: nn.Module, device: torch.device | str = "cpu", inplace: bool = False) -> nn.Module:
    """An INT8-weight version of a ``HybridEncoder`` for inference on ``device``.

    The input model is left as it is unless ``inplace``: then its FP32 weights
    are replaced, so loading never holds two FP32 copies at once.
    """
    device = torch.device(device)
    q = (model if inplace else copy.deepcopy(model)).eval().cpu()
    q.embed.tokens = Int8Embedding(q.embed.tokens)
    names = _quantizable_linears(q)
    if device.type == "cuda":
        for name in names:
            _set_submodule(q, name, Int8Linear(q.get_submodule(name)))
        return q.to(device).half()
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # eager-mode quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(q, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8,
                                inplace=inplace)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the weights: parameters, buffers and packed INT8 linear weights."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    for m in model.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is None or not hasattr(m, "weight") or not callable(m.weight):
            continue
        w = m.weight()  # a quantized tensor
        total += w.numel() * w.element_size()
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            total += w.q_per_channel_scales().numel() * 8 + w.q_per_channel_zero_points().numel() * 8
        b = m.bias()
        if b is not None:
            total += b.numel() * b.element_size()
    return total
