"""Evaluation of a trained diffusion HVAE: the ELBO in bits/dim on held-out data, and sample quality measured in
the feature space of a separately trained classifier of clean data (a Fréchet distance, and the accuracy of
guided samples: the fraction of samples asked for class y that the classifier labels y).
"""

import math
import os

import numpy as np
import torch
from PIL import Image

from ..elbo import elbo_terms
from .data import tensor_to_uint8

# ---------------------------------------------------------------------------------------------- the ELBO


def elbo_report(scheduler, denoiser, samples, batch_size=64, num_timesteps=None, generator=None):
    """The test-set ELBO in bits/dim with its three terms, from ``elbo.elbo_terms`` batch by batch.

    With ``num_timesteps`` each batch evaluates an independent uniform subset of that many denoising latents (an
    unbiased estimate of the full sum); the standard error is then that of the batch estimates, so it covers both
    the data and the timestep sampling. All values are bits per dimension, averaged over the samples.

    Args:
        scheduler: an ``HVAEScheduler`` with the chain to evaluate (``set_timesteps`` or the full training chain).
        denoiser: ``denoiser(x_t, timesteps)`` returning the model output (see ``elbo.elbo_terms``).
        samples: x_0, ``[N, C, H, W]`` in [−1, 1], 8-bit values (the reconstruction term is discretized).

    Returns:
        a dict with ``bits_per_dim``, ``standard_error``, ``reconstruction``, ``prior_matching``,
        ``denoising_matching`` (all bits/dim; the first is −log p, the others KLs), ``num_timesteps_evaluated``,
        ``num_samples``, and ``denoising_by_timestep``: ``{"timesteps": [...], "bits_per_dim": [...]}`` (the mean
        KL of each evaluated latent, for a plot over t).
    """
    num_dims = math.prod(samples.shape[1:])
    to_bits = 1.0 / (num_dims * math.log(2.0))
    batch_estimates, totals = (
        [],
        {"bits_per_dim": 0.0, "reconstruction": 0.0, "prior_matching": 0.0, "denoising_matching": 0.0},
    )
    kl_sum, kl_count = {}, {}
    for start in range(0, samples.shape[0], batch_size):
        batch = samples[start : start + batch_size]
        terms = elbo_terms(scheduler, denoiser, batch, generator=generator, num_timesteps=num_timesteps)
        batch_bits = terms.bits_per_dim
        batch_estimates.append(float(batch_bits.mean()))
        totals["bits_per_dim"] += float(batch_bits.sum())
        totals["reconstruction"] += float(-terms.reconstruction.sum()) * to_bits
        totals["prior_matching"] += float(terms.prior_matching.sum()) * to_bits
        totals["denoising_matching"] += float(terms.denoising_matching_total.sum()) * to_bits
        for column, timestep in enumerate(terms.timesteps.tolist()):
            kl_sum[timestep] = kl_sum.get(timestep, 0.0) + float(terms.denoising_matching[:, column].sum()) * to_bits
            kl_count[timestep] = kl_count.get(timestep, 0) + batch.shape[0]
    num_samples = samples.shape[0]
    report = {name: value / num_samples for name, value in totals.items()}
    estimates = np.asarray(batch_estimates)
    report["standard_error"] = float(estimates.std(ddof=1) / math.sqrt(len(estimates))) if len(estimates) > 1 else None
    report["num_samples"] = num_samples
    report["num_timesteps_evaluated"] = num_timesteps or len(scheduler.timesteps) - 1
    ordered = sorted(kl_sum)
    report["denoising_by_timestep"] = {
        "timesteps": ordered,
        "bits_per_dim": [kl_sum[t] / kl_count[t] for t in ordered],
    }
    return report


