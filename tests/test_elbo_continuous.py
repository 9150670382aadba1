"""The continuous-time ELBO L∞ (VDM) on a Gaussian, where its value per image is a one-dimensional integral.

For x_0 ~ N(m, s² I) the optimal denoiser is linear, x̂(x_t) = m + k (x_t − α m) with k = α s² / (α² s² + σ²), so
E_ε‖x − x̂(α x + σ ε)‖² = (1 − k α)² ‖x − m‖² + k² σ² D, and every term of −L∞ of a fixed x is exact up to a
Gauss-Legendre quadrature over t. The estimator, the discrete ELBO of the package and the schedule interface are
checked against that.
"""

import math

import numpy as np
import pytest
import torch

from hvae_diffusion import HVAEScheduler
from hvae_diffusion.continuous_elbo import estimate_continuous_elbo, low_discrepancy_times
from hvae_diffusion.continuous_schedule import (
    DiscreteLogSNRSpline,
    alphas_cumprod_from_log_snr,
    log_snr_and_derivative,
)
from hvae_diffusion.elbo_estimation import estimate_elbo
from hvae_diffusion.parameterization import PREDICTION_TYPES, convert_prediction
from hvae_diffusion.testing import ExactMixtureDenoiser, GaussianMixture

MEAN, STD, DIM = 0.3, 0.2, 4
GAUSSIAN = GaussianMixture([[MEAN] * DIM], stds=STD)
POINTS = MEAN + STD * torch.randn(3, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


class LinearLogSNR:
    """λ(t) = λ_max + (λ_min − λ_max) t, with its derivative: a smooth schedule with the endpoints fixed."""

    def __init__(self, maximum=7.0, minimum=-8.0):
        self.maximum, self.minimum = maximum, minimum

    def __call__(self, t):
        return self.maximum + (self.minimum - self.maximum) * torch.as_tensor(t, dtype=torch.float64)

    def derivative(self, t):
        return torch.full_like(torch.as_tensor(t, dtype=torch.float64), self.minimum - self.maximum)


SCHEDULE = LinearLogSNR()


def squared_error(points, log_snr):
    """E_ε‖x − x̂(x_t)‖² of the optimal denoiser of GAUSSIAN at log-SNR λ, ``[n, len(λ)]``."""
    alpha_squared, sigma_squared = torch.sigmoid(log_snr), torch.sigmoid(-log_snr)
    gain = alpha_squared.sqrt() * STD**2 / (alpha_squared * STD**2 + sigma_squared)
    distance = ((points - MEAN) ** 2).sum(1, keepdim=True)
    return (1 - gain * alpha_squared.sqrt()) ** 2 * distance + gain**2 * sigma_squared * DIM


def exact_negative_elbo(points, schedule=SCHEDULE):
    """−L∞ per point in nats/dim: prior KL + expected decoder NLL (variance σ²(0)) + the diffusion loss."""
    nodes, weights = np.polynomial.legendre.leggauss(200)
    times = torch.from_numpy((nodes + 1) / 2)
    log_snr = schedule(times)
    integrand = -0.5 * schedule.derivative(times) * log_snr.exp() * squared_error(points, log_snr)
    diffusion = (integrand * torch.from_numpy(weights / 2)).sum(1)
    start = schedule(torch.zeros(1, dtype=torch.float64))
    decoder_variance = torch.sigmoid(-start)
    decoder = 0.5 * DIM * torch.log(2 * math.pi * decoder_variance) + squared_error(points, start)[:, 0] / (
        2 * decoder_variance
    )
    end = schedule(torch.ones(1, dtype=torch.float64))
    alpha_squared, sigma_squared = torch.sigmoid(end), torch.sigmoid(-end)
    prior = 0.5 * (alpha_squared * points**2 + sigma_squared - 1 - sigma_squared.log()).sum(1)
    return (prior + decoder + diffusion) / DIM


def oracle(prediction_type, schedule=SCHEDULE):
    """The exact denoiser of GAUSSIAN at continuous time t, predicting ``prediction_type``."""

    def denoiser(sample, t):
        alphas_cumprod = alphas_cumprod_from_log_snr(schedule(t))
        score = GAUSSIAN.score(sample, alphas_cumprod)
        return convert_prediction(score, sample.double(), alphas_cumprod, "score", prediction_type)

    return denoiser


@pytest.mark.parametrize(
    "prediction_type, time_sampling", [(p, "uniform") for p in PREDICTION_TYPES] + [("epsilon", "log_snr")]
)
def test_estimate_is_unbiased_and_its_standard_error_calibrated(prediction_type, time_sampling):
    repeats = 600
    result = estimate_continuous_elbo(
        SCHEDULE,
        oracle(prediction_type),
        POINTS.repeat(repeats, 1),
        prediction_type,
        num_function_evaluations=20,
        num_replicates=4,
        generator=torch.Generator().manual_seed(1),
        batch_size=1 << 16,
        discrete=False,
        show_progress=False,
        time_sampling=time_sampling,
    )
    nats = result.bits_per_dim.reshape(repeats, -1) * math.log(2)
    reported = (result.standard_error.reshape(repeats, -1) * math.log(2)) ** 2
    truth = exact_negative_elbo(POINTS)
    spread = nats.std(0)
    assert bool(((nats.mean(0) - truth).abs() < 4 * spread / math.sqrt(repeats)).all()), (nats.mean(0), truth)
    ratio = reported.mean(0) / spread**2
    assert bool(((ratio > 0.8) & (ratio < 1.25)).all()), ratio
    # the terms add up to the total
    total = result.prior_matching + result.reconstruction + result.diffusion_loss
    torch.testing.assert_close(total, result.bits_per_dim)


def test_discrete_elbo_converges_to_the_continuous_one_as_the_number_of_latents_grows(single_thread):
    """Chains of T latents at t_i = i / (T − 1) of the same schedule, decoder variance 1 − ᾱ(0) ("fixed_large")."""
    points = POINTS.repeat(200, 1)
    truth = float(exact_negative_elbo(points).mean())
    gaps = []
    for num_latents in (4, 16, 64):
        alphas_cumprod = alphas_cumprod_from_log_snr(SCHEDULE(torch.linspace(0, 1, num_latents, dtype=torch.float64)))
        alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
        scheduler = HVAEScheduler.from_alphas(alphas.tolist(), variance_type="fixed_large")
        denoiser = ExactMixtureDenoiser([[MEAN] * DIM], stds=STD, alphas_cumprod=scheduler.alphas_cumprod.tolist())
        result = estimate_elbo(
            scheduler,
            denoiser,
            points,
            "full",
            generator=torch.Generator().manual_seed(2),
            batch_size=1 << 16,
            discrete=False,
            show_progress=False,
        )
        gaps.append((result.dataset_bits_per_dim * math.log(2) - truth, result.dataset_standard_error * math.log(2)))
    (gap4, _), (gap16, _), (gap64, error64) = gaps
    # the discrete bound is looser, and the gap falls about as 1/T
    assert gap4 > gap16 > 3 * error64 and gap16 > 2.5 * gap64, gaps
    assert abs(gap64) < gap16 / 2.5 + 3 * error64, gaps


def test_low_discrepancy_times_cover_each_stratum_once():
    times = low_discrepancy_times(5, 3, 8, torch.Generator().manual_seed(0))
    assert times.shape == (5, 3, 8)
    strata = (times * 8).floor()
    assert torch.equal(strata, torch.arange(8, dtype=torch.float64).expand_as(strata))
    # one shift per replicate, independent across replicates and images
    shifts = times[..., 0] * 8
    assert len(shifts.unique()) == 15


def test_autograd_derivative_of_a_schedule_without_one_matches_its_analytic_derivative():
    t = torch.linspace(0, 1, 7, dtype=torch.float64)

    def bare(time):
        return SCHEDULE(time) + torch.sin(3 * time)

    with torch.no_grad():  # evaluation: plain values
        value, slope = log_snr_and_derivative(bare, t)
    torch.testing.assert_close(slope, SCHEDULE.derivative(t) + 3 * torch.cos(3 * t))
    assert not value.requires_grad and not slope.requires_grad
    # under gradient mode the derivative keeps its graph to the schedule's parameters (a learned schedule)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    _, slope = log_snr_and_derivative(lambda time: scale * bare(time), t)
    slope.sum().backward()
    torch.testing.assert_close(scale.grad, (SCHEDULE.derivative(t) + 3 * torch.cos(3 * t)).sum())


def test_spline_of_a_discrete_schedule_passes_through_every_knot_and_is_twice_continuously_differentiable():
    scheduler = HVAEScheduler(num_train_timesteps=50)
    spline = DiscreteLogSNRSpline(scheduler.alphas_cumprod)
    knots = torch.linspace(0, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(alphas_cumprod_from_log_snr(spline(knots)), scheduler.alphas_cumprod)
    torch.testing.assert_close(spline.timestep(knots), torch.arange(50, dtype=torch.float64))
    # λ′ is continuous at the knots (a linear interpolation's jumps there by a few percent)
    step = 1e-7
    left, right = spline.derivative(knots[1:-1] - step), spline.derivative(knots[1:-1] + step)
    assert float(((left - right) / right).abs().max()) < 1e-5
    assert bool((spline.derivative(torch.linspace(0, 1, 2001, dtype=torch.float64)) < 0).all())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_function_evaluations must be a multiple of num_replicates"):
        estimate_continuous_elbo(SCHEDULE, oracle("score"), POINTS, "score", 21, 5, show_progress=False)
    with pytest.raises(ValueError, match="num_replicates"):
        estimate_continuous_elbo(SCHEDULE, oracle("score"), POINTS, "score", 20, 0, show_progress=False)
    with pytest.raises(ValueError, match="time_sampling must be one of"):
        estimate_continuous_elbo(
            SCHEDULE, oracle("score"), POINTS, "score", 20, time_sampling="t", show_progress=False
        )
    with pytest.raises(ValueError, match="prediction_type"):
        estimate_continuous_elbo(SCHEDULE, oracle("score"), POINTS, "x0", 20, show_progress=False)
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiscreteLogSNRSpline([0.9, 0.95])


def test_log_snr_uniform_times_make_the_log_snr_uniform_and_weigh_by_dt_du():
    from hvae_diffusion.continuous_elbo import log_snr_uniform_times

    spline = DiscreteLogSNRSpline(HVAEScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod)
    uniform = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    times, slope = log_snr_uniform_times(spline, uniform)
    ends = spline(torch.tensor([0.0, 1.0], dtype=torch.float64))
    fractions = (ends[0] - spline(times)) / (ends[0] - ends[1])
    assert float((fractions - uniform).abs().max()) < 2e-3
    # E_u[dt/du] = 1 (the t interval), and dt/du = 1/|du/dt| = (λ(0) − λ(1)) / |λ′(t)|
    assert float(slope.mean()) == pytest.approx(1.0, abs=1e-3)
    relative = slope * -spline.derivative(times) / (ends[0] - ends[1]) - 1
    assert float(relative.abs().median()) < 0.01
