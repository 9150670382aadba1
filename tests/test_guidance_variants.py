"""Guidance intervals, CFG++, adaptive projected guidance and CFG-Zero* (hvae_diffusion.guidance): each against a
hand computation, against Diffusers' own implementation where one exists, and on the exact Gaussian mixture, where
scale 1 must give the conditional score ∇log p(x_t | y) (so the reverse chain samples p(x | y))."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from hvae_diffusion.guidance import (
    adaptive_projected_guidance,
    cfg_plus_plus_scale,
    cfg_plus_plus_step,
    cfg_zero_star_guidance,
    cfg_zero_star_scale,
    check_guidance_interval,
    classifier_free_guidance,
    guidance_interval_from_sigmas,
    in_guidance_interval,
)
from hvae_diffusion.parameterization import convert_prediction
from hvae_diffusion.testing import GaussianMixture

MEANS = [[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
LABELS = [0, 0, 1]


@pytest.fixture
def mixture():
    return GaussianMixture(MEANS, 0.3, component_labels=LABELS)


@pytest.fixture
def points(generator):
    return torch.randn(16, 2, generator=generator, dtype=torch.float64) * 1.5


def exact_predictions(mixture, points, alpha, prediction_type, label=1):
    """(unconditional, conditional) predictions of the exact mixture model in ``prediction_type``."""
    as_type = lambda s: convert_prediction(s, points, alpha, "score", prediction_type)  # noqa: E731
    return as_type(mixture.score(points, alpha)), as_type(mixture.score(points, alpha, class_label=label))


# ---------------------------------------------------------------------------------------------- intervals


def test_interval_is_open_below_and_closed_above():
    """Kynkäänniemi et al. guide for σ ∈ (σ_lo, σ_hi]: t_lo is not guided, t_hi is."""
    interval = (200, 600)
    assert [in_guidance_interval(t, interval) for t in (0, 200, 201, 450, 600, 601, 999)] == [
        False,
        False,
        True,
        True,
        True,
        False,
        False,
    ]
    assert in_guidance_interval(torch.tensor(600.0), interval)
    assert all(in_guidance_interval(t, None) for t in (0, 500, 999))


@pytest.mark.parametrize(
    "interval", [(5,), (600, 200), (3, 3), ("a", 4), (0, float("nan")), (True, 5), "ab", 5, [1, 2, 3]]
)
def test_bad_interval(interval):
    with pytest.raises(ValueError, match="guidance_interval"):
        check_guidance_interval(interval)


@pytest.mark.parametrize("interval", [None, (0, 999), [-1, 10], (10.5, 700.0)])
def test_good_interval(interval):
    check_guidance_interval(interval)


def test_interval_from_sigmas_by_hand():
    """σ_t = √((1 − ᾱ_t) / ᾱ_t) for ᾱ = (0.9, 0.5, 0.2, 0.1): σ = (1/3, 1, 2, 3). (0.5, 2] holds t = 1, 2."""
    alphas_cumprod = [0.9, 0.5, 0.2, 0.1]
    assert guidance_interval_from_sigmas(0.5, 2.0, alphas_cumprod) == (0, 2)
    low, high = guidance_interval_from_sigmas(0.5, 2.0, alphas_cumprod)
    assert [in_guidance_interval(t, (low, high)) for t in range(4)] == [False, True, True, False]
    assert guidance_interval_from_sigmas(0.1, 10.0, alphas_cumprod) == (-1, 3)  # every step
    with pytest.raises(ValueError, match="sigma_low < sigma_high"):
        guidance_interval_from_sigmas(2.0, 1.0, alphas_cumprod)


# ---------------------------------------------------------------------------------------------- CFG++


def test_cfg_plus_plus_step_by_hand():
    """ᾱ_t = 0.5, ᾱ_t' = 0.8, x_t = 1, ε_∅ = 0.2, ε_y = 0.6, λ = 0.5: ε_λ = 0.4, x̂_0 = (1 − √0.5·0.4)/√0.5,
    x_t' = √0.8 x̂_0 + √0.2 · 0.2 (re-noised with ε_∅, not ε_λ)."""
    sample, unconditional, conditional = (torch.tensor([value], dtype=torch.float64) for value in (1.0, 0.2, 0.6))
    expected = math.sqrt(0.8) * (1 - math.sqrt(0.5) * 0.4) / math.sqrt(0.5) + math.sqrt(0.2) * 0.2
    result = cfg_plus_plus_step(sample, unconditional, conditional, 0.5, 0.5, 0.8)
    assert result.item() == pytest.approx(expected, rel=1e-12)
    # with η = 1: σ² = (1 − 0.8)/(1 − 0.5) · (1 − 0.5/0.8) = 0.15, direction √(0.2 − 0.15) ε_∅, plus σ z
    noise = torch.tensor([0.7], dtype=torch.float64)
    expected = (
        math.sqrt(0.8) * (1 - math.sqrt(0.5) * 0.4) / math.sqrt(0.5) + math.sqrt(0.05) * 0.2 + math.sqrt(0.15) * 0.7
    )
    result = cfg_plus_plus_step(sample, unconditional, conditional, 0.5, 0.5, 0.8, eta=1.0, noise=noise)
    assert result.item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="needs noise"):
        cfg_plus_plus_step(sample, unconditional, conditional, 0.5, 0.5, 0.8, eta=1.0)


