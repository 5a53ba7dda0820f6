"""INT8 weights: per-channel maths, the compact checkpoint form, and the quantized encoder."""

import pytest
import torch
import torch.nn as nn

from hybridrag.models.hybrid_encoder import Config, HybridEncoder
from hybridrag.models.quantization import (
    Int8Embedding,
    Int8Linear,
    dequantize_per_channel,
    pack_state_dict,
    quantize_encoder,
    quantize_per_channel,
    unpack_state_dict,
    weight_bytes,
)

TINY = dict(vocab_size=500, d_model=64, n_heads=4, n_layers=2, d_ff=128, out_dim=48,
            max_positions=64, max_seq_len=32, dropout=0.0)


def _tiny(fusion="concat", seed=0):
    torch.manual_seed(seed)
    model = HybridEncoder(Config(**TINY, fusion=fusion)).eval()
    with torch.no_grad():  # the fresh conv/fusion are pass-throughs: give them real weights to test
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_per_channel_round_trip_error_is_within_half_a_step():
    w = torch.randn(32, 40) * torch.linspace(0.01, 3, 32)[:, None]
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (32,)
    assert int(q.abs().max()) == 127
    err = (dequantize_per_channel(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())


def test_pack_stores_big_matrices_int8_and_round_trips():
    sd = {"big": torch.randn(128, 64), "bias": torch.randn(64), "small": torch.randn(4, 4)}
    packed = pack_state_dict(sd)
    assert packed["big"]["q"].dtype == torch.int8
    assert torch.equal(packed["bias"], sd["bias"]) and torch.equal(packed["small"], sd["small"])
    back = unpack_state_dict(packed)
    assert set(back) == set(sd)
    torch.testing.assert_close(back["big"], sd["big"], atol=float(sd["big"].abs().max()) / 127, rtol=0)


def test_int8_linear_and_embedding_match_float():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(5, 64)
    cos = torch.cosine_similarity(Int8Linear(lin)(x), lin(x), dim=-1)
    assert bool((cos > 0.999).all())
    emb = nn.Embedding(100, 16)
    ids = torch.tensor([[1, 5, 99]])
    cos = torch.cosine_similarity(Int8Embedding(emb)(ids), emb(ids), dim=-1)
    assert bool((cos > 0.999).all())


@pytest.mark.parametrize("fusion", ["concat", "weighted", "attention"])
def test_quantized_encoder_close_to_fp32(fusion):
    """Dynamic INT8 keeps sentence embeddings within cosine 0.99 of FP32."""
    model = _tiny(fusion)
    ids = torch.randint(1, 500, (6, 20))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[2, 12:] = False
    with torch.inference_mode():
        ref = model(ids, mask)
        q = quantize_encoder(model)
        out = q(ids, mask)
    assert out.shape == ref.shape
    assert bool(((out * ref).sum(-1) > 0.99).all())
    # the input model is untouched
    assert isinstance(model.blocks[0].attn.qkv, nn.Linear)


def test_int8_weight_bytes_much_smaller():
    model = _tiny()
    fp32, int8 = weight_bytes(model), weight_bytes(quantize_encoder(model))
    assert fp32 == sum(p.numel() * 4 for p in model.parameters())
    assert int8 < 0.5 * fp32
