"""Latent models: the pipelines with a VAE decode the final latents once, with the VAE's scaling and shift."""

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.modeling_utils import ModelMixin
from test_pipelines import count_forwards, quiet, seeded, tiny_unet

from hvae_diffusion import ClassifierFreeGuidancePipeline, ClassifierGuidedPipeline, HVAEPipeline, HVAEScheduler


def tiny_vae(latent_channels=1, shift_factor=0.25):
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.5,
        shift_factor=shift_factor,
    ).eval()


class PixelClassifier(ModelMixin):
    """A classifier of 3x16x16 images (clean data): what a latent model's "denoised" guidance decodes for."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3 * 16 * 16, 3)

    def forward(self, images):
        return self.linear(images.flatten(1))


@pytest.mark.parametrize("name", ["hvae", "classifier", "free"])
def test_decoder_runs_once_per_sample_with_scaling_and_shift(name):
    vae, unet = tiny_vae(), tiny_unet(num_class_embeds=4)
    scheduler = HVAEScheduler(num_train_timesteps=20)
    pipeline, kwargs = {
        "hvae": (HVAEPipeline(unet, scheduler, vae=vae), {"batch_size": 2}),
        "classifier": (
            ClassifierGuidedPipeline(unet, scheduler, PixelClassifier(), classifier_input="denoised", vae=vae),
            {"class_labels": [0, 1], "guidance_scale": 1.0},
        ),
        "free": (ClassifierFreeGuidancePipeline(unet, scheduler, vae=vae), {"class_labels": [0, 1]}),
    }[name]
    quiet(pipeline)
    decoder_calls = count_forwards(vae.decoder)
    latents = pipeline(num_inference_steps=3, generator=seeded(), output_type="latent", **kwargs).images
    guidance_decodes = len(decoder_calls)  # clean-image guidance decodes x̂_0 at every step, the others never
    assert guidance_decodes == (3 if name == "classifier" else 0)
    images = pipeline(num_inference_steps=3, generator=seeded(), output_type="pt", **kwargs).images
    assert len(decoder_calls) == 2 * guidance_decodes + 1
    assert latents.shape == (2, 1, 8, 8) and images.shape == (2, 3, 16, 16)
    with torch.no_grad():
        expected = vae.decode(latents / 0.5 + 0.25).sample
    torch.testing.assert_close(images, (expected / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_clean_image_guidance_steers_through_the_decoder():
    vae, unet = tiny_vae(), tiny_unet()
    pipeline = quiet(
        ClassifierGuidedPipeline(
            unet, HVAEScheduler(num_train_timesteps=20), PixelClassifier(), classifier_input="denoised", vae=vae
        )
    )
    kwargs = dict(class_labels=[2, 2], num_inference_steps=3, output_type="latent")
    unguided = pipeline(guidance_scale=0.0, generator=seeded(), **kwargs).images
    guided = pipeline(guidance_scale=50.0, generator=seeded(), **kwargs).images
    assert not torch.allclose(guided, unguided)


def test_vae_whose_latents_do_not_fit_the_denoiser():
    with pytest.raises(ValueError, match="vae.config.latent_channels=4 must equal the denoiser's in_channels=1"):
        HVAEPipeline(tiny_unet(), HVAEScheduler(), vae=tiny_vae(latent_channels=4))


def test_latent_pipeline_round_trip(tmp_path):
    pipeline = quiet(HVAEPipeline(tiny_unet(), HVAEScheduler(num_train_timesteps=20), vae=tiny_vae()))
    pipeline.save_pretrained(tmp_path / "latent")
    loaded = quiet(HVAEPipeline.from_pretrained(tmp_path / "latent"))
    kwargs = dict(batch_size=1, num_inference_steps=2, output_type="pt")
    torch.testing.assert_close(
        loaded(generator=seeded(), **kwargs).images, pipeline(generator=seeded(), **kwargs).images
    )


def stored_for_backward(run):
    """(result of ``run()``, bytes of the tensors autograd stores for backward while it runs)."""
    stored = []

    def pack(tensor):
        stored.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, sum(stored)


def test_decoder_gradient_checkpointing_stores_less_and_samples_the_same():
    """Clean-image guidance through the decoder with the VAE's own gradient checkpointing: the decoder's blocks are
    recomputed in the backward pass instead of stored, and the samples do not change."""
    vae = tiny_vae()
    pipeline = quiet(
        ClassifierGuidedPipeline(
            tiny_unet(), HVAEScheduler(num_train_timesteps=20), PixelClassifier(), classifier_input="denoised", vae=vae
        )
    )
    kwargs = dict(class_labels=[2, 0], guidance_scale=20.0, num_inference_steps=3, output_type="latent")
    stored_latents, stored = stored_for_backward(lambda: pipeline(generator=seeded(), **kwargs).images)
    up_block_calls = count_forwards(vae.decoder.up_blocks[0])
    vae.enable_gradient_checkpointing()
    checkpointed_latents, checkpointed = stored_for_backward(lambda: pipeline(generator=seeded(), **kwargs).images)
    torch.testing.assert_close(checkpointed_latents, stored_latents, atol=1e-6, rtol=1e-6)
    assert checkpointed < 0.8 * stored
    assert len(up_block_calls) == 2 * 3  # each guided step runs the decoder's block again in the backward pass
