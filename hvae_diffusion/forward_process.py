"""The fixed encoder of the hierarchical VAE: noise schedules, q(x_t | x_0) and the posterior q(x_{t-1} | x_t, x_0).

Notation (see docs/theory.md): α_t is the per-step signal kept, β_t = 1 − α_t, ᾱ_t = Π_{s≤t} α_s and
SNR(t) = ᾱ_t / (1 − ᾱ_t). As in Diffusers, timesteps are indexed 0..T−1 and ``alphas_cumprod[t]`` is ᾱ at index t;
the "previous" ᾱ of the first latent is 1 (x_0 is the data).

Every function here is pure. Schedules are built in float64 because 1 − ᾱ_t near t = 0 loses digits in float32,
and bits/dim is sensitive to exactly those steps.
"""

import math

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


# Adapted from diffusers.schedulers.scheduling_ddpm.betas_for_alpha_bar (alpha_transform_type="cosine"), in float64
def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the improved-DDPM cosine schedule ("squaredcos_cap_v2").

    ᾱ(s) = cos²((s + 0.008) / 1.008 · π/2) and β_t = min(1 − ᾱ((t+1)/T) / ᾱ(t/T), max_beta).
    """

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((t + 1) / num_train_timesteps) / alpha_bar(t / num_train_timesteps), max_beta)
        for t in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


# Adapted from diffusers.schedulers.scheduling_ddpm.DDPMScheduler.__init__ (its beta_schedule branches), in float64
def make_betas(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> torch.Tensor:
    """The float64 betas β_1..β_T of one of Diffusers' named schedules, shape ``[num_train_timesteps]``.

    - ``linear``: β_t evenly spaced from ``beta_start`` to ``beta_end`` (DDPM).
    - ``scaled_linear``: √β_t evenly spaced (latent diffusion).
    - ``squaredcos_cap_v2``: the cosine schedule of improved DDPM (``beta_start``/``beta_end`` unused).
    - ``sigmoid``: β_t = sigmoid(linspace(−6, 6)) · (beta_end − beta_start) + beta_start (GeoDiff).
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return cosine_betas(num_train_timesteps)
    return (
        torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps, dtype=torch.float64)) * (beta_end - beta_start)
        + beta_start
    )


# Adapted from diffusers.schedulers.scheduling_ddim.rescale_zero_terminal_snr, in float64
def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that SNR(T) = 0 (Lin et al. 2023, Algorithm 1).

    √ᾱ_t is shifted so its last value is 0, then scaled so its first value is unchanged:
    √ᾱ'_t = (√ᾱ_t − √ᾱ_T) · √ᾱ_1 / (√ᾱ_1 − √ᾱ_T). The result has β_T = 1 exactly.
    """
    sqrt_alphas_cumprod = torch.cumprod(1 - betas.double(), dim=0).sqrt()
    first, last = sqrt_alphas_cumprod[0].clone(), sqrt_alphas_cumprod[-1].clone()
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * first / (first - last)
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def clamp_zero_terminal_alphas_cumprod(alphas_cumprod: torch.Tensor, floor: float = 2**-24) -> torch.Tensor:
    """ᾱ with a last value of 0 (zero terminal SNR) raised to a positive one that keeps ᾱ strictly decreasing.

    x̂_0 from ε or a score is undefined at ᾱ_T = 0, so the last value becomes
    ᾱ_T = min(``floor``, ᾱ_{T−1}² / ᾱ_{T−2}) (ᾱ_{T−2} = 1 when there is no such step): at most Diffusers' 2⁻²⁴ (its
    Euler scheduler's), and never above the value before it, where a fixed 2⁻²⁴ would make ᾱ rise again (the
    rescaled linear schedule at T = 1000 has ᾱ_{T−1} ≈ 4e-9) and the last step's posterior variance negative.
    The geometric continuation of the last step keeps log-SNR smooth there. Other tables are returned unchanged.
    """
    alphas_cumprod = alphas_cumprod.clone()
    if alphas_cumprod[-1] != 0:
        return alphas_cumprod
    before = alphas_cumprod[-2] if len(alphas_cumprod) > 1 else alphas_cumprod.new_tensor(1.0)
    earlier = alphas_cumprod[-3] if len(alphas_cumprod) > 2 else alphas_cumprod.new_tensor(1.0)
    alphas_cumprod[-1] = torch.minimum(before**2 / earlier, alphas_cumprod.new_tensor(floor))
    return alphas_cumprod


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = Π_{s≤t} (1 − β_s), computed in float64."""
    return torch.cumprod(1 - betas.double(), dim=0)


def step_alphas(alphas_cumprod: torch.Tensor, prev_alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The α of the single step between two kept latents t' < t: α = ᾱ_t / ᾱ_{t'}.

    On the full chain this is α_t; on a subsequence of timesteps (respacing) it makes the sampler the exact
    hierarchical VAE with fewer latents instead of reusing the 1000-step coefficients.
    """
    return alphas_cumprod / prev_alphas_cumprod


def signal_to_noise_ratio(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t)."""
    return alphas_cumprod / (1 - alphas_cumprod)


