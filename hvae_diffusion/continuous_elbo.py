"""The continuous-time ELBO L∞ of Variational Diffusion Models (Kingma et al. 2021): the limit T → ∞ of the ELBO.

For a log-SNR schedule λ(t) on t ∈ [0, 1] (``continuous_schedule``), x_t = α_t x + σ_t ε with α_t² = sigmoid(λ(t)):

    −L∞(x) = KL(q(x_1 | x) ‖ N(0, I))                                                  (prior matching)
             − E_q(x_0|x)[log p_θ(x | x_0)]                                              (reconstruction)
             − ½ E_{t∼U(0,1)} E_ε[SNR′(t) ‖x − x̂_θ(x_t; t)‖²],   SNR′(t) = λ′(t) e^λ(t) < 0   (diffusion loss)

The diffusion loss is the limit of the sum of the denoising-matching KLs of a chain of T latents spread over [0, 1]
(``elbo``); written in λ it is ½ ∫ e^λ E‖x − x̂_θ‖² dλ over [λ(1), λ(0)], so it depends on the schedule only through
its endpoints (the schedule between them changes the variance of its Monte Carlo estimate, not its value). The
decoder p_θ(x | x_0) is a Gaussian with mean x̂_θ(x_0; 0) and variance σ_0² (the "fixed_large" decoder of the discrete
chain, whose first step has β = 1 − ᾱ(0)), discretized to 8 bits for images in [−1, 1].

The diffusion loss is estimated at low-discrepancy times u ∈ [0, 1) (``low_discrepancy_times``), used as t directly
(``time_sampling="uniform"``, VDM's estimator, whose variance depends on the schedule: the one a learned schedule
minimises) or mapped to t so that λ(t) is uniform between its endpoints (``"log_snr"``): by the invariance above this
is the estimator of the same bound under a linear log-SNR schedule, far less noisy on a fixed schedule whose λ falls
steeply near t = 0 (``log_snr_uniform_times``).

The model may predict any of ``PREDICTION_TYPES``; x̂_θ is converted from its output at the continuous ᾱ(t). The
model is ``denoiser(x_t, t)`` with t float64 times ``[B]``; ``continuous_schedule.continuous_time_denoiser`` wraps a
Diffusers UNet, and ``DiscreteLogSNRSpline`` makes a discrete scheduler's ᾱ table continuous.
"""

import math
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from . import elbo
from .continuous_schedule import alphas_cumprod_from_log_snr, log_snr_and_derivative
from .elbo_estimation import PerImageBitsPerDim
from .forward_process import q_sample
from .parameterization import check_prediction_type, convert_prediction


def diffusion_loss_integrand(original_sample, predicted_original_sample, log_snr_t, log_snr_derivative_t):
    """−½ SNR′(t) ‖x − x̂_θ(x_t; t)‖² per sample (nats), with SNR′(t) = λ′(t) e^λ(t).

    Its mean over t ~ U(0, 1) and x_t ~ q(x_t | x) is the diffusion loss of L∞. In ε terms it is
    −½ λ′(t) ‖ε − ε̂_θ‖² (VDM's ½ γ′(t) ‖ε − ε̂‖²). Differentiable in all four inputs, so a learned schedule can be
    trained through it.
    """
    squared_error = (original_sample - predicted_original_sample).flatten(1).pow(2).sum(dim=1)
    return -0.5 * log_snr_derivative_t * log_snr_t.exp() * squared_error


TIME_SAMPLINGS = ("uniform", "log_snr")


@torch.no_grad()
def log_snr_uniform_times(log_snr, uniform: torch.Tensor, num_grid: int = 8193):
    """Times t = g(u) at which λ(t) is (nearly) uniform on [λ(1), λ(0)], and dt/du, for u in [0, 1).

    g is the piecewise-linear inverse of u(t) = (λ(0) − λ(t)) / (λ(0) − λ(1)) on ``num_grid`` equally spaced t, so
    dt/du is exact for the t drawn and ∫_0^1 f(t) dt = E_u[f(g(u)) dt/du] holds without bias whatever the grid.
    """
    grid = torch.linspace(0.0, 1.0, num_grid, dtype=torch.float64)
    values = log_snr(grid).double().cpu()
    fractions = (values[0] - values) / (values[0] - values[-1])
    if not bool((fractions[1:] > fractions[:-1]).all()):
        raise ValueError("time_sampling='log_snr' needs a strictly decreasing log-SNR schedule λ(t)")
    index = (torch.searchsorted(fractions, uniform, right=True) - 1).clamp(0, num_grid - 2)
    slope = (grid[index + 1] - grid[index]) / (fractions[index + 1] - fractions[index])
    return grid[index] + (uniform - fractions[index]) * slope, slope


