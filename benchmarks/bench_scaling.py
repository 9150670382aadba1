#!/usr/bin/env python
"""How HVAEPipeline's cost grows with the number of steps and the batch size; a figure of both.

Time against steps 10..1000 at batch 4, and against batch 1..64 at 20 steps (with the peak memory on CUDA,
``torch.cuda.max_memory_allocated``). Writes ``<output_dir>/scaling.png``.

    python benchmarks/bench_scaling.py [--quick] [--device cuda]
"""

import os

import torch
from benchmarking_utils import main_for, make_unet, quiet, time_interleaved


def peak_memory_mib(call, settings):
    """The peak memory ``call()`` allocates above what was allocated before, on CUDA; None on the CPU.

    On the CPU the process's peak resident set size was tried (reset through /proc/self/clear_refs, glibc told to
    unmap large blocks on free): after a batch-64 call a batch-16 call read 0 MiB, with or without the glibc
    setting, since freed memory is reused. A number that depends on what ran before is not reported.
    """
    if settings.device.type != "cuda":
        return None
    settings.synchronize()
    torch.cuda.reset_peak_memory_stats(settings.device)
    before = torch.cuda.memory_allocated(settings.device)
    call()
    settings.synchronize()
    return (torch.cuda.max_memory_allocated(settings.device) - before) / 2**20


def run(settings, report):
    from hvae_diffusion import HVAEPipeline, HVAEScheduler

    pipeline = quiet(HVAEPipeline(unet=make_unet(settings), scheduler=HVAEScheduler()))

    def call(batch, steps):
        return pipeline(
            batch_size=batch, num_inference_steps=steps, generator=settings.generator(), output_type="latent"
        )

    step_counts, steps_batch = ([2, 5], 1) if settings.quick else ([10, 30, 100, 300, 1000], 4)
    batches, batch_steps = ([1, 2, 4], 3) if settings.quick else ([1, 2, 4, 8, 16, 32, 64], 20)
    by_steps, by_batch = [], []
    for steps in step_counts:
        repeats = min(3, settings.repeats) if steps >= 300 else settings.repeats
        seconds = time_interleaved({"run": lambda: call(steps_batch, steps)}, settings, repeats=repeats)["run"]
        by_steps.append(seconds)
        report.note(
            "scaling", f"batch={steps_batch} steps={steps}", seconds=seconds, ms_per_step=1e3 * seconds / steps
        )
    for batch in batches:
        seconds = time_interleaved({"run": lambda: call(batch, batch_steps)}, settings)["run"]
        memory = peak_memory_mib(lambda: call(batch, batch_steps), settings)
        by_batch.append((seconds, memory))
        report.note(
            "scaling",
            f"batch={batch} steps={batch_steps}",
            seconds=seconds,
            ms_per_image_step=1e3 * seconds / (batch * batch_steps),
            peak_memory_mib=memory,
        )
    plot(step_counts, by_steps, steps_batch, batches, by_batch, batch_steps, settings)


def plot(step_counts, by_steps, steps_batch, batches, by_batch, batch_steps, settings):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.loglog(step_counts, by_steps, "o-")
    left.set(xlabel="num_inference_steps", ylabel="seconds per call", title=f"HVAEPipeline, batch {steps_batch}")
    right.loglog(batches, [seconds for seconds, _ in by_batch], "o-", color="C0")
    right.set(xlabel="batch size", ylabel="seconds per call", title=f"{batch_steps} steps")
    if by_batch[0][1] is not None:
        memory = right.twinx()
        memory.plot(batches, [mib for _, mib in by_batch], "s--", color="C1")
        memory.set_ylabel("peak memory (MiB)", color="C1")
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
    figure.suptitle(f"HVAEPipeline cost, {settings.describe()}")
    figure.tight_layout()
    os.makedirs(settings.output_dir, exist_ok=True)
    path = os.path.join(settings.output_dir, "scaling.png")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main_for(run, __doc__)
