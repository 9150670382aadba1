"""HVAEScheduler: side by side with Diffusers' DDPMScheduler, the exact respaced HVAE, compatibility and bad input."""

import inspect

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale

from hvae_diffusion import HVAEScheduler
from hvae_diffusion.forward_process import signal_to_noise_ratio
from hvae_diffusion.parameterization import PREDICTION_TYPES, convert_prediction, training_target

SHAPE = (2, 1, 4, 4)


def toy_model(sample, timestep, variance_type=None):
    """A fixed smooth function of (x_t, t) standing in for a network, with variance channels for a learned variance:
    in (−1, 1) for learned_range, a variance in (0, 0.01) for learned."""
    output = 0.8 * torch.tanh(sample) + 0.1 * torch.cos(torch.as_tensor(float(timestep)) / 37)
    if variance_type == "learned_range":
        output = torch.cat([output, torch.tanh(0.5 * sample - 0.2)], dim=1)
    elif variance_type == "learned":
        output = torch.cat([output, 0.01 * torch.sigmoid(0.5 * sample - 0.2)], dim=1)
    return output


def run_side_by_side(config, num_inference_steps, seed=0):
    """Sample with HVAEScheduler and DDPMScheduler from the same seed; return both trajectories' outputs."""
    # DDPMScheduler's step takes the square root of log β_t for "fixed_large_log" (NaN); the variance meant,
    # Glide's max_log, is β_t, which is its "fixed_large".
    their_config = dict(config)
    if config.get("variance_type") == "fixed_large_log":
        their_config["variance_type"] = "fixed_large"
    ours, theirs = HVAEScheduler(**config), DDPMScheduler(**their_config)
    if num_inference_steps is not None:
        ours.set_timesteps(num_inference_steps)
        theirs.set_timesteps(num_inference_steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    variance_type = config.get("variance_type")
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    our_sample, their_sample = sample.clone(), sample.clone()
    our_generator, their_generator = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    steps = []
    for t in ours.timesteps:
        our_step = ours.step(toy_model(our_sample, t, variance_type), t, our_sample, generator=our_generator)
        their_step = theirs.step(toy_model(their_sample, t, variance_type), t, their_sample, generator=their_generator)
        steps.append((int(t), our_step, their_step))
        our_sample, their_sample = our_step.prev_sample, their_step.prev_sample
    return steps


SIDE_BY_SIDE_CASES = [
    ({}, None),
    ({"timestep_spacing": "leading"}, 50),
    ({"timestep_spacing": "trailing"}, 50),
    ({"timestep_spacing": "linspace"}, 50),
    ({"timestep_spacing": "leading", "steps_offset": 1}, 50),
    ({"variance_type": "fixed_large"}, None),
    ({"variance_type": "fixed_large", "timestep_spacing": "trailing"}, 50),
    ({"variance_type": "learned_range", "clip_sample": True}, 50),
    ({"variance_type": "learned_range", "clip_sample": False}, 50),
    ({"variance_type": "learned"}, 50),
    ({"variance_type": "learned", "timestep_spacing": "trailing"}, None),
    ({"variance_type": "fixed_small_log"}, 50),
    ({"variance_type": "fixed_large_log"}, 50),
    ({"thresholding": True, "sample_max_value": 1.5}, 50),
    ({"clip_sample": False, "prediction_type": "v_prediction"}, 50),
    ({"prediction_type": "sample", "clip_sample_range": 0.7}, 50),
    ({"beta_schedule": "squaredcos_cap_v2", "clip_sample": False}, 50),
    ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, 50),
]