def test_cfg_plus_plus_scale_by_hand():
    """a = √(0.8 · 0.5 / 0.5) = √0.8, b = √0.2: w = λ √0.8 / (√0.8 − √0.2) = 2λ; at ᾱ_t' = 1, w = λ."""
    assert cfg_plus_plus_scale(0.5, 0.5, 0.8) == pytest.approx(1.0, rel=1e-12)
    assert cfg_plus_plus_scale(0.3, 0.5, 1.0) == pytest.approx(0.3, rel=1e-12)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_cfg_plus_plus_equals_a_ddim_step_of_diffusers_with_the_equivalent_weight(generator, eta):
    """Diffusers' DDIMScheduler stepping ε_∅ + w_t (ε_y − ε_∅), w_t = ``cfg_plus_plus_scale``, lands where the
    CFG++ step does, with the same noise."""
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    scheduler.set_timesteps(50)
    timestep = int(scheduler.timesteps[20])
    prev_timestep = timestep - 1000 // 50
    alpha, prev_alpha = float(scheduler.alphas_cumprod[timestep]), float(scheduler.alphas_cumprod[prev_timestep])
    sample, unconditional, conditional = torch.randn(3, 4, 2, 2, generator=generator, dtype=torch.float64)
    noise = torch.randn(4, 2, 2, generator=generator, dtype=torch.float64)
    weight = cfg_plus_plus_scale(0.6, alpha, prev_alpha, eta)
    assert weight > 1  # CFG++'s λ = 0.6 is a strong CFG weight at 50 steps
    guided = classifier_free_guidance(unconditional, conditional, weight)
    ddim = scheduler.step(guided, timestep, sample, eta=eta, variance_noise=noise).prev_sample
    plus_plus = cfg_plus_plus_step(sample, unconditional, conditional, 0.6, alpha, prev_alpha, eta, noise)
    # DDIMScheduler keeps ᾱ in float32
    torch.testing.assert_close(ddim, plus_plus, rtol=1e-5, atol=1e-5)


def test_cfg_plus_plus_at_its_conditional_point_follows_p_x_given_y(mixture, points):
    """With λ_t = (a − b)/a (w_t = 1) the CFG++ step is the DDIM step of the exact conditional ε, the
    probability-flow step of p(x | y); λ = 0 is that of p(x)."""
    alpha, prev_alpha = 0.3, 0.45
    unconditional, conditional = exact_predictions(mixture, points, alpha, "epsilon")
    unit = cfg_plus_plus_scale(1.0, alpha, prev_alpha)  # w_t per unit λ
    result = cfg_plus_plus_step(points, unconditional, conditional, 1.0 / unit, alpha, prev_alpha)
    for noise, out in ((conditional, result), (unconditional, None)):
        original = (points - math.sqrt(1 - alpha) * noise) / math.sqrt(alpha)
        ddim = math.sqrt(prev_alpha) * original + math.sqrt(1 - prev_alpha) * noise
        if out is None:
            out = cfg_plus_plus_step(points, unconditional, conditional, 0.0, alpha, prev_alpha)
        torch.testing.assert_close(out, ddim)


# ---------------------------------------------------------------------------------------------- APG


def test_apg_by_hand():
    """D_y = (1, 0), D_∅ = (0, 1): Δ = (1, −1), Δ_∥ = (1, 0), Δ_⊥ = (0, −1). w = 3: η = 0 gives (1, 0) + 2 (0, −1);
    η = 0.5 gives (1, 0) + 2 (0.5, −1); with r = 1, Δ is first scaled by 1/√2."""
    conditional = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    unconditional = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    guided, running = adaptive_projected_guidance(unconditional, conditional, 3.0)
    torch.testing.assert_close(guided, torch.tensor([[1.0, -2.0]], dtype=torch.float64))
    assert running is None
    guided, _ = adaptive_projected_guidance(unconditional, conditional, 3.0, eta=0.5)
    torch.testing.assert_close(guided, torch.tensor([[2.0, -2.0]], dtype=torch.float64))
    guided, _ = adaptive_projected_guidance(unconditional, conditional, 3.0, eta=0.5, norm_threshold=1.0)
    root = 1 / math.sqrt(2)
    torch.testing.assert_close(guided, torch.tensor([[1.0 + root, -2 * root]], dtype=torch.float64))


