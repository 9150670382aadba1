"""One step of the pipelines against ground truth: Diffusers' own loops on the same components and seed, and the
guided-diffusion order of clipping and guidance computed by hand in float64."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from diffusers.callbacks import SDCFGCutoffCallback
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor
from test_pipelines import count_forwards, quiet, seeded, tiny_classifier, tiny_text_components, tiny_unet

from hvae_diffusion import ClassifierFreeGuidancePipeline, ClassifierGuidedPipeline, HVAEPipeline, HVAEScheduler
from hvae_diffusion.forward_process import posterior_mean, posterior_mean_coefficients, posterior_variance
from hvae_diffusion.guidance import rescale_guided_prediction
from hvae_diffusion.parameterization import convert_prediction
from hvae_diffusion.testing import ExactMixtureClassifier, ExactMixtureDenoiser

MEANS = [[-1.5, 0.0], [1.5, 0.5]]
STD = 0.3


def tiny_learned_variance_unet():
    return tiny_unet(out_channels=2, num_class_embeds=3)


def base_config(**kwargs):
    """The HVAE scheduler's config with ``kwargs`` (without the list of defaults, which from_config would reapply)."""
    config = {**HVAEScheduler(clip_sample=False).config, **kwargs}
    config.pop("_use_default_values", None)
    return config


