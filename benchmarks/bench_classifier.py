#!/usr/bin/env python
"""ClassifierGuidedPipeline per step against the ideal loop (target: ≤ 1.1×; docs/benchmarks.md).

The ideal loop is one UNet forward without gradients plus one classifier forward and backward to x_t a step, with
nothing else (noisy classifier, batch 16, 50 steps). Also counts the UNet forwards run with autograd on: the
noisy-classifier mode must not differentiate through the UNet.

    python benchmarks/bench_classifier.py [--quick] [--device cuda]
"""

import torch
from benchmarking_utils import main_for, make_classifier, make_unet, quiet, time_interleaved, unet_shape


def run(settings, report):
    from hvae_diffusion import ClassifierGuidedPipeline, HVAEScheduler

    sample_size, channels, batch = unet_shape(settings)
    unet = make_unet(settings)
    classifier = make_classifier(settings)
    pipeline = quiet(ClassifierGuidedPipeline(unet=unet, scheduler=HVAEScheduler(), classifier=classifier))
    steps = 4 if settings.quick else 50
    labels = torch.arange(batch, device=settings.device) % 10
    latents = settings.randn(batch, channels, sample_size, sample_size)
    timesteps = torch.linspace(999, 0, steps).long().to(settings.device)

    def ideal():
        for timestep in timesteps:
            with torch.no_grad():
                unet(latents, timestep).sample
            with torch.enable_grad():
                sample = latents.detach().requires_grad_(True)
                log_probs = torch.log_softmax(classifier(sample, timestep).logits.float(), dim=-1)
                torch.autograd.grad(log_probs.gather(1, labels[:, None]).sum(), sample)

    def guided():
        return pipeline(
            class_labels=labels.tolist(),
            num_inference_steps=steps,
            generator=settings.generator(),
            latents=latents,
            output_type="latent",
            guidance_scale=2.0,
        )

    seconds = time_interleaved({"pipeline": guided, "ideal": ideal}, settings)
    with_grad = []
    handle = getattr(unet, "_orig_mod", unet).register_forward_pre_hook(
        lambda *_: with_grad.append(torch.is_grad_enabled())
    )
    try:
        guided()
    finally:
        handle.remove()
    report.compare(
        "classifier",
        f"batch={batch} steps={steps} noisy classifier",
        "ClassifierGuidedPipeline",
        seconds["pipeline"] / steps,
        "UNet fwd + clf fwd/bwd",
        seconds["ideal"] / steps,
        target=1.1,
        unit="s per step",
        unet_forwards_with_grad=sum(with_grad),
        unet_forwards=len(with_grad),
    )


if __name__ == "__main__":
    main_for(run, __doc__)
