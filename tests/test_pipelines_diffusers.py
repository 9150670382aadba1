"""Side by side with Diffusers' own pipelines, from the same tiny components and seed, with each one's own defaults:
HVAEPipeline reproduces ``DDPMPipeline`` and ``DDIMPipeline`` (clipping on and off), and ClassifierFreeGuidancePipeline
reproduces ``DiTPipeline`` (a class-conditional DiT ``transformer`` with learned σ) and ``StableDiffusionPipeline`` (a
text-conditional ``UNet2DConditionModel`` with a CLIP text encoder) and loads the folders those pipelines save."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from test_pipelines import quiet, seeded, tiny_clip, tiny_conditional_unet

from hvae_diffusion import ClassifierFreeGuidancePipeline, HVAEPipeline, HVAEScheduler
from hvae_diffusion.pipelines.sampling import null_class_label, num_class_labels

TOLERANCE = dict(atol=1e-4, rtol=0)
SCHEDULERS = {
    "ddim": lambda config: DDIMScheduler.from_config(config),
    "dpmsolver++": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
    "euler": lambda config: EulerDiscreteScheduler.from_config(config),
}
# Stable Diffusion's schedule; clip_sample=False as Stable Diffusion and DiT ship DDIM
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
)


# ---------------------------------------------------------------------------------------------- DDPM and DDIM


def pixels(images):
    return np.stack([np.asarray(image) for image in images])


def one_block_unet():
    """A one-level UNet2DModel on 4×4 images: DDPMPipeline's default is 1000 steps."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=4,
        in_channels=1,
        out_channels=1,
        block_out_channels=(4,),
        layers_per_block=1,
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        norm_num_groups=2,
        add_attention=False,
    ).eval()


@pytest.mark.parametrize("clip_sample", [True, False])
def test_reproduces_ddpm_pipeline_with_its_defaults(clip_sample):
    """HVAEPipeline's defaults are DDPMPipeline's (1000 steps, PIL images): with Diffusers' DDPMScheduler and its
    defaults (clip_sample=True) the same pixels; with clipping off the same too (50 steps, to keep the test short)."""
    unet = one_block_unet()
    scheduler = DDPMScheduler(clip_sample=clip_sample)
    kwargs = {} if clip_sample else {"num_inference_steps": 50}
    expected = quiet(DDPMPipeline(unet, scheduler))(generator=seeded(), **kwargs).images
    images = quiet(HVAEPipeline(unet, DDPMScheduler.from_config(scheduler.config)))(generator=seeded(), **kwargs)
    np.testing.assert_array_equal(pixels(images.images), pixels(expected))


@pytest.mark.parametrize("use_clipped_model_output", [None, True])
@pytest.mark.parametrize("clip_sample", [True, False])
def test_reproduces_ddim_pipeline_with_its_defaults(clip_sample, use_clipped_model_output):
    """With DDIMPipeline's defaults (η = 0, use_clipped_model_output=None, DDIMScheduler's clip_sample=True) and its
    50 steps (HVAEPipeline's own default is DDPMPipeline's 1000), the same pixels; use_clipped_model_output=True too."""
    unet = one_block_unet()
    scheduler = DDIMScheduler(clip_sample=clip_sample)
    kwargs = {} if use_clipped_model_output is None else {"use_clipped_model_output": use_clipped_model_output}
    expected = quiet(DDIMPipeline(unet, scheduler))(batch_size=2, generator=seeded(), **kwargs).images
    ours = quiet(HVAEPipeline(unet, DDIMScheduler.from_config(scheduler.config)))
    images = ours(batch_size=2, num_inference_steps=50, generator=seeded(), **kwargs).images
    np.testing.assert_array_equal(pixels(images), pixels(expected))
    if clip_sample and use_clipped_model_output:  # the case at stake: the two DDIMs differ where x̂_0 is clipped
        default = ours(batch_size=2, num_inference_steps=50, generator=seeded(), output_type="np").images
        published = ours(batch_size=2, num_inference_steps=50, generator=seeded(), output_type="np", **kwargs).images
        assert np.abs(default - published).max() > 1e-3
    assert ours.scheduler.config.clip_sample == clip_sample


# ---------------------------------------------------------------------------------------------- DiT and Stable Diffusion


