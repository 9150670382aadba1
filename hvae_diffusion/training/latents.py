"""Diffusion on the latents of a trained VAE: loading it, encoding a dataset once, drawing a fresh z_0 every step,
the scaling factor from the data, and the bound of the whole latent hierarchy on a test set.

The dataset is encoded once: each image keeps its posterior q_φ(z_0 | x) = N(μ, diag σ²), not a latent, so that
every training step draws a fresh z_0 = μ + σ ε (training on μ alone would model a different, sharper
distribution than the one the bound of hvae_diffusion/latent_elbo.py integrates over). The diffusion runs on
y = (z_0 − shift)·s with s = 1/std of the latents (Stable Diffusion's ``scaling_factor``) and shift their mean.
"""

import math
import os

import numpy as np
import torch

from ..elbo_estimation import estimate_elbo
from ..latent_elbo import latent_elbo_terms, scale_latents
from .losses import as_batch_randomness
from .vae import decoder_log_likelihood, decoder_log_scale_of

# the Diffusers autoencoders whose encoder gives no density q(z_0 | x), and why
WITHOUT_POSTERIOR = {
    "VQModel": "its encoder quantizes to a codebook",
    "AutoencoderTiny": "its encoder is deterministic",
}


def _no_posterior_error(argument, class_name):
    return ValueError(
        f"{argument}: a {class_name} has no continuous posterior q(z_0 | x) ({WITHOUT_POSTERIOR[class_name]}, so the "
        "entropy term and the diffusion ELBO of a drawn z_0 are undefined); the latent bound needs an AutoencoderKL"
    )


def check_continuous_vae(vae, argument="--vae_dir"):
    """Raise a ``ValueError`` unless ``vae`` has a Gaussian posterior q_φ(z_0 | x) (an ``AutoencoderKL``-like model).

    A ``VQModel`` or ``AutoencoderTiny`` makes z_0 a deterministic function of x with no density: there is no
    entropy H[q_φ(z_0 | x)] and no continuous z_0 to draw, so the bound does not exist for them.
    """
    for cls in type(vae).__mro__:
        if cls.__name__ in WITHOUT_POSTERIOR:
            raise _no_posterior_error(argument, cls.__name__)
    if not (
        hasattr(vae, "encode") and hasattr(vae, "decode") and hasattr(getattr(vae, "config", None), "in_channels")
    ):
        raise ValueError(f"{argument}: {type(vae).__name__} is not a VAE (an AutoencoderKL with encode and decode)")


def load_vae(vae_dir, argument="--vae_dir"):
    """The ``AutoencoderKL`` saved in ``vae_dir`` (a VAE folder, or a pipeline folder with a ``vae`` subfolder).

    A folder without a VAE config, or an autoencoder without a continuous posterior (a ``VQModel``, say), is a
    ``ValueError`` naming ``argument`` and saying why.
    """
    from diffusers import AutoencoderKL

    for subfolder in (None, "vae"):
        folder = os.path.join(vae_dir, subfolder) if subfolder else vae_dir
        if not os.path.isfile(os.path.join(folder, "config.json")):
            continue
        class_name = AutoencoderKL.load_config(folder).get("_class_name")
        if class_name in WITHOUT_POSTERIOR:
            raise _no_posterior_error(argument, class_name)
        if class_name == "AutoencoderKL":
            return AutoencoderKL.from_pretrained(folder)
    raise ValueError(
        f"{argument}={vae_dir!r} is not a VAE: no config.json of an AutoencoderKL in it or in its vae/ subfolder "
        "(train one with scripts/train_vae.py)"
    )


