"""Exact ground truth for checking samplers without training: a Gaussian mixture and its optimal denoiser.

If x_0 ~ Σ_k π_k N(μ_k, diag(s_k²)) then q(x_t) = Σ_k π_k N(√ᾱ_t μ_k, diag(ᾱ_t s_k² + 1 − ᾱ_t)), so the score
∇log p(x_t), ε* = −√(1 − ᾱ_t) ∇log p(x_t), E[x_0 | x_t] (Tweedie) and the class posterior p(y | x_t) (the
posterior weight of class y's components) are all closed form. ``ExactMixtureDenoiser`` and
``ExactMixtureClassifier`` wrap them as Diffusers models, with the call signatures of ``UNet2DModel`` and of a
noisy classifier, so any pipeline or scheduler can be run on them: a correct sampler must reproduce the mixture.
"""

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput

from .parameterization import check_prediction_type, convert_prediction


class GaussianMixture:
    """A diagonal Gaussian mixture over vectors of dimension D, each component tagged with a class label.

    Args:
        means: μ_k, shape ``[K, D]``.
        stds: s_k, shape ``[K, D]`` or ``[K]`` or a float.
        weights: π_k, shape ``[K]`` (normalized here); uniform by default.
        component_labels: the class of each component, ints ``[K]``; component k is class k by default.
    """

    def __init__(self, means, stds=0.1, weights=None, component_labels=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape [K, D], got {tuple(self.means.shape)}")
        num_components, dim = self.means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        self.stds = stds.reshape(-1, 1).expand(num_components, dim) if stds.ndim < 2 else stds
        if bool((self.stds <= 0).any()):
            raise ValueError("stds must be > 0")
        weights = torch.ones(num_components) if weights is None else torch.as_tensor(weights)
        self.weights = weights.double() / weights.sum()
        labels = range(num_components) if component_labels is None else component_labels
        self.component_labels = torch.as_tensor(labels, dtype=torch.long)
        self.num_classes = int(self.component_labels.max()) + 1

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, num_samples: int, generator: torch.Generator | None = None, class_label: int | None = None):
        """Draw x_0 (float64 ``[N, D]``) and the class of each draw (``[N]``); only class ``class_label`` if given."""
        weights = self.weights if class_label is None else self.weights * (self.component_labels == class_label)
        components = torch.multinomial(weights, num_samples, replacement=True, generator=generator)
        noise = torch.randn(num_samples, self.dim, generator=generator, dtype=torch.float64)
        return self.means[components] + self.stds[components] * noise, self.component_labels[components]

    def component_log_joint(self, sample, alphas_cumprod_t):
        """log π_k + log N(x_t; √ᾱ_t μ_k, ᾱ_t s_k² + 1 − ᾱ_t) for every component, ``[N, K]``, and the variances."""
        alphas_cumprod_t = torch.as_tensor(alphas_cumprod_t, dtype=torch.float64).reshape(-1, 1, 1)
        means = alphas_cumprod_t.sqrt() * self.means  # [N or 1, K, D]
        variances = alphas_cumprod_t * self.stds**2 + (1 - alphas_cumprod_t)
        difference = sample.double().unsqueeze(1) - means
        log_density = -0.5 * (difference**2 / variances + variances.log() + math.log(2 * math.pi)).sum(-1)
        return self.weights.log() + log_density, difference, variances

    def log_prob(self, sample, alphas_cumprod_t=1.0, class_label=None):
        """log q(x_t) (or log q(x_t | y) for ``class_label``), ``[N]``; ᾱ_t = 1 gives the data density."""
        log_joint, _, _ = self.component_log_joint(sample, alphas_cumprod_t)
        if class_label is not None:
            log_joint = self._restrict_to_class(log_joint, class_label)
        return torch.logsumexp(log_joint, dim=1)

    def _restrict_to_class(self, log_joint, class_label):
        class_label = torch.as_tensor(class_label).reshape(-1, 1)
        log_joint = log_joint.masked_fill(self.component_labels.unsqueeze(0) != class_label, -math.inf)
        # renormalize the class prior so that this is log q(x_t | y), not log q(x_t, y)
        class_weight = torch.stack([self.weights[self.component_labels == c].sum() for c in range(self.num_classes)])
        return log_joint - class_weight.log()[class_label]

    def score(self, sample, alphas_cumprod_t, class_label=None):
        """∇_{x_t} log q(x_t) (or log q(x_t | y)) = Σ_k r_k(x_t) · (−(x_t − √ᾱ_t μ_k) / (ᾱ_t s_k² + 1 − ᾱ_t)).

        r_k are the components' posterior responsibilities. float64 ``[N, D]``; ``class_label`` a scalar or ``[N]``.
        """
        log_joint, difference, variances = self.component_log_joint(sample, alphas_cumprod_t)
        if class_label is not None:
            log_joint = self._restrict_to_class(log_joint, class_label)
        responsibilities = torch.softmax(log_joint, dim=1).unsqueeze(-1)
        return (responsibilities * (-difference / variances)).sum(1)

    def class_log_posterior(self, sample, alphas_cumprod_t):
        """log p(y | x_t) for every class, ``[N, num_classes]``: the summed responsibility of each class's components."""
        log_joint, _, _ = self.component_log_joint(sample, alphas_cumprod_t)
        per_class = torch.stack(
            [torch.logsumexp(log_joint[:, self.component_labels == c], dim=1) for c in range(self.num_classes)], 1
        )
        return per_class - torch.logsumexp(log_joint, dim=1, keepdim=True)


