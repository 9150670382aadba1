"""Guidance as the theory writes it: a change of the score (classifier guidance) or of ε (classifier-free guidance).

Classifier guidance needs ∇_{x_t} log p(y | x_t), taken here by autograd in one of two ways: through a noisy
classifier p_φ(y | x_t, t), or through a classifier of clean data p_φ(y | x_0) evaluated on the denoiser's Tweedie
estimate x̂_0(x_t) (the gradient then flows through the denoiser too). The pipelines convert these scores to and
from the model's parameterization with ``parameterization.convert_prediction``.

The pipelines guide after clipping, as guided-diffusion does (docs/theory.md, "Guidance and clipping"): x̂_0 is
clipped first, the guidance then moves the prediction made from the clipped x̂_0, and the guided x̂_0 is not clipped
again. Classifier guidance has two forms (``GUIDANCE_FORMS``): on the score (``classifier_guided_score``, the
default) or on the mean of p(x_{t'} | x_t) (``mean_guided_original_sample``).

What came after plain guidance, each from its paper:

- guidance intervals (Kynkäänniemi et al. 2024): guidance only where ``in_guidance_interval``;
- CFG++ (Chung et al. 2024): x̂_0 from the guided ε, re-noised with the unconditional ε (``cfg_plus_plus_step``,
  and the CFG weight that gives the same step, ``cfg_plus_plus_scale``);
- adaptive projected guidance (Sadat et al. 2024, ``adaptive_projected_guidance``);
- CFG-Zero* (Fan et al. 2025, ``cfg_zero_star_guidance``).
"""

import math

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