@pytest.mark.parametrize("config, num_inference_steps", SIDE_BY_SIDE_CASES)
def test_matches_ddpm_scheduler_from_the_same_seed(config, num_inference_steps):
    steps = run_side_by_side(config, num_inference_steps)
    for index, (t, ours, theirs) in enumerate(steps):
        assert isinstance(ours, DDPMSchedulerOutput)
        torch.testing.assert_close(ours.pred_original_sample, theirs.pred_original_sample, rtol=1e-4, atol=1e-4)
        is_last = index == len(steps) - 1
        if is_last and t > 0 and not config.get("variance_type", "fixed_small").startswith("fixed_small"):
            # DDPMScheduler adds noise whenever t > 0, even at the last step of a trailing chain; the HVAE's last
            # step is the decoder, which returns its mean, x̂_0 (the posterior at ᾱ_{t'} = 1 is x_0 itself).
            torch.testing.assert_close(ours.prev_sample, ours.pred_original_sample)
        else:
            torch.testing.assert_close(ours.prev_sample, theirs.prev_sample, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_inference_steps", [None, 20])
def test_equivalent_outputs_in_every_parameterization_give_the_same_samples(num_inference_steps):
    """The same ε, handed over as x_0, v or a score, must produce the same chain."""
    final = {}
    for prediction_type in PREDICTION_TYPES:
        scheduler = HVAEScheduler(prediction_type=prediction_type, clip_sample=False)
        if num_inference_steps:
            scheduler.set_timesteps(num_inference_steps)
        sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        generator = torch.Generator().manual_seed(1)
        for t in scheduler.timesteps:
            epsilon = toy_model(sample, t)
            output = convert_prediction(epsilon, sample, scheduler.alphas_cumprod[t], "epsilon", prediction_type)
            sample = scheduler.step(output, t, sample, generator=generator).prev_sample
        final[prediction_type] = sample
    for prediction_type in PREDICTION_TYPES:
        torch.testing.assert_close(final[prediction_type], final["epsilon"], rtol=1e-7, atol=1e-7)


def test_subsequence_step_is_the_respaced_hvae():
    """Between kept latents t' < t the step uses α = ᾱ_t / ᾱ_{t'}: its mean and variance are those of the posterior
    q(x_{t'} | x_t, x̂_0) of the chain with fewer latents, not the 1000-step coefficients."""
    scheduler = HVAEScheduler(prediction_type="sample", clip_sample=False)
    scheduler.set_timesteps(timesteps=[900, 600, 300, 0])
    assert scheduler.custom_timesteps and scheduler.previous_timestep(600) == 300
    a_t, a_prev = scheduler.alphas_cumprod[600], scheduler.alphas_cumprod[300]
    alpha = a_t / a_prev
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    predicted_x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    output = scheduler.step(predicted_x0, 600, sample, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mean = (alpha.sqrt() * (1 - a_prev) * sample + a_prev.sqrt() * (1 - alpha) * predicted_x0) / (1 - a_t)
    variance = (1 - alpha) * (1 - a_prev) / (1 - a_t)
    torch.testing.assert_close(output.prev_sample, mean + variance.sqrt() * noise)
    single_step_variance = scheduler.betas[600] * (1 - scheduler.alphas_cumprod[599]) / (1 - a_t)
    assert abs(float(variance / single_step_variance) - 1) > 0.5  # the two chains really differ here

    timesteps = torch.tensor([600, 600])
    posterior_mean, posterior_variance = scheduler.posterior_mean_variance(predicted_x0, sample, timesteps)
    torch.testing.assert_close(posterior_mean, mean)
    torch.testing.assert_close(posterior_variance, variance.expand(2))


@pytest.mark.parametrize("other_class", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
@pytest.mark.parametrize(
    "scheduler",
    [
        HVAEScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        HVAEScheduler.from_alphas(torch.linspace(0.999, 0.95, 300).tolist()),
    ],
    ids=["scaled_linear", "from_alphas"],
)
def test_config_round_trips_through_other_diffusers_schedulers(scheduler, other_class):
    other = other_class.from_config(scheduler.config)
    if other_class is EulerDiscreteScheduler:
        # Euler stores σ_t = √((1 − ᾱ_t) / ᾱ_t), largest first, then a trailing 0
        expected = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt().flip(0)
        torch.testing.assert_close(other.sigmas[:-1].double(), expected, rtol=1e-4, atol=0)  # Euler works in float32
    else:
        torch.testing.assert_close(other.alphas_cumprod.double(), scheduler.alphas_cumprod, rtol=1e-5, atol=1e-7)
    back = HVAEScheduler.from_config(other.config)
    torch.testing.assert_close(back.alphas_cumprod, scheduler.alphas_cumprod, rtol=1e-6, atol=1e-9)


def test_compatibles_and_config_keys():
    scheduler = HVAEScheduler()
    assert DDIMScheduler in scheduler.compatibles and DDPMScheduler in scheduler.compatibles
    bookkeeping = {"_class_name", "_diffusers_version"}
    assert set(scheduler.config.keys()) - bookkeeping == set(DDPMScheduler().config.keys()) - bookkeeping


def test_defaults_equal_ddpm_scheduler_defaults():
    ours, theirs = HVAEScheduler().config, DDPMScheduler().config
    shared = (set(ours) & set(theirs)) - {"_class_name", "_diffusers_version"}
    assert {"prediction_type", "timestep_spacing", "variance_type", "clip_sample"} <= shared
    assert {key: ours[key] for key in shared} == {key: theirs[key] for key in shared}


def test_schedule_tables_are_float64_and_match_ddpm():
    scheduler = HVAEScheduler()
    for table in (scheduler.betas, scheduler.alphas, scheduler.alphas_cumprod):
        assert table.dtype == torch.float64
    torch.testing.assert_close(scheduler.alphas_cumprod.float(), DDPMScheduler().alphas_cumprod)
    assert len(scheduler) == 1000 and scheduler.order == 1 and scheduler.init_noise_sigma == 1.0
    x = torch.randn(SHAPE)
    assert scheduler.scale_model_input(x, 10) is x


def test_save_and_load_round_trip(tmp_path):
    alphas = torch.linspace(0.9999, 0.97, 200, dtype=torch.float64)
    scheduler = HVAEScheduler.from_alphas(alphas.tolist(), prediction_type="score", variance_type="fixed_large")
    torch.testing.assert_close(scheduler.alphas, alphas)
    scheduler.save_pretrained(tmp_path)
    loaded = HVAEScheduler.from_pretrained(tmp_path)
    bookkeeping = {"_use_default_values", "_class_name", "_diffusers_version"}
    assert {k: v for k, v in loaded.config.items() if k not in bookkeeping} == {
        k: v for k, v in scheduler.config.items() if k not in bookkeeping
    }
    torch.testing.assert_close(loaded.alphas_cumprod, scheduler.alphas_cumprod, rtol=0, atol=0)
    # the stored trained_betas are what DDPMScheduler reads too
    ddpm = DDPMScheduler.from_pretrained(tmp_path)
    torch.testing.assert_close(ddpm.alphas_cumprod.double(), scheduler.alphas_cumprod, rtol=1e-5, atol=1e-7)


def test_rescale_betas_zero_snr():
    scheduler = HVAEScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    torch.testing.assert_close(scheduler.betas.float(), diffusers_rescale(DDPMScheduler().betas), rtol=1e-4, atol=1e-6)
    assert 0 < float(scheduler.alphas_cumprod[-1]) < 1e-6 and float(scheduler.snr(999)) < 1e-6
    for prediction_type in PREDICTION_TYPES:  # even ε and the score stay usable at the first step
        scheduler = HVAEScheduler(rescale_betas_zero_snr=True, prediction_type=prediction_type)
        scheduler.set_timesteps(10)
        sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        for t in scheduler.timesteps:
            output = toy_model(sample, t)
            sample = scheduler.step(output, t, sample, generator=torch.Generator().manual_seed(1)).prev_sample
        assert bool(torch.isfinite(sample).all())


def _sample_chain(scheduler, sample, generator):
    for t in scheduler.timesteps:
        sample = scheduler.step(toy_model(sample, t), t, sample, generator=generator).prev_sample
    return sample


def test_generator_determinism_and_generator_lists():
    scheduler = HVAEScheduler()
    scheduler.set_timesteps(20)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    first = _sample_chain(scheduler, start, torch.Generator().manual_seed(5))
    again = _sample_chain(scheduler, start, torch.Generator().manual_seed(5))
    other = _sample_chain(scheduler, start, torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.allclose(first, other)
    # a list gives each sample its own generator: sample i equals a batch-of-one run with generator i
    batch = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    per_sample = _sample_chain(scheduler, start, batch)
    for i, seed in enumerate((5, 6)):
        alone = _sample_chain(scheduler, start[i : i + 1], [torch.Generator().manual_seed(seed)])
        torch.testing.assert_close(per_sample[i : i + 1], alone)


def test_add_noise_and_get_velocity_equal_ddpm():
    ours, theirs = HVAEScheduler(), DDPMScheduler()
    original, noise = torch.randn(2, *SHAPE)
    timesteps = torch.tensor([3, 997])
    torch.testing.assert_close(
        ours.add_noise(original, noise, timesteps), theirs.add_noise(original, noise, timesteps)
    )
    torch.testing.assert_close(
        ours.get_velocity(original, noise, timesteps), theirs.get_velocity(original, noise, timesteps)
    )
    assert ours.add_noise(original, noise, timesteps).dtype == torch.float32
    for prediction_type in PREDICTION_TYPES:
        scheduler = HVAEScheduler(prediction_type=prediction_type)
        sample = scheduler.add_noise(original, noise, timesteps)
        alphas_cumprod_t = scheduler.alphas_cumprod[timesteps].float()
        expected = training_target(original, noise, sample, alphas_cumprod_t, prediction_type)
        torch.testing.assert_close(scheduler.training_target(original, noise, timesteps), expected)


def test_hvae_quantities():
    scheduler = HVAEScheduler(prediction_type="v_prediction")
    timesteps = torch.tensor([0, 500])
    a = scheduler.alphas_cumprod[timesteps]
    torch.testing.assert_close(scheduler.snr(timesteps), signal_to_noise_ratio(a))
    sample, output = torch.randn(2, *SHAPE, dtype=torch.float64)
    for to_type in PREDICTION_TYPES:
        torch.testing.assert_close(
            scheduler.convert_model_output(output, sample, timesteps, to_type),
            convert_prediction(output, sample, a, "v_prediction", to_type),
        )


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_previous_timestep_matches_ddpm(spacing):
    ours, theirs = HVAEScheduler(timestep_spacing=spacing), DDPMScheduler(timestep_spacing=spacing)
    assert ours.previous_timestep(500) == 499  # the full chain before set_timesteps
    ours.set_timesteps(7)
    theirs.set_timesteps(7)
    for t in ours.timesteps:
        assert ours.previous_timestep(t) == int(theirs.previous_timestep(t))
    assert ours.previous_timestep(ours.timesteps[-1]) == -1


def test_step_in_bfloat16():
    scheduler = HVAEScheduler()
    scheduler.set_timesteps(25)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    reference = _sample_chain(scheduler, start, torch.Generator().manual_seed(1))
    low = _sample_chain(scheduler, start.bfloat16(), torch.Generator().manual_seed(1))
    assert low.dtype == torch.bfloat16 and bool(torch.isfinite(low).all())
    assert float((low.float() - reference).abs().max()) < 0.1


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"prediction_type": "noise"}, "prediction_type"),
        ({"variance_type": "learned_sigma"}, "variance_type"),
        ({"clip_sample": "false"}, "clip_sample"),
        ({"thresholding": 1}, "thresholding"),
        ({"beta_start": "0.0001"}, "beta_start"),
        ({"beta_end": 2.0}, "beta_end"),
        ({"beta_schedule": "scaled_linear", "beta_end": 1.5}, "beta_end"),
        ({"beta_start": float("nan")}, "beta_start"),
        ({"num_train_timesteps": 10.0}, "num_train_timesteps"),
        ({"steps_offset": -1}, "steps_offset"),
        ({"clip_sample_range": 0}, "clip_sample_range"),
        ({"dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
        ({"beta_schedule": "cubic"}, "beta_schedule"),
        ({"timestep_spacing": "uniform"}, "timestep_spacing"),
        ({"num_train_timesteps": 3, "trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({"num_train_timesteps": 2, "trained_betas": [0.0, 0.2]}, "trained_betas"),
        ({"num_train_timesteps": 2, "trained_betas": [0.1, 1.5]}, "trained_betas"),
        ({"num_train_timesteps": 2, "trained_betas": [0.1, float("nan")]}, "trained_betas"),
    ],
)
def test_bad_constructor_arguments(kwargs, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        HVAEScheduler(**kwargs)


def test_zero_terminal_snr_betas_are_legal():
    scheduler = HVAEScheduler(num_train_timesteps=3, trained_betas=[0.1, 0.5, 1.0])
    assert 0 < float(scheduler.alphas_cumprod[-1]) < 1e-6
    scheduler = HVAEScheduler.from_alphas([0.9, 0.5, 0.0])
    assert 0 < float(scheduler.alphas_cumprod[-1]) < 1e-6


@pytest.mark.parametrize("alphas", [[0.9, 1.0], [0.9, -0.1], [[0.9, 0.8]]])
def test_bad_alphas(alphas):
    with pytest.raises(ValueError, match="alphas"):
        HVAEScheduler.from_alphas(alphas)


def test_bad_set_timesteps():
    scheduler = HVAEScheduler(num_train_timesteps=100)
    cases = [
        ({"num_inference_steps": 101}, ValueError, "num_inference_steps"),
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps"),
        ({"num_inference_steps": 2.5}, TypeError, "num_inference_steps"),
        ({"timesteps": [10, 50, 0]}, ValueError, "timesteps"),
        ({"timesteps": [50, 50, 0]}, ValueError, "timesteps"),
        ({"timesteps": [100, 50]}, ValueError, "timesteps"),
        ({"timesteps": [50, -1]}, ValueError, "timesteps"),
        ({"num_inference_steps": 5, "timesteps": [50, 0]}, ValueError, "num_inference_steps"),
        ({}, ValueError, "num_inference_steps"),
    ]
    for kwargs, error, argument in cases:
        with pytest.raises(error, match=argument):
            scheduler.set_timesteps(**kwargs)


def test_bad_step_input():
    scheduler = HVAEScheduler()
    scheduler.set_timesteps(10)
    sample = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step(sample, 999, sample)  # not in the 10-step chain
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(sample[:, :, :2], scheduler.timesteps[0], sample)
    bad = sample.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(bad, scheduler.timesteps[0], sample)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(bad, scheduler.timesteps[0], sample)
    learned = HVAEScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="learned_range needs 2C"):
        learned.step(sample, 999, sample)
    with pytest.raises(ValueError, match="timesteps"):
        scheduler.loss_weights(torch.tensor([999]), "elbo")  # not in the chain either
    with pytest.raises(ValueError, match="timesteps"):
        scheduler.add_noise(sample, sample, torch.tensor([1000, 0]))


def test_step_input_that_is_not_finite_is_named_and_large_finite_values_pass():
    scheduler = HVAEScheduler(variance_type="learned_range")
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[0]
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    output = toy_model(sample, t, "learned_range")
    bad_sample = sample.clone()
    bad_sample[1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="sample contains NaN"):
        scheduler.step(output, t, bad_sample)
    bad_variance = output.clone()
    bad_variance[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="variance channels of model_output"):
        scheduler.step(bad_variance, t, sample)
    # finite values whose float32 sum overflows are not NaN
    huge = torch.full(SHAPE, 3e38)
    fixed = HVAEScheduler(prediction_type="sample", clip_sample=True)
    result = fixed.step(huge, 999, sample, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(result.prev_sample).all())


def test_step_keeps_the_samples_dtype():
    scheduler = HVAEScheduler()
    scheduler.set_timesteps(10)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t = scheduler.timesteps[0]
    wide = scheduler.step(toy_model(sample, t).double(), t, sample, generator=torch.Generator().manual_seed(1))
    scheduler.set_timesteps(10)
    same = scheduler.step(toy_model(sample, t), t, sample, generator=torch.Generator().manual_seed(1))
    assert wide.prev_sample.dtype == torch.float32 and wide.pred_original_sample.dtype == torch.float32
    torch.testing.assert_close(wide.prev_sample, same.prev_sample)


def test_fixed_variance_ignores_the_variance_channels_of_a_learned_variance_model():
    scheduler = HVAEScheduler()
    scheduler.set_timesteps(10)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t = scheduler.timesteps[0]
    both = toy_model(sample, t, "learned_range")
    with_variance = scheduler.step(both, t, sample, generator=torch.Generator().manual_seed(1)).prev_sample
    alone = scheduler.step(both[:, :1], t, sample, generator=torch.Generator().manual_seed(1)).prev_sample
    assert torch.equal(with_variance, alone)


def test_step_index_follows_diffusers_convention():
    scheduler = HVAEScheduler()
    scheduler.set_timesteps(5)
    assert scheduler.step_index is None and scheduler.begin_index is None
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    first = _sample_chain(scheduler, sample, torch.Generator().manual_seed(1))
    assert scheduler.step_index == 5
    # a chain stepped again without set_timesteps starts over, as its timesteps say
    assert torch.equal(_sample_chain(scheduler, sample, torch.Generator().manual_seed(1)), first)
    # set_begin_index starts the counter mid-chain (image-to-image), and set_timesteps resets it
    scheduler.set_begin_index(2)
    t = scheduler.timesteps[2]
    scheduler.step(toy_model(sample, t), t, sample, generator=torch.Generator().manual_seed(1))
    assert scheduler.step_index == 3
    scheduler.set_timesteps(5)
    assert scheduler.step_index is None and scheduler.begin_index is None
    assert scheduler.index_for_timestep(scheduler.timesteps[3]) == 3
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.index_for_timestep(998)


# ---------------------------------------------------------------------- every method HVAEScheduler inherits

BOOKKEEPING = {"_class_name", "_diffusers_version", "_use_default_values"}
# One config that switches on every branch the inherited methods read (thresholding, a respaced chain).
INHERITED_CONFIG = dict(num_train_timesteps=50, thresholding=True, sample_max_value=1.5, timestep_spacing="trailing")


def inherited_methods(cls=HVAEScheduler) -> set[str]:
    """The methods and properties ``cls`` takes unchanged from DDPMScheduler and its bases (``object``'s aside)."""
    names = set()
    for name in dir(cls):
        owner = next(base for base in cls.__mro__ if name in base.__dict__)
        attribute = inspect.getattr_static(cls, name)
        is_method = inspect.isfunction(attribute) or isinstance(attribute, (staticmethod, classmethod, property))
        if owner not in (cls, object) and is_method:
            names.add(name)
    return names


def comparable(value):
    """``value`` with what names the class (or the run) left out: configs without bookkeeping keys, class names
    unified, tensors as float64."""
    if isinstance(value, torch.Tensor):
        return value.double()
    if isinstance(value, str):
        return value.replace("HVAEScheduler", "DDPMScheduler")
    if isinstance(value, dict):
        return {key: comparable(item) for key, item in value.items() if key not in BOOKKEEPING}
    if isinstance(value, (list, tuple)):
        return type(value)(comparable(item) for item in value)
    if isinstance(value, type):
        return value.__name__.replace("HVAEScheduler", "DDPMScheduler")
    return value


def _variances(scheduler):
    """``_get_variance`` at every timestep of a respaced chain, for every variance type (learned ones with a
    predicted variance)."""
    scheduler.set_timesteps(7)
    predicted = torch.linspace(-0.9, 0.9, 4).reshape(1, 4, 1, 1)
    variances = []
    for variance_type in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned_range"):
        for t in scheduler.timesteps:
            variances.append(scheduler._get_variance(t, predicted_variance=predicted, variance_type=variance_type))
    return torch.stack([v.expand(1, 4, 1, 1).double() for v in variances])


def _json_round_trip(scheduler, folder):
    scheduler.to_json_file(folder / "config.json")
    return type(scheduler)._dict_from_json_file(folder / "config.json"), scheduler.to_json_string()


def _saved_and_loaded(scheduler, folder):
    scheduler.save_pretrained(folder / "pretrained")
    scheduler.save_config(folder / "config")
    config, unused = type(scheduler).load_config(folder / "config", return_unused_kwargs=True)
    config_dict = type(scheduler).get_config_dict(folder / "config")
    return type(scheduler).from_pretrained(folder / "pretrained").config, config, unused, config_dict


def _registered_for_auto_class(scheduler):
    # on a subclass, so the class under test keeps no auto_map
    subclass = type("Registered", (type(scheduler),), {})
    subclass.register_for_auto_class("AutoModel")
    return subclass._auto_class


def _registered_to_config(scheduler):
    scheduler.register_to_config(clip_sample=False)
    return scheduler.config


def _config_attribute(scheduler):
    with pytest.warns(FutureWarning, match="direct config name access|deprecated"):
        return scheduler.__getattr__("beta_schedule")


# name -> what to run on a scheduler of INHERITED_CONFIG (and a fresh folder); both classes must give the same.
INHERITED_CALLS = {
    "__len__": lambda s, folder: len(s),
    "__repr__": lambda s, folder: repr(s),
    "__getattr__": lambda s, folder: _config_attribute(s),
    "_dict_from_json_file": _json_round_trip,
    "to_json_file": _json_round_trip,
    "to_json_string": _json_round_trip,
    "_get_compatibles": lambda s, folder: sorted(c.__name__ for c in type(s)._get_compatibles()),
    "compatibles": lambda s, folder: sorted(c.__name__ for c in s.compatibles),
    "_get_init_keys": lambda s, folder: type(s)._get_init_keys(type(s)),
    "_get_variance": lambda s, folder: _variances(s),
    "_threshold_sample": lambda s, folder: s._threshold_sample(
        3 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ),
    "scale_model_input": lambda s, folder: s.scale_model_input(torch.arange(4.0), 3),
    "config": lambda s, folder: s.config,
    "extract_init_dict": lambda s, folder: type(s).extract_init_dict(dict(s.config))[:2],
    "from_config": lambda s, folder: type(s).from_config(DDPMScheduler(**INHERITED_CONFIG).config).config,
    "from_pretrained": _saved_and_loaded,
    "save_pretrained": _saved_and_loaded,
    "save_config": _saved_and_loaded,
    "load_config": _saved_and_loaded,
    "get_config_dict": _saved_and_loaded,
    "register_for_auto_class": lambda s, folder: _registered_for_auto_class(s),
    "register_to_config": lambda s, folder: _registered_to_config(s),
    # diffusers 0.38 (DDUF single-file pipelines, removed later)
    "_get_config_file_from_dduf": lambda s, folder: type(s)._get_config_file_from_dduf(
        "scheduler", {"scheduler/scheduler_config.json": None}
    ),
}
# Upload methods, run against the loopback Hub stand-in by test_inherited_upload_methods_agree_with_ddpm_scheduler.
UPLOAD_METHODS = {"push_to_hub", "_upload_folder"}


def test_every_inherited_method_is_checked():
    """A method that a new Diffusers adds to DDPMScheduler (or its bases) fails here until it gets a check below."""
    assert inherited_methods() <= set(INHERITED_CALLS) | UPLOAD_METHODS
    assert {"_get_variance", "_threshold_sample", "scale_model_input", "__len__"} <= inherited_methods()


@pytest.mark.parametrize("name", sorted(set(INHERITED_CALLS) & inherited_methods()))
def test_inherited_method_runs_and_agrees_with_ddpm_scheduler(name, tmp_path):
    results = []
    for cls in (HVAEScheduler, DDPMScheduler):
        folder = tmp_path / cls.__name__
        folder.mkdir()
        results.append(comparable(INHERITED_CALLS[name](cls(**INHERITED_CONFIG), folder)))
    ours, theirs = results
    if isinstance(ours, torch.Tensor):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)  # DDPMScheduler's tables are float32
    else:
        assert ours == theirs


UPLOADS = """
import sys
from diffusers import DDPMScheduler
from hvae_diffusion import HVAEScheduler
config = dict(num_train_timesteps=50, thresholding=True)
for cls in (HVAEScheduler, DDPMScheduler):
    scheduler = cls(**config)
    scheduler.push_to_hub(f"someone/{cls.__name__}-pushed", token="hf_fake")
    scheduler.save_config(sys.argv[1] + "/" + cls.__name__)
    scheduler._upload_folder(sys.argv[1] + "/" + cls.__name__, f"someone/{cls.__name__}-pushed", token="hf_fake")
"""


def test_inherited_upload_methods_agree_with_ddpm_scheduler(tmp_path):
    import json

    from hub_server import FakeHub
    from test_hub import run_with_hub

    assert UPLOAD_METHODS <= inherited_methods()
    with FakeHub() as hub:
        hub.repos_created.clear()
        result = run_with_hub(UPLOADS, hub, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    configs = {
        name: comparable(json.loads(hub.repos[f"someone/{name}-pushed"]["scheduler_config.json"]))
        for name in ("HVAEScheduler", "DDPMScheduler")
    }
    assert configs["HVAEScheduler"] == configs["DDPMScheduler"]
    assert {"thresholding": True, "num_train_timesteps": 50}.items() <= configs["HVAEScheduler"].items()
