"""A noise schedule learned with the denoiser, as in Variational Diffusion Models (Kingma et al. 2021).

The schedule is a strictly increasing function γ_η(t) on t ∈ [0, 1], the negative log signal-to-noise ratio:
SNR(t) = exp(−γ_η(t)) and ᾱ(t) = sigmoid(−γ_η(t)). It is written as its two endpoints and a shape,

    γ_η(t) = γ_0 + (γ_1 − γ_0) s_η(t),   s_η(t) = (φ_η(t) − φ_η(0)) / (φ_η(1) − φ_η(0)),

where φ_η(t) = t + (1/K) Σ_k w_k σ(a_k (2t − 1) − b_k) with w_k, a_k > 0 (softplus of free parameters), so s_η rises
strictly from 0 to 1 whatever η, and γ is strictly increasing whenever γ_0 < γ_1 (two free parameters, each
receiving only the gradient of its own end; ``endpoints`` refuses crossed ones). Training (``training.losses.LearnedScheduleLoss``)
gives the endpoints the gradient of the bound, which depends on the schedule only through them in continuous time
(VDM, eq. 14), and the shape η the gradient of the estimate's second moment, whose expectation is the gradient of
its variance (VDM, Appendix I.2).

The discrete chain of T latents (Diffusers' timesteps 0..T−1) sits at t_i = i / (T − 1): the first latent has
log-SNR −γ_0 (the decoder reads it), the last −γ_1 (the prior matches it). ``betas_from_log_snr`` turns the values
into the β_t that ``HVAEScheduler`` and every Diffusers scheduler take as ``trained_betas``.
"""

import math

import numpy as np
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config


def schedule_times(num_train_timesteps: int, device=None) -> torch.Tensor:
    """t_i = i / (T − 1) of the T latents of the discrete chain, float64 (t_0 = 0 for T = 1)."""
    return torch.linspace(0.0, 1.0, num_train_timesteps, dtype=torch.float64, device=device)


def timestep_times(timesteps, num_train_timesteps: int) -> torch.Tensor:
    """The continuous time t = i / (T − 1) of Diffusers timesteps i ∈ {0..T−1}, float64."""
    timesteps = torch.as_tensor(timesteps).to(torch.float64)
    return timesteps / max(num_train_timesteps - 1, 1)


def alphas_cumprod_from_log_snr(log_snr: torch.Tensor) -> torch.Tensor:
    """ᾱ = SNR / (1 + SNR) = sigmoid(log SNR) = sigmoid(−γ)."""
    return torch.sigmoid(log_snr)


def betas_from_log_snr(log_snr) -> np.ndarray:
    """β_i = 1 − ᾱ_i / ᾱ_{i−1} (ᾱ_{−1} = 1) of a chain with log-SNR values ``log_snr`` (strictly decreasing), float64.

    Computed as −expm1(log σ(λ_i) − log σ(λ_{i−1})), exact where ᾱ_i / ᾱ_{i−1} is close to 1; the cumulative product
    of 1 − β gives back ᾱ_i = sigmoid(λ_i).
    """
    log_snr = torch.as_tensor(log_snr, dtype=torch.float64).detach().cpu().reshape(-1)
    if len(log_snr) > 1 and not bool((log_snr[1:] < log_snr[:-1]).all()):
        raise ValueError("log_snr must be strictly decreasing along the chain (SNR falls as t grows)")
    log_alphas_cumprod = torch.nn.functional.logsigmoid(log_snr)
    previous = torch.cat([torch.zeros(1, dtype=torch.float64), log_alphas_cumprod[:-1]])
    return (-torch.expm1(log_alphas_cumprod - previous)).numpy()


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))


