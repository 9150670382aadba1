"""The evidence lower bound of the diffusion hierarchical VAE, term by term, and the loss weights it implies.

log p(x_0) ≥ E_q(x_1|x_0)[log p_θ(x_0 | x_1)]                                   (reconstruction)
            − KL(q(x_T | x_0) ‖ N(0, I))                                         (prior matching)
            − Σ_{t=2..T} E_q(x_t|x_0)[KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t))]  (denoising matching)

All log-likelihoods and KLs here are in nats and summed over every dimension but the batch one, so they are
per-sample values of shape ``[B]``; ``bits_per_dim`` turns a negative ELBO into bits per dimension.
"""

import math
from dataclasses import dataclass

import torch

from .forward_process import signal_to_noise_ratio
from .parameterization import check_prediction_type

LOSS_WEIGHTINGS = ("simple", "elbo", "min_snr")


def _sum_per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.flatten(1).sum(dim=1)


def normal_kl(mean1, log_variance1, mean2, log_variance2) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^log_variance1) ‖ N(mean2, e^log_variance2)).

    KL = ½ [log σ₂² − log σ₁² + (σ₁² + (μ₁ − μ₂)²) / σ₂² − 1].
    """
    log_variance1 = torch.as_tensor(log_variance1, dtype=mean1.dtype, device=mean1.device)
    log_variance2 = torch.as_tensor(log_variance2, dtype=mean1.dtype, device=mean1.device)
    return 0.5 * (
        log_variance2
        - log_variance1
        + torch.exp(log_variance1 - log_variance2)
        + (mean1 - mean2) ** 2 * torch.exp(-log_variance2)
        - 1.0
    )


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(original_sample, mean, log_scale, num_bins: int = 256) -> torch.Tensor:
    """Per-sample log p(x_0) of 8-bit data in [−1, 1] under a Gaussian discretized into ``num_bins`` bins (DDPM).

    Each value owns the bin [x − 1/255, x + 1/255]; the outermost bins extend to ±∞, so the probabilities of the
    256 bins sum to one:  log p(x_0) = Σ_i log [Φ((x_i + 1/255 − μ_i) / σ) − Φ((x_i − 1/255 − μ_i) / σ)].
    ``log_scale`` is log σ, broadcastable to ``mean``.
    """
    half_bin = 1.0 / (num_bins - 1)
    centered = original_sample - mean
    inverse_scale = torch.exp(-torch.as_tensor(log_scale, dtype=mean.dtype, device=mean.device))
    cdf_plus = _standard_normal_cdf(inverse_scale * (centered + half_bin))
    cdf_minus = _standard_normal_cdf(inverse_scale * (centered - half_bin))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_bin_probability = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    log_probability = torch.where(
        original_sample < -0.999,
        log_cdf_plus,
        torch.where(original_sample > 0.999, log_one_minus_cdf_minus, log_bin_probability),
    )
    return _sum_per_sample(log_probability)


def gaussian_log_likelihood(original_sample, mean, log_variance) -> torch.Tensor:
    """Per-sample log N(x_0; μ, σ² I) for continuous data: −½ Σ_i [log 2π + log σ² + (x_i − μ_i)² / σ²]."""
    log_variance = torch.as_tensor(log_variance, dtype=mean.dtype, device=mean.device)
    return _sum_per_sample(
        -0.5 * (math.log(2 * math.pi) + log_variance + (original_sample - mean) ** 2 * torch.exp(-log_variance))
    )


def prior_matching_kl(original_sample, final_alphas_cumprod) -> torch.Tensor:
    """Per-sample KL(q(x_T | x_0) ‖ N(0, I)) with q(x_T | x_0) = N(√ᾱ_T x_0, (1 − ᾱ_T) I). It has no parameters."""
    final_alphas_cumprod = torch.as_tensor(final_alphas_cumprod, dtype=torch.float64)
    mean = final_alphas_cumprod.sqrt().to(original_sample.dtype) * original_sample
    log_variance = torch.log1p(-final_alphas_cumprod).to(original_sample.dtype)
    return _sum_per_sample(normal_kl(mean, log_variance, torch.zeros_like(mean), 0.0))


def denoising_matching_kl(posterior_mean, posterior_log_variance, model_mean, model_log_variance) -> torch.Tensor:
    """Per-sample KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) between the two diagonal Gaussians.

    With equal variances σ_q² this is ‖μ_θ − μ_q‖² / 2σ_q², the form ``loss_weight`` rewrites per parameterization.
    """
    return _sum_per_sample(normal_kl(posterior_mean, posterior_log_variance, model_mean, model_log_variance))


def bits_per_dim(negative_elbo_nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Bits per dimension of a negative ELBO (or negative log-likelihood) in nats: −ELBO / (D ln 2)."""
    return negative_elbo_nats / (num_dims * math.log(2.0))


def x0_error_jacobian_squared(prediction_type: str, alphas_cumprod_t):
    """(∂x̂_0 / ∂prediction)²: how an error in each parameterization maps to an error in x̂_0 at fixed x_t.

    From the conversions: x̂_0 − x_0 equals the prediction error times 1 ("sample"), −√(1 − ᾱ_t)/√ᾱ_t ("epsilon"),
    −√(1 − ᾱ_t) ("v_prediction") or (1 − ᾱ_t)/√ᾱ_t ("score", Tweedie).
    """
    check_prediction_type(prediction_type)
    one_minus = 1 - alphas_cumprod_t
    return {
        "sample": torch.ones_like(alphas_cumprod_t),
        "epsilon": one_minus / alphas_cumprod_t,
        "v_prediction": one_minus,
        "score": one_minus**2 / alphas_cumprod_t,
    }[prediction_type]


