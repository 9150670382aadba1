"""Each figure function runs on tiny inputs, writes a non-empty PNG, and plots the library's own numbers.

Ground truth is the library itself (the scheduler's ᾱ_t and ELBO terms, the mixture's exact score, the pipelines'
samples from the same seed) and the exact Gaussian-mixture denoiser, whose learned-score error must be zero.
"""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import UNet2DModel

from hvae_diffusion import (
    ClassifierFreeGuidancePipeline,
    ClassifierGuidedPipeline,
    HVAEPipeline,
    HVAEScheduler,
    plotting,
)
from hvae_diffusion.elbo import elbo_terms
from hvae_diffusion.forward_process import BETA_SCHEDULES
from hvae_diffusion.parameterization import convert_prediction
from hvae_diffusion.testing import ExactMixtureClassifier, ExactMixtureDenoiser, GaussianMixture

NUM_TRAIN_TIMESTEPS = 10


@pytest.fixture
def mixture():
    return GaussianMixture([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.2]], stds=0.3, component_labels=[0, 1, 1])


def exact_denoiser(mixture, scheduler, **kwargs):
    return ExactMixtureDenoiser(
        mixture.means,
        mixture.stds,
        component_labels=mixture.component_labels.tolist(),
        alphas_cumprod=scheduler.alphas_cumprod,
        prediction_type=scheduler.config.prediction_type,
        in_channels=2,
        **kwargs,
    )


def toy_scheduler(prediction_type="epsilon"):
    return HVAEScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=0.01,
        beta_end=0.5,
        clip_sample=False,
        prediction_type=prediction_type,
    )


def assert_png(path):
    assert path.stat().st_size > 1000
    with PIL.Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 50


def test_forward_process_plots_the_schedulers_alphas_cumprod(tmp_path, generator):
    samples = torch.randn(40, 2, generator=generator)
    scheduler = toy_scheduler()
    result = plotting.plot_forward_process(
        samples, tmp_path / "f1.png", scheduler, timesteps=(0, 4, 9), generator=torch.Generator().manual_seed(1)
    )
    assert_png(tmp_path / "f1.png")
    assert set(result["alphas_cumprod"]) == set(BETA_SCHEDULES)
    for name in BETA_SCHEDULES:
        expected = HVAEScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule=name).alphas_cumprod
        assert torch.equal(torch.as_tensor(result["alphas_cumprod"][name]), expected)
        torch.testing.assert_close(torch.as_tensor(result["snr"][name]), expected / (1 - expected))
    for t, noisy in zip((0, 4, 9), result["noisy_samples"]):
        assert torch.equal(noisy, scheduler.add_noise(samples, result["noise"], torch.full((40,), t)))
    assert torch.equal(result["noise"], torch.randn(40, 2, generator=torch.Generator().manual_seed(1)))


def test_score_field_plots_the_mixtures_exact_score(tmp_path, mixture):
    scheduler = toy_scheduler()
    result = plotting.plot_score_field(mixture, tmp_path / "f3.png", scheduler, timesteps=(1, 5), grid_size=5)
    assert_png(tmp_path / "f3.png")
    assert result["grid"].shape == (25, 2) and "learned_score" not in result
    for t, exact in zip((1, 5), result["exact_score"]):
        assert torch.equal(exact, mixture.score(result["grid"], float(scheduler.alphas_cumprod[t])))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "score"])
def test_score_field_of_the_exact_denoiser_has_no_error(tmp_path, mixture, prediction_type, single_thread):
    """The learned row converts any parameterization to the score: for the exact denoiser it is the exact score."""
    scheduler = toy_scheduler(prediction_type)
    result = plotting.plot_score_field(
        mixture,
        tmp_path / "f3.png",
        scheduler,
        timesteps=(2, 8),
        grid_size=4,
        model=exact_denoiser(mixture, scheduler),
    )
    assert_png(tmp_path / "f3.png")
    torch.testing.assert_close(result["learned_score"], result["exact_score"], rtol=1e-4, atol=1e-4)
    assert float(result["error"].max()) < 1e-4
    # and a wrong model is visibly wrong
    wrong = exact_denoiser(GaussianMixture([[0.0, 0.0]], stds=0.3), scheduler)
    result = plotting.plot_score_field(
        mixture, tmp_path / "f3.png", scheduler, timesteps=(2,), grid_size=4, model=wrong
    )
    assert float(result["error"].max()) > 0.1


