"""HVAEScheduler: ancestral sampling of the diffusion hierarchical VAE, as a Diffusers scheduler.

It is Diffusers' ``DDPMScheduler``, whose ``step`` already is the HVAE's p_θ(x_{t'} | x_t) (including α = ᾱ_t / ᾱ_{t'}
between the kept latents of a respaced chain), plus what the HVAE view adds: the "score" parameterization, float64
schedule tables, each step's coefficients precomputed once per chain, a check for non-finite input, and the HVAE
quantities (q(x_t | x_0), the posterior q(x_{t'} | x_t, x_0), p_θ(x_{t'} | x_t) and the loss weights) that ``elbo``
and the training code read. Its constructor runs DDPMScheduler's, then puts float64 tables in place of the float32
ones, so every method it inherits (the timestep spacings, ``_get_variance``, dynamic thresholding,
``scale_model_input``, ``__len__``, saving and loading) is DDPMScheduler's own and gives DDPMScheduler's results.
"""

import math
import numbers

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

# Diffusers' pipeline loader imports a component's module and looks up the loadable base classes there by name, so
# SchedulerMixin must be importable from this module for saved pipelines to load.
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin  # noqa: F401
from diffusers.utils.torch_utils import randn_tensor

from . import elbo
from .forward_process import (
    BETA_SCHEDULES,
    alphas_cumprod_from_betas,
    broadcast_to,
    clamp_zero_terminal_alphas_cumprod,
    learned_range_log_variance,
    make_betas,
    posterior_mean_coefficients,
    posterior_variance,
    q_sample,
    rescale_zero_terminal_snr,
    signal_to_noise_ratio,
    step_alphas,
)
from .parameterization import (
    PREDICTION_TYPES,
    convert_prediction,
    split_learned_variance,
    training_target,
    velocity,
)

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_bool(name, value):
    # A config edited by hand can hold the string "false", which is truthy.
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


