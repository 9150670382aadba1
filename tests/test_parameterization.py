"""The four parameterizations: exact round trips, agreement with the ground truth, and Tweedie's formula."""

import itertools

import pytest
import torch

from hvae_diffusion.forward_process import alphas_cumprod_from_betas, make_betas, posterior_mean, q_sample
from hvae_diffusion.parameterization import (
    PREDICTION_TYPES,
    convert_prediction,
    posterior_mean_from_prediction,
    training_target,
    velocity,
)
from hvae_diffusion.testing import GaussianMixture

ALPHAS_CUMPROD = alphas_cumprod_from_betas(make_betas("linear", 1000))


@pytest.mark.parametrize("from_type, to_type", list(itertools.permutations(PREDICTION_TYPES, 2)))
def test_round_trip_at_every_timestep(from_type, to_type, generator):
    """from → to → from is the identity to 1e-6 in float64 for all 1000 ᾱ_t at once (per-sample ᾱ of shape [B])."""
    sample = torch.randn(1000, 3, generator=generator, dtype=torch.float64)
    output = torch.randn(1000, 3, generator=generator, dtype=torch.float64)
    converted = convert_prediction(output, sample, ALPHAS_CUMPROD, from_type, to_type)
    back = convert_prediction(converted, sample, ALPHAS_CUMPROD, to_type, from_type)
    torch.testing.assert_close(back, output, rtol=1e-6, atol=1e-6)
    # a scalar ᾱ (tensor or Python float) gives the same as a per-sample one
    for alphas_cumprod_t in (ALPHAS_CUMPROD[400], float(ALPHAS_CUMPROD[400])):
        scalar = convert_prediction(output[:4], sample[:4], alphas_cumprod_t, from_type, to_type)
        per_sample = convert_prediction(output[:4], sample[:4], ALPHAS_CUMPROD[400].expand(4), from_type, to_type)
        torch.testing.assert_close(scalar, per_sample)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_conversions_recover_the_true_pair(prediction_type, generator):
    """For x_t made from (x_0, ε), the training target of each type converts to the true x_0, ε and v."""
    shape = (1000, 2, 2, 2)
    original = torch.randn(shape, generator=generator, dtype=torch.float64)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    sample = q_sample(original, noise, ALPHAS_CUMPROD)
    target = training_target(original, noise, sample, ALPHAS_CUMPROD, prediction_type)
    truth = {
        "sample": original,
        "epsilon": noise,
        "v_prediction": velocity(original, noise, ALPHAS_CUMPROD),
        # the conditional score ∇ log q(x_t | x_0)
        "score": -(sample - ALPHAS_CUMPROD.sqrt()[:, None, None, None] * original)
        / (1 - ALPHAS_CUMPROD)[:, None, None, None],
    }
    torch.testing.assert_close(target, truth[prediction_type], rtol=1e-6, atol=1e-6)
    for to_type in PREDICTION_TYPES:
        converted = convert_prediction(target, sample, ALPHAS_CUMPROD, prediction_type, to_type)
        torch.testing.assert_close(converted, truth[to_type], rtol=1e-6, atol=1e-6)
    # the v of a training pair, written with x_0 and ε directly
    a = ALPHAS_CUMPROD[:, None, None, None]
    torch.testing.assert_close(truth["v_prediction"], a.sqrt() * noise - (1 - a).sqrt() * original)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_posterior_mean_from_any_prediction(prediction_type, generator):
    original = torch.randn(1000, 3, generator=generator, dtype=torch.float64)
    noise = torch.randn(1000, 3, generator=generator, dtype=torch.float64)
    sample = q_sample(original, noise, ALPHAS_CUMPROD)
    prev_alphas_cumprod = torch.cat([torch.ones(1, dtype=torch.float64), ALPHAS_CUMPROD[:-1]])
    target = training_target(original, noise, sample, ALPHAS_CUMPROD, prediction_type)
    torch.testing.assert_close(
        posterior_mean_from_prediction(target, sample, ALPHAS_CUMPROD, prev_alphas_cumprod, prediction_type),
        posterior_mean(original, sample, ALPHAS_CUMPROD, prev_alphas_cumprod),
    )


def test_tweedie_formula_for_gaussian_data(generator):
    """E[x_0 | x_t] from the exact score by Tweedie = the Gaussian conditional mean, for x_0 ~ N(m, s²)."""
    m, s = 0.4, 0.7
    timesteps = torch.tensor([0, 10, 100, 500, 999])
    alphas_cumprod_t = ALPHAS_CUMPROD[timesteps]
    sample = torch.randn(5, 1, generator=generator, dtype=torch.float64)
    a = alphas_cumprod_t[:, None]
    marginal_variance = a * s**2 + 1 - a  # x_t ~ N(√ᾱ m, ᾱ s² + 1 − ᾱ)
    exact_score = -(sample - a.sqrt() * m) / marginal_variance
    conditional_mean = m + s**2 * a.sqrt() / marginal_variance * (sample - a.sqrt() * m)

    tweedie = convert_prediction(exact_score, sample, alphas_cumprod_t, "score", "sample")
    torch.testing.assert_close(tweedie, conditional_mean, rtol=1e-10, atol=1e-12)
    # the mixture oracle's score of a one-component mixture is the same exact score
    mixture = GaussianMixture([[m]], stds=s)
    torch.testing.assert_close(mixture.score(sample, alphas_cumprod_t), exact_score, rtol=1e-10, atol=1e-12)


def test_tweedie_formula_for_a_mixture(generator):
    """For a two-component mixture: Tweedie from the oracle's score (checked against autograd of log q(x_t)) equals
    E[x_0 | x_t] = Σ_k r_k(x_t) E[x_0 | x_t, k], each component's Gaussian conditional mean."""
    mixture = GaussianMixture([[-1.0, 0.5], [0.8, -0.3]], stds=[[0.2, 0.4], [0.5, 0.1]], weights=[0.3, 0.7])
    alphas_cumprod_t = ALPHAS_CUMPROD[torch.tensor([50, 300, 700])]
    sample = torch.randn(3, 2, generator=generator, dtype=torch.float64).requires_grad_(True)
    autograd_score = torch.autograd.grad(mixture.log_prob(sample, alphas_cumprod_t).sum(), sample)[0]
    sample = sample.detach()
    score = mixture.score(sample, alphas_cumprod_t)
    torch.testing.assert_close(score, autograd_score)

    a = alphas_cumprod_t[:, None, None]  # [N, 1, 1] against components [K, D]
    marginal_variance = a * mixture.stds**2 + 1 - a
    component_means = mixture.means + mixture.stds**2 * a.sqrt() / marginal_variance * (
        sample[:, None] - a.sqrt() * mixture.means
    )
    log_joint, _, _ = mixture.component_log_joint(sample, alphas_cumprod_t)
    responsibilities = torch.softmax(log_joint, dim=1)[:, :, None]
    expected = (responsibilities * component_means).sum(1)
    torch.testing.assert_close(convert_prediction(score, sample, alphas_cumprod_t, "score", "sample"), expected)


def test_bad_prediction_types_are_named():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="from_type"):
        convert_prediction(x, x, 0.5, "noise", "sample")
    with pytest.raises(ValueError, match="to_type"):
        convert_prediction(x, x, 0.5, "sample", "x0")
    with pytest.raises(ValueError, match="prediction_type"):
        training_target(x, x, x, 0.5, "flow")
