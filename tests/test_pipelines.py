"""The three pipelines: correctness against the exact Gaussian mixture, Diffusers conventions, and bad input.

Ground truth: with the exact denoiser of a 2-D Gaussian mixture as the "unet" and its exact p(y | x_t) as the
classifier, a correct sampler reproduces the mixture (or its class-conditional part); distances are sliced
Wasserstein distances to fresh mixture draws, judged against the distance between two fresh draw sets.
"""

import copy
import json
import threading

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, ViTConfig, ViTForImageClassification

from hvae_diffusion import (
    ClassifierFreeGuidancePipeline,
    ClassifierGuidedPipeline,
    HVAEPipeline,
    HVAEScheduler,
    MLPDenoiser,
    NoisyClassifier,
)
from hvae_diffusion.parameterization import PREDICTION_TYPES
from hvae_diffusion.pipelines.sampling import chain_alphas_cumprod, sample_shape
from hvae_diffusion.testing import (
    ExactMixtureClassifier,
    ExactMixtureDenoiser,
    GaussianMixture,
    sliced_wasserstein_distance,
)

MEANS = [[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
STD = 0.3
COMPONENT_LABELS = [0, 0, 1]  # class 0: two components, class 1: one
NUM_SAMPLES = 400
SWAPPED_SCHEDULERS = [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler]


# ---------------------------------------------------------------------------------------------- builders


def mixture_scheduler(prediction_type="epsilon"):
    return HVAEScheduler(prediction_type=prediction_type, clip_sample=False)


def exact_denoiser(scheduler):
    """The exact denoiser in the scheduler's parameterization; label 2 (= num_classes) is the null label."""
    return ExactMixtureDenoiser(
        MEANS,
        STD,
        component_labels=COMPONENT_LABELS,
        alphas_cumprod=scheduler.alphas_cumprod.tolist(),
        prediction_type=scheduler.config.prediction_type,
        in_channels=2,
        num_class_embeds=3,
    )


def exact_classifier(scheduler):
    return ExactMixtureClassifier(
        MEANS, STD, component_labels=COMPONENT_LABELS, alphas_cumprod=scheduler.alphas_cumprod.tolist()
    )


def quiet(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def tiny_unet(**kwargs):
    torch.manual_seed(0)
    config = dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    return UNet2DModel(**{**config, **kwargs}).eval()


def tiny_classifier(num_classes=3):
    torch.manual_seed(0)
    return NoisyClassifier(
        sample_size=8, in_channels=1, num_classes=num_classes, block_out_channels=(8, 16), norm_num_groups=4
    ).eval()


def tiny_clip(directory):
    """A 1-layer CLIPTextModel (hidden size 16) and a character-level CLIPTokenizer made from a vocab written here."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in "abcdefghijklmnopqrstuvwxyz":
        vocab[character] = len(vocab)
        vocab[character + "</w>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=8)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    return text_encoder, tokenizer


def tiny_conditional_unet(channels):
    """A 2-level UNet2DConditionModel on 8×8 inputs of ``channels`` channels, attending to ``tiny_clip``'s 16-d
    embeddings (drawn from torch's current seed)."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()


def tiny_text_components(directory):
    """A one-channel ``tiny_conditional_unet`` and ``tiny_clip``'s text encoder and tokenizer."""
    text_encoder, tokenizer = tiny_clip(directory)
    return tiny_conditional_unet(1), text_encoder, tokenizer


def count_forwards(model):
    """A list that gets the batch size of every forward of ``model``."""
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return calls


# ---------------------------------------------------------------------------------------------- ground truth


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture(MEANS, STD, component_labels=COMPONENT_LABELS)


@pytest.fixture(scope="module")
def reference(mixture):
    """Fresh draws of the mixture and of each class, with the distance between two fresh draw sets (the noise floor)."""

    def draws(class_label):
        first = mixture.sample(NUM_SAMPLES, seeded(101), class_label=class_label)[0]
        second = mixture.sample(NUM_SAMPLES, seeded(202), class_label=class_label)[0]
        return first, sliced_wasserstein_distance(first, second)

    return {label: draws(label) for label in (None, 0, 1)}


def distance_to(reference, samples, class_label=None):
    target, floor = reference[class_label]
    return sliced_wasserstein_distance(samples, target), floor


def class_confidence(mixture, samples, class_label):
    """Mean exact p(y | x_0) of the samples: 1 when every sample is deep inside class y."""
    return mixture.class_log_posterior(samples.double(), 1.0)[:, class_label].exp().mean().item()


def test_plain_sampling_reproduces_the_mixture(reference):
    scheduler = mixture_scheduler("epsilon")
    pipeline = quiet(HVAEPipeline(exact_denoiser(scheduler), scheduler))
    samples = pipeline(batch_size=NUM_SAMPLES, num_inference_steps=100, generator=seeded()).images
    assert samples.shape == (NUM_SAMPLES, 2)
    distance, floor = distance_to(reference, samples)
    assert distance < 1.5 * floor


def test_every_parameterization_gives_the_same_samples():
    outputs = {}
    for prediction_type in PREDICTION_TYPES:
        scheduler = mixture_scheduler(prediction_type)
        pipeline = quiet(HVAEPipeline(exact_denoiser(scheduler), scheduler))
        outputs[prediction_type] = pipeline(batch_size=64, num_inference_steps=20, generator=seeded(3)).images
    for prediction_type in PREDICTION_TYPES:
        torch.testing.assert_close(outputs[prediction_type], outputs["epsilon"], atol=2e-4, rtol=0)


@pytest.mark.parametrize("scheduler_class", SWAPPED_SCHEDULERS)
def test_score_model_samples_with_swapped_scheduler(reference, scheduler_class):
    """A model trained with "score" sampled with a Diffusers scheduler that steps ε: the pipeline converts."""
    scheduler = mixture_scheduler("score")
    swapped = scheduler_class.from_config(scheduler.config, prediction_type="epsilon")
    pipeline = quiet(HVAEPipeline(exact_denoiser(scheduler), swapped, prediction_type="score"))
    samples = pipeline(batch_size=NUM_SAMPLES, num_inference_steps=50, generator=seeded()).images
    distance, floor = distance_to(reference, samples)
    assert distance < 1.5 * floor
    assert pipeline.scheduler is swapped and len(swapped.timesteps) == 50  # no hidden copy stepped


@pytest.mark.parametrize("scheduler_class", SWAPPED_SCHEDULERS)
def test_diffusers_scheduler_told_to_step_a_score_says_what_to_do(scheduler_class):
    scheduler = mixture_scheduler("score")
    pipeline = quiet(HVAEPipeline(exact_denoiser(scheduler), scheduler_class.from_config(scheduler.config)))
    with pytest.raises(
        ValueError, match="prediction_type='epsilon'.*HVAEPipeline\\(unet, scheduler, prediction_type='score'\\)"
    ):
        pipeline(batch_size=2, num_inference_steps=3)


@pytest.mark.parametrize("scheduler_class", [HVAEScheduler, DDPMScheduler, DDIMScheduler])
def test_chain_reads_alphas_cumprod_at_each_timestep(scheduler_class):
    scheduler = scheduler_class.from_config(mixture_scheduler().config)
    scheduler.set_timesteps(10)
    expected = torch.as_tensor(scheduler.alphas_cumprod).double()[scheduler.timesteps.long()]
    alphas_cumprod = torch.tensor(chain_alphas_cumprod(scheduler, scheduler.timesteps), dtype=torch.float64)
    torch.testing.assert_close(alphas_cumprod, expected, rtol=1e-5, atol=0)


def test_chain_uses_sigma_at_fractional_timesteps():
    """Euler with "linspace" spacing samples at fractional timesteps; ᾱ = 1 / (1 + σ²) is exact there."""
    scheduler = EulerDiscreteScheduler.from_config(mixture_scheduler().config, timestep_spacing="linspace")
    scheduler.set_timesteps(7)
    assert not torch.equal(scheduler.timesteps, scheduler.timesteps.round())
    expected = 1 / (1 + scheduler.sigmas[:7].double() ** 2)
    alphas_cumprod = torch.tensor(chain_alphas_cumprod(scheduler, scheduler.timesteps), dtype=torch.float64)
    torch.testing.assert_close(alphas_cumprod, expected)


# ---------------------------------------------------------------------------------------------- guidance


@pytest.fixture(scope="module")
def guided_pipelines():
    scheduler = mixture_scheduler("epsilon")
    unet = exact_denoiser(scheduler)
    return (
        quiet(ClassifierGuidedPipeline(unet, scheduler, exact_classifier(scheduler))),
        quiet(ClassifierFreeGuidancePipeline(unet, scheduler)),
    )


@pytest.mark.parametrize("class_label", [0, 1])
def test_guidance_at_scale_one_samples_the_class(guided_pipelines, reference, mixture, class_label):
    """γ = 1 (classifier) and w = 1 (classifier-free) both sample p(x | y): the exact models make them agree."""
    classifier_guided, classifier_free = guided_pipelines
    kwargs = dict(class_labels=class_label, batch_size=NUM_SAMPLES, num_inference_steps=50)
    by_classifier = classifier_guided(guidance_scale=1.0, generator=seeded(), **kwargs).images
    by_free = classifier_free(guidance_scale=1.0, generator=seeded(), **kwargs).images
    unguided = classifier_guided(guidance_scale=0.0, generator=seeded(), **kwargs).images
    distance, floor = distance_to(reference, by_classifier, class_label)
    assert distance < 2 * floor
    assert distance < distance_to(reference, unguided, class_label)[0] / 4
    torch.testing.assert_close(by_free, by_classifier, atol=1e-3, rtol=0)


def test_guidance_scale_zero_is_unconditional(guided_pipelines, reference):
    _, classifier_free = guided_pipelines
    samples = classifier_free(
        class_labels=1, batch_size=NUM_SAMPLES, guidance_scale=0.0, num_inference_steps=50, generator=seeded()
    ).images
    distance, floor = distance_to(reference, samples)
    assert distance < 1.5 * floor


def test_larger_scales_sharpen(guided_pipelines, mixture):
    """γ, w > 1 sample p(x) p(y | x)^γ: higher confidence in the class and a narrower spread than at scale 1."""
    classifier_guided, classifier_free = guided_pipelines
    kwargs = dict(class_labels=1, batch_size=200, num_inference_steps=50)
    for pipeline, scale_name in ((classifier_guided, "guidance_scale"), (classifier_free, "guidance_scale")):
        exact = pipeline(**{scale_name: 1.0}, generator=seeded(), **kwargs).images
        sharp = pipeline(**{scale_name: 4.0}, generator=seeded(), **kwargs).images
        assert class_confidence(mixture, sharp, 1) > class_confidence(mixture, exact, 1)
        assert sharp.std(0).sum() < 0.9 * exact.std(0).sum()


@pytest.mark.parametrize(
    "scheduler_class, prediction_type", [(DDIMScheduler, "score"), (EulerDiscreteScheduler, "sample")]
)
def test_guidance_with_swapped_scheduler(reference, scheduler_class, prediction_type):
    """Guidance on the score with Diffusers' schedulers; with Euler the x̂_0 → score conversion and the classifier
    need x_t, the scaled model input, not Euler's sample x_t / √ᾱ_t."""
    scheduler = mixture_scheduler(prediction_type)
    unet, classifier = exact_denoiser(scheduler), exact_classifier(scheduler)
    swapped = scheduler_class.from_config(scheduler.config, prediction_type="epsilon")
    kwargs = dict(class_labels=1, batch_size=NUM_SAMPLES, num_inference_steps=50, generator=seeded())
    classifier_guided = ClassifierGuidedPipeline(unet, swapped, classifier, prediction_type=prediction_type)
    by_classifier = quiet(classifier_guided)(guidance_scale=1.0, **kwargs).images
    kwargs["generator"] = seeded()
    classifier_free = ClassifierFreeGuidancePipeline(unet, swapped, prediction_type=prediction_type)
    by_free = quiet(classifier_free)(guidance_scale=1.0, **kwargs).images
    for samples in (by_classifier, by_free):
        distance, floor = distance_to(reference, samples, 1)
        assert distance < 2 * floor


class CleanClassifier(ModelMixin):
    """A classifier of clean data (no timestep): the exact p(y | x_0) of the mixture."""

    def __init__(self, scheduler):
        super().__init__()
        self.exact = exact_classifier(scheduler)
        self.num_classes = self.exact.num_classes

    def forward(self, original_sample):
        return self.exact(original_sample, 0)


def test_denoised_classifier_guides_through_the_tweedie_estimate(mixture):
    scheduler = mixture_scheduler("v_prediction")
    unet = exact_denoiser(scheduler)
    pipeline = quiet(
        ClassifierGuidedPipeline(unet, scheduler, CleanClassifier(scheduler), classifier_input="denoised")
    )
    kwargs = dict(class_labels=1, batch_size=200, num_inference_steps=30)
    unguided = pipeline(guidance_scale=0.0, generator=seeded(), **kwargs).images
    guided = pipeline(guidance_scale=1.0, generator=seeded(), **kwargs).images
    assert class_confidence(mixture, unguided, 1) < 0.5 < 0.85 < class_confidence(mixture, guided, 1)


def test_denoised_mode_with_a_unet_and_transformers_image_classifier():
    """The clean-image mode with a transformers image classifier: the gradient goes through a real UNet (its forward
    runs with grad) and the classifier's ``config.num_labels`` is its class count."""
    unet = tiny_unet()
    torch.manual_seed(0)
    image_classifier = ViTForImageClassification(
        ViTConfig(
            image_size=8,
            patch_size=4,
            num_channels=1,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
        )
    ).eval()
    pipeline = quiet(
        ClassifierGuidedPipeline(
            unet, HVAEScheduler(num_train_timesteps=20), image_classifier, classifier_input="denoised"
        )
    )
    guided = pipeline(
        class_labels=[0, 2], guidance_scale=50.0, num_inference_steps=3, output_type="latent", generator=seeded()
    ).images
    unguided = pipeline(
        class_labels=[0, 2], guidance_scale=0.0, num_inference_steps=3, output_type="latent", generator=seeded()
    ).images
    assert guided.shape == (2, 1, 8, 8) and not torch.allclose(guided, unguided)
    assert all(parameter.grad is None for parameter in unet.parameters())
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 3\)"):
        pipeline(class_labels=[3], num_inference_steps=2)


# ---------------------------------------------------------------------------------------------- conventions


@pytest.fixture
def image_pipeline():
    return quiet(HVAEPipeline(tiny_unet(), HVAEScheduler(num_train_timesteps=20)))


def test_output_types(image_pipeline):
    run = lambda output_type: (
        image_pipeline(  # noqa: E731
            batch_size=2, num_inference_steps=3, generator=seeded(), output_type=output_type
        ).images
    )
    latent, pt, array, images = run("latent"), run("pt"), run("np"), run("pil")
    assert latent.shape == pt.shape == (2, 1, 8, 8)
    torch.testing.assert_close(pt, (latent / 2 + 0.5).clamp(0, 1))
    assert isinstance(array, np.ndarray) and array.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(array, pt.permute(0, 2, 3, 1).numpy())
    assert len(images) == 2 and isinstance(images[0], PIL.Image.Image) and images[0].size == (8, 8)
    assert isinstance(image_pipeline(batch_size=1, num_inference_steps=2), ImagePipelineOutput)
    (as_tuple,) = image_pipeline(batch_size=1, num_inference_steps=2, output_type="pt", return_dict=False)
    assert as_tuple.shape == (1, 1, 8, 8)


def test_latent_output_is_not_clamped():
    """For vector data "latent" (the default there) is the raw sample."""
    scheduler = mixture_scheduler()
    pipeline = quiet(HVAEPipeline(exact_denoiser(scheduler), scheduler))
    samples = pipeline(batch_size=200, num_inference_steps=10, generator=seeded()).images
    assert samples.abs().max() > 1.2  # mixture components sit at ±1 with spread 0.3
    with pytest.raises(ValueError, match="output_type='pil' needs an image model"):
        pipeline(batch_size=2, num_inference_steps=2, output_type="pil")


def test_generator_list_gives_one_stream_per_sample(image_pipeline):
    pair = image_pipeline(batch_size=2, num_inference_steps=3, output_type="pt", generator=[seeded(5), seeded(6)])
    alone = image_pipeline(batch_size=1, num_inference_steps=3, output_type="pt", generator=[seeded(6)])
    torch.testing.assert_close(pair.images[1:], alone.images)


def test_latents_are_the_starting_point():
    pipeline = quiet(HVAEPipeline(tiny_unet(), DDIMScheduler(num_train_timesteps=20)))
    latents = torch.randn(2, 1, 8, 8, generator=seeded(1))
    first = pipeline(batch_size=2, num_inference_steps=4, latents=latents, generator=seeded(2), output_type="pt")
    second = pipeline(batch_size=2, num_inference_steps=4, latents=latents, generator=seeded(3), output_type="pt")
    torch.testing.assert_close(first.images, second.images)  # DDIM with η = 0 is deterministic given x_T


def test_same_as_ddpm_pipeline_side_by_side():
    """With Diffusers' DDPMScheduler it is DDPMPipeline step for step; with HVAEScheduler, numerically the same."""
    unet = tiny_unet()
    ddpm = quiet(DDPMPipeline(unet, DDPMScheduler(num_train_timesteps=8)))
    expected = ddpm(batch_size=2, num_inference_steps=8, generator=seeded(), output_type="np").images
    ours = quiet(HVAEPipeline(unet, DDPMScheduler(num_train_timesteps=8)))
    np.testing.assert_allclose(
        ours(batch_size=2, num_inference_steps=8, generator=seeded(), output_type="np").images, expected, atol=1e-6
    )
    hvae = quiet(HVAEPipeline(unet, HVAEScheduler(num_train_timesteps=8)))
    np.testing.assert_allclose(
        hvae(batch_size=2, num_inference_steps=8, generator=seeded(), output_type="np").images, expected, atol=1e-4
    )


def test_callback_on_step_end(image_pipeline):
    seen = []

    def callback(pipeline, step_index, timestep, callback_kwargs):
        seen.append((step_index, int(timestep), callback_kwargs["latents"].shape))
        if step_index == 3:  # replacing the latents takes effect
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}
        return {}

    samples = image_pipeline(
        batch_size=2,
        num_inference_steps=4,
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents"],
    ).images
    assert [step for step, _, _ in seen] == [0, 1, 2, 3]
    assert [t for _, t, _ in seen] == image_pipeline.scheduler.timesteps.tolist()
    assert seen[0][2] == (2, 1, 8, 8)
    assert torch.equal(samples, torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_follows_the_unet(dtype):
    unet = tiny_unet(num_class_embeds=3).to(dtype)
    scheduler = HVAEScheduler(num_train_timesteps=20)
    pipelines = [
        (HVAEPipeline(tiny_unet().to(dtype), scheduler), {"batch_size": 2}),
        (ClassifierFreeGuidancePipeline(unet, scheduler), {"class_labels": [0, 1], "guidance_scale": 2.0}),
        (
            ClassifierGuidedPipeline(tiny_unet().to(dtype), scheduler, tiny_classifier().to(dtype)),
            {"class_labels": [0, 2], "guidance_scale": 2.0},
        ),
    ]
    for pipeline, kwargs in pipelines:
        samples = quiet(pipeline)(num_inference_steps=3, output_type="latent", generator=seeded(), **kwargs).images
        assert samples.dtype == dtype and samples.shape == (2, 1, 8, 8)
        assert torch.isfinite(samples.float()).all()


def test_classifier_free_runs_one_batched_forward_per_step():
    unet = tiny_unet(num_class_embeds=3)
    calls = count_forwards(unet)
    pipeline = quiet(ClassifierFreeGuidancePipeline(unet, HVAEScheduler(num_train_timesteps=20)))
    assert pipeline.config.null_class_label == 2
    pipeline(
        class_labels=[0, 1, 1],
        guidance_scale=3.0,
        num_inference_steps=4,
        output_type="pt",
    )
    assert calls == [6] * 4  # by default, as in Diffusers: one forward of the doubled batch, and no timing
    assert pipeline.guidance_batching_choices == {}
    calls.clear()
    pipeline(class_labels=[0, 1, 1], guidance_scale=1.0, num_inference_steps=4, output_type="pt")
    assert calls == [3] * 4  # w = 1 needs only the conditional half


def test_batched_halves_equal_two_forwards(tmp_path):
    unet, text_encoder, tokenizer = tiny_text_components(tmp_path)
    pipeline = ClassifierFreeGuidancePipeline(unet, HVAEScheduler(num_train_timesteps=20), text_encoder, tokenizer)
    unconditional, conditional = pipeline.text_conditions(["a cat", "a dog"], None, None)
    conditions = torch.cat([unconditional, conditional])
    sample = torch.randn(2, 1, 8, 8, generator=seeded())
    with torch.no_grad():
        alone = (
            unet(sample, 5, encoder_hidden_states=unconditional).sample,
            unet(sample, 5, encoder_hidden_states=conditional).sample,
        )
        for mode in ("batched", "separate", "auto"):
            outputs = pipeline.unconditional_and_conditional(
                sample, torch.tensor(5), "encoder_hidden_states", conditions, mode
            )
            for output, expected in zip(outputs, alone):
                torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_text_prompts_and_negative_prompt(tmp_path):
    unet, text_encoder, tokenizer = tiny_text_components(tmp_path)
    pipeline = quiet(
        ClassifierFreeGuidancePipeline(unet, HVAEScheduler(num_train_timesteps=20), text_encoder, tokenizer)
    )

    def run(**kwargs):
        return pipeline(num_inference_steps=3, output_type="pt", generator=seeded(), **kwargs).images

    plain = run(prompt="a cat", batch_size=2, guidance_scale=2.0)
    assert plain.shape == (2, 1, 8, 8)
    negative = run(prompt=["a cat", "a cat"], negative_prompt="dog", guidance_scale=2.0)
    assert not torch.allclose(plain, negative)
    unconditional = run(prompt="a cat", batch_size=2, guidance_scale=0.0)
    torch.testing.assert_close(unconditional, run(prompt="zebra", batch_size=2, guidance_scale=0.0))


def test_sample_shape_from_the_model_config():
    assert sample_shape(tiny_unet().config, 3) == (3, 1, 8, 8)
    assert sample_shape(tiny_unet(sample_size=(8, 4)).config, 2) == (2, 1, 8, 4)
    assert sample_shape(MLPDenoiser(in_channels=5, hidden_dim=8, num_blocks=1).config, 4) == (4, 5)
    pipeline = quiet(HVAEPipeline(tiny_unet(sample_size=(8, 4)), HVAEScheduler(num_train_timesteps=10)))
    assert pipeline(batch_size=2, num_inference_steps=2, output_type="np").images.shape == (2, 8, 4, 1)


def test_vector_model_with_classifier_free_guidance():
    torch.manual_seed(0)
    mlp = MLPDenoiser(in_channels=3, hidden_dim=16, num_blocks=1, num_class_embeds=3)
    pipeline = quiet(ClassifierFreeGuidancePipeline(mlp, HVAEScheduler(num_train_timesteps=10)))
    assert pipeline.config.null_class_label == 2
    samples = pipeline(class_labels=[0, 1], guidance_scale=2.0, num_inference_steps=3).images
    assert samples.shape == (2, 3)


@pytest.mark.parametrize(
    "scheduler",
    [HVAEScheduler(num_train_timesteps=10, variance_type="learned_range"), DDIMScheduler(num_train_timesteps=10)],
)
def test_learned_variance_channels(scheduler):
    """A model with 2C output channels: the HVAE scheduler uses the variance half, DDIM gets the prediction only."""
    pipeline = quiet(HVAEPipeline(tiny_unet(out_channels=2), scheduler))
    samples = pipeline(batch_size=2, num_inference_steps=3, output_type="latent", generator=seeded()).images
    assert samples.shape == (2, 1, 8, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float16():
    unet = tiny_unet(num_class_embeds=3).to("cuda", torch.float16)
    pipeline = quiet(ClassifierFreeGuidancePipeline(unet, HVAEScheduler(num_train_timesteps=20)))
    samples = pipeline(
        class_labels=[0, 1],
        guidance_scale=2.0,
        num_inference_steps=4,
        output_type="latent",
        generator=torch.Generator("cuda").manual_seed(0),
    ).images
    assert samples.device.type == "cuda" and samples.dtype == torch.float16 and torch.isfinite(samples).all()


def test_final_nan_is_reported():
    class Diverging(ModelMixin):
        def __init__(self):
            super().__init__()
            self.config = tiny_unet().config
            self.anchor = torch.nn.Parameter(torch.zeros(()))

        def forward(self, sample, timestep):
            return sample * float("nan")

    pipeline = quiet(HVAEPipeline(Diverging(), DDIMScheduler(num_train_timesteps=20)))
    with pytest.raises(ValueError, match="final sample contains NaN or inf"):
        pipeline(batch_size=1, num_inference_steps=2)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def counted_pipelines():
    """Each pipeline with a counter of UNet forwards, to check that bad input fails before any sampling."""
    scheduler = mixture_scheduler()
    unconditional_unet, conditional_unet = tiny_unet(), tiny_unet(num_class_embeds=3)
    counters = {"unconditional": count_forwards(unconditional_unet), "conditional": count_forwards(conditional_unet)}
    return counters, {
        "hvae": quiet(HVAEPipeline(unconditional_unet, scheduler)),
        "classifier": quiet(ClassifierGuidedPipeline(unconditional_unet, scheduler, tiny_classifier(3))),
        "free": quiet(ClassifierFreeGuidancePipeline(conditional_unet, scheduler)),
        "free_unconditional": quiet(ClassifierFreeGuidancePipeline(unconditional_unet, scheduler)),
    }


BAD_CALLS = [
    ("hvae", dict(batch_size=1, num_inference_steps=0), "num_inference_steps must be >= 1"),
    ("hvae", dict(batch_size=1, num_inference_steps=2.5), "num_inference_steps must be an int"),
    ("hvae", dict(batch_size=0), "batch_size must be an int >= 1"),
    ("hvae", dict(batch_size=1, output_type="jpg"), "output_type must be one of"),
    ("hvae", dict(batch_size=2, latents=torch.zeros(2, 1, 4, 4)), r"latents must have shape \(2, 1, 8, 8\)"),
    ("hvae", dict(batch_size=2, generator=[seeded()]), "list of 1 generators but the batch size is 2"),
    ("hvae", dict(batch_size=1, callback_on_step_end_tensor_inputs=["noise"]), "may only name"),
    ("classifier", dict(class_labels=[0, 3]), r"class_labels must lie in \[0, 3\)"),
    ("classifier", dict(class_labels=[-1]), r"class_labels must lie in \[0, 3\)"),
    ("classifier", dict(class_labels=[0, 1], batch_size=3), "has 2 labels but batch_size is 3"),
    ("classifier", dict(class_labels=[0.5]), "must be an int or a non-empty sequence"),
    ("classifier", dict(class_labels=0, guidance_scale=-1.0), "guidance_scale must be a finite number"),
    ("classifier", dict(class_labels=0, guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    ("free", dict(class_labels=[0, 5]), r"class_labels must lie in \[0, 3\)"),
    ("free", dict(class_labels=[2]), "must not contain the null label 2"),
    # nested labels are flattened as DiTPipeline does; the message shows what was given
    ("free", dict(class_labels=[[0], [None]]), r"sequence \(or tensor\) of ints, got \[\[0\], \[None\]\]"),
    ("free", dict(class_labels=1, guidance_scale=float("inf")), "guidance_scale must be a finite number"),
    ("free", dict(class_labels=1, guidance_scale=-2), "guidance_scale must be a finite number"),
    ("free", dict(), "pass exactly one of class_labels"),
    ("free", dict(prompt="a cat"), "the unet takes no text"),
    ("free_unconditional", dict(class_labels=[0]), "the denoiser is not class-conditional"),
]


@pytest.mark.parametrize("name, kwargs, match", BAD_CALLS, ids=[f"{c[0]}-{c[2][:30]}" for c in BAD_CALLS])
def test_bad_input_fails_before_sampling(counted_pipelines, name, kwargs, match):
    counters, pipelines = counted_pipelines
    for calls in counters.values():
        calls.clear()
    with pytest.raises(ValueError, match=match):
        pipelines[name](**{"num_inference_steps": 2, **kwargs})
    assert all(not calls for calls in counters.values())


def test_classifier_must_declare_and_match_its_class_count():
    scheduler = HVAEScheduler(num_train_timesteps=20)
    with pytest.raises(ValueError, match="classifier must declare its number of classes"):
        ClassifierGuidedPipeline(tiny_unet(), scheduler, torch.nn.Linear(2, 2))

    class Lying(ModelMixin):
        num_classes = 5

        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))

        def forward(self, sample, timestep):
            return sample.flatten(1)[:, :3]

    pipeline = quiet(ClassifierGuidedPipeline(tiny_unet(), scheduler, Lying()))
    with pytest.raises(ValueError, match="returned 3 logits but declares num_classes=5"):
        pipeline(class_labels=[4], num_inference_steps=2)


def test_bad_constructor_arguments():
    scheduler = HVAEScheduler(num_train_timesteps=20)
    with pytest.raises(ValueError, match="classifier_input must be one of"):
        ClassifierGuidedPipeline(tiny_unet(), scheduler, tiny_classifier(), classifier_input="clean")
    with pytest.raises(ValueError, match="null_class_label=7 must lie in"):
        ClassifierFreeGuidancePipeline(tiny_unet(num_class_embeds=3), scheduler, null_class_label=7)


def test_text_prompt_mismatches(tmp_path):
    unet, text_encoder, tokenizer = tiny_text_components(tmp_path)
    pipeline = quiet(
        ClassifierFreeGuidancePipeline(unet, HVAEScheduler(num_train_timesteps=20), text_encoder, tokenizer)
    )
    with pytest.raises(ValueError, match="negative_prompt must be a string or a list of 2 strings"):
        pipeline(prompt=["a", "b"], negative_prompt=["c"], num_inference_steps=2)
    with pytest.raises(ValueError, match="prompt has 2 prompts but batch_size is 3"):
        pipeline(prompt=["a", "b"], batch_size=3, num_inference_steps=2)
    with pytest.raises(ValueError, match="the denoiser is not class-conditional"):
        pipeline(class_labels=[0], num_inference_steps=2)


def test_cfg_guidance_batching_options_agree():
    """The CFG option the cfg benchmark measures: both ways give the same samples, with 1 or 2 forwards a step."""
    import torch
    from diffusers import UNet2DModel

    from hvae_diffusion import ClassifierFreeGuidancePipeline, HVAEScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=3,
    )
    forwards = []
    unet.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    pipeline = ClassifierFreeGuidancePipeline(unet, HVAEScheduler(num_train_timesteps=20))
    pipeline.set_progress_bar_config(disable=True)
    samples, batch_sizes = {}, {}
    for mode in ("batched", "separate"):
        forwards.clear()
        samples[mode] = pipeline(
            class_labels=[0, 1],
            guidance_scale=3.0,
            num_inference_steps=3,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            guidance_batching=mode,
        ).images
        batch_sizes[mode] = list(forwards)
    assert batch_sizes == {"batched": [4] * 3, "separate": [2] * 6}
    torch.testing.assert_close(samples["batched"], samples["separate"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="guidance_batching"):
        pipeline(class_labels=[0], num_inference_steps=2, guidance_batching="doubled")


# ---------------------------------------------------------------------------------------------- threads


def threaded_pipelines():
    scheduler = HVAEScheduler(num_train_timesteps=20)
    return {
        "hvae": (HVAEPipeline(tiny_unet(), scheduler), {}),
        "classifier": (ClassifierGuidedPipeline(tiny_unet(), scheduler, tiny_classifier(3)), {"class_labels": [0]}),
        "free": (ClassifierFreeGuidancePipeline(tiny_unet(num_class_embeds=3), scheduler), {"class_labels": [0]}),
    }


@pytest.mark.parametrize("name", ["hvae", "classifier", "free"])
def test_a_second_concurrent_call_raises(name):
    """While one thread samples (held inside its first step's callback), a call from another thread on the same object
    raises at once, as does a call from the callback itself; a deep copy taken meanwhile samples freely, and the first
    call's samples are those of an undisturbed call."""
    pipeline, kwargs = threaded_pipelines()[name]
    pipeline = quiet(pipeline)
    kwargs = dict(num_inference_steps=3, output_type="latent", **kwargs)
    expected = pipeline(generator=seeded(), **kwargs).images
    inside, release, results, errors = threading.Event(), threading.Event(), {}, []

    def hold(pipe, step_index, timestep, callback_kwargs):
        if step_index == 0:
            with pytest.raises(RuntimeError, match="already sampling"):
                pipe(**kwargs)
            inside.set()
            release.wait(timeout=60)
        return callback_kwargs

    def first_call():
        try:
            results["first"] = pipeline(generator=seeded(), callback_on_step_end=hold, **kwargs).images
        except BaseException as error:  # reported in the main thread
            errors.append(error)
            inside.set()

    thread = threading.Thread(target=first_call)
    thread.start()
    try:
        assert inside.wait(timeout=60)
        with pytest.raises(RuntimeError, match="already sampling in another thread|one call at a time"):
            pipeline(generator=seeded(), **kwargs)
        copied = copy.deepcopy(pipeline)
        torch.testing.assert_close(copied(generator=seeded(), **kwargs).images, expected)
    finally:
        release.set()
        thread.join(timeout=60)
    assert not errors, errors
    torch.testing.assert_close(results["first"], expected)
    torch.testing.assert_close(pipeline(generator=seeded(), **kwargs).images, expected)  # free again
