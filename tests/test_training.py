"""Unit tests of the training package: data, losses, the loop (resume, checkpoints, faults), components, evaluation."""

import math
import os

import numpy as np
import pytest
import torch

from hvae_diffusion import HVAEScheduler
from hvae_diffusion.elbo import denoising_matching_kl, discretized_gaussian_log_likelihood, elbo_terms
from hvae_diffusion.forward_process import broadcast_to
from hvae_diffusion.models import MLPDenoiser
from hvae_diffusion.training.components import default_unet_config, unconditional_unet
from hvae_diffusion.training.data import (
    image_dataset_to_tensors,
    load_digits_dataset,
    load_image_dataset,
    tensor_to_uint8,
)
from hvae_diffusion.training.evaluation import elbo_report, frechet_distance
from hvae_diffusion.training.loop import (
    GlobalBatchSampler,
    NonFiniteLossError,
    TrainingConfig,
    list_checkpoints,
    resolve_checkpoint,
    train,
)
from hvae_diffusion.training.losses import BatchRandomness, DiffusionLoss, NoisyClassifierLoss, drop_conditions

# ------------------------------------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def test_digits_split_is_fixed_disjoint_and_stratified(digits):
    assert (len(digits["train"]), len(digits["test"])) == (1500, 297)
    again = load_digits_dataset()
    assert digits["test"]["label"] == again["test"]["label"]
    assert np.array_equal(np.asarray(digits["test"][0]["image"]), np.asarray(again["test"][0]["image"]))
    counts = np.bincount(digits["test"]["label"], minlength=10)
    assert counts.min() >= 28 and counts.max() <= 31
    train_pixels = {np.asarray(image).tobytes() for image in digits["train"]["image"]}
    overlap = sum(np.asarray(image).tobytes() in train_pixels for image in digits["test"]["image"])
    assert overlap <= 3  # a handful of digits are pixel-identical duplicates in the original data, nothing more


def test_image_tensors_round_trip_in_range(digits):
    dataset = image_dataset_to_tensors(digits["test"], label_column="label", num_classes=10)
    item = dataset[0]
    assert item["sample"].shape == (1, 8, 8) and item["sample"].dtype == torch.float32
    assert (
        item["sample"].min() >= -1 and item["sample"].max() <= 1 and item["class_labels"] == digits["test"][0]["label"]
    )
    back = tensor_to_uint8(item["sample"][None])[0, :, :, 0]
    assert np.array_equal(back, np.asarray(digits["test"][0]["image"]))
    assert image_dataset_to_tensors(digits["test"], resolution=16)[0]["sample"].shape == (1, 16, 16)


