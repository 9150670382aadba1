"""HVAEScheduler: ancestral sampling of the diffusion hierarchical VAE, as a Diffusers scheduler.

The scheduler is a thin layer over the pure functions of ``forward_process``, ``parameterization`` and ``elbo``:
it owns the noise schedule and the chain of latents being sampled, precomputes each step's coefficients once in
float64, and exposes the HVAE quantities (q(x_t | x_0), the posterior, p_θ(x_{t−1} | x_t), the ELBO terms) to
pipelines and training code.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import elbo as elbo_terms_module
from .forward_process import (
    BETA_SCHEDULES,
    alphas_cumprod_from_betas,
    broadcast_to,
    learned_range_log_variance,
    make_betas,
    posterior_mean_coefficients,
    posterior_variance,
    q_sample,
    rescale_zero_terminal_snr,
    signal_to_noise_ratio,
)
from .parameterization import PREDICTION_TYPES, convert_prediction, training_target, velocity

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class HVAESchedulerOutput(BaseOutput):
    """Output of ``HVAEScheduler.step``.

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            x_{t−1} ~ p_θ(x_{t−1} | x_t), the next latent of the reverse chain (the data estimate at the last step).
        pred_original_sample (`torch.Tensor` of the same shape):
            x̂_0, the model's estimate of the clean sample (after clipping or thresholding).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _step_noise(like: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, drawn as ``randn_tensor`` draws it (same numbers).

    One generator on ``like``'s device (or none) calls ``torch.randn`` directly: ``randn_tensor``'s checks cost a
    few microseconds a step, a visible share of a step at small shapes.
    """
    if generator is None or (isinstance(generator, torch.Generator) and generator.device.type == like.device.type):
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


class HVAEScheduler(SchedulerMixin, ConfigMixin):
    """Ancestral sampler of the diffusion HVAE with the fixed encoder q(x_t | x_{t−1}) = N(√α_t x_{t−1}, (1 − α_t) I).

    Each ``step`` draws x_{t'} ~ p_θ(x_{t'} | x_t) = N(μ_θ, Σ), where μ_θ is the posterior mean μ_q with the model's
    x̂_0 in place of x_0 and t' is the previous timestep of the chain. On a subsequence of timesteps the step's α is
    ᾱ_t / ᾱ_{t'}, so sampling with fewer steps is the exact HVAE with fewer latents.

    The constructor takes the same arguments as Diffusers' ``DDPMScheduler`` (and the same defaults, so it is a
    drop-in replacement); its config loads into ``DDIMScheduler``, ``DPMSolverMultistepScheduler``,
    ``EulerDiscreteScheduler`` and the other Karras schedulers, and theirs into it. To give explicit per-step
    alphas use ``HVAEScheduler.from_alphas``: they are stored as ``trained_betas`` = 1 − α, which every
    Diffusers scheduler understands.

    Args:
        num_train_timesteps: T, the number of latents.
        beta_start, beta_end, beta_schedule: a named schedule, one of "linear", "scaled_linear",
            "squaredcos_cap_v2", "sigmoid" (see ``forward_process.make_betas``).
        trained_betas: explicit β_1..β_T in (0, 1]; overrides the named schedule.
        variance_type: Σ of p_θ: "fixed_small" (σ_q², the posterior variance), "fixed_large" (β_t) or
            "learned_range" (the model outputs 2C channels, the last C interpolate between the two in log space).
        clip_sample, clip_sample_range: clamp x̂_0 to [−range, range].
        prediction_type: what the model outputs: "epsilon", "sample", "v_prediction" or "score" (∇log p(x_t)).
        thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen's dynamic thresholding of x̂_0.
        timestep_spacing: "leading", "trailing" or "linspace", as in Diffusers.
        steps_offset: added to "leading" timesteps.
        rescale_betas_zero_snr: rescale the schedule so that SNR(T) = 0 (Lin et al. 2023).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("variance_type", variance_type, VARIANCE_TYPES)
        _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if trained_betas is not None:
            betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64))
            if betas.ndim != 1 or betas.shape[0] != num_train_timesteps:
                raise ValueError(
                    f"trained_betas must be a 1-D sequence of num_train_timesteps={num_train_timesteps} values, "
                    f"got shape {tuple(betas.shape)}"
                )
            if not bool(((betas > 0) & (betas <= 1)).all()):
                raise ValueError("trained_betas must lie in (0, 1] (equivalently alphas in [0, 1))")
        else:
            _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
            betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)

        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = alphas_cumprod_from_betas(betas)
        if self.alphas_cumprod[-1] == 0:
            # ᾱ_T = 0 (zero terminal SNR, or a β_T = 1 given explicitly) makes x̂_0 from ε or a score undefined at
            # the first step; like Diffusers' Euler scheduler we keep it a hair above 0 so every parameterization
            # stays usable.
            self.alphas_cumprod[-1] = 2**-24
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._set_chain(np.arange(num_train_timesteps)[::-1].copy())

    @classmethod
    def from_alphas(cls, alphas, **kwargs) -> "HVAEScheduler":
        """A scheduler for explicit per-step α_1..α_T in [0, 1), stored as ``trained_betas`` = 1 − α_t."""
        alphas = np.asarray(alphas, dtype=np.float64)
        if alphas.ndim != 1 or not ((alphas >= 0) & (alphas < 1)).all():
            raise ValueError("alphas must be a 1-D sequence of values in [0, 1)")
        return cls(num_train_timesteps=len(alphas), trained_betas=(1.0 - alphas).tolist(), **kwargs)

    # ------------------------------------------------------------------ the chain of latents being sampled

    def _set_chain(self, timesteps: np.ndarray) -> None:
        """Precompute, once per chain, every per-step coefficient that ``step`` needs (float64, then to floats)."""
        timesteps = np.asarray(timesteps, dtype=np.int64)
        self.timesteps = torch.from_numpy(timesteps)
        self._index_of_timestep = {int(t): i for i, t in enumerate(timesteps)}
        # the same map as a table over all train timesteps (−1 off the chain), for whole batches at once
        self._chain_index_table = torch.full((self.config.num_train_timesteps,), -1, dtype=torch.long)
        self._chain_index_table[torch.from_numpy(timesteps)] = torch.arange(len(timesteps))
        previous = np.append(timesteps[1:], -1)
        self._previous_timesteps = previous

        alphas_cumprod_t = self.alphas_cumprod[torch.from_numpy(timesteps)]
        prev_alphas_cumprod = torch.where(
            torch.from_numpy(previous) >= 0, self.alphas_cumprod[torch.from_numpy(previous).clamp(min=0)], 1.0
        )
        x0_coefficient, sample_coefficient = posterior_mean_coefficients(alphas_cumprod_t, prev_alphas_cumprod)
        variance_small = posterior_variance(alphas_cumprod_t, prev_alphas_cumprod)
        step_betas = 1 - alphas_cumprod_t / prev_alphas_cumprod
        # σ_q² of the last step is 0; as in improved DDPM, its log uses the step before (or β when there is none).
        clip_value = variance_small[-2] if len(timesteps) > 1 else step_betas[-1]
        min_log_variance = torch.where(variance_small > 0, variance_small, clip_value).log()

        # x̂_0 is affine in (x_t, model output): read both weights off the one conversion function.
        ones, zeros = torch.ones_like(alphas_cumprod_t), torch.zeros_like(alphas_cumprod_t)
        prediction_type = self.config.prediction_type
        x0_from_sample = convert_prediction(zeros, ones, alphas_cumprod_t, prediction_type, "sample")
        x0_from_output = convert_prediction(ones, zeros, alphas_cumprod_t, prediction_type, "sample")

        self._chain_alphas_cumprod = alphas_cumprod_t
        self._chain_prev_alphas_cumprod = prev_alphas_cumprod
        self._chain_min_log_variance = min_log_variance
        self._chain_max_log_variance = step_betas.log()
        # log Σ of the fixed variance types at every latent, the decoder p_θ(x_0 | x_t) included: "fixed_large" is
        # β_t throughout (Bayes-optimal for data broad compared with √β_t, so the ELBO of continuous data tightens to
        # log p(x_0) as T grows); "fixed_small" uses the clipped σ_q² (improved DDPM), suited to data on a grid.
        large = self.config.variance_type == "fixed_large"
        self._chain_fixed_log_variance = self._chain_max_log_variance if large else min_log_variance
        fixed_variance = step_betas if large else variance_small
        self._step_coefficients = [
            tuple(float(v) for v in row)
            for row in zip(
                x0_from_sample,
                x0_from_output,
                x0_coefficient,
                sample_coefficient,
                fixed_variance.sqrt(),
                min_log_variance,
                self._chain_max_log_variance,
            )
        ]

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the latents to sample: ``num_inference_steps`` spaced by ``timestep_spacing``, or explicit ``timesteps``.

        Args:
            num_inference_steps: how many latents, 1 ≤ n ≤ ``num_train_timesteps``.
            device: where ``self.timesteps`` lives.
            timesteps: strictly descending timesteps in [0, ``num_train_timesteps``).
        """
        num_train_timesteps = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            timesteps = np.asarray(timesteps)
            if timesteps.ndim != 1 or len(timesteps) == 0 or not np.issubdtype(timesteps.dtype, np.integer):
                raise ValueError(f"timesteps must be a non-empty list of ints, got {timesteps!r}")
            if (np.diff(timesteps) >= 0).any():
                raise ValueError(f"timesteps must be strictly descending, got {timesteps.tolist()}")
            if timesteps[0] >= num_train_timesteps or timesteps[-1] < 0:
                raise ValueError(f"timesteps must lie in [0, {num_train_timesteps}), got {timesteps.tolist()}")
            self.custom_timesteps = True
            self.num_inference_steps = len(timesteps)
        else:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
                raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
            if not 1 <= num_inference_steps <= num_train_timesteps:
                raise ValueError(
                    f"num_inference_steps must be between 1 and num_train_timesteps={num_train_timesteps}, "
                    f"got {num_inference_steps}"
                )
            timesteps = self._spaced_timesteps(int(num_inference_steps))
            self.custom_timesteps = False
            self.num_inference_steps = int(num_inference_steps)
        self._set_chain(timesteps)
        self.timesteps = self.timesteps.to(device)

    def _spaced_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Diffusers' three spacings (Lin et al. 2023, Table 2)."""
        num_train_timesteps = self.config.num_train_timesteps
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            timesteps = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1]
        elif spacing == "leading":
            step_ratio = num_train_timesteps // num_inference_steps
            timesteps = (np.arange(num_inference_steps) * step_ratio).round()[::-1] + self.config.steps_offset
        else:
            step_ratio = num_train_timesteps / num_inference_steps
            timesteps = np.round(np.arange(num_train_timesteps, 0, -step_ratio)) - 1
        timesteps = timesteps.astype(np.int64)
        if timesteps[0] >= num_train_timesteps:
            raise ValueError(
                f"steps_offset={self.config.steps_offset} pushes the first timestep past num_train_timesteps"
            )
        return timesteps.copy()

    def _chain_index(self, timestep) -> int:
        """Position of ``timestep`` in the chain; a ``ValueError`` if it is not one of ``self.timesteps``."""
        if isinstance(timestep, torch.Tensor):
            if timestep.ndim == 0 and timestep._base is self.timesteps:
                # An element of self.timesteps, as a pipeline's loop hands it over: its position is its storage
                # offset, read on the host, so a CUDA timestep costs no device-to-host sync per step.
                return (timestep.storage_offset() - self.timesteps.storage_offset()) // self.timesteps.stride(0)
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a single value, got shape {tuple(timestep.shape)}")
            timestep = timestep.item()
        index = self._index_of_timestep.get(int(timestep)) if float(timestep).is_integer() else None
        if index is None:
            raise ValueError(
                f"timestep {timestep} is not in the schedule; call set_timesteps and use scheduler.timesteps"
            )
        return index

    def previous_timestep(self, timestep) -> int:
        """The timestep of the next latent of the chain (−1 after the last one, where x_0 comes out)."""
        return int(self._previous_timesteps[self._chain_index(timestep)])

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """The HVAE's latents need no input scaling: returns ``sample`` unchanged (for scheduler interchangeability)."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------ sampling

    def _split_model_output(self, model_output: torch.Tensor, sample: torch.Tensor):
        """Check the model output's shape and split off the variance channels of "learned_range"."""
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise TypeError("model_output and sample must be torch.Tensor")
        learned = self.config.variance_type == "learned_range"
        expected = (sample.shape[0], 2 * sample.shape[1], *sample.shape[2:]) if learned else tuple(sample.shape)
        if tuple(model_output.shape) != expected:
            why = " (learned_range needs 2C channels: the prediction, then the variance)" if learned else ""
            raise ValueError(
                f"model_output must have shape {expected} for sample of shape {tuple(sample.shape)}{why}, "
                f"got {tuple(model_output.shape)}"
            )
        if learned:
            return model_output.chunk(2, dim=1)
        return model_output, None

    @staticmethod
    def _check_finite(model_output: torch.Tensor) -> None:
        # Only on the CPU: on an accelerator the check would sync the host every step; pipelines check the
        # final sample there instead.
        # A Python float test of the float32 sum: a third of the cost of a tensor isfinite at small shapes.
        if model_output.device.type == "cpu" and not math.isfinite(
            torch.sum(model_output, dtype=torch.float32).item()
        ):
            raise ValueError("model_output contains NaN or inf; the model diverged or received bad input")

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """Imagen's dynamic thresholding: clamp x̂_0 to [−s, s] and divide by s, s the per-sample quantile of |x̂_0|."""
        dtype = sample.dtype
        # quantile needs float32 or float64; half types are upcast
        flat = sample.reshape(sample.shape[0], -1)
        flat = flat if dtype in (torch.float32, torch.float64) else flat.float()
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1, max=self.config.sample_max_value).unsqueeze(1)
        return (flat.clamp(-s, s) / s).reshape(sample.shape).to(dtype)

    def _clip_or_threshold(self, predicted_x0: torch.Tensor) -> torch.Tensor:
        """Clip or threshold x̂_0 as configured; clipping is in place (``step`` hands over a tensor of its own)."""
        if self.config.thresholding:
            return self._threshold_sample(predicted_x0)
        if self.config.clip_sample:
            return predicted_x0.clamp_(-self.config.clip_sample_range, self.config.clip_sample_range)
        return predicted_x0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> HVAESchedulerOutput | tuple:
        """Draw x_{t'} ~ p_θ(x_{t'} | x_t), t' the previous timestep of the chain.

        x̂_0 is the model output converted from ``prediction_type`` (then clipped or thresholded), the mean is
        μ_θ = c_0 x̂_0 + c_t x_t with the posterior coefficients of ``forward_process.posterior_mean``, and noise of
        the chosen variance is added except at the last step, which returns the mean.

        Args:
            model_output: the model's prediction, shape ``[B, C, ...]`` (``[B, 2C, ...]`` for "learned_range").
            timestep: the current timestep, one of ``self.timesteps``.
            sample: x_t, shape ``[B, C, ...]``.
            generator: for the noise; a list gives one generator per sample.
        """
        index = self._chain_index(timestep)
        model_output, variance_output = self._split_model_output(model_output, sample)
        self._check_finite(model_output)
        (
            x0_from_sample,
            x0_from_output,
            x0_coefficient,
            sample_coefficient,
            noise_std,
            min_log_variance,
            max_log_variance,
        ) = self._step_coefficients[index]

        # Each fresh tensor below is updated in place where its dtype already is the promoted one: the same numbers
        # as out-of-place arithmetic, with no allocation beyond x̂_0, x_{t'} and the noise (at large shapes a fresh
        # allocation costs more than the arithmetic).
        predicted_x0 = sample * x0_from_sample
        if predicted_x0.dtype == model_output.dtype:
            predicted_x0 = predicted_x0.add_(model_output, alpha=x0_from_output)
        else:
            predicted_x0 = predicted_x0.add(model_output, alpha=x0_from_output)
        predicted_x0 = self._clip_or_threshold(predicted_x0)
        prev_sample = torch.mul(predicted_x0, x0_coefficient).add_(sample, alpha=sample_coefficient)

        if index < len(self._step_coefficients) - 1:
            noise = _step_noise(model_output, generator)
            if variance_output is None:
                prev_sample = prev_sample.add_(noise, alpha=noise_std)
            else:
                log_variance = learned_range_log_variance(variance_output, min_log_variance, max_log_variance)
                prev_sample = prev_sample.add_(log_variance.mul_(0.5).exp_().mul_(noise))

        if not return_dict:
            return (prev_sample, predicted_x0)
        return HVAESchedulerOutput(prev_sample=prev_sample, pred_original_sample=predicted_x0)

    # ------------------------------------------------------------------ forward process and HVAE quantities

    def _alphas_cumprod_at(self, timesteps, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t (float64, on ``like``'s device) for a batch of train timesteps, with a ValueError when out of range."""
        timesteps = torch.as_tensor(timesteps, device="cpu").long().reshape(-1)
        if bool(((timesteps < 0) | (timesteps >= self.config.num_train_timesteps)).any()):
            raise ValueError(
                f"timesteps must lie in [0, {self.config.num_train_timesteps}), got {timesteps.tolist()[:8]}..."
            )
        return self.alphas_cumprod[timesteps].to(like.device)

    def _chain_pairs(self, timesteps, like: torch.Tensor):
        """(ᾱ_t, ᾱ_{t'}, chain indices) for a batch of timesteps of the current chain, t' each one's previous."""
        timesteps = torch.as_tensor(timesteps, device="cpu").long().reshape(-1)
        in_range = (timesteps >= 0) & (timesteps < self.config.num_train_timesteps)
        indices = torch.where(in_range, self._chain_index_table[timesteps.clamp(0, len(self) - 1)], -1)
        if bool((indices < 0).any()):
            missing = timesteps[indices < 0].unique().tolist()[:8]
            raise ValueError(
                f"timesteps {missing} are not in the schedule; call set_timesteps and use scheduler.timesteps"
            )
        return (
            self._chain_alphas_cumprod[indices].to(like.device),
            self._chain_prev_alphas_cumprod[indices].to(like.device),
            indices,
        )

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, a draw from q(x_t | x_0), per sample (``timesteps`` of shape ``[B]``)."""
        alphas_cumprod_t = self._alphas_cumprod_at(timesteps, original_samples).to(original_samples.dtype)
        return q_sample(original_samples, noise, alphas_cumprod_t)

    q_sample = add_noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (``sample`` is x_0, as in Diffusers)."""
        return velocity(sample, noise, self._alphas_cumprod_at(timesteps, sample).to(sample.dtype))

    def snr(self, timesteps) -> torch.Tensor:
        """SNR(t) = ᾱ_t / (1 − ᾱ_t), float64, one per timestep."""
        timesteps = torch.as_tensor(timesteps)
        return signal_to_noise_ratio(self._alphas_cumprod_at(timesteps, timesteps))

    def training_target(self, original_samples, noise, timesteps) -> torch.Tensor:
        """What the model should output for x_t made from (x_0, ε) at ``timesteps``, in ``prediction_type``."""
        alphas_cumprod_t = self._alphas_cumprod_at(timesteps, original_samples).to(original_samples.dtype)
        sample = q_sample(original_samples, noise, alphas_cumprod_t)
        return training_target(original_samples, noise, sample, alphas_cumprod_t, self.config.prediction_type)

    def loss_weights(self, timesteps, weighting: str = "simple", snr_gamma: float = 5.0) -> torch.Tensor:
        """Per-sample weights w_t of ‖output − target‖² (summed over dims) for ``elbo.loss_weight``'s weightings.

        With ``"elbo"`` the weighted loss is the denoising-matching KL of each latent (the reconstruction term for
        the first), so its sum over the chain is the negative ELBO up to the prior term and constants.
        """
        timesteps = torch.as_tensor(timesteps)
        alphas_cumprod_t, prev_alphas_cumprod, indices = self._chain_pairs(timesteps, timesteps)
        return elbo_terms_module.loss_weight(
            self.config.prediction_type,
            weighting,
            alphas_cumprod_t,
            prev_alphas_cumprod,
            snr_gamma=snr_gamma,
            first_latent_log_variance=self._chain_fixed_log_variance[indices],
        ).to(timesteps.device)

    def convert_model_output(self, model_output, sample, timesteps, to_type: str) -> torch.Tensor:
        """The model output (in ``prediction_type``) expressed as ``to_type``: "epsilon", "sample", "v_prediction" or "score"."""
        model_output, _ = self._split_model_output(model_output, sample)
        alphas_cumprod_t = self._alphas_cumprod_at(timesteps, sample).to(sample.dtype)
        if alphas_cumprod_t.numel() == 1:
            alphas_cumprod_t = alphas_cumprod_t.expand(sample.shape[0])
        return convert_prediction(model_output, sample, alphas_cumprod_t, self.config.prediction_type, to_type)

    def posterior_mean_variance(self, original_samples, sample, timesteps):
        """Mean and variance of q(x_{t'} | x_t, x_0), t' the chain's previous timestep (``forward_process``)."""
        alphas_cumprod_t, prev_alphas_cumprod, _ = self._chain_pairs(timesteps, sample)
        original_sample_coefficient, sample_coefficient = posterior_mean_coefficients(
            alphas_cumprod_t, prev_alphas_cumprod
        )
        mean = (
            broadcast_to(original_sample_coefficient.to(sample.dtype), sample) * original_samples
            + broadcast_to(sample_coefficient.to(sample.dtype), sample) * sample
        )
        return mean, posterior_variance(alphas_cumprod_t, prev_alphas_cumprod)

    def predicted_mean_log_variance(self, model_output, sample, timesteps):
        """μ_θ, log Σ_θ and x̂_0 of the model's p_θ(x_{t'} | x_t) for a batch (x̂_0 not clipped).

        Returns ``(mean, log_variance, predicted_x0)``: ``log_variance`` has shape ``[B]`` for fixed variances
        (β_t for "fixed_large"; σ_q² for "fixed_small", at the last latent, where σ_q² = 0, the σ_q² of the latent
        before it, as in improved DDPM) and the sample's shape for "learned_range".
        """
        prediction, variance_output = self._split_model_output(model_output, sample)
        alphas_cumprod_t, _, indices = self._chain_pairs(timesteps, sample)
        predicted_x0 = convert_prediction(
            prediction, sample, alphas_cumprod_t.to(sample.dtype), self.config.prediction_type, "sample"
        )
        mean, _ = self.posterior_mean_variance(predicted_x0, sample, timesteps)
        if variance_output is not None:
            min_log_variance = self._chain_min_log_variance[indices].to(sample.device, sample.dtype)
            max_log_variance = self._chain_max_log_variance[indices].to(sample.device, sample.dtype)
            log_variance = learned_range_log_variance(
                variance_output, broadcast_to(min_log_variance, sample), broadcast_to(max_log_variance, sample)
            )
        else:
            log_variance = self._chain_fixed_log_variance[indices].to(sample.device)
        return mean, log_variance, predicted_x0

    def elbo_terms(
        self,
        denoiser,
        original_samples: torch.Tensor,
        generator: torch.Generator | None = None,
        discrete: bool = True,
        num_timesteps: int | None = None,
    ) -> "elbo_terms_module.ELBOTerms":
        """The three ELBO terms of a batch of data for the chain ``self.timesteps``, one denoiser call per latent.

        For each latent t (with previous latent t'), x_t ~ q(x_t | x_0) is drawn once and the term is
        KL(q(x_{t'} | x_t, x_0) ‖ p_θ(x_{t'} | x_t)); the last latent gives the reconstruction
        log p_θ(x_0 | x_1), discretized to 8 bits when ``discrete`` (data in [−1, 1]) and a Gaussian density
        otherwise; the prior term uses the first (noisiest) latent.

        Args:
            denoiser: ``denoiser(x_t, timesteps)`` returning the model output (a tensor or an object with ``.sample``,
                like a Diffusers UNet), called under ``torch.no_grad``.
            original_samples: x_0, ``[B, ...]``.
            num_timesteps: evaluate only this many denoising-matching latents, drawn uniformly without replacement
                (with ``generator``); the total is then an unbiased estimate scaled by ``denoising_scale``.
        """
        chain = self.timesteps.cpu()
        denoising_chain = chain[:-1]
        scale = 1.0
        if num_timesteps is not None:
            if not 1 <= num_timesteps <= len(denoising_chain):
                raise ValueError(f"num_timesteps must be between 1 and {len(denoising_chain)}, got {num_timesteps}")
            pick = torch.randperm(len(denoising_chain), generator=generator)[:num_timesteps].sort().values
            denoising_chain = denoising_chain[pick]
            scale = len(chain[:-1]) / num_timesteps
        batch_size = original_samples.shape[0]
        device, dtype = original_samples.device, original_samples.dtype

        def evaluate(timestep):
            timesteps = torch.full((batch_size,), int(timestep), dtype=torch.long, device=device)
            noise = randn_tensor(original_samples.shape, generator=generator, device=device, dtype=dtype)
            sample = self.add_noise(original_samples, noise, timesteps)
            with torch.no_grad():
                output = denoiser(sample, timesteps)
            output = getattr(output, "sample", output)
            mean, log_variance, _ = self.predicted_mean_log_variance(output, sample, timesteps)
            return sample, timesteps, mean, broadcast_to(log_variance.to(dtype), sample)

        kls = []
        for timestep in denoising_chain.tolist():
            sample, timesteps, model_mean, model_log_variance = evaluate(timestep)
            true_mean, true_variance = self.posterior_mean_variance(original_samples, sample, timesteps)
            true_log_variance = broadcast_to(true_variance.log().to(dtype), sample)
            kls.append(
                elbo_terms_module.denoising_matching_kl(true_mean, true_log_variance, model_mean, model_log_variance)
            )

        _, _, decoder_mean, decoder_log_variance = evaluate(chain[-1])
        if discrete:
            reconstruction = elbo_terms_module.discretized_gaussian_log_likelihood(
                original_samples, decoder_mean, 0.5 * decoder_log_variance
            )
        else:
            reconstruction = elbo_terms_module.gaussian_log_likelihood(
                original_samples, decoder_mean, decoder_log_variance
            )
        prior = elbo_terms_module.prior_matching_kl(original_samples, self.alphas_cumprod[int(chain[0])])
        return elbo_terms_module.ELBOTerms(
            reconstruction=reconstruction,
            prior_matching=prior,
            denoising_matching=torch.stack(kls, dim=1) if kls else original_samples.new_zeros(batch_size, 0),
            timesteps=denoising_chain,
            denoising_scale=scale,
            num_dims=math.prod(original_samples.shape[1:]),
        )