def broadcast_to(coefficient: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """View a per-sample coefficient (a scalar or shape ``[B]``) so it broadcasts against ``sample`` ``[B, ...]``.

    Python numbers pass through untouched: they are the cheapest scalars for torch's arithmetic; so do tensors that
    already have ``sample``'s rank (per-element coefficients, such as a learned variance).
    """
    if isinstance(coefficient, (int, float)):
        return coefficient
    coefficient = torch.as_tensor(coefficient, device=sample.device)
    if coefficient.ndim in (0, sample.ndim):
        return coefficient
    return coefficient.reshape(coefficient.shape[0], *([1] * (sample.ndim - 1)))


def signal_and_noise_scales(alphas_cumprod_t, sample: torch.Tensor):
    """(√ᾱ, √(1 − ᾱ)) shaped to broadcast against ``sample`` (ᾱ a Python number, a scalar tensor or ``[B]``).

    Python numbers stay Python floats (the cheapest scalars on a hot path, exact in double precision); tensors are
    rooted at their own precision, so a float64 schedule keeps 1 − ᾱ near t = 0 exact, then cast to ``sample``'s dtype.
    """
    if isinstance(alphas_cumprod_t, (int, float)):
        return alphas_cumprod_t**0.5, (1 - alphas_cumprod_t) ** 0.5
    alphas_cumprod_t = torch.as_tensor(broadcast_to(torch.as_tensor(alphas_cumprod_t), sample))
    return alphas_cumprod_t.sqrt().to(sample.dtype), (1 - alphas_cumprod_t).sqrt().to(sample.dtype)


def forward_step_sample(previous_sample: torch.Tensor, alpha: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One encoder step x_t ~ q(x_t | x_{t−1}) = N(√α_t x_{t−1}, (1 − α_t) I): x_t = √α_t x_{t−1} + √(1 − α_t) ε."""
    sqrt_alpha, sqrt_beta = signal_and_noise_scales(alpha, previous_sample)
    return sqrt_alpha * previous_sample + sqrt_beta * noise


def q_sample(original_sample: torch.Tensor, noise: torch.Tensor, alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    """A draw from q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I): x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε.

    Args:
        original_sample: x_0, shape ``[B, ...]``.
        noise: ε ~ N(0, I), same shape.
        alphas_cumprod_t: ᾱ_t, a scalar or shape ``[B]``.
    """
    sqrt_alpha, sqrt_one_minus_alpha = signal_and_noise_scales(alphas_cumprod_t, original_sample)
    return sqrt_alpha * original_sample + sqrt_one_minus_alpha * noise


def posterior_mean_coefficients(alphas_cumprod_t: torch.Tensor, prev_alphas_cumprod: torch.Tensor):
    """The weights (of x_0, of x_t) in the posterior mean μ_q of q(x_{t−1} | x_t, x_0).

    With α_t = ᾱ_t / ᾱ_{t−1}:  μ_q = [√ᾱ_{t−1} (1 − α_t) x_0 + √α_t (1 − ᾱ_{t−1}) x_t] / (1 − ᾱ_t).
    """
    alpha_t = step_alphas(alphas_cumprod_t, prev_alphas_cumprod)
    original_sample_coefficient = prev_alphas_cumprod.sqrt() * (1 - alpha_t) / (1 - alphas_cumprod_t)
    sample_coefficient = alpha_t.sqrt() * (1 - prev_alphas_cumprod) / (1 - alphas_cumprod_t)
    return original_sample_coefficient, sample_coefficient


def posterior_mean(
    original_sample: torch.Tensor,
    sample: torch.Tensor,
    alphas_cumprod_t: torch.Tensor,
    prev_alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """Mean of the ground-truth denoising posterior q(x_{t−1} | x_t, x_0).

    μ_q = [√α_t (1 − ᾱ_{t−1}) x_t + √ᾱ_{t−1} (1 − α_t) x_0] / (1 − ᾱ_t), α_t = ᾱ_t / ᾱ_{t−1}.

    Args:
        original_sample: x_0 (or a prediction of it), shape ``[B, ...]``.
        sample: x_t, same shape.
        alphas_cumprod_t, prev_alphas_cumprod: ᾱ_t and ᾱ_{t−1} (1 for the first latent), scalars or ``[B]``.
    """
    original_sample_coefficient, sample_coefficient = posterior_mean_coefficients(
        torch.as_tensor(alphas_cumprod_t), torch.as_tensor(prev_alphas_cumprod)
    )
    return (
        broadcast_to(original_sample_coefficient, sample) * original_sample
        + broadcast_to(sample_coefficient, sample) * sample
    )


def posterior_variance(alphas_cumprod_t: torch.Tensor, prev_alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Variance of q(x_{t−1} | x_t, x_0) ("fixed_small"): σ_q² = (1 − α_t)(1 − ᾱ_{t−1}) / (1 − ᾱ_t)."""
    alpha_t = step_alphas(alphas_cumprod_t, prev_alphas_cumprod)
    return (1 - alpha_t) * (1 - prev_alphas_cumprod) / (1 - alphas_cumprod_t)


def learned_range_log_variance(variance_fraction, min_log_variance, max_log_variance):
    """log Σ_θ of improved DDPM's "learned_range": v log β_t + (1 − v) log σ_q², with v = (output + 1) / 2.

    ``variance_fraction`` is the model's extra output, nominally in [−1, 1]; ``min_log_variance`` is log σ_q²
    (clipped away from −∞ at the first latent) and ``max_log_variance`` is log β_t, both broadcastable to it.
    """
    # The same interpolation as one multiply-add in the output: (max + min)/2 + output · (max − min)/2.
    half_range = (max_log_variance - min_log_variance) / 2
    midpoint = (max_log_variance + min_log_variance) / 2
    return variance_fraction * half_range + midpoint
