"""Guidance intervals and the CFG variants in the pipelines: what each step computes and what it costs (denoiser
forwards, classifier passes), side by side with Diffusers' guiders run as Diffusers' modular denoise step runs them
and with CFG++ stepped by hand."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance, ClassifierFreeZeroStarGuidance
from diffusers.utils.torch_utils import randn_tensor
from test_pipelines import tiny_unet

from hvae_diffusion import ClassifierFreeGuidancePipeline, ClassifierGuidedPipeline, HVAEScheduler, NoisyClassifier
from hvae_diffusion.guidance import cfg_plus_plus_step

NUM_STEPS = 6
LABELS = [0, 1, 2, 1]


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(num_class_embeds=4)


class Counter:
    """Counts a module's forward passes and the samples they saw (a forward hook)."""

    def __init__(self, module):
        self.calls, self.samples = 0, 0
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        self.calls += 1
        self.samples += inputs[0].shape[0]


def cfg_images(unet, scheduler, seed=0, **kwargs):
    pipe = ClassifierFreeGuidancePipeline(unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        class_labels=LABELS,
        num_inference_steps=NUM_STEPS,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kwargs,
    ).images


def test_cfg_interval_runs_the_conditional_model_outside(unet):
    """Steps outside (t_lo, t_hi] make one forward of the conditional model; an interval holding no step gives w = 1's
    images, one holding every step those of guidance everywhere."""
    scheduler = HVAEScheduler(num_train_timesteps=100)
    everywhere = cfg_images(unet, scheduler, guidance_scale=3.0)
    torch.testing.assert_close(cfg_images(unet, scheduler, guidance_scale=3.0, guidance_interval=(-1, 99)), everywhere)
    conditional = cfg_images(unet, scheduler, guidance_scale=1.0)
    torch.testing.assert_close(
        cfg_images(unet, scheduler, guidance_scale=3.0, guidance_interval=(200, 300)), conditional
    )
    counter = Counter(unet)
    scheduler.set_timesteps(NUM_STEPS)
    timesteps = scheduler.timesteps.tolist()  # 99, 83, 66, 50, 33, 16 for 6 of 100
    interval = (timesteps[4], timesteps[1])  # guides timesteps[1:4]: three steps
    partial = cfg_images(unet, scheduler, guidance_scale=3.0, guidance_interval=interval)
    counter.handle.remove()
    assert counter.calls == NUM_STEPS and counter.samples == len(LABELS) * (NUM_STEPS + 3)
    assert (partial - everywhere).abs().max() > 1e-4 and (partial - conditional).abs().max() > 1e-4


def test_classifier_interval_takes_no_classifier_pass_outside(unet):
    torch.manual_seed(1)
    classifier = NoisyClassifier(
        sample_size=8, in_channels=1, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4
    ).eval()
    pipe = ClassifierGuidedPipeline(unet, HVAEScheduler(num_train_timesteps=100), classifier)
    pipe.set_progress_bar_config(disable=True)

    def images(**kwargs):
        generator = torch.Generator().manual_seed(0)
        return pipe(LABELS, num_inference_steps=NUM_STEPS, generator=generator, output_type="latent", **kwargs).images

    counter = Counter(classifier)
    partial = images(guidance_scale=4.0, guidance_interval=(40, 90))  # timesteps 83, 66, 50
    counter.handle.remove()
    assert counter.calls == 3
    torch.testing.assert_close(images(guidance_scale=4.0, guidance_interval=(200, 300)), images(guidance_scale=0.0))
    assert (partial - images(guidance_scale=4.0)).abs().max() > 1e-4


