"""The 2-D toy: the MLP denoiser and classifier behave like Diffusers models, the toy data sets are right, and the
toy models train through the package's own training loop (the loop of scripts/train.py) toward the exact oracle."""

import os

import pytest
import torch
from diffusers.models.unets.unet_2d import UNet2DOutput

from hvae_diffusion import ClassifierFreeGuidancePipeline, HVAEPipeline, HVAEScheduler, MLPDenoiser, MLPNoisyClassifier
from hvae_diffusion.testing import ExactMixtureDenoiser
from hvae_diffusion.toy_data import TOY_DATASETS, ToyDataset, make_toy_dataset, make_toy_samples, toy_gaussian_mixture
from hvae_diffusion.training import DiffusionLoss, NoisyClassifierLoss, TrainingConfig, train


def tiny_mlp(**kwargs):
    torch.manual_seed(0)
    return MLPDenoiser(in_channels=2, hidden_dim=32, num_blocks=2, **kwargs)


# ------------------------------------------------------------------------------------------------ the MLP models


def test_mlp_denoiser_is_called_like_a_unet(generator):
    model = tiny_mlp()
    sample = torch.randn(5, 2, generator=generator)
    output = model(sample, 7)
    assert isinstance(output, UNet2DOutput) and output.sample.shape == (5, 2)
    assert model.config.sample_size is None and model.config.in_channels == 2
    (as_tuple,) = model(sample, 7, return_dict=False)
    torch.testing.assert_close(as_tuple, output.sample)
    # a number, a 0-d tensor, a [1] tensor and a per-sample [B] tensor mean the same timestep
    for timestep in (torch.tensor(7), torch.tensor([7]), torch.full((5,), 7)):
        torch.testing.assert_close(model(sample, timestep).sample, output.sample)
    per_sample = model(sample, torch.tensor([0, 7, 100, 500, 999])).sample
    torch.testing.assert_close(per_sample[1], output.sample[1])
    assert not torch.allclose(per_sample[0], output.sample[0])


def test_class_labels_condition_the_mlp(generator):
    model = tiny_mlp(num_class_embeds=4)
    sample = torch.randn(4, 2, generator=generator)
    with torch.no_grad():
        model.class_embedding.weight.normal_()
    outputs = [model(sample, 3, class_labels=torch.full((4,), label)).sample for label in range(4)]
    assert not torch.allclose(outputs[0], outputs[3])
    torch.testing.assert_close(
        model(sample, 3, class_labels=torch.tensor([0, 1, 2, 3])).sample.diagonal(),
        torch.stack([o for o in outputs]).diagonal(dim1=0, dim2=1).diagonal(),
    )


@pytest.mark.parametrize(
    "kwargs, call, match",
    [
        ({}, {"sample": torch.zeros(3, 3)}, "in_channels"),
        ({}, {"sample": torch.zeros(3, 2, 1)}, "in_channels"),
        ({}, {"class_labels": torch.zeros(3, dtype=torch.long)}, "unconditional"),
        ({"num_class_embeds": 3}, {}, "class_labels must be given"),
        ({"num_class_embeds": 3}, {"class_labels": torch.tensor([0, 1, 3])}, "num_class_embeds"),
        ({"num_class_embeds": 3}, {"class_labels": torch.tensor([0, 1])}, "class_labels"),
        ({}, {"timestep": torch.zeros(2)}, "timestep"),
    ],
)
def test_bad_mlp_input(kwargs, call, match):
    model = tiny_mlp(**kwargs)
    arguments = {"sample": torch.zeros(3, 2), "timestep": 1, **call}
    with pytest.raises(ValueError, match=match):
        model(**arguments)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sample_size": 8}, "sample_size"),
        ({"in_channels": 0}, "in_channels"),
        ({"num_class_embeds": 0}, "num_class"),
        ({"out_channels": -1}, "out_channels"),
        ({"hidden_dim": 1.5}, "hidden_dim"),
    ],
)
def test_bad_mlp_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLPDenoiser(**kwargs)


def test_save_load_round_trip_and_learned_variance(tmp_path, generator):
    model = tiny_mlp(out_channels=4, num_class_embeds=3)
    model.save_pretrained(tmp_path / "mlp")
    loaded = MLPDenoiser.from_pretrained(tmp_path / "mlp")
    sample, labels = torch.randn(6, 2, generator=generator), torch.tensor([0, 1, 2, 0, 1, 2])
    output = model(sample, 5, class_labels=labels).sample
    assert output.shape == (6, 4)  # the prediction, then the variance channels of "learned_range"
    torch.testing.assert_close(loaded(sample, 5, class_labels=labels).sample, output)
    scheduler = HVAEScheduler(num_train_timesteps=10, variance_type="learned_range", clip_sample=False)
    scheduler.set_timesteps(10)
    assert scheduler.step(output, 5, sample, generator=generator).prev_sample.shape == (6, 2)


