"""Two-dimensional toy data sets, as torch datasets the training loop takes.

Each data set is a ``ToyDataset`` whose items are ``{"sample": [2] float tensor}`` (with ``"class_labels": int`` when
labels are kept), the form of ``hvae_diffusion.training``'s image datasets with vectors ``[D]`` in place of images
``[C, H, W]``:

- ``"moons"``: scikit-learn's two interleaving half circles (two classes);
- ``"swiss_roll"``: scikit-learn's 3-D swiss roll projected onto its (x, z) plane, a 2-D spiral (one class);
- ``"blobs"``: three isotropic Gaussian blobs, labelled by blob (three classes);
- ``"gaussian_mixture"``: ``toy_gaussian_mixture()``, whose score, denoiser and class posterior are exact
  (``hvae_diffusion.testing``), so a learned model can be compared with the truth.

The scikit-learn sets are centred and scaled to unit standard deviation over both coordinates, so the noise of the
forward process (standard normal) is on the same scale as the data.
"""

import math

import torch

TOY_DATASETS = ("moons", "swiss_roll", "blobs", "gaussian_mixture")


def toy_gaussian_mixture():
    """The toy's exact ``GaussianMixture``: six components of std 0.15 on a circle of radius 1.5, three classes.

    Component k sits at angle 2πk/6 and belongs to class k mod 3, so each class is two opposite modes.
    """
    from .testing import GaussianMixture

    angles = torch.arange(6, dtype=torch.float64) * (2 * math.pi / 6)
    means = 1.5 * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(means, stds=0.15, component_labels=[k % 3 for k in range(6)])


def _standardize(samples: torch.Tensor) -> torch.Tensor:
    samples = samples - samples.mean(dim=0)
    return samples / samples.std()


def make_toy_samples(name: str, num_samples: int, seed: int = 0):
    """``num_samples`` points of data set ``name`` (one of ``TOY_DATASETS``): float32 ``[N, 2]`` and labels ``[N]``."""
    if name not in TOY_DATASETS:
        raise ValueError(f"name must be one of {TOY_DATASETS}, got {name!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    from sklearn import datasets

    if name == "gaussian_mixture":
        samples, labels = toy_gaussian_mixture().sample(num_samples, generator=torch.Generator().manual_seed(seed))
        return samples.float(), labels
    if name == "moons":
        samples, labels = datasets.make_moons(num_samples, noise=0.05, random_state=seed)
    elif name == "swiss_roll":
        points, _ = datasets.make_swiss_roll(num_samples, noise=0.3, random_state=seed)
        samples, labels = points[:, [0, 2]], [0] * num_samples
    else:
        centers = [[-2.0, -1.0], [2.0, -1.0], [0.0, 2.0]]
        samples, labels = datasets.make_blobs(num_samples, centers=centers, cluster_std=0.4, random_state=seed)
    samples = _standardize(torch.as_tensor(samples, dtype=torch.float64))
    return samples.float(), torch.as_tensor(labels, dtype=torch.long)


class ToyDataset(torch.utils.data.Dataset):
    """Vectors (and optionally labels) as ``{"sample": [D] float tensor, "class_labels": int}`` items.

    Without ``labels`` the items have no ``"class_labels"`` key, so the training loop trains an unconditional model
    (it passes class labels to the model whenever the batch has them).

    Attributes:
        samples: ``[N, D]`` float32; labels: ``[N]`` long or None; num_classes: the label count (1 without labels).
    """

    def __init__(self, samples: torch.Tensor, labels: torch.Tensor | None = None):
        samples = torch.as_tensor(samples, dtype=torch.float32)
        if samples.ndim != 2:
            raise ValueError(f"samples must have shape [N, D], got {tuple(samples.shape)}")
        if labels is not None:
            labels = torch.as_tensor(labels).long()
            if labels.shape != (len(samples),):
                raise ValueError(f"labels must have shape [{len(samples)}], got {tuple(labels.shape)}")
        self.samples = samples
        self.labels = labels
        self.num_classes = 1 if labels is None else int(labels.max()) + 1

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        if self.labels is None:
            return {"sample": self.samples[index]}
        return {"sample": self.samples[index], "class_labels": int(self.labels[index])}


def make_toy_dataset(name: str, num_samples: int = 4096, seed: int = 0, with_labels: bool = False) -> ToyDataset:
    """Data set ``name`` (one of ``TOY_DATASETS``) of ``num_samples`` points as a ``ToyDataset``.

    ``with_labels`` keeps the class labels (to train a class-conditional denoiser or a noisy classifier).
    """
    samples, labels = make_toy_samples(name, num_samples, seed)
    return ToyDataset(samples, labels if with_labels else None)
