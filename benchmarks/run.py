#!/usr/bin/env python
"""Benchmarks of hvae-diffusion side by side with Diffusers' own DDPM pieces.

Every number is a ratio against a baseline run in the same process, on the same tensors, with the same model:
each case is warmed up, then candidate and baseline repetitions are interleaved (their order rotating each round)
and the medians are compared. Timings synchronize CUDA around every repetition.

    python benchmarks/run.py                      # everything, the sizes of issue 6 (about 10-15 min on 2 CPU cores)
    python benchmarks/run.py --quick              # tiny sizes, seconds: a smoke test of the whole script
    python benchmarks/run.py --items scheduler,elbo --repeats 7
    python benchmarks/run.py --device cuda --dtype bfloat16

It prints one table (candidate time, baseline time, ratio, target) and writes the rows as JSON (``--json``) and the
cost-scaling plot as PNG (``--plot``). See docs/benchmarks.md for measured numbers.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch

ITEMS = ("scheduler", "sampling", "cfg", "classifier", "training", "elbo", "scaling", "fastpaths")

# ---------------------------------------------------------------------------------------------------------------
# Settings, timing, memory


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    repeats: int
    warmup: int
    quick: bool
    full: bool
    compile: bool
    scheduler_shapes: list | None = None
    rows: list = field(default_factory=list)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(cases: dict, settings: Settings, repeats: int | None = None, warmup: int | None = None) -> dict:
    """Median seconds of each zero-argument callable in ``cases``, repetitions interleaved with rotating order.

    Returns ``{name: {"median": s, "times": [s, ...]}}``. Each call is bracketed by a device synchronize.
    """
    repeats = settings.repeats if repeats is None else repeats
    warmup = settings.warmup if warmup is None else warmup
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    synchronize(settings.device)
    times = {name: [] for name in names}
    for repetition in range(repeats):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(settings.device)
            start = time.perf_counter()
            cases[name]()
            synchronize(settings.device)
            times[name].append(time.perf_counter() - start)
    return {name: {"median": statistics.median(values), "times": values} for name, values in times.items()}


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{key}:\s+(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets the process's peak resident set size (VmHWM) to the current one (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _allocations_unmapped_on_free():
    """glibc: serve every allocation of 64 KiB or more by mmap, so that freeing it lowers the RSS at once.

    Otherwise freed memory stays resident and is reused, and a peak-RSS reading misses what a call allocates. On
    exit the threshold is left at glibc's maximum (32 MiB), about where its dynamic threshold settles anyway.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield False
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, 64 * 1024)
    malloc_trim(0)
    try:
        yield True
    finally:
        mallopt(m_mmap_threshold, 32 * 2**20)


