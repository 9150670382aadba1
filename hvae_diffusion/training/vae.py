"""Training the VAE level of the latent hierarchy: an ``AutoencoderKL`` with a proper decoder likelihood.

The decoder p_ψ(x | z_0) is a Gaussian discretized onto the 256 levels of 8-bit pixels (``discretized_gaussian_log_
likelihood`` of hvae_diffusion/elbo.py) with its mean the decoder's output and a learned log-scale per channel, so
log p_ψ(x | z_0) is a log-probability and the bound of hvae_diffusion/latent_elbo.py is a real bound on log p(x).
The log-scale is saved in the VAE's own config (``decoder_log_scale``), so it travels with the ``vae`` folder of any
pipeline. The training loss is the negative VAE ELBO with the KL weighted, per pixel dimension:

    loss = (−log p_ψ(x | z_0) + β KL(q_φ(z_0 | x) ‖ N(0, I))) / D,   z_0 ~ q_φ(z_0 | x).

What is taken from the Latent Diffusion authors' recipe (``LPIPSWithDiscriminator``): a learned decoder scale (their
one ``logvar``, here one per channel and on the discretized Gaussian), sums over dimensions and a small KL weight
(theirs 1e-6; the KL only regularizes, since the diffusion prior replaces N(0, I) afterwards). What is not: the
LPIPS and adversarial terms, which need pretrained networks and are not part of a likelihood.
"""

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..elbo import discretized_gaussian_log_likelihood, normal_kl
from .losses import as_batch_randomness

DECODER_LOG_SCALE_KEY = "decoder_log_scale"


def decoder_log_likelihood(original_samples, decoded, log_scale) -> torch.Tensor:
    """Per-sample log p_ψ(x | z_0): the discretized Gaussian of mean ``decoded`` and per-channel log σ ``log_scale``.

    ``log_scale`` has one value per channel ``[C]`` (or is a scalar); the bins and edge handling are those of
    ``discretized_gaussian_log_likelihood``, so the 256 bins of each pixel sum to one.
    """
    log_scale = torch.as_tensor(log_scale, dtype=decoded.dtype, device=decoded.device)
    if log_scale.ndim == 1:
        if log_scale.shape[0] != decoded.shape[1]:
            raise ValueError(
                f"decoder_log_scale has {log_scale.shape[0]} values but the decoder outputs {decoded.shape[1]} channels"
            )
        log_scale = log_scale.reshape(1, -1, *([1] * (decoded.ndim - 2)))
    return discretized_gaussian_log_likelihood(original_samples, decoded, log_scale)


def posterior_prior_kl(mean, log_variance) -> torch.Tensor:
    """Per-sample KL(q_φ(z_0 | x) ‖ N(0, I)) = ½ Σ_i (μ_i² + σ_i² − 1 − log σ_i²), the VAE's own prior term."""
    return normal_kl(mean, log_variance, torch.zeros_like(mean), 0.0).flatten(1).sum(dim=1)


def decoder_log_scale_of(vae) -> torch.Tensor:
    """The decoder's per-channel log σ saved in ``vae.config``; a ``ValueError`` if this VAE has none."""
    value = getattr(vae.config, DECODER_LOG_SCALE_KEY, None)
    if value is None:
        raise ValueError(
            f"the VAE config has no {DECODER_LOG_SCALE_KEY!r}: the bound needs the decoder likelihood p(x | z_0), "
            "which hvae-train-vae learns and saves there; train the VAE with it (or add the per-channel log-scale "
            "to its config.json)"
        )
    return torch.as_tensor(value, dtype=torch.float32)


class VAEWithLikelihood(ModelMixin, ConfigMixin):
    """An ``AutoencoderKL`` and its decoder's learned per-channel log-scale: the one model the training loop trains.

    A Diffusers model itself, so the loop's EMA and checkpoints handle it like any other; ``export_vae`` gives the
    plain ``AutoencoderKL`` with the log-scale written into its config, the standard folder pipelines load.
    """

    @register_to_config
    def __init__(self, vae_config: dict, initial_log_scale: list):
        super().__init__()
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_config(vae_config)
        if len(initial_log_scale) != self.vae.config.out_channels:
            raise ValueError(
                f"initial_log_scale needs one value per output channel ({self.vae.config.out_channels}), "
                f"got {len(initial_log_scale)}"
            )
        self.log_scale = torch.nn.Parameter(torch.as_tensor(initial_log_scale, dtype=torch.float32))

    @classmethod
    def from_vae(cls, vae, initial_log_scale: float = math.log(0.2)):
        """Wrap a VAE (its weights copied); the log-scale starts from its config's, else ``initial_log_scale``."""
        saved = getattr(vae.config, DECODER_LOG_SCALE_KEY, None)
        initial = list(saved) if saved is not None else [initial_log_scale] * vae.config.out_channels
        model = cls(vae_config=dict(vae.config), initial_log_scale=[float(v) for v in initial])
        model.vae.load_state_dict(vae.state_dict())
        return model

    def forward(self, sample, randomness=None):
        """Encode, draw z_0 = μ + σ ε with ε from ``randomness`` (``losses.BatchRandomness``), decode: returns (μ, log σ²,
        the decoder's output, the decoder's log-scale). One call, so that DDP (or any engine wrapping the model) sees
        the forward and synchronizes every gradient."""
        posterior = self.vae.encode(sample).latent_dist
        noise = as_batch_randomness(randomness).randn(posterior.mean.shape).to(posterior.mean)
        decoded = self.vae.decode(posterior.mean + posterior.std * noise).sample
        return posterior.mean, posterior.logvar, decoded, self.log_scale

    def export_vae(self, **config_updates):
        """The ``AutoencoderKL`` with ``decoder_log_scale`` (and ``config_updates``, e.g. ``scaling_factor``) saved
        in its config."""
        self.vae.register_to_config(
            **{DECODER_LOG_SCALE_KEY: [float(v) for v in self.log_scale.detach().cpu()]}, **config_updates
        )
        return self.vae


