"""The fixed encoder: schedules, q(x_t | x_0) against composed single steps, and the posterior against Bayes' rule."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale

from hvae_diffusion.forward_process import (
    BETA_SCHEDULES,
    alphas_cumprod_from_betas,
    broadcast_to,
    forward_step_sample,
    learned_range_log_variance,
    make_betas,
    posterior_mean,
    posterior_variance,
    q_sample,
    rescale_zero_terminal_snr,
    signal_to_noise_ratio,
    step_alphas,
)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_make_betas_matches_diffusers(beta_schedule):
    ours = make_betas(beta_schedule, 1000, 0.00085, 0.012)
    theirs = DDPMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012).betas
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-5, atol=1e-7)


def test_make_betas_rejects_unknown_schedule():
    with pytest.raises(ValueError, match="beta_schedule"):
        make_betas("cubic")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        make_betas("linear", 0)


def test_rescale_zero_terminal_snr_matches_diffusers():
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    rescaled = rescale_zero_terminal_snr(betas)
    alphas_cumprod = alphas_cumprod_from_betas(rescaled)
    assert alphas_cumprod[-1] == 0 and rescaled[-1] == 1
    # the first ᾱ is kept, the shape of √ᾱ is an affine map of the original
    torch.testing.assert_close(alphas_cumprod[0], alphas_cumprod_from_betas(betas)[0])
    torch.testing.assert_close(rescaled.float(), diffusers_rescale(betas.float()), rtol=1e-4, atol=1e-6)


def test_alphas_cumprod_and_snr():
    betas = make_betas("linear", 50, 0.001, 0.2)
    alphas_cumprod = alphas_cumprod_from_betas(betas)
    expected = torch.tensor(
        [math.prod(1 - b for b in betas[: t + 1].tolist()) for t in range(50)], dtype=torch.float64
    )
    torch.testing.assert_close(alphas_cumprod, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(signal_to_noise_ratio(alphas_cumprod), expected / (1 - expected))
    # the step between kept latents t' < t: composing the skipped steps
    torch.testing.assert_close(step_alphas(alphas_cumprod[30], alphas_cumprod[10]), (1 - betas[11:31]).prod())


def test_broadcast_to_per_sample_coefficients():
    sample = torch.zeros(4, 3, 5, 5)
    assert broadcast_to(torch.arange(4.0), sample).shape == (4, 1, 1, 1)
    assert broadcast_to(torch.tensor(2.0), sample).ndim == 0
    assert broadcast_to(0.5, sample) == 0.5


@pytest.mark.parametrize("t", [1, 7, 60])
def test_q_sample_matches_composed_single_steps(t, generator, single_thread):
    """q(x_t | x_0) in closed form = t encoder steps q(x_s | x_{s−1}) composed, checked by Monte Carlo."""
    num_samples = 20_000
    alphas = 1 - make_betas("linear", 1000, 0.0001, 0.02)[:t]
    original = torch.tensor([[-0.8, 0.0, 0.6]], dtype=torch.float64).expand(num_samples, 3)
    composed = original
    for alpha in alphas:
        noise = torch.randn(original.shape, generator=generator, dtype=torch.float64)
        composed = forward_step_sample(composed, alpha, noise)
    alphas_cumprod_t = alphas.prod()
    noise = torch.randn(original.shape, generator=generator, dtype=torch.float64)
    closed_form = q_sample(original, noise, alphas_cumprod_t)

    mean, variance = alphas_cumprod_t.sqrt() * original[0], 1 - alphas_cumprod_t
    mean_tolerance = 5 * math.sqrt(variance / num_samples)
    variance_tolerance = 5 * variance * math.sqrt(2 / num_samples)
    for draws in (composed, closed_form):
        assert (draws.mean(0) - mean).abs().max() < mean_tolerance
        assert (draws.var(0) - variance).abs().max() < variance_tolerance


def test_q_sample_per_sample_alphas_and_float64_precision():
    original = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(original)
    alphas_cumprod_t = torch.tensor([0.99, 0.5, 0.01], dtype=torch.float64)
    draws = q_sample(original, noise, alphas_cumprod_t)
    for i in range(3):
        a = alphas_cumprod_t[i]
        torch.testing.assert_close(draws[i], a.sqrt() * original[i] + (1 - a).sqrt() * noise[i])
    # 1 − ᾱ near t = 0 must not be rounded through float32
    tiny = q_sample(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), 1 - 1e-10)
    assert abs(float(tiny) - 1e-5) < 1e-12
    # float64 coefficients do not turn float32 samples into float64
    assert q_sample(original.float(), noise.float(), alphas_cumprod_t).dtype == torch.float32


@pytest.mark.parametrize("t, t_prev", [(2, 1), (10, 9), (500, 499), (600, 300), (999, 0)])
def test_posterior_matches_bayes_rule_on_a_grid(t, t_prev):
    """q(x_{t'} | x_t, x_0) ∝ q(x_{t'} | x_0) q(x_t | x_{t'}), a 1-D density on a fine grid, has the closed-form
    moments."""
    alphas_cumprod = alphas_cumprod_from_betas(make_betas("linear", 1000))
    alphas_cumprod_t, prev_alphas_cumprod = alphas_cumprod[t], alphas_cumprod[t_prev]
    alpha = alphas_cumprod_t / prev_alphas_cumprod  # the single step between the two latents
    original, sample = torch.tensor([0.7], dtype=torch.float64), torch.tensor([-0.4], dtype=torch.float64)

    # the posterior lies between the prior's and the likelihood's centres, no wider than the narrower of the two
    centres = [float(prev_alphas_cumprod.sqrt() * original), float(sample / alpha.sqrt())]
    width = 12 * min(float(1 - prev_alphas_cumprod), float((1 - alpha) / alpha)) ** 0.5
    grid = torch.linspace(min(centres) - width, max(centres) + width, 200_001, dtype=torch.float64)
    log_prior = -0.5 * (grid - prev_alphas_cumprod.sqrt() * original) ** 2 / (1 - prev_alphas_cumprod)
    log_likelihood = -0.5 * (sample - alpha.sqrt() * grid) ** 2 / (1 - alpha)
    weights = torch.softmax(log_prior + log_likelihood, dim=0)
    bayes_mean = (weights * grid).sum()
    bayes_variance = (weights * (grid - bayes_mean) ** 2).sum()

    mean = posterior_mean(original, sample, alphas_cumprod_t, prev_alphas_cumprod)
    variance = posterior_variance(alphas_cumprod_t, prev_alphas_cumprod)
    torch.testing.assert_close(mean, bayes_mean.reshape(1), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(variance, bayes_variance, rtol=1e-5, atol=0)


def test_posterior_matches_gaussian_conditioning_per_sample():
    """The same posterior from the joint Gaussian of (x_{t−1}, x_t) given x_0: μ = μ_1 + Σ_12 Σ_22⁻¹ (x_t − μ_2)."""
    alphas_cumprod = alphas_cumprod_from_betas(make_betas("squaredcos_cap_v2", 1000))
    timesteps = torch.tensor([1, 5, 50, 400, 998])
    alphas_cumprod_t, prev_alphas_cumprod = alphas_cumprod[timesteps], alphas_cumprod[timesteps - 1]
    original = torch.randn(5, 3, dtype=torch.float64)
    sample = torch.randn(5, 3, dtype=torch.float64)

    alpha = (alphas_cumprod_t / prev_alphas_cumprod)[:, None]
    covariance = alpha.sqrt() * (1 - prev_alphas_cumprod)[:, None]  # Cov(x_{t−1}, x_t | x_0)
    variance_t = (1 - alphas_cumprod_t)[:, None]
    expected_mean = prev_alphas_cumprod.sqrt()[:, None] * original + covariance / variance_t * (
        sample - alphas_cumprod_t.sqrt()[:, None] * original
    )
    expected_variance = (1 - prev_alphas_cumprod)[:, None] - covariance**2 / variance_t

    torch.testing.assert_close(posterior_mean(original, sample, alphas_cumprod_t, prev_alphas_cumprod), expected_mean)
    torch.testing.assert_close(
        posterior_variance(alphas_cumprod_t, prev_alphas_cumprod), expected_variance[:, 0], rtol=1e-9, atol=1e-15
    )


def test_posterior_at_first_latent_is_the_data():
    """With ᾱ_{t−1} = 1 (x_0 itself) the posterior collapses onto x_0."""
    original, sample = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    alphas_cumprod_t = torch.tensor(0.999, dtype=torch.float64)
    torch.testing.assert_close(posterior_mean(original, sample, alphas_cumprod_t, one), original)
    assert posterior_variance(torch.tensor(0.999, dtype=torch.float64), one) == 0


def test_learned_range_interpolates_in_log_space():
    low, high = math.log(1e-4), math.log(2e-2)
    fraction = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    expected = torch.tensor([low, (low + high) / 2, high], dtype=torch.float64)
    torch.testing.assert_close(learned_range_log_variance(fraction, low, high), expected)
