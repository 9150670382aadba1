"""ClassifierGuidance, the classifier-guidance guider in Diffusers' guider API, side by side with
ClassifierGuidedPipeline: a loop written as Diffusers' modular denoise step gives the same images from the same seed."""

import pytest
import torch
from diffusers.guiders import BaseGuidance
from diffusers.utils.torch_utils import randn_tensor
from test_pipelines import tiny_unet

from hvae_diffusion import ClassifierGuidedPipeline, HVAEScheduler, NoisyClassifier
from hvae_diffusion.guiders import ClassifierGuidance

NUM_STEPS = 8


class CountingClassifier(torch.nn.Module):
    """Counts the classifier's forward passes (each guided step takes one, and one backward)."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier, self.calls = classifier, 0

    @property
    def num_classes(self):
        return self.classifier.num_classes

    def forward(self, sample, timestep):
        self.calls += 1
        return self.classifier(sample, timestep)


@pytest.fixture(scope="module")
def components():
    unet = tiny_unet()  # tiny_unet seeds torch, so the classifier built next is fixed too
    classifier = NoisyClassifier(
        sample_size=8, in_channels=1, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4
    ).eval()
    return unet, classifier


def guider_loop(unet, classifier, guider_kwargs, labels, seed):
    """Diffusers' modular denoise step, written out: set_state, prepare_inputs, one forward per batch, guider(...)."""
    scheduler = HVAEScheduler(num_train_timesteps=100, clip_sample=False)
    guider = ClassifierGuidance(classifier=classifier, scheduler=scheduler, clip_sample=True, **guider_kwargs)
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(NUM_STEPS)
    latents = randn_tensor((len(labels), 1, 8, 8), generator=generator)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            guider.set_state(step=i, num_inference_steps=NUM_STEPS, timestep=t)
            batches = guider.prepare_inputs({"sample": latents, "class_labels": labels})
            for batch in batches:
                guider.prepare_models(unet)
                batch.noise_pred = unet(latents, t).sample
                guider.cleanup_models(unet)
            latents = scheduler.step(guider(batches).pred, t, latents, generator=generator).prev_sample
    return latents


@pytest.mark.parametrize("guidance_form", ["score", "mean"])
def test_guider_gives_the_images_of_classifier_guided_pipeline(components, guidance_form):
    unet, classifier = components
    labels = torch.tensor([0, 1, 2, 1])
    pipe = ClassifierGuidedPipeline(unet, HVAEScheduler(num_train_timesteps=100, clip_sample=True), classifier)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        class_labels=labels,
        guidance_scale=3.0,
        guidance_form=guidance_form,
        num_inference_steps=NUM_STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    result = guider_loop(unet, classifier, {"guidance_scale": 3.0, "guidance_form": guidance_form}, labels, 0)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
    unguided = guider_loop(unet, classifier, {"guidance_scale": 0.0}, labels, 0)
    assert (unguided - expected).abs().max() > 1e-2  # the guidance changed the images


def test_guider_outside_start_stop_takes_no_classifier_pass(components):
    """start/stop as Diffusers' guiders read them: steps int(start·N) ≤ i < int(stop·N) are guided; the others make
    no classifier pass and step the denoiser's (clipped) prediction, as γ = 0 does."""
    unet, classifier = components
    counting = CountingClassifier(classifier)
    labels = torch.tensor([0, 2])
    interval = guider_loop(unet, counting, {"guidance_scale": 3.0, "start": 0.25, "stop": 0.75}, labels, 1)
    assert counting.calls == 4  # steps 2, 3, 4, 5 of 8
    everywhere = guider_loop(unet, classifier, {"guidance_scale": 3.0}, labels, 1)
    nowhere = guider_loop(unet, classifier, {"guidance_scale": 0.0}, labels, 1)
    assert (interval - everywhere).abs().max() > 1e-3 and (interval - nowhere).abs().max() > 1e-3


def test_guider_is_a_diffusers_guider_and_saves_its_config(tmp_path, components):
    unet, classifier = components
    guider = ClassifierGuidance(
        classifier=classifier,
        scheduler=HVAEScheduler(clip_sample=False),
        guidance_scale=2.0,
        guidance_form="mean",
        stop=0.5,
    )
    assert isinstance(guider, BaseGuidance) and guider.num_conditions == 1 and not guider.is_conditional
    guider.save_pretrained(tmp_path)
    loaded = ClassifierGuidance.from_pretrained(tmp_path)
    assert (loaded.guidance_scale, loaded.guidance_form, loaded.config.stop) == (2.0, "mean", 0.5)
    assert "classifier" not in loaded.config and loaded.classifier is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_form": "both"}, "guidance_form"),
        ({"prediction_type": "score"}, "prediction_type"),
        ({"scheduler": HVAEScheduler(clip_sample=True)}, "clip_sample=False"),
    ],
)
def test_bad_guider_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassifierGuidance(**kwargs)


def test_guider_needs_sample_and_labels():
    with pytest.raises(ValueError, match="sample"):
        ClassifierGuidance(scheduler=HVAEScheduler(clip_sample=False)).prepare_inputs(
            {"class_labels": torch.tensor([0])}
        )
