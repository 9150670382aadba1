"""The sampled-t ELBO estimators against the full chain, on the exact Gaussian-mixture denoiser.

With the exact denoiser every (image, latent) term is a known function, so the only randomness is the estimator's
own (t and x_t). Many independent estimates of the same images are made in one call (the images repeated), and
compared with the full chain averaged over as many x_t draws.
"""

import math

import numpy as np
import pytest
import torch

from hvae_diffusion import HVAEScheduler
from hvae_diffusion.elbo import elbo_terms
from hvae_diffusion.elbo_estimation import (
    BPD_ESTIMATORS,
    estimate_elbo,
    importance_proposal,
    per_image_standard_error,
    pilot_chain_indices,
    stratified_timestep_draws,
    stratum_of_draws,
)
from hvae_diffusion.testing import ExactMixtureDenoiser

# 12 dimensions: the per-latent KLs are chi-square-like in x_t, and more dimensions make them less heavy-tailed
MEANS = 0.5 * torch.randn(2, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
IMAGES = MEANS[[0, 1, 0]] + 0.3 * torch.randn(3, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
SAMPLED = ("uniform", "stratified", "importance")


@pytest.fixture(scope="module")
def oracle():
    scheduler = HVAEScheduler(num_train_timesteps=30, beta_schedule="linear", beta_start=1e-3, beta_end=0.3)
    denoiser = ExactMixtureDenoiser(means=MEANS.tolist(), stds=0.3, alphas_cumprod=scheduler.alphas_cumprod.tolist())
    return scheduler, denoiser


def repeated_estimates(scheduler, denoiser, estimator, repeats, nfe=None, seed=0):
    """``repeats`` independent estimates of each of IMAGES: bits/dim and per-image SE, ``[repeats, n]`` each."""
    result = estimate_elbo(
        scheduler,
        denoiser,
        IMAGES.repeat(repeats, 1),
        estimator,
        nfe,
        generator=torch.Generator().manual_seed(seed),
        batch_size=1 << 16,
        discrete=False,
        num_pilot_images=4,
        show_progress=False,
    )
    shape = (repeats, IMAGES.shape[0])
    return result.bits_per_dim.reshape(shape), result.standard_error.reshape(shape), result


@pytest.fixture(scope="module")
def full_chain_mean(oracle):
    """The full chain's expected bits/dim per image (averaged over x_t draws) and its standard error."""
    bits, _, _ = repeated_estimates(*oracle, "full", 3000)
    return bits.mean(0), bits.std(0) / math.sqrt(bits.shape[0])


def test_full_chain_agrees_with_the_schedulers_elbo_terms(oracle, full_chain_mean):
    scheduler, denoiser = oracle
    repeats = 1000
    terms = elbo_terms(
        scheduler, denoiser, IMAGES.repeat(repeats, 1), generator=torch.Generator().manual_seed(1), discrete=False
    )
    reference = terms.bits_per_dim.reshape(repeats, -1)
    mean, standard_error = full_chain_mean
    combined = torch.sqrt(standard_error**2 + reference.var(0) / repeats)
    assert (mean - reference.mean(0)).abs().max() < 4 * combined.max()


@pytest.mark.parametrize("estimator", SAMPLED)
def test_sampled_estimators_are_unbiased_and_their_standard_error_is_calibrated(oracle, full_chain_mean, estimator):
    scheduler, denoiser = oracle
    repeats = 8000
    bits, standard_error, result = repeated_estimates(scheduler, denoiser, estimator, repeats, nfe=7)
    assert result.num_function_evaluations == result.num_pilot_function_evaluations + 7 * bits.numel()
    truth, truth_error = full_chain_mean
    empirical_variance = bits.var(0)
    # unbiased: the mean of many estimates equals the full chain's within their joint standard error
    z = (bits.mean(0) - truth) / torch.sqrt(truth_error**2 + empirical_variance / repeats)
    assert z.abs().max() < 4, (estimator, z)
    # calibrated: the reported variance (SE²) is, on average, the spread of the estimates
    ratio = (standard_error**2).mean(0) / empirical_variance
    assert ((ratio > 0.8) & (ratio < 1.25)).all(), (estimator, ratio)


def test_importance_sampling_beats_uniform_at_equal_cost(oracle):
    # here one latent near t = 0 carries most of the variance: the pilot finds it, a uniform draw rarely does
    scheduler, denoiser = oracle
    spread = {e: repeated_estimates(scheduler, denoiser, e, 1000, nfe=7)[0].var(0) for e in ("uniform", "importance")}
    assert (spread["importance"] < spread["uniform"] / 10).all()


def test_dataset_standard_error_is_the_spread_of_the_per_image_estimates(oracle):
    bits, _, result = repeated_estimates(*oracle, "importance", 5, nfe=5)
    flat = bits.reshape(-1)
    assert result.dataset_bits_per_dim == pytest.approx(float(flat.mean()))
    assert result.dataset_standard_error == pytest.approx(float(flat.std() / math.sqrt(flat.numel())))
    summary = result.to_dict()
    assert summary["standard_error"] == pytest.approx(result.dataset_standard_error)
    assert summary["num_function_evaluations_per_image"] == pytest.approx(
        5 + 4 * len(pilot_chain_indices(29, 32)) / flat.numel()
    )


def test_full_chain_terms_sum_to_its_bits_per_dim(oracle):
    _, _, result = repeated_estimates(*oracle, "full", 1)
    assert result.denoising_terms.shape == (3, 29)
    total = result.prior_matching + result.reconstruction + result.denoising_terms.sum(1)
    torch.testing.assert_close(total, result.bits_per_dim)
    assert bool((result.standard_error > 0).all())  # the x_t noise, from successive differences
    assert result.to_dict()["num_function_evaluations_per_image"] == 30


def test_stratified_draws_cover_every_stratum_twice():
    strata, bounds = stratum_of_draws(num_latents=10, num_draws=7)
    assert bounds.tolist() == [0, 3, 6, 10]
    assert torch.bincount(strata).tolist() == [3, 2, 2]
    indices, weights = stratified_timestep_draws(10, 7, 500, torch.Generator().manual_seed(0))
    for stratum, (low, high) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        drawn = indices[:, strata == stratum]
        assert drawn.min() == low and drawn.max() == high - 1
    # Σ_k w_k = N: a constant L_t is estimated exactly
    torch.testing.assert_close(weights.sum(1), torch.full((500,), 10.0, dtype=torch.float64))


def test_per_image_standard_error_of_a_constant_is_zero_and_of_two_draws_is_exact():
    weights = torch.full((1, 4), 2.5, dtype=torch.float64)
    assert per_image_standard_error(torch.ones(1, 4, dtype=torch.float64), weights).item() == 0.0
    # two draws y1, y2 of N L_t: SE² = s² / 2 = (y1 − y2)² / 4
    terms = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    standard_error = per_image_standard_error(terms, torch.full((1, 2), 5.0, dtype=torch.float64))
    assert standard_error.item() == pytest.approx(math.sqrt((10.0 - 30.0) ** 2 / 4))


def test_pilot_indices_are_geometric_from_both_ends_of_the_chain():
    indices = pilot_chain_indices(1000, 32).tolist()
    assert indices[:4] == [0, 1, 2, 3] and indices[-4:] == [996, 997, 998, 999]
    assert 24 <= len(indices) <= 32 and indices == sorted(set(indices))
    # sparse in the middle, dense at the ends
    gaps = np.diff(indices)
    assert gaps.max() > 50 * gaps[:3].max()


def test_importance_proposal_is_proportional_to_the_root_mean_square_with_a_uniform_floor():
    pilot = torch.tensor([[1.0, 3.0, 0.0, 4.0], [1.0, 4.0, 0.0, 3.0]], dtype=torch.float64)
    proposal = importance_proposal(np.arange(4), pilot, num_latents=4, uniform_fraction=0.2)
    root_mean_square = torch.tensor([1.0, math.sqrt(12.5), 0.0, math.sqrt(12.5)], dtype=torch.float64)
    expected = 0.8 * root_mean_square / root_mean_square.sum() + 0.2 / 4
    torch.testing.assert_close(proposal, expected)
    assert (proposal > 0).all()


@pytest.mark.parametrize(
    "estimator, nfe, match",
    [
        ("exhaustive", 5, "estimator must be one of"),
        ("uniform", None, "num_function_evaluations must be an int in \\[2, 30\\]"),
        ("uniform", 1, "num_function_evaluations must be an int in \\[2, 30\\]"),
        ("importance", 31, "num_function_evaluations must be an int in \\[2, 30\\]"),
        ("stratified", 2, "num_function_evaluations must be an int in \\[3, 30\\]"),
        ("uniform", 4.0, "num_function_evaluations must be an int"),
    ],
)
def test_bad_arguments_are_named(oracle, estimator, nfe, match):
    with pytest.raises(ValueError, match=match):
        estimate_elbo(*oracle, IMAGES, estimator, nfe, show_progress=False)


def test_bad_samples_are_named(oracle):
    with pytest.raises(ValueError, match="samples must be a non-empty tensor"):
        estimate_elbo(*oracle, IMAGES.numpy(), "full", show_progress=False)
    assert set(BPD_ESTIMATORS) == {"full", *SAMPLED}
