"""Evaluation of a trained diffusion HVAE: the ELBO in bits/dim on held-out data, and sample quality measured in
the feature space of a separately trained classifier of clean data (a Fréchet distance and KID, and the accuracy
of guided samples: the fraction of samples asked for class y that the classifier labels y). With a local Inception
file (``InceptionFeatures``) the same two numbers in Inception space are the FID and KID of the literature; in the
feature classifier's space they are not, and are never called so.
"""

import json
import os

import numpy as np
import torch
from PIL import Image

from ..elbo_estimation import estimate_elbo
from .data import tensor_to_uint8

# ---------------------------------------------------------------------------------------------- the ELBO


def elbo_report(
    scheduler,
    denoiser,
    samples,
    estimator="importance",
    num_function_evaluations=None,
    batch_size=256,
    generator=None,
    show_progress=True,
):
    """The test-set bits/dim with its standard error and three terms, from ``elbo_estimation.estimate_elbo``.

    Returns ``ELBOEstimate.to_dict()`` (``bits_per_dim``, ``standard_error``, the terms, the NFEs spent) plus
    ``summary``, the number as a report or model card should print it (never without its ±), and
    ``denoising_by_timestep``: ``{"timesteps": [...], "bits_per_dim": [...]}``, the mean KL of each evaluated
    latent, for a plot over t.
    """
    estimate = estimate_elbo(
        scheduler,
        denoiser,
        samples,
        estimator,
        num_function_evaluations,
        generator=generator,
        batch_size=batch_size,
        show_progress=show_progress,
    )
    report = estimate.to_dict()
    report["summary"] = format_bits_per_dim(report)
    report["denoising_by_timestep"] = estimate.denoising_by_timestep()
    return report


def format_bits_per_dim(report):
    """ "6.320 ± 0.040 bits/dim (full chain, 1000 NFE/image, 297 images)" from an ``elbo_report``."""
    standard_error = report["standard_error"]
    error = f" ± {standard_error:.3f}" if standard_error is not None else " (no standard error: one image)"
    method = "full chain" if report["estimator"] == "full" else f"{report['estimator']} t-sampling"
    return (
        f"{report['bits_per_dim']:.3f}{error} bits/dim ({method}, "
        f"{report['num_function_evaluations_per_image']:.0f} NFE/image, {report['num_samples']} images)"
    )


def images_label(num_used, num_test):
    """Which images a bits/dim was computed on, for the reports that print it beside another one."""
    if num_used == num_test:
        return f"all {num_test} images of the test split"
    return f"the first {num_used} of the {num_test} images of the test split"


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
    axis.set_title(f"−ELBO: {report['summary']}", fontsize=8)
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


def save_feature_classifier(model, path):
    """The feature classifier as safetensors, its constructor arguments as JSON metadata (no pickle)."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(model.state_dict(), path, metadata={"config": json.dumps(model.config)})


def load_or_train_feature_classifier(path, train_samples, train_labels, num_classes, seed=0):
    """The feature classifier cached at ``path`` (a ``.safetensors`` file), trained and saved there if absent."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if os.path.isfile(path):
        with safe_open(path, framework="pt") as handle:
            config = json.loads(handle.metadata()["config"])
        model = FeatureClassifier(**config)
        model.load_state_dict(load_file(path))
        return model.eval()
    model = train_feature_classifier(train_samples, train_labels, num_classes, seed=seed)
    save_feature_classifier(model, path)
    return model


@torch.no_grad()
def classifier_accuracy(model, samples, labels):
    """Fraction of ``samples`` the classifier labels as ``labels``."""
    return float((model(samples).argmax(dim=-1) == labels).float().mean())


def expected_calibration_error(probabilities, labels, num_bins=15):
    """ECE = Σ_b (n_b / n) |accuracy_b − confidence_b| over ``num_bins`` equal-width bins of the top-class
    probability (Guo et al. 2017); ``probabilities`` ``[n, num_classes]``, ``labels`` ``[n]``."""
    confidence, predicted = probabilities.max(dim=-1)
    correct = (predicted == labels).double()
    bins = (confidence.double() * num_bins).long().clamp(max=num_bins - 1)
    correct_sums = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, correct)
    confidence_sums = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, confidence.double())
    return float((correct_sums - confidence_sums).abs().sum() / len(labels))


