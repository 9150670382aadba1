#!/usr/bin/env python
"""What the usual fast paths buy HVAEPipeline, each against the default call in the same run.

``torch.inference_mode``, channels_last, the classic ``AttnProcessor`` against SDPA (Diffusers' default), bf16 (and
on CUDA fp16) autocast and low-precision weights, and with ``--compile`` ``torch.compile`` of the UNet (its first
call, the compilation, is reported apart). On CUDA it also counts the host syncs of one call (torch's sync debug
mode): the sampling loop should make none but the final finiteness check.

    python benchmarks/bench_fastpaths.py [--quick] [--device cuda] [--compile]
"""

import contextlib
import copy
import time
import warnings

import torch
from benchmarking_utils import main_for, make_unet, quiet, time_interleaved, unet_shape


def count_host_syncs(call, settings):
    """CUDA: the synchronizing operations ``call()`` performs; None elsewhere."""
    if settings.device.type != "cuda":
        return None
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(warning.message) for warning in caught)


def run(settings, report):
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from hvae_diffusion import HVAEPipeline, HVAEScheduler

    sample_size, channels, batch = unet_shape(settings)
    steps = 3 if settings.quick else 50
    unet = make_unet(settings, prepare=False).to(settings.device)
    latents = settings.randn(batch, channels, sample_size, sample_size).float()

    def runner(model, context=contextlib.nullcontext, dtype=torch.float32):
        pipeline = quiet(HVAEPipeline(unet=model, scheduler=HVAEScheduler()))

        def call():
            with context():
                return pipeline(
                    num_inference_steps=steps,
                    generator=settings.generator(),
                    latents=latents.to(dtype),
                    batch_size=batch,
                    output_type="latent",
                )

        return call

    default = "default (float32, no_grad)"
    variants = {default: runner(unet), "torch.inference_mode": runner(unet, torch.inference_mode)}
    variants["channels_last"] = runner(copy.deepcopy(unet).to(memory_format=torch.channels_last))
    classic = copy.deepcopy(unet)
    for module in classic.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    variants["AttnProcessor (no SDPA)"] = runner(classic)
    for dtype in (torch.bfloat16, torch.float16) if settings.device.type == "cuda" else (torch.bfloat16,):
        name = str(dtype).replace("torch.", "")
        variants[f"{name} autocast"] = runner(unet, lambda dtype=dtype: torch.autocast(settings.device.type, dtype))
        variants[f"{name} weights"] = runner(copy.deepcopy(unet).to(dtype), dtype=dtype)
    if settings.compile:
        compiled = runner(torch.compile(copy.deepcopy(unet)))
        start = time.perf_counter()
        compiled()
        settings.synchronize()
        report.note("fastpaths", "torch.compile first call", seconds=time.perf_counter() - start)
        variants["torch.compile(unet)"] = compiled
    seconds = time_interleaved(variants, settings)
    for name in variants:
        if name != default:
            case = f"HVAEPipeline batch={batch} steps={steps}"
            report.compare("fastpaths", case, name, seconds[name], default, seconds[default], unit="s per call")
    syncs = count_host_syncs(variants[default], settings)
    report.note("fastpaths", f"host syncs in one call of {steps} steps", syncs="n/a (CPU)" if syncs is None else syncs)


if __name__ == "__main__":
    main_for(run, __doc__)
