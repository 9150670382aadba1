"""The exact log-likelihood of a diffusion model through its probability-flow ODE (Song et al. 2021, Appendix D).

For the variance-preserving process of a log-SNR schedule λ(t) (``continuous_schedule``: α_t² = sigmoid(λ),
σ_t² = sigmoid(−λ)) the SDE dx = −½ β(t) x dt + √β(t) dw has β(t) = −σ_t² λ′(t), and its marginals p_t are also
those of the deterministic flow

    dx/dt = F(x, t) = ½ λ′(t) σ_t² (x + ∇log p_t(x)),

with the model's score in place of ∇log p_t (converted from any parameterization at ᾱ(t)). Integrating from the data
at t = 0 to t = 1 with the instantaneous change of variables gives the model's density of the first latent x_0
evaluated at the data:

    log p_0(x(0)) = log N(x(1); 0, I) + ∫_0^1 ∇·F(x(t), t) dt.

The divergence is the exact trace of ∂F/∂x (D backward passes per evaluation, for small data) or Hutchinson's
estimate E_v[vᵀ (∂F/∂x) v] with K Rademacher probes v fixed along the path, each integrated separately so that
their spread gives a per-image standard error. The ODE is solved with ``scipy.integrate.solve_ivp`` (adaptive,
tolerances as options) or with Heun's method on a fixed grid (the same NFE on every process and every image).

8-bit data are dequantized: y = x + u, u ~ U(−1/255, 1/255) in each dimension (the bin of the ELBO's discretized
decoder), and −log P(bin) ≤ −log p(y) + D log(255/2) (Jensen), which is the bits/dim reported then.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp
from tqdm.auto import tqdm

from .continuous_schedule import alphas_cumprod_from_log_snr, log_snr_and_derivative
from .elbo_estimation import PerImageBitsPerDim
from .parameterization import check_prediction_type, convert_prediction

DIVERGENCES = ("auto", "exact", "hutchinson")
SOLVERS = ("adaptive", "fixed")
# "auto" takes the exact trace up to this many dimensions: D backward passes per evaluation against K probes.
MAX_EXACT_TRACE_DIMS = 32


def probability_flow_drift(sample, score, log_snr_t, log_snr_derivative_t):
    """F(x, t) = ½ λ′(t) σ_t² (x + ∇log p_t(x)), the probability-flow ODE of the VP SDE with β(t) = −σ_t² λ′(t)."""
    coefficient = 0.5 * log_snr_derivative_t * torch.sigmoid(-log_snr_t)
    return coefficient.reshape(-1, *([1] * (sample.ndim - 1))) * (sample + score)


def standard_normal_log_density(sample) -> torch.Tensor:
    """log N(x; 0, I) per sample: −½ Σ_i (x_i² + log 2π)."""
    return -0.5 * (sample.flatten(1).pow(2) + math.log(2 * math.pi)).sum(dim=1)


def uniform_dequantization(samples, generator=None, num_bins: int = 256):
    """y = x + u, u ~ U(−1/(num_bins − 1), 1/(num_bins − 1)): a point uniform in the bin of each 8-bit value in [−1, 1]."""
    half_bin = 1.0 / (num_bins - 1)
    device = generator.device if generator is not None else samples.device
    uniform = torch.rand(samples.shape, generator=generator, dtype=torch.float64, device=device).to(samples.device)
    return samples.double() + (2 * uniform - 1) * half_bin


def dequantization_log_volume(num_dims: int, num_bins: int = 256) -> float:
    """D log(2 / (num_bins − 1)), the log-volume of one bin: log P(bin) ≥ E_u[log p(x + u)] + this."""
    return num_dims * math.log(2.0 / (num_bins - 1))


@dataclass
class ODELikelihood(PerImageBitsPerDim):
    """−log p(x) of n images by the probability-flow ODE, in bits/dim.

    Attributes:
        bits_per_dim: per image, ``[n]`` (of the dequantized bin when ``dequantized``).
        standard_error: per image, std over the K probes / √K (Hutchinson, K ≥ 2); 0 for the exact trace, which
            samples nothing but the dequantization (one draw, whose spread the dataset standard error covers).
        num_function_evaluations: denoiser evaluations per image, ``[n]``.
        divergence, solver: how the trace was taken and the ODE solved.
        dequantized: whether the data were 8-bit and dequantized uniformly.
    """

    bits_per_dim: torch.Tensor
    standard_error: torch.Tensor
    num_function_evaluations: torch.Tensor
    divergence: str
    solver: str
    dequantized: bool

    def to_dict(self) -> dict:
        standard_error = self.dataset_standard_error
        return {
            "estimator": "ode",
            "bits_per_dim": self.dataset_bits_per_dim,
            "standard_error": None if math.isnan(standard_error) else standard_error,
            "divergence": self.divergence,
            "solver": self.solver,
            "dequantized": self.dequantized,
            "num_samples": self.bits_per_dim.numel(),
            "num_function_evaluations": int(self.num_function_evaluations.sum()),
            "num_function_evaluations_per_image": float(self.num_function_evaluations.double().mean()),
        }


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_tolerance(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")


class _Flow:
    """F and its divergence for one batch, counting evaluations; states are flat float64 numpy vectors."""

    def __init__(self, log_snr, denoiser, prediction_type, shape, model_dtype, device, probes):
        self.log_snr, self.denoiser, self.prediction_type = log_snr, denoiser, prediction_type
        self.shape, self.model_dtype, self.device, self.probes = shape, model_dtype, device, probes
        self.num_evaluations = 0

    def __call__(self, t: float, state: np.ndarray) -> np.ndarray:
        size = math.prod(self.shape)
        sample = torch.from_numpy(state[:size]).reshape(self.shape).to(self.device)
        drift, divergence = self.drift_and_divergence(sample, t)
        return torch.cat([drift.reshape(-1), divergence.reshape(-1)]).cpu().numpy()

    def drift_and_divergence(self, sample, t: float):
        """F(x, t) ``[B, ...]`` and ∇·F per image and probe ``[B, K]`` (K = 1 for the exact trace)."""
        self.num_evaluations += 1
        batch = sample.shape[0]
        time = torch.full((batch,), float(t), dtype=torch.float64, device=self.device)
        with torch.no_grad():
            log_snr_t, log_snr_derivative_t = log_snr_and_derivative(self.log_snr, time)
        log_snr_t = log_snr_t.to(self.device, torch.float64)
        log_snr_derivative_t = log_snr_derivative_t.to(self.device, torch.float64)
        alphas_cumprod_t = alphas_cumprod_from_log_snr(log_snr_t)
        with torch.enable_grad():
            sample = sample.detach().requires_grad_(True)
            output = self.denoiser(sample.to(self.model_dtype), time)
            output = getattr(output, "sample", output).double()
            score = convert_prediction(output, sample, alphas_cumprod_t, self.prediction_type, "score")
            drift = probability_flow_drift(sample, score, log_snr_t, log_snr_derivative_t)
            flat = drift.flatten(1)
            if self.probes is None:
                # the images are independent, so the gradient of a column summed over the batch is each image's own
                columns = [
                    torch.autograd.grad(flat[:, i].sum(), sample, retain_graph=True)[0].flatten(1)[:, i]
                    for i in range(flat.shape[1])
                ]
                divergence = torch.stack(columns, dim=1).sum(dim=1, keepdim=True)
            else:
                estimates = []
                for k in range(self.probes.shape[1]):
                    probe = self.probes[:, k]
                    (product,) = torch.autograd.grad((drift * probe).sum(), sample, retain_graph=True)
                    estimates.append((product * probe).flatten(1).sum(dim=1))
                divergence = torch.stack(estimates, dim=1)
        return drift.detach(), divergence.detach()


def _heun(flow, state: np.ndarray, num_steps: int) -> np.ndarray:
    """Heun's method (explicit trapezoid) from t = 0 to 1 on ``num_steps`` equal steps: 2 evaluations a step."""
    step = 1.0 / num_steps
    for index in range(num_steps):
        t = index * step
        slope = flow(t, state)
        predicted = state + step * slope
        state = state + 0.5 * step * (slope + flow(t + step, predicted))
    return state


