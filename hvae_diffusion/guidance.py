"""Guidance as the theory writes it: a change of the score (classifier guidance) or of ε (classifier-free guidance).

Classifier guidance needs ∇_{x_t} log p(y | x_t), taken here by autograd in one of two ways: through a noisy
classifier p_φ(y | x_t, t), or through a classifier of clean data p_φ(y | x_0) evaluated on the denoiser's Tweedie
estimate x̂_0(x_t) (the gradient then flows through the denoiser too). The pipelines convert these scores to and
from the model's parameterization with ``parameterization.convert_prediction``.

The pipelines guide after clipping, as guided-diffusion does (docs/theory.md, "Guidance and clipping"): x̂_0 is
clipped first, the guidance then moves the prediction made from the clipped x̂_0, and the guided x̂_0 is not clipped
again. Classifier guidance has two forms (``GUIDANCE_FORMS``): on the score (``classifier_guided_score``, the
default) or on the mean of p(x_{t'} | x_t) (``mean_guided_original_sample``).
"""

import torch

from .forward_process import broadcast_to, posterior_mean_coefficients, posterior_variance

GUIDANCE_FORMS = ("score", "mean")

# The package's one default guidance weight for its own models: w of classifier-free guidance with class labels, γ
# of classifier guidance, in the pipelines and every program (docs/pipelines.md, "Default guidance scales"). For the
# components of Diffusers' pipelines, ClassifierFreeGuidancePipeline takes their defaults instead (7.5 for text as
# StableDiffusionPipeline, 4.0 for a DiT as DiTPipeline).
DEFAULT_GUIDANCE_SCALE = 2.0