def check_guidance_interval(interval, name: str = "guidance_interval") -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``interval`` is ``None`` or a pair (t_lo, t_hi) of finite
    numbers with t_lo < t_hi (timesteps of the scheduler's training chain, 0 … num_train_timesteps − 1)."""
    if interval is None:
        return
    if isinstance(interval, (str, bytes)) or not hasattr(interval, "__len__") or len(interval) != 2:
        raise ValueError(f"{name} must be None or a pair (t_lo, t_hi) of timesteps, got {interval!r}")
    low, high = interval
    for value in (low, high):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must hold two finite numbers (t_lo, t_hi), got {interval!r}")
    if not low < high:
        raise ValueError(f"{name}=(t_lo, t_hi) needs t_lo < t_hi, got {interval!r}")


def in_guidance_interval(timestep, interval) -> bool:
    """Whether the step at ``timestep`` is guided: t_lo < t ≤ t_hi, or every step when ``interval`` is ``None``.

    Kynkäänniemi et al. 2024 ("Applying guidance in a limited interval improves sample and distribution quality in
    diffusion models") guide only for noise levels σ_t ∈ (σ_lo, σ_hi]; σ_t grows with t, so that is an interval of
    timesteps (``guidance_interval_from_sigmas``). Outside it they use the conditional model alone (w = 1): strong
    guidance at high noise collapses the sample's layout onto few modes, and at low noise it does little but cost.
    In hierarchical-VAE terms the interval says which latents x_t are tilted toward y.
    """
    return interval is None or interval[0] < float(timestep) <= interval[1]


def guidance_interval_from_sigmas(sigma_low: float, sigma_high: float, alphas_cumprod) -> tuple[int, int]:
    """(t_lo, t_hi) such that t_lo < t ≤ t_hi exactly when σ_lo < σ_t ≤ σ_hi, σ_t = √((1 − ᾱ_t) / ᾱ_t).

    The interval of a paper given in EDM's σ (EDM2 on ImageNet-512: (0.28, 2.9]) as the timesteps of a
    variance-preserving chain with ``alphas_cumprod`` (σ_t increasing in t). t_lo is the last t with σ_t ≤ σ_lo (−1
    if none), t_hi the last t with σ_t ≤ σ_hi.
    """
    if not 0 <= sigma_low < sigma_high:
        raise ValueError(f"the sigmas must satisfy 0 <= sigma_low < sigma_high, got ({sigma_low}, {sigma_high})")
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    return int((sigmas <= sigma_low).sum()) - 1, int((sigmas <= sigma_high).sum()) - 1


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


# Adapted from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.rescale_noise_cfg
def rescale_guided_prediction(guided: torch.Tensor, conditional: torch.Tensor, guidance_rescale: float):
    """Lin et al. 2023 ("Common diffusion noise schedules and sample steps are flawed", section 3.4), as Diffusers'
    ``rescale_noise_cfg``: x̃ = φ x̂ σ_cond / σ_guided + (1 − φ) x̂, with σ the per-sample standard deviation over all
    but the batch dimension and φ = ``guidance_rescale``; it undoes the overexposure of large guidance scales."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def cfg_plus_plus_step(
    sample: torch.Tensor,
    unconditional_noise: torch.Tensor,
    conditional_noise: torch.Tensor,
    guidance_scale: float,
    alphas_cumprod_t: float,
    prev_alphas_cumprod: float,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
):
    """One CFG++ step (Chung et al. 2024, "CFG++: Manifold-constrained classifier free guidance", Algorithm 1 for
    DDIM; with η as DDIM's):

        ε_λ = ε_∅ + λ (ε_y − ε_∅),   x̂_0 = (x_t − √(1 − ᾱ_t) ε_λ) / √ᾱ_t,
        x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ²) ε_∅ + σ z,   σ² = η² (1 − ᾱ_{t'}) / (1 − ᾱ_t) · (1 − ᾱ_t / ᾱ_{t'}).

    The guided ε only moves x̂_0; the step back up to noise level t' re-noises with the unconditional ε, which keeps
    x_{t'} near the data manifold the unconditional model knows. λ = ``guidance_scale`` ∈ [0, 1]; λ = 0 is the
    unconditional DDIM step. η = 1 is the ancestral step (the posterior mean of q(x_{t'} | x_t, x̂_0) plus σ_q z).
    ``noise`` z is needed when η > 0.
    """
    alphas_cumprod_t = torch.tensor(alphas_cumprod_t, dtype=torch.float64)
    prev_alphas_cumprod = torch.tensor(prev_alphas_cumprod, dtype=torch.float64)
    variance = eta**2 * posterior_variance(alphas_cumprod_t, prev_alphas_cumprod)
    if eta > 0 and noise is None:
        raise ValueError("cfg_plus_plus_step with eta > 0 needs noise")
    guided_noise = classifier_free_guidance(unconditional_noise, conditional_noise, guidance_scale)
    original_sample = (sample - float((1 - alphas_cumprod_t).sqrt()) * guided_noise) / float(alphas_cumprod_t.sqrt())
    direction = float((1 - prev_alphas_cumprod - variance).clamp(min=0).sqrt()) * unconditional_noise
    prev_sample = float(prev_alphas_cumprod.sqrt()) * original_sample + direction
    return prev_sample if eta == 0 else prev_sample + float(variance.sqrt()) * noise


def cfg_plus_plus_scale(guidance_scale: float, alphas_cumprod_t: float, prev_alphas_cumprod: float, eta: float = 0.0):
    """The classifier-free weight w_t whose ordinary DDIM step (η as given) equals the CFG++ step with λ:

        w_t = λ a / (a − b),   a = √(ᾱ_{t'} (1 − ᾱ_t) / ᾱ_t),   b = √(1 − ᾱ_{t'} − σ²)

    (σ as in ``cfg_plus_plus_step``). Both steps are affine in the ε they are given: CFG++ moves x_{t'} by −a λ d
    and CFG by −(a − b) w d, d = ε_y − ε_∅. a² − b² = ᾱ_{t'}/ᾱ_t − 1 + σ² > 0, so w_t is finite; it grows as the
    steps shrink (a − b → 0), which is why λ lives in [0, 1]. At the last step (ᾱ_{t'} = 1) w_t = λ. A pipeline can
    therefore run CFG++ through any scheduler that steps DDIM's form, with its own noise and clipping.
    """
    alphas_cumprod_t = torch.tensor(alphas_cumprod_t, dtype=torch.float64)
    prev_alphas_cumprod = torch.tensor(prev_alphas_cumprod, dtype=torch.float64)
    variance = eta**2 * posterior_variance(alphas_cumprod_t, prev_alphas_cumprod)
    a = (prev_alphas_cumprod * (1 - alphas_cumprod_t) / alphas_cumprod_t).sqrt()
    b = (1 - prev_alphas_cumprod - variance).clamp(min=0).sqrt()
    return float(guidance_scale * a / (a - b))


def adaptive_projected_guidance(
    unconditional_output: torch.Tensor,
    conditional_output: torch.Tensor,
    guidance_scale: float,
    eta: float = 0.0,
    norm_threshold: float = 0.0,
    momentum: float = 0.0,
    running_average: torch.Tensor | None = None,
):
    """Adaptive projected guidance (Sadat et al. 2024, "Eliminating oversaturation and artifacts of high guidance
    scales in diffusion models", Algorithm 1), on denoised predictions D (x̂_0) as the paper applies it:

        Δ = D(x_t, y) − D(x_t, ∅);   with momentum β: Δ ← Δ + β Δ̄_prev (Δ̄ the running average, returned);
        with rescaling r > 0: Δ ← Δ · min(1, r / ‖Δ‖);
        Δ_∥ = (⟨Δ, D_y⟩ / ‖D_y‖²) D_y,   Δ_⊥ = Δ − Δ_∥;
        D̃ = D(x_t, y) + (w − 1) (Δ_⊥ + η Δ_∥).

    The parallel part is what oversaturates at large w; η = 0 drops it. Norms and inner products are per sample,
    over all but the batch dimension. η = 1, r = 0, β = 0 is ordinary classifier-free guidance; w = 1 is the
    conditional model whatever η, r and β (Diffusers' ``AdaptiveProjectedGuidance`` moves D_∅ by w·update
    instead, which differs from this when η ≠ 1 or with rescaling or momentum).

    Returns:
        ``(guided, running_average)``: D̃, and Δ̄ to pass as ``running_average`` at the next step (``None``
        without momentum).
    """
    difference = conditional_output - unconditional_output
    if momentum != 0:
        if running_average is not None:
            difference = difference + momentum * running_average
        running_average = difference
    else:
        running_average = None
    dims = list(range(1, difference.ndim))
    work, direction = difference.double(), conditional_output.double()
    if norm_threshold > 0:
        norm = torch.linalg.vector_norm(work, dim=dims, keepdim=True)
        work = work * torch.clamp(norm_threshold / norm, max=1.0)
    unit = torch.nn.functional.normalize(direction.flatten(1), dim=1).reshape(direction.shape)
    parallel = (work * unit).sum(dim=dims, keepdim=True) * unit
    update = (work - parallel) + eta * parallel
    guided = conditional_output + (guidance_scale - 1) * update.to(conditional_output.dtype)
    return guided, running_average


def cfg_zero_star_scale(unconditional_output: torch.Tensor, conditional_output: torch.Tensor) -> torch.Tensor:
    """CFG-Zero*'s optimized scale s* = ⟨v_y, v_∅⟩ / ‖v_∅‖², per sample ``[B, 1, …]`` (Fan et al. 2025, eq. 9): the
    multiple of the unconditional prediction closest to the conditional one."""
    dims = list(range(1, conditional_output.ndim))
    conditional, unconditional = conditional_output.double(), unconditional_output.double()
    scale = (conditional * unconditional).sum(dim=dims, keepdim=True) / (unconditional**2).sum(dim=dims, keepdim=True)
    return scale.to(conditional_output.dtype)


def cfg_zero_star_guidance(
    unconditional_output: torch.Tensor,
    conditional_output: torch.Tensor,
    guidance_scale: float,
    step_index: int = 0,
    zero_init_steps: int = 0,
):
    """CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved classifier-free guidance for flow matching models"):

        ṽ = s* v_∅ + w (v_y − s* v_∅),   s* = ``cfg_zero_star_scale``,

    and ṽ = 0 for the first ``zero_init_steps`` steps ("zero-init"). In the paper v is the flow's velocity, whose
    zero leaves the sample where it is; for an ε-prediction the same holds for DDIM's probability-flow step, which
    then keeps x_t / √ᾱ_t (and an ancestral step adds only its noise). At w = 1 the result is v_y without zero-init.
    """
    if step_index < zero_init_steps:
        return torch.zeros_like(conditional_output)
    scaled_unconditional = cfg_zero_star_scale(unconditional_output, conditional_output) * unconditional_output
    return classifier_free_guidance(scaled_unconditional, conditional_output, guidance_scale)
