"""The probability-flow ODE likelihood on the exact Gaussian mixture, whose density at every t is closed form.

The ODE starts at the first latent (t = 0, ᾱ = ᾱ_0 of the table), so with the exact score its log p(x) must equal
the mixture's log q(x_0 = x) at ᾱ_0 (``GaussianMixture.log_prob(x, ᾱ_0)``), up to the solver's error and the
prior's mismatch at t = 1 (ᾱ_{T−1} ≈ 4e-5: negligible).
"""

import math

import pytest
import torch

from hvae_diffusion import HVAEScheduler
from hvae_diffusion.continuous_schedule import (
    DiscreteLogSNRSpline,
    alphas_cumprod_from_log_snr,
    continuous_time_denoiser,
)
from hvae_diffusion.elbo_estimation import estimate_elbo
from hvae_diffusion.likelihood_ode import ode_log_likelihood
from hvae_diffusion.parameterization import convert_prediction
from hvae_diffusion.testing import ExactMixtureDenoiser, GaussianMixture

SCHEDULER = HVAEScheduler()  # linear, T = 1000: a smooth schedule
SPLINE = DiscreteLogSNRSpline(SCHEDULER.alphas_cumprod)
STD = 0.15


def mixture_of(dim):
    means = 0.5 * torch.randn(3, dim, generator=torch.Generator().manual_seed(dim), dtype=torch.float64)
    return GaussianMixture(means, stds=STD)


def oracle(mixture, prediction_type="epsilon"):
    """The exact model at continuous time t, predicting ``prediction_type``."""

    def denoiser(sample, t):
        alphas_cumprod = alphas_cumprod_from_log_snr(SPLINE(t))
        score = mixture.score(sample, alphas_cumprod)
        return convert_prediction(score, sample, alphas_cumprod, "score", prediction_type)

    return denoiser


def points_of(mixture, count, seed=0):
    return mixture.sample(count, torch.Generator().manual_seed(seed))[0]


def nats_per_dim(result):
    return -result.bits_per_dim * math.log(2)


def truth(mixture, points):
    return mixture.log_prob(points, SCHEDULER.alphas_cumprod[0]) / mixture.dim


@pytest.mark.parametrize(
    "dim, prediction_type", [(2, "epsilon"), (2, "sample"), (2, "v_prediction"), (2, "score"), (16, "epsilon")]
)
def test_exact_trace_gives_every_image_within_a_hundredth_of_a_nat_per_dim(dim, prediction_type):
    mixture = mixture_of(dim)
    points = points_of(mixture, 24)
    result = ode_log_likelihood(
        SPLINE, oracle(mixture, prediction_type), points, prediction_type, divergence="exact", show_progress=False
    )
    error = nats_per_dim(result) - truth(mixture, points)
    assert float(error.abs().max()) < 0.01, error
    # a reference integration of this mixture needs about 120 evaluations at rtol = atol = 1e-5
    assert int(result.num_function_evaluations.max()) <= 150
    assert bool((result.standard_error == 0).all()) and result.divergence == "exact"


def test_hutchinson_dataset_mean_is_within_two_standard_errors_and_its_per_image_error_is_calibrated():
    mixture = mixture_of(16)
    points = points_of(mixture, 48, seed=1)
    result = ode_log_likelihood(
        SPLINE,
        oracle(mixture),
        points,
        divergence="hutchinson",
        num_probes=4,
        generator=torch.Generator().manual_seed(0),
        show_progress=False,
    )
    error = nats_per_dim(result) - truth(mixture, points)
    assert abs(float(error.mean())) < 2 * result.dataset_standard_error * math.log(2)
    # the probes are the only noise: their spread per image is the size of the error
    ratio = float(error.pow(2).mean() / (result.standard_error * math.log(2)).pow(2).mean())
    assert 0.4 < ratio < 2.5, ratio
    assert float(error.abs().max()) > 0.02  # one image's probes do not give 0.01: the per-image SE is needed


def test_ode_is_clearly_tighter_than_the_discrete_elbo():
    mixture = mixture_of(2)
    points = points_of(mixture, 24, seed=2)
    ode = ode_log_likelihood(SPLINE, oracle(mixture), points, show_progress=False)
    denoiser = ExactMixtureDenoiser(mixture.means.tolist(), STD, alphas_cumprod=SCHEDULER.alphas_cumprod.tolist())
    bound = estimate_elbo(
        SCHEDULER,
        denoiser,
        points.repeat(40, 1),
        "full",
        generator=torch.Generator().manual_seed(0),
        batch_size=1 << 14,
        discrete=False,
        show_progress=False,
    )
    # per image: ODE log p minus the ELBO averaged over its 40 estimates (x_t draws), so the image spread cancels
    elbo_nats = -(bound.bits_per_dim * math.log(2)).reshape(40, -1).mean(0)
    gap = nats_per_dim(ode) - elbo_nats
    assert float(gap.mean()) > 0.3 + 3 * float(gap.std() / math.sqrt(len(gap))), gap


def test_fixed_grid_spends_the_same_evaluations_on_every_image_and_converges():
    mixture = mixture_of(2)
    points = points_of(mixture, 16, seed=3)
    errors = []
    for num_steps in (20, 80):
        result = ode_log_likelihood(
            SPLINE, oracle(mixture), points, solver="fixed", num_steps=num_steps, batch_size=10, show_progress=False
        )
        assert bool((result.num_function_evaluations == 2 * num_steps).all())
        errors.append(float((nats_per_dim(result) - truth(mixture, points)).abs().max()))
    assert errors[1] < errors[0] / 4 and errors[1] < 0.03, errors


