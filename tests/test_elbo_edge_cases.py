"""The ELBO estimators at their edges: what the per-image standard errors cover, the full chain's x_t noise, the
importance sampler's reusable pilot, zero terminal SNR, a chain of one latent and half-precision weights.

Each test reproduces a finding on the exact Gaussian-mixture denoiser (``hvae_diffusion.testing``).
"""

import math

import pytest
import torch

from hvae_diffusion import HVAEScheduler
from hvae_diffusion.elbo_estimation import estimate_elbo, pilot_chain_indices, successive_difference_variance
from hvae_diffusion.models import MLPDenoiser
from hvae_diffusion.parameterization import PREDICTION_TYPES
from hvae_diffusion.testing import ExactMixtureDenoiser, GaussianMixture

MEANS = 0.5 * torch.randn(2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
STD = 0.1
IMAGES = MEANS[[0, 1, 0]] + STD * torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def oracle(scheduler, prediction_type="epsilon"):
    return ExactMixtureDenoiser(
        MEANS.tolist(), STD, alphas_cumprod=scheduler.alphas_cumprod.tolist(), prediction_type=prediction_type
    )


def repeated(scheduler, estimator, repeats, nfe=None, **kwargs):
    result = estimate_elbo(
        scheduler,
        oracle(scheduler),
        IMAGES.repeat(repeats, 1),
        estimator,
        nfe,
        generator=torch.Generator().manual_seed(0),
        batch_size=1 << 16,
        discrete=False,
        show_progress=False,
        **kwargs,
    )
    shape = (repeats, IMAGES.shape[0])
    return result.bits_per_dim.reshape(shape), result.standard_error.reshape(shape), result


def calibration(bits, standard_error):
    """Mean reported SE² over the empirical variance of the estimates, per image."""
    return (standard_error**2).mean(0) / bits.var(0)


def test_per_image_standard_error_covers_the_decoder_draws_when_there_are_two():
    # in 2 dimensions the decoder's single x_1 draw is a large part of an image's noise
    scheduler = HVAEScheduler(num_train_timesteps=100)
    bits, error, result = repeated(scheduler, "importance", 1500, nfe=12, num_decoder_draws=2)
    ratio = calibration(bits, error)
    assert bool(((ratio > 0.8) & (ratio < 1.25)).all()), ratio
    assert "decoder's 2 x_1 draws" in result.standard_error_covers
    assert result.num_function_evaluations == result.num_pilot_function_evaluations + 12 * bits.numel()
    # with one draw the decoder's noise is left out, and the estimate says so
    bits, error, result = repeated(scheduler, "importance", 1500, nfe=11)
    assert float(calibration(bits, error).min()) < 0.8
    assert "not the decoder's single x_1 draw" in result.standard_error_covers


def test_full_chain_reports_its_x_t_noise():
    scheduler = HVAEScheduler(num_train_timesteps=1000)
    bits, error, result = repeated(scheduler, "full", 150, num_decoder_draws=2)
    assert bool(torch.isfinite(error).all())
    ratio = calibration(bits, error)
    assert bool(((ratio > 0.6) & (ratio < 1.6)).all()), ratio
    assert result.to_dict()["num_function_evaluations_per_image"] == 1001


def test_successive_differences_cancel_a_linear_trend_and_estimate_the_noise():
    generator = torch.Generator().manual_seed(0)
    trend = torch.linspace(0, 50, 301, dtype=torch.float64)
    noisy = trend + 0.5 * torch.randn(4000, 301, generator=generator, dtype=torch.float64)
    assert float(successive_difference_variance(noisy).mean()) == pytest.approx(301 * 0.25, rel=0.02)
    assert float(successive_difference_variance(trend.unsqueeze(0))) < 1e-20
    assert successive_difference_variance(torch.ones(2, 0)).tolist() == [0.0, 0.0]


def test_the_pilot_proposal_is_reused_across_evaluations_of_one_model():
    scheduler = HVAEScheduler(num_train_timesteps=100)
    first = repeated(scheduler, "importance", 4, nfe=11)[2]
    assert first.num_pilot_function_evaluations == 8 * len(pilot_chain_indices(99, 32))
    again = repeated(scheduler, "importance", 4, nfe=11, proposal=first.proposal)[2]
    assert again.num_pilot_function_evaluations == 0 and again.num_function_evaluations == 11 * 12
    assert torch.equal(again.proposal, first.proposal)
    with pytest.raises(ValueError, match="proposal must be a tensor of shape \\[99\\]"):
        repeated(scheduler, "importance", 1, nfe=11, proposal=first.proposal[:-1])
    with pytest.raises(ValueError, match="proposal is the importance sampler's"):
        repeated(scheduler, "uniform", 1, nfe=11, proposal=first.proposal)


@pytest.mark.parametrize(
    "schedule", [{"beta_schedule": "linear"}, {"beta_schedule": "sigmoid"}, {"beta_schedule": "scaled_linear"}]
)
def test_zero_terminal_snr_keeps_alphas_cumprod_monotone_and_every_elbo_term_finite(schedule):
    num_train_timesteps = 2000 if schedule["beta_schedule"] == "scaled_linear" else 1000
    reference = HVAEScheduler(num_train_timesteps=num_train_timesteps, **schedule)
    truth = float(-GaussianMixture(MEANS, STD).log_prob(IMAGES).mean()) / (2 * math.log(2))
    unrescaled = repeated(reference, "full", 4)[2].dataset_bits_per_dim
    for prediction_type in PREDICTION_TYPES:
        scheduler = HVAEScheduler(
            num_train_timesteps=num_train_timesteps,
            rescale_betas_zero_snr=True,
            prediction_type=prediction_type,
            **schedule,
        )
        alphas_cumprod = scheduler.alphas_cumprod
        assert bool((alphas_cumprod[1:] < alphas_cumprod[:-1]).all()) and float(alphas_cumprod[-1]) > 0
        weights = scheduler.loss_weights(torch.arange(num_train_timesteps), "elbo")
        assert bool(torch.isfinite(weights).all() and (weights >= 0).all())
        result = estimate_elbo(
            scheduler,
            oracle(scheduler, prediction_type),
            IMAGES.repeat(4, 1),
            "full",
            generator=torch.Generator().manual_seed(0),
            batch_size=1 << 16,
            discrete=False,
            show_progress=False,
        )
        for term in (result.reconstruction, result.prior_matching, result.denoising_terms):
            assert bool(torch.isfinite(term).all())
        # a bound of the same size as the schedule's without the rescaling, not tens of bits above it
        assert truth - 0.05 < result.dataset_bits_per_dim < unrescaled + 0.2, (prediction_type, result.to_dict())


def test_a_chain_of_one_latent_evaluates():
    scheduler = HVAEScheduler(num_train_timesteps=1, beta_start=0.01, beta_end=0.01)
    result = repeated(scheduler, "full", 2)[2]
    assert bool(torch.isfinite(result.bits_per_dim).all()) and result.denoising_terms.shape == (6, 0)
    torch.testing.assert_close(result.bits_per_dim, result.prior_matching + result.reconstruction)
    assert result.to_dict()["num_function_evaluations_per_image"] == 1
    with pytest.raises(ValueError, match="a chain of one latent has none: use 'full'"):
        repeated(scheduler, "importance", 1, nfe=2)


def test_half_precision_weights_give_the_float32_bound():
    torch.manual_seed(0)
    model = MLPDenoiser(in_channels=2, hidden_dim=32, num_blocks=2).eval()
    scheduler = HVAEScheduler(num_train_timesteps=100)
    images = IMAGES.float().repeat(40, 1)

    def bound(dtype):
        weights = model.to(dtype)
        result = estimate_elbo(
            scheduler,
            lambda sample, timesteps: weights(sample, timesteps),
            images.to(dtype),
            "importance",
            21,
            generator=torch.Generator().manual_seed(0),
            discrete=False,
            show_progress=False,
        )
        return result

    single, half = bound(torch.float32), bound(torch.float16)
    assert math.isfinite(half.dataset_bits_per_dim) and half.bits_per_dim.dtype == torch.float64
    difference = abs(half.dataset_bits_per_dim - single.dataset_bits_per_dim)
    assert difference < 2 * math.hypot(half.dataset_standard_error, single.dataset_standard_error), difference
    full = estimate_elbo(
        scheduler, lambda s, t: model.half()(s, t), images[:3].half(), "full", discrete=False, show_progress=False
    )
    assert bool(torch.isfinite(full.bits_per_dim).all())