def tiny_vae(block_out_channels=(8, 8)):
    """An AutoencoderKL with 4 latent channels and downsampling factor 2."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=block_out_channels,
        latent_channels=4,
        norm_num_groups=4,
    ).eval()


def tiny_dit():
    """A DiT with learned σ (8 = 2 × 4 output channels). DiTPipeline's null label is hard-coded 1000, so 1000 classes."""
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()
    # Diffusers leaves some of DiT's output layers at zero-like scales; random weights make every channel matter
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.normal_(0, 0.3)
    return transformer


def tiny_sd_unet():
    torch.manual_seed(0)
    return tiny_conditional_unet(4)


def dit_pair(scheduler_name):
    transformer, vae = tiny_dit(), tiny_vae()
    scheduler = SCHEDULERS[scheduler_name](DDIMScheduler(**SCHEDULE).config)
    reference = quiet(DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler))
    ours = quiet(ClassifierFreeGuidancePipeline(None, scheduler, vae=vae, transformer=transformer))
    return reference, ours


def sd_pair(directory, scheduler_name):
    text_encoder, tokenizer = tiny_clip(directory)
    unet, vae = tiny_sd_unet(), tiny_vae()
    scheduler = SCHEDULERS[scheduler_name](DDIMScheduler(**SCHEDULE).config)
    reference = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ours = ClassifierFreeGuidancePipeline(unet, scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)
    return quiet(reference), quiet(ours)


def decoder_inputs(vae):
    """A list that gets the latents of every decode, as given to ``vae.decode`` (z / scaling_factor)."""
    calls = []
    vae.post_quant_conv.register_forward_pre_hook(lambda module, args: calls.append(args[0].clone()))
    return calls


# ---------------------------------------------------------------------------------------------- DiT


@pytest.mark.parametrize("scheduler_name", ["ddim", "dpmsolver++"])
def test_reproduces_dit_pipeline(scheduler_name):
    reference, ours = dit_pair(scheduler_name)
    kwargs = dict(class_labels=[3, 999], guidance_scale=4.0, num_inference_steps=4, output_type="np")
    decoded = decoder_inputs(reference.vae)
    expected = reference(generator=seeded(), **kwargs).images
    images = ours(generator=seeded(), guidance_batching="batched", **kwargs).images
    assert images.shape == (2, 16, 16, 3) and images.std() > 0.01
    np.testing.assert_allclose(images, expected, **TOLERANCE)
    latents = ours(generator=seeded(), guidance_batching="batched", **{**kwargs, "output_type": "latent"}).images
    expected_latents = decoded[0][:2] * reference.vae.config.scaling_factor  # DiT decodes both halves; the first is y
    torch.testing.assert_close(latents, expected_latents, **TOLERANCE)


def test_dit_null_label_and_guidance_matter():
    """The comparison can fail: another null label, or guiding the variance channels too, changes the images."""
    reference, ours = dit_pair("ddim")
    kwargs = dict(class_labels=[3, 999], guidance_scale=4.0, num_inference_steps=4, output_type="np")
    expected = reference(generator=seeded(), **kwargs).images
    assert ours.config.null_class_label == 1000
    wrong_null = quiet(
        ClassifierFreeGuidancePipeline(
            None, ours.scheduler, vae=ours.vae, transformer=ours.transformer, null_class_label=998
        )
    )
    assert np.abs(wrong_null(generator=seeded(), **kwargs).images - expected).max() > 1e-3
    unguided = ours(generator=seeded(), **{**kwargs, "guidance_scale": 1.0}).images
    assert np.abs(unguided - expected).max() > 1e-3


def test_dit_folder_loads_and_samples_the_same(tmp_path):
    reference, _ = dit_pair("dpmsolver++")
    reference.save_pretrained(tmp_path / "dit")
    loaded = quiet(ClassifierFreeGuidancePipeline.from_pretrained(tmp_path / "dit"))
    assert loaded.unet is None and isinstance(loaded.transformer, DiTTransformer2DModel)
    assert isinstance(loaded.scheduler, DPMSolverMultistepScheduler)
    kwargs = dict(class_labels=[7], guidance_scale=2.5, num_inference_steps=3, output_type="np")
    np.testing.assert_allclose(
        loaded(generator=seeded(), **kwargs).images, reference(generator=seeded(), **kwargs).images, **TOLERANCE
    )


