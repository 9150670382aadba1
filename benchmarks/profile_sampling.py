#!/usr/bin/env python
"""Where HVAEPipeline's time goes against DDPMPipeline's: torch.profiler on one call of each (batch 16).

Two profiles: with the UNet (100 steps: the profiler's bookkeeping of a 1000-step call takes many minutes), and
with the UNet's forward replaced by a constant output at 1000 steps, which leaves only what each pipeline adds
around the model. For each it prints, per operator, the self time of each pipeline and the difference,
largest differences first, and writes the rows to ``<output_dir>/profile_sampling.json``. Profiling adds its own cost to every op: read the differences, not
the totals (``benchmarks/bench_sampling.py`` gives the unprofiled ratio).

    python benchmarks/profile_sampling.py [--quick] [--device cuda]
"""

import torch
from bench_sampling import make_pipelines
from benchmarking_utils import main_for, unet_shape
from diffusers.models.unets.unet_2d import UNet2DOutput

TOP = 15


def self_times(call, settings):
    """{operator name: (self time in seconds, calls)} of one ``call()`` (CPU time; CUDA time added on CUDA)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if settings.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with settings.autocast_context(), torch.profiler.profile(activities=activities) as profile:
        call()
        settings.synchronize()
    return {
        event.key: ((event.self_cpu_time_total + getattr(event, "self_device_time_total", 0)) / 1e6, event.count)
        for event in profile.key_averages()
    }


def run(settings, report):
    unet, pipelines = make_pipelines(settings)
    hvae, ddpm = pipelines["hvae"], pipelines["ddpm"]
    batch = unet_shape(settings)[2]
    steps = 5 if settings.quick else 1000
    compare(settings, report, hvae, ddpm, batch, 5 if settings.quick else 100, "with UNet")
    sample_size, channels, _ = unet_shape(settings)
    constant = UNet2DOutput(sample=settings.randn(batch, channels, sample_size, sample_size, seed=2))
    unet.forward = lambda *args, **kwargs: constant  # an instance attribute: nn.Module.__call__ finds it first
    compare(settings, report, hvae, ddpm, batch, steps, "constant UNet")


def compare(settings, report, hvae, ddpm, batch, steps, label):
    times = {}
    for name, pipeline in (("hvae", hvae), ("ddpm", ddpm)):

        def call(pipeline=pipeline):
            return pipeline(
                batch_size=batch, num_inference_steps=steps, generator=settings.generator(), output_type="np"
            )

        call()  # warm up outside the profile
        times[name] = self_times(call, settings)
    totals = {name: sum(seconds for seconds, _ in values.values()) for name, values in times.items()}
    report.note("profile", f"{label}: batch={batch} steps={steps} total", hvae_s=totals["hvae"], ddpm_s=totals["ddpm"])
    operators = set(times["hvae"]) | set(times["ddpm"])
    differences = sorted(
        operators,
        key=lambda op: abs(times["hvae"].get(op, (0, 0))[0] - times["ddpm"].get(op, (0, 0))[0]),
        reverse=True,
    )
    for op in differences[:TOP]:
        (hvae_s, hvae_calls), (ddpm_s, ddpm_calls) = times["hvae"].get(op, (0.0, 0)), times["ddpm"].get(op, (0.0, 0))
        report.note(
            "profile",
            f"{label}: {op}",
            hvae_s=hvae_s,
            hvae_calls=hvae_calls,
            ddpm_s=ddpm_s,
            ddpm_calls=ddpm_calls,
            difference_s=hvae_s - ddpm_s,
        )


if __name__ == "__main__":
    main_for(run, __doc__)