def modular_loop(unet, scheduler, guider, seed=0):
    """Diffusers' modular denoise step for a class-conditional UNet, written out: the guider splits (y, ∅) into
    batches, one forward each, ``guider(batches)[0]`` is stepped."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(NUM_STEPS)
    labels = torch.tensor(LABELS)
    latents = randn_tensor((len(LABELS), 1, 8, 8), generator=generator) * scheduler.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            guider.set_state(step=i, num_inference_steps=NUM_STEPS, timestep=t)
            batches = guider.prepare_inputs({"class_labels": (labels, torch.full_like(labels, 3))})
            for batch in batches:
                guider.prepare_models(unet)
                batch.noise_pred = unet(latents, t, class_labels=batch.class_labels).sample
                guider.cleanup_models(unet)
            noise_pred = guider(batches)[0]
            latents = scheduler.step(noise_pred, t, latents, generator=generator).prev_sample
    return latents


@pytest.mark.parametrize(
    "make_guider",
    [
        lambda: ClassifierFreeGuidance(guidance_scale=3.0, start=0.2, stop=0.8),
        lambda: AdaptiveProjectedGuidance(guidance_scale=3.0, adaptive_projected_guidance_momentum=-0.5),
        lambda: ClassifierFreeZeroStarGuidance(guidance_scale=3.0, zero_init_steps=1),
    ],
)
def test_a_diffusers_guider_gives_the_images_of_diffusers_modular_loop(unet, make_guider):
    scheduler = DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    expected = modular_loop(unet, DDPMScheduler.from_config(scheduler.config), make_guider())
    result = cfg_images(unet, scheduler, guider=make_guider())
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_cfg_zero_star_method_matches_diffusers_guider(unet):
    """On an ε-model the package's CFG-Zero* (on ε) and Diffusers' guider (on the model output) agree."""
    scheduler = HVAEScheduler(num_train_timesteps=100)
    ours = cfg_images(
        unet, scheduler, guidance_scale=3.0, guidance_method="cfg-zero*", guidance_kwargs={"zero_init_steps": 1}
    )
    theirs = cfg_images(unet, scheduler, guider=ClassifierFreeZeroStarGuidance(guidance_scale=3.0, zero_init_steps=1))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_apg_with_eta_one_is_cfg_in_the_pipeline(unet):
    scheduler = HVAEScheduler(num_train_timesteps=100, clip_sample=False)
    plain = cfg_images(unet, scheduler, guidance_scale=3.0)
    apg = cfg_images(unet, scheduler, guidance_scale=3.0, guidance_method="apg", guidance_kwargs={"eta": 1.0})
    torch.testing.assert_close(apg, plain, rtol=1e-5, atol=1e-5)
    projected = cfg_images(unet, scheduler, guidance_scale=3.0, guidance_method="apg")
    assert (projected - plain).abs().max() > 1e-4


def test_cfg_plus_plus_pipeline_is_the_papers_ddim_step(unet):
    """The pipeline runs CFG++ as the equivalent CFG weight through DDIMScheduler; stepping the paper's update by hand
    (x̂_0 from ε_λ, re-noised with ε_∅) gives the same images."""
    scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False, set_alpha_to_one=True)
    result = cfg_images(unet, scheduler, guidance_scale=0.6, guidance_method="cfg++")
    scheduler.set_timesteps(NUM_STEPS)
    timesteps = scheduler.timesteps.tolist()
    latents = randn_tensor((len(LABELS), 1, 8, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor(LABELS)
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            unconditional = unet(latents, t, class_labels=torch.full_like(labels, 3)).sample
            conditional = unet(latents, t, class_labels=labels).sample
            alpha = float(scheduler.alphas_cumprod[t])
            prev_alpha = float(scheduler.alphas_cumprod[timesteps[i + 1]]) if i + 1 < NUM_STEPS else 1.0
            latents = cfg_plus_plus_step(latents, unconditional, conditional, 0.6, alpha, prev_alpha)
    torch.testing.assert_close(result, latents, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"guidance_interval": (5, 1)}, ValueError, "guidance_interval"),
        ({"guidance_method": "pag"}, ValueError, "guidance_method must be one of"),
        ({"guidance_method": "apg", "guidance_kwargs": {"zero_init_steps": 1}}, ValueError, "not settings of"),
        ({"guidance_method": "cfg++", "guidance_scale": 2.0}, ValueError, r"λ in \[0, 1\]"),
        ({"guider": "cfg"}, TypeError, "BaseGuidance"),
        ({"guider": ClassifierFreeGuidance(), "guidance_interval": (0, 5)}, ValueError, "start/stop"),
    ],
)
def test_bad_guidance_arguments(unet, kwargs, error, match):
    with pytest.raises(error, match=match):
        cfg_images(unet, HVAEScheduler(num_train_timesteps=100), **kwargs)


def test_cfg_plus_plus_needs_a_ddim_form_scheduler(unet):
    from diffusers import EulerDiscreteScheduler

    with pytest.raises(ValueError, match="steps DDIM's form"):
        cfg_images(unet, EulerDiscreteScheduler(num_train_timesteps=100), guidance_scale=0.5, guidance_method="cfg++")


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--guidance", "cfg", "--guidance_interval", "5", "1"], "--guidance_interval"),
        (["--guidance", "none", "--guidance_interval", "1", "5"], "need --guidance classifier or cfg"),
        (["--guidance", "classifier", "--guidance_method", "apg"], "needs --guidance cfg"),
        (["--guidance", "cfg", "--guidance_method", "cfg++", "--guidance_scale", "2"], r"λ in \[0, 1\]"),
    ],
)
def test_sample_command_refuses_bad_guidance_flags(tmp_path, argv, match):
    from hvae_diffusion.commands import sample

    with pytest.raises(ValueError, match=match):
        sample.main(["--pipeline_dir", str(tmp_path), "--grid", str(tmp_path / "grid.png"), *argv])