@torch.no_grad()
def noisy_classifier_calibration(
    classifier, scheduler, samples, labels, num_bands=5, num_bins=15, generator=None, batch_size=1024
):
    """Accuracy and ECE of a noisy classifier p_φ(y | x_t) in ``num_bands`` equal bands of t.

    In band [lo, hi) every sample gets its own t ~ U{lo, …, hi − 1} and x_t ~ q(x_t | x_0); ``classifier(x_t, t)``
    returns logits (or an object with ``.logits``). With a calibrated p(y | x_t), γ = 1 classifier guidance samples
    p(x | y), so the ECE says how far the guidance scale is from its meaning.

    Returns a list of ``{"timesteps": [lo, hi], "accuracy", "expected_calibration_error", "mean_confidence"}``.
    """
    num_timesteps = scheduler.config.num_train_timesteps
    if isinstance(num_bands, bool) or not isinstance(num_bands, int) or not 1 <= num_bands <= num_timesteps:
        raise ValueError(f"num_bands must be an int in [1, {num_timesteps}], got {num_bands!r}")
    edges = np.linspace(0, num_timesteps, num_bands + 1).round().astype(int)
    bands = []
    for low, high in zip(edges[:-1], edges[1:]):
        timesteps = torch.randint(int(low), int(high), (samples.shape[0],), generator=generator)
        noise = torch.randn(samples.shape, generator=generator, dtype=samples.dtype)
        noisy = scheduler.add_noise(samples, noise, timesteps)
        logits = torch.cat(
            [
                getattr(output, "logits", output)
                for output in (
                    classifier(noisy[i : i + batch_size], timesteps[i : i + batch_size])
                    for i in range(0, len(noisy), batch_size)
                )
            ]
        )
        probabilities = logits.double().softmax(dim=-1)
        bands.append(
            {
                "timesteps": [int(low), int(high)],
                "accuracy": float((probabilities.argmax(-1) == labels).double().mean()),
                "expected_calibration_error": expected_calibration_error(probabilities, labels, num_bins),
                "mean_confidence": float(probabilities.max(-1).values.mean()),
            }
        )
    return bands


# ---------------------------------------------------------------------------------------------- Fréchet distance, KID


def _as_float64(features, name):
    features = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"{name} must be a [N, F] feature array with N >= 2, got shape {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} holds values that are not finite (NaN or inf samples?)")
    return features


def frechet_distance(features_a, features_b, tolerance=1e-6):
    """The Fréchet distance between the Gaussians fitted to two feature sets ``[N, F]`` (Dowson & Landau 1982):

        d² = ‖μ_a − μ_b‖² + tr(Σ_a) + tr(Σ_b) − 2 tr((Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2}).

    tr((Σ_a Σ_b)^{1/2}) of FID is this last trace: Σ_a Σ_b is similar to the symmetric positive semi-definite
    Σ_a^{1/2} Σ_b Σ_a^{1/2}, so its square root's trace is the sum of the square roots of that matrix's eigenvalues
    (as torchmetrics sums the roots of the eigenvalues of Σ_a Σ_b). Computed with symmetric eigendecompositions in
    float64, it needs no ridge for the singular covariances of dead ReLU units or N < F. The guard of pytorch-fid
    (which refuses an imaginary part of the product's square root instead of dropping it): an eigenvalue below
    −``tolerance`` × the largest raises a ``ValueError`` instead of being clipped to 0 silently.
    """
    features_a = _as_float64(features_a, "features_a")
    features_b = _as_float64(features_b, "features_b")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"the feature sets differ in width: {features_a.shape[1]} and {features_b.shape[1]}")
    mean_a, mean_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = torch.cov(features_a.T).reshape(len(mean_a), -1), torch.cov(features_b.T).reshape(len(mean_b), -1)
    eigenvalues_a, eigenvectors_a = torch.linalg.eigh(cov_a)
    sqrt_a = (eigenvectors_a * eigenvalues_a.clamp(min=0).sqrt()) @ eigenvectors_a.T
    product = sqrt_a @ cov_b @ sqrt_a
    eigenvalues = torch.linalg.eigvalsh((product + product.T) / 2)
    scale = float(eigenvalues.abs().max()) if len(eigenvalues) else 0.0
    for values in (eigenvalues_a, eigenvalues):
        if scale > 0 and float(values.min()) < -tolerance * max(scale, float(values.abs().max())):
            raise ValueError(
                f"the covariance product has a negative eigenvalue {float(values.min()):.3g} (largest {scale:.3g}): "
                "the features are not finite or too ill-conditioned for a Fréchet distance"
            )
    trace_sqrt = eigenvalues.clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return float(distance)


def polynomial_kernel(features_x, features_y):
    """k(x, y) = (x·y / F + 1)³, the kernel of KID (Bińkowski et al. 2018), for ``[N, F]`` and ``[M, F]``."""
    return (features_x @ features_y.T / features_x.shape[1] + 1) ** 3