def low_discrepancy_times(num_images: int, num_replicates: int, num_points: int, generator=None) -> torch.Tensor:
    """Times ``[n, R, m]`` in [0, 1): replicate r of image i is VDM's low-discrepancy set (h + v_ir) / m, h < m.

    Each set covers [0, 1) evenly with one uniform shift v_ir, so it is unbiased for the mean over t; the R shifts
    are independent, so the spread of the R replicate estimates gives a standard error.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    shifts = torch.rand((num_images, num_replicates, 1), generator=generator, dtype=torch.float64, device=device)
    return (torch.arange(num_points, dtype=torch.float64) + shifts.cpu()) / num_points


@dataclass
class ContinuousELBOEstimate(PerImageBitsPerDim):
    """An estimate of −L∞ of n images, in bits/dim unless stated.

    Attributes:
        bits_per_dim: −L∞ per image, the mean of its replicates, ``[n]``.
        standard_error: per image, std(replicates) / √R: it covers everything sampled (t, every x_t and the
            decoder's x_0), NaN for one replicate, ``[n]``.
        prior_matching, reconstruction, diffusion_loss: the three terms per image, ``[n]``
            (KL, −log p_θ(x | x_0), the diffusion loss).
        num_function_evaluations: denoiser forwards spent in all.
        num_replicates: R.
    """

    bits_per_dim: torch.Tensor
    standard_error: torch.Tensor
    prior_matching: torch.Tensor
    reconstruction: torch.Tensor
    diffusion_loss: torch.Tensor
    num_function_evaluations: int
    num_replicates: int

    def to_dict(self) -> dict:
        """JSON-ready summary in the keys of ``ELBOEstimate.to_dict`` (estimator ``"continuous"``)."""
        standard_error = self.dataset_standard_error
        return {
            "estimator": "continuous",
            "bits_per_dim": self.dataset_bits_per_dim,
            "standard_error": None if math.isnan(standard_error) else standard_error,
            "prior_matching": float(self.prior_matching.mean()),
            "reconstruction": float(self.reconstruction.mean()),
            "diffusion_loss": float(self.diffusion_loss.mean()),
            "num_samples": self.bits_per_dim.numel(),
            "num_replicates": self.num_replicates,
            "num_function_evaluations": self.num_function_evaluations,
            "num_function_evaluations_per_image": self.num_function_evaluations / self.bits_per_dim.numel(),
        }


def _check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@torch.no_grad()
def estimate_continuous_elbo(
    log_snr,
    denoiser,
    samples: torch.Tensor,
    prediction_type: str = "epsilon",
    num_function_evaluations: int = 50,
    num_replicates: int = 5,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    discrete: bool = True,
    decoder_log_variance: float | None = None,
    show_progress: bool = True,
    time_sampling: str = "uniform",
) -> ContinuousELBOEstimate:
    """Estimate −L∞ in bits/dim of each image and of the dataset, with standard errors.

    Each image gets R replicates; each replicate draws m = NFE / R − 1 low-discrepancy times
    (``low_discrepancy_times``), a fresh x_t at each, and a fresh x_0 for the decoder term. The terms are computed
    in float64 whatever the model's precision.

    Args:
        log_snr: the schedule λ(t) (``continuous_schedule``), e.g. ``DiscreteLogSNRSpline(scheduler.alphas_cumprod)``.
        denoiser: ``denoiser(x_t, t)``, t float64 times ``[B]`` in [0, 1], returning the model output in
            ``prediction_type`` (a tensor or an object with ``.sample``); called with x_t in ``samples``' dtype.
        samples: x, ``[n, ...]`` (8-bit values in [−1, 1] when ``discrete``).
        prediction_type: what the model predicts, one of ``PREDICTION_TYPES``.
        num_function_evaluations: forwards per image, a multiple of ``num_replicates`` and at least 2 per replicate.
        num_replicates: R ≥ 1 independent low-discrepancy sets per image (the standard error needs R ≥ 2).
        decoder_log_variance: log of the decoder's variance; default log σ²(0).
        time_sampling: ``"uniform"`` (t = u) or ``"log_snr"`` (λ(t) uniform, ``log_snr_uniform_times``).
    """
    check_prediction_type(prediction_type)
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
    if not isinstance(samples, torch.Tensor) or samples.ndim < 2 or samples.shape[0] == 0:
        raise ValueError(f"samples must be a non-empty tensor [n, ...], got {type(samples).__name__}")
    _check_positive_int("num_replicates", num_replicates)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("num_function_evaluations", num_function_evaluations, 2)
    if num_function_evaluations % num_replicates or num_function_evaluations < 2 * num_replicates:
        raise ValueError(
            f"num_function_evaluations must be a multiple of num_replicates={num_replicates} and at least "
            f"{2 * num_replicates} (per replicate: the decoder and one time or more), got {num_function_evaluations}"
        )
    num_images = samples.shape[0]
    num_points = num_function_evaluations // num_replicates - 1
    compute = torch.float64
    device = samples.device
    endpoints = torch.tensor([0.0, 1.0], dtype=torch.float64, device=device)
    log_snr_endpoints = log_snr(endpoints).to(compute)
    if decoder_log_variance is None:
        decoder_log_variance = float(torch.nn.functional.logsigmoid(-log_snr_endpoints[0]))

    # pairs (image, time, is decoder): the m times of each replicate, then its decoder at t = 0
    times = low_discrepancy_times(num_images, num_replicates, num_points, generator)
    jacobians = torch.ones_like(times)
    if time_sampling == "log_snr":
        times, jacobians = log_snr_uniform_times(log_snr, times)
    times = torch.cat([times, torch.zeros(num_images, num_replicates, 1, dtype=torch.float64)], dim=2)
    jacobians = torch.cat([jacobians, torch.ones(num_images, num_replicates, 1, dtype=torch.float64)], dim=2)
    is_decoder = torch.zeros_like(times, dtype=torch.bool)
    is_decoder[..., -1] = True
    image_of_pair = torch.arange(num_images).reshape(-1, 1, 1).expand_as(times).reshape(-1)
    times, jacobians, is_decoder = times.reshape(-1), jacobians.reshape(-1), is_decoder.reshape(-1)
    terms = torch.empty(len(times), dtype=compute)
    with tqdm(total=len(times), desc="continuous ELBO", disable=not show_progress) as bar:
        for start in range(0, len(times), batch_size):
            stop = min(start + batch_size, len(times))
            original = samples[image_of_pair[start:stop].to(device)].to(compute)
            time = times[start:stop].to(device)
            value, slope = log_snr_and_derivative(log_snr, time)
            value, slope = value.to(compute), slope.to(compute)
            alphas_cumprod_t = alphas_cumprod_from_log_snr(value)
            noise = randn_tensor(original.shape, generator=generator, device=device, dtype=compute)
            sample = q_sample(original, noise, alphas_cumprod_t)
            output = denoiser(sample.to(samples.dtype), time)
            output = getattr(output, "sample", output).to(compute)
            predicted = convert_prediction(output, sample, alphas_cumprod_t, prediction_type, "sample")
            diffusion = diffusion_loss_integrand(original, predicted, value, slope) * jacobians[start:stop].to(device)
            if discrete:
                decoder = -elbo.discretized_gaussian_log_likelihood(original, predicted, 0.5 * decoder_log_variance)
            else:
                decoder = -elbo.gaussian_log_likelihood(original, predicted, decoder_log_variance)
            terms[start:stop] = torch.where(is_decoder[start:stop].to(device), decoder, diffusion).cpu()
            bar.update(stop - start)

    terms = terms.reshape(num_images, num_replicates, num_points + 1)
    diffusion = terms[..., :-1].mean(dim=2)
    reconstruction = terms[..., -1]
    prior = elbo.prior_matching_kl(samples.to(compute), alphas_cumprod_from_log_snr(log_snr_endpoints[1])).cpu()
    replicates = prior.unsqueeze(1) + reconstruction + diffusion
    to_bits = 1.0 / (math.prod(samples.shape[1:]) * math.log(2.0))
    if num_replicates > 1:
        standard_error = replicates.std(dim=1, correction=1) / math.sqrt(num_replicates)
    else:
        standard_error = torch.full((num_images,), math.nan, dtype=compute)
    return ContinuousELBOEstimate(
        bits_per_dim=replicates.mean(dim=1) * to_bits,
        standard_error=standard_error * to_bits,
        prior_matching=prior * to_bits,
        reconstruction=reconstruction.mean(dim=1) * to_bits,
        diffusion_loss=diffusion.mean(dim=1) * to_bits,
        num_function_evaluations=num_images * num_function_evaluations,
        num_replicates=num_replicates,
    )
