"""The bound of the latent hierarchy (hvae_diffusion/latent_elbo.py) on a linear-Gaussian 'VAE' with Gaussian data,
where log p(x) is exact: z_0 ~ N(m, c² I), x | z_0 ~ N(W z_0, σ² I), so p(x) = N(W m, c² W Wᵀ + σ² I) and the true
posterior p(z_0 | x) is Gaussian. The diffusion runs on y = (z_0 − m)/c ~ N(0, I) (shift m, scaling factor 1/c)."""

import math

import pytest
import torch

from hvae_diffusion.elbo import elbo_terms, gaussian_log_likelihood
from hvae_diffusion.latent_elbo import (
    gaussian_entropy,
    latent_elbo_terms,
    scale_latents,
    scaling_log_det,
)
from hvae_diffusion.scheduling_hvae import HVAEScheduler
from hvae_diffusion.testing import ExactMixtureDenoiser

# orthogonal columns make the true posterior covariance diagonal, the family a mean-field encoder can match
WEIGHT = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
PRIOR_MEAN, PRIOR_STD, NOISE_STD = 0.3, 2.0, 0.5


def _data(num_samples, generator):
    latents = PRIOR_MEAN + PRIOR_STD * torch.randn(num_samples, 2, generator=generator, dtype=torch.float64)
    return latents @ WEIGHT.T + NOISE_STD * torch.randn(num_samples, 3, generator=generator, dtype=torch.float64)


def _exact_log_prob(x):
    covariance = PRIOR_STD**2 * WEIGHT @ WEIGHT.T + NOISE_STD**2 * torch.eye(3, dtype=torch.float64)
    mean = WEIGHT @ torch.full((2,), PRIOR_MEAN, dtype=torch.float64)
    return torch.distributions.MultivariateNormal(mean, covariance).log_prob(x)


def _true_posterior(x):
    """p(z_0 | x) = N(Σ (Wᵀx/σ² + m/c²), Σ) with Σ = (I/c² + WᵀW/σ²)⁻¹ (diagonal here): mean [N, 2], variance [2]."""
    precision = torch.diagonal(WEIGHT.T @ WEIGHT) / NOISE_STD**2 + 1 / PRIOR_STD**2
    variance = 1 / precision
    mean = variance * (x @ WEIGHT / NOISE_STD**2 + PRIOR_MEAN / PRIOR_STD**2)
    return mean, variance


def _decoder_log_likelihood(x, latents):
    return gaussian_log_likelihood(x, latents @ WEIGHT.T, 2 * math.log(NOISE_STD))


def _standard_normal_log_prob(y):
    return gaussian_log_likelihood(y, torch.zeros_like(y), 0.0)


def _gap(x, variance_ratio, diffusion_elbo, seed, scaling_factor=1 / PRIOR_STD):
    """log p(x) − bound per sample, with the encoder's variance ``variance_ratio`` times the posterior's."""
    mean, variance = _true_posterior(x)
    log_variance = torch.log(variance_ratio * variance).expand_as(mean)
    terms = latent_elbo_terms(
        x,
        mean,
        log_variance,
        _decoder_log_likelihood,
        diffusion_elbo,
        scaling_factor=scaling_factor,
        shift_factor=PRIOR_MEAN,
        generator=torch.Generator().manual_seed(seed),
    )
    return _exact_log_prob(x) - terms.elbo, terms


def _posterior_kl(variance_ratio):
    """KL(q ‖ p(z_0 | x)) for q of the right mean and k times the variance: ½ Σ_i (k − 1 − log k), 2 latents."""
    return 2 * 0.5 * (variance_ratio - 1 - math.log(variance_ratio))


