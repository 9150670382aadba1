"""Unit tests of the training package: data, losses, the loop (resume, checkpoints, faults), components, evaluation."""

import math
import os

import numpy as np
import pytest
import torch

from hvae_diffusion import HVAEScheduler
from hvae_diffusion.elbo import denoising_matching_kl, discretized_gaussian_log_likelihood
from hvae_diffusion.forward_process import broadcast_to
from hvae_diffusion.models import MLPDenoiser
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
    read_training_state,
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


def run(tmp_path, name, loss_fn=None, sample_fn=None, evaluate_fn=None, **overrides):
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
        sample_fn=sample_fn,
        evaluate_fn=evaluate_fn,
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
    assert resumed.losses == uninterrupted.losses  # the history before checkpoint-3 comes with it
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

    with pytest.raises(NonFiniteLossError) as error:
        run(tmp_path, "nan", loss_fn=exploding_loss)
    assert [step for step, _ in list_checkpoints(str(tmp_path / "nan"))] == [3]
    assert os.path.isfile(tmp_path / "nan" / "checkpoint-3" / "model" / "diffusion_pytorch_model.safetensors")
    # what is known, not a verdict: the step, the last losses, the weight norms now and at each checkpoint
    message = str(error.value)
    assert "the loss is nan at step 5" in message and "good" not in message
    saved_max = read_training_state(str(tmp_path / "nan" / "checkpoint-3"))["max_abs_weight"]
    assert f"checkpoint-3 (max|w| = {saved_max:.3g})" in message and "largest |weight| now is" in message
    assert message.count(", ", message.index("Losses of the last steps: ["), message.index("]")) == 3


def test_checkpoints_are_diffusers_format_without_pickles(tmp_path):
    """The model and its EMA load with from_pretrained; no pickled custom state is written or read."""
    result, final, _ = run(tmp_path, "fmt", max_train_steps=3)
    checkpoint = tmp_path / "fmt" / "checkpoint-3"
    assert not list(checkpoint.glob("custom_checkpoint_*")) and not (checkpoint / "model.safetensors").exists()
    ema = MLPDenoiser.from_pretrained(checkpoint / "model_ema")
    for key, value in ema.state_dict().items():
        assert torch.equal(value, final[key]), key  # the saved pipeline holds the EMA weights
    model = MLPDenoiser.from_pretrained(checkpoint / "model")
    assert any(not torch.equal(model.state_dict()[key], final[key]) for key in final)  # raw weights differ from EMA
    resumed, _, _ = run(tmp_path, "fmt", max_train_steps=4, resume_from_checkpoint="latest")
    assert resumed.resumed_from.endswith("checkpoint-3") and resumed.global_step == 4
    # a planted pickle (where the EMA state used to be) never runs on resume
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save(Payload(), tmp_path / "fmt" / "checkpoint-3" / "custom_checkpoint_0.pkl")
    try:
        run(tmp_path, "fmt", max_train_steps=4, resume_from_checkpoint=str(tmp_path / "fmt" / "checkpoint-3"))
    except RuntimeError:  # accelerate refuses a custom state nothing was registered for
        pass
    assert not marker.exists()


def test_resume_skips_truncated_and_empty_checkpoints_and_says_so(tmp_path, capsys):
    run(tmp_path, "cut", max_train_steps=9, checkpoints_total_limit=None)
    weights = tmp_path / "cut" / "checkpoint-9" / "model" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    (tmp_path / "cut" / "checkpoint-12").mkdir()  # emptied
    assert [step for step, _ in list_checkpoints(str(tmp_path / "cut"))] == [3, 6]
    with pytest.raises(ValueError, match="checkpoint-9'.*unusable checkpoint.*diffusion_pytorch_model"):
        resolve_checkpoint(str(tmp_path / "cut"), "checkpoint-9")
    capsys.readouterr()
    resumed, _, _ = run(tmp_path, "cut", max_train_steps=9, resume_from_checkpoint="latest")
    out = capsys.readouterr().out
    assert resumed.resumed_from.endswith("checkpoint-6") and resumed.global_step == 9
    assert "skipping the checkpoint" in out and "checkpoint-9" in out and "checkpoint-12" in out