def test_elbo_figure_plots_the_schedulers_elbo_terms(tmp_path, mixture, single_thread):
    x0, _ = mixture.sample(32, generator=torch.Generator().manual_seed(3))
    models = {}
    for prediction_type in ("sample", "score"):
        scheduler = toy_scheduler(prediction_type)
        models[prediction_type] = (exact_denoiser(mixture, scheduler), scheduler)
    result = plotting.plot_elbo_terms(models, x0.float(), tmp_path / "f4.png", seed=7)
    assert_png(tmp_path / "f4.png")
    for label, (denoiser, scheduler) in models.items():
        terms = elbo_terms(scheduler, denoiser, x0.float(), generator=torch.Generator().manual_seed(7), discrete=False)
        plotted = result[label]
        torch.testing.assert_close(
            torch.as_tensor(plotted["denoising_matching"]), terms.denoising_matching.double().mean(0)
        )
        assert plotted["reconstruction"] == pytest.approx(float(terms.reconstruction.double().mean()))
        assert plotted["prior_matching"] == pytest.approx(float(terms.prior_matching.double().mean()))
        assert plotted["bits_per_dim"] == pytest.approx(float(terms.bits_per_dim.double().mean()))
        assert plotted["negative_elbo"] == pytest.approx(
            -plotted["reconstruction"] + plotted["prior_matching"] + plotted["denoising_matching_total"]
        )
    # the same exact denoiser in two parameterizations has the same ELBO (the same noise: seed 7)
    assert result["sample"]["bits_per_dim"] == pytest.approx(result["score"]["bits_per_dim"], rel=1e-4)