def test_data_errors_name_the_argument(digits, tmp_path):
    with pytest.raises(ValueError, match="--image_column='img'"):
        image_dataset_to_tensors(digits["train"], image_column="img")
    with pytest.raises(ValueError, match="--label_column='y'"):
        image_dataset_to_tensors(digits["train"], label_column="y")
    with pytest.raises(ValueError, match=r"--label_column='label' has labels \[5, 6, 7, 8, 9\] outside \[0, 5\)"):
        image_dataset_to_tensors(digits["train"], label_column="label", num_classes=5)
    with pytest.raises(ValueError, match="--train_data_dir"):
        load_image_dataset(train_data_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--dataset_name: cannot load"):
        load_image_dataset(dataset_name=str(tmp_path / "no_such_dataset"))
    from PIL import Image

    for index, mode in enumerate(["L", "RGB", "L", "RGB", "L", "L"]):
        folder = tmp_path / "images" / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new(mode, (8, 8)).save(folder / f"{index}.png")
    splits = load_image_dataset(train_data_dir=str(tmp_path / "images"))
    with pytest.raises(ValueError, match="mixed channel counts"):
        image_dataset_to_tensors(splits["train"])


# ------------------------------------------------------------------------------------------------ losses


def test_batch_randomness_is_split_invariant():
    whole = BatchRandomness(torch.Generator().manual_seed(3))
    halves = [BatchRandomness(torch.Generator().manual_seed(3), 2, rank) for rank in range(2)]
    for draw in [lambda r, n: r.randint(1000, n), lambda r, n: r.randn((n, 2, 3)), lambda r, n: r.rand(n)]:
        assert torch.equal(draw(whole, 8), torch.cat([draw(half, 4) for half in halves]))


def test_condition_dropout_uses_the_null_label():
    labels = torch.arange(10).repeat(400)
    dropped = drop_conditions(labels, 10, 0.25, BatchRandomness(torch.Generator().manual_seed(0)))
    replaced = dropped != labels
    assert torch.all(dropped[replaced] == 10) and abs(replaced.float().mean().item() - 0.25) < 0.03
    assert drop_conditions(labels, 10, 0.0, None) is labels


class FixedOutput(torch.nn.Module):
    """A 'model' whose output is a parameter: the loss's gradient with respect to the output is then visible."""

    def __init__(self, shape):
        super().__init__()
        self.output = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)))

    def forward(self, sample, timestep, class_labels=None):
        return self.output


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction", "score"])
def test_elbo_weighted_loss_is_the_denoising_kl(prediction_type):
    """With weighting "elbo" the loss is the KL of the sampled latent (the reconstruction at t = 0) per dimension."""
    scheduler = HVAEScheduler(num_train_timesteps=50, prediction_type=prediction_type)
    samples = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model = FixedOutput(samples.shape)
    loss_fn = DiffusionLoss(scheduler, weighting="elbo")
    randomness = torch.Generator().manual_seed(5)
    loss, _ = loss_fn(model, {"sample": samples}, randomness)

    replay = BatchRandomness(torch.Generator().manual_seed(5))
    timesteps, noise = replay.randint(50, 6), replay.randn(samples.shape)  # the loss's draw order: t, then ε
    sample = scheduler.add_noise(samples, noise, timesteps)
    mean, log_variance, _ = scheduler.predicted_mean_log_variance(model.output.detach(), sample, timesteps)
    true_mean, true_variance = scheduler.posterior_mean_variance(samples, sample, timesteps)
    log_variance = broadcast_to(log_variance.float(), sample)
    kl = denoising_matching_kl(
        true_mean, broadcast_to(true_variance.clamp(min=1e-30).log().float(), sample), mean, log_variance
    )
    # at t = 0 the ELBO weight is the Gaussian reconstruction's ‖x̂0 − x0‖² / 2σ², the same quadratic in the output
    decoder = 0.5 * ((mean - samples) ** 2 * torch.exp(-log_variance)).flatten(1).sum(1)
    expected = torch.where(timesteps == 0, decoder, kl) / 16
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-4)


