"""Text-to-embedding diffusion prior: query embedding in, answering-document embedding out.

A conditional denoising diffusion model (DDPM, Ho et al. 2020,
https://arxiv.org/abs/2006.11239) in the encoder's 384-d embedding space. The
condition is the query's embedding, the target the embedding of a passage that
answers it. It is the DALL-E 2 prior (Ramesh et al. 2022,
https://arxiv.org/abs/2204.06125), which maps a CLIP text embedding to a CLIP
image embedding, moved to retrieval: like HyDE (Gao et al. 2022,
https://arxiv.org/abs/2212.10496) it produces *hypothetical document
embeddings* for a query, but directly in embedding space, without an LLM
writing a document and the encoder reading it back.

Layers wrap each other:

* :class:`PriorMLP` is the backbone: a residual MLP on the noisy embedding,
  modulated (FiLM) by a timestep embedding and the condition.
* :class:`EmbeddingDiffusion` owns the noise schedule, the loss
  (``loss = diffusion(x0, cond)``) and the DDIM sampler.
* :func:`expand_queries` is the retrieval use: blend each query vector with the
  mean of ``k`` generated document vectors.

What the network predicts: the clean embedding x0, not the noise eps. The
targets live on a thin shell (unit vectors, standardised), a far smaller set
than R^384, and we sample with few DDIM steps. With eps-prediction, x0 is
recovered as ``(x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``, which multiplies any
error in eps by ``sqrt((1 - a_t) / a_t)``: hundreds of times at the noisy end
of a cosine schedule, exactly where a 5-step sampler spends its first step.
Predicting x0 keeps the error bounded at every t, and it is what the DALL-E 2
prior found to work better in embedding space (Sec. 2.1 of that paper).

Classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598):
training drops the condition with probability ``cond_drop_prob`` (replaced by a
learned null vector), so one network gives both ``x0(x_t, c)`` and
``x0(x_t, null)``; sampling extrapolates ``x0_u + s * (x0_c - x0_u)``.

Shapes: embeddings are float32 (B, D) with D = ``Config.dim``; timesteps are
int64 (B,).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------- schedules


def linear_beta_schedule(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear betas, scaled for ``timesteps`` (Ho et al. 2020, https://arxiv.org/abs/2006.11239)."""
    scale = 1000 / timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=torch.float64)


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule of improved DDPM (Nichol & Dhariwal 2021, https://arxiv.org/abs/2102.09672).

    alpha_bar(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2); betas clipped at 0.999.
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(0, 0.999)


def beta_schedule(name: str, timesteps: int) -> torch.Tensor:
    """Betas (T,) float64 by name: ``cosine`` or ``linear``."""
    if name == "cosine":
        return cosine_beta_schedule(timesteps)
    if name == "linear":
        return linear_beta_schedule(timesteps)
    raise ValueError(f"{name} is not a valid noise schedule (cosine, linear)")


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """Descending timesteps a ``steps``-step DDIM sampler visits, from T-1 down to 0.

    Evenly spaced ("uniform" skip of Song et al. 2021, https://arxiv.org/abs/2010.02502).
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be in [1, {timesteps}], got {steps}")
    ts = np.linspace(0, timesteps - 1, steps).round().astype(int)
    return sorted(set(ts.tolist()), reverse=True)


def guided(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``u + s (c - u)``; s = 1 is the plain conditional model."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


# ---------------------------------------------------------------- backbone


@dataclass
class Config:
    dim: int = 384  # embedding width of the encoder (MiniLM and the hybrid encoder: 384)
    hidden: int = 256  # width of the residual MLP (256 x 3 blocks: 1.4M parameters, 2.7 MB in float16)
    depth: int = 3  # residual blocks
    mlp_mult: int = 2  # inner width of each block's MLP, in units of hidden
    emb_dim: int = 128  # width of the (timestep + condition) embedding that drives FiLM
    time_dim: int = 128  # sinusoidal timestep features before their MLP
    dropout: float = 0.1  # inside each block; the pairs are few for a 384-d regression
    timesteps: int = 1000  # T of the forward process
    schedule: str = "cosine"  # see beta_schedule
    objective: str = "pred_x0"  # "pred_x0" or "pred_eps"; see the module docstring
    cond_drop_prob: float = 0.1  # classifier-free guidance: null condition this often in training


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoidal features of integer timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class ResidualBlock(nn.Module):
    """LayerNorm -> FiLM(scale, shift from the conditioning) -> MLP, added back."""

    def __init__(self, hidden: int, emb_dim: int, mlp_mult: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.film = nn.Linear(emb_dim, 2 * hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_mult * hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(mlp_mult * hidden, hidden)
        )
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        nn.init.zeros_(self.mlp[-1].weight)  # each block starts as the identity
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb).chunk(2, dim=-1)  # (B, H) each
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class PriorMLP(nn.Module):
    """Denoiser f(x_t, t, c) -> x0 (or eps): a residual MLP, conditioned by FiLM.

    ``cond_keep`` (B,) bool says which rows see their condition; the others see
    a learned null condition (classifier-free guidance).
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        H, E = cfg.hidden, cfg.emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_dim, E), nn.SiLU(), nn.Linear(E, E))
        self.cond_proj = nn.Linear(cfg.dim, E)
        self.null_cond = nn.Parameter(torch.zeros(cfg.dim))
        # the condition also enters the trunk directly: the answer's embedding is
        # usually near the query's, so the trunk starts from both
        self.in_proj = nn.Linear(2 * cfg.dim, H)
        self.blocks = nn.ModuleList(ResidualBlock(H, E, cfg.mlp_mult, cfg.dropout) for _ in range(cfg.depth))
        self.out_norm = nn.LayerNorm(H)
        self.out = nn.Linear(H, cfg.dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, cond_keep: torch.Tensor) -> torch.Tensor:
        cond = torch.where(cond_keep[:, None], cond, self.null_cond.expand_as(cond))  # (B, D)
        emb = F.silu(self.time_mlp(timestep_features(t, self.cfg.time_dim)) + self.cond_proj(cond))  # (B, E)
        h = self.in_proj(torch.cat([x_t, cond], dim=-1))  # (B, H)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(self.out_norm(h))  # (B, D)