def test_reverse_trajectories_end_at_the_pipelines_samples(tmp_path, mixture):
    scheduler = toy_scheduler()
    pipeline = HVAEPipeline(unet=exact_denoiser(mixture, scheduler), scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    reference, _ = mixture.sample(200, generator=torch.Generator().manual_seed(0))
    result = plotting.plot_reverse_trajectories(
        pipeline,
        tmp_path / "f2.png",
        num_samples=20,
        num_inference_steps=5,
        seed=4,
        reference_samples=reference,
        num_trajectories=5,
    )
    assert_png(tmp_path / "f2.png")
    assert result["trajectories"].shape == (6, 20, 2)
    direct = pipeline(
        batch_size=20, num_inference_steps=5, generator=torch.Generator().manual_seed(4), output_type="latent"
    ).images
    torch.testing.assert_close(result["samples"], direct)
    torch.testing.assert_close(result["trajectories"][-1], direct)
    assert torch.equal(result["trajectories"][0], torch.randn(20, 2, generator=torch.Generator().manual_seed(4)))


def test_guidance_figure_plots_the_pipelines_samples(tmp_path, mixture, single_thread):
    scheduler = toy_scheduler()
    unet = exact_denoiser(mixture, scheduler)
    classifier = ExactMixtureClassifier(
        mixture.means,
        mixture.stds,
        component_labels=mixture.component_labels.tolist(),
        alphas_cumprod=scheduler.alphas_cumprod,
    )
    guided = ClassifierGuidedPipeline(unet=unet, scheduler=scheduler, classifier=classifier)
    conditional = exact_denoiser(mixture, scheduler, num_class_embeds=mixture.num_classes + 1)
    free = ClassifierFreeGuidancePipeline(unet=conditional, scheduler=scheduler)
    for pipeline in (guided, free):
        pipeline.set_progress_bar_config(disable=True)
    result = plotting.plot_guidance(
        tmp_path / "f5.png",
        1,
        classifier_pipeline=guided,
        classifier_scales=(0.0, 2.0),
        cfg_pipeline=free,
        guidance_scales=(1.0, 3.0, 5.0),
        num_samples=12,
        num_inference_steps=4,
        seed=2,
    )
    assert_png(tmp_path / "f5.png")
    for scale in (0.0, 2.0):
        direct = guided(
            class_labels=1,
            batch_size=12,
            guidance_scale=scale,
            num_inference_steps=4,
            generator=torch.Generator().manual_seed(2),
            output_type="latent",
        ).images
        torch.testing.assert_close(result["classifier_guidance"][scale], direct)
    for scale in (1.0, 3.0, 5.0):
        direct = free(
            class_labels=1,
            batch_size=12,
            guidance_scale=scale,
            num_inference_steps=4,
            generator=torch.Generator().manual_seed(2),
            output_type="latent",
        ).images
        torch.testing.assert_close(result["classifier_free_guidance"][scale], direct)
    with pytest.raises(ValueError, match="classifier_pipeline"):
        plotting.plot_guidance(tmp_path / "f5.png", 1)


def test_denoising_grid_from_a_saved_tiny_unet_pipeline(tmp_path, single_thread):
    """Figure 6 on an untrained tiny UNet2DModel, loaded from its saved folder."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    )
    HVAEPipeline(unet=unet, scheduler=toy_scheduler("sample")).save_pretrained(tmp_path / "pipe")
    result = plotting.plot_denoising_grid(
        str(tmp_path / "pipe"), tmp_path / "f6.png", num_inference_steps=5, num_shown=3, batch_size=2, seed=1
    )
    assert_png(tmp_path / "f6.png")
    assert result["samples"].shape == result["predicted_original_samples"].shape == (3, 2, 1, 8, 8)
    assert result["timesteps"].tolist() == [8, 4, 0]
    assert torch.equal(result["samples"][0], torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
    pipeline = HVAEPipeline.from_pretrained(tmp_path / "pipe")
    pipeline.set_progress_bar_config(disable=True)
    direct = pipeline(
        batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(1), output_type="latent"
    ).images
    torch.testing.assert_close(result["final"], direct)
    scheduler = pipeline.scheduler
    for t, sample, predicted in zip(result["timesteps"], result["samples"], result["predicted_original_samples"]):
        with torch.no_grad():
            output = pipeline.unet(sample, t).sample
        expected = convert_prediction(output, sample, float(scheduler.alphas_cumprod[int(t)]), "sample", "sample")
        torch.testing.assert_close(predicted, expected)


def test_bad_input(tmp_path, mixture):
    with pytest.raises(ValueError, match="path"):
        plotting.plot_forward_process(torch.zeros(4, 2), tmp_path / "f1.jpg", toy_scheduler(), timesteps=(0,))
    with pytest.raises(ValueError, match="original_samples"):
        plotting.plot_forward_process(torch.zeros(4, 3), tmp_path / "f1.png", toy_scheduler())
    with pytest.raises(ValueError, match="timesteps"):
        plotting.plot_forward_process(torch.zeros(4, 2), tmp_path / "f1.png", toy_scheduler(), timesteps=(10,))
    with pytest.raises(ValueError, match="grid_size"):
        plotting.plot_score_field(mixture, tmp_path / "f3.png", toy_scheduler(), grid_size=1, timesteps=(1,))
    with pytest.raises(ValueError, match="models"):
        plotting.plot_elbo_terms({}, torch.zeros(4, 2), tmp_path / "f4.png")
    with pytest.raises(ValueError, match="does not exist"):
        plotting.plot_reverse_trajectories(str(tmp_path / "missing"), tmp_path / "f2.png")


def test_image_panels_tile_with_the_one_image_grid():
    """Figures draw image samples with ``training.evaluation.image_grid``: a near-square grid, white padding."""
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid = plotting._tile_images(images)
    assert grid.shape == (2 * 9 + 1, 3 * 9 + 1)  # 3 columns, 2 rows of 8x8 cells and 1-pixel padding
    for index in range(5):
        row, column = divmod(index, 3)
        cell = grid[1 + 9 * row : 9 + 9 * row, 1 + 9 * column : 9 + 9 * column]
        np.testing.assert_allclose(cell, ((images[index, 0] + 1) / 2).numpy(), atol=0.5 / 255 + 1e-6)
    assert grid[0].min() == 1.0 and grid[:, 0].min() == 1.0
