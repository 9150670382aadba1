"""The guidance math of hvae_diffusion.guidance, checked against the exact Gaussian-mixture posterior and by hand."""

import math

import pytest
import torch

from hvae_diffusion.guidance import (
    check_guidance_scale,
    classifier_free_guidance,
    classifier_guided_score,
    classifier_log_prob_gradient,
    denoised_classifier_log_prob_gradient,
    logits_of,
    selected_log_probability,
)
from hvae_diffusion.parameterization import PREDICTION_TYPES, convert_prediction
from hvae_diffusion.testing import ExactMixtureClassifier, GaussianMixture

MEANS = [[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
LABELS = [0, 0, 1]
ALPHAS_CUMPROD = torch.linspace(0.999, 0.05, 20, dtype=torch.float64)


@pytest.fixture
def mixture():
    return GaussianMixture(MEANS, 0.3, component_labels=LABELS)


@pytest.fixture
def points(generator):
    return torch.randn(16, 2, generator=generator, dtype=torch.float64) * 1.5


class LogitsOutput:
    def __init__(self, logits):
        self.logits = logits


@pytest.mark.parametrize("timestep", [2, 10, 19])
def test_noisy_classifier_gradient_is_bayes_rule(mixture, points, timestep):
    """∇log p(y | x_t) by autograd equals ∇log p(x_t | y) − ∇log p(x_t) of the exact mixture."""
    classifier = ExactMixtureClassifier(MEANS, 0.3, component_labels=LABELS, alphas_cumprod=ALPHAS_CUMPROD).double()
    labels = torch.arange(16) % 2
    gradient = classifier_log_prob_gradient(classifier, points, timestep, labels)
    alpha = ALPHAS_CUMPROD[timestep]
    expected = mixture.score(points, alpha, class_label=labels) - mixture.score(points, alpha)
    torch.testing.assert_close(gradient, expected, rtol=1e-6, atol=1e-8)


def test_gamma_one_guided_score_is_class_conditional_score(mixture, points):
    """γ = 1: ∇log p(x_t) + ∇log p(y | x_t) = ∇log p(x_t | y), exactly."""
    classifier = ExactMixtureClassifier(MEANS, 0.3, component_labels=LABELS, alphas_cumprod=ALPHAS_CUMPROD).double()
    labels = torch.ones(16, dtype=torch.long)
    alpha = ALPHAS_CUMPROD[7]
    gradient = classifier_log_prob_gradient(classifier, points, 7, labels)
    guided = classifier_guided_score(mixture.score(points, alpha), gradient, 1.0)
    torch.testing.assert_close(guided, mixture.score(points, alpha, class_label=labels), rtol=1e-6, atol=1e-8)


def test_guided_score_scales_the_classifier_term(points):
    score, gradient = torch.randn_like(points), torch.randn_like(points)
    torch.testing.assert_close(classifier_guided_score(score, gradient, 0.0), score)
    torch.testing.assert_close(classifier_guided_score(score, gradient, 3.0), score + 3 * gradient)


def test_denoised_classifier_gradient_goes_through_the_denoiser(points):
    """Linear denoiser x̂_0 = A x_t and linear classifier logits = x̂_0 W: ∇ = Aᵀ W (onehot(y) − softmax)."""
    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(2, 2, generator=generator, dtype=torch.float64)
    weights = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    labels = torch.arange(16) % 3
    gradient, predicted = denoised_classifier_log_prob_gradient(
        lambda x0: x0 @ weights, lambda x: x @ matrix.T, points, labels
    )
    predicted_expected = points @ matrix.T
    probabilities = torch.softmax(predicted_expected @ weights, dim=1)
    onehot = torch.nn.functional.one_hot(labels, 3).double()
    expected = ((onehot - probabilities) @ weights.T) @ matrix
    torch.testing.assert_close(predicted, predicted_expected)
    torch.testing.assert_close(gradient, expected)
    assert not predicted.requires_grad


def test_gradient_is_taken_even_under_no_grad(mixture, points):
    classifier = ExactMixtureClassifier(MEANS, 0.3, component_labels=LABELS, alphas_cumprod=ALPHAS_CUMPROD).double()
    with torch.no_grad():
        gradient = classifier_log_prob_gradient(classifier, points, 3, torch.zeros(16, dtype=torch.long))
    assert gradient.abs().sum() > 0


def test_logits_or_output_object():
    logits = torch.randn(4, 3)
    assert logits_of(logits) is logits
    assert logits_of(LogitsOutput(logits)) is logits
    gradient_a = classifier_log_prob_gradient(
        lambda x, t: x @ torch.ones(2, 3), torch.randn(4, 2), 0, torch.zeros(4).long()
    )
    gradient_b = classifier_log_prob_gradient(
        lambda x, t: LogitsOutput(x @ torch.ones(2, 3)), torch.randn(4, 2), 0, torch.zeros(4).long()
    )
    assert gradient_a.shape == gradient_b.shape == (4, 2)


def test_selected_log_probability_and_class_count_check():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    value = selected_log_probability(logits, torch.tensor([1, 1]))
    torch.testing.assert_close(value, torch.tensor(math.log(0.75) + math.log(0.25)))
    with pytest.raises(ValueError, match="returned 2 logits but declares num_classes=3"):
        selected_log_probability(logits, torch.tensor([1, 1]), num_classes=3)


def test_classifier_free_guidance_endpoints_and_extrapolation():
    unconditional, conditional = torch.randn(5, 2), torch.randn(5, 2)
    torch.testing.assert_close(classifier_free_guidance(unconditional, conditional, 0.0), unconditional)
    torch.testing.assert_close(classifier_free_guidance(unconditional, conditional, 1.0), conditional)
    torch.testing.assert_close(
        classifier_free_guidance(unconditional, conditional, 3.0), unconditional + 3 * (conditional - unconditional)
    )


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_classifier_free_guidance_is_the_same_in_every_parameterization(mixture, points, prediction_type):
    """Combining ε's and converting equals combining in any parameterization, and in score terms it is
    w ∇log p(x_t | y) + (1 − w) ∇log p(x_t)."""
    alpha, w = ALPHAS_CUMPROD[5], 2.5
    score_y = mixture.score(points, alpha, class_label=1)
    score = mixture.score(points, alpha)
    as_type = lambda s: convert_prediction(s, points, alpha, "score", prediction_type)  # noqa: E731
    guided = classifier_free_guidance(as_type(score), as_type(score_y), w)
    guided_score = convert_prediction(guided, points, alpha, prediction_type, "score")
    torch.testing.assert_close(guided_score, w * score_y + (1 - w) * score)


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf"), True, "2", None])
def test_bad_guidance_scale(value):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        check_guidance_scale(value, "guidance_scale")


@pytest.mark.parametrize("value", [0, 0.0, 1, 7.5])
def test_good_guidance_scale(value):
    check_guidance_scale(value, "guidance_scale")
