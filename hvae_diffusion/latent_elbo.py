"""The evidence lower bound of the latent hierarchy: a VAE level x → z_0 under the diffusion levels z_1..z_T.

A latent diffusion model is the diffusion HVAE with one more level at the bottom. The VAE's encoder q_φ(z_0 | x)
draws z_0, the fixed Gaussian diffusion encoder draws z_1..z_T from z_0, and the diffusion model is the VAE's prior
over z_0. The bound (LSGM, Vahdat, Kreis and Kautz 2021) is

    log p(x) ≥ E_{q_φ(z_0|x)}[ log p_ψ(x | z_0) ]          (reconstruction)
             + E_{q_φ(z_0|x)}[ ELBO_diff(z_0) ]              (the diffusion ELBO as the prior: ≤ log p_θ(z_0))
             + H[q_φ(z_0 | x)]                                (entropy of the encoder)

The diffusion runs on y = (z_0 − shift)·s (``scaling_factor`` s, ``shift_factor``), not on z_0, so its ELBO bounds
log p(y); the change of variables gives log p(z_0) = log p(y) + D_z log|s|, the term ``scaling_log_det`` adds.
With an exact posterior q_φ(z_0 | x) = p(z_0 | x) and an exact prior the bound is an equality; its gap is
KL(q_φ(z_0 | x) ‖ p(z_0 | x)) plus the diffusion ELBO's own gap. docs/theory.md ("The latent hierarchy") maps each
term to these functions and to tests/test_latent_elbo.py.

All values are nats per sample, shape ``[B]``, summed over every dimension but the batch one.
"""

import math
from dataclasses import dataclass

import torch

from .elbo import bits_per_dim


def _sum_per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.flatten(1).sum(dim=1)


def gaussian_entropy(log_variance: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of a diagonal Gaussian: H[N(μ, diag σ²)] = ½ Σ_i (log 2π + 1 + log σ_i²)."""
    return _sum_per_sample(0.5 * (math.log(2 * math.pi) + 1.0 + log_variance))


def scale_latents(latents: torch.Tensor, scaling_factor: float, shift_factor: float | None = None) -> torch.Tensor:
    """The diffusion's variable y = (z_0 − shift)·s, as Diffusers' latent pipelines scale VAE latents; its inverse is
    ``unscale_latents``."""
    return (latents - (shift_factor or 0.0)) * scaling_factor


def unscale_latents(latents: torch.Tensor, scaling_factor: float, shift_factor: float | None = None) -> torch.Tensor:
    """z_0 = y / s + shift, the inverse of ``scale_latents``: what the VAE's decoder takes."""
    latents = latents / scaling_factor
    return latents + shift_factor if shift_factor else latents


def scaling_log_det(num_latent_dims: int, scaling_factor: float) -> float:
    """log |det ∂y/∂z_0| = D_z log|s| for y = (z_0 − shift)·s: log p(z_0) = log p(y) + D_z log|s|."""
    if scaling_factor == 0:
        raise ValueError("scaling_factor must be non-zero (the map z_0 → y must be invertible)")
    return num_latent_dims * math.log(abs(scaling_factor))


def sample_posterior(mean: torch.Tensor, log_variance: torch.Tensor, generator=None) -> torch.Tensor:
    """z_0 = μ + σ ε with ε ~ N(0, I) drawn on the CPU from ``generator``: one draw of q_φ(z_0 | x)."""
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    return mean + torch.exp(0.5 * log_variance) * noise


@dataclass
class LatentELBOTerms:
    """The bound of the latent hierarchy for a batch, in nats per sample (shape ``[B]``).

    Attributes:
        reconstruction: log p_ψ(x | z_0) at one z_0 ~ q_φ(z_0 | x) (an unbiased estimate of its expectation).
        latent_prior: ELBO_diff(y) + D_z log|s| at the same z_0: a lower bound on log p_θ(z_0).
        entropy: H[q_φ(z_0 | x)], exact.
        diffusion_elbo: ELBO_diff(y) alone, the diffusion model's own bound on log p(y).
        num_dims: D, the pixel dimensions of one sample; num_latent_dims: D_z.
    """

    reconstruction: torch.Tensor
    latent_prior: torch.Tensor
    entropy: torch.Tensor
    diffusion_elbo: torch.Tensor
    num_dims: int
    num_latent_dims: int

    @property
    def elbo(self) -> torch.Tensor:
        """reconstruction + latent prior + entropy: a lower bound on log p(x) in pixel space."""
        return self.reconstruction + self.latent_prior + self.entropy

    @property
    def bits_per_dim(self) -> torch.Tensor:
        """−ELBO / (D ln 2): the bound in bits per pixel dimension."""
        return bits_per_dim(-self.elbo, self.num_dims)

    @property
    def diffusion_bits_per_latent_dim(self) -> torch.Tensor:
        """−ELBO_diff(y) / (D_z ln 2): the diffusion model's bound in bits per dimension of its own variable y."""
        return bits_per_dim(-self.diffusion_elbo, self.num_latent_dims)


def latent_elbo_terms(
    original_samples: torch.Tensor,
    posterior_mean: torch.Tensor,
    posterior_log_variance: torch.Tensor,
    decoder_log_likelihood,
    diffusion_elbo,
    scaling_factor: float = 1.0,
    shift_factor: float | None = None,
    generator: torch.Generator | None = None,
) -> LatentELBOTerms:
    """The three terms of the latent bound for a batch, from one z_0 ~ q_φ(z_0 | x) per sample.

    Args:
        original_samples: x, ``[B, ...]``.
        posterior_mean, posterior_log_variance: μ_φ(x) and log σ²_φ(x) of the diagonal Gaussian q_φ(z_0 | x).
        decoder_log_likelihood: ``decoder_log_likelihood(original_samples, latents) -> [B]``, log p_ψ(x | z_0).
        diffusion_elbo: ``diffusion_elbo(y) -> [B]``, the diffusion ELBO of y = (z_0 − shift)·s in nats (the full
            chain or an unbiased estimate of it: the bound stays unbiased either way).
        scaling_factor, shift_factor: s and the shift of the VAE config.
        generator: for the draw of z_0.
    """
    if posterior_mean.shape != posterior_log_variance.shape:
        raise ValueError(
            f"posterior_mean {tuple(posterior_mean.shape)} and posterior_log_variance "
            f"{tuple(posterior_log_variance.shape)} must have the same shape"
        )
    if posterior_mean.shape[0] != original_samples.shape[0]:
        raise ValueError(
            f"the posterior has {posterior_mean.shape[0]} samples but original_samples has {original_samples.shape[0]}"
        )
    num_latent_dims = math.prod(posterior_mean.shape[1:])
    latents = sample_posterior(posterior_mean, posterior_log_variance, generator)
    reconstruction = decoder_log_likelihood(original_samples, latents)
    diffusion = diffusion_elbo(scale_latents(latents, scaling_factor, shift_factor))
    return LatentELBOTerms(
        reconstruction=reconstruction,
        latent_prior=diffusion + scaling_log_det(num_latent_dims, scaling_factor),
        entropy=gaussian_entropy(posterior_log_variance),
        diffusion_elbo=diffusion,
        num_dims=math.prod(original_samples.shape[1:]),
        num_latent_dims=num_latent_dims,
    )
