import math

import pytest
import torch

from ladic.diffusion import GaussianDiffusion, cosine_betas, linear_betas


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_identities(schedule):
    d = GaussianDiffusion(1000, schedule)
    betas = d.betas
    assert betas.shape == (1000,)
    assert torch.all(betas > 0) and torch.all(betas < 1)
    # ab_t = prod (1 - beta_i), strictly decreasing from ~1 to ~0
    assert torch.allclose(d.alphas_cumprod, torch.cumprod(1 - betas, 0))
    assert torch.all(d.alphas_cumprod[1:] < d.alphas_cumprod[:-1])
    assert d.alphas_cumprod[0] > 0.999
    assert d.alphas_cumprod[-1] < (1e-4 if schedule == "cosine" else 1e-4)


def test_cosine_matches_closed_form():
    ab = torch.cumprod(1 - cosine_betas(1000), 0)
    s = 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert ab[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-6)


def test_linear_endpoints():
    b = linear_betas(1000)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)


@pytest.mark.parametrize("noise_factor", [1.0, 2.0])
def test_q_sample_statistics(noise_factor):
    d = GaussianDiffusion(1000, "cosine", noise_factor)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1), 1.5)
    for t_val in (10, 500, 990):
        t = torch.full((20000,), t_val)
        xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        ab = d.alphas_cumprod[t_val].item()
        assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 1.5, abs=0.03 * noise_factor)
        assert xt.std().item() == pytest.approx(noise_factor * math.sqrt(1 - ab), rel=0.03, abs=1e-3)


def test_ddim_step_recovers_x0_with_true_prediction():
    d = GaussianDiffusion(1000, "cosine", 2.0)
    x0 = torch.randn(2, 5, 8)
    eps = torch.randn_like(x0)
    t = torch.tensor([800, 800])
    xt = d.q_sample(x0, t, eps)
    assert torch.allclose(d.predict_eps(xt, t, x0), eps, atol=1e-4)
    x_next = d.ddim_step(xt, x0, t, torch.tensor([300, 300]))
    assert torch.allclose(x_next, d.q_sample(x0, torch.tensor([300, 300]), eps), atol=1e-4)


def test_inference_timesteps_counts():
    d = GaussianDiffusion(1000)
    for s in (1, 5, 30, 1000):
        ts = d.inference_timesteps(s)
        assert len(ts) == s and ts[0] == 999 and len(set(ts)) == s
    with pytest.raises(ValueError):
        d.inference_timesteps(0)


def test_sample_timesteps_uniform():
    d = GaussianDiffusion(1000, "cosine")
    uni = d.sample_timesteps(20_000, torch.Generator().manual_seed(0))
    assert uni.dtype == torch.long and uni.min() >= 0 and uni.max() <= 999
    assert torch.equal(uni, torch.randint(0, 1000, (20_000,), generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="timestep sampling"):
        GaussianDiffusion(1000, timestep_sampling="beta")