def loss_weight(
    prediction_type: str,
    weighting: str,
    alphas_cumprod_t: torch.Tensor,
    prev_alphas_cumprod: torch.Tensor,
    snr_gamma: float = 5.0,
    first_latent_log_variance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-timestep weight w_t so that w_t ‖prediction − target‖² (summed over dimensions) is the chosen objective.

    Each weighting fixes a weight λ_t on the x_0 error ‖x̂_0 − x_0‖², then ``x0_error_jacobian_squared`` carries it
    to the model's own parameterization:

    - ``"elbo"``: λ_t = ½ (SNR(t−1) − SNR(t)), which makes w_t ‖·‖² exactly the denoising-matching KL
      ‖μ_θ − μ_q‖² / 2σ_q². In ε terms that is (1/2σ_q²) (1 − α_t)² / ((1 − ᾱ_t) α_t), in score terms
      (1/2σ_q²) (1 − α_t)² / α_t (the table in THEORY.md). For the first latent (ᾱ_{t−1} = 1) the term is the
      reconstruction −log N(x_0; x̂_0, σ_1²), so λ = 1 / 2σ_1² with σ_1² = exp(``first_latent_log_variance``).
    - ``"simple"``: the DDPM objective, a uniform MSE on ε, whatever the model predicts: λ_t = SNR(t).
    - ``"min_snr"``: Min-SNR-γ (Hang et al. 2023): λ_t = min(SNR(t), γ) with γ = ``snr_gamma``.

    Args:
        alphas_cumprod_t, prev_alphas_cumprod: ᾱ_t and ᾱ_{t−1} (1 for the first latent), float tensors ``[B]``.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    if weighting == "min_snr" and not snr_gamma > 0:
        raise ValueError(f"snr_gamma must be > 0 for min_snr weighting, got {snr_gamma!r}")
    alphas_cumprod_t = torch.as_tensor(alphas_cumprod_t, dtype=torch.float64)
    prev_alphas_cumprod = torch.as_tensor(prev_alphas_cumprod, dtype=torch.float64, device=alphas_cumprod_t.device)
    snr = signal_to_noise_ratio(alphas_cumprod_t)
    if weighting == "simple":
        x0_weight = snr
    elif weighting == "min_snr":
        x0_weight = snr.clamp(max=snr_gamma)
    else:
        is_first_latent = prev_alphas_cumprod >= 1
        safe_prev = torch.where(is_first_latent, alphas_cumprod_t, prev_alphas_cumprod)
        x0_weight = 0.5 * (signal_to_noise_ratio(safe_prev) - snr)
        if bool(is_first_latent.any()):
            if first_latent_log_variance is None:
                raise ValueError("first_latent_log_variance is required for elbo weighting at the first latent")
            first_weight = 0.5 * torch.exp(-torch.as_tensor(first_latent_log_variance, dtype=torch.float64))
            x0_weight = torch.where(is_first_latent, first_weight.to(x0_weight.device), x0_weight)
    return x0_weight * x0_error_jacobian_squared(prediction_type, alphas_cumprod_t)


def weighted_mse(prediction, target, weight) -> torch.Tensor:
    """Per-sample w_t Σ_i (prediction_i − target_i)², computed in float32 or wider."""
    squared_error = _sum_per_sample((prediction.float() - target.float()) ** 2)
    return torch.as_tensor(weight, device=squared_error.device).to(squared_error.dtype) * squared_error


@dataclass
class ELBOTerms:
    """The ELBO of a batch, term by term, in nats per sample (shape ``[B]`` unless stated).

    Attributes:
        reconstruction: E[log p_θ(x_0 | x_1)] (a single-sample Monte Carlo estimate per data point).
        prior_matching: KL(q(x_T | x_0) ‖ N(0, I)).
        denoising_matching: the KL of each latent, ``[B, num_terms]``, columns in the order of ``timesteps``.
        timesteps: the timesteps of the latents whose KLs were evaluated, ``[num_terms]``.
        denoising_scale: the factor that turns the sum of the evaluated columns into an unbiased estimate of the
            sum over all latents (1 when every latent was evaluated).
        num_dims: D, the dimensions of one sample.
    """

    reconstruction: torch.Tensor
    prior_matching: torch.Tensor
    denoising_matching: torch.Tensor
    timesteps: torch.Tensor
    denoising_scale: float
    num_dims: int

    @property
    def denoising_matching_total(self) -> torch.Tensor:
        """Σ_t KL per sample (estimated from the evaluated latents when only some were)."""
        return self.denoising_scale * self.denoising_matching.sum(dim=1)

    @property
    def elbo(self) -> torch.Tensor:
        """reconstruction − prior matching − Σ denoising matching, nats per sample."""
        return self.reconstruction - self.prior_matching - self.denoising_matching_total

    @property
    def bits_per_dim(self) -> torch.Tensor:
        """−ELBO / (D ln 2) per sample."""
        return bits_per_dim(-self.elbo, self.num_dims)