def test_resume_refuses_a_later_checkpoint_or_another_learning_rate_before_any_work(tmp_path):
    run(tmp_path, "done", max_train_steps=6)
    before = sorted(os.listdir(tmp_path / "done"))
    with pytest.raises(ValueError, match="checkpoint-6 is at step 6, past --max_train_steps=4"):
        run(tmp_path, "done", max_train_steps=4, resume_from_checkpoint="latest")
    with pytest.raises(ValueError, match="--learning_rate=0.001 differs from the 0.01"):
        run(tmp_path, "done", max_train_steps=8, learning_rate=1e-3, resume_from_checkpoint="latest")
    assert sorted(os.listdir(tmp_path / "done")) == before


def test_resuming_a_finished_run_reports_its_real_final_loss(tmp_path):
    """A run killed while saving after its last checkpoint: the resumed run keeps the loss history."""
    whole, reference, _ = run(tmp_path, "whole", max_train_steps=6)
    run(tmp_path, "killed", max_train_steps=6)
    resumed, final, _ = run(tmp_path, "killed", max_train_steps=6, resume_from_checkpoint="latest")
    assert resumed.global_step == 6 and resumed.losses == whole.losses
    assert math.isfinite(resumed.final_loss) and resumed.final_loss == whole.final_loss
    for key in reference:
        assert torch.equal(reference[key], final[key]), key


def test_weights_are_saved_before_a_failing_sample_grid(tmp_path):
    order = []

    def failing_sample_fn(model, step):
        order.append("sample")
        raise RuntimeError("sampling failed")

    with pytest.raises(RuntimeError, match="sampling failed"):
        run(tmp_path, "late", max_train_steps=2, sample_fn=failing_sample_fn, checkpointing_steps=None)
    # run() returns nothing on failure; the loop called save_fn (a state_dict copy) before sampling
    config = TrainingConfig(output_dir=str(tmp_path / "late2"), train_batch_size=16, max_train_steps=2)
    saved = []
    with pytest.raises(RuntimeError, match="sampling failed"):
        train(
            config,
            tiny_mlp(),
            DiffusionLoss(HVAEScheduler(num_train_timesteps=100)),
            vector_data(),
            save_fn=lambda m, d: saved.append(d),
            sample_fn=failing_sample_fn,
        )
    assert saved == [str(tmp_path / "late2")]
    result, _, _ = run(tmp_path, "metrics", max_train_steps=2, evaluate_fn=lambda model: {"score": 1.5})
    assert result.metrics == {"score": 1.5}


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


def test_frechet_distance_matches_the_closed_form():
    generator = np.random.default_rng(0)
    a = generator.normal(size=(20000, 2)) * [1.0, 2.0]
    b = generator.normal(size=(20000, 2)) * [2.0, 1.0] + [1.0, 0.0]
    # diagonal covariances: ‖Δμ‖² + Σ (σa − σb)²
    assert frechet_distance(a, b) == pytest.approx(1.0 + 1.0 + 1.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_elbo_report_sums_its_terms_and_carries_its_standard_error():
    scheduler = HVAEScheduler(num_train_timesteps=20)
    samples = (torch.randint(0, 256, (6, 1, 2, 2), generator=torch.Generator().manual_seed(0)).float() / 127.5) - 1
    denoiser = lambda x, t: torch.zeros_like(x)  # noqa: E731
    report = elbo_report(scheduler, denoiser, samples, "full", generator=torch.Generator().manual_seed(0))
    assert (
        report["num_function_evaluations_per_image"] == 20 and len(report["denoising_by_timestep"]["timesteps"]) == 19
    )
    parts = report["reconstruction"] + report["prior_matching"] + report["denoising_matching"]
    assert report["bits_per_dim"] == pytest.approx(parts, rel=1e-5)
    assert f"{report['bits_per_dim']:.3f} ± {report['standard_error']:.3f} bits/dim" in report["summary"]
    subset = elbo_report(scheduler, denoiser, samples, "uniform", 6, generator=torch.Generator().manual_seed(0))
    assert subset["num_function_evaluations_per_image"] == 6 and subset["standard_error"] > 0


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


def test_sample_grids_and_evaluation_numbers_reach_the_trackers(tmp_path):
    pytest.importorskip("tensorboard")
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(
        tmp_path,
        "tracked",
        max_train_steps=2,
        checkpointing_steps=None,
        report_to="tensorboard",
        sample_fn=lambda model, step: Image.new("L", (4, 4), color=step),
        evaluate_fn=lambda model: {"test_bits_per_dim": 1.5},
    )
    logs = tmp_path / "tracked" / "logs"
    events = EventAccumulator(str(next(path.parent for path in logs.rglob("events.out.tfevents.*")))).Reload()
    assert "samples" in events.Tags()["images"]
    assert [event.value for event in events.Scalars("test_bits_per_dim")] == [1.5]