def plot_denoising_terms(report, path):
    """PNG plot of the mean denoising-matching KL (bits/dim) of each evaluated latent over t, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report["denoising_by_timestep"]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(curve["timesteps"], np.maximum(curve["bits_per_dim"], 1e-12), ".-", markersize=3)
    axis.set_yscale("log")
    axis.set_xlabel("timestep t")
    axis.set_ylabel("KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) [bits/dim]")
    axis.set_title(f"ELBO: {report['bits_per_dim']:.3f} bits/dim")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------- the feature classifier


class FeatureClassifier(torch.nn.Module):
    """A small CNN classifier of clean images in [−1, 1]; its penultimate layer is the feature space of the
    Fréchet distance (the role Inception plays in FID)."""

    def __init__(self, in_channels=1, num_classes=10, resolution=8, width=32, feature_dim=64):
        super().__init__()
        self.config = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "resolution": resolution,
            "width": width,
            "feature_dim": feature_dim,
        }
        self.encoder = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, width, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(2 * width * ((resolution + 1) // 2) ** 2, feature_dim),
            torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def features(self, images):
        return self.encoder(images)

    def forward(self, images):
        return self.head(self.features(images))


def train_feature_classifier(samples, labels, num_classes, num_epochs=30, batch_size=64, seed=0):
    """Train a ``FeatureClassifier`` on clean ``samples`` ``[N, C, H, W]`` with light noise augmentation."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = FeatureClassifier(samples.shape[1], num_classes, samples.shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(num_epochs):
        order = torch.randperm(samples.shape[0], generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            # small pixel noise makes the classifier robust to the slight noise left in generated samples
            inputs = samples[index] + 0.05 * torch.randn(samples[index].shape, generator=generator)
            loss = torch.nn.functional.cross_entropy(model(inputs), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def load_or_train_feature_classifier(path, train_samples, train_labels, num_classes, seed=0):
    """The feature classifier cached at ``path`` (a ``.pt`` file), trained and saved there if absent."""
    if os.path.isfile(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = FeatureClassifier(**saved["config"])
        model.load_state_dict(saved["state_dict"])
        return model.eval()
    model = train_feature_classifier(train_samples, train_labels, num_classes, seed=seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"config": model.config, "state_dict": model.state_dict()}, path)
    return model


@torch.no_grad()
def classifier_accuracy(model, samples, labels):
    """Fraction of ``samples`` the classifier labels as ``labels``."""
    return float((model(samples).argmax(dim=-1) == labels).float().mean())


# ---------------------------------------------------------------------------------------------- Fréchet distance


def frechet_distance(features_a, features_b):
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}) between Gaussians fitted to two feature sets ``[N, F]``."""
    from scipy import linalg

    features_a = np.asarray(features_a, dtype=np.float64)
    features_b = np.asarray(features_b, dtype=np.float64)
    mean_a, mean_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    # features after a ReLU have dead units, so the covariances can be singular: a tiny ridge keeps sqrtm defined
    ridge = np.eye(cov_a.shape[0]) * 1e-6
    cov_a, cov_b = cov_a + ridge, cov_b + ridge
    covariance_sqrt = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covariance_sqrt))


@torch.no_grad()
def feature_frechet_distance(model, samples_a, samples_b):
    """The Fréchet distance between two image sets ``[N, C, H, W]`` in ``model.features`` space."""
    return frechet_distance(model.features(samples_a).numpy(), model.features(samples_b).numpy())


# ---------------------------------------------------------------------------------------------- grids


def image_grid(samples, num_columns=10, min_cell_pixels=32, padding=1, padding_value=96):
    """A PIL grid of ``[N, C, H, W]`` samples in [−1, 1] (or uint8 ``[N, H, W, C]``), cells separated by ``padding``
    grey pixels, upscaled so a cell is at least ``min_cell_pixels`` wide (nearest neighbour keeps 8x8 pixels sharp)."""
    images = tensor_to_uint8(samples) if isinstance(samples, torch.Tensor) else np.asarray(samples, dtype=np.uint8)
    count, height, width, channels = images.shape
    num_columns = min(num_columns, count)
    num_rows = -(-count // num_columns)
    cell_height, cell_width = height + padding, width + padding
    canvas = np.full(
        (num_rows * cell_height + padding, num_columns * cell_width + padding, channels), padding_value, dtype=np.uint8
    )
    for index, image in enumerate(images):
        row, column = divmod(index, num_columns)
        top, left = row * cell_height + padding, column * cell_width + padding
        canvas[top : top + height, left : left + width] = image
    grid = Image.fromarray(canvas[:, :, 0] if channels == 1 else canvas)
    scale = max(1, -(-min_cell_pixels // width))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
