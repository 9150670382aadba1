"""The continuous-time diffusion process, written through its log signal-to-noise ratio λ(t) on t ∈ [0, 1].

q(x_t | x_0) = N(α_t x_0, σ_t² I) with α_t² = ᾱ(t) = sigmoid(λ(t)) and σ_t² = 1 − ᾱ(t) = sigmoid(−λ(t)), so
SNR(t) = α_t² / σ_t² = e^λ(t), decreasing in t (Kingma et al. 2021, "Variational Diffusion Models", who write
γ(t) = −λ(t)). Everything continuous in the package (the probability-flow ODE of ``likelihood_ode``, the
continuous-time ELBO of ``continuous_elbo``) takes a *log-SNR schedule*: any callable ``log_snr(t)`` mapping float64
times ``[B]`` to λ ``[B]``. If it also has a method ``derivative(t)`` returning dλ/dt that is used; otherwise
``log_snr_and_derivative`` differentiates it with autograd (a learned, monotone network needs nothing more).

A discrete schedule (the ᾱ table of an ``HVAEScheduler``) becomes continuous as k-diffusion's discrete-model wrappers
make it: timestep index i ∈ {0, …, T − 1} sits at t_i = i / (T − 1), ᾱ(t_i) equals the table's ᾱ_i exactly, and the
model is called with the fractional timestep t (T − 1). Between the knots λ is a C² natural cubic spline
(``DiscreteLogSNRSpline``): linear interpolation of λ would make β(t) = −σ_t² λ′(t) a sawtooth that jumps at every
knot, which an adaptive ODE solver misjudges (docs/theory.md, "The continuous-time process").
"""

import numpy as np
import torch
from scipy.interpolate import CubicSpline

from .parameterization import split_learned_variance


def alphas_cumprod_from_log_snr(log_snr: torch.Tensor) -> torch.Tensor:
    """ᾱ = α² = sigmoid(λ), and so 1 − ᾱ = σ² = sigmoid(−λ) (evaluate that one directly: it keeps its digits)."""
    return torch.sigmoid(log_snr)


def log_snr_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """λ = log SNR = log ᾱ − log(1 − ᾱ), in float64."""
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return alphas_cumprod.log() - torch.log1p(-alphas_cumprod)


def log_snr_and_derivative(log_snr, t: torch.Tensor):
    """(λ(t), dλ/dt) of a log-SNR schedule at float64 times ``t`` ``[B]``.

    Uses ``log_snr.derivative`` when the schedule has one, autograd otherwise. With autograd and gradients enabled
    (training a learned schedule), both values keep their graph to the schedule's parameters.
    """
    derivative = getattr(log_snr, "derivative", None)
    if derivative is not None:
        return log_snr(t), derivative(t)
    keep_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        time = t.detach().requires_grad_(True)
        value = log_snr(time)
        (slope,) = torch.autograd.grad(value.sum(), time, create_graph=keep_graph)
    return (value, slope) if keep_graph else (value.detach(), slope.detach())


class DiscreteLogSNRSpline:
    """λ(t) through the knots (i / (T − 1), log SNR(ᾱ_i)) of a discrete ᾱ table, a C² natural cubic spline.

    ``self(t)`` is λ(t) and ``self.derivative(t)`` is dλ/dt, float64 tensors on ``t``'s device. A table of one
    timestep (T = 1) is the constant λ_0: its continuous time has no length, and only the first latent exists.

    Args:
        alphas_cumprod: ᾱ_0 … ᾱ_{T−1}, strictly decreasing in (0, 1) (an ``HVAEScheduler``'s ``alphas_cumprod``).
    """

    def __init__(self, alphas_cumprod):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        if alphas_cumprod.ndim != 1 or len(alphas_cumprod) == 0:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D table, got shape {tuple(alphas_cumprod.shape)}")
        if not bool(((alphas_cumprod > 0) & (alphas_cumprod < 1)).all()):
            raise ValueError("alphas_cumprod must lie in (0, 1)")
        if bool((alphas_cumprod[1:] >= alphas_cumprod[:-1]).any()):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.num_train_timesteps = len(alphas_cumprod)
        self.knots = log_snr_from_alphas_cumprod(alphas_cumprod).numpy()
        if self.num_train_timesteps > 1:
            times = np.linspace(0.0, 1.0, self.num_train_timesteps)
            self._spline = CubicSpline(times, self.knots, bc_type="natural")

    def _evaluate(self, t, order: int) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.num_train_timesteps == 1:
            return torch.full_like(t, float(self.knots[0]) if order == 0 else 0.0)
        values = self._spline(t.detach().cpu().numpy(), order)
        return torch.from_numpy(np.asarray(values, dtype=np.float64)).to(t.device)

    def __call__(self, t) -> torch.Tensor:
        return self._evaluate(t, 0)

    def derivative(self, t) -> torch.Tensor:
        return self._evaluate(t, 1)

    def timestep(self, t) -> torch.Tensor:
        """The fractional Diffusers timestep t (T − 1) at which a discrete model is evaluated at time t."""
        return torch.as_tensor(t, dtype=torch.float64) * (self.num_train_timesteps - 1)


def continuous_time_denoiser(denoiser, num_train_timesteps: int):
    """Wrap a discrete-time ``denoiser(x_t, timesteps)`` (a Diffusers UNet or closure over one) as ``f(x_t, t)``.

    It is called with the fractional timesteps t (T − 1), as k-diffusion's discrete wrappers do, in float32 at least
    (half precision cannot tell 999 from 999.4); its output (a tensor or an object with ``.sample``) is returned as
    a tensor.
    """

    def at_time(sample, t):
        dtype = torch.promote_types(sample.dtype, torch.float32)
        timesteps = torch.as_tensor(t, device=sample.device).to(dtype) * (num_train_timesteps - 1)
        output = denoiser(sample, timesteps)
        return getattr(output, "sample", output)

    return at_time


def continuous_time_model(pipeline):
    """``(log_snr, denoiser, prediction_type)`` of a pipeline's unconditional denoiser in continuous time.

    ``log_snr`` is the ``DiscreteLogSNRSpline`` of its scheduler's ᾱ table, ``denoiser(x_t, t)`` calls its UNet at
    the fractional timestep t (T − 1) in the UNet's dtype (with the null label of a class-conditional pipeline,
    ``unconditional_kwargs``) and returns the prediction (without the variance channels of a learned variance),
    and ``prediction_type`` is what the UNet predicts. These are what ``likelihood_ode.ode_log_likelihood`` and
    ``continuous_elbo.estimate_continuous_elbo`` take.
    """
    from .pipelines.serialization import denoiser_scheduler

    scheduler = denoiser_scheduler(pipeline)
    unet = pipeline.unet.eval()
    unconditional_kwargs = getattr(pipeline, "unconditional_kwargs", lambda batch_size: {})

    def discrete_denoiser(sample, timesteps):
        output = unet(sample.to(unet.dtype), timesteps, **unconditional_kwargs(len(sample)))
        return split_learned_variance(getattr(output, "sample", output), sample)[0]

    num_train_timesteps = scheduler.config.num_train_timesteps
    return (
        DiscreteLogSNRSpline(scheduler.alphas_cumprod),
        continuous_time_denoiser(discrete_denoiser, num_train_timesteps),
        scheduler.config.prediction_type,
    )