def bin_log_probability(mixture, points, alphas_cumprod):
    """log Q(bin of x) under the mixture at ᾱ: each component is a diagonal Gaussian, a product of CDF differences."""
    means = alphas_cumprod**0.5 * mixture.means
    stds = (alphas_cumprod * mixture.stds**2 + 1 - alphas_cumprod).sqrt()
    normal = torch.distributions.Normal(means, stds)
    upper, lower = points.unsqueeze(1) + 1 / 255, points.unsqueeze(1) - 1 / 255
    log_bins = (normal.cdf(upper) - normal.cdf(lower)).log().sum(-1)
    return torch.logsumexp(mixture.weights.log() + log_bins, dim=1)


def test_dequantized_8_bit_bits_bound_the_exact_bin_probability_from_above_and_closely():
    mixture = mixture_of(2)
    points = points_of(mixture, 200, seed=4)
    points = ((points.clamp(-0.95, 0.95) + 1) * 127.5).round() / 127.5 - 1
    result = ode_log_likelihood(
        SPLINE,
        oracle(mixture),
        points,
        dequantize=True,
        generator=torch.Generator().manual_seed(0),
        batch_size=200,
        show_progress=False,
    )
    exact_bits = -bin_log_probability(mixture, points, SCHEDULER.alphas_cumprod[0]) / (2 * math.log(2))
    gap = result.bits_per_dim - exact_bits
    # Jensen: E_u[−log p(x + u)] − D log(2/255) ≥ −log P(bin); the bins are narrow next to the components
    assert float(gap.mean()) > -2 * float(gap.std() / math.sqrt(len(gap)))
    assert abs(float(gap.mean())) < 0.01, float(gap.mean())
    assert result.dequantized


def test_a_discrete_model_is_called_at_fractional_timesteps():
    calls = []

    def denoiser(sample, timesteps):
        calls.append(timesteps)
        return torch.zeros_like(sample)

    model = continuous_time_denoiser(denoiser, 1000)
    model(torch.zeros(2, 3, dtype=torch.float16), torch.tensor([0.0, 0.5], dtype=torch.float64))
    assert calls[0].dtype == torch.float32 and calls[0].tolist() == [0.0, 499.5]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"divergence": "trace"}, "divergence must be one of"),
        ({"solver": "euler"}, "solver must be one of"),
        ({"rtol": 0}, "rtol"),
        ({"num_probes": 0}, "num_probes"),
        ({"num_steps": 1.5}, "num_steps"),
        ({"prediction_type": "x0"}, "prediction_type"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    mixture = mixture_of(2)
    with pytest.raises(ValueError, match=match):
        ode_log_likelihood(SPLINE, oracle(mixture), points_of(mixture, 2), **kwargs, show_progress=False)


def tiny_class_conditional_pipeline(prediction_type="v_prediction"):
    from diffusers import UNet2DModel

    from hvae_diffusion.pipelines import ClassifierFreeGuidancePipeline

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=4,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 8),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=3,
    ).eval()
    scheduler = HVAEScheduler(num_train_timesteps=50, prediction_type=prediction_type)
    return ClassifierFreeGuidancePipeline(unet=unet, scheduler=scheduler)


def test_hvae_evaluate_likelihood_reports_the_pipelines_unconditional_model_at_fractional_timesteps():
    from hvae_diffusion.commands import evaluate

    pipe = tiny_class_conditional_pipeline()
    images = torch.randint(0, 256, (3, 1, 4, 4), generator=torch.Generator().manual_seed(0)) / 127.5 - 1
    args = evaluate.parse_args(
        ["--pipeline_dir", "unused", "--output_dir", "unused", "--likelihood", "ode", "continuous"]
        + ["--ode_solver", "fixed", "--ode_num_steps", "3", "--ode_num_probes", "2", "--continuous_nfe", "6"]
        + ["--continuous_replicates", "2", "--ode_divergence", "hutchinson"]
    )
    evaluate.check_likelihood_arguments(args)
    ode = evaluate.likelihood_report(pipe, images, "ode", args)
    assert ode["num_function_evaluations_per_image"] == 6 and ode["dequantized"] and "dequantized" in ode["summary"]
    assert ode["bits_per_image"] == pytest.approx(16 * ode["bits_per_dim"])

    # the same number from the library with the UNet called by hand: the null label (2), timestep t (T − 1)
    def by_hand(sample, t):
        null = torch.full((len(sample),), 2, dtype=torch.long)
        return pipe.unet(sample.float(), (t * 49).float(), class_labels=null).sample

    direct = ode_log_likelihood(
        pipe_spline(pipe),
        by_hand,
        images,
        "v_prediction",
        divergence="hutchinson",
        num_probes=2,
        solver="fixed",
        num_steps=3,
        dequantize=True,
        generator=torch.Generator().manual_seed(0),
        show_progress=False,
    )
    assert ode["bits_per_dim"] == pytest.approx(direct.dataset_bits_per_dim, rel=1e-5)
    continuous = evaluate.likelihood_report(pipe, images, "continuous", args)
    assert continuous["num_function_evaluations_per_image"] == 6 and math.isfinite(continuous["bits_per_dim"])


def pipe_spline(pipe):
    return DiscreteLogSNRSpline(pipe.scheduler.alphas_cumprod)


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--ode_rtol", "0"], "--ode_rtol must be a finite number > 0 and < 1, got 0"),
        (["--ode_num_probes", "0"], "--ode_num_probes must be >= 1"),
        (["--continuous_nfe", "21"], "--continuous_nfe must be a multiple of --continuous_replicates=5"),
    ],
)
def test_hvae_evaluate_refuses_bad_likelihood_flags_before_any_work(tmp_path, flags, match):
    from hvae_diffusion.commands import evaluate

    with pytest.raises(ValueError, match=match):
        evaluate.main(
            ["--pipeline_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "eval"), "--likelihood"]
            + ["ode", *flags]
        )
