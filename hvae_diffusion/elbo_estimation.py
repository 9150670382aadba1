"""Unbiased Monte Carlo estimates of the ELBO that sample the denoising latents instead of visiting all of them.

The negative ELBO of an image is a sum over the chain (see ``elbo``):

    −ELBO(x_0) = KL(q(x_T | x_0) ‖ N(0, I)) − E[log p_θ(x_0 | x_1)] + Σ_{t ∈ chain} L_t(x_0),
    L_t(x_0) = E_q(x_t|x_0)[KL(q(x_{t'} | x_t, x_0) ‖ p_θ(x_{t'} | x_t))].

The prior term is closed form and the decoder term is always evaluated, from M ≥ 1 draws of x_1
(``num_decoder_draws``; one, as in ``elbo.elbo_terms``, by default). The sum over the N denoising latents is estimated
from K draws of t:

- ``"full"``: every latent once (N forwards per image), the reference the others are measured against.
- ``"uniform"``: t ~ U(chain), Σ_t L_t ≈ (1/K) Σ_k N L_{t_k}.
- ``"stratified"``: the chain is cut into ⌊K/2⌋ contiguous strata of (nearly) equal length n_h, each stratum gets
  at least two independent uniform draws (the low-discrepancy idea of VDM, Kingma et al. 2021, with two draws per
  stratum so that its variance can be estimated): Σ_t L_t ≈ Σ_h n_h · mean_k L_{t_hk}.
- ``"importance"``: t ~ p(t) ∝ √E[L_t²] (improved DDPM's importance sampler, Nichol & Dhariwal 2021), with
  √E[L_t²] measured by a small pilot, Σ_t L_t ≈ (1/K) Σ_k L_{t_k} / p(t_k).

Every estimate of an image is unbiased for its expected full-chain value, so the mean over images is unbiased for
the dataset's, and the standard error of that mean, std(per-image estimates) / √n, covers the image-to-image spread
and everything sampled. The per-image standard error covers the sampling of t and of the x_t of the denoising
latents ("full": the x_t noise alone, ``successive_difference_variance``), and the decoder's x_1 draws when there are
M ≥ 2 of them (their spread s² / M); with M = 1 it leaves the decoder's single draw out, and
``ELBOEstimate.standard_error_covers`` says so.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from . import elbo
from .elbo import loss_dtype
from .forward_process import broadcast_to

BPD_ESTIMATORS = ("full", "uniform", "stratified", "importance")


def _device_of(generator):
    """Draws are made where ``generator`` lives (a CUDA generator cannot draw CPU tensors), then kept on the CPU."""
    return generator.device if generator is not None else torch.device("cpu")


def uniform_timestep_draws(num_latents: int, num_draws: int, num_images: int, generator=None):
    """K chain indices per image drawn uniformly with replacement, and the weight N/K of each draw, ``[n, K]``."""
    indices = torch.randint(num_latents, (num_images, num_draws), generator=generator, device=_device_of(generator))
    indices = indices.cpu()
    return indices, torch.full((num_images, num_draws), num_latents / num_draws, dtype=torch.float64)


def stratum_of_draws(num_latents: int, num_draws: int):
    """The stratum of each of the K draws and the strata's bounds [lo_h, hi_h) over chain indices 0..N−1.

    ⌊K/2⌋ strata of nearly equal length; each gets two draws and the first K mod 2 strata a third.
    """
    num_strata = num_draws // 2
    bounds = np.floor(np.arange(num_strata + 1) * num_latents / num_strata).astype(np.int64)
    strata = np.sort(np.concatenate([np.arange(num_strata), np.arange(num_strata), np.arange(num_draws % 2)]))
    return torch.from_numpy(strata), torch.from_numpy(bounds)


def stratified_timestep_draws(num_latents: int, num_draws: int, num_images: int, generator=None):
    """K chain indices per image, uniform within their stratum, and weights n_h / m_h (``stratum_of_draws``)."""
    strata, bounds = stratum_of_draws(num_latents, num_draws)
    low, length = bounds[strata], (bounds[1:] - bounds[:-1])[strata]
    draws_in_stratum = torch.bincount(strata)[strata]
    uniform = torch.rand(
        (num_images, num_draws), generator=generator, dtype=torch.float64, device=_device_of(generator)
    )
    uniform = uniform.cpu()
    indices = low + (uniform * length).long().clamp(max=length - 1)
    weights = (length / draws_in_stratum).to(torch.float64).expand(num_images, num_draws).clone()
    return indices, weights


def pilot_chain_indices(num_latents: int, num_pilot_timesteps: int):
    """The pilot's chain indices: about ``num_pilot_timesteps`` spaced geometrically from both ends of the chain.

    L_t changes by orders of magnitude over the first and last few latents and slowly in between, so an even grid
    misses the ends: on the demo model it left the dataset standard error at 1.43× the full chain's with 50 draws
    per image, where the geometric grid gives 1.07× (docs/benchmarks.md).
    """
    offsets = np.unique(np.geomspace(1, num_latents, max(num_pilot_timesteps // 2, 2)).round().astype(np.int64) - 1)
    return np.unique(np.concatenate([offsets, num_latents - 1 - offsets]))


def importance_proposal(pilot_indices, pilot_terms, num_latents: int, uniform_fraction: float = 0.05):
    """p(t) ∝ √E[L_t²] over the N chain indices, from pilot terms ``[n_pilot, G]`` at chain indices ``[G]``.

    The root mean square is interpolated between pilot indices in log space (L_t varies over orders of magnitude
    along the chain), and ``uniform_fraction`` of the mass is spread uniformly, so every latent keeps p(t) > 0,
    which the estimator needs to stay unbiased, and no weight 1/p(t) exceeds N / ``uniform_fraction``.
    """
    root_mean_square = pilot_terms.double().pow(2).mean(0).sqrt().clamp(min=1e-30)
    log_profile = np.interp(np.arange(num_latents), np.asarray(pilot_indices), root_mean_square.log().numpy())
    profile = torch.from_numpy(np.exp(log_profile - log_profile.max()))
    return (1 - uniform_fraction) * profile / profile.sum() + uniform_fraction / num_latents


def importance_timestep_draws(proposal, num_draws: int, num_images: int, generator=None):
    """K chain indices per image drawn from ``proposal`` p(t) with replacement, and weights 1 / (K p(t))."""
    device = _device_of(generator)
    indices = torch.multinomial(
        proposal.float().to(device), num_images * num_draws, replacement=True, generator=generator
    )
    indices = indices.cpu().reshape(num_images, num_draws)
    return indices, 1.0 / (num_draws * proposal[indices])


def per_image_standard_error(terms, weights, strata=None):
    """Standard error of Σ_k w_k L_k per image (rows of ``terms``/``weights``, ``[n, K]``).

    Independent draws (uniform, importance): the K values K w_k L_k are i.i.d. with mean Σ_t L_t, so
    SE² = s² / K. Stratified: the strata are independent and each has m_h ≥ 2 i.i.d. draws, so
    SE² = Σ_h n_h² s_h² / m_h with n_h = m_h w_h (an unbiased variance estimate).
    """
    values = terms * weights
    if strata is None:
        num_draws = values.shape[1]
        return (num_draws * values).std(dim=1, correction=1) / math.sqrt(num_draws)
    variance = torch.zeros(values.shape[0], dtype=values.dtype)
    for stratum in strata.unique().tolist():
        members = values[:, strata == stratum]
        count = members.shape[1]
        # n_h L_k = m_h w_h L_k: each draw's own estimate of the stratum's sum
        variance += (count * members).var(dim=1, correction=1) / count
    return variance.sqrt()


def successive_difference_variance(terms):
    """Estimated Var(Σ_t L̂_t) per image of a full chain with one independent x_t per latent, ``[n]`` from ``[n, N]``.

    L̂_t has mean L_t, smooth in t, and its own variance v_t. In consecutive triples (a, b, c) the second difference
    cancels a linear trend: E[(a − 2b + c)²] = v_a + 4 v_b + v_c ≈ 6 v, so each triple contributes
    3 v ≈ (a − 2b + c)² / 2. The triples end at the chain's last latent (nearest the data, where L_t changes
    fastest); the one or two noisiest latents left over take the first triple's v. It assumes L_t and v_t change
    little over three neighbouring latents; where neighbouring terms differ by large factors (short chains, or the
    last latents of the demo's cosine chain, where it read about twice the real noise) it overstates the noise. Two latents use their squared difference, one latent
    gives NaN (nothing to compare it with) and none gives 0.
    """
    num_images, num_latents = terms.shape
    if num_latents < 3:
        if num_latents == 2:
            return (terms[:, 0] - terms[:, 1]).pow(2)
        return terms.new_full((num_images,), math.nan if num_latents else 0.0)
    num_triples, left_over = divmod(num_latents, 3)
    triples = terms[:, left_over:].reshape(num_images, num_triples, 3)
    per_latent = (triples[..., 0] - 2 * triples[..., 1] + triples[..., 2]).pow(2) / 6
    return 3 * per_latent.sum(dim=1) + left_over * per_latent[:, 0]


def _check_proposal(proposal, num_latents):
    if not isinstance(proposal, torch.Tensor) or proposal.shape != (num_latents,):
        shape = tuple(proposal.shape) if isinstance(proposal, torch.Tensor) else type(proposal).__name__
        raise ValueError(f"proposal must be a tensor of shape [{num_latents}] (one p(t) per latent), got {shape}")
    if not bool((proposal > 0).all()) or abs(float(proposal.double().sum()) - 1) > 1e-6:
        raise ValueError("proposal must be positive everywhere and sum to 1 (an ELBOEstimate's proposal)")


class PerImageBitsPerDim:
    """The data-set summary of an estimate that holds one ``bits_per_dim`` value per image (this module's
    ``ELBOEstimate``, ``continuous_elbo.ContinuousELBOEstimate``, ``likelihood_ode.ODELikelihood``)."""

    @property
    def dataset_bits_per_dim(self) -> float:
        """The mean of the per-image estimates."""
        return float(self.bits_per_dim.mean())

    @property
    def dataset_standard_error(self) -> float:
        """std(per-image estimates) / √n: the image-to-image spread together with whatever each per-image estimate
        samples (t and x_t, probes, dequantization; NaN for n = 1)."""
        count = self.bits_per_dim.numel()
        return float(self.bits_per_dim.std(correction=1) / math.sqrt(count)) if count > 1 else math.nan


@dataclass
class ELBOEstimate(PerImageBitsPerDim):
    """An ELBO estimate of n images, in bits/dim unless stated.

    Attributes:
        estimator: one of ``BPD_ESTIMATORS``.
        bits_per_dim: −ELBO per image, ``[n]``.
        standard_error: per image, ``[n]``; what it covers is ``standard_error_covers``.
        prior_matching, reconstruction, denoising_matching: the three terms per image, ``[n]``
            (KL, −log p_θ(x_0 | x_1), and the estimated Σ_t L_t).
        timesteps, denoising_terms: the evaluated latents and their KLs in bits/dim, ``[n, K]``.
        num_function_evaluations: denoiser forwards spent, the pilot's included.
        num_pilot_function_evaluations: those of the importance sampler's pilot (0 when a proposal was reused).
        proposal: the importance sampler's p(t) over the chain, ``[N]``, to pass to ``estimate_elbo(proposal=...)``
            of later evaluations of the same model (the pilot is then skipped); ``None`` for other estimators.
        standard_error_covers: what the per-image standard error covers, in words.
    """

    estimator: str
    bits_per_dim: torch.Tensor
    standard_error: torch.Tensor
    prior_matching: torch.Tensor
    reconstruction: torch.Tensor
    denoising_matching: torch.Tensor
    timesteps: torch.Tensor
    denoising_terms: torch.Tensor
    num_function_evaluations: int
    num_pilot_function_evaluations: int = 0
    proposal: torch.Tensor | None = None
    standard_error_covers: str = ""

    def to_dict(self) -> dict:
        """JSON-ready summary: the dataset values with their standard errors and the mean of each term."""

        def number(value):
            return None if math.isnan(value) else value

        return {
            "estimator": self.estimator,
            "bits_per_dim": self.dataset_bits_per_dim,
            "standard_error": number(self.dataset_standard_error),
            "prior_matching": float(self.prior_matching.mean()),
            "reconstruction": float(self.reconstruction.mean()),
            "denoising_matching": float(self.denoising_matching.mean()),
            "num_samples": self.bits_per_dim.numel(),
            "num_function_evaluations": self.num_function_evaluations,
            "num_pilot_function_evaluations": self.num_pilot_function_evaluations,
            "num_function_evaluations_per_image": self.num_function_evaluations / self.bits_per_dim.numel(),
            "standard_error_covers": self.standard_error_covers,
        }

    def denoising_by_timestep(self) -> dict:
        """Mean KL (bits/dim) of each evaluated timestep over the draws that visited it, for a plot over t."""
        timesteps, inverse = self.timesteps.reshape(-1).unique(return_inverse=True)
        sums = torch.zeros(len(timesteps), dtype=torch.float64).index_add_(
            0, inverse, self.denoising_terms.reshape(-1).double()
        )
        counts = torch.bincount(inverse, minlength=len(timesteps))
        return {"timesteps": timesteps.tolist(), "bits_per_dim": (sums / counts).tolist()}


@torch.no_grad()
def evaluate_latents(
    scheduler,
    denoiser,
    samples,
    image_indices,
    chain_indices,
    generator=None,
    batch_size: int = 256,
    discrete: bool = True,
    progress_bar=None,
):
    """The ELBO term of each (image, latent) pair in nats, ``[P]``, with the forwards batched across pairs.

    For a denoising latent t (chain index < N) it is KL(q(x_{t'} | x_t, x_0) ‖ p_θ(x_{t'} | x_t)) at a fresh
    x_t ~ q(x_t | x_0); for the last latent of the chain (index N) it is the decoder's −log p_θ(x_0 | x_1),
    discretized to 8 bits when ``discrete``. One denoiser call serves ``batch_size`` pairs of any timesteps.
    The denoiser gets x_t in ``samples``' dtype; the terms are computed in float32 at least (``elbo.loss_dtype``), so
    half-precision data and weights give the bound of float32.
    """
    chain = scheduler.timesteps.cpu()
    last = len(chain) - 1
    image_indices, chain_indices = image_indices.reshape(-1), chain_indices.reshape(-1)
    terms = torch.empty(len(image_indices), dtype=torch.float64)
    device, dtype = samples.device, loss_dtype(samples)
    for start in range(0, len(image_indices), batch_size):
        stop = min(start + batch_size, len(image_indices))
        original = samples[image_indices[start:stop].to(device)].to(dtype)
        timesteps = chain[chain_indices[start:stop]].to(device)
        noise = randn_tensor(original.shape, generator=generator, device=device, dtype=dtype)
        sample = scheduler.add_noise(original, noise, timesteps)
        output = denoiser(sample.to(samples.dtype), timesteps)
        output = getattr(output, "sample", output).to(dtype)
        model_mean, model_log_variance, _ = scheduler.predicted_mean_log_variance(output, sample, timesteps)
        model_log_variance = broadcast_to(model_log_variance.to(dtype), sample)
        true_mean, true_variance = scheduler.posterior_mean_variance(original, sample, timesteps)
        true_log_variance = broadcast_to(true_variance.to(dtype).clamp(min=1e-30).log(), sample)
        kl = elbo.denoising_matching_kl(true_mean, true_log_variance, model_mean, model_log_variance)
        if discrete:
            decoder = -elbo.discretized_gaussian_log_likelihood(original, model_mean, 0.5 * model_log_variance)
        else:
            decoder = -elbo.gaussian_log_likelihood(original, model_mean, model_log_variance)
        is_decoder = (chain_indices[start:stop] == last).to(device)
        terms[start:stop] = torch.where(is_decoder, decoder, kl).double().cpu()
        if progress_bar is not None:
            progress_bar.update(stop - start)
    return terms


def estimate_elbo(
    scheduler,
    denoiser,
    samples,
    estimator: str = "importance",
    num_function_evaluations: int | None = None,
    generator=None,
    batch_size: int = 256,
    discrete: bool = True,
    num_pilot_images: int = 8,
    num_pilot_timesteps: int = 32,
    show_progress: bool = True,
    num_decoder_draws: int = 1,
    proposal: torch.Tensor | None = None,
) -> ELBOEstimate:
    """Estimate the negative ELBO in bits/dim of each image and of the dataset, with standard errors.

    Args:
        scheduler: an ``HVAEScheduler`` whose chain ``timesteps`` defines the bound (N + 1 latents).
        denoiser: ``denoiser(x_t, timesteps)`` with one timestep per sample, returning the model output (a tensor
            or an object with ``.sample``, like a Diffusers UNet); it gets x_t in ``samples``' dtype.
        samples: x_0, ``[n, ...]`` (8-bit values in [−1, 1] when ``discrete``).
        estimator: ``"full"``, ``"uniform"``, ``"stratified"`` or ``"importance"`` (see the module docstring).
        num_function_evaluations: forwards per image, the decoder's included: K + M for K sampled latents and M
            decoder draws (M + 1 ≤ · ≤ N + M; M + 2 or more for ``"stratified"``). Not used by ``"full"``, which
            spends N + M.
        num_pilot_images, num_pilot_timesteps: the importance sampler's pilot, random images × about that many
            latents (``pilot_chain_indices``; its forwards count in ``num_function_evaluations`` of the result).
        show_progress: a tqdm progress bar over the forwards, as Diffusers' pipelines show.
        num_decoder_draws: M, the x_1 draws of the decoder term per image; with M ≥ 2 the per-image standard error
            covers the decoder term too.
        proposal: the importance sampler's p(t) from an earlier ``ELBOEstimate.proposal`` of the same model: the
            pilot is skipped.
    """
    if estimator not in BPD_ESTIMATORS:
        raise ValueError(f"estimator must be one of {BPD_ESTIMATORS}, got {estimator!r}")
    if not isinstance(samples, torch.Tensor) or samples.ndim < 2 or samples.shape[0] == 0:
        raise ValueError(f"samples must be a non-empty tensor [n, ...], got {type(samples).__name__}")
    if isinstance(num_decoder_draws, bool) or not isinstance(num_decoder_draws, int) or num_decoder_draws < 1:
        raise ValueError(f"num_decoder_draws must be an int >= 1, got {num_decoder_draws!r}")
    num_images = samples.shape[0]
    num_latents = len(scheduler.timesteps) - 1
    if estimator != "full":
        if num_latents == 0:
            raise ValueError(
                f"estimator={estimator!r} samples denoising latents, and a chain of one latent has none: use 'full'"
            )
        minimum = num_decoder_draws + (2 if estimator == "stratified" else 1)
        maximum = num_latents + num_decoder_draws
        if (
            isinstance(num_function_evaluations, bool)
            or not isinstance(num_function_evaluations, int)
            or not minimum <= num_function_evaluations <= maximum
        ):
            raise ValueError(
                f"num_function_evaluations must be an int in [{minimum}, {maximum}] (forwards per image, the "
                f"decoder's included) for estimator={estimator!r}, got {num_function_evaluations!r}"
            )
    if proposal is not None:
        if estimator != "importance":
            raise ValueError(f"proposal is the importance sampler's p(t); estimator={estimator!r} does not use one")
        _check_proposal(proposal, num_latents)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    num_draws = num_latents if estimator == "full" else num_function_evaluations - num_decoder_draws
    pilot_images = min(num_pilot_images, num_images) if estimator == "importance" and proposal is None else 0
    pilot_indices = pilot_chain_indices(num_latents, num_pilot_timesteps) if pilot_images else np.zeros(0, int)
    num_pilot = pilot_images * len(pilot_indices)
    num_evaluations = num_pilot + num_images * (num_draws + num_decoder_draws)
    with tqdm(total=num_evaluations, desc=f"ELBO ({estimator})", disable=not show_progress) as bar:

        def run(image_indices, chain_indices):
            return evaluate_latents(
                scheduler, denoiser, samples, image_indices, chain_indices, generator, batch_size, discrete, bar
            )

        strata = None
        if estimator == "full":
            indices = torch.arange(num_latents).expand(num_images, num_latents)
            weights = torch.ones(num_images, num_latents, dtype=torch.float64)
        elif estimator == "uniform":
            indices, weights = uniform_timestep_draws(num_latents, num_draws, num_images, generator)
        elif estimator == "stratified":
            strata, _ = stratum_of_draws(num_latents, num_draws)
            indices, weights = stratified_timestep_draws(num_latents, num_draws, num_images, generator)
        else:
            if proposal is None:
                pilot_chain = torch.from_numpy(pilot_indices).long()
                # a random subset: a split sorted by class would otherwise show the pilot one class
                pilot_rows = torch.randperm(num_images, generator=generator, device=_device_of(generator))
                pilot_rows = pilot_rows[:pilot_images].cpu()
                pilot_terms = run(
                    pilot_rows.repeat_interleave(len(pilot_chain)), pilot_chain.repeat(pilot_images)
                ).reshape(pilot_images, len(pilot_chain))
                proposal = importance_proposal(pilot_indices, pilot_terms, num_latents)
            indices, weights = importance_timestep_draws(proposal.double().cpu(), num_draws, num_images, generator)
        image_of_draw = torch.arange(num_images).unsqueeze(1).expand(num_images, num_draws + num_decoder_draws)
        with_decoder = torch.cat([indices, torch.full((num_images, num_decoder_draws), num_latents)], dim=1)
        terms = run(image_of_draw, with_decoder).reshape(num_images, num_draws + num_decoder_draws)

    num_dims = math.prod(samples.shape[1:])
    to_bits = 1.0 / (num_dims * math.log(2.0))
    denoising_terms, decoder_draws = terms[:, :num_draws], terms[:, num_draws:]
    denoising = (denoising_terms * weights).sum(dim=1)
    decoder = decoder_draws.mean(dim=1)
    final_alphas_cumprod = scheduler.alphas_cumprod[int(scheduler.timesteps[0])]
    prior = elbo.prior_matching_kl(samples.to(loss_dtype(samples)), final_alphas_cumprod).double().cpu()
    if estimator == "full":
        variance = successive_difference_variance(denoising_terms)
        covers = "the x_t noise of the denoising latents (successive differences along the chain)"
    else:
        variance = per_image_standard_error(denoising_terms, weights, strata) ** 2
        covers = "the sampling of t and of x_t at the denoising latents"
    if num_decoder_draws > 1:
        variance = variance + decoder_draws.var(dim=1, correction=1) / num_decoder_draws
        covers += f", and the decoder's {num_decoder_draws} x_1 draws"
    else:
        covers += "; not the decoder's single x_1 draw (use num_decoder_draws >= 2)"
    return ELBOEstimate(
        estimator=estimator,
        bits_per_dim=(prior + decoder + denoising) * to_bits,
        standard_error=variance.sqrt() * to_bits,
        prior_matching=prior * to_bits,
        reconstruction=decoder * to_bits,
        denoising_matching=denoising * to_bits,
        timesteps=scheduler.timesteps.cpu()[indices],
        denoising_terms=denoising_terms * to_bits,
        num_function_evaluations=num_evaluations,
        num_pilot_function_evaluations=num_pilot,
        proposal=proposal,
        standard_error_covers=covers,
    )
