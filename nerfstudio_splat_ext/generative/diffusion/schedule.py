"""Diffusion schedule over canonical Gaussian maps: forward noising, x0-parameterised DDIM, loss weights.

Conventions (one place, used by the student model and its tests):

* ``T = num_timesteps`` discrete noise levels ``t = 0 .. T-1``; ``alphas_cumprod[t]`` (written abar_t) is the
  signal fraction of level ``t``: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. The "level" ``t = -1`` is the
  clean map (abar = 1); a DDIM step whose previous level is -1 returns the predicted x0.
* Betas follow the cosine schedule (Nichol & Dhariwal 2021), not the linear one of Ho et al. 2020. Reasons: our
  maps are small (32..128 pixels a side) and a linear schedule shortened to 100 steps destroys them fast: it leaves
  abar = 0.64 at t* = 20, while the cosine schedule leaves abar = 0.89 there, so noise-teacher decoupling at t* hides
  the teacher's small errors without erasing its coarse layout; and the cosine schedule's abar falls near-linearly
  in the middle, so few DDIM steps see evenly spaced noise levels.
* The denoiser predicts x0 (canonical maps are bounded in [-1, 1], so x0 is the natural, bounded target); DDIM with
  eta = 0 then derives the noise estimate from x0.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """abar_t for t = 0..T-1 of the cosine schedule, float64 [T].

    abar(u) = f(u) / f(0) with f(u) = cos((u + s) / (1 + s) * pi / 2)^2, u = (t + 1) / T; betas are clipped at
    ``max_beta`` so the last level stays finite (abar_{T-1} ~ 0, pure noise).
    """
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")

    def f(u: Tensor) -> Tensor:
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    abar = f(u) / f(torch.zeros((), dtype=torch.float64))
    betas = (1 - abar[1:] / abar[:-1]).clamp(0.0, max_beta)
    return torch.cumprod(1 - betas, dim=0)


def linear_alphas_cumprod(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """abar_t of Ho et al.'s linear betas, rescaled from 1000 to ``num_timesteps`` steps (same total noise)."""
    scale = 1000.0 / num_timesteps
    betas = torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def ddim_timesteps(t_start: int, num_steps: int) -> list[int]:
    """The levels a ``num_steps``-step DDIM visits from ``t_start`` (inclusive) down towards 0, strictly decreasing.

    ``t_i = t_start - floor(i (t_start + 1) / num_steps)``: the ``t_start + 1`` levels 0..t_start split evenly, e.g.
    t_start = 20, 10 steps: 20, 18, ..., 2; t_start = 99: 99, 89, ..., 9. Step i goes from t_i to t_{i+1}, the last
    one to the clean map (level -1).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if t_start + 1 < num_steps:
        raise ValueError(f"a {num_steps}-step DDIM needs t_start >= {num_steps - 1}, got t_start={t_start}")
    return [t_start - (i * (t_start + 1)) // num_steps for i in range(num_steps)]


class DiffusionSchedule(torch.nn.Module):
    """Noise schedule with q_sample, an x0-parameterised DDIM step (eta = 0) and the per-step loss weights.

    A module so that its tables follow the model to its device (buffers, not saved: they are a pure function of the
    configuration).
    """

    def __init__(self, num_timesteps: int = 100, kind: str = "cosine") -> None:
        super().__init__()
        if kind == "cosine":
            abar = cosine_alphas_cumprod(num_timesteps)
        elif kind == "linear":
            abar = linear_alphas_cumprod(num_timesteps)
        else:
            raise ValueError(f"unknown schedule kind {kind!r}; use 'cosine' or 'linear'")
        self.num_timesteps = num_timesteps
        self.kind = kind
        self.register_buffer("alphas_cumprod", abar.float(), persistent=False)
        self.register_buffer("alphas_cumprod_f64", abar, persistent=False)

    # ----------------------------------------------------------------------------------------- tables
    def abar(self, t: Tensor) -> Tensor:
        """abar at integer levels t (any shape, long); level -1 (clean) gives 1."""
        t = t.long()
        if bool((t < -1).any()) or bool((t >= self.num_timesteps).any()):
            raise ValueError(f"timesteps must lie in [-1, {self.num_timesteps - 1}], got {t.tolist()}")
        table = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        return table[t + 1]

    @staticmethod
    def _expand(v: Tensor, like: Tensor) -> Tensor:
        return v.reshape(v.shape + (1,) * (like.dim() - v.dim())).to(like.dtype)

    # ------------------------------------------------------------------------------------ operations
    def q_sample(self, x0: Tensor, t: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        """Noised maps x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. x0 [B, C, H, W], t [B] long -> [B, C, H, W]."""
        if noise is None:
            noise = torch.randn_like(x0)
        a = self._expand(self.abar(t), x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_noise(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """The noise implied by x_t and an x0 estimate at level t (>= 0): (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
        a = self._expand(self.abar(t), x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).clamp_min(1e-12).sqrt()

    def ddim_step(self, x_t: Tensor, t: Tensor, t_prev: Tensor, x0_pred: Tensor) -> Tensor:
        """Deterministic DDIM (eta = 0) from level t to t_prev < t given the x0 estimate.

        x_{t_prev} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps_hat, eps_hat = predict_noise(x_t, t, x0);
        t_prev = -1 returns x0_pred. All maps [B, C, H, W], t and t_prev [B] long.
        """
        if bool((t_prev >= t).any()):
            raise ValueError(f"DDIM steps go to lower noise: t_prev {t_prev.tolist()} must be < t {t.tolist()}")
        eps = self.predict_noise(x_t, t, x0_pred)
        a_prev = self._expand(self.abar(t_prev), x_t)
        return a_prev.sqrt() * x0_pred + (1 - a_prev).sqrt() * eps

    def loss_weights(self, timesteps: list[int]) -> Tensor:
        """lambda_t of the rendering losses of an unrolled DDIM visiting ``timesteps`` (float32 [len], sum 1).

        lambda_t is proportional to abar_t, the signal fraction of the input the x0 estimate is made from: estimates
        from noisier inputs are trusted less, and the last steps, whose estimate becomes the sample, count most.
        Normalised to sum 1 so the stage-2 rendering loss has the scale of a single rendering loss.
        """
        w = self.abar(torch.tensor(timesteps, device=self.alphas_cumprod.device))
        return w / w.sum()