def test_hybrid_loss_trains_variance_only_through_the_elbo():
    scheduler = HVAEScheduler(num_train_timesteps=50, variance_type="learned_range")
    samples = torch.rand(5, 2, 3, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model = FixedOutput((5, 4, 3, 3))
    loss_fn = DiffusionLoss(scheduler, weighting="simple")
    loss, parts = loss_fn(model, {"sample": samples}, torch.Generator().manual_seed(2))
    assert set(parts) == {"denoising_loss", "vlb_loss"}
    gradient = torch.autograd.grad(loss, model.output)[0]
    # the mean channels see only the MSE (the ELBO term has the mean detached): without it their gradient is the same
    loss_fn_no_vlb = DiffusionLoss(scheduler, weighting="simple", vlb_weight=0.0)
    loss_no_vlb, _ = loss_fn_no_vlb(model, {"sample": samples}, torch.Generator().manual_seed(2))
    gradient_no_vlb = torch.autograd.grad(loss_no_vlb, model.output)[0]
    assert torch.equal(gradient[:, :2], gradient_no_vlb[:, :2])
    assert torch.all(gradient_no_vlb[:, 2:] == 0) and gradient[:, 2:].abs().sum() > 0
    with pytest.raises(ValueError, match="--loss_weighting"):
        DiffusionLoss(scheduler, weighting="uniform")
    with pytest.raises(ValueError, match="--cond_drop_prob"):
        DiffusionLoss(scheduler, cond_drop_prob=1.5, null_label=3)


def test_vlb_term_at_first_latent_is_the_discretized_decoder():
    from hvae_diffusion.training.losses import variational_bound_term

    scheduler = HVAEScheduler(num_train_timesteps=20, variance_type="learned_range")
    samples = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    output = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    timesteps = torch.zeros(3, dtype=torch.long)
    sample = scheduler.add_noise(samples, torch.randn(samples.shape), timesteps)
    mean, log_variance, _ = scheduler.predicted_mean_log_variance(output, sample, timesteps)
    expected = -discretized_gaussian_log_likelihood(samples, mean, 0.5 * log_variance) / (4 * math.log(2))
    assert torch.allclose(variational_bound_term(scheduler, output, samples, sample, timesteps), expected)


# ------------------------------------------------------------------------------------------------ the loop


def vector_data(count=96, dim=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (count,), generator=generator)
    samples = torch.randn(count, dim, generator=generator) * 0.3 + labels[:, None].float() - 1
    return torch.utils.data.TensorDataset(samples, labels)


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return MLPDenoiser(in_channels=2, hidden_dim=16, num_blocks=1, num_class_embeds=4)


def run(tmp_path, name, loss_fn=None, **overrides):
    settings = dict(
        output_dir=str(tmp_path / name),
        train_batch_size=16,
        max_train_steps=8,
        learning_rate=1e-2,
        lr_warmup_steps=2,
        checkpointing_steps=3,
        report_to=None,
        use_ema=True,
        ema_max_decay=0.9,
        seed=7,
    )
    settings.update(overrides)
    model = tiny_mlp()
    scheduler = HVAEScheduler(num_train_timesteps=100)
    loss_fn = loss_fn or DiffusionLoss(scheduler, cond_drop_prob=0.2, null_label=3)
    saved = {}
    result = train(
        TrainingConfig(**settings),
        model,
        loss_fn,
        vector_data(),
        save_fn=lambda m, d: saved.update(state={k: v.clone() for k, v in m.state_dict().items()}),
    )
    return result, saved.get("state"), model


class Interrupt(Exception):
    pass


def test_killed_and_resumed_run_ends_with_identical_weights(tmp_path):
    """8 steps with checkpoints every 3, killed during step 5 (after checkpoint-3), resumed: same final weights."""
    uninterrupted, reference, _ = run(tmp_path, "whole", gradient_accumulation_steps=2)
    scheduler = HVAEScheduler(num_train_timesteps=100)
    inner = DiffusionLoss(scheduler, cond_drop_prob=0.2, null_label=3)
    calls = {"count": 0}

    def dying_loss(model, batch, randomness, encode_prompt=None):
        calls["count"] += 1
        if calls["count"] == 10:  # micro-batch 10 = step 5 with 2 accumulation steps
            raise Interrupt
        return inner(model, batch, randomness)

    with pytest.raises(Interrupt):
        run(tmp_path, "resumed", loss_fn=dying_loss, gradient_accumulation_steps=2)
    assert [step for step, _ in list_checkpoints(str(tmp_path / "resumed"))] == [3]
    (tmp_path / "resumed" / "checkpoint-6.tmp").mkdir()  # a checkpoint cut off mid-write is never picked
    resumed, final, _ = run(tmp_path, "resumed", resume_from_checkpoint="latest", gradient_accumulation_steps=2)
    assert resumed.resumed_from.endswith("checkpoint-3") and resumed.global_step == 8
    assert resumed.losses == uninterrupted.losses[3:]
    for key in reference:
        assert torch.equal(reference[key], final[key]), key


def test_checkpoint_limit_and_resume_errors(tmp_path):
    run(tmp_path, "limited", max_train_steps=9, checkpoints_total_limit=2, use_ema=False)
    assert [step for step, _ in list_checkpoints(str(tmp_path / "limited"))] == [6, 9]
    with pytest.raises(ValueError, match="--resume_from_checkpoint='checkpoint-4'.*checkpoint-6"):
        resolve_checkpoint(str(tmp_path / "limited"), "checkpoint-4")
    assert resolve_checkpoint(str(tmp_path / "empty"), "latest") is None
    with pytest.raises(ValueError, match="--resume_from_checkpoint"):
        run(tmp_path, "missing", resume_from_checkpoint=str(tmp_path / "nowhere" / "checkpoint-3"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    scheduler = HVAEScheduler(num_train_timesteps=100)
    inner = DiffusionLoss(scheduler)
    calls = {"count": 0}

    def exploding_loss(model, batch, randomness, encode_prompt=None):
        calls["count"] += 1
        loss, parts = inner(model, batch, randomness)
        return (loss * float("nan") if calls["count"] == 5 else loss), parts

    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at step 5.*checkpoint-3"):
        run(tmp_path, "nan", loss_fn=exploding_loss)
    assert [step for step, _ in list_checkpoints(str(tmp_path / "nan"))] == [3]
    assert os.path.isfile(tmp_path / "nan" / "checkpoint-3" / "model.safetensors")


def test_global_batches_do_not_depend_on_the_process_count():
    one = list(GlobalBatchSampler(50, 8, 1, 0, seed=1, epoch=2))
    two = [list(GlobalBatchSampler(50, 4, 2, rank, seed=1, epoch=2)) for rank in range(2)]
    assert len(one) == 6 and [a + b for a, b in zip(*two)] == one
    skipped = list(GlobalBatchSampler(50, 8, 1, 0, seed=1, epoch=2, skip_batches=4))
    assert skipped == one[4:]


def test_noisy_classifier_loss_learns_on_vectors(tmp_path):
    """The classifier objective through the same loop: a tiny classifier of 2-D data beats chance."""

    class VectorClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 3))

        def forward(self, sample, timestep):
            return self.net(torch.cat([sample, timestep[:, None].float() / 100], dim=1))

    scheduler = HVAEScheduler(num_train_timesteps=100)
    model = VectorClassifier()
    result = train(
        TrainingConfig(
            output_dir=str(tmp_path / "cls"),
            train_batch_size=32,
            max_train_steps=60,
            learning_rate=1e-2,
            checkpointing_steps=None,
            report_to=None,
        ),
        model,
        NoisyClassifierLoss(scheduler),
        vector_data(192),
    )
    assert np.mean(result.losses[-10:]) < 0.8 * math.log(3)


# ------------------------------------------------------------------------------------------------ components and evaluation


def test_unconditional_unet_is_the_null_label_model():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    config = default_unet_config(resolution=8, channels=1, num_class_embeds=4)
    unet = UNet2DModel.from_config(config).eval()
    with torch.no_grad():
        unet.class_embedding.weight.normal_()
    sample, timesteps = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999])
    folded = unconditional_unet(unet, null_label=3).eval()
    assert folded.config.num_class_embeds is None
    with torch.no_grad():
        expected = unet(sample, timesteps, class_labels=torch.full((3,), 3)).sample
        assert torch.allclose(folded(sample, timesteps).sample, expected, atol=1e-5)
        assert not torch.allclose(
            folded(sample, timesteps).sample,
            unet(sample, timesteps, class_labels=torch.zeros(3, dtype=torch.long)).sample,
            atol=1e-3,
        )