def test_apg_momentum_by_hand():
    """β = −0.5: step 1 Δ̄ = Δ_1 = (1, −1); step 2 Δ = Δ_2 + β Δ̄ = (2, 0) − (0.5, −0.5) = (1.5, 0.5), then projected
    on D_y = (1, 0): Δ_⊥ = (0, 0.5)."""
    conditional = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    _, running = adaptive_projected_guidance(torch.tensor([[0.0, 1.0]]).double(), conditional, 2.0, momentum=-0.5)
    torch.testing.assert_close(running, torch.tensor([[1.0, -1.0]], dtype=torch.float64))
    guided, running = adaptive_projected_guidance(
        torch.tensor([[-1.0, 0.0]]).double(), conditional, 2.0, momentum=-0.5, running_average=running
    )
    torch.testing.assert_close(running, torch.tensor([[1.5, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(guided, torch.tensor([[1.0, 0.5]], dtype=torch.float64))


def test_apg_with_eta_one_is_classifier_free_guidance(generator):
    unconditional, conditional = torch.randn(2, 4, 3, 5, 5, generator=generator, dtype=torch.float64)
    guided, _ = adaptive_projected_guidance(unconditional, conditional, 4.0, eta=1.0)
    torch.testing.assert_close(guided, classifier_free_guidance(unconditional, conditional, 4.0))


@pytest.mark.parametrize("settings", [{}, {"eta": 0.3, "norm_threshold": 0.5}, {"momentum": -0.75}])
def test_apg_at_scale_one_is_the_exact_conditional_denoiser(mixture, points, settings):
    """w = 1 gives x̂_0(x_t, y) whatever η, r and β: the chain samples p(x | y)."""
    alpha = 0.4
    unconditional, conditional = exact_predictions(mixture, points, alpha, "sample")
    running = torch.randn_like(points) if "momentum" in settings else None
    guided, _ = adaptive_projected_guidance(unconditional, conditional, 1.0, running_average=running, **settings)
    torch.testing.assert_close(guided, conditional)


def test_apg_matches_diffusers_original_formulation(generator):
    """Diffusers' ``normalized_guidance`` with ``use_original_formulation=True`` moves D_y by s · update; the paper's
    D_y + (w − 1) update is that with s = w − 1 (the same momentum, rescaling and projection)."""
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    buffer = MomentumBuffer(-0.5)
    running = None
    for _ in range(3):
        unconditional, conditional = torch.randn(2, 2, 3, 4, 4, generator=generator, dtype=torch.float64)
        ours, running = adaptive_projected_guidance(
            unconditional, conditional, 5.0, eta=0.2, norm_threshold=2.0, momentum=-0.5, running_average=running
        )
        theirs = normalized_guidance(
            conditional, unconditional, 4.0, buffer, eta=0.2, norm_threshold=2.0, use_original_formulation=True
        )
        torch.testing.assert_close(ours, theirs)


# ---------------------------------------------------------------------------------------------- CFG-Zero*


def test_cfg_zero_star_by_hand():
    """v_∅ = (2, 0), v_y = (1, 1): s* = ⟨v_y, v_∅⟩ / ‖v_∅‖² = 2/4; s* v_∅ = (1, 0); w = 2: (1, 0) + 2 (0, 1)."""
    unconditional = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    conditional = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(cfg_zero_star_scale(unconditional, conditional), torch.tensor([[0.5]]).double())
    guided = cfg_zero_star_guidance(unconditional, conditional, 2.0)
    torch.testing.assert_close(guided, torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    zero = cfg_zero_star_guidance(unconditional, conditional, 2.0, step_index=1, zero_init_steps=2)
    torch.testing.assert_close(zero, torch.zeros_like(conditional))
    after = cfg_zero_star_guidance(unconditional, conditional, 2.0, step_index=2, zero_init_steps=2)
    torch.testing.assert_close(after, guided)


def test_cfg_zero_star_matches_diffusers_guider(generator):
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    guider = ClassifierFreeZeroStarGuidance(guidance_scale=3.0, zero_init_steps=1)
    unconditional, conditional = torch.randn(2, 3, 1, 4, 4, generator=generator)
    for step in (0, 1, 5):
        guider.set_state(step=step, num_inference_steps=10, timestep=torch.tensor(900 - 90 * step))
        theirs = guider(_guider_batches(guider, conditional, unconditional)).pred
        ours = cfg_zero_star_guidance(unconditional, conditional, 3.0, step_index=step, zero_init_steps=1)
        torch.testing.assert_close(ours, theirs)


def _guider_batches(guider, conditional, unconditional):
    """The guider's inputs as Diffusers' modular denoise step builds them: one state per condition, each with the
    prediction of its forward pass as ``noise_pred``."""
    batches = guider.prepare_inputs({"noise_pred": (conditional, unconditional)})
    for batch in batches:
        batch.noise_pred = conditional if batch.__dict__[guider._identifier_key] == "pred_cond" else unconditional
    return batches


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_cfg_zero_star_at_scale_one_is_the_exact_conditional_model(mixture, points, prediction_type):
    unconditional, conditional = exact_predictions(mixture, points, 0.4, prediction_type)
    torch.testing.assert_close(cfg_zero_star_guidance(unconditional, conditional, 1.0), conditional)