def diffusers_loop(unet, scheduler, num_inference_steps, shape, seed, **step_kwargs):
    """Diffusers' own sampling loop (as in StableDiffusionPipeline): timesteps, then x_T, then step."""
    generator = seeded(seed)
    scheduler.set_timesteps(num_inference_steps)
    latents = randn_tensor(shape, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        with torch.no_grad():
            noise_pred = unet(model_input, t).sample
        latents = scheduler.step(noise_pred, t, latents, generator=generator, **step_kwargs).prev_sample
    return latents


SCHEDULERS = [
    (DDIMScheduler, {}),
    (EulerDiscreteScheduler, {}),
    (EulerAncestralDiscreteScheduler, {}),
    (DPMSolverMultistepScheduler, {}),
    (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
]


@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("scheduler_class, extra", SCHEDULERS)
def test_two_calls_match_diffusers_loop(scheduler_class, extra, spacing, clip_sample):
    """Timesteps are set before x_T is scaled by init_noise_sigma, on the scheduler that steps, at every call.

    With the HVAE config's default clip_sample=True, DDIM clips as Diffusers' does (the model's ε, unless
    use_clipped_model_output) and schedulers without a clip_sample option (Euler, DPM-Solver) ignore the key their
    config inherited, as in Diffusers."""
    unet = tiny_unet()
    config = base_config(timestep_spacing=spacing, clip_sample=clip_sample, **extra)
    step_kwargs = {}
    pipeline = quiet(HVAEPipeline(unet, scheduler_class.from_config(config)))
    for num_inference_steps, seed in ((10, 0), (3, 1)):
        samples = pipeline(
            batch_size=2, num_inference_steps=num_inference_steps, generator=seeded(seed), output_type="latent"
        ).images
        reference_scheduler = scheduler_class.from_config(config)
        expected = diffusers_loop(unet, reference_scheduler, num_inference_steps, (2, 1, 8, 8), seed, **step_kwargs)
        torch.testing.assert_close(samples, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pipeline.scheduler.timesteps, reference_scheduler.timesteps)
        assert pipeline.num_timesteps == len(reference_scheduler.timesteps)


@pytest.mark.parametrize("num_inference_steps", [5, 20])
def test_karras_sigmas_on_a_capped_cosine_schedule_step_through_repeated_timesteps(num_inference_steps):
    """Karras σ on the demo's schedule (cosine, leading) map several σ to timestep 998. The pipeline tells the
    scheduler the chain starts at its first step (set_begin_index(0)); looking the first timestep up by value would
    land on its second occurrence and step past the end of the σ table."""
    unet = tiny_unet()
    config = base_config(beta_schedule="squaredcos_cap_v2", timestep_spacing="leading", use_karras_sigmas=True)
    scheduler = DPMSolverMultistepScheduler.from_config(config)
    scheduler.set_timesteps(num_inference_steps)
    assert len(set(scheduler.timesteps.tolist())) < len(scheduler.timesteps)  # the case: a repeated timestep
    pipeline = quiet(HVAEPipeline(unet, scheduler))
    samples = pipeline(
        batch_size=2, num_inference_steps=num_inference_steps, generator=seeded(0), output_type="latent"
    ).images
    reference = DPMSolverMultistepScheduler.from_config(config)
    generator = seeded(0)
    reference.set_timesteps(num_inference_steps)
    reference.set_begin_index(0)
    expected = randn_tensor((2, 1, 8, 8), generator=generator) * reference.init_noise_sigma
    for t in reference.timesteps:
        with torch.no_grad():
            noise_pred = unet(reference.scale_model_input(expected, t), t).sample
        expected = reference.step(noise_pred, t, expected, generator=generator).prev_sample
    torch.testing.assert_close(samples, expected, atol=1e-5, rtol=1e-5)


def test_euler_leading_starts_at_the_sigma_of_its_own_timesteps():
    """The measured case: 10 leading steps start at σ = 60.8 (not 157), then 3 steps at σ = 9.5 (not 60.8)."""
    scheduler = EulerDiscreteScheduler.from_config(base_config(timestep_spacing="leading"))
    pipeline = quiet(HVAEPipeline(tiny_unet(), scheduler))
    starts = []
    original = pipeline.prepare_latents
    pipeline.prepare_latents = lambda *args: starts.append(pipeline.scheduler.init_noise_sigma) or original(*args)
    for num_inference_steps in (10, 3):
        pipeline(batch_size=1, num_inference_steps=num_inference_steps, output_type="latent")
    assert [round(float(sigma), 1) for sigma in starts] == [60.8, 9.5]


# ---------------------------------------------------------------------------------------------- clipping and guidance


def exact_models(scheduler):
    alphas_cumprod = scheduler.alphas_cumprod.tolist()
    unet = ExactMixtureDenoiser(MEANS, STD, alphas_cumprod=alphas_cumprod, in_channels=2).double()
    classifier = ExactMixtureClassifier(MEANS, STD, alphas_cumprod=alphas_cumprod).double()
    return unet, classifier


def hand_guided_epsilon(unet, classifier, sample, timestep, alphas_cumprod_t, label, scale):
    """guided-diffusion's order: x̂_0 clipped, ε recomputed from it, then ε −= √(1 − ᾱ) γ ∇log p(y | x_t)."""
    sqrt_alpha, sqrt_one_minus_alpha = alphas_cumprod_t**0.5, (1 - alphas_cumprod_t) ** 0.5
    epsilon = unet(sample, timestep).sample
    original_sample = ((sample - sqrt_one_minus_alpha * epsilon) / sqrt_alpha).clamp(-1, 1)
    epsilon = (sample - sqrt_alpha * original_sample) / sqrt_one_minus_alpha
    with torch.enable_grad():
        x = sample.detach().requires_grad_(True)
        log_prob = torch.log_softmax(classifier(x, timestep), dim=-1)[:, label].sum()
        (gradient,) = torch.autograd.grad(log_prob, x)
    return epsilon - sqrt_one_minus_alpha * scale * gradient, original_sample


def first_step(pipeline, latents, num_inference_steps=10, **kwargs):
    """x_{t'} after the first step of the chain."""
    seen = {}

    def stop(pipe, step_index, timestep, callback_kwargs):
        seen.setdefault("latents", callback_kwargs["latents"])
        pipe._interrupt = True
        return {}

    pipeline(
        class_labels=[1] * len(latents),
        num_inference_steps=num_inference_steps,
        latents=latents,
        output_type="latent",
        callback_on_step_end=stop,
        generator=seeded(5),
        **kwargs,
    )
    return seen["latents"]


@pytest.mark.parametrize("scheduler_class", [HVAEScheduler, DDIMScheduler])
def test_guidance_after_clipping_is_guided_diffusions_order(scheduler_class):
    """Clipped elements get the guidance too, in the classifier's direction (today's main: none with the HVAE
    scheduler, reversed with DDIM)."""
    # 10 training steps: little noise at the first step, so that x̂_0 ≈ x_t and most of it is clipped
    scheduler = scheduler_class.from_config(base_config(clip_sample=True, num_train_timesteps=10))
    unet, classifier = exact_models(scheduler)
    latents = 2.5 * torch.randn(64, 2, generator=seeded(1), dtype=torch.float64)
    pipeline = quiet(ClassifierGuidedPipeline(unet, scheduler, classifier))
    guided = first_step(pipeline, latents, guidance_scale=3.0)

    t = scheduler.timesteps[0]
    alphas_cumprod_t = float(scheduler.alphas_cumprod[t])
    epsilon, clipped = hand_guided_epsilon(unet, classifier, latents, t, alphas_cumprod_t, 1, 3.0)
    assert bool((clipped.abs() == 1).any())  # the case at stake: some x̂_0 are clipped
    sqrt_alpha, sqrt_one_minus_alpha = alphas_cumprod_t**0.5, (1 - alphas_cumprod_t) ** 0.5
    # today's main guided the unclipped ε and let the scheduler clip the guided x̂_0
    clipped_epsilon, _ = hand_guided_epsilon(unet, classifier, latents, t, alphas_cumprod_t, 1, 0.0)
    unclipped_guided = unet(latents, t).sample + (epsilon - clipped_epsilon)
    if scheduler_class is DDIMScheduler:
        prev_alphas_cumprod = float(scheduler.alphas_cumprod[scheduler.timesteps[1]])

        def ddim(epsilon, clip):
            original_sample = (latents - sqrt_one_minus_alpha * epsilon) / sqrt_alpha
            original_sample = original_sample.clamp(-1, 1) if clip else original_sample
            return prev_alphas_cumprod**0.5 * original_sample + (1 - prev_alphas_cumprod) ** 0.5 * epsilon

        expected, old_order = ddim(epsilon, clip=False), ddim(unclipped_guided, clip=True)
    else:

        def hvae(epsilon, clip):
            reference = HVAEScheduler.from_config(base_config(clip_sample=clip, num_train_timesteps=10))
            reference.set_timesteps(10)
            return reference.step(epsilon, t, latents, generator=seeded(5)).prev_sample

        expected, old_order = hvae(epsilon, clip=False), hvae(unclipped_guided, clip=True)
    torch.testing.assert_close(guided, expected, atol=2e-6, rtol=0)
    assert (guided - old_order).abs().max() > 1e-2
    assert scheduler.config.clip_sample  # never written


@pytest.mark.parametrize("use_clipped_model_output", [None, True])
def test_unguided_ddim_with_clipping_takes_use_clipped_model_output(use_clipped_model_output):
    """``use_clipped_model_output=True`` steps with the ε of the clipped x̂_0 (DDIM as published, guided-diffusion's
    sampler); Diffusers' default keeps the model's ε. The two differ where x̂_0 is clipped."""
    config = base_config(clip_sample=True, clip_sample_range=0.5)
    unet = tiny_unet()
    pipeline = quiet(HVAEPipeline(unet, DDIMScheduler.from_config(config)))
    samples = {}
    for clipped in (use_clipped_model_output, not use_clipped_model_output):
        samples[clipped] = pipeline(
            batch_size=2,
            num_inference_steps=5,
            generator=seeded(),
            output_type="latent",
            use_clipped_model_output=clipped,
        ).images
    reference = DDIMScheduler.from_config(config)
    reference.set_timesteps(5)
    latents = randn_tensor((2, 1, 8, 8), generator=seeded())
    for t in reference.timesteps:
        with torch.no_grad():
            noise_pred = unet(latents, t).sample
        latents = reference.step(noise_pred, t, latents, use_clipped_model_output=use_clipped_model_output).prev_sample
    torch.testing.assert_close(samples[use_clipped_model_output], latents, atol=1e-5, rtol=1e-5)
    assert (samples[use_clipped_model_output] - samples[not use_clipped_model_output]).abs().max() > 1e-3


def test_mean_form_moves_the_mean_by_scale_variance_gradient():
    """guidance_form="mean" is guided-diffusion's condition_mean: μ + γ Σ ∇log p(y | x_t), Σ the posterior variance."""
    scheduler = HVAEScheduler.from_config(base_config(clip_sample=False))
    unet, classifier = exact_models(scheduler)
    latents = torch.randn(16, 2, generator=seeded(2), dtype=torch.float64)
    pipeline = quiet(ClassifierGuidedPipeline(unet, scheduler, classifier))
    guided = first_step(pipeline, latents, guidance_scale=2.0, guidance_form="mean")

    t, t_prev = scheduler.timesteps[0], scheduler.timesteps[1]
    alphas_cumprod_t = torch.tensor(float(scheduler.alphas_cumprod[t]), dtype=torch.float64)
    prev_alphas_cumprod = torch.tensor(float(scheduler.alphas_cumprod[t_prev]), dtype=torch.float64)
    epsilon, _ = hand_guided_epsilon(unet, classifier, latents, t, float(alphas_cumprod_t), 1, 0.0)
    original_sample = (latents - (1 - alphas_cumprod_t).sqrt() * epsilon) / alphas_cumprod_t.sqrt()
    with torch.enable_grad():
        x = latents.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(torch.log_softmax(classifier(x, t), -1)[:, 1].sum(), x)
    variance = posterior_variance(alphas_cumprod_t, prev_alphas_cumprod)
    original_coefficient, _ = posterior_mean_coefficients(alphas_cumprod_t, prev_alphas_cumprod)
    guided_original_sample = original_sample + 2.0 * variance / original_coefficient * gradient
    torch.testing.assert_close(
        posterior_mean(guided_original_sample, latents, alphas_cumprod_t, prev_alphas_cumprod),
        posterior_mean(original_sample, latents, alphas_cumprod_t, prev_alphas_cumprod) + 2.0 * variance * gradient,
    )
    reference = HVAEScheduler.from_config(base_config(clip_sample=False, prediction_type="sample"))
    reference.set_timesteps(10)
    expected = reference.step(guided_original_sample, t, latents, generator=seeded(5)).prev_sample
    torch.testing.assert_close(guided, expected, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("num_train_timesteps, num_inference_steps", [(1000, 1000), (1000, 10)])
def test_score_and_mean_forms_differ_by_beta_over_sqrt_alpha_variance(num_train_timesteps, num_inference_steps):
    """The change of ε of the score form over that of the mean form is β_t / (√α_t Σ_t) at every step."""
    scheduler = HVAEScheduler.from_config(base_config(num_train_timesteps=num_train_timesteps))
    unet, classifier = exact_models(scheduler)
    latents = torch.randn(8, 2, generator=seeded(3), dtype=torch.float64)
    shifts = {}
    for form in ("score", "mean"):
        pipeline = quiet(ClassifierGuidedPipeline(unet, scheduler, classifier))
        captured = []
        original = pipeline.guide

        def guide(*args, original=original, captured=captured):
            captured.append(original(*args))
            return captured[-1]

        pipeline.guide = guide
        first_step(pipeline, latents, num_inference_steps, guidance_scale=1.0, guidance_form=form)
        prediction, prediction_type = captured[0]
        t = scheduler.timesteps[0]
        alphas_cumprod_t = float(scheduler.alphas_cumprod[t])
        epsilon = convert_prediction(prediction, latents, alphas_cumprod_t, prediction_type, "epsilon")
        shifts[form] = epsilon - unet(latents, t).sample
    prev_alphas_cumprod = torch.tensor(float(scheduler.alphas_cumprod[scheduler.timesteps[1]]), dtype=torch.float64)
    alphas_cumprod_t = torch.tensor(alphas_cumprod_t, dtype=torch.float64)
    alpha = alphas_cumprod_t / prev_alphas_cumprod
    factor = (1 - alpha) / (alpha.sqrt() * posterior_variance(alphas_cumprod_t, prev_alphas_cumprod))
    torch.testing.assert_close(shifts["score"], factor * shifts["mean"], atol=1e-9, rtol=1e-7)
    assert float(factor) == pytest.approx({1000: 1.0, 10: 2.4}[num_inference_steps], abs=0.05)


def test_clean_image_classifier_sees_the_clipped_estimate():
    """In "denoised" mode the classifier sees the clipped x̂_0, so elements clipped at x̂_0 pass it no gradient: with
    every element clipped the guidance vanishes, without clipping it does not."""
    gradients = {}
    for clip in (True, False):
        scheduler = HVAEScheduler.from_config(base_config(clip_sample=clip, num_train_timesteps=10))
        unet, _ = exact_models(scheduler)
        pipeline = ClassifierGuidedPipeline(unet, scheduler, tiny_clean_classifier(), classifier_input="denoised")
        pipeline._prediction_types = ("epsilon", "epsilon")
        pipeline._guidance_scale = 1.0
        latents = torch.full((4, 2), 5.0, dtype=torch.float64)  # x̂_0 ≈ 5 everywhere: all of it clipped
        t = torch.tensor(9)
        gradient, original_sample, _ = pipeline.denoised_gradient(
            latents, t, float(scheduler.alphas_cumprod[9]), torch.ones(4, dtype=torch.long), {}
        )
        assert bool((original_sample.abs() <= 1).all()) == clip
        gradients[clip] = gradient
    assert bool((gradients[True] == 0).all())
    assert bool((gradients[False] != 0).any())


def tiny_clean_classifier():
    torch.manual_seed(0)
    classifier = torch.nn.Linear(2, 2).double()
    classifier.num_classes = 2
    return classifier


def test_classifier_free_guidance_moves_only_the_mean_channels():
    """With a learned variance (2C outputs) the scheduler gets the conditional model's variance channels, as in
    Diffusers' DiTPipeline, and the guided mean channels."""
    unet = tiny_learned_variance_unet()
    scheduler = HVAEScheduler(num_train_timesteps=20, variance_type="learned_range", clip_sample=False)
    pipeline = quiet(ClassifierFreeGuidancePipeline(unet, scheduler))
    latents = torch.randn(2, 1, 8, 8, generator=seeded())
    seen = []
    step = scheduler.step
    scheduler.step = lambda model_output, *args, **kwargs: (
        seen.append(model_output) or step(model_output, *args, **kwargs)
    )
    pipeline(class_labels=[0, 1], guidance_scale=4.0, num_inference_steps=2, latents=latents, output_type="latent")
    scheduler.step = step
    t = scheduler.timesteps[0]
    with torch.no_grad():
        unconditional = unet(latents, t, class_labels=torch.tensor([2, 2])).sample
        conditional = unet(latents, t, class_labels=torch.tensor([0, 1])).sample
    expected_mean = unconditional[:, :1] + 4.0 * (conditional[:, :1] - unconditional[:, :1])
    torch.testing.assert_close(seen[0][:, :1], expected_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen[0][:, 1:], conditional[:, 1:])


def test_guidance_rescale_is_diffusers_rescale_noise_cfg():
    guided, conditional = torch.randn(2, 3, 4, 4, generator=seeded()), torch.randn(2, 3, 4, 4, generator=seeded(1))
    for rescale in (0.0, 0.7, 1.0):
        expected = rescale_noise_cfg(guided, conditional, guidance_rescale=rescale)
        torch.testing.assert_close(rescale_guided_prediction(guided, conditional, rescale), expected)


def test_classifier_guidance_calls_a_class_conditional_unet_with_its_null_label():
    """ε(x_t, ∅) of a class-conditional unet: ClassifierGuidedPipeline at γ = 0 is CFG at w = 0."""
    unet = tiny_unet(num_class_embeds=4)
    scheduler = HVAEScheduler(num_train_timesteps=20)
    kwargs = dict(class_labels=[0, 2], num_inference_steps=3, output_type="latent")
    guided = quiet(ClassifierGuidedPipeline(unet, scheduler, tiny_classifier(3)))
    free = quiet(ClassifierFreeGuidancePipeline(unet, scheduler))
    by_classifier = guided(guidance_scale=0.0, generator=seeded(), **kwargs).images
    by_free = free(guidance_scale=0.0, generator=seeded(), **kwargs).images
    torch.testing.assert_close(by_classifier, by_free)
    calls = count_forwards(unet)
    guided(guidance_scale=0.0, **kwargs)
    assert len(calls) == 3


# ---------------------------------------------------------------------------------------------- Diffusers conventions


def test_cfg_cutoff_callback_turns_guidance_off(tmp_path):
    """Diffusers' SDCFGCutoffCallback: guided steps up to the cutoff, conditional-only steps after it."""
    unet, text_encoder, tokenizer = tiny_text_components(tmp_path)
    pipeline = quiet(
        ClassifierFreeGuidancePipeline(unet, HVAEScheduler(num_train_timesteps=20), text_encoder, tokenizer)
    )
    calls = count_forwards(unet)
    kwargs = dict(
        prompt="a cat", guidance_scale=3.0, num_inference_steps=4, output_type="latent", guidance_batching="batched"
    )
    cut = pipeline(callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5), generator=seeded(), **kwargs)
    assert calls == [2, 2, 2, 1]  # cut off after step int(0.5 * num_timesteps) = 2
    assert pipeline.guidance_scale == 0.0
    calls.clear()
    uncut = pipeline(generator=seeded(), **kwargs).images
    assert calls == [2] * 4
    assert not torch.allclose(cut.images, uncut)
    last = pipeline(
        callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=3),
        generator=seeded(),
        **kwargs,
    )
    torch.testing.assert_close(last.images, uncut)


def test_callback_gets_the_steps_original_sample():
    scheduler = HVAEScheduler(num_train_timesteps=20, clip_sample=False)
    pipeline = quiet(HVAEPipeline(tiny_unet(), scheduler))
    seen, stepped = [], []
    step = scheduler.step
    scheduler.step = lambda *args, **kwargs: stepped.append(step(*args, **kwargs)) or stepped[-1]

    def callback(pipe, step_index, timestep, callback_kwargs):
        seen.append(callback_kwargs["pred_original_sample"])
        return callback_kwargs

    pipeline(
        batch_size=2,
        num_inference_steps=3,
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
    )
    scheduler.step = step
    assert len(seen) == 3
    for original_sample, output in zip(seen, stepped):
        torch.testing.assert_close(original_sample, output[1], atol=1e-5, rtol=1e-5)


def test_callback_gets_the_original_sample_of_a_scheduler_that_returns_none():
    """DPM-Solver's step returns no x̂_0: the callback gets Tweedie's x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t of the
    model's ε, with ᾱ_t = 1 / (1 + σ_t²) of the step."""
    unet = tiny_unet()
    scheduler = DPMSolverMultistepScheduler.from_config(base_config())
    pipeline = quiet(HVAEPipeline(unet, scheduler))
    seen, inputs, outputs = [], [], []
    unet.register_forward_hook(lambda module, args, output: inputs.append(args[0]) or outputs.append(output.sample))

    def callback(pipe, step_index, timestep, callback_kwargs):
        seen.append(callback_kwargs["pred_original_sample"])
        return callback_kwargs

    pipeline(
        batch_size=2,
        num_inference_steps=3,
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["pred_original_sample"],
    )
    assert len(seen) == len(inputs) == 3
    for original_sample, sample, epsilon, sigma in zip(seen, inputs, outputs, scheduler.sigmas):
        alphas_cumprod_t = 1 / (1 + float(sigma) ** 2)
        expected = (sample - (1 - alphas_cumprod_t) ** 0.5 * epsilon) / alphas_cumprod_t**0.5
        torch.testing.assert_close(original_sample, expected, atol=1e-5, rtol=1e-5)


def test_interrupt_skips_the_remaining_steps():
    unet = tiny_unet()
    pipeline = quiet(HVAEPipeline(unet, HVAEScheduler(num_train_timesteps=20)))
    calls = count_forwards(unet)

    def stop_after_two(pipe, step_index, timestep, callback_kwargs):
        pipe._interrupt = step_index == 1
        return {}

    pipeline(batch_size=1, num_inference_steps=5, output_type="latent", callback_on_step_end=stop_after_two)
    assert len(calls) == 2
    assert pipeline.num_timesteps == 5


def test_progress_counts_inference_steps_for_second_order_schedulers():
    """Heun takes two timesteps per step: the bar counts num_inference_steps, as Diffusers' pipelines do."""
    scheduler = HeunDiscreteScheduler.from_config(base_config())
    pipeline = HVAEPipeline(tiny_unet(), scheduler)
    bars = []

    class Bar:
        def __init__(self, total):
            self.total, self.n = total, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

        def update(self):
            self.n += 1

    pipeline.progress_bar = lambda total: Bar(total)
    pipeline(batch_size=1, num_inference_steps=4, output_type="latent")
    assert pipeline.num_timesteps == 7
    assert (bars[0].total, bars[0].n) == (4, 4)


# ---------------------------------------------------------------------------------------------- input errors


def pipelines_for_errors():
    scheduler = HVAEScheduler(num_train_timesteps=20)
    return {
        "hvae": (quiet(HVAEPipeline(tiny_unet(), scheduler)), {"batch_size": 2}),
        "classifier": (
            quiet(ClassifierGuidedPipeline(tiny_unet(), scheduler, tiny_classifier(3))),
            {"class_labels": [0, 1]},
        ),
        "free": (
            quiet(ClassifierFreeGuidancePipeline(tiny_unet(num_class_embeds=4), scheduler)),
            {"class_labels": [0, 1]},
        ),
    }


@pytest.mark.parametrize("name", ["hvae", "classifier", "free"])
def test_bad_generator_callback_and_labels_say_what_is_allowed(name):
    pipeline, kwargs = pipelines_for_errors()[name]
    kwargs = dict(num_inference_steps=2, output_type="latent", **kwargs)
    with pytest.raises(ValueError, match="generator must be None, a torch.Generator.*manual_seed"):
        pipeline(generator=42, **kwargs)
    with pytest.raises(TypeError, match="callback_on_step_end must return a dict"):
        pipeline(callback_on_step_end=lambda pipe, i, t, callback_kwargs: None, **kwargs)
    if name != "hvae":
        for labels in ("cat", ["cat"], None, [0.5], [True]):
            match = "class_labels must be an int" if labels is not None or name == "classifier" else "pass exactly one"
            with pytest.raises(ValueError, match=match):
                pipeline(**{**kwargs, "class_labels": labels})


@pytest.mark.parametrize("mode", ["auto", "batched", "separate"])
def test_guidance_batching_modes_give_the_same_samples(mode):
    unet = tiny_unet(num_class_embeds=4)
    pipeline = quiet(ClassifierFreeGuidancePipeline(unet, HVAEScheduler(num_train_timesteps=20)))
    kwargs = dict(class_labels=[0, 2], guidance_scale=3.0, num_inference_steps=3, output_type="latent")
    expected = quiet(ClassifierFreeGuidancePipeline(unet, HVAEScheduler(num_train_timesteps=20)))(
        generator=seeded(), guidance_batching="separate", **kwargs
    ).images
    samples = pipeline(generator=seeded(), guidance_batching=mode, **kwargs).images
    torch.testing.assert_close(samples, expected, atol=1e-5, rtol=1e-5)
    choices = pipeline.guidance_batching_choices
    if mode == "auto":
        # the timed choice lives on the pipeline, for its denoiser, and is forgotten when the denoiser is replaced
        assert list(choices.values()) in (["batched"], ["separate"])
        (key,) = choices
        assert key == ("cpu", torch.float32, (2, 1, 8, 8), (4,))
        pipeline.unet = tiny_unet(num_class_embeds=4)
        assert pipeline.guidance_batching_choices == {}
    else:
        assert not choices


@pytest.mark.parametrize("pipeline_class", [HVAEPipeline, ClassifierGuidedPipeline, ClassifierFreeGuidancePipeline])
def test_call_docstring_examples_run(pipeline_class):
    lines = [line.strip() for line in pipeline_class.__call__.__doc__.splitlines()]
    code = "\n".join(line[4:] for line in lines if line.startswith((">>> ", "... ")))
    assert "pipe(" in code
    namespace = {}
    exec(code, namespace)
    assert len(namespace["images" if "images" in namespace else "samples"]) == 2