def test_frechet_distance_matches_the_closed_form():
    generator = np.random.default_rng(0)
    a = generator.normal(size=(20000, 2)) * [1.0, 2.0]
    b = generator.normal(size=(20000, 2)) * [2.0, 1.0] + [1.0, 0.0]
    # diagonal covariances: ‖Δμ‖² + Σ (σa − σb)²
    assert frechet_distance(a, b) == pytest.approx(1.0 + 1.0 + 1.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_elbo_report_agrees_with_elbo_terms():
    scheduler = HVAEScheduler(num_train_timesteps=20)
    samples = (torch.randint(0, 256, (6, 1, 2, 2), generator=torch.Generator().manual_seed(0)).float() / 127.5) - 1
    denoiser = lambda x, t: torch.zeros_like(x)  # noqa: E731
    report = elbo_report(scheduler, denoiser, samples, batch_size=3, generator=torch.Generator().manual_seed(0))
    terms = elbo_terms(scheduler, denoiser, samples[:3], generator=torch.Generator().manual_seed(0))
    first_batch = float(terms.bits_per_dim.mean())
    assert report["num_timesteps_evaluated"] == 19 and len(report["denoising_by_timestep"]["timesteps"]) == 19
    parts = report["reconstruction"] + report["prior_matching"] + report["denoising_matching"]
    assert report["bits_per_dim"] == pytest.approx(parts, rel=1e-5)
    assert report["standard_error"] is not None and math.isfinite(first_batch)
    subset = elbo_report(
        scheduler, denoiser, samples, batch_size=3, num_timesteps=5, generator=torch.Generator().manual_seed(0)
    )
    assert subset["num_timesteps_evaluated"] == 5 and subset["standard_error"] > 0


def test_preloaded_split_gives_the_items_decoding_gives(monkeypatch):
    """A split small enough is decoded once up front; its items must equal decoding each one, labels included."""
    from hvae_diffusion.training import data

    split = data.load_digits_dataset()["train"].select(range(40))
    preloaded = data.image_dataset_to_tensors(split, "image", label_column="label")
    monkeypatch.setattr(data, "PRELOAD_MAX_BYTES", 0)
    decoded_each_time = data.image_dataset_to_tensors(split, "image", label_column="label")
    assert preloaded._samples is not None and decoded_each_time._samples is None
    for index in (0, 17, 39):
        assert preloaded[index]["class_labels"] == decoded_each_time[index]["class_labels"] == split[index]["label"]
        torch.testing.assert_close(preloaded[index]["sample"], decoded_each_time[index]["sample"], rtol=0, atol=0)
    preloaded.label_column = None  # what scripts/train.py does for unconditional models
    assert set(preloaded[0]) == {"sample"}