class LearnedNoiseSchedule(ModelMixin, ConfigMixin):
    """γ_η(t), a monotone log-noise-to-signal network with learned endpoints (see the module docstring).

    Saved and loaded like any Diffusers model (``save_pretrained`` / ``from_pretrained``, safetensors), and carried by
    a saved pipeline as its ``noise_schedule`` component; ``scheduler`` builds the ``HVAEScheduler`` it defines.

    Args:
        initial_gamma_0, initial_gamma_1: the endpoints γ(0) < γ(1) before training (``from_alphas_cumprod`` takes
            them from a fixed table); the trained ones are parameters (``endpoints``).
        num_features: K, the sigmoid features of the shape; it starts within 1% of s(t) = t (linear log-SNR).
    """

    @register_to_config
    def __init__(self, initial_gamma_0: float = -10.0, initial_gamma_1: float = 10.0, num_features: int = 32):
        super().__init__()
        gamma_0, gamma_1 = initial_gamma_0, initial_gamma_1
        if not (math.isfinite(gamma_0) and math.isfinite(gamma_1) and gamma_1 > gamma_0):
            raise ValueError(
                f"initial_gamma_0 < initial_gamma_1 must be finite numbers, got {initial_gamma_0} and {initial_gamma_1}"
            )
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        self.gamma_0 = torch.nn.Parameter(torch.tensor(float(gamma_0)))
        self.gamma_1 = torch.nn.Parameter(torch.tensor(float(gamma_1)))
        # A deterministic start: equal steps centred evenly over t add up to a ramp, so s(t) is within 1% of t, and
        # weights of order one let a few hundred optimizer steps reshape it.
        centres = torch.linspace(-1.0, 1.0, num_features)
        slope = 8.0
        self.feature_slope = torch.nn.Parameter(torch.full((num_features,), _inverse_softplus(slope)))
        self.feature_offset = torch.nn.Parameter(slope * centres)
        self.feature_weight = torch.nn.Parameter(torch.full((num_features,), _inverse_softplus(1.0)))

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod, **kwargs) -> "LearnedNoiseSchedule":
        """A schedule starting linear in log-SNR between the endpoints of a fixed table ᾱ_0..ᾱ_{T−1}."""
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        gamma = -torch.logit(alphas_cumprod)
        return cls(initial_gamma_0=float(gamma[0]), initial_gamma_1=float(gamma[-1]), **kwargs)

    def endpoints(self):
        """(γ_0, γ_1), float64 tensors that carry the gradient of the endpoint parameters; a ``ValueError`` if they
        have crossed (the schedule would no longer add noise)."""
        gamma_0, gamma_1 = self.gamma_0.double(), self.gamma_1.double()
        if not bool(gamma_1 > gamma_0):
            raise ValueError(
                f"the noise schedule's endpoints crossed (gamma_0={gamma_0.item():.4g} >= gamma_1={gamma_1.item():.4g}): "
                "a lower learning rate keeps them apart"
            )
        return gamma_0, gamma_1

    def _features(self, times: torch.Tensor) -> torch.Tensor:
        slope = torch.nn.functional.softplus(self.feature_slope.double())
        weight = torch.nn.functional.softplus(self.feature_weight.double())
        hidden = torch.sigmoid(slope * (2 * times.unsqueeze(-1) - 1) - self.feature_offset.double())
        return times + (hidden * weight).mean(dim=-1)

    def shape(self, times) -> torch.Tensor:
        """s_η(t) ∈ [0, 1], strictly increasing, s(0) = 0 and s(1) = 1; float64, the shape parameters' gradient."""
        times = torch.as_tensor(times, dtype=torch.float64, device=self.gamma_0.device)
        with torch.autocast(device_type=times.device.type, enabled=False):
            ends = self._features(torch.tensor([0.0, 1.0], dtype=torch.float64, device=times.device))
            return (self._features(times) - ends[0]) / (ends[1] - ends[0])

    def gamma_from_shape(self, shape: torch.Tensor) -> torch.Tensor:
        """γ = γ_0 + (γ_1 − γ_0) s: the endpoints' part of γ_η, given the shape's values."""
        gamma_0, gamma_1 = self.endpoints()
        return gamma_0 + (gamma_1 - gamma_0) * shape

    def forward(self, times) -> torch.Tensor:
        """γ_η(t) = −log SNR(t), float64, for times in [0, 1]."""
        return self.gamma_from_shape(self.shape(times))

    @torch.no_grad()
    def log_snr(self, num_train_timesteps: int) -> torch.Tensor:
        """−γ_η(t_i) at the T latents of the discrete chain (``schedule_times``), float64 on the CPU."""
        return -self(schedule_times(num_train_timesteps, self.gamma_0.device)).cpu()

    def betas(self, num_train_timesteps: int) -> np.ndarray:
        """The β_t of the T-latent chain, the ``trained_betas`` of any Diffusers scheduler (``betas_from_log_snr``)."""
        return betas_from_log_snr(self.log_snr(num_train_timesteps))

    def scheduler(self, scheduler_or_config=None, **kwargs):
        """An ``HVAEScheduler`` whose tables are this schedule: ``trained_betas`` on its T-latent chain.

        ``scheduler_or_config`` (a scheduler or its config) gives the other settings (prediction type, variance,
        spacing, T); ``kwargs`` override them.
        """
        from ..scheduling_hvae import HVAEScheduler

        config = getattr(scheduler_or_config, "config", scheduler_or_config) or {}
        config = {**dict(config), **kwargs}
        num_train_timesteps = config.get("num_train_timesteps", 1000)
        config["rescale_betas_zero_snr"] = False
        return HVAEScheduler.from_config(config, trained_betas=self.betas(num_train_timesteps).tolist())