def unbiased_mmd2(features_x, features_y):
    """The unbiased estimate of MMD² with ``polynomial_kernel`` (Gretton et al. 2012, eq. 3):

    1/(m(m−1)) Σ_{i≠j} k(x_i, x_j) + 1/(n(n−1)) Σ_{i≠j} k(y_i, y_j) − 2/(mn) Σ_{i,j} k(x_i, y_j).
    """
    m, n = features_x.shape[0], features_y.shape[0]
    k_xx, k_yy = polynomial_kernel(features_x, features_x), polynomial_kernel(features_y, features_y)
    k_xy = polynomial_kernel(features_x, features_y)
    return (
        (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
        + (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
        - 2 * k_xy.mean()
    )


def kernel_inception_distance(features_a, features_b, num_subsets=10, generator=None):
    """KID: the unbiased MMD² (``unbiased_mmd2``) between two feature sets ``[N, F]``, with its standard error.

    As in the KID paper and torchmetrics, the estimate is averaged over subsets; here they are ``num_subsets``
    disjoint random subsets of equal size m = min(N_a, N_b) // num_subsets (fewer when that would leave m < 2). Each
    subset's estimate is unbiased and, being disjoint, independent of the others, so their mean is unbiased (it can
    be negative when the sets are alike) and the standard error std / √num_subsets holds at any sample size; subsets
    drawn with overlap (torchmetrics) give a spread that understates it.

    Returns ``{"kid", "standard_error" (None for one subset), "num_subsets", "subset_size"}``.
    """
    features_a = _as_float64(features_a, "features_a")
    features_b = _as_float64(features_b, "features_b")
    if isinstance(num_subsets, bool) or not isinstance(num_subsets, int) or num_subsets < 1:
        raise ValueError(f"num_subsets must be an int >= 1, got {num_subsets!r}")
    num_subsets = max(1, min(num_subsets, min(len(features_a), len(features_b)) // 2))
    subset_size = min(len(features_a), len(features_b)) // num_subsets
    order_a = torch.randperm(len(features_a), generator=generator)
    order_b = torch.randperm(len(features_b), generator=generator)
    estimates = torch.stack(
        [
            unbiased_mmd2(
                features_a[order_a[i * subset_size : (i + 1) * subset_size]],
                features_b[order_b[i * subset_size : (i + 1) * subset_size]],
            )
            for i in range(num_subsets)
        ]
    )
    standard_error = float(estimates.std() / num_subsets**0.5) if num_subsets > 1 else None
    return {
        "kid": float(estimates.mean()),
        "standard_error": standard_error,
        "num_subsets": num_subsets,
        "subset_size": subset_size,
    }


@torch.no_grad()
def feature_frechet_distance(model, samples_a, samples_b):
    """The Fréchet distance between two image sets ``[N, C, H, W]`` in ``model.features`` space."""
    return frechet_distance(model.features(samples_a), model.features(samples_b))


@torch.no_grad()
def sample_quality(model, samples, reference, generator=None):
    """The Fréchet distance and KID between ``samples`` and ``reference`` ``[N, C, H, W]`` in ``model.features``
    space (the feature classifier; an ``InceptionFeatures`` for the real FID and KID)."""
    features, reference_features = model.features(samples), model.features(reference)
    kid = kernel_inception_distance(features, reference_features, generator=generator)
    return {
        "frechet_distance": frechet_distance(features, reference_features),
        "kid": kid["kid"],
        "kid_standard_error": kid["standard_error"],
    }


class InceptionFeatures:
    """The 2048-d pool features of the Inception-v3 network of FID (TensorFlow's 2015-12-05 graph) from a local
    TorchScript file, such as ``inception-2015-12-05.pt`` of NVIDIA's StyleGAN2-ADA/StyleGAN3 metrics, called as
    ``detector(uint8 images [N, 3, H, W], return_features=True)`` (it resizes to 299×299 itself). Nothing is
    downloaded. TorchScript is code: pass only a file you trust.

    ``features(samples)`` takes images in [−1, 1] (grey ones are repeated to three channels).
    """

    def __init__(self, path, batch_size=64):
        if not os.path.isfile(path):
            raise ValueError(
                f"--inception_weights={path!r}: no such file (a TorchScript Inception, see docs/evaluation.md)"
            )
        self.detector = torch.jit.load(path, map_location="cpu").eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def features(self, samples):
        images = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        return torch.cat(
            [
                self.detector(images[i : i + self.batch_size], return_features=True).double()
                for i in range(0, len(images), self.batch_size)
            ]
        )


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
