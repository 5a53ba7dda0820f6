"""Streaming (chunked sliding-window) attention against the full-attention reference."""

import math

import pytest
import torch

from hybridrag.models.streaming_attention import full_attention, sliding_window_attention, window_mask


def _qkv(B=2, H=3, T=50, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, D, generator=g) for _ in range(3))


@pytest.mark.parametrize("chunk", [1, 7, 16, 50, 64])
def test_equals_full_attention_when_window_covers_sequence(chunk):
    """With window >= T - 1 every query sees every key: the result is full attention."""
    q, k, v = _qkv()
    T = q.shape[2]
    out = sliding_window_attention(q, k, v, window=T - 1, chunk=chunk)
    # float32 sums in another order: 1e-5 failed once inside the full suite (other thread counts)
    torch.testing.assert_close(out, full_attention(q, k, v), atol=1e-4, rtol=1e-4)


def test_equals_full_attention_with_padding():
    """Padded keys are ignored the same way by both; real query rows agree."""
    q, k, v = _qkv(T=40)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False
    out = sliding_window_attention(q, k, v, key_padding_mask=mask, window=64, chunk=8)
    ref = full_attention(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :, :25], ref[1, :, :25], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_narrow_window_equals_banded_full_attention():
    """A narrow window equals full attention with the band mask applied explicitly."""
    q, k, v = _qkv(T=33)
    w = 4
    out = sliding_window_attention(q, k, v, window=w, chunk=5)
    band = window_mask(0, 33, 0, 33, w)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    ref = torch.softmax(scores.masked_fill(~band, float("-inf")), dim=-1) @ v
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # and it differs from unrestricted attention, so the window really restricts
    assert not torch.allclose(out, full_attention(q, k, v), atol=1e-3)


def test_window_mask_is_symmetric_band():
    m = window_mask(0, 6, 0, 6, 1)
    assert m.tolist()[0] == [True, True, False, False, False, False]
    assert torch.equal(m, m.T)
    assert int(m.sum()) == 6 + 2 * 5


def test_rejects_bad_arguments():
    q, k, v = _qkv(T=4)
    with pytest.raises(ValueError):
        sliding_window_attention(q, k, v, window=-1)
    with pytest.raises(ValueError):
        sliding_window_attention(q, k, v, chunk=0)
