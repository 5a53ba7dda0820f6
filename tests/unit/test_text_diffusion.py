"""Masked text diffusion: schedule, vocabulary remap, layout, NELBO, SUBS and the cached sampler, on tiny configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hybridrag.models.text_diffusion import (
    CLS,
    MASK,
    N_SPECIAL,
    PAD,
    SEP,
    UNK,
    Config,
    Denoiser,
    MaskedDiffusion,
    Vocab,
    TextDiffusionModel,
    antithetic_times,
    fit_sentences,
    layout,
    load_tokenizer,
    loglinear_alpha,
    loglinear_weight,
    nucleus,
    reverse_times,
    tidy_spacing,
    unmask_probability,
    word_starts,
)

TINY = dict(vocab_size=12, query_len=4, doc_len=6, d_model=32, n_layers=1, n_heads=2, d_ff=64, emb_dim=16, dropout=0.0)


def test_loglinear_schedule_endpoints_and_weight():
    t = torch.tensor([0.0, 0.5, 1.0])
    np.testing.assert_allclose(loglinear_alpha(t, eps=0.0), [1.0, 0.5, 0.0])
    assert loglinear_alpha(torch.tensor(1.0), eps=1e-3).item() == pytest.approx(1e-3, rel=1e-4)
    np.testing.assert_allclose(loglinear_weight(torch.tensor([0.25, 0.5, 1.0])), [4.0, 2.0, 1.0], rtol=1e-6)


def test_unmask_probability_reveals_everything_at_the_last_step():
    assert unmask_probability(1.0, 0.0, eps=0.0) == pytest.approx(1.0)
    assert unmask_probability(1.0, 0.5, eps=0.0) == pytest.approx(0.5)
    assert unmask_probability(0.5, 0.25, eps=0.0) == pytest.approx(0.5)
    # composing two half steps reveals as much as one full step
    stay = (1 - unmask_probability(1.0, 0.5)) * (1 - unmask_probability(0.5, 0.0))
    assert stay == pytest.approx(1 - unmask_probability(1.0, 0.0))


def test_antithetic_times_cover_the_interval_evenly():
    t = antithetic_times(8, eps=1e-3, generator=torch.Generator().manual_seed(0))
    assert t.shape == (8,) and (t >= 1e-3).all() and (t < 1).all()
    gaps = np.diff(np.sort(t.numpy()))
    np.testing.assert_allclose(gaps, (1 - 1e-3) / 8, rtol=1e-4)


def test_vocab_keeps_frequent_ids_most_frequent_first_and_maps_the_rest_to_unk():
    vocab = Vocab.build([[7, 7, 9, 3], [7, 9, 11]], min_count=2, wordpiece_size=20, reserved=[3])
    assert vocab.wordpiece_ids.tolist() == [7, 9]
    assert len(vocab) == N_SPECIAL + 2
    np.testing.assert_array_equal(vocab.encode([7, 9, 11, 3]), [N_SPECIAL, N_SPECIAL + 1, UNK, UNK])
    assert vocab.decode([CLS, N_SPECIAL + 1, N_SPECIAL, SEP, PAD]) == [9, 7]


def test_layout_puts_query_and_document_in_their_regions():
    row = layout([10, 11], [20, 21, 22], query_len=5, doc_len=6)
    assert row.tolist() == [CLS, 10, 11, SEP, PAD, 20, 21, 22, SEP, PAD, PAD]
    cut = layout([10, 11, 12, 13, 14], [20] * 9, query_len=4, doc_len=3)
    assert cut.tolist() == [CLS, 10, 11, SEP, 20, 20, 20]
    blank = layout([10], None, query_len=3, doc_len=4)
    assert blank.tolist() == [CLS, 10, SEP, MASK, MASK, MASK, MASK]


def test_nucleus_keeps_the_smallest_set_reaching_p():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    np.testing.assert_allclose(nucleus(p, 0.7), [[0.625, 0.375, 0.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(nucleus(p, 1.0), p, rtol=1e-6)
    assert nucleus(p, 0.1)[0, 0] == pytest.approx(1.0)


def _diffusion(seed: int = 0) -> MaskedDiffusion:
    torch.manual_seed(seed)
    return MaskedDiffusion(Denoiser(Config(**TINY))).eval()


def test_subs_never_predicts_mask_and_masking_spares_the_query():
    d = _diffusion()
    x0 = torch.from_numpy(np.stack([layout([5, 6], [7, 8, 9], 4, 6), layout([6], [9, 9], 4, 6)]))
    logp = d.subs_log_probs(x0)
    assert logp.shape == (2, 6, 12)
    assert torch.isneginf(logp[..., MASK]).all()
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, 6))
    x_t = d.mask(x0, torch.tensor([1.0, 1.0]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x_t[:, :4], x0[:, :4])
    assert (x_t[:, 4:] == MASK).float().mean() > 0.9  # alpha_1 = eps: nearly everything masked


def test_nelbo_of_an_untrained_model_is_about_log_vocab_per_masked_token():
    """At init the denoiser is near-uniform over the 11 non-mask tokens, so the bound is ~log(11) per token."""
    d = _diffusion()
    x0 = torch.from_numpy(np.stack([layout([5, 6], [7, 8, 9, 10, 11], 4, 6)] * 256))
    t = antithetic_times(256, generator=torch.Generator().manual_seed(0))
    nats = d.nelbo(x0, t, generator=torch.Generator().manual_seed(1)).mean() / 6
    assert nats.item() == pytest.approx(math.log(11), rel=0.15)


def test_training_memorises_a_query_conditioned_mapping():
    """Two queries, two documents: the model must learn which document each query gets."""
    torch.manual_seed(0)
    d = MaskedDiffusion(Denoiser(Config(**TINY)))
    x0 = torch.from_numpy(np.stack([layout([5], [7, 8, 9], 4, 6), layout([6], [10, 11, 10], 4, 6)]))
    opt = torch.optim.AdamW(d.parameters(), lr=1e-2)
    first = None
    for step in range(150):
        loss = d(x0.repeat(16, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.2 * first
    d.eval()
    blank = torch.from_numpy(np.stack([layout([5], None, 4, 6), layout([6], None, 4, 6)]))
    out, _ = d.sample(blank, steps=6, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert out[0, 4:8].tolist() == [7, 8, 9, SEP]
    assert out[1, 4:8].tolist() == [10, 11, 10, SEP]


def test_sampler_fills_every_mask_and_keeps_the_query():
    d = _diffusion()
    blank = torch.from_numpy(np.stack([layout([5, 6], None, 4, 6)] * 3))
    out, evals = d.sample(blank, steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :4], blank[:, :4])
    assert not (out == MASK).any()
    assert 3 <= evals <= 12


def test_cache_gives_the_same_samples_with_fewer_denoiser_calls():
    """Many more steps than tokens: most steps reveal nothing, so their input (and output) is unchanged."""
    d = _diffusion()
    blank = torch.from_numpy(np.stack([layout([5, 6], None, 4, 6)] * 4))
    cached, n_cached = d.sample(blank, steps=64, use_cache=True, generator=torch.Generator().manual_seed(3))
    plain, n_plain = d.sample(blank, steps=64, use_cache=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(cached, plain)
    assert n_plain == 64 * 4
    assert n_cached <= 4 * 7  # at most one recompute per revealed token per row, plus the first pass


def test_checkpoint_round_trip_keeps_config_and_weights(tmp_path):
    d = _diffusion()
    path = tmp_path / "text.pt"
    torch.save(d.checkpoint(version="toy", vocab=[1, 2, 3]), path)
    ckpt = torch.load(path, weights_only=False)
    back = MaskedDiffusion.from_checkpoint(ckpt)
    assert back.cfg == d.cfg
    for k, v in d.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v.half().float() if v.is_floating_point() else v)
    with pytest.raises(ValueError, match="not a text-diffusion"):
        MaskedDiffusion.from_checkpoint({"kind": "embedding-prior"})


# ---------------------------------------------------------------- writing from a document (SDEdit)


def test_reverse_times_run_the_same_grid_from_t0():
    assert reverse_times(4) == [1 - i / 4 for i in range(5)]
    assert reverse_times(8, 0.5) == pytest.approx([0.5, 0.375, 0.25, 0.125, 0.0])
    assert reverse_times(10, 0.25) == pytest.approx([0.25, 0.25 * 2 / 3, 0.25 / 3, 0.0])  # ceil(2.5) = 3 steps
    assert reverse_times(64, 0.01) == pytest.approx([0.01, 0.0])  # at least one step
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="t_start"):
            reverse_times(8, bad)


# rows the sampler wrote before it could start from a document: tiny model (seed 0), steps=8, temperature 0.9,
# top_p 0.95, generator seed 7 (recorded from the from-scratch sampler as it was, commit 37acdae)
FROM_SCRATCH = [[2, 5, 6, 3, 10, 2, 3, 9, 8, 10], [2, 7, 3, 0, 0, 7, 6, 5, 3, 6],
                [2, 5, 6, 3, 6, 0, 10, 8, 9, 3], [2, 7, 3, 0, 5, 3, 11, 10, 0, 6]]


def test_strength_one_reproduces_the_from_scratch_sampler():
    """t0 = 1 masks the whole document without drawing from the generator, then runs the old grid: same samples."""
    d = _diffusion()
    x0 = torch.from_numpy(np.stack([layout([5, 6], [7, 8, 9], 4, 6), layout([7], [11, 10], 4, 6)] * 2))
    gen = torch.Generator().manual_seed(7)
    start = d.noise(x0, 1.0, generator=gen)
    assert torch.equal(start[:, :4], x0[:, :4]) and (start[:, 4:] == MASK).all()
    out, evals = d.sample(start, steps=8, temperature=0.9, top_p=0.95, generator=gen, t_start=1.0)
    assert out.tolist() == FROM_SCRATCH and evals == 20


def test_noise_masks_about_a_fraction_strength_of_the_document_and_nothing_else():
    d = _diffusion()
    x0 = torch.from_numpy(np.stack([layout([5, 6], [7, 8, 9, 10, 11], 4, 6)] * 2000))
    for strength in (0.3, 0.5, 0.7):
        x_t = d.noise(x0, strength, generator=torch.Generator().manual_seed(0))
        masked = x_t[:, 4:] == MASK
        assert masked.float().mean().item() == pytest.approx((1 - d.cfg.eps) * strength, abs=0.01)
        assert torch.equal(x_t[:, :4], x0[:, :4])  # the query is the condition, never noised
        assert torch.equal(x_t[:, 4:][~masked], x0[:, 4:][~masked])


def test_partial_denoising_rewrites_only_the_masked_tokens():
    """From t0 = 0.5: every mask is filled, tokens never masked and the query come out unchanged, in ~half the steps."""
    d = _diffusion()
    x0 = torch.from_numpy(np.stack([layout([5, 6], [7, 8, 9, 10], 4, 6), layout([7], [11, 10, 9], 4, 6)] * 4))
    gen = torch.Generator().manual_seed(1)
    start = d.noise(x0, 0.5, generator=gen)
    kept = start != MASK
    assert (~kept).any() and kept[:, 4:].any()
    out, evals = d.sample(start, steps=16, generator=gen, t_start=0.5, use_cache=False)
    assert not (out == MASK).any()
    assert torch.equal(out[kept], x0[kept])
    assert torch.equal(out[:, :4], x0[:, :4])
    assert evals == 8 * len(x0)  # ceil(16 * 0.5) steps


def test_fit_sentences_keeps_whole_leading_sentences():
    assert fit_sentences([[1, 2], [3, 4, 5], [6]], budget=5) == [1, 2, 3, 4, 5]
    assert fit_sentences([[1, 2], [3, 4, 5], [6]], budget=4) == [1, 2]
    assert fit_sentences([[1, 2, 3, 4, 5, 6], [7]], budget=4) == [1, 2, 3, 4]  # a long first sentence is cut
    assert fit_sentences([], budget=4) == []


def test_tidy_spacing_undoes_wordpiece_decoding_spaces():
    assert tidy_spacing("compiler : a program ( noun ) that isn ' t real - time") == \
        "compiler: a program (noun) that isn't real-time"
    assert tidy_spacing('version 3. 5 of " c + + "') == 'version 3.5 of "c++"'


@pytest.fixture(scope="module")
def tiny_text_model() -> TextDiffusionModel:
    tok = load_tokenizer()
    words = "a program that translates source code into machine language . what is compiler cat small animal"
    vocab = Vocab(sorted(set(tok.encode(words, add_special_tokens=False).ids)))
    torch.manual_seed(0)
    cfg = Config(**{**TINY, "vocab_size": len(vocab), "query_len": 8, "doc_len": 12})
    return TextDiffusionModel(MaskedDiffusion(Denoiser(cfg)), vocab, "toy", tokenizer=tok)


QUERIES = ["what is a compiler", "a small animal"]
DOCS = ["a program that translates source code into machine language.", "a small cat."]


def test_generate_with_strength_one_is_the_old_from_scratch_path(tiny_text_model):
    m = tiny_text_model
    plain = m.generate(QUERIES, n=2, steps=8, seed=3)
    from_docs = m.generate(QUERIES, n=2, steps=8, seed=3, init_docs=DOCS, strength=1.0)
    assert [[g.text for g in grp] for grp in from_docs] == [[g.text for g in grp] for grp in plain]
    assert all(g.init_text is None for grp in plain for g in grp)
    assert [g.init_text for g in from_docs[0]] == [DOCS[0]] * 2


def test_generate_from_documents_keeps_most_of_them_at_low_strength(tiny_text_model):
    """One init document per sample, query-major; at strength 0.2 most tokens of each are kept in place."""
    m = tiny_text_model
    init = [DOCS[0], DOCS[1], DOCS[1], DOCS[0]]
    out = m.generate(QUERIES, n=2, steps=16, seed=0, init_docs=init, strength=0.2)
    assert [g.init_text for grp in out for g in grp] == init
    kept = [np.mean([a == b for a, b in zip(g.token_ids, m.fit_document(g.init_text))]) for grp in out for g in grp]
    assert np.mean(kept) > 0.6
    with pytest.raises(ValueError, match="init_docs"):
        m.generate(QUERIES, n=2, init_docs=DOCS[:1])
    with pytest.raises(ValueError, match="strength"):
        m.generate(QUERIES, n=2, init_docs=DOCS, strength=0.0)


def test_whole_word_noising_masks_the_pieces_of_a_word_together():
    """Pieces 1-2 continue the word at 0, piece 4 the word at 3: each word is masked whole, at the same rate."""
    cont = np.array([False, True, True, False, True, False])
    np.testing.assert_array_equal(word_starts(cont), [0, 0, 0, 3, 3, 5])
    np.testing.assert_array_equal(word_starts(np.array([True, False])), [0, 1])
    d = _diffusion()
    x0 = torch.from_numpy(np.stack([layout([5], [7, 8, 9, 10, 11], 4, 6)] * 2000))
    starts = torch.from_numpy(np.broadcast_to(word_starts(cont), (2000, 6)).copy())
    masked = d.noise(x0, 0.5, generator=torch.Generator().manual_seed(0), word_start=starts)[:, 4:] == MASK
    assert torch.equal(masked[:, 1], masked[:, 0]) and torch.equal(masked[:, 2], masked[:, 0])
    assert torch.equal(masked[:, 4], masked[:, 3])
    assert masked.float().mean().item() == pytest.approx(0.5, abs=0.02)