def peak_memory_mib(fn, device: torch.device) -> tuple[float | None, str]:
    """(peak memory above the level before ``fn()``, in MiB; how it was measured).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU on Linux with glibc: the growth of the peak resident set size
    (VmHWM, reset through /proc/self/clear_refs) while large allocations are unmapped on free. Elsewhere:
    ``tracemalloc`` (Python allocations only, so it misses tensor storage; reported as such).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, "torch.cuda.max_memory_allocated"
    with _allocations_unmapped_on_free() as unmapped:
        before = _proc_status_kib("VmRSS")
        if unmapped and before is not None and _reset_peak_rss():
            fn()
            return max(_proc_status_kib("VmHWM") - before, 0) / 1024, "peak RSS growth (VmHWM)"
    import tracemalloc

    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20, "tracemalloc (Python objects only)"


def add_row(settings, item, case, candidate, candidate_s, baseline, baseline_s, target=None, unit="s", **extra):
    """Record one comparison; ``ratio`` = candidate / baseline, ``met`` = ratio ≤ target (None without a target)."""
    ratio = candidate_s / baseline_s if baseline_s else None
    met = None if target is None or ratio is None else bool(ratio <= target)
    row = {
        "item": item,
        "case": case,
        "candidate": candidate,
        "candidate_s": candidate_s,
        "baseline": baseline,
        "baseline_s": baseline_s,
        "ratio": ratio,
        "target": target,
        "met": met,
        "unit": unit,
    }
    row.update(extra)
    settings.rows.append(row)
    _print_row(row)
    return row


def _format_seconds(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def _print_header():
    print(f"{'item':<10} {'case':<44} {'candidate':<34} {'baseline':<34} {'ratio':>6} {'target':>7}  met", flush=True)


def _print_row(row):
    candidate = f"{row['candidate']} {_format_seconds(row['candidate_s'])}"
    baseline = f"{row['baseline']} {_format_seconds(row['baseline_s'])}" if row["baseline"] else "-"
    ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "-"
    target = f"≤{row['target']:g}" if row["target"] is not None else "-"
    met = {True: "yes", False: "NO", None: ""}[row["met"]]
    print(
        f"{row['item']:<10} {row['case']:<44} {candidate:<34} {baseline:<34} {ratio:>6} {target:>7}  {met}", flush=True
    )


def add_note(settings, item, case, **values):
    """Record a measurement that is not a ratio (a fraction, a count, a memory peak)."""
    row = {
        "item": item,
        "case": case,
        "candidate": None,
        "baseline": None,
        "ratio": None,
        "target": None,
        "met": None,
        **values,
    }
    settings.rows.append(row)
    shown = ", ".join(f"{key}={_format_value(value)}" for key, value in values.items())
    print(f"{item:<10} {case:<44} {shown}", flush=True)
    return row


def _format_value(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# Models shared by the items


def make_unet(settings, sample_size=16, channels=3, num_class_embeds=None):
    """The small UNet2DModel every sampling item uses (one attention block, like diffusers' small configs)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    widths = (8, 16) if settings.quick else (16, 32)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    )
    return to_settings(unet, settings).eval()


def to_settings(model, settings):
    """The model on the device, in the dtype (a float32 model is not re-cast: diffusers warns on every cast)."""
    model = model.to(settings.device)
    return model if settings.dtype == torch.float32 else model.to(settings.dtype)


def unet_size(settings):
    """(sample_size, channels, batch) of the sampling items: issue 6's batch 16, a 16x16 RGB UNet; tiny for --quick."""
    return (8, 1, 2) if settings.quick else (16, 3, 16)


def _pipelines_available():
    try:
        import hvae_diffusion

        return all(
            hasattr(hvae_diffusion, name)
            for name in ("HVAEPipeline", "ClassifierGuidedPipeline", "ClassifierFreeGuidancePipeline")
        )
    except ImportError:
        return False


def _quiet(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ---------------------------------------------------------------------------------------------------------------
# 1. Scheduler step


def _scheduler_loop(scheduler, model_output, initial_sample, seed, device):
    generator = torch.Generator(device).manual_seed(seed)
    sample = initial_sample
    for timestep in scheduler.timesteps:
        sample = scheduler.step(model_output, timestep, sample, generator=generator).prev_sample
    return sample


def _fused_floor_loop(coefficients, model_output, initial_sample, seed, device):
    """The floor: x ← a·x + b·model_output + c·noise, scalars precomputed, noise drawn with the generator each step."""
    generator = torch.Generator(device).manual_seed(seed)
    sample = initial_sample
    last = len(coefficients) - 1
    for index, (a, b, c) in enumerate(coefficients):
        sample = torch.add(sample * a, model_output, alpha=b)
        if index < last:
            noise = torch.randn(sample.shape, generator=generator, device=device, dtype=sample.dtype)
            sample = sample.add_(noise, alpha=c)
    return sample


def bench_scheduler(settings):
    from diffusers import DDPMScheduler

    from hvae_diffusion import HVAEScheduler
    from hvae_diffusion.parameterization import PREDICTION_TYPES

    device, dtype = settings.device, settings.dtype
    num_steps = 20 if settings.quick else 1000
    shapes = settings.scheduler_shapes or ([(2, 1, 8, 8)] if settings.quick else [(16, 1, 32, 32), (64, 3, 64, 64)])
    for shape in shapes:
        all_configs = [(p, v) for p in PREDICTION_TYPES for v in ("fixed_small", "fixed_large", "learned_range")]
        # At the large shape a 1000-step loop takes seconds: the full matrix only with --full.
        large = math.prod(shape) > 100_000
        configs = (
            all_configs
            if settings.full or not large
            else [("epsilon", "fixed_small"), ("v_prediction", "learned_range")]
        )
        # Small-shape loops take a fraction of a second: more repetitions there, against the noise.
        repeats = settings.repeats if large or settings.quick else max(5, settings.repeats)
        generator = torch.Generator().manual_seed(0)
        initial_sample = torch.randn(shape, generator=generator).to(device, dtype)
        for prediction_type, variance_type in configs:
            output_shape = (shape[0], 2 * shape[1], *shape[2:]) if variance_type == "learned_range" else shape
            model_output = (0.1 * torch.randn(output_shape, generator=generator)).to(device, dtype)
            kwargs = dict(num_train_timesteps=num_steps, prediction_type=prediction_type, variance_type=variance_type)
            hvae = HVAEScheduler(**kwargs)
            hvae.set_timesteps(num_steps, device=device)
            # The floor's scalars: any three per step (their values do not change the cost).
            coefficients = [(0.99, -0.01, 0.1)] * num_steps
            cases = {
                "hvae": lambda: _scheduler_loop(hvae, model_output, initial_sample, 0, device),
                "floor": lambda: _fused_floor_loop(
                    coefficients, model_output[:, : shape[1]], initial_sample, 0, device
                ),
            }
            if prediction_type != "score":  # DDPMScheduler has no score parameterization
                ddpm = DDPMScheduler(**kwargs)
                ddpm.set_timesteps(num_steps, device=device)
                cases["ddpm"] = lambda: _scheduler_loop(ddpm, model_output, initial_sample, 0, device)
            result = time_interleaved(cases, settings, repeats=repeats)
            case = f"{list(shape)} {prediction_type}/{variance_type}"
            unit = f"s per {num_steps}-step loop"
            add_row(
                settings,
                "scheduler",
                case,
                "HVAEScheduler.step",
                result["hvae"]["median"],
                "fused floor",
                result["floor"]["median"],
                target=1.3,
                unit=unit,
            )
            if "ddpm" in result:
                add_row(
                    settings,
                    "scheduler",
                    case,
                    "HVAEScheduler.step",
                    result["hvae"]["median"],
                    "DDPMScheduler.step",
                    result["ddpm"]["median"],
                    target=1.0,
                    unit=unit,
                )
                add_row(
                    settings,
                    "scheduler",
                    case,
                    "DDPMScheduler.step",
                    result["ddpm"]["median"],
                    "fused floor",
                    result["floor"]["median"],
                    unit=unit,
                )


# ---------------------------------------------------------------------------------------------------------------
# 5. Training steps per second


class _TimedDataset(torch.utils.data.Dataset):
    """A dataset wrapper that adds up the time spent fetching items (the data-loading share of a step)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.seconds = 0.0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        start = time.perf_counter()
        item = self.dataset[index]
        self.seconds += time.perf_counter() - start
        return item


def _step_intervals(stamps, skip=2):
    """Durations between consecutive step starts, the first ``skip`` (warm-up) dropped."""
    return [later - earlier for earlier, later in zip(stamps, stamps[1:])][skip:]


def bench_training(settings):
    import copy
    import io
    import tempfile

    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler

    from hvae_diffusion import HVAEScheduler
    from hvae_diffusion.training.components import default_unet_config
    from hvae_diffusion.training.data import image_dataset_to_tensors, load_digits_dataset, stack_dataset
    from hvae_diffusion.training.loop import TrainingConfig, train
    from hvae_diffusion.training.losses import DiffusionLoss

    device = settings.device
    if device.type not in ("cpu", "cuda"):
        add_note(settings, "training", "skipped", reason=f"device {device} not supported by this item")
        return
    batch = 8 if settings.quick else 64  # scripts/train.py's default --train_batch_size
    steps = 4 if settings.quick else 25
    rounds = 1 if settings.quick else settings.repeats
    split = load_digits_dataset()["train"]
    train_dataset = image_dataset_to_tensors(split, "image")  # what scripts/train.py trains on (unconditional)
    preloaded, _ = stack_dataset(train_dataset)
    preloaded = preloaded.to(device)
    torch.manual_seed(0)
    initial_unet = UNet2DModel(**default_unet_config(preloaded.shape[-1], preloaded.shape[1]))
    if settings.quick:
        initial_unet = UNet2DModel(**{**default_unet_config(8, 1), "block_out_channels": [8, 16]})

    def fresh_unet():
        return copy.deepcopy(initial_unet).to(device).train()

    def run_package(stamps, data_seconds):
        """hvae_diffusion.training.train, as scripts/train.py calls it (no checkpoints, samples or trackers)."""
        loss_fn = DiffusionLoss(HVAEScheduler())

        def timed_loss(model, batch_dict, randomness=None, encode_prompt=None):
            stamps.append(time.perf_counter())
            return loss_fn(model, batch_dict, randomness, encode_prompt=encode_prompt)

        dataset = _TimedDataset(train_dataset)
        with tempfile.TemporaryDirectory() as output_dir, contextlib.redirect_stderr(io.StringIO()):
            config = TrainingConfig(
                output_dir=output_dir,
                train_batch_size=batch,
                max_train_steps=steps,
                checkpointing_steps=None,
                report_to="none",
            )
            train(config, fresh_unet(), timed_loss, dataset)
        data_seconds.append(dataset.seconds)

    def run_example(stamps, data_seconds):
        """diffusers' examples/unconditional_image_generation/train_unconditional.py, its defaults, by hand."""
        accelerator = Accelerator(mixed_precision="no", cpu=device.type == "cpu")
        model = fresh_unet()
        noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
        dataset = _TimedDataset(train_dataset)  # the example's transforms give the same [-1, 1] tensors
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0, drop_last=True)
        lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=steps)
        model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
        for step, batch_dict in enumerate(loader):
            if step >= steps:
                break
            stamps.append(time.perf_counter())
            clean_images = batch_dict["sample"]
            noise = torch.randn(clean_images.shape, dtype=clean_images.dtype, device=clean_images.device)
            timesteps = torch.randint(0, 1000, (clean_images.shape[0],), device=clean_images.device).long()
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
            with accelerator.accumulate(model):
                model_output = model(noisy_images, timesteps, return_dict=False)[0]
                loss = F.mse_loss(model_output.float(), noise.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "step": step}
            accelerator.log(logs, step=step)
        data_seconds.append(dataset.seconds)

    def run_minimal(stamps, data_seconds):
        """The floor: data preloaded as one tensor, ε-MSE, AdamW, nothing else."""
        model = fresh_unet()
        alphas_cumprod = HVAEScheduler().alphas_cumprod.float().to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        generator = torch.Generator(device).manual_seed(0)
        for _ in range(steps):
            stamps.append(time.perf_counter())
            index = torch.randint(0, len(preloaded), (batch,), device=device, generator=generator)
            clean_images = preloaded[index]
            noise = torch.randn(clean_images.shape, device=device, generator=generator)
            timesteps = torch.randint(0, 1000, (batch,), device=device, generator=generator)
            signal = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
            noisy_images = signal.sqrt() * clean_images + (1 - signal).sqrt() * noise
            loss = F.mse_loss(model(noisy_images, timesteps).sample, noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        data_seconds.append(0.0)

    def run_minimal_one_thread(stamps, data_seconds):
        """The floor on one thread: what `accelerate launch --cpu` (OMP_NUM_THREADS=1) leaves a 2-core CPU."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run_minimal(stamps, data_seconds)
        finally:
            torch.set_num_threads(threads)

    approaches = {"train()": run_package, "example loop": run_example, "minimal loop": run_minimal}
    if device.type == "cpu" and torch.get_num_threads() > 1:
        approaches["minimal loop, 1 thread"] = run_minimal_one_thread
    intervals = {name: [] for name in approaches}
    data_fraction = {name: [] for name in approaches}
    for repetition in range(rounds):
        names = list(approaches)
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            stamps, data_seconds = [], []
            synchronize(device)
            approaches[name](stamps, data_seconds)
            synchronize(device)
            stamps.append(time.perf_counter())
            intervals[name] += _step_intervals(stamps)
            data_fraction[name].append(data_seconds[0] / (stamps[-1] - stamps[0]))
    seconds = {name: statistics.median(values) for name, values in intervals.items()}
    case = f"digits 8x8 batch={batch}"
    for name in ("train()", "example loop"):
        row = add_row(
            settings,
            "training",
            case,
            name,
            seconds[name],
            "minimal loop",
            seconds["minimal loop"],
            target=round(1 / 0.98, 4) if name == "train()" else None,
            unit="s per optimizer step",
            data_wait_fraction=statistics.median(data_fraction[name]),
        )
        row["steps_per_second_ratio"] = seconds["minimal loop"] / seconds[name]
    if "minimal loop, 1 thread" in seconds:
        add_row(
            settings,
            "training",
            case,
            "minimal loop, 1 thread",
            seconds["minimal loop, 1 thread"],
            f"minimal loop, {torch.get_num_threads()} threads",
            seconds["minimal loop"],
            unit="s per optimizer step",
        )
    add_note(
        settings,
        "training",
        case + " data wait",
        **{name.replace(" ", "_"): statistics.median(data_fraction[name]) for name in ("train()", "example loop")},
    )


# ---------------------------------------------------------------------------------------------------------------
# 6. ELBO / bits-per-dim evaluation


def bench_elbo(settings):
    from hvae_diffusion import HVAEScheduler
    from hvae_diffusion.elbo import elbo_terms

    device, dtype = settings.device, settings.dtype
    sample_size, channels, _ = unet_size(settings)
    unet = make_unet(settings, sample_size, channels)

    def denoiser(sample, timesteps):
        return unet(sample, timesteps).sample

    def floor(scheduler, data):
        # One UNet forward per term on the same batch: what any ELBO evaluation must at least do.
        timesteps = torch.empty(data.shape[0], dtype=torch.long, device=device)
        with torch.no_grad():
            for timestep in scheduler.timesteps.tolist():
                unet(data, timesteps.fill_(timestep))

    def data_batch(batch):
        generator = torch.Generator().manual_seed(1)
        return (torch.rand(batch, channels, sample_size, sample_size, generator=generator) * 2 - 1).to(device, dtype)

    chain_lengths = [4, 8] if settings.quick else [10, 100, 1000]
    batches = [1, 2] if settings.quick else [1, 4, 16, 64]
    # T sweep at batch 1, batch sweep on a 20-latent chain: the cost per term is what scales.
    scaling_batch = 2 if settings.quick else 1
    scaling_chain = 4 if settings.quick else 20
    cases_run = [(steps, scaling_batch) for steps in chain_lengths] + [(scaling_chain, batch) for batch in batches]
    cases_run = list(dict.fromkeys(cases_run))
    for num_latents, batch in cases_run:
        scheduler = HVAEScheduler(num_train_timesteps=num_latents)
        data = data_batch(batch)
        holder = {}

        def candidate(scheduler=scheduler, data=data):
            holder["terms"] = elbo_terms(scheduler, denoiser, data, generator=torch.Generator(device).manual_seed(0))

        # The long cases come after short ones that warmed everything up.
        long_case = num_latents * batch > 500
        repeats = min(3, settings.repeats) if long_case else settings.repeats
        result = time_interleaved(
            {"elbo": candidate, "floor": lambda s=scheduler, d=data: floor(s, d)},
            settings,
            repeats=repeats,
            warmup=0 if long_case else 1,
        )
        add_row(
            settings,
            "elbo",
            f"T={num_latents} batch={batch}",
            "elbo_terms",
            result["elbo"]["median"],
            f"{num_latents} UNet fwd",
            result["floor"]["median"],
            target=None,
            unit="s per batch",
            seconds_per_image=result["elbo"]["median"] / batch,
            bits_per_dim=float(holder["terms"].bits_per_dim.mean()),
        )

    # The unbiased subset estimate (hvae_diffusion.training.evaluation.elbo_report with num_timesteps=n: every batch
    # draws its own n of the T latents; the standard error is that of the batch estimates) against all T terms.
    from hvae_diffusion.training.evaluation import elbo_report

    num_latents = chain_lengths[-1]
    num_samples, report_batch = (4, 1) if settings.quick else (8, 2)
    scheduler = HVAEScheduler(num_train_timesteps=num_latents)
    data = data_batch(num_samples)
    reports = {}
    for subset in [None] + ([2] if settings.quick else [10, 50, 200]):
        synchronize(device)
        start = time.perf_counter()
        reports[subset] = elbo_report(
            scheduler,
            denoiser,
            data,
            "full" if subset is None else "uniform",
            None if subset is None else subset + 1,
            batch_size=report_batch,
            generator=torch.Generator(device).manual_seed(0),
            show_progress=False,
        )
        synchronize(device)
        reports[subset]["seconds"] = time.perf_counter() - start
    full = reports.pop(None)
    add_note(
        settings,
        "elbo",
        f"all {num_latents} terms, {num_samples} images",
        seconds=full["seconds"],
        bits_per_dim=full["bits_per_dim"],
        standard_error_bpd=full["standard_error"],
    )
    for subset, report in reports.items():
        standard_error = report["standard_error"]
        add_row(
            settings,
            "elbo",
            f"subset n={subset} of T={num_latents}, {num_samples} images",
            "elbo_report(n)",
            report["seconds"],
            f"all {num_latents} terms",
            full["seconds"],
            unit="s per evaluation",
            bits_per_dim=report["bits_per_dim"],
            standard_error_bpd=standard_error,
            bits_per_dim_all_terms=full["bits_per_dim"],
            z=(report["bits_per_dim"] - full["bits_per_dim"]) / standard_error if standard_error else None,
        )
        add_note(
            settings,
            "elbo",
            f"subset n={subset} estimate",
            bits_per_dim=report["bits_per_dim"],
            standard_error=standard_error,
            all_terms=full["bits_per_dim"],
        )


# ---------------------------------------------------------------------------------------------------------------
# Profiling helpers for the pipeline items


@contextlib.contextmanager
def module_timer(module, device):
    """Accumulate the wall time spent inside ``module.forward`` (synchronizing CUDA at its edges) in ``times["s"]``."""
    times = {"s": 0.0, "calls": 0}
    starts = []

    def before(*_):
        synchronize(device)
        starts.append(time.perf_counter())

    def after(*_):
        synchronize(device)
        times["s"] += time.perf_counter() - starts.pop()
        times["calls"] += 1

    handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield times
    finally:
        for handle in handles:
            handle.remove()


def fraction_outside(module, call, device) -> tuple[float, float, int]:
    """(fraction of ``call()``'s time spent outside ``module``'s forward, total seconds, forward calls)."""
    with module_timer(module, device) as inside:
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        total = time.perf_counter() - start
    return 1.0 - inside["s"] / total, total, inside["calls"]


def _generator(device, seed=0):
    return torch.Generator(device).manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# 2. Sampling: HVAEPipeline vs DDPMPipeline


def bench_sampling(settings):
    from diffusers import DDPMPipeline, DDPMScheduler

    from hvae_diffusion import HVAEPipeline, HVAEScheduler

    device = settings.device
    sample_size, channels, batch = unet_size(settings)
    unet = make_unet(settings, sample_size, channels)
    ddpm = _quiet(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).to(device))
    hvae = _quiet(HVAEPipeline(unet=unet, scheduler=HVAEScheduler()).to(device))
    for steps in [5] if settings.quick else [100, 1000]:

        def run_ddpm(steps=steps):
            return ddpm(batch_size=batch, num_inference_steps=steps, generator=_generator(device), output_type="np")

        def run_hvae(steps=steps):
            return hvae(batch_size=batch, num_inference_steps=steps, generator=_generator(device), output_type="np")

        # 1000 steps take long on a CPU: the 100-step case warmed everything up, and two interleaved pairs (plus
        # the profiled pair) give the ratio.
        long_run = steps >= 1000
        result = time_interleaved(
            {"hvae": run_hvae, "ddpm": run_ddpm},
            settings,
            repeats=min(2, settings.repeats) if long_run else None,
            warmup=0 if long_run else None,
        )
        outside_hvae, _, _ = fraction_outside(unet, run_hvae, device)
        outside_ddpm, _, _ = fraction_outside(unet, run_ddpm, device)
        add_row(
            settings,
            "sampling",
            f"batch={batch} steps={steps}",
            "HVAEPipeline",
            result["hvae"]["median"],
            "DDPMPipeline",
            result["ddpm"]["median"],
            target=1.0,
            unit="s per call",
            fraction_outside_unet=outside_hvae,
            baseline_fraction_outside_unet=outside_ddpm,
        )
        add_note(
            settings,
            "sampling",
            f"batch={batch} steps={steps} time outside UNet",
            hvae=outside_hvae,
            ddpm=outside_ddpm,
        )


# ---------------------------------------------------------------------------------------------------------------
# 3. Classifier-free guidance


def bench_cfg(settings):
    import inspect

    from hvae_diffusion import ClassifierFreeGuidancePipeline, HVAEScheduler

    device = settings.device
    sample_size, channels, batch = unet_size(settings)
    num_classes = 10
    unet = make_unet(settings, sample_size, channels, num_class_embeds=num_classes + 1)
    pipeline = _quiet(
        ClassifierFreeGuidancePipeline(unet=unet, scheduler=HVAEScheduler(), null_class_label=num_classes).to(device)
    )
    steps = 4 if settings.quick else 50
    labels = torch.arange(batch, device=device) % num_classes
    null = torch.full_like(labels, num_classes)
    doubled_labels = torch.cat([null, labels])
    latents = torch.randn(batch, channels, sample_size, sample_size, generator=_generator("cpu")).to(
        device, settings.dtype
    )
    timesteps = torch.linspace(999, 0, steps).long().to(device)

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
    # The pipeline's option for how the two halves run (see docs/benchmarks.md), when it has one.
    option = "guidance_batching" if "guidance_batching" in inspect.signature(pipeline.__call__).parameters else None
    modes = ["batched", "separate"] if option else [None]
    for mode in modes:
        kwargs = {option: mode} if option else {}

        def run(kwargs=kwargs):
            return pipeline(
                class_labels=labels.tolist(),
                guidance_scale=3.0,
                num_inference_steps=steps,
                generator=_generator(device),
                latents=latents,
                output_type="latent",
                **kwargs,
            )

        cases[f"pipeline {mode or 'default'}"] = run
    result = time_interleaved(cases, settings)
    floor_name = min(("doubled batch", "two forwards"), key=lambda name: result[name]["median"])
    per_step = {name: value["median"] / steps for name, value in result.items()}
    add_row(
        settings,
        "cfg",
        f"batch={batch} steps={steps}",
        "UNet(2B) once",
        per_step["doubled batch"],
        "UNet(B) twice",
        per_step["two forwards"],
        unit="s per step",
    )
    for name in cases:
        if name.startswith("pipeline"):
            add_row(
                settings,
                "cfg",
                f"batch={batch} steps={steps}",
                name,
                per_step[name],
                f"faster: {floor_name}",
                per_step[floor_name],
                target=1.05,
                unit="s per step",
            )


# ---------------------------------------------------------------------------------------------------------------
# 4. Classifier guidance


def make_classifier(settings, sample_size, channels, num_classes=10):
    from hvae_diffusion.models.noisy_classifier import NoisyClassifier

    torch.manual_seed(1)
    widths = (8, 16) if settings.quick else (16, 32)
    classifier = NoisyClassifier(
        sample_size=sample_size,
        in_channels=channels,
        num_classes=num_classes,
        block_out_channels=widths,
        norm_num_groups=8,
    )
    return to_settings(classifier, settings).eval()


def bench_classifier(settings):
    from hvae_diffusion import ClassifierGuidedPipeline, HVAEScheduler

    device = settings.device
    sample_size, channels, batch = unet_size(settings)
    unet = make_unet(settings, sample_size, channels)
    classifier = make_classifier(settings, sample_size, channels)
    pipeline = _quiet(ClassifierGuidedPipeline(unet=unet, scheduler=HVAEScheduler(), classifier=classifier).to(device))
    steps = 4 if settings.quick else 50
    labels = torch.arange(batch, device=device) % 10
    latents = torch.randn(batch, channels, sample_size, sample_size, generator=_generator("cpu")).to(
        device, settings.dtype
    )
    timesteps = torch.linspace(999, 0, steps).long().to(device)

    def floor():
        # One UNet forward without gradients, one classifier forward and backward to the input, per step.
        for timestep in timesteps:
            with torch.no_grad():
                unet(latents, timestep).sample
            with torch.enable_grad():
                sample = latents.detach().requires_grad_(True)
                log_probs = torch.log_softmax(classifier(sample, timestep).logits.float(), dim=-1)
                torch.autograd.grad(log_probs.gather(1, labels[:, None]).sum(), sample)

    def run():
        return pipeline(
            class_labels=labels.tolist(),
            guidance_scale=2.0,
            num_inference_steps=steps,
            generator=_generator(device),
            latents=latents,
            output_type="latent",
        )

    result = time_interleaved({"pipeline": run, "floor": floor}, settings)
    # The noisy-classifier mode must not differentiate through the UNet: count its forwards run with grad enabled.
    with_grad = []
    handle = unet.register_forward_pre_hook(lambda *_: with_grad.append(torch.is_grad_enabled()))
    try:
        run()
    finally:
        handle.remove()
    add_note(
        settings, "classifier", "UNet forwards with autograd on, one call", count=sum(with_grad), of=len(with_grad)
    )
    add_row(
        settings,
        "classifier",
        f"batch={batch} steps={steps} noisy",
        "ClassifierGuidedPipeline",
        result["pipeline"]["median"] / steps,
        "UNet fwd + clf fwd/bwd",
        result["floor"]["median"] / steps,
        target=1.1,
        unit="s per step",
    )


# ---------------------------------------------------------------------------------------------------------------
# 7. How cost grows with steps and batch


def bench_scaling(settings, plot_path=None):
    from hvae_diffusion import HVAEPipeline, HVAEScheduler

    device = settings.device
    sample_size, channels, default_batch = unet_size(settings)
    unet = make_unet(settings, sample_size, channels)
    pipeline = _quiet(HVAEPipeline(unet=unet, scheduler=HVAEScheduler()).to(device))

    def run(batch, steps):
        return pipeline(
            batch_size=batch, num_inference_steps=steps, generator=_generator(device), output_type="latent"
        )

    step_counts = [2, 5, 10] if settings.quick else [10, 30, 100, 300, 1000]
    steps_batch = 1 if settings.quick else 4
    batches = [1, 2, 4] if settings.quick else [1, 2, 4, 8, 16, 32, 64]
    batch_steps = 3 if settings.quick else 20
    by_steps, by_batch = [], []
    for steps in step_counts:
        repeats = min(3, settings.repeats) if steps >= 300 else settings.repeats
        seconds = time_interleaved({"run": lambda steps=steps: run(steps_batch, steps)}, settings, repeats=repeats)
        seconds = seconds["run"]["median"]
        by_steps.append(
            {"steps": steps, "batch": steps_batch, "seconds": seconds, "seconds_per_step": seconds / steps}
        )
        add_note(
            settings,
            "scaling",
            f"batch={steps_batch} steps={steps}",
            seconds=seconds,
            ms_per_step=1e3 * seconds / steps,
        )
    for batch in batches:
        seconds = time_interleaved({"run": lambda batch=batch: run(batch, batch_steps)}, settings)["run"]["median"]
        peak, how = peak_memory_mib(lambda batch=batch: run(batch, batch_steps), device)
        by_batch.append({"steps": batch_steps, "batch": batch, "seconds": seconds, "peak_memory_mib": peak})
        add_note(
            settings,
            "scaling",
            f"batch={batch} steps={batch_steps}",
            seconds=seconds,
            ms_per_image_step=1e3 * seconds / (batch * batch_steps),
            peak_memory_mib=peak,
            memory=how,
        )
    if plot_path:
        plot_scaling(by_steps, by_batch, plot_path, settings)
    return by_steps, by_batch


def plot_scaling(by_steps, by_batch, path, settings):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.loglog([row["steps"] for row in by_steps], [row["seconds"] for row in by_steps], "o-")
    left.set_xlabel("num_inference_steps")
    left.set_ylabel("seconds per call")
    left.set_title(f"HVAEPipeline, batch {by_steps[0]['batch']}")
    left.grid(True, which="both", alpha=0.3)
    batches = [row["batch"] for row in by_batch]
    right.loglog(batches, [row["seconds"] for row in by_batch], "o-", color="C0", label="time")
    right.set_xlabel("batch size")
    right.set_ylabel("seconds per call", color="C0")
    right.set_title(f"{by_batch[0]['steps']} steps")
    right.grid(True, which="both", alpha=0.3)
    memory = right.twinx()
    memory.plot(batches, [row["peak_memory_mib"] for row in by_batch], "s--", color="C1")
    memory.set_ylabel("peak memory (MiB)", color="C1")
    figure.suptitle(f"HVAEPipeline cost, {settings.device} {str(settings.dtype).replace('torch.', '')}")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"wrote {path}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Fast paths


def _count_host_syncs(call, device) -> int | None:
    """CUDA: the synchronizing operations ``call()`` performs (torch's sync debug mode); None elsewhere."""
    if device.type != "cuda":
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


def bench_fastpaths(settings):
    import copy

    from diffusers.models.attention_processor import Attention, AttnProcessor

    from hvae_diffusion import HVAEPipeline, HVAEScheduler

    device = settings.device
    sample_size, channels, batch = unet_size(settings)
    steps = 3 if settings.quick else 50
    unet = make_unet(settings, sample_size, channels)
    latents = torch.randn(batch, channels, sample_size, sample_size, generator=_generator("cpu")).to(
        device, settings.dtype
    )

    def pipeline_with(model):
        return _quiet(HVAEPipeline(unet=model, scheduler=HVAEScheduler()).to(device))

    def runner(pipeline, context=contextlib.nullcontext):
        def run():
            with context():
                return pipeline(
                    batch_size=batch,
                    num_inference_steps=steps,
                    generator=_generator(device),
                    latents=latents,
                    output_type="latent",
                )

        return run

    baseline = pipeline_with(unet)
    base_name = f"default ({str(settings.dtype).replace('torch.', '')}, no_grad)"
    variants = {base_name: runner(baseline)}
    variants["torch.inference_mode"] = runner(baseline, torch.inference_mode)
    variants["channels_last"] = runner(pipeline_with(copy.deepcopy(unet).to(memory_format=torch.channels_last)))
    classic = copy.deepcopy(unet)
    for module in classic.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    variants["AttnProcessor (no SDPA)"] = runner(pipeline_with(classic))
    low_precision = torch.float16 if device.type == "cuda" else torch.bfloat16
    precision_name = str(low_precision).replace("torch.", "")
    if settings.dtype == torch.float32:
        variants[f"{precision_name} autocast"] = runner(
            baseline, lambda: torch.autocast(device.type, dtype=low_precision)
        )
        variants[f"{precision_name} weights"] = runner(pipeline_with(copy.deepcopy(unet).to(low_precision)))
    if settings.compile:
        # Diffusers' idiom, which these pipelines support as they are: replace the component by its compiled module.
        compiled = pipeline_with(copy.deepcopy(unet))
        compiled.unet = torch.compile(compiled.unet)
        start = time.perf_counter()
        runner(compiled)()
        synchronize(device)
        add_note(settings, "fastpaths", "torch.compile first call (compile time)", seconds=time.perf_counter() - start)
        variants["torch.compile(unet)"] = runner(compiled)
    result = time_interleaved(variants, settings)
    for name in variants:
        if name != base_name:
            add_row(
                settings,
                "fastpaths",
                f"HVAEPipeline batch={batch} steps={steps}",
                name,
                result[name]["median"],
                base_name,
                result[base_name]["median"],
                unit="s per call",
            )
    syncs = _count_host_syncs(runner(baseline), device)
    add_note(
        settings,
        "fastpaths",
        f"host syncs in one call of {steps} steps",
        syncs=syncs if syncs is not None else "n/a (CPU)",
    )


# ---------------------------------------------------------------------------------------------------------------
# Main


def markdown_table(report) -> str:
    """The rows as a Markdown table (the one docs/benchmarks.md quotes), measurements without a baseline after it."""
    lines = [
        "| item | case | candidate | time | baseline | time | ratio | target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = ["", "| item | case | values |", "|---|---|---|"]
    for row in report["rows"]:
        if row["baseline"] is None:
            shown = ", ".join(
                f"{key}={_format_value(value)}"
                for key, value in row.items()
                if key not in ("item", "case", "candidate", "baseline", "ratio", "target", "met")
            )
            notes.append(f"| {row['item']} | {row['case']} | {shown} |")
            continue
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "-"
        target = f"≤ {row['target']:g}" if row["target"] is not None else ""
        met = {True: "yes", False: "**no**", None: ""}[row["met"]]
        lines.append(
            f"| {row['item']} | {row['case']} | {row['candidate']} | {_format_seconds(row['candidate_s'])} | "
            f"{row['baseline']} | {_format_seconds(row['baseline_s'])} | {ratio} | {target} | {met} |"
        )
    return "\n".join(lines + (notes if len(notes) > 3 else [])) + "\n"


def machine_info(settings) -> dict:
    import diffusers

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": str(settings.device),
        "dtype": str(settings.dtype).replace("torch.", ""),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if settings.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(settings.device)
    return info


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--items", default=",".join(ITEMS), help=f"comma-separated subset of {','.join(ITEMS)} (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (seconds)")
    parser.add_argument(
        "--full",
        action="store_true",
        help="every prediction/variance type at the large scheduler shape too (slow on CPU)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per case (default 3, quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per case before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--scheduler-shapes",
        default=None,
        help="shapes of the scheduler item, e.g. 16x1x32x32,64x3x64x64 (the default)",
    )
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the UNet (fastpaths)")
    parser.add_argument("--json", default="benchmarks/results.json", help="where to write the rows")
    parser.add_argument("--plot", default="benchmarks/scaling.png", help="where to write the scaling plot (item 7)")
    parser.add_argument("--markdown", default=None, help="also write the table as Markdown to this file")
    args = parser.parse_args(argv)
    items = [item.strip() for item in args.items.split(",") if item.strip()]
    unknown = sorted(set(items) - set(ITEMS))
    if unknown:
        parser.error(f"--items: unknown {unknown}; choose from {','.join(ITEMS)}")
    args.items = items
    if args.scheduler_shapes:
        try:
            args.scheduler_shapes = [
                tuple(int(n) for n in shape.split("x")) for shape in args.scheduler_shapes.split(",")
            ]
        except ValueError:
            parser.error(f"--scheduler-shapes: expected e.g. 16x1x32x32,64x3x64x64, got {args.scheduler_shapes!r}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv=None):
    from diffusers.utils import logging as diffusers_logging

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if args.device == "auto"
        else torch.device(args.device)
    )
    settings = Settings(
        device=device,
        dtype=getattr(torch, args.dtype),
        repeats=args.repeats or (2 if args.quick else 3),
        warmup=args.warmup,
        quick=args.quick,
        full=args.full,
        compile=args.compile,
        scheduler_shapes=args.scheduler_shapes,
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    diffusers_logging.set_verbosity_error()  # casts to bfloat16 warn on every model; the table is the output
    info = machine_info(settings)
    print(json.dumps(info), flush=True)
    _print_header()
    benches = {
        "scheduler": bench_scheduler,
        "sampling": bench_sampling,
        "cfg": bench_cfg,
        "classifier": bench_classifier,
        "training": bench_training,
        "elbo": bench_elbo,
        "scaling": lambda settings: bench_scaling(settings, args.plot),
        "fastpaths": bench_fastpaths,
    }
    skipped = {}
    for item in args.items:
        bench = benches.get(item)
        if bench is None:
            skipped[item] = "not implemented in this version of run.py"
            print(f"{item:<10} skipped: {skipped[item]}", flush=True)
            continue
        started = time.perf_counter()
        with torch.inference_mode(False):
            bench(settings)
        print(f"{item:<10} ({time.perf_counter() - started:.1f} s)", flush=True)
    report = {"machine": info, "items": args.items, "skipped": skipped, "rows": settings.rows}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1, default=str)
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(markdown_table(report))
        print(f"wrote {args.markdown}")
    return report


if __name__ == "__main__":
    main()