def test_mlp_noisy_classifier(generator):
    torch.manual_seed(0)
    classifier = MLPNoisyClassifier(in_channels=2, num_classes=3, hidden_dim=16, num_blocks=1)
    sample = torch.randn(4, 2, generator=generator, requires_grad=True)
    logits = classifier(sample, torch.tensor([1, 2, 3, 4])).logits
    assert logits.shape == (4, 3) and classifier.config.num_classes == 3
    (gradient,) = torch.autograd.grad(logits[:, 0].sum(), sample)
    assert gradient.abs().sum() > 0
    with pytest.raises(ValueError, match="in_channels"):
        classifier(torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match="sample_size"):
        MLPNoisyClassifier(sample_size=4)


# ------------------------------------------------------------------------------------------------ toy data


def test_toy_datasets():
    for name in TOY_DATASETS:
        samples, labels = make_toy_samples(name, 300, seed=1)
        assert samples.shape == (300, 2) and samples.dtype == torch.float32 and labels.shape == (300,)
        assert torch.isfinite(samples).all()
        if name != "gaussian_mixture":  # standardized: zero mean, unit std over both coordinates
            torch.testing.assert_close(samples.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
            assert samples.std().item() == pytest.approx(1.0, abs=1e-4)
    assert set(make_toy_samples("moons", 100)[1].tolist()) == {0, 1}
    assert set(make_toy_samples("blobs", 100)[1].tolist()) == {0, 1, 2}
    assert torch.equal(make_toy_samples("moons", 50, seed=3)[0], make_toy_samples("moons", 50, seed=3)[0])
    with pytest.raises(ValueError, match="name"):
        make_toy_samples("circles", 10)
    with pytest.raises(ValueError, match="num_samples"):
        make_toy_samples("moons", 0)


def test_toy_dataset_items_are_what_the_training_loop_takes():
    unlabelled = make_toy_dataset("blobs", 30)
    assert set(unlabelled[0]) == {"sample"} and unlabelled[0]["sample"].shape == (2,) and len(unlabelled) == 30
    labelled = make_toy_dataset("blobs", 30, with_labels=True)
    assert set(labelled[0]) == {"sample", "class_labels"} and labelled.num_classes == 3
    assert isinstance(labelled[0]["class_labels"], int)
    with pytest.raises(ValueError, match="labels"):
        ToyDataset(torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="samples"):
        ToyDataset(torch.zeros(3))


def test_mixture_data_is_the_oracles_mixture():
    mixture = toy_gaussian_mixture()
    samples, labels = make_toy_samples("gaussian_mixture", 64, seed=5)
    expected, expected_labels = mixture.sample(64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(samples, expected.float())
    assert torch.equal(labels, expected_labels)
    assert mixture.num_classes == 3 and mixture.means.norm(dim=1).allclose(torch.full((6,), 1.5, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ training


def epsilon_error(model, scheduler, exact, generator):
    """Mean ‖ε̂ − ε*‖² of a model against the exact denoiser, over x_t ~ q(x_t) at t ~ U{0..T−1}."""
    x0, _ = toy_gaussian_mixture().sample(512, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (512,), generator=generator)
    sample = scheduler.add_noise(x0.float(), torch.randn(512, 2, generator=generator), timesteps)
    with torch.no_grad():
        learned = scheduler.convert_model_output(model(sample, timesteps).sample, sample, timesteps, "epsilon")
        optimal = exact(sample, timesteps).sample
    return float(((learned - optimal) ** 2).sum(1).mean())


def training_config(tmp_path, name, steps=150):
    return TrainingConfig(
        output_dir=str(tmp_path / name),
        train_batch_size=128,
        max_train_steps=steps,
        learning_rate=3e-3,
        checkpointing_steps=None,
        report_to=None,
        seed=0,
    )


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "score"])
def test_each_objective_trains_through_the_package_loop(tmp_path, prediction_type, single_thread):
    """x0, ε and score models train with ``training.train`` + ``DiffusionLoss`` and move toward the exact ε*."""
    scheduler = HVAEScheduler(
        num_train_timesteps=100, clip_sample=False, beta_end=0.2, prediction_type=prediction_type
    )
    mixture = toy_gaussian_mixture()
    exact = ExactMixtureDenoiser(
        mixture.means,
        mixture.stds,
        component_labels=mixture.component_labels.tolist(),
        alphas_cumprod=scheduler.alphas_cumprod,
        prediction_type="epsilon",
    )
    model = tiny_mlp()
    before = epsilon_error(model, scheduler, exact, torch.Generator().manual_seed(1))
    result = train(
        training_config(tmp_path, prediction_type),
        model,
        DiffusionLoss(scheduler),
        make_toy_dataset("gaussian_mixture", 1024),
    )
    after = epsilon_error(model.eval(), scheduler, exact, torch.Generator().manual_seed(1))
    assert result.global_step == 150
    assert after < 0.5 * before, (before, after)


def test_conditional_mlp_trains_for_classifier_free_guidance(tmp_path, single_thread):
    """A class-conditional MLP with condition dropout trains through the loop and samples with CFG."""
    scheduler = HVAEScheduler(num_train_timesteps=100, clip_sample=False, beta_end=0.2)
    mixture = toy_gaussian_mixture()
    model = tiny_mlp(num_class_embeds=mixture.num_classes + 1)
    loss = DiffusionLoss(scheduler, cond_drop_prob=0.2, null_label=mixture.num_classes)
    result = train(
        training_config(tmp_path, "cfg", steps=100),
        model,
        loss,
        make_toy_dataset("gaussian_mixture", 1024, with_labels=True),
    )
    assert result.losses[-1] < result.losses[0]
    pipeline = ClassifierFreeGuidancePipeline(unet=model.eval(), scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.config.null_class_label == mixture.num_classes
    samples = pipeline(
        class_labels=0,
        batch_size=64,
        guidance_scale=2.0,
        num_inference_steps=20,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert samples.shape == (64, 2) and torch.isfinite(samples).all()
    # sampling asked for class 0 lands mostly on class 0's modes under the exact class posterior
    share = (mixture.class_log_posterior(samples.double(), 1.0).argmax(1) == 0).double().mean()
    assert share > 0.5


def test_noisy_classifier_trains_through_the_package_loop(tmp_path, single_thread):
    """``MLPNoisyClassifier`` + ``NoisyClassifierLoss`` through the loop: at low noise it names the mixture's classes."""
    scheduler = HVAEScheduler(num_train_timesteps=100, clip_sample=False, beta_end=0.2)
    torch.manual_seed(0)
    classifier = MLPNoisyClassifier(in_channels=2, num_classes=3, hidden_dim=32, num_blocks=2)
    result = train(
        training_config(tmp_path, "classifier", steps=100),
        classifier,
        NoisyClassifierLoss(scheduler),
        make_toy_dataset("gaussian_mixture", 1024, with_labels=True),
    )
    assert result.global_step == 100
    x0, labels = toy_gaussian_mixture().sample(300, generator=torch.Generator().manual_seed(2))
    timesteps = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(3))
    sample = scheduler.add_noise(
        x0.float(), torch.randn(300, 2, generator=torch.Generator().manual_seed(4)), timesteps
    )
    with torch.no_grad():
        accuracy = (classifier.eval()(sample, timesteps).logits.argmax(1) == labels).double().mean()
    assert accuracy > 0.8


def test_toy2d_script_quick_run(tmp_path, single_thread):
    """hvae-toy2d end to end in its smoke-test mode: every toy figure is written and the pipelines are saved; a
    second run refuses to write over the first without --overwrite_output_dir, before any work."""
    from hvae_diffusion.commands import toy2d

    argv = ["--quick", "--output_dir", str(tmp_path / "figures"), "--work_dir", str(tmp_path / "work")]
    report = toy2d.main(argv)
    written = sorted(os.listdir(tmp_path / "figures"))
    assert written == sorted(
        [
            "1_forward_process.png",
            "2_reverse_gaussian_mixture.png",
            "2_reverse_moons.png",
            "2_reverse_swiss_roll.png",
            "3_score_field_x0.png",
            "3_score_field_epsilon.png",
            "3_score_field_score.png",
            "4_elbo_terms.png",
            "5_guidance_toy.png",
        ]
    )
    assert set(report["figures"]["4_elbo_terms"]) == {"x0", "epsilon", "score", "exact denoiser"}
    loaded = HVAEPipeline.from_pretrained(tmp_path / "work" / "mixture_epsilon")
    assert isinstance(loaded.unet, MLPDenoiser)
    before = {name: os.path.getmtime(tmp_path / "figures" / name) for name in written}
    with pytest.raises(ValueError, match="--output_dir=.*already holds files.*--overwrite_output_dir"):
        toy2d.main(argv)
    assert {name: os.path.getmtime(tmp_path / "figures" / name) for name in written} == before
