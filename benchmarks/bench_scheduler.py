#!/usr/bin/env python
"""HVAEScheduler.step against the fused floor and against DDPMScheduler.step (target: ≤ 1.3× the floor; docs/benchmarks.md).

A 1000-step loop with a fixed model output (a zero-cost model), so only the scheduler is timed. The floor is
x ← a·x + b·ε̂ + c·z with the scalars precomputed and z drawn with the generator each step: what any ancestral step
must do. Shapes [16,1,32,32] (every prediction × variance type) and [64,3,64,64] (two configurations).

    python benchmarks/bench_scheduler.py [--quick] [--device cuda] [--repeats 7]
"""

import math

import torch
from benchmarking_utils import main_for, time_interleaved


def scheduler_loop(scheduler, model_output, sample, generator):
    for timestep in scheduler.timesteps:
        sample = scheduler.step(model_output, timestep, sample, generator=generator).prev_sample
    return sample


def fused_floor_loop(num_steps, model_output, sample, generator):
    for index in range(num_steps):
        sample = torch.add(sample * 0.99, model_output, alpha=-0.01)
        if index < num_steps - 1:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            sample = sample.add_(noise, alpha=0.1)
    return sample


def run(settings, report):
    from diffusers import DDPMScheduler

    from hvae_diffusion import HVAEScheduler
    from hvae_diffusion.parameterization import PREDICTION_TYPES
    from hvae_diffusion.scheduling_hvae import VARIANCE_TYPES

    num_steps = 20 if settings.quick else 1000
    shapes = [(2, 1, 8, 8)] if settings.quick else [(16, 1, 32, 32), (64, 3, 64, 64)]
    for shape in shapes:
        large = math.prod(shape) > 100_000
        configs = [(p, v) for p in PREDICTION_TYPES for v in VARIANCE_TYPES]
        if large:  # a 1000-step loop takes seconds here: one fixed and one learned variance
            configs = [("epsilon", "fixed_small"), ("v_prediction", "learned_range")]
        # small loops take a fraction of a second: more repetitions there, against the noise
        repeats = settings.repeats if large or settings.quick else max(5, settings.repeats)
        sample = settings.randn(*shape, seed=0)
        for prediction_type, variance_type in configs:
            learned = variance_type.startswith("learned")
            output_shape = (shape[0], 2 * shape[1], *shape[2:]) if learned else shape
            model_output = 0.1 * settings.randn(*output_shape, seed=1)
            if variance_type == "learned":  # its variance channels are Σ itself, which must be positive
                model_output[:, shape[1] :].exp_().mul_(0.01)
            config = dict(num_train_timesteps=num_steps, prediction_type=prediction_type, variance_type=variance_type)
            hvae = HVAEScheduler(**config)
            hvae.set_timesteps(num_steps, device=settings.device)
            cases = {
                "hvae": lambda: scheduler_loop(hvae, model_output, sample, settings.generator()),
                "floor": lambda: fused_floor_loop(
                    num_steps, model_output[:, : shape[1]], sample, settings.generator()
                ),
            }
            if prediction_type != "score":  # DDPMScheduler has no score parameterization
                ddpm = DDPMScheduler(**config)
                ddpm.set_timesteps(num_steps, device=settings.device)
                cases["ddpm"] = lambda: scheduler_loop(ddpm, model_output, sample, settings.generator())
            seconds = time_interleaved(cases, settings, repeats=repeats)
            case = f"{list(shape)} {prediction_type}/{variance_type}"
            unit = f"s per {num_steps}-step loop"
            row = ("scheduler", case, "HVAEScheduler.step", seconds["hvae"])
            report.compare(*row, "fused floor", seconds["floor"], target=1.3, unit=unit)
            if "ddpm" in seconds:
                report.compare(*row, "DDPMScheduler.step", seconds["ddpm"], target=1.0, unit=unit)


if __name__ == "__main__":
    main_for(run, __doc__)
