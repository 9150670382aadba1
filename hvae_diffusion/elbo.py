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
from diffusers.utils.torch_utils import randn_tensor

from .forward_process import (
    broadcast_to,
    posterior_mean_coefficients,
    posterior_variance,
    signal_to_noise_ratio,
)
from .parameterization import check_prediction_type

LOSS_WEIGHTINGS = ("simple", "elbo", "min_snr")
DECODER_VARIANCES = ("model", "improved_ddpm")


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


def denoising_x0_weight(alphas_cumprod_t, prev_alphas_cumprod, model_log_variance) -> torch.Tensor:
    """λ_t, the weight of ‖x̂_0 − x_0‖² in the denoising-matching KL when p_θ's variance is Σ_t = e^model_log_variance.

    With c_t the x_0 weight of the posterior mean (``forward_process.posterior_mean_coefficients``),
    KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) = c_t² ‖x̂_0 − x_0‖² / 2Σ_t + ½ D [log Σ_t − log σ_q² + σ_q²/Σ_t − 1],
    and the second part does not depend on the mean, so λ_t = c_t² / 2Σ_t. With Σ_t = σ_q² ("fixed_small") this is
    ½ (SNR(t−1) − SNR(t)); with Σ_t = β_t ("fixed_large") it is that times σ_q²/β_t. At the first latent
    (ᾱ_{t−1} = 1, c = 1) the same λ = 1/2Σ_1 makes the Gaussian reconstruction −log N(x_0; x̂_0, Σ_1) up to its
    constant.
    """
    x0_coefficient, _ = posterior_mean_coefficients(alphas_cumprod_t, prev_alphas_cumprod)
    return 0.5 * x0_coefficient**2 * torch.exp(-model_log_variance)


