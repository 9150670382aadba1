#!/usr/bin/env python
"""Guidance in an interval against guidance over all steps: time per call, denoiser forwards and classifier passes.

Outside the interval a classifier-free step runs the conditional model once (not twice) and a classifier-guided
step takes no classifier pass (no forward, no backward). The interval is Kynkäänniemi et al.'s σ ∈ (0.28, 2.9] on
the scheduler's own schedule (``guidance.guidance_interval_from_sigmas``); the expected ratio is about
(steps + guided steps) / (2 · steps) for classifier-free guidance. Batch 16, 50 steps (4 with --quick).

    python benchmarks/bench_interval.py [--quick] [--device cuda]
"""

import torch
from benchmarking_utils import main_for, make_classifier, make_unet, quiet, time_interleaved, unet_shape

NUM_CLASSES = 10


class Counter:
    """Samples seen by a module's forward passes (a forward hook)."""

    def __init__(self, module):
        self.samples = 0
        module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        self.samples += inputs[0].shape[0]


def run(settings, report):
    from hvae_diffusion import ClassifierFreeGuidancePipeline, ClassifierGuidedPipeline, HVAEScheduler
    from hvae_diffusion.guidance import guidance_interval_from_sigmas, in_guidance_interval

    sample_size, channels, batch = unet_shape(settings)
    steps = 4 if settings.quick else 50
    scheduler = HVAEScheduler(beta_schedule="squaredcos_cap_v2")
    interval = guidance_interval_from_sigmas(0.28, 2.9, scheduler.alphas_cumprod)
    scheduler.set_timesteps(steps)
    guided_steps = sum(in_guidance_interval(t, interval) for t in scheduler.timesteps)
    labels = (torch.arange(batch) % NUM_CLASSES).tolist()
    latents = settings.randn(batch, channels, sample_size, sample_size)
    case = f"batch={batch} steps={steps} guided={guided_steps}"

    unet = make_unet(settings, num_class_embeds=NUM_CLASSES + 1)
    cfg = quiet(ClassifierFreeGuidancePipeline(unet=unet, scheduler=scheduler, null_class_label=NUM_CLASSES))
    classifier = make_classifier(settings, NUM_CLASSES)
    guided = quiet(ClassifierGuidedPipeline(make_unet(settings), scheduler, classifier))
    unet_counter, classifier_counter = Counter(unet), Counter(classifier)

    def call(pipeline, scale, **kwargs):
        return lambda: pipeline(
            class_labels=labels,
            guidance_scale=scale,
            num_inference_steps=steps,
            generator=settings.generator(),
            latents=latents,
            output_type="latent",
            **kwargs,
        )

    # the cost of one call of each, counted once outside the timing
    counts = {}
    for name, function, counter in (
        ("cfg all steps", call(cfg, 3.0), unet_counter),
        ("cfg interval", call(cfg, 3.0, guidance_interval=interval), unet_counter),
        ("classifier all steps", call(guided, 2.0), classifier_counter),
        ("classifier interval", call(guided, 2.0, guidance_interval=interval), classifier_counter),
    ):
        before = counter.samples
        function()
        counts[name] = (counter.samples - before) / batch
    seconds = time_interleaved(
        {
            "cfg all steps": call(cfg, 3.0),
            "cfg interval": call(cfg, 3.0, guidance_interval=interval),
            "classifier all steps": call(guided, 2.0),
            "classifier interval": call(guided, 2.0, guidance_interval=interval),
        },
        settings,
    )
    report.compare(
        "interval",
        case,
        "cfg interval",
        seconds["cfg interval"],
        "cfg all steps",
        seconds["cfg all steps"],
        unit="s per call",
        denoiser_forwards_per_image=counts["cfg interval"],
        baseline_denoiser_forwards_per_image=counts["cfg all steps"],
    )
    report.compare(
        "interval",
        case,
        "classifier interval",
        seconds["classifier interval"],
        "classifier all steps",
        seconds["classifier all steps"],
        unit="s per call",
        classifier_passes_per_image=counts["classifier interval"],
        baseline_classifier_passes_per_image=counts["classifier all steps"],
    )
    print(f"denoiser forwards / classifier passes per image: {counts}", flush=True)


if __name__ == "__main__":
    main_for(run, __doc__)