def ode_log_likelihood(
    log_snr,
    denoiser,
    samples: torch.Tensor,
    prediction_type: str = "epsilon",
    divergence: str = "auto",
    num_probes: int = 4,
    solver: str = "adaptive",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
    num_steps: int = 100,
    dequantize: bool = False,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    show_progress: bool = True,
) -> ODELikelihood:
    """−log p(x) in bits/dim of each image and of the dataset, by the probability-flow ODE (module docstring).

    Args:
        log_snr: the schedule λ(t) (``continuous_schedule``), e.g. ``DiscreteLogSNRSpline(scheduler.alphas_cumprod)``.
        denoiser: ``denoiser(x_t, t)``, t float64 times ``[B]`` in [0, 1], returning the model output in
            ``prediction_type``; it must be differentiable in x_t. ``continuous_time_denoiser`` wraps a UNet.
        samples: x, ``[n, ...]``; 8-bit values in [−1, 1] when ``dequantize``.
        divergence: ``"exact"`` (the trace, D backward passes per evaluation), ``"hutchinson"`` (``num_probes``
            Rademacher probes), or ``"auto"``: exact up to ``MAX_EXACT_TRACE_DIMS`` dimensions.
        solver: ``"adaptive"`` (``solve_ivp`` with ``method``, ``rtol``, ``atol``; one ODE per batch, so the NFE is
            the batch's) or ``"fixed"`` (Heun on ``num_steps`` equal steps in t, 2 ``num_steps`` evaluations).
        dequantize: the data are 8-bit: add uniform noise within each bin and report the bits of the bin.
        generator: draws the probes and the dequantization noise.
        batch_size: images per ODE.
    """
    check_prediction_type(prediction_type)
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_choice("solver", solver, SOLVERS)
    _check_int("num_probes", num_probes, 1)
    _check_int("num_steps", num_steps, 1)
    _check_int("batch_size", batch_size, 1)
    _check_tolerance("rtol", rtol)
    _check_tolerance("atol", atol)
    if not isinstance(samples, torch.Tensor) or samples.ndim < 2 or samples.shape[0] == 0:
        raise ValueError(f"samples must be a non-empty tensor [n, ...], got {type(samples).__name__}")
    num_images, num_dims = samples.shape[0], math.prod(samples.shape[1:])
    if divergence == "auto":
        divergence = "exact" if num_dims <= MAX_EXACT_TRACE_DIMS else "hutchinson"
    points = uniform_dequantization(samples, generator) if dequantize else samples.double()
    points = points.cpu()
    device = generator.device if generator is not None else torch.device("cpu")
    if divergence == "hutchinson":
        signs = torch.randint(0, 2, (num_images, num_probes, *samples.shape[1:]), generator=generator, device=device)
        all_probes = (2.0 * signs - 1.0).double().to(samples.device)

    log_likelihood = torch.empty(num_images, num_probes if divergence == "hutchinson" else 1, dtype=torch.float64)
    evaluations = torch.empty(num_images, dtype=torch.long)
    with tqdm(total=num_images, desc="ODE likelihood", disable=not show_progress) as bar:
        for start in range(0, num_images, batch_size):
            stop = min(start + batch_size, num_images)
            batch = points[start:stop]
            probes = all_probes[start:stop] if divergence == "hutchinson" else None
            flow = _Flow(log_snr, denoiser, prediction_type, batch.shape, samples.dtype, samples.device, probes)
            width = log_likelihood.shape[1]
            state = np.concatenate([batch.reshape(-1).numpy(), np.zeros((stop - start) * width)])
            if solver == "adaptive":
                solution = solve_ivp(flow, (0.0, 1.0), state, method=method, rtol=rtol, atol=atol)
                if not solution.success:
                    raise RuntimeError(f"the probability-flow ODE failed: {solution.message}")
                final = solution.y[:, -1]
            else:
                final = _heun(flow, state, num_steps)
            size = batch.numel()
            end = torch.from_numpy(final[:size]).reshape(batch.shape)
            integral = torch.from_numpy(final[size:]).reshape(stop - start, width)
            log_likelihood[start:stop] = standard_normal_log_density(end).unsqueeze(1) + integral
            evaluations[start:stop] = flow.num_evaluations
            bar.update(stop - start)

    if dequantize:
        log_likelihood = log_likelihood + dequantization_log_volume(num_dims)
    to_bits = 1.0 / (num_dims * math.log(2.0))
    width = log_likelihood.shape[1]
    if width > 1:
        standard_error = log_likelihood.std(dim=1, correction=1) / math.sqrt(width)
    elif divergence == "hutchinson":
        standard_error = torch.full((num_images,), math.nan, dtype=torch.float64)
    else:
        standard_error = torch.zeros(num_images, dtype=torch.float64)
    return ODELikelihood(
        bits_per_dim=-log_likelihood.mean(dim=1) * to_bits,
        standard_error=standard_error * to_bits,
        num_function_evaluations=evaluations,
        divergence=divergence,
        solver=solver,
        dequantized=dequantize,
    )