def check_guidance_scale(value, name: str) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a finite real number ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not (value >= 0 and value != float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def logits_of(output) -> torch.Tensor:
    """The logits of a classifier's output: the tensor itself or its ``.logits`` (Diffusers/transformers outputs)."""
    return output if isinstance(output, torch.Tensor) else output.logits


def selected_log_probability(logits: torch.Tensor, class_labels: torch.Tensor, num_classes: int | None = None):
    """Σ_i log softmax(logits_i)[y_i]: the batch's summed log p(y_i | ·), whose gradient is per-sample.

    ``logits`` ``[B, num_classes]`` (computed in float32 at least), ``class_labels`` ints ``[B]``; a ``ValueError``
    if ``num_classes`` is given and the classifier returned another number of logits.
    """
    if num_classes is not None and logits.shape[-1] != num_classes:
        raise ValueError(f"the classifier returned {logits.shape[-1]} logits but declares num_classes={num_classes}")
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(1, class_labels.reshape(-1, 1)).sum()


def classifier_log_prob_gradient(classifier, sample, timestep, class_labels, num_classes: int | None = None):
    """∇_{x_t} log p_φ(y | x_t) of a noisy classifier, by autograd.

    ``classifier(x_t, t)`` returns logits or an object with ``.logits``.

    Args:
        sample: x_t, ``[B, ...]``.
        timestep: t, as the classifier takes it.
        class_labels: y, ints ``[B]``.
        num_classes: if given, the number of logits the classifier must return.

    Returns:
        The gradient, shape and dtype of ``sample``.
    """
    with torch.enable_grad():
        sample = sample.detach().requires_grad_(True)
        logits = logits_of(classifier(sample, timestep))
        (gradient,) = torch.autograd.grad(selected_log_probability(logits, class_labels, num_classes), sample)
    return gradient


def denoised_classifier_log_prob_gradient(
    classifier, predict_original_sample, sample, class_labels, num_classes: int | None = None
):
    """∇_{x_t} log p_φ(y | x̂_0(x_t)): a classifier of clean data on the Tweedie estimate x̂_0 = E[x_0 | x_t].

    The chain rule runs through the denoiser: ∇_{x_t} log p_φ(y | x̂_0) = (∂x̂_0/∂x_t)ᵀ ∇_{x̂_0} log p_φ(y | x̂_0).

    Args:
        classifier: ``classifier(x_0)`` returning logits or an object with ``.logits`` (for example a transformers
            image-classification model, called with ``pixel_values`` positionally).
        predict_original_sample: x_t ↦ x̂_0(x_t), differentiable (the denoiser's output converted to "sample").
        sample: x_t, ``[B, ...]``.
        class_labels: y, ints ``[B]``.
        num_classes: if given, the number of logits the classifier must return.

    Returns:
        ``(gradient, predicted_original_sample)``: the gradient (shape of ``sample``) and x̂_0 (detached), so the caller
        needs no second denoiser call.
    """
    with torch.enable_grad():
        sample = sample.detach().requires_grad_(True)
        predicted_original_sample = predict_original_sample(sample)
        logits = logits_of(classifier(predicted_original_sample))
        (gradient,) = torch.autograd.grad(selected_log_probability(logits, class_labels, num_classes), sample)
    return gradient, predicted_original_sample.detach()


def classifier_guided_score(score: torch.Tensor, classifier_gradient: torch.Tensor, guidance_scale: float):
    """∇log p_γ(x_t | y) = ∇log p(x_t) + γ ∇log p(y | x_t); γ = 1 is Bayes' rule, γ > 1 sharpens p(y | x).

    In ε this is guided-diffusion's ``condition_score``: ε̃ = ε − √(1 − ᾱ_t) γ ∇log p(y | x_t).
    """
    return score + guidance_scale * classifier_gradient.to(score.dtype)


def mean_guided_original_sample(
    original_sample: torch.Tensor,
    classifier_gradient: torch.Tensor,
    guidance_scale: float,
    alphas_cumprod_t: float,
    prev_alphas_cumprod: float,
):
    """guided-diffusion's ``condition_mean``, μ̃ = μ + γ Σ ∇log p(y | x_t), as the x̂_0 that gives that mean.

    The mean of p(x_{t'} | x_t) is μ = c_0 x̂_0 + c_t x_t (``forward_process.posterior_mean_coefficients``), so moving
    μ by γ Σ ∇ moves x̂_0 by γ Σ ∇ / c_0. Σ is the posterior variance σ_q² of the step from ᾱ_t to ᾱ_{t'}
    (``forward_process.posterior_variance``, the "fixed_small" variance); at the last step (ᾱ_{t'} = 1) Σ = 0. Against
    the score form the change of ε is smaller by the factor β_t / (√α_t Σ), α_t = ᾱ_t / ᾱ_{t'}, β_t = 1 − α_t.
    """
    alphas_cumprod_t = torch.tensor(alphas_cumprod_t, dtype=torch.float64)
    prev_alphas_cumprod = torch.tensor(prev_alphas_cumprod, dtype=torch.float64)
    original_sample_coefficient, _ = posterior_mean_coefficients(alphas_cumprod_t, prev_alphas_cumprod)
    shift = guidance_scale * posterior_variance(alphas_cumprod_t, prev_alphas_cumprod) / original_sample_coefficient
    return original_sample + broadcast_to(float(shift), original_sample) * classifier_gradient.to(
        original_sample.dtype
    )


def classifier_free_guidance(unconditional_output, conditional_output, guidance_scale: float):
    """ε̃ = ε(x_t, ∅) + w (ε(x_t, y) − ε(x_t, ∅)): w = 1 is the conditional model, w = 0 the unconditional one.

    The same weights apply in any parameterization (score, x̂_0, v): each is affine in ε with coefficients that depend
    only on x_t and ᾱ_t, and the weights (1 − w, w) sum to one. In score terms this is
    ∇log p_w(x_t | y) = w ∇log p(x_t | y) + (1 − w) ∇log p(x_t).
    """
    return unconditional_output + guidance_scale * (conditional_output - unconditional_output)


def rescale_guided_prediction(guided: torch.Tensor, conditional: torch.Tensor, guidance_rescale: float):
    """Lin et al. 2023 ("Common diffusion noise schedules and sample steps are flawed", section 3.4), as Diffusers'
    ``rescale_noise_cfg``: x̃ = φ x̂ σ_cond / σ_guided + (1 − φ) x̂, with σ the per-sample standard deviation over all
    but the batch dimension and φ = ``guidance_rescale``; it undoes the overexposure of large guidance scales."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided
