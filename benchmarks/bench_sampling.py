#!/usr/bin/env python
"""HVAEPipeline against Diffusers' DDPMPipeline on the same UNet2DModel (target: ≤ 1.00× at 100 and 1000 steps;
docs/benchmarks.md).

Batch 16 at 100 and 1000 steps, ``output_type="np"`` for all. HVAEPipeline runs twice: with its own HVAEScheduler (the
package's default), and with DDPMPipeline's own ``DDPMScheduler``, so that the second ratio is the pipeline alone.
Also reports the fraction of each call spent outside the UNet's forward (forward hooks), the part a pipeline adds.
``benchmarks/profile_sampling.py`` shows where it goes.

    python benchmarks/bench_sampling.py [--quick] [--device cuda] [--autocast bfloat16] [--compile]
"""

import time

from benchmarking_utils import main_for, make_unet, quiet, time_interleaved, unet_shape


def fraction_outside(module, call, settings) -> float:
    """The fraction of ``call()``'s time spent outside ``module.forward``."""
    inside, starts = [0.0], []

    def before(*_):
        settings.synchronize()
        starts.append(time.perf_counter())

    def after(*_):
        settings.synchronize()
        inside[0] += time.perf_counter() - starts.pop()

    handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with settings.autocast_context():
            settings.synchronize()
            start = time.perf_counter()
            call()
            settings.synchronize()
            total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return 1.0 - inside[0] / total


def make_pipelines(settings):
    from diffusers import DDPMPipeline, DDPMScheduler

    from hvae_diffusion import HVAEPipeline, HVAEScheduler

    unet = make_unet(settings)
    ddpm = quiet(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()))
    hvae = quiet(HVAEPipeline(unet=unet, scheduler=HVAEScheduler()))
    hvae_ddpm = quiet(HVAEPipeline(unet=unet, scheduler=DDPMScheduler()))
    return unet, {"hvae": hvae, "hvae with DDPMScheduler": hvae_ddpm, "ddpm": ddpm}


def run(settings, report):
    unet, pipelines = make_pipelines(settings)
    batch = unet_shape(settings)[2]
    for steps in [5] if settings.quick else [100, 1000]:
        calls = {
            name: lambda pipeline=pipeline, steps=steps: pipeline(
                batch_size=batch, num_inference_steps=steps, generator=settings.generator(), output_type="np"
            )
            for name, pipeline in pipelines.items()
        }
        # 1000 steps take long on a CPU: the 100-step case warmed everything up
        long_run = steps >= 1000
        seconds = time_interleaved(
            calls, settings, repeats=min(2, settings.repeats) if long_run else None, warmup=0 if long_run else None
        )
        outside = {
            name: fraction_outside(getattr(unet, "_orig_mod", unet), call, settings) for name, call in calls.items()
        }
        for name, candidate in (("hvae", "HVAEPipeline"), ("hvae with DDPMScheduler", "HVAEPipeline+DDPMScheduler")):
            report.compare(
                "sampling",
                f"batch={batch} steps={steps}",
                candidate,
                seconds[name],
                "DDPMPipeline",
                seconds["ddpm"],
                target=1.0,
                unit="s per call",
                fraction_outside_unet=outside[name],
                baseline_fraction_outside_unet=outside["ddpm"],
            )


if __name__ == "__main__":
    main_for(run, __doc__)