class VAELoss:
    """The VAE's loss on a batch (see the module docstring), with z_0's noise from the loop's randomness.

    Args:
        kl_weight: β, the weight of KL(q_φ(z_0 | x) ‖ N(0, I)); 1 makes the loss the VAE's negative ELBO per dim.
    """

    def __init__(self, kl_weight=1e-3):
        if not kl_weight >= 0:
            raise ValueError(f"--kl_weight must be >= 0, got {kl_weight!r}")
        self.kl_weight = kl_weight

    def __call__(self, model, batch, randomness, encode_prompt=None):
        original_samples = batch["sample"]
        mean, log_variance, decoded, log_scale = model(original_samples, randomness)
        reconstruction = -decoder_log_likelihood(original_samples.float(), decoded.float(), log_scale)
        kl = posterior_prior_kl(mean.float(), log_variance.float())
        num_dims = math.prod(original_samples.shape[1:])
        to_bits = 1.0 / (num_dims * math.log(2.0))
        loss = (reconstruction + self.kl_weight * kl).mean() / num_dims
        parts = {
            "reconstruction_bits_per_dim": (reconstruction.mean() * to_bits).detach(),
            "kl_bits_per_dim": (kl.mean() * to_bits).detach(),
        }
        return loss, parts


def _posterior_decodings(vae, samples, batch_size, generator):
    """The decoder's output at one z_0 ~ q_φ(z_0 | x) per image, and KL(q_φ(z_0 | x) ‖ N(0, I)), in batches."""
    decoded, kl = [], []
    for start in range(0, samples.shape[0], batch_size):
        posterior = vae.encode(samples[start : start + batch_size]).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
        decoded.append(vae.decode(posterior.mean + posterior.std * noise).sample)
        kl.append(posterior_prior_kl(posterior.mean, posterior.logvar))
    return torch.cat(decoded), torch.cat(kl)


@torch.no_grad()
def fit_decoder_log_scale(vae, samples, batch_size=64, generator=None, step=0.05):
    """The per-channel log σ that maximizes Σ log p_ψ(x | z_0) over ``samples`` with the decoder fixed.

    The maximum-likelihood scale of the trained decoder, searched on a grid of log σ ∈ [−7, 1] with ``step``.
    Gradient steps on the log-scale move it by about the learning rate per step, far too slowly for a short run;
    fitted after training on the training images, it keeps the bound a bound on the test images.
    """
    decoded, _ = _posterior_decodings(vae, samples, batch_size, generator)
    candidates = torch.arange(-7.0, 1.0 + step / 2, step, dtype=torch.float64)
    best = []
    for channel in range(decoded.shape[1]):
        target, mean = samples[:, channel : channel + 1].double(), decoded[:, channel : channel + 1].double()
        scores = torch.stack(
            [discretized_gaussian_log_likelihood(target, mean, candidate).sum() for candidate in candidates]
        )
        best.append(float(candidates[scores.argmax()]))
    return torch.tensor(best, dtype=torch.float32)


@torch.no_grad()
def vae_report(vae, samples, batch_size=64, generator=None):
    """The VAE's test numbers in bits per pixel dimension, one z_0 ~ q_φ(z_0 | x) per image.

    ``reconstruction`` is −E log p_ψ(x | z_0), ``kl`` is KL(q_φ(z_0 | x) ‖ N(0, I)) and ``bits_per_dim`` their sum:
    the bound on −log p(x) of the VAE with its own N(0, I) prior, which a diffusion prior should beat.
    """
    decoded, kl = _posterior_decodings(vae, samples, batch_size, generator)
    reconstruction = -decoder_log_likelihood(samples, decoded, decoder_log_scale_of(vae))
    to_bits = 1.0 / (math.prod(samples.shape[1:]) * math.log(2.0))
    reconstruction, kl = reconstruction * to_bits, kl * to_bits
    total = reconstruction + kl
    return {
        "reconstruction_bits_per_dim": float(reconstruction.mean()),
        "kl_bits_per_dim": float(kl.mean()),
        "bits_per_dim": float(total.mean()),
        "standard_error": float(total.std() / math.sqrt(len(total))) if len(total) > 1 else None,
        "num_samples": int(samples.shape[0]),
    }