def loss_weight(
    prediction_type: str,
    weighting: str,
    alphas_cumprod_t: torch.Tensor,
    prev_alphas_cumprod: torch.Tensor,
    snr_gamma: float = 5.0,
    first_latent_log_variance: torch.Tensor | None = None,
    model_log_variance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-timestep weight w_t so that w_t ‖prediction − target‖² (summed over dimensions) is the chosen objective.

    Each weighting fixes a weight λ_t on the x_0 error ‖x̂_0 − x_0‖², then ``x0_error_jacobian_squared`` carries it
    to the model's own parameterization:

    - ``"elbo"``: λ_t of ``denoising_x0_weight``, which makes w_t ‖·‖² the denoising-matching KL minus its part free
      of the mean (the reconstruction −log N(x_0; x̂_0, Σ_1) up to a constant at the first latent), for p_θ's
      variance Σ_t = exp(``model_log_variance``). Without ``model_log_variance``, Σ_t = σ_q² and
      Σ_1 = exp(``first_latent_log_variance``) at the first latent, where σ_q² = 0. A learned variance is unknown
      when the weight is drawn; ``HVAEScheduler`` then weighs with σ_q², the KL-optimal variance when x̂_0 = x_0
      (docs/theory.md, section 6).
    - ``"simple"``: the DDPM objective, a uniform MSE on ε, whatever the model predicts: λ_t = SNR(t).
    - ``"min_snr"``: Min-SNR-γ (Hang et al. 2023): λ_t = min(SNR(t), γ) with γ = ``snr_gamma``.

    Args:
        alphas_cumprod_t, prev_alphas_cumprod: ᾱ_t and ᾱ_{t−1} (1 for the first latent), float tensors ``[B]``.
        model_log_variance: log Σ_t of p_θ, ``[B]``.
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
        if model_log_variance is None:
            is_first_latent = prev_alphas_cumprod >= 1
            if bool(is_first_latent.any()) and first_latent_log_variance is None:
                raise ValueError("first_latent_log_variance is required for elbo weighting at the first latent")
            first = torch.as_tensor(0.0 if first_latent_log_variance is None else first_latent_log_variance)
            model_log_variance = torch.where(
                is_first_latent,
                first.to(alphas_cumprod_t.device, torch.float64),
                posterior_variance(alphas_cumprod_t, prev_alphas_cumprod).log(),
            )
        model_log_variance = torch.as_tensor(model_log_variance, dtype=torch.float64, device=alphas_cumprod_t.device)
        x0_weight = denoising_x0_weight(alphas_cumprod_t, prev_alphas_cumprod, model_log_variance)
    return x0_weight * x0_error_jacobian_squared(prediction_type, alphas_cumprod_t)


def loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The precision a loss is computed and returned in: the inputs' promoted dtype, float32 for half types."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def weighted_mse(prediction, target, weight) -> torch.Tensor:
    """Per-sample w_t Σ_i (prediction_i − target_i)², in ``loss_dtype`` of the prediction and target."""
    dtype = loss_dtype(prediction, target)
    squared_error = _sum_per_sample((prediction.to(dtype) - target.to(dtype)) ** 2)
    return torch.as_tensor(weight, device=squared_error.device).to(dtype) * squared_error


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


def elbo_terms(
    scheduler,
    denoiser,
    original_samples: torch.Tensor,
    generator: torch.Generator | None = None,
    discrete: bool = True,
    num_timesteps: int | None = None,
    decoder_variance: str = "model",
) -> ELBOTerms:
    """The three ELBO terms of a batch of data for the chain ``scheduler.timesteps``, one denoiser call per latent.

    For each latent t (with previous latent t'), x_t ~ q(x_t | x_0) is drawn once and the term is
    KL(q(x_{t'} | x_t, x_0) ‖ p_θ(x_{t'} | x_t)); the last latent gives the reconstruction
    log p_θ(x_0 | x_1), discretized to 8 bits when ``discrete`` (data in [−1, 1]) and a Gaussian density
    otherwise; the prior term uses the first (noisiest) latent.

    Args:
        scheduler: an ``HVAEScheduler``; its chain and ``variance_type`` define p_θ.
        denoiser: ``denoiser(x_t, timesteps)`` returning the model output (a tensor or an object with ``.sample``,
            like a Diffusers UNet), called under ``torch.no_grad``.
        original_samples: x_0, ``[B, ...]``.
        num_timesteps: evaluate only this many denoising-matching latents, drawn uniformly without replacement
            (with ``generator``); the total is then an unbiased estimate scaled by ``denoising_scale``.
        decoder_variance: ``"model"`` (the scheduler's Σ at the last latent) or ``"improved_ddpm"``, improved DDPM's
            convention for "fixed_large"/"fixed_large_log": the decoder uses the posterior variance σ_q² of the
            latent before the last instead of β_1 (docs/theory.md, section 5, "Conventions"); other variance types are
            unaffected.
    """
    if decoder_variance not in DECODER_VARIANCES:
        raise ValueError(f"decoder_variance must be one of {DECODER_VARIANCES}, got {decoder_variance!r}")
    chain = scheduler.timesteps.cpu()
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
        sample = scheduler.add_noise(original_samples, noise, timesteps)
        with torch.no_grad():
            output = denoiser(sample, timesteps)
        output = getattr(output, "sample", output)
        mean, log_variance, _ = scheduler.predicted_mean_log_variance(output, sample, timesteps)
        return sample, timesteps, mean, broadcast_to(log_variance.to(dtype), sample)

    kls = []
    for timestep in denoising_chain.tolist():
        sample, timesteps, model_mean, model_log_variance = evaluate(timestep)
        true_mean, true_variance = scheduler.posterior_mean_variance(original_samples, sample, timesteps)
        true_log_variance = broadcast_to(true_variance.log().to(dtype), sample)
        kls.append(denoising_matching_kl(true_mean, true_log_variance, model_mean, model_log_variance))

    _, _, decoder_mean, decoder_log_variance = evaluate(chain[-1])
    large = scheduler.config.variance_type in ("fixed_large", "fixed_large_log")
    if decoder_variance == "improved_ddpm" and large and len(chain) > 1:
        alphas_cumprod = scheduler.alphas_cumprod
        improved = posterior_variance(alphas_cumprod[chain[-2]], alphas_cumprod[chain[-1]]).log()
        decoder_log_variance = torch.full_like(decoder_log_variance, float(improved))
    if discrete:
        reconstruction = discretized_gaussian_log_likelihood(
            original_samples, decoder_mean, 0.5 * decoder_log_variance
        )
    else:
        reconstruction = gaussian_log_likelihood(original_samples, decoder_mean, decoder_log_variance)
    prior = prior_matching_kl(original_samples, scheduler.alphas_cumprod[int(chain[0])])
    return ELBOTerms(
        reconstruction=reconstruction,
        prior_matching=prior,
        denoising_matching=torch.stack(kls, dim=1) if kls else original_samples.new_zeros(batch_size, 0),
        timesteps=denoising_chain,
        denoising_scale=scale,
        num_dims=math.prod(original_samples.shape[1:]),
    )