def test_unconditional_sampling_with_a_dit_uses_its_null_label():
    _, ours = dit_pair("ddim")
    pipeline = quiet(HVAEPipeline(None, HVAEScheduler(num_train_timesteps=20), transformer=ours.transformer))
    labels = []
    ours.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: labels.append(kwargs["class_labels"]), with_kwargs=True
    )
    latents = pipeline(batch_size=2, num_inference_steps=2, generator=seeded(), output_type="latent").images
    assert latents.shape == (2, 4, 8, 8)
    assert [label.tolist() for label in labels] == [[1000, 1000]] * 2


# ---------------------------------------------------------------------------------------------- Stable Diffusion


@pytest.mark.parametrize(
    "scheduler_name, eta, guidance_rescale",
    [("ddim", 0.0, 0.0), ("ddim", 1.0, 0.7), ("euler", 0.0, 0.0), ("dpmsolver++", 0.0, 0.5)],
)
def test_reproduces_stable_diffusion_pipeline(tmp_path, scheduler_name, eta, guidance_rescale):
    reference, ours = sd_pair(tmp_path, scheduler_name)
    kwargs = dict(
        prompt=["a cat", "dog"],
        negative_prompt=["blur", "z"],
        guidance_scale=6.0,
        guidance_rescale=guidance_rescale,
        num_inference_steps=4,
        eta=eta,
    )
    expected = reference(generator=seeded(), output_type="np", **kwargs).images
    images = ours(generator=seeded(), output_type="np", guidance_batching="batched", **kwargs).images
    assert images.shape == (2, 16, 16, 3) and images.std() > 0.01
    np.testing.assert_allclose(images, expected, **TOLERANCE)
    expected_latents = reference(generator=seeded(), output_type="latent", **kwargs).images
    latents = ours(generator=seeded(), output_type="latent", guidance_batching="batched", **kwargs).images
    torch.testing.assert_close(latents, expected_latents, **TOLERANCE)


def test_stable_diffusion_negative_prompt_matters(tmp_path):
    """The comparison can fail: Stable Diffusion's images depend on the negative prompt."""
    reference, ours = sd_pair(tmp_path, "ddim")
    kwargs = dict(prompt="a cat", guidance_scale=6.0, num_inference_steps=3, output_type="np")
    expected = reference(generator=seeded(), negative_prompt="blur", **kwargs).images
    assert np.abs(ours(generator=seeded(), **kwargs).images - expected).max() > 1e-3


def test_stable_diffusion_folder_loads_and_samples_the_same(tmp_path):
    reference, _ = sd_pair(tmp_path, "euler")
    reference.save_pretrained(tmp_path / "sd")
    loaded = quiet(ClassifierFreeGuidancePipeline.from_pretrained(tmp_path / "sd"))
    assert isinstance(loaded.unet, UNet2DConditionModel) and loaded.transformer is None
    kwargs = dict(prompt="a cat", negative_prompt="blur", guidance_scale=5.0, num_inference_steps=3, output_type="np")
    np.testing.assert_allclose(
        loaded(generator=seeded(), **kwargs).images, reference(generator=seeded(), **kwargs).images, **TOLERANCE
    )


# ---------------------------------------------------------------------------------------------- components


def test_exactly_one_denoiser():
    scheduler, transformer = HVAEScheduler(), tiny_dit()
    with pytest.raises(ValueError, match="pass exactly one denoiser: unet .* or transformer"):
        HVAEPipeline(None, scheduler)
    # a classifier-free pipeline without a denoiser encodes prompts (as Diffusers' tests build it) but cannot sample
    with pytest.raises(ValueError, match="no denoiser"):
        ClassifierFreeGuidancePipeline(scheduler=scheduler)(class_labels=[0], num_inference_steps=1)
    with pytest.raises(ValueError, match="pass exactly one denoiser"):
        HVAEPipeline(tiny_sd_unet(), scheduler, transformer=transformer)


def test_class_labels_from_the_denoiser_config():
    assert (num_class_labels(tiny_dit().config), null_class_label(tiny_dit().config)) == (1001, 1000)
    assert (num_class_labels(tiny_sd_unet().config), null_class_label(tiny_sd_unet().config)) == (None, None)
    unet_config = SimpleNamespace(num_class_embeds=4)
    assert (num_class_labels(unet_config), null_class_label(unet_config)) == (4, 3)
    # in a Transformer2DModel with norm_type="ada_norm", num_embeds_ada_norm counts timesteps, not classes
    timestep_config = SimpleNamespace(num_embeds_ada_norm=1000, norm_type="ada_norm")
    assert (num_class_labels(timestep_config), null_class_label(timestep_config)) == (None, None)