# ---------------------------------------------------------------- diffusion


class EmbeddingDiffusion(nn.Module):
    """Gaussian diffusion over standardised embeddings: owns noise, loss and sampling.

    Embeddings are standardised per dimension (``(x - mean) / std``, statistics
    of the training targets, kept as buffers) so that every coordinate has unit
    variance, the scale the noise schedule assumes; a unit-norm 384-d vector
    has coordinates of about 0.05, which plain N(0, 1) noise would drown after
    the first few steps (DALL-E 2 scales CLIP embeddings for the same reason).
    """

    def __init__(self, model: PriorMLP):
        super().__init__()
        self.model = model
        cfg = model.cfg
        self.cfg = cfg
        if cfg.objective not in ("pred_x0", "pred_eps"):
            raise ValueError(f"{cfg.objective} is not a valid objective (pred_x0, pred_eps)")
        betas = beta_schedule(cfg.schedule, cfg.timesteps)
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        self.register_buffer("alpha_bar", alpha_bar.float())  # (T,)
        self.register_buffer("data_mean", torch.zeros(cfg.dim))
        self.register_buffer("data_std", torch.ones(cfg.dim))

    # -- standardisation

    def set_data_stats(self, targets: torch.Tensor) -> None:
        """Fit the per-dimension mean/std from raw target embeddings (N, D)."""
        self.data_mean.copy_(targets.mean(0))
        self.data_std.copy_(targets.std(0).clamp_min(1e-4))

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.data_mean) / self.data_std

    def unstandardise(self, z: torch.Tensor) -> torch.Tensor:
        """Back to embedding space, L2-normalised like the encoder's output."""
        return F.normalize(z * self.data_std + self.data_mean, dim=-1)

    # -- forward process and loss

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps."""
        a = self.alpha_bar[t][:, None]
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    def forward(self, x0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Training loss (scalar) for raw target embeddings x0 (B, D) and query embeddings cond (B, D)."""
        B = x0.shape[0]
        z0, c = self.standardise(x0), self.standardise(cond)
        t = torch.randint(0, self.cfg.timesteps, (B,), device=x0.device)
        noise = torch.randn_like(z0)
        z_t = self.q_sample(z0, t, noise)
        keep = torch.rand(B, device=x0.device) >= self.cfg.cond_drop_prob
        pred = self.model(z_t, t, c, keep)
        target = z0 if self.cfg.objective == "pred_x0" else noise
        return F.mse_loss(pred, target)

    # -- sampling

    def predict_x0(self, z_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor, guidance: float) -> torch.Tensor:
        """Guided x0 estimate (B, D) in standardised space; one batched pass for both branches."""
        B = z_t.shape[0]
        keep = torch.cat([torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)]).to(z_t.device)
        out = self.model(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([c, c]), keep)
        out_c, out_u = out[:B], out[B:]
        if self.cfg.objective == "pred_eps":
            a = self.alpha_bar[t][:, None]
            out_c = (z_t - (1 - a).sqrt() * out_c) / a.sqrt()
            out_u = (z_t - (1 - a).sqrt() * out_u) / a.sqrt()
        return guided(out_c, out_u, guidance)

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        steps: int = 10,
        guidance: float = 1.0,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDIM sampling (Song et al. 2021, https://arxiv.org/abs/2010.02502).

        cond: raw query embeddings (B, D). Returns L2-normalised embeddings (B, D).
        ``eta`` = 0 is the deterministic DDIM path given the starting noise;
        ``eta`` = 1 matches DDPM's ancestral variance.
        """
        c = self.standardise(cond)
        z = torch.randn(c.shape, generator=generator, device=c.device, dtype=c.dtype)
        ts = ddim_timesteps(self.cfg.timesteps, steps)
        for i, t_now in enumerate(ts):
            t = torch.full((c.shape[0],), t_now, dtype=torch.long, device=c.device)
            x0 = self.predict_x0(z, t, c, guidance)
            if i == len(ts) - 1:
                z = x0
                break
            a_t = self.alpha_bar[t_now]
            a_prev = self.alpha_bar[ts[i + 1]]
            eps = (z - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp_min(0).sqrt()
            z = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
            if eta > 0:
                z = z + sigma * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        return self.unstandardise(z)

    # -- checkpoints

    def checkpoint(self, **extra) -> dict:
        """A self-describing checkpoint: config, weights (float16, to ship small) and whatever the trainer adds."""
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in self.state_dict().items()}
        return {"kind": "embedding-prior", "config": asdict(self.cfg), "state_dict": state, **extra}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "EmbeddingDiffusion":
        if ckpt.get("kind") != "embedding-prior":
            raise ValueError(f"not an embedding-prior checkpoint (kind={ckpt.get('kind')!r})")
        diffusion = cls(PriorMLP(Config(**ckpt["config"])))
        diffusion.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()})
        diffusion.eval()
        return diffusion


# ---------------------------------------------------------------- runtime and retrieval use


class EmbeddingPrior:
    """A trained prior ready for the query path: NumPy in, NumPy out, CPU, no grad.

    ``version`` names the checkpoint; ``encoder_version`` the encoder whose
    embedding space it was trained in (a prior only makes sense with that encoder).
    """

    def __init__(self, diffusion: EmbeddingDiffusion, version: str, encoder_version: str, meta: dict | None = None):
        self.diffusion = diffusion.eval()
        self.version = version
        self.encoder_version = encoder_version
        self.meta = meta or {}
        self.dim = diffusion.cfg.dim

    @classmethod
    def load(cls, path) -> "EmbeddingPrior":
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        diffusion = EmbeddingDiffusion.from_checkpoint(ckpt)
        return cls(diffusion, ckpt["version"], ckpt["encoder_version"], ckpt.get("meta", {}))

    def sample(
        self, query_vecs: np.ndarray, k: int = 1, steps: int = 10, guidance: float = 1.0, seed: int | None = 0
    ) -> np.ndarray:
        """``k`` generated document embeddings per query: (N, D) -> (N, k, D) float32, L2-normalised."""
        q = np.asarray(query_vecs, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query_vecs must be (N, {self.dim}), got {q.shape}")
        if len(q) == 0:
            return np.zeros((0, k, self.dim), dtype=np.float32)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        cond = torch.from_numpy(np.repeat(q, k, axis=0))  # (N*k, D)
        with torch.inference_mode():
            out = self.diffusion.sample(cond, steps=steps, guidance=guidance, generator=gen)
        return out.numpy().reshape(len(q), k, self.dim)


def sample_agreement(samples: np.ndarray) -> np.ndarray:
    """Mean pairwise cosine of each query's k samples: (N, k, D) -> (N,). 1.0 when k = 1.

    High agreement means the prior is sure where the answer lies; the gate uses it.
    """
    n, k, _ = samples.shape
    if k < 2:
        return np.ones(n, dtype=np.float32)
    s = samples / np.linalg.norm(samples, axis=-1, keepdims=True).clip(1e-12)
    gram = np.einsum("nkd,njd->nkj", s, s)
    off = (gram.sum(axis=(1, 2)) - np.trace(gram, axis1=1, axis2=2)) / (k * (k - 1))
    return off.astype(np.float32)


def blend(query_vecs: np.ndarray, generated: np.ndarray, weight: float | np.ndarray) -> np.ndarray:
    """L2-normalised ``(1 - w) q + w mean_k(g)``: (N, D), (N, k, D), scalar or (N,) -> (N, D)."""
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim == 1:
        w = w[:, None]
    mixed = (1 - w) * query_vecs + w * generated.mean(axis=1)
    return (mixed / np.linalg.norm(mixed, axis=-1, keepdims=True).clip(1e-12)).astype(np.float32)


def gate_weights(agreement: np.ndarray, weight: float, threshold: float | None) -> np.ndarray:
    """Per-query blend weight: ``weight`` where the samples agree >= ``threshold``, else 0 (no expansion)."""
    if threshold is None:
        return np.full(agreement.shape, weight, dtype=np.float32)
    return np.where(agreement >= threshold, weight, 0.0).astype(np.float32)


def expand_queries(
    query_vecs: np.ndarray,
    prior: EmbeddingPrior,
    k: int = 4,
    weight: float = 0.5,
    steps: int = 10,
    guidance: float = 1.0,
    gate_threshold: float | None = None,
    seed: int | None = 0,
) -> np.ndarray:
    """Query vectors expanded with ``k`` hypothetical document embeddings from the prior.

    (N, D) -> (N, D), L2-normalised: ``(1 - w) q + w mean(g_1..g_k)``, where
    ``w`` is ``weight``, or 0 for queries whose samples agree less than
    ``gate_threshold`` (see :func:`sample_agreement`).
    """
    q = np.asarray(query_vecs, dtype=np.float32)
    if weight == 0 or k == 0:
        return q.copy()
    gen = prior.sample(q, k=k, steps=steps, guidance=guidance, seed=seed)
    w = gate_weights(sample_agreement(gen), weight, gate_threshold)
    return blend(q, gen, w)


def fit_prior(cond: np.ndarray, targets: np.ndarray, encoder_version: str, seconds: float = 60.0,
              max_steps: int = 2000, batch_size: int = 128, lr: float = 1e-3, cfg: Config | None = None,
              seed: int = 0) -> EmbeddingPrior:
    """Train a prior on (condition, target) pairs (N, D) for at most ``seconds`` of CPU / ``max_steps``: one domain's
    pseudo-pairs (pseudo-query embedding -> its passage's embedding) in ``encoder_version``'s space."""
    import time

    torch.manual_seed(seed)
    cfg = cfg or Config(dim=cond.shape[1])
    diffusion = EmbeddingDiffusion(PriorMLP(cfg))
    c, x = torch.from_numpy(np.asarray(cond, np.float32)), torch.from_numpy(np.asarray(targets, np.float32))
    diffusion.set_data_stats(x)
    opt = torch.optim.AdamW(diffusion.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    diffusion.train()
    t0, step = time.process_time(), 0  # CPU seconds: budgets compare on a shared machine
    while step < max_steps and time.process_time() - t0 < seconds:
        idx = torch.randint(0, len(c), (min(batch_size, len(c)),), generator=g)
        loss = diffusion(x[idx], c[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    return EmbeddingPrior(diffusion.eval(), f"prior-domain-{step}", encoder_version, {"steps": step})