@torch.no_grad()
def encode_posteriors(vae, samples, batch_size=256):
    """The posterior of every image: (μ, σ), each ``[N, C_z, h, w]``, from ``vae.encode`` in batches."""
    check_continuous_vae(vae)
    means, stds = [], []
    for start in range(0, samples.shape[0], batch_size):
        posterior = vae.encode(samples[start : start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def latent_scaling(means, stds):
    """(scaling_factor, shift_factor) = (1 / std of z_0, mean of z_0) over the data and q_φ, exactly.

    By the law of total variance, over every image, position and draw: E[z] = mean(μ) and
    Var[z] = mean(σ²) + mean(μ²) − mean(μ)²; no sampling is needed.
    """
    means, stds = means.double(), stds.double()
    mean = means.mean()
    variance = (stds**2).mean() + (means**2).mean() - mean**2
    return float(1.0 / variance.sqrt()), float(mean)


class LatentDataset(torch.utils.data.Dataset):
    """The cached posteriors of an image dataset, as items the training loop collates.

    Item ``"sample"`` is the posterior's parameters, μ and σ stacked on the channel axis ``[2 C_z, h, w]``;
    ``LatentDiffusionLoss`` turns them into a fresh z_0 each step. Labels and prompts are carried over.
    """

    def __init__(self, means, stds, labels=None, prompts=None):
        if means.shape != stds.shape:
            raise ValueError(f"means {tuple(means.shape)} and stds {tuple(stds.shape)} must have the same shape")
        self.posterior_parameters = torch.cat([means, stds], dim=1).float()
        self.labels = labels
        self.prompts = prompts

    @classmethod
    def encode(cls, vae, dataset, batch_size=256):
        """Encode every item of an image dataset of ``{"sample", "class_labels"?, "prompt"?}`` dicts once."""
        items = [dataset[index] for index in range(len(dataset))]
        samples = torch.stack([item["sample"] for item in items])
        means, stds = encode_posteriors(vae, samples, batch_size)
        labels = [item["class_labels"] for item in items] if "class_labels" in items[0] else None
        prompts = [item["prompt"] for item in items] if "prompt" in items[0] else None
        return cls(means, stds, labels, prompts)

    @property
    def means(self):
        return self.posterior_parameters[:, : self.posterior_parameters.shape[1] // 2]

    @property
    def stds(self):
        return self.posterior_parameters[:, self.posterior_parameters.shape[1] // 2 :]

    def __len__(self):
        return self.posterior_parameters.shape[0]

    def __getitem__(self, index):
        item = {"sample": self.posterior_parameters[index]}
        if self.labels is not None:
            item["class_labels"] = self.labels[index]
        if self.prompts is not None:
            item["prompt"] = self.prompts[index]
        return item


def draw_latents(posterior_parameters, randomness, scaling_factor=1.0, shift_factor=None):
    """y = (z_0 − shift)·s for a fresh z_0 = μ + σ ε ~ q_φ(z_0 | x), from μ and σ stacked on the channel axis."""
    mean, std = posterior_parameters.chunk(2, dim=1)
    noise = as_batch_randomness(randomness).randn(mean.shape, dtype=mean.dtype).to(mean.device)
    return scale_latents(mean + std * noise, scaling_factor, shift_factor)


def scaled_latents_of(vae, samples, generator=None):
    """One fresh y = (z_0 − shift)·s per image, z_0 ~ q_φ(z_0 | x), scaled as ``vae.config`` says: test inputs for
    models trained on latents (a noisy classifier's accuracy, say)."""
    means, stds = encode_posteriors(vae, samples)
    config = vae.config
    return draw_latents(
        torch.cat([means, stds], dim=1), generator, config.scaling_factor, getattr(config, "shift_factor", None)
    )


class LatentDiffusionLoss:
    """A per-batch loss (``losses.DiffusionLoss``, or ``losses.NoisyClassifierLoss`` for a latent classifier) on a
    fresh, scaled z_0 per step from a ``LatentDataset`` batch.

    z_0's noise is drawn first from the step's randomness, so runs stay exactly reproducible and resumable.
    """

    def __init__(self, diffusion_loss, scaling_factor=1.0, shift_factor=None):
        self.diffusion_loss = diffusion_loss
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor

    def __getattr__(self, name):
        # the wrapped loss's training state (its timestep sampler) is what the training loop looks up
        if name == "diffusion_loss":
            raise AttributeError(name)
        return getattr(self.diffusion_loss, name)

    def __call__(self, model, batch, randomness=None, encode_prompt=None):
        randomness = as_batch_randomness(randomness)
        latents = draw_latents(batch["sample"], randomness, self.scaling_factor, self.shift_factor)
        return self.diffusion_loss(model, {**batch, "sample": latents}, randomness, encode_prompt=encode_prompt)


def diffusion_elbo_of(
    scheduler, denoiser, estimator="importance", num_function_evaluations=None, generator=None, batch_size=256
):
    """``diffusion_elbo(y) -> [B]``: the diffusion ELBO of continuous latents y in nats per sample.

    From ``elbo_estimation.estimate_elbo`` with a Gaussian (not 8-bit) decoder term, since y is continuous:
    ``"full"`` evaluates every latent of the chain, the others an unbiased estimate from
    ``num_function_evaluations`` forwards per sample, so the latent bound stays unbiased.
    """

    def diffusion_elbo(latents):
        estimate = estimate_elbo(
            scheduler,
            denoiser,
            latents,
            estimator,
            num_function_evaluations,
            generator=generator,
            batch_size=batch_size,
            discrete=False,
            show_progress=False,
        )
        num_latent_dims = math.prod(latents.shape[1:])
        return -estimate.bits_per_dim * num_latent_dims * math.log(2.0)

    return diffusion_elbo


def vae_downsampling_factor(vae):
    """How many pixels one latent spans per side: 2^(number of blocks − 1) for an ``AutoencoderKL``."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_latent_setting(vae, resolution=None, denoiser_config=None, channels=None, argument="--vae_dir"):
    """A ``ValueError`` naming ``argument`` unless the VAE fits the images and the denoiser: its downsampling
    factor divides ``resolution``, it takes ``channels`` image channels, and its ``latent_channels`` are the
    denoiser config's ``in_channels`` (each check is skipped when its value is None)."""
    factor = vae_downsampling_factor(vae)
    if resolution is not None and resolution % factor:
        raise ValueError(
            f"{argument}: the VAE downsamples by {factor}, which does not divide --resolution={resolution}; "
            f"choose a multiple of {factor}"
        )
    if channels is not None and vae.config.in_channels != channels:
        raise ValueError(f"{argument}: the VAE takes {vae.config.in_channels} channels but the images have {channels}")
    in_channels = (denoiser_config or {}).get("in_channels")
    if in_channels is not None and in_channels != vae.config.latent_channels:
        raise ValueError(
            f"{argument}: the VAE's latent_channels={vae.config.latent_channels} must equal the denoiser config's "
            f"in_channels={in_channels}"
        )


@torch.no_grad()
def latent_elbo_report(vae, diffusion_elbo, samples, batch_size=64, generator=None):
    """The test-set bound of the latent hierarchy in bits per pixel dimension, with its three parts.

    Args:
        vae: an ``AutoencoderKL`` with ``decoder_log_scale``, ``scaling_factor`` (and ``shift_factor``) in its config.
        diffusion_elbo: ``diffusion_elbo(y) -> [B]`` in nats (``diffusion_elbo_of``, or any unbiased estimator).
        samples: x, ``[N, C, H, W]`` 8-bit values in [−1, 1].

    Returns:
        a dict of bits per pixel dimension: ``bits_per_dim`` (−bound), ``standard_error`` (of the per-sample values),
        ``reconstruction`` (−E log p(x | z_0)), ``latent_prior`` (−E[ELBO_diff + D_z log s]) and ``entropy``
        (H[q]; bits_per_dim = reconstruction + latent_prior − entropy); ``diffusion_bits_per_latent_dim`` (the
        diffusion model's own bound on y); ``num_samples``.
    """
    check_continuous_vae(vae)
    log_scale = decoder_log_scale_of(vae)
    scaling_factor = vae.config.scaling_factor
    shift_factor = getattr(vae.config, "shift_factor", None)

    def decoder(original_samples, latents):
        return decoder_log_likelihood(original_samples, vae.decode(latents).sample, log_scale)

    parts = {"elbo": [], "reconstruction": [], "latent_prior": [], "entropy": [], "diffusion": []}
    num_dims = num_latent_dims = None
    for start in range(0, samples.shape[0], batch_size):
        batch = samples[start : start + batch_size]
        posterior = vae.encode(batch).latent_dist
        terms = latent_elbo_terms(
            batch, posterior.mean, posterior.logvar, decoder, diffusion_elbo, scaling_factor, shift_factor, generator
        )
        num_dims, num_latent_dims = terms.num_dims, terms.num_latent_dims
        for name, values in (
            ("elbo", terms.elbo),
            ("reconstruction", terms.reconstruction),
            ("latent_prior", terms.latent_prior),
            ("entropy", terms.entropy),
            ("diffusion", terms.diffusion_elbo),
        ):
            parts[name].append(values.double().cpu())
    values = {name: torch.cat(chunks).numpy() for name, chunks in parts.items()}
    to_bits = 1.0 / (num_dims * math.log(2.0))
    return {
        "bits_per_dim": float(-values["elbo"].mean() * to_bits),
        "standard_error": float(values["elbo"].std(ddof=1) * to_bits / math.sqrt(len(values["elbo"]))),
        "reconstruction": float(-values["reconstruction"].mean() * to_bits),
        "latent_prior": float(-values["latent_prior"].mean() * to_bits),
        "entropy": float(values["entropy"].mean() * to_bits),
        "diffusion_bits_per_latent_dim": float(-np.mean(values["diffusion"]) / (num_latent_dims * math.log(2.0))),
        "num_samples": int(samples.shape[0]),
    }