def test_exact_posterior_and_prior_give_log_p_x(single_thread):
    """With q_φ = p(z_0 | x) and the exact prior density in place of the diffusion ELBO, the bound is log p(x) in
    expectation; the D_z log|s| of the scaling is what makes it so (without it the mean is off by 2 log 2)."""
    x = _data(20000, torch.Generator().manual_seed(0))
    gap, terms = _gap(x, 1.0, _standard_normal_log_prob, seed=1)
    standard_error = float(gap.std()) / math.sqrt(len(gap))
    assert abs(float(gap.mean())) < 4 * standard_error, (float(gap.mean()), standard_error)
    log_det = scaling_log_det(2, 1 / PRIOR_STD)
    assert log_det == pytest.approx(-2 * math.log(2.0))
    assert abs(float((gap + log_det).mean())) > 20 * standard_error  # the change of variables is not negligible
    torch.testing.assert_close(terms.latent_prior - terms.diffusion_elbo, torch.full_like(gap, log_det))


def test_gap_is_the_encoder_kl_and_shrinks_as_its_variance_matches_the_posterior(single_thread):
    """E[log p(x) − bound] = KL(q_φ(z_0 | x) ‖ p(z_0 | x)) ≥ 0, which falls to 0 as q's variance → the posterior's."""
    x = _data(20000, torch.Generator().manual_seed(2))
    mean_gaps = []
    for variance_ratio in (8.0, 3.0, 1.5, 1.0):
        gap, _ = _gap(x, variance_ratio, _standard_normal_log_prob, seed=3)
        standard_error = float(gap.std()) / math.sqrt(len(gap))
        expected = _posterior_kl(variance_ratio)
        assert abs(float(gap.mean()) - expected) < 4 * standard_error + 1e-9, (variance_ratio, float(gap.mean()))
        mean_gaps.append(float(gap.mean()))
    assert mean_gaps[0] > mean_gaps[1] > mean_gaps[2] > mean_gaps[3] - 0.01, mean_gaps
    assert mean_gaps[2] > 0


def test_bound_with_the_diffusion_chain_as_prior_sits_below_log_p_x(single_thread):
    """The diffusion ELBO of y (the full chain of the exact N(0, I) denoiser) in place of log p(y): the bound stays
    ≤ log p(x) (3 standard errors), and the encoder's KL adds to the diffusion chain's own gap."""
    scheduler = HVAEScheduler(num_train_timesteps=100, variance_type="fixed_large", clip_sample=False)
    denoiser = ExactMixtureDenoiser(torch.zeros(1, 2), 1.0, alphas_cumprod=scheduler.alphas_cumprod)
    chain_generator = torch.Generator().manual_seed(5)

    def diffusion_elbo(y):
        return elbo_terms(scheduler, denoiser, y, generator=chain_generator, discrete=False).elbo

    x = _data(3000, torch.Generator().manual_seed(4))
    matched, _ = _gap(x, 1.0, diffusion_elbo, seed=6)
    broad, _ = _gap(x, 4.0, diffusion_elbo, seed=6)
    for gap in (matched, broad):
        assert float(gap.mean()) > -3 * float(gap.std()) / math.sqrt(len(gap))
    difference = broad - matched
    assert abs(float(difference.mean()) - _posterior_kl(4.0)) < 4 * float(difference.std()) / math.sqrt(len(x))


def test_entropy_and_scaling_equations():
    log_variance = torch.tensor([[0.3, -1.2], [0.0, 2.0]], dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, torch.exp(0.5 * log_variance)).entropy().sum(1)
    torch.testing.assert_close(gaussian_entropy(log_variance), expected)
    latents = torch.tensor([[1.0, -1.0]])
    torch.testing.assert_close(scale_latents(latents, 0.5, 0.2), torch.tensor([[0.4, -0.6]]))
    torch.testing.assert_close(scale_latents(latents, 0.5), torch.tensor([[0.5, -0.5]]))


def test_bad_input_is_named():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="posterior_log_variance"):
        latent_elbo_terms(x, torch.zeros(4, 2), torch.zeros(4, 3), _decoder_log_likelihood, _standard_normal_log_prob)
    with pytest.raises(ValueError, match="original_samples"):
        latent_elbo_terms(x, torch.zeros(5, 2), torch.zeros(5, 2), _decoder_log_likelihood, _standard_normal_log_prob)
    with pytest.raises(ValueError, match="scaling_factor"):
        scaling_log_det(4, 0.0)
