"""Gaussian diffusion in the caption latent space: beta schedules, q_sample, the DDIM update.

Notation follows the paper (appendix D): alpha_t = 1 - beta_t, ab_t = prod_{i<=t} alpha_i, and the
forward process x_t = sqrt(ab_t) x0 + F sqrt(1 - ab_t) eps with the noise factor F (Gao et al. 2022).
Timesteps are integers 0..T-1.
"""

from __future__ import annotations

import math

import torch


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021): ab(t) = cos^2(((t/T + s) / (1 + s)) pi/2). Returns (T,) float64."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta) for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear schedule of DDPM, rescaled to ``num_timesteps`` (paper Table 7: beta 1e-4 .. 0.02 at T = 1000)."""
    scale = 1000 / num_timesteps
    return torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64)


def make_betas(schedule: str, num_timesteps: int) -> torch.Tensor:
    """The named beta schedule ("cosine" or "linear"), (T,) float64."""
    return cosine_betas(num_timesteps) if schedule == "cosine" else linear_betas(num_timesteps)


TIMESTEP_SAMPLINGS = ("uniform", "few_step")


class GaussianDiffusion:
    """Holds the schedule and the closed-form operations the trainer and the sampler need."""

    def __init__(
        self, num_timesteps: int = 1000, schedule: str = "cosine", noise_factor: float = 1.0,
        timestep_sampling: str = "uniform", student_steps: int = 1, student_prob: float = 0.5,
    ) -> None:
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown timestep sampling {timestep_sampling!r}")
        betas = make_betas(schedule, num_timesteps)
        self.num_timesteps = num_timesteps
        self.noise_factor = noise_factor
        self.timestep_sampling = timestep_sampling
        self.student_steps, self.student_prob = student_steps, student_prob
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # ab_t, (T,) float64

    def _coef(self, values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Gather values[t] for (B,) timesteps and broadcast to ``ndim`` dims, float32 on t's device."""
        out = values.to(t.device)[t].float()
        return out.reshape(-1, *([1] * (ndim - 1)))

    def sqrt_ab(self, t: torch.Tensor, ndim: int = 3) -> torch.Tensor:
        return self._coef(self.alphas_cumprod.sqrt(), t, ndim)

    def sigma(self, t: torch.Tensor, ndim: int = 3) -> torch.Tensor:
        """F sqrt(1 - ab_t): the noise scale of x_t."""
        return self.noise_factor * self._coef((1.0 - self.alphas_cumprod).sqrt(), t, ndim)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x0): (B, L, D) -> (B, L, D)."""
        return self.sqrt_ab(t, x0.ndim) * x0 + self.sigma(t, x0.ndim) * noise

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The unit noise implied by x_t and an estimate of x0."""
        return (x_t - self.sqrt_ab(t, x_t.ndim) * x0) / self.sigma(t, x_t.ndim)

    def ddim_step(self, x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (eta = 0): x_{t'} = sqrt(ab_t') x0_hat + F sqrt(1 - ab_t') eps_hat."""
        eps = self.predict_eps(x_t, t, x0_hat)
        return self.q_sample(x0_hat, t_next, eps)

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) integer training timesteps in 0..T-1: uniform, or ``"few_step"``: with probability ``student_prob`` one
        of the timesteps a sampler of 1..``student_steps`` steps calls the network at (for S = 2: T-1 and 0),
        otherwise uniform."""
        uniform = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator)
        if self.timestep_sampling == "uniform":
            return uniform
        calls = torch.tensor(sorted({t for s in range(1, self.student_steps + 1) for t in self.inference_timesteps(s)}))
        pick = calls[torch.randint(0, len(calls), (batch_size,), generator=generator)]
        return torch.where(torch.rand(batch_size, generator=generator) < self.student_prob, pick, uniform)

    def inference_timesteps(self, num_inference_steps: int) -> list[int]:
        """``num_inference_steps`` evenly spaced timesteps from T-1 down to 0 (each is one denoising iteration)."""
        if not 1 <= num_inference_steps <= self.num_timesteps:
            raise ValueError(f"num_inference_steps must be in 1..{self.num_timesteps}, got {num_inference_steps}")
        if num_inference_steps == 1:
            return [self.num_timesteps - 1]
        ts = torch.linspace(self.num_timesteps - 1, 0, num_inference_steps).round().long().tolist()
        return ts
