"""The four things a denoiser can predict, and exact conversions between them given x_t and ᾱ_t.

- ``"sample"``: x̂_0, the clean data (the mean E[x_0 | x_t] at the optimum);
- ``"epsilon"``: ε̂, the noise in x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε;
- ``"score"``: ŝ ≈ ∇_{x_t} log p(x_t), linked to the others by Tweedie's formula;
- ``"v_prediction"``: v = √ᾱ_t ε − √(1 − ᾱ_t) x_0.

Every conversion goes through ε, the one quantity all the others are affine in, so each formula of the theory
appears exactly once below. Coefficients ``alphas_cumprod_t`` may be a scalar or one per sample (``[B]``).
"""

from .forward_process import posterior_mean, signal_and_noise_scales

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "score")


def check_prediction_type(prediction_type: str, argument: str = "prediction_type") -> None:
    """Raise a ``ValueError`` naming ``argument`` unless ``prediction_type`` is one of ``PREDICTION_TYPES``."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{argument} must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def split_learned_variance(model_output, sample):
    """(prediction, variance channels or None) of a model output for ``sample`` of C channels.

    A model with a learned variance (``variance_type`` "learned" or "learned_range", as improved DDPM and DiT train)
    outputs 2C channels: the prediction, then the variance. Any other output is the prediction alone. This is the one
    place the package splits them; the shape decides, so it works for any scheduler and any denoiser.
    """
    if model_output.ndim == sample.ndim and model_output.shape[1] == 2 * sample.shape[1]:
        prediction, variance = model_output.chunk(2, dim=1)
        return prediction, variance
    return model_output, None


def epsilon_from_sample(predicted_x0, sample, alphas_cumprod_t):
    """ε = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t)."""
    sqrt_alpha, sqrt_one_minus_alpha = signal_and_noise_scales(alphas_cumprod_t, sample)
    return (sample - sqrt_alpha * predicted_x0) / sqrt_one_minus_alpha


def sample_from_epsilon(epsilon, sample, alphas_cumprod_t):
    """x_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t."""
    sqrt_alpha, sqrt_one_minus_alpha = signal_and_noise_scales(alphas_cumprod_t, sample)
    return (sample - sqrt_one_minus_alpha * epsilon) / sqrt_alpha


def epsilon_from_score(score, sample, alphas_cumprod_t):
    """ε = −√(1 − ᾱ_t) ∇log p(x_t), the inverse of ``score_from_epsilon``."""
    _, sqrt_one_minus_alpha = signal_and_noise_scales(alphas_cumprod_t, sample)
    return -sqrt_one_minus_alpha * score


def score_from_epsilon(epsilon, sample, alphas_cumprod_t):
    """∇log p(x_t) = −ε / √(1 − ᾱ_t).

    With x_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t this is Tweedie's formula E[x_0 | x_t] = (x_t + (1 − ᾱ_t) ∇log p(x_t)) / √ᾱ_t.
    """
    _, sqrt_one_minus_alpha = signal_and_noise_scales(alphas_cumprod_t, sample)
    return -epsilon / sqrt_one_minus_alpha


def epsilon_from_velocity(velocity, sample, alphas_cumprod_t):
    """ε = √(1 − ᾱ_t) x_t + √ᾱ_t v."""
    sqrt_alpha, sqrt_one_minus_alpha = signal_and_noise_scales(alphas_cumprod_t, sample)
    return sqrt_one_minus_alpha * sample + sqrt_alpha * velocity


def velocity_from_epsilon(epsilon, sample, alphas_cumprod_t):
    """v = √ᾱ_t ε − √(1 − ᾱ_t) x_0, written with x_t: v = (ε − √(1 − ᾱ_t) x_t) / √ᾱ_t."""
    sqrt_alpha, sqrt_one_minus_alpha = signal_and_noise_scales(alphas_cumprod_t, sample)
    return (epsilon - sqrt_one_minus_alpha * sample) / sqrt_alpha


def velocity(original_sample, noise, alphas_cumprod_t):
    """The v target of a training pair: v = √ᾱ_t ε − √(1 − ᾱ_t) x_0."""
    sqrt_alpha, sqrt_one_minus_alpha = signal_and_noise_scales(alphas_cumprod_t, original_sample)
    return sqrt_alpha * noise - sqrt_one_minus_alpha * original_sample


_TO_EPSILON = {
    "epsilon": lambda epsilon, sample, alphas_cumprod_t: epsilon,
    "sample": epsilon_from_sample,
    "score": epsilon_from_score,
    "v_prediction": epsilon_from_velocity,
}
_FROM_EPSILON = {
    "epsilon": lambda epsilon, sample, alphas_cumprod_t: epsilon,
    "sample": sample_from_epsilon,
    "score": score_from_epsilon,
    "v_prediction": velocity_from_epsilon,
}


def convert_prediction(model_output, sample, alphas_cumprod_t, from_type: str, to_type: str):
    """Express a prediction made in parameterization ``from_type`` in ``to_type`` (both from ``PREDICTION_TYPES``).

    Args:
        model_output: the prediction, shape ``[B, ...]`` like ``sample``.
        sample: x_t.
        alphas_cumprod_t: ᾱ_t, a scalar or ``[B]``.
    """
    check_prediction_type(from_type, "from_type")
    check_prediction_type(to_type, "to_type")
    if from_type == to_type:
        return model_output
    epsilon = _TO_EPSILON[from_type](model_output, sample, alphas_cumprod_t)
    return _FROM_EPSILON[to_type](epsilon, sample, alphas_cumprod_t)


def training_target(original_sample, noise, sample, alphas_cumprod_t, prediction_type: str):
    """What a model of ``prediction_type`` should output for the pair (x_0, ε) that made x_t.

    x_0 for "sample", ε for "epsilon", v for "v_prediction" and the conditional score
    ∇log q(x_t | x_0) = −ε / √(1 − ᾱ_t) for "score" (denoising score matching: its regression optimum is the
    marginal score ∇log p(x_t)).
    """
    check_prediction_type(prediction_type)
    if prediction_type == "sample":
        return original_sample
    if prediction_type == "v_prediction":
        return velocity(original_sample, noise, alphas_cumprod_t)
    return _FROM_EPSILON[prediction_type](noise, sample, alphas_cumprod_t)


def posterior_mean_from_prediction(model_output, sample, alphas_cumprod_t, prev_alphas_cumprod, prediction_type):
    """μ_θ(x_t): the posterior mean μ_q with the model's x̂_0 (converted from any parameterization) in place of x_0."""
    predicted_x0 = convert_prediction(model_output, sample, alphas_cumprod_t, prediction_type, "sample")
    return posterior_mean(predicted_x0, sample, alphas_cumprod_t, prev_alphas_cumprod)
