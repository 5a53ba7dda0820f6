"""The embedding prior: schedules, the loss wrapper, DDIM sampling and query expansion, on tiny configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridrag.models.embedding_diffusion import (
    Config,
    EmbeddingDiffusion,
    EmbeddingPrior,
    PriorMLP,
    beta_schedule,
    blend,
    cosine_beta_schedule,
    ddim_timesteps,
    expand_queries,
    gate_weights,
    guided,
    linear_beta_schedule,
    sample_agreement,
)

TINY = dict(dim=16, hidden=64, depth=2, emb_dim=32, time_dim=16, dropout=0.0, timesteps=100)


def test_cosine_schedule_goes_from_clean_to_noise():
    betas = cosine_beta_schedule(1000)
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert betas.shape == (1000,)
    assert (betas > 0).all() and (betas <= 0.999).all()
    assert alpha_bar[0] > 0.999 and alpha_bar[-1] < 1e-4
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()


def test_linear_schedule_matches_ddpm_endpoints_at_1000_steps():
    betas = linear_beta_schedule(1000)
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)


def test_unknown_schedule_and_objective_are_rejected():
    with pytest.raises(ValueError, match="not a valid noise schedule"):
        beta_schedule("sigmoid2", 10)
    with pytest.raises(ValueError, match="not a valid objective"):
        EmbeddingDiffusion(PriorMLP(Config(**TINY, objective="pred_v")))


def test_ddim_timesteps_are_descending_and_end_at_zero():
    assert ddim_timesteps(1000, 1) == [0]
    ts = ddim_timesteps(1000, 10)
    assert len(ts) == 10 and ts[0] == 999 and ts[-1] == 0
    assert ts == sorted(ts, reverse=True)
    with pytest.raises(ValueError):
        ddim_timesteps(10, 11)


def test_guidance_scale_one_is_the_conditional_prediction():
    c, u = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.allclose(guided(c, u, 1.0), c)
    assert torch.equal(guided(c, u, 0.0), u)
    assert torch.allclose(guided(c, u, 2.0), 2 * c - u)


def test_each_block_starts_as_identity_and_null_condition_is_used_when_dropped():
    torch.manual_seed(0)
    model = PriorMLP(Config(**TINY))
    x, c = torch.randn(4, 16), torch.randn(4, 16)
    t = torch.tensor([0, 10, 50, 99])
    dropped = model(x, t, c, torch.zeros(4, dtype=torch.bool))
    # with the condition dropped the output cannot depend on it
    assert torch.allclose(dropped, model(x, t, torch.randn(4, 16), torch.zeros(4, dtype=torch.bool)))
    kept = model(x, t, c, torch.ones(4, dtype=torch.bool))
    assert kept.shape == (4, 16) and not torch.allclose(kept, dropped)


def _toy_pairs(n: int, dim: int, seed: int = 0):
    """Targets are a fixed rotation of the condition plus a little noise: learnable in a few hundred steps."""
    g = torch.Generator().manual_seed(seed)
    rot, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    cond = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    target = F.normalize(cond @ rot + 0.05 * torch.randn(n, dim, generator=g), dim=-1)
    return cond, target, rot


def test_training_lowers_the_loss_and_samples_land_near_the_target():
    torch.manual_seed(0)
    cond, target, rot = _toy_pairs(512, 16)
    diffusion = EmbeddingDiffusion(PriorMLP(Config(**TINY)))
    diffusion.set_data_stats(target)
    opt = torch.optim.AdamW(diffusion.parameters(), lr=3e-3)
    losses = []
    for step in range(300):
        idx = torch.randint(0, 512, (64,))
        loss = diffusion(target[idx], cond[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-50:]) < 0.6 * np.mean(losses[:50])

    diffusion.eval()
    test_cond, _, _ = _toy_pairs(64, 16, seed=1)
    test_target = F.normalize(test_cond @ rot, dim=-1)  # same map, fresh queries
    out = diffusion.sample(test_cond, steps=10, guidance=1.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (64, 16)
    assert torch.allclose(out.norm(dim=-1), torch.ones(64), atol=1e-5)
    # a random unit vector in 16-d has cosine ~0 with the target; the prior must do far better
    assert (out * test_target).sum(-1).mean() > 0.6


class _Oracle(torch.nn.Module):
    """A 'denoiser' that knows the answer: returns the true x0 or eps, whichever it is asked for."""

    def __init__(self, cfg, z0, noise):
        super().__init__()
        self.cfg, self.z0, self.noise = cfg, z0, noise

    def forward(self, x_t, t, cond, keep):
        out = self.z0 if self.cfg.objective == "pred_x0" else self.noise
        return torch.cat([out] * (x_t.shape[0] // out.shape[0]))


@pytest.mark.parametrize("objective", ["pred_x0", "pred_eps"])
def test_both_objectives_recover_x0_from_a_perfect_prediction(objective):
    cfg = Config(**TINY, objective=objective)
    z0, noise = torch.randn(4, 16), torch.randn(4, 16)
    diffusion = EmbeddingDiffusion(PriorMLP(cfg))
    diffusion.model = _Oracle(cfg, z0, noise)
    t = torch.tensor([1, 20, 60, 90])
    z_t = diffusion.q_sample(z0, t, noise)
    x0 = diffusion.predict_x0(z_t, t, torch.zeros(4, 16), guidance=3.0)
    assert torch.allclose(x0, z0, atol=1e-4)


def test_checkpoint_round_trip_gives_identical_samples(tmp_path):
    torch.manual_seed(0)
    diffusion = EmbeddingDiffusion(PriorMLP(Config(**TINY))).eval()
    diffusion.set_data_stats(F.normalize(torch.randn(100, 16), dim=-1))
    # checkpoints hold float16 weights: round the reference the same way
    diffusion.load_state_dict({k: v.half().float() for k, v in diffusion.state_dict().items()})
    path = tmp_path / "prior.pt"
    torch.save(diffusion.checkpoint(version="toy-1", encoder_version="toy-enc"), path)
    prior = EmbeddingPrior.load(path)
    assert prior.version == "toy-1" and prior.encoder_version == "toy-enc"
    q = F.normalize(torch.randn(5, 16), dim=-1)
    a = diffusion.sample(q, steps=4, generator=torch.Generator().manual_seed(3))
    b = prior.sample(q.numpy(), k=1, steps=4, seed=3)[:, 0]
    np.testing.assert_allclose(a.numpy(), b, atol=1e-6)


def test_checkpoint_of_another_kind_is_rejected():
    with pytest.raises(ValueError, match="not an embedding-prior"):
        EmbeddingDiffusion.from_checkpoint({"kind": "text-diffusion"})


def test_sample_agreement_is_one_for_identical_samples_and_lower_for_spread_ones():
    v = np.ones((2, 3, 4), dtype=np.float32)
    np.testing.assert_allclose(sample_agreement(v), [1.0, 1.0], atol=1e-6)
    eye = np.eye(4, dtype=np.float32)[None, :3]  # three orthogonal samples
    assert sample_agreement(eye)[0] == pytest.approx(0.0, abs=1e-6)
    assert sample_agreement(np.ones((3, 1, 4)))[0] == 1.0


def test_blend_interpolates_and_normalises():
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    g = np.array([[[0.0, 1.0], [0.0, 1.0]]], dtype=np.float32)
    np.testing.assert_allclose(blend(q, g, 0.0), q)
    np.testing.assert_allclose(blend(q, g, 1.0), [[0.0, 1.0]], atol=1e-7)
    np.testing.assert_allclose(blend(q, g, 0.5), [[2**-0.5, 2**-0.5]], atol=1e-6)
    per_query = blend(np.vstack([q, q]), np.vstack([g, g]), np.array([0.0, 1.0]))
    np.testing.assert_allclose(per_query, [[1.0, 0.0], [0.0, 1.0]], atol=1e-7)


def test_gate_zeroes_the_weight_of_uncertain_queries():
    agreement = np.array([0.2, 0.5, 0.9], dtype=np.float32)
    np.testing.assert_allclose(gate_weights(agreement, 0.4, None), [0.4, 0.4, 0.4])
    np.testing.assert_allclose(gate_weights(agreement, 0.4, 0.5), [0.0, 0.4, 0.4])


def test_expand_queries_keeps_shape_and_weight_zero_is_identity():
    torch.manual_seed(0)
    diffusion = EmbeddingDiffusion(PriorMLP(Config(**TINY)))
    prior = EmbeddingPrior(diffusion, "toy-1", "toy-enc")
    q = F.normalize(torch.randn(6, 16), dim=-1).numpy()
    np.testing.assert_array_equal(expand_queries(q, prior, k=3, weight=0.0), q)
    out = expand_queries(q, prior, k=3, weight=0.5, steps=3)
    assert out.shape == (6, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # deterministic for a fixed seed
    np.testing.assert_array_equal(out, expand_queries(q, prior, k=3, weight=0.5, steps=3))
    # a gate no query passes leaves every query as it was
    np.testing.assert_allclose(expand_queries(q, prior, k=3, weight=0.5, steps=3, gate_threshold=1.1), q, atol=1e-6)
