#!/usr/bin/env python
"""ClassifierFreeGuidancePipeline against Diffusers' DiTPipeline, and per step against its floor (targets: ≤ 1.00×;
docs/benchmarks.md).

DiT: the components of ``bench_latent``'s tiny DiTPipeline (learned σ, 1000 classes: DiTPipeline's null label is
1000), with DiTPipeline's defaults (w = 4, 50 steps), batch 16 and ``output_type="np"``; ClassifierFreeGuidancePipeline
with its default ``guidance_batching`` ("batched", one forward of the doubled batch, as DiTPipeline runs it).

Floors: the UNet work of a guided step and nothing else: one forward on the doubled batch, or two forwards on the
batch. The pipeline runs in each of its ``guidance_batching`` modes (w = 3, batch 16, 50 steps).

    python benchmarks/bench_cfg.py [--quick] [--device cuda] [--autocast float16]
"""

import torch
from benchmarking_utils import main_for, make_unet, quiet, time_interleaved, unet_shape

NUM_CLASSES = 10


def dit_pipelines(settings):
    """(ClassifierFreeGuidancePipeline, DiTPipeline) on the components of ``bench_latent``'s tiny DiTPipeline (a
    learned-σ DiT, an AutoencoderKL, DDIM), each with its own scheduler of the same config."""
    from bench_latent import dit_pipeline
    from diffusers import DDIMScheduler

    from hvae_diffusion import ClassifierFreeGuidancePipeline

    dit = dit_pipeline(settings)
    scheduler = DDIMScheduler.from_config(dit.scheduler.config)
    return quiet(ClassifierFreeGuidancePipeline(None, scheduler, transformer=dit.transformer, vae=dit.vae)), dit


def run_dit(settings, report):
    ours, dit = dit_pipelines(settings)
    batch = unet_shape(settings)[2]
    steps = 4 if settings.quick else 50
    labels = [label % 1000 for label in range(batch)]
    kwargs = dict(class_labels=labels, guidance_scale=4.0, num_inference_steps=steps, output_type="np")
    cases = {
        "ours": lambda: ours(generator=settings.generator(), **kwargs),
        "dit": lambda: dit(generator=settings.generator(), **kwargs),
    }
    seconds = time_interleaved(cases, settings)
    report.compare(
        "cfg",
        f"DiT batch={batch} steps={steps} w=4",
        "ClassifierFreeGuidance",
        seconds["ours"],
        "DiTPipeline",
        seconds["dit"],
        target=1.0,
        unit="s per call",
    )


def run(settings, report):
    run_dit(settings, report)
    run_floors(settings, report)


def run_floors(settings, report):
    from hvae_diffusion import ClassifierFreeGuidancePipeline, HVAEScheduler
    from hvae_diffusion.pipelines.pipeline_classifier_free import GUIDANCE_BATCHING

    sample_size, channels, batch = unet_shape(settings)
    unet = make_unet(settings, num_class_embeds=NUM_CLASSES + 1)
    pipeline = quiet(
        ClassifierFreeGuidancePipeline(unet=unet, scheduler=HVAEScheduler(), null_class_label=NUM_CLASSES)
    )
    steps = 4 if settings.quick else 50
    labels = torch.arange(batch, device=settings.device) % NUM_CLASSES
    null = torch.full_like(labels, NUM_CLASSES)
    doubled_labels = torch.cat([null, labels])
    latents = settings.randn(batch, channels, sample_size, sample_size)
    timesteps = torch.linspace(999, 0, steps).long().to(settings.device)

    @torch.no_grad()
    def doubled():
        for timestep in timesteps:
            unet(torch.cat([latents, latents]), timestep, class_labels=doubled_labels).sample.chunk(2)

    @torch.no_grad()
    def two_forwards():
        for timestep in timesteps:
            unet(latents, timestep, class_labels=null).sample
            unet(latents, timestep, class_labels=labels).sample

    cases = {"doubled batch": doubled, "two forwards": two_forwards}
    for mode in GUIDANCE_BATCHING:
        cases[f"pipeline {mode}"] = lambda mode=mode: pipeline(
            class_labels=labels.tolist(),
            guidance_scale=3.0,
            num_inference_steps=steps,
            generator=settings.generator(),
            latents=latents,
            output_type="latent",
            guidance_batching=mode,
        )
    seconds = {name: value / steps for name, value in time_interleaved(cases, settings).items()}
    floor = min(("doubled batch", "two forwards"), key=seconds.get)
    case = f"batch={batch} steps={steps}"
    unit = "s per step"
    report.compare(
        "cfg", case, "UNet(2B) once", seconds["doubled batch"], "UNet(B) twice", seconds["two forwards"], unit=unit
    )
    for mode in GUIDANCE_BATCHING:
        name = f"pipeline {mode}"
        report.compare("cfg", case, name, seconds[name], f"faster: {floor}", seconds[floor], target=1.0, unit=unit)


if __name__ == "__main__":
    main_for(run, __doc__)