def _check_number(name, value, low=None, high=None):
    """``value`` must be a real number, in (low, high] when bounds are given."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or (low is not None and not value > low) or (high is not None and value > high):
        raise ValueError(f"{name} must be a finite number in ({low}, {high}], got {value!r}")


def _check_int(name, value, minimum):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")


def _is_finite(values: torch.Tensor) -> bool:
    """Whether every element is finite, at the cost of one summation in the common case.

    The float32 sum is the cheapest reduction (an ``isfinite(...).all()`` costs 20× more on the CPU), but it
    overflows for large finite values, so a non-finite sum is confirmed elementwise before the answer is no.
    """
    return math.isfinite(torch.sum(values, dtype=torch.float32).item()) or bool(torch.isfinite(values).all())


class HVAEScheduler(DDPMScheduler):
    """Ancestral sampler of the diffusion HVAE with the fixed encoder q(x_t | x_{t−1}) = N(√α_t x_{t−1}, (1 − α_t) I).

    Each ``step`` draws x_{t'} ~ p_θ(x_{t'} | x_t) = N(μ_θ, Σ), where μ_θ is the posterior mean μ_q with the model's
    x̂_0 in place of x_0 and t' is the previous timestep of the chain (α = ᾱ_t / ᾱ_{t'} between kept latents, as in
    ``DDPMScheduler``). Its samples equal DDPMScheduler's from the same seed; the last step returns the decoder's mean
    (DDPMScheduler adds noise there whenever t > 0, as at the end of a "trailing" chain).

    The constructor takes DDPMScheduler's arguments with its defaults, so configs load either way and into
    ``DDIMScheduler``, ``DPMSolverMultistepScheduler``, ``EulerDiscreteScheduler`` and the other Karras schedulers.
    To give explicit per-step alphas use ``HVAEScheduler.from_alphas``: they are stored as ``trained_betas`` = 1 − α,
    which every Diffusers scheduler understands. What differs from DDPMScheduler:

    - ``prediction_type`` may also be "score" (∇log p(x_t)).
    - ``betas``, ``alphas`` and ``alphas_cumprod`` are float64 (1 − ᾱ_t near t = 0 loses digits in float32).
    - ``variance_type`` "fixed_large_log" is β_t, like "fixed_large" (Glide's max_log); DDPMScheduler's ``step``
      takes the square root of log β_t there, which is NaN. "learned" reads the variance channels as Σ itself, as
      DDPMScheduler does. A model with 2C output channels may be sampled with a fixed variance: the variance channels
      are then ignored.
    - Non-finite model output or sample raises a ``ValueError`` on the CPU; ``prev_sample`` and
      ``pred_original_sample`` keep the sample's dtype whatever the model output's.
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
        _check_int("num_train_timesteps", num_train_timesteps, 1)
        _check_int("steps_offset", steps_offset, 0)
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("variance_type", variance_type, VARIANCE_TYPES)
        _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        for name, value in (
            ("clip_sample", clip_sample),
            ("thresholding", thresholding),
            ("rescale_betas_zero_snr", rescale_betas_zero_snr),
        ):
            _check_bool(name, value)
        _check_number("dynamic_thresholding_ratio", dynamic_thresholding_ratio, 0, 1)
        _check_number("clip_sample_range", clip_sample_range, 0)
        _check_number("sample_max_value", sample_max_value, 0)
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
            _check_number("beta_start", beta_start)
            _check_number("beta_end", beta_end)
            betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
            if not bool(((betas > 0) & (betas <= 1)).all()):
                raise ValueError(
                    f"beta_start={beta_start} and beta_end={beta_end} give betas outside (0, 1] for "
                    f"beta_schedule={beta_schedule!r} (min {float(betas.min()):.3g}, max {float(betas.max()):.3g})"
                )
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)

        # DDPMScheduler's constructor sets every attribute its methods read; its float32 tables are then replaced by
        # float64 ones of the same schedule.
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            variance_type=variance_type,
            clip_sample=clip_sample,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self.betas = betas
        self.alphas = 1.0 - betas
        # ᾱ_T = 0 (zero terminal SNR, or a β_T = 1 given explicitly) makes x̂_0 from ε or a score undefined at the
        # first step; like Diffusers' Euler scheduler it is kept a hair above 0, and below ᾱ_{T−1} so the ELBO holds.
        self.alphas_cumprod = clamp_zero_terminal_alphas_cumprod(alphas_cumprod_from_betas(betas))
        self._begin_index = None
        self._set_chain(self.timesteps)

    @classmethod
    def from_alphas(cls, alphas, **kwargs) -> "HVAEScheduler":
        """A scheduler for explicit per-step α_1..α_T in [0, 1), stored as ``trained_betas`` = 1 − α_t."""
        alphas = np.asarray(alphas, dtype=np.float64)
        if alphas.ndim != 1 or not ((alphas >= 0) & (alphas < 1)).all():
            raise ValueError("alphas must be a 1-D sequence of values in [0, 1)")
        return cls(num_train_timesteps=len(alphas), trained_betas=(1.0 - alphas).tolist(), **kwargs)

    # ------------------------------------------------------------------ the chain of latents being sampled

    def _set_chain(self, timesteps: torch.Tensor) -> None:
        """Precompute, once per chain, every per-step coefficient that ``step`` needs (float64, then to floats)."""
        timesteps = timesteps.cpu().long()
        # Host copies: ``step`` and the batch lookups read them without a device sync.
        self._chain_timesteps = timesteps.tolist()
        self._index_of_timestep = {t: i for i, t in enumerate(self._chain_timesteps)}
        self._chain_index_table = torch.full((self.config.num_train_timesteps,), -1, dtype=torch.long)
        self._chain_index_table[timesteps] = torch.arange(len(timesteps))
        previous = torch.cat([timesteps[1:], torch.tensor([-1])])
        self._previous_timesteps = previous.tolist()
        self._step_index = None

        alphas_cumprod_t = self.alphas_cumprod[timesteps]
        prev_alphas_cumprod = torch.where(previous >= 0, self.alphas_cumprod[previous.clamp(min=0)], 1.0)
        x0_coefficient, sample_coefficient = posterior_mean_coefficients(alphas_cumprod_t, prev_alphas_cumprod)
        variance_small = posterior_variance(alphas_cumprod_t, prev_alphas_cumprod)
        step_betas = 1 - step_alphas(alphas_cumprod_t, prev_alphas_cumprod)
        # σ_q² of the last step is 0; as in improved DDPM, its log uses the step before (or β when there is none).
        clip_value = variance_small[-2] if len(timesteps) > 1 else step_betas[-1]
        min_log_variance = torch.where(variance_small > 0, variance_small, clip_value).log()

        # x̂_0 is affine in (x_t, model output): read both weights off the one conversion function.
        ones, zeros = torch.ones_like(alphas_cumprod_t), torch.zeros_like(alphas_cumprod_t)
        prediction_type = self.config.prediction_type
        x0_from_sample = convert_prediction(zeros, ones, alphas_cumprod_t, prediction_type, "sample")
        x0_from_output = convert_prediction(ones, zeros, alphas_cumprod_t, prediction_type, "sample")

        # ``step`` reads the (frozen) config through these: a config lookup costs more than a small step's arithmetic.
        self._chain_alphas_cumprod = alphas_cumprod_t
        self._chain_prev_alphas_cumprod = prev_alphas_cumprod
        self._chain_min_log_variance = min_log_variance
        self._chain_max_log_variance = step_betas.log()
        # log Σ of the fixed variance types at every latent, the decoder p_θ(x_0 | x_t) included: "fixed_large" is
        # β_t throughout (Bayes-optimal for data broad compared with √β_t, so the ELBO of continuous data tightens to
        # log p(x_0) as T grows); "fixed_small" uses the clipped σ_q² (improved DDPM), suited to data on a grid.
        # The learned types use σ_q² here, for the loss weights (see ``elbo.loss_weight``).
        large = self.config.variance_type.startswith("fixed_large")
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
        """DDPMScheduler's ``set_timesteps``, with errors that name the argument, then the chain's coefficients.

        Args:
            num_inference_steps: how many latents, 1 ≤ n ≤ ``num_train_timesteps``, spaced by ``timestep_spacing``.
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
            super().set_timesteps(device=device, timesteps=timesteps.tolist())
            self.num_inference_steps = len(timesteps)
        else:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
                raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
            if not 1 <= num_inference_steps <= num_train_timesteps:
                raise ValueError(
                    f"num_inference_steps must be between 1 and num_train_timesteps={num_train_timesteps}, "
                    f"got {num_inference_steps}"
                )
            super().set_timesteps(int(num_inference_steps), device=device)
            if int(self.timesteps[0]) >= num_train_timesteps:
                raise ValueError(
                    f"steps_offset={self.config.steps_offset} pushes the first timestep past num_train_timesteps"
                )
        self._begin_index = None
        self._set_chain(self.timesteps)

    # Diffusers' step-index convention (as in EulerDiscreteScheduler): a counter set by the first ``step`` (or by
    # ``set_begin_index``) and advanced by each step, so a timestep on an accelerator is never read back to the host.

    # Copied from diffusers.schedulers.scheduling_dpmsolver_multistep.DPMSolverMultistepScheduler.step_index
    @property
    def step_index(self):
        """
        The index counter for current timestep. It will increase 1 after each scheduler step.
        """
        return self._step_index

    # Copied from diffusers.schedulers.scheduling_dpmsolver_multistep.DPMSolverMultistepScheduler.begin_index
    @property
    def begin_index(self):
        """
        The index for the first timestep. It should be set from pipeline with `set_begin_index` method.
        """
        return self._begin_index

    # Copied from diffusers.schedulers.scheduling_dpmsolver_multistep.DPMSolverMultistepScheduler.set_begin_index
    def set_begin_index(self, begin_index: int = 0) -> None:
        """
        Sets the begin index for the scheduler. This function should be run from pipeline before the inference.

        Args:
            begin_index (`int`, defaults to `0`):
                The begin index for the scheduler.
        """
        self._begin_index = begin_index

    def index_for_timestep(self, timestep) -> int:
        """Position of ``timestep`` in the chain; a ``ValueError`` if it is not one of ``self.timesteps``."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a single value, got shape {tuple(timestep.shape)}")
            timestep = timestep.item()
        index = self._index_of_timestep.get(int(timestep)) if float(timestep).is_integer() else None
        if index is None:
            raise ValueError(
                f"timestep {timestep} is not in the schedule; call set_timesteps and use scheduler.timesteps"
            )
        return index

    def _current_index(self, timestep) -> int:
        """The step index of ``timestep``: the counter, checked against ``timestep`` when that costs no device sync.

        A Python number or a CPU tensor that disagrees with the counter (a chain stepped again, or a step at another
        of its timesteps) is looked up afresh; an accelerator tensor is trusted to follow the counter, as Diffusers'
        schedulers trust it.
        """
        index = self._step_index if self._step_index is not None else self._begin_index
        if index is None or index >= len(self._chain_timesteps):
            return self.index_for_timestep(timestep)
        if isinstance(timestep, torch.Tensor):
            if timestep.device.type != "cpu":
                return index
            if timestep.numel() != 1:
                return self.index_for_timestep(timestep)
            timestep = timestep.item()  # a Python comparison costs a tenth of a tensor one
        return index if timestep == self._chain_timesteps[index] else self.index_for_timestep(timestep)

    def previous_timestep(self, timestep) -> int:
        """The timestep of the next latent of the chain (−1 after the last one, where x_0 comes out)."""
        return self._previous_timesteps[self.index_for_timestep(timestep)]

    # ------------------------------------------------------------------ sampling

    def _split_model_output(self, model_output: torch.Tensor, sample: torch.Tensor):
        """(prediction, variance channels or None), with a ``ValueError`` unless the shapes fit ``variance_type``."""
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise TypeError("model_output and sample must be torch.Tensor")
        prediction, variance_output = split_learned_variance(model_output, sample)
        variance_type = self.variance_type
        learned = variance_type in LEARNED_VARIANCE_TYPES
        if prediction.shape != sample.shape or (learned and variance_output is None):
            channels = f"2C = {2 * sample.shape[1]}" if learned else f"C = {sample.shape[1]} or 2C"
            why = f" ({variance_type} needs 2C channels: the prediction, then the variance)" if learned else ""
            raise ValueError(
                f"model_output must have the sample's shape {tuple(sample.shape)} with {channels} channels{why}, "
                f"got {tuple(model_output.shape)}"
            )
        return prediction, (variance_output if learned else None)

    def _learned_log_variance(self, variance_output, min_log_variance, max_log_variance):
        """log Σ_θ from the variance channels: the variance itself for "learned" (as DDPMScheduler reads it)."""
        if self.variance_type == "learned":
            return variance_output.log()
        return learned_range_log_variance(variance_output, min_log_variance, max_log_variance)

    def _learned_noise_std(self, variance_output, min_log_variance: float, max_log_variance: float):
        """√Σ_θ of one step from the variance channels, in as few passes as the equation allows."""
        if self.variance_type == "learned":
            return variance_output.sqrt()
        # learned_range's log Σ is linear in the two bounds: halving them gives ½ log Σ = log √Σ directly.
        return learned_range_log_variance(variance_output, 0.5 * min_log_variance, 0.5 * max_log_variance).exp_()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple:
        """Draw x_{t'} ~ p_θ(x_{t'} | x_t), t' the previous timestep of the chain.

        x̂_0 is the model output converted from ``prediction_type`` (then clipped or thresholded), the mean is
        μ_θ = c_0 x̂_0 + c_t x_t with the posterior coefficients of ``forward_process.posterior_mean``, and noise of
        the chosen variance is added except at the last step, which returns the mean.

        Args:
            model_output: the model's prediction, shape ``[B, C, ...]`` (``[B, 2C, ...]`` for a learned variance).
            timestep: the current timestep, one of ``self.timesteps``.
            sample: x_t, shape ``[B, C, ...]``.
            generator: for the noise; a list gives one generator per sample.
        """
        index = self._current_index(timestep)
        prediction, variance_output = self._split_model_output(model_output, sample)
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
        if predicted_x0.dtype == prediction.dtype:
            predicted_x0 = predicted_x0.add_(prediction, alpha=x0_from_output)
        else:
            predicted_x0 = predicted_x0.add(prediction, alpha=x0_from_output)
        # Only on the CPU: on an accelerator the check would sync the host every step; pipelines check the final
        # sample there. x̂_0 before clipping is non-finite wherever the model output or x_t is (all four
        # conversions weigh both by non-zero factors), so one check covers both.
        if sample.device.type == "cpu":
            if not _is_finite(predicted_x0):
                raise ValueError(
                    "model_output or sample contains NaN or inf; the model diverged or received bad input"
                )
            if variance_output is not None and not _is_finite(variance_output):
                raise ValueError("the variance channels of model_output contain NaN or inf")
        # Read per step, not per chain: guided pipelines clip x̂_0 themselves and switch clipping off around `step`.
        if self.config.thresholding:
            predicted_x0 = self._threshold_sample(predicted_x0)
        elif self.config.clip_sample:
            clip_range = self.config.clip_sample_range
            predicted_x0 = predicted_x0.clamp_(-clip_range, clip_range)
        if index == len(self._step_coefficients) - 1:
            prev_sample = torch.mul(predicted_x0, x0_coefficient).add_(sample, alpha=sample_coefficient)
        else:
            # Drawn in the sample's dtype, so a seed gives the same noise whatever precision the model answers in.
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            if variance_output is None:
                noise = noise.mul_(noise_std)
            else:
                noise = noise.mul_(self._learned_noise_std(variance_output, min_log_variance, max_log_variance))
            # x_{t'} = √Σ z + c_0 x̂_0 + c_t x_t, accumulated in the noise's buffer: one allocation fewer.
            prev_sample = noise.add_(predicted_x0, alpha=x0_coefficient).add_(sample, alpha=sample_coefficient)
        # The chain keeps the sample's dtype, whatever precision the model answered in.
        if predicted_x0.dtype != sample.dtype:
            prev_sample, predicted_x0 = prev_sample.to(sample.dtype), predicted_x0.to(sample.dtype)
        self._step_index = index + 1

        if not return_dict:
            return (prev_sample, predicted_x0)
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=predicted_x0)

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
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, a draw from q(x_t | x_0), per sample (``timesteps`` of shape ``[B]``).

        DDPMScheduler's, with the roots taken in float64 before the cast to the sample's dtype.
        """
        return q_sample(original_samples, noise, self._alphas_cumprod_at(timesteps, original_samples))

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (``sample`` is x_0, as in Diffusers)."""
        return velocity(sample, noise, self._alphas_cumprod_at(timesteps, sample))

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

        With ``"elbo"`` the weighted loss is the μ-dependent part of the denoising-matching KL of each latent under
        this scheduler's Σ (the reconstruction term for the first), so its sum over the chain is the negative ELBO up
        to terms free of the mean. The learned variance types weigh with Σ = σ_q² (see ``elbo.loss_weight``).
        """
        timesteps = torch.as_tensor(timesteps)
        alphas_cumprod_t, prev_alphas_cumprod, indices = self._chain_pairs(timesteps, timesteps)
        return elbo.loss_weight(
            self.config.prediction_type,
            weighting,
            alphas_cumprod_t,
            prev_alphas_cumprod,
            snr_gamma=snr_gamma,
            model_log_variance=self._chain_fixed_log_variance[indices],
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
        (β_t for "fixed_large" and "fixed_large_log"; σ_q² for "fixed_small" and "fixed_small_log", at the last latent,
        where σ_q² = 0, the σ_q² of the latent before it, as in improved DDPM) and the sample's shape for the learned
        types.
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
            log_variance = self._learned_log_variance(
                variance_output, broadcast_to(min_log_variance, sample), broadcast_to(max_log_variance, sample)
            )
        else:
            log_variance = self._chain_fixed_log_variance[indices].to(sample.device)
        return mean, log_variance, predicted_x0