class _MixtureModel(ModelMixin, ConfigMixin):
    """Shared set-up of the exact models: the mixture and the ᾱ table they are evaluated with."""

    def _setup(self, means, stds, weights, component_labels, alphas_cumprod):
        self.mixture = GaussianMixture(means, stds, weights, component_labels)
        # not named "alphas_cumprod": that name is a config entry, which ModelMixin also exposes as an attribute
        table = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.register_buffer("alphas_cumprod_table", table, persistent=False)
        # ModelMixin reads dtype/device from parameters; this one carries no learning, only that information.
        self.dtype_anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)

    def _alphas_cumprod_at(self, sample, timestep):
        timestep = torch.as_tensor(timestep, device=self.alphas_cumprod_table.device).long().reshape(-1)
        alphas_cumprod_t = self.alphas_cumprod_table[timestep]
        return alphas_cumprod_t.expand(sample.shape[0]) if timestep.numel() == 1 else alphas_cumprod_t

    def _flatten(self, sample):
        if math.prod(sample.shape[1:]) != self.mixture.dim:
            raise ValueError(f"sample must have {self.mixture.dim} values per item, got shape {tuple(sample.shape)}")
        return sample.reshape(sample.shape[0], -1)


class ExactMixtureDenoiser(_MixtureModel):
    """The optimal denoiser of a ``GaussianMixture``, called like ``UNet2DModel``: ``model(x_t, t, class_labels)``.

    It outputs the exact E[x_0 | x_t], ε*, ∇log q(x_t) or v (``prediction_type``) for the ᾱ_t of timestep t, of
    the whole mixture or, given ``class_labels``, of class y's components; the label ``num_classes`` is the null
    label (the unconditional model), as classifier-free guidance expects. Samples may be vectors ``[B, D]`` or any
    shape with D values per item (for example ``[B, D, 1, 1]``).
    """

    @register_to_config
    def __init__(
        self,
        means,
        stds=0.1,
        weights=None,
        component_labels=None,
        alphas_cumprod=None,
        prediction_type: str = "epsilon",
        in_channels: int | None = None,
        sample_size: int | None = None,
        num_class_embeds: int | None = None,
    ):
        super().__init__()
        check_prediction_type(prediction_type)
        self._setup(means, stds, weights, component_labels, alphas_cumprod)
        self.prediction_type = prediction_type

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True):
        flat = self._flatten(sample).double()
        alphas_cumprod_t = self._alphas_cumprod_at(sample, timestep).to(sample.device)
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=sample.device).reshape(-1)
            score = self.mixture.score(flat, alphas_cumprod_t)
            conditional = class_labels < self.mixture.num_classes
            if bool(conditional.any()):
                conditional_score = self.mixture.score(
                    flat[conditional], alphas_cumprod_t[conditional], class_labels[conditional]
                )
                score = score.index_put((conditional.nonzero().squeeze(1),), conditional_score)
        else:
            score = self.mixture.score(flat, alphas_cumprod_t)
        output = convert_prediction(score, flat, alphas_cumprod_t, "score", self.prediction_type)
        output = output.reshape(sample.shape).to(sample.dtype)
        return UNet2DOutput(sample=output) if return_dict else (output,)


class ExactMixtureClassifier(_MixtureModel):
    """The exact noisy classifier of a ``GaussianMixture``: ``model(x_t, t)`` returns logits log p(y | x_t)."""

    @register_to_config
    def __init__(self, means, stds=0.1, weights=None, component_labels=None, alphas_cumprod=None):
        super().__init__()
        self._setup(means, stds, weights, component_labels, alphas_cumprod)

    @property
    def num_classes(self) -> int:
        return self.mixture.num_classes

    def forward(self, sample, timestep):
        flat = self._flatten(sample)
        alphas_cumprod_t = self._alphas_cumprod_at(sample, timestep).to(sample.device)
        return self.mixture.class_log_posterior(flat, alphas_cumprod_t).to(sample.dtype)


def sliced_wasserstein_distance(samples_a, samples_b, num_projections: int = 64, seed: int = 0) -> float:
    """The sliced 1-Wasserstein distance between two equal-size sample sets ``[N, D]`` (mean over random directions).

    A cheap, consistent distribution distance for tests: compare a sampler's output with fresh draws of the target,
    against the distance between two fresh draw sets.
    """
    samples_a = samples_a.reshape(samples_a.shape[0], -1).double()
    samples_b = samples_b.reshape(samples_b.shape[0], -1).double()
    if samples_a.shape != samples_b.shape:
        raise ValueError(
            f"sample sets must have equal shapes, got {tuple(samples_a.shape)} and {tuple(samples_b.shape)}"
        )
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(samples_a.shape[1], num_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    projected_a = (samples_a @ directions).sort(dim=0).values
    projected_b = (samples_b @ directions).sort(dim=0).values
    return float((projected_a - projected_b).abs().mean())
