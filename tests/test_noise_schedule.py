"""The learned noise schedule: a monotone γη with learned endpoints, the schedulers built from it, its training
objective (endpoints tighten the bound, the shape follows the gradient of the estimate's second moment) and its
life as a pipeline component."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline
from test_pipelines import tiny_unet

from hvae_diffusion import HVAEPipeline, HVAEScheduler, LearnedNoiseSchedule
from hvae_diffusion.models.noise_schedule import betas_from_log_snr, schedule_times
from hvae_diffusion.testing import ExactMixtureDenoiser
from hvae_diffusion.training.losses import LearnedScheduleLoss


def perturbed_schedule(seed=0, scale=3.0):
    """A schedule whose shape parameters are pushed far from their start (any values must stay monotone)."""
    schedule = LearnedNoiseSchedule(initial_gamma_0=-7.0, initial_gamma_1=5.0, num_features=8)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in schedule.named_parameters():
            parameter.add_(
                (1.0 if name.startswith("gamma") else scale) * torch.randn(parameter.shape, generator=generator)
            )
    return schedule


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gamma_is_strictly_increasing_with_exact_endpoints_for_any_parameters(seed):
    schedule = perturbed_schedule(seed)
    times = torch.linspace(0, 1, 4001, dtype=torch.float64)
    with torch.no_grad():
        gamma = schedule(times)
        gamma_0, gamma_1 = schedule.endpoints()
    assert bool((gamma[1:] > gamma[:-1]).all())
    assert gamma[0].item() == pytest.approx(gamma_0.item(), abs=1e-12)
    assert gamma[-1].item() == pytest.approx(gamma_1.item(), abs=1e-12)
    assert gamma_1 > gamma_0
    with torch.no_grad():
        schedule.gamma_1.copy_(schedule.gamma_0 - 0.1)
    with pytest.raises(ValueError, match="endpoints crossed"):
        schedule(times)


def test_a_fresh_schedule_is_linear_in_log_snr_between_the_fixed_tables_ends():
    fixed = HVAEScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=100)
    schedule = LearnedNoiseSchedule.from_alphas_cumprod(fixed.alphas_cumprod)
    log_snr = schedule.log_snr(100)
    fixed_log_snr = torch.logit(fixed.alphas_cumprod)
    assert log_snr[0].item() == pytest.approx(fixed_log_snr[0].item(), abs=1e-5)
    assert log_snr[-1].item() == pytest.approx(fixed_log_snr[-1].item(), abs=1e-5)
    linear = torch.linspace(float(log_snr[0]), float(log_snr[-1]), 100, dtype=torch.float64)
    span = float(log_snr[0] - log_snr[-1])
    assert (log_snr - linear).abs().max().item() < 0.011 * span


def test_betas_round_trip_to_the_schedule_and_to_diffusers_schedulers():
    schedule = perturbed_schedule(1)
    num_train_timesteps = 50
    with torch.no_grad():
        expected = torch.sigmoid(-schedule(schedule_times(num_train_timesteps)))
    betas = schedule.betas(num_train_timesteps)
    assert betas.dtype == np.float64 and ((betas > 0) & (betas < 1)).all()
    assert np.allclose(np.cumprod(1 - betas), expected.numpy(), rtol=1e-12, atol=0)

    hvae = schedule.scheduler(num_train_timesteps=num_train_timesteps, prediction_type="v_prediction")
    assert hvae.config.prediction_type == "v_prediction" and hvae.config.num_train_timesteps == num_train_timesteps
    assert torch.allclose(hvae.alphas_cumprod, expected, rtol=1e-12, atol=0)
    # Diffusers' own schedulers read the same table through trained_betas (in float32)
    for diffusers_class in (DDPMScheduler, DDIMScheduler):
        other = diffusers_class.from_config(hvae.config)
        assert torch.allclose(other.alphas_cumprod.double(), expected, rtol=1e-5, atol=1e-7), diffusers_class

    with pytest.raises(ValueError, match="strictly decreasing"):
        betas_from_log_snr([1.0, 1.0, -1.0])


def test_ddpm_pipeline_on_the_learned_tables_samples_what_hvae_pipeline_samples():
    schedule = perturbed_schedule(2)
    scheduler = schedule.scheduler(num_train_timesteps=40, clip_sample=True)
    unet = tiny_unet(norm_num_groups=8)
    ours = HVAEPipeline(unet, scheduler, noise_schedule=schedule)
    theirs = DDPMPipeline(unet, DDPMScheduler.from_config(scheduler.config))
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=2, num_inference_steps=10, output_type="np")
    images = ours(generator=torch.Generator().manual_seed(3), **kwargs).images
    reference = theirs(generator=torch.Generator().manual_seed(3), **kwargs).images
    assert np.abs(images - reference).max() < 2e-3


def test_pipeline_saves_and_loads_the_schedule_with_diffusers(tmp_path):
    schedule = perturbed_schedule(0)
    HVAEPipeline(
        tiny_unet(norm_num_groups=8), schedule.scheduler(num_train_timesteps=40), noise_schedule=schedule
    ).save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["noise_schedule"] == ["hvae_diffusion_component", "LearnedNoiseSchedule"]
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.noise_schedule, LearnedNoiseSchedule)
    for name, value in schedule.state_dict().items():
        assert torch.equal(loaded.noise_schedule.state_dict()[name], value), name
    assert np.array_equal(np.asarray(loaded.scheduler.config.trained_betas), schedule.betas(40))
    # a pipeline without one loads as before
    HVAEPipeline(tiny_unet(norm_num_groups=8), HVAEScheduler(num_train_timesteps=40)).save_pretrained(
        tmp_path / "plain"
    )
    assert DiffusionPipeline.from_pretrained(tmp_path / "plain").noise_schedule is None


# ----------------------------------------------------------------------------------------- the objective


MEANS, STD = [[-0.5, 0.25], [0.5, -0.25]], 0.01


def quantized_mixture_batch(batch_size, seed):
    generator = torch.Generator().manual_seed(seed)
    component = torch.randint(2, (batch_size,), generator=generator)
    samples = torch.tensor(MEANS)[component] + STD * torch.randn(batch_size, 2, generator=generator)
    return {"sample": (torch.round((samples.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1).reshape(batch_size, 2, 1, 1)}


class ScheduleOracle(torch.nn.Module):
    """The mixture's exact ε-denoiser at the schedule's current ᾱ of each integer timestep."""

    def __init__(self, schedule, num_train_timesteps):
        super().__init__()
        self.schedule, self.num_train_timesteps = schedule, num_train_timesteps

    def forward(self, sample, timesteps):
        alphas_cumprod = torch.sigmoid(self.schedule.log_snr(self.num_train_timesteps))
        return ExactMixtureDenoiser(MEANS, stds=STD, alphas_cumprod=alphas_cumprod)(sample, timesteps)


def mean_bound(loss_fn, model, seeds):
    """The loss averaged over fixed batches and draws (common random numbers): the bound in nats/dim."""
    with torch.no_grad():
        return float(
            np.mean(
                [loss_fn(model, quantized_mixture_batch(512, s), torch.Generator().manual_seed(s))[0] for s in seeds]
            )
        )


def test_endpoints_move_to_tighten_the_bound_on_the_mixture():
    """Too noisy a first latent (the decoder cannot resolve 8-bit data of spread 0.01) and too clean a last one
    (the prior does not match): the bound's gradient moves γ_0 down and γ_1 up, and the bound falls."""
    num_train_timesteps = 200  # fine enough that the discrete bound behaves as the continuous one at the ends
    schedule = LearnedNoiseSchedule(initial_gamma_0=-3.0, initial_gamma_1=-1.0, num_features=4)
    scheduler = HVAEScheduler(num_train_timesteps=num_train_timesteps)
    loss_fn = LearnedScheduleLoss(scheduler, schedule)
    oracle = ScheduleOracle(schedule, num_train_timesteps)
    before = mean_bound(loss_fn, oracle, range(100, 104))
    optimizer = torch.optim.Adam([schedule.gamma_0, schedule.gamma_1], lr=0.2)
    for step in range(40):
        loss, _ = loss_fn(oracle, quantized_mixture_batch(256, step), torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = mean_bound(loss_fn, oracle, range(100, 104))
    gamma_0, gamma_1 = (value.item() for value in schedule.endpoints())
    assert gamma_0 < -3.0 - 2.0 and gamma_1 > -1.0 + 1.5, (gamma_0, gamma_1)
    assert after < before - 0.5, (before, after)


def test_shape_gets_the_gradient_of_the_second_moment_and_the_rest_that_of_the_bound():
    schedule = perturbed_schedule(4, scale=0.5)
    scheduler = HVAEScheduler(num_train_timesteps=30)
    loss_fn = LearnedScheduleLoss(scheduler, schedule)
    weight = torch.nn.Parameter(torch.tensor(0.9))

    def model(sample, timesteps):  # a denoiser with one parameter, so its gradient can be compared too
        return (
            weight
            * ExactMixtureDenoiser(MEANS, stds=STD, alphas_cumprod=torch.sigmoid(schedule.log_snr(30)))(
                sample, timesteps
            ).sample
        )

    batch = quantized_mixture_batch(64, 0)
    loss, _ = loss_fn(model, batch, torch.Generator().manual_seed(5))
    loss.backward()
    hooked = {name: p.grad.clone() for name, p in [*schedule.named_parameters(), ("weight", weight)]}

    shape_names = {"feature_slope", "feature_offset", "feature_weight"}
    for p in [*schedule.parameters(), weight]:
        p.grad = None
    per_image, _, _ = loss_fn.per_image_bound(model, batch, torch.Generator().manual_seed(5))
    shape_parameters = [p for n, p in schedule.named_parameters() if n in shape_names]
    second_moment = torch.autograd.grad((per_image**2).mean(), shape_parameters, retain_graph=True)
    rest = [p for n, p in schedule.named_parameters() if n not in shape_names] + [weight]
    first_moment = torch.autograd.grad(per_image.mean(), rest)
    expected = dict(zip(sorted(shape_names, key=[n for n, _ in schedule.named_parameters()].index), second_moment))
    expected.update(
        zip([n for n, _ in schedule.named_parameters() if n not in shape_names] + ["weight"], first_moment)
    )
    for name, gradient in expected.items():
        assert torch.allclose(hooked[name].double(), gradient.double(), rtol=1e-4, atol=1e-8), name
        assert gradient.abs().max() > 0, name


# ------------------------------------------------------------------------------------------- hvae-train


def test_hvae_train_learns_the_schedule_and_saves_it_with_the_pipeline(tmp_path):
    from hvae_diffusion.commands import train
    from hvae_diffusion.training.cli import UsageError

    def argv(output_dir, *extra):
        return [
            *["--output_dir", str(output_dir), "--max_train_steps", "3", "--train_batch_size", "8"],
            *["--checkpointing_steps", "0", "--report_to", "none", "--num_inference_steps", "3", "--skip_elbo"],
            *["--num_train_timesteps", "50", "--learning_rate", "0.05", *extra],
        ]

    with pytest.raises(UsageError, match="--noise_schedule learned trains on the ELBO.*--loss_weighting elbo"):
        train.run(train.parse_args(argv(tmp_path / "refused", "--noise_schedule", "learned")))
    train.run(train.parse_args(argv(tmp_path / "run", "--noise_schedule", "learned", "--loss_weighting", "elbo")))
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run")
    start = LearnedNoiseSchedule.from_alphas_cumprod(
        HVAEScheduler(50, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    )
    trained = pipe.noise_schedule
    assert isinstance(trained, LearnedNoiseSchedule)
    assert not torch.equal(trained.gamma_0, start.gamma_0) and not torch.equal(
        trained.feature_weight, start.feature_weight
    )
    # the saved scheduler's tables are the saved schedule's, and every Diffusers scheduler reads them
    assert np.array_equal(np.asarray(pipe.scheduler.config.trained_betas), trained.betas(50))
    expected = torch.sigmoid(trained.log_snr(50))
    assert torch.allclose(pipe.scheduler.alphas_cumprod, expected, rtol=1e-12, atol=0)
    assert torch.allclose(
        DDIMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.double(), expected, atol=1e-6
    )
