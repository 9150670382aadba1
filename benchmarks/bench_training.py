#!/usr/bin/env python
"""Training steps: the package's ``train()`` and Diffusers' example loop against a minimal loop (target ≥ 0.98× its
steps per second, that is ≤ 1/0.98 its time a step).

All three train the same UNet (``scripts/train.py``'s default for the 8x8 digits) at batch 64 on the built-in
digits. The minimal loop indexes one preloaded tensor and does ε-MSE and AdamW, nothing else; the example loop is
``examples/unconditional_image_generation/train_unconditional.py``'s by hand. The share of a step spent fetching
data is reported for the two loops that read the dataset.

    python benchmarks/bench_training.py [--quick] [--device cuda] [--autocast bfloat16]
"""

import contextlib
import copy
import io
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from benchmarking_utils import main_for

MIXED_PRECISION = {"none": "no", "bfloat16": "bf16", "float16": "fp16"}


class TimedDataset(torch.utils.data.Dataset):
    """Adds up the time spent fetching items (the data-loading share of a step)."""

    def __init__(self, dataset):
        self.dataset, self.seconds = dataset, 0.0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        start = time.perf_counter()
        item = self.dataset[index]
        self.seconds += time.perf_counter() - start
        return item


def run(settings, report):
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler

    from hvae_diffusion import HVAEScheduler
    from hvae_diffusion.training.components import default_unet_config
    from hvae_diffusion.training.data import image_dataset_to_tensors, load_digits_dataset, stack_dataset
    from hvae_diffusion.training.loop import TrainingConfig, train
    from hvae_diffusion.training.losses import DiffusionLoss

    device = settings.device
    batch, steps = (8, 4) if settings.quick else (64, 25)
    train_dataset = image_dataset_to_tensors(load_digits_dataset()["train"], "image")
    preloaded = stack_dataset(train_dataset)[0].to(device)
    config = default_unet_config(preloaded.shape[-1], preloaded.shape[1])
    torch.manual_seed(0)
    initial_unet = UNet2DModel(**(dict(config, block_out_channels=[8, 16]) if settings.quick else config))
    mixed_precision = MIXED_PRECISION[settings.autocast]

    def fresh_unet():
        return settings.prepare(copy.deepcopy(initial_unet).train(), cast=False)

    def run_package(stamps):
        """hvae_diffusion.training.train, as scripts/train.py calls it (no checkpoints, samples or trackers)."""
        loss_fn = DiffusionLoss(HVAEScheduler())

        def timed_loss(*args, **kwargs):
            stamps.append(time.perf_counter())
            return loss_fn(*args, **kwargs)

        dataset = TimedDataset(train_dataset)
        with tempfile.TemporaryDirectory() as output_dir, contextlib.redirect_stderr(io.StringIO()):
            train_config = TrainingConfig(
                output_dir=output_dir,
                train_batch_size=batch,
                max_train_steps=steps,
                checkpointing_steps=None,
                report_to="none",
                mixed_precision=mixed_precision,
            )
            train(train_config, fresh_unet(), timed_loss, dataset)
        return dataset.seconds

    def run_example(stamps):
        """Diffusers' train_unconditional.py with its defaults, by hand (its transforms give the same tensors)."""
        accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
        model = fresh_unet()
        noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
        dataset = TimedDataset(train_dataset)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True)
        lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=steps)
        model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
        for step, batch_dict in zip(range(steps), loader):
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
            accelerator.log({"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}, step=step)
        return dataset.seconds

    def run_minimal(stamps):
        """The floor: data preloaded as one tensor, ε-MSE, AdamW, nothing else."""
        model = fresh_unet()
        alphas_cumprod = HVAEScheduler().alphas_cumprod.float().to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        generator = settings.generator()
        for _ in range(steps):
            stamps.append(time.perf_counter())
            clean_images = preloaded[torch.randint(0, len(preloaded), (batch,), device=device, generator=generator)]
            noise = torch.randn(clean_images.shape, device=device, generator=generator)
            timesteps = torch.randint(0, 1000, (batch,), device=device, generator=generator)
            signal = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
            with settings.autocast_context():
                prediction = model(signal.sqrt() * clean_images + (1 - signal).sqrt() * noise, timesteps).sample
            F.mse_loss(prediction.float(), noise).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return 0.0

    loops = {"train()": run_package, "example loop": run_example, "minimal loop": run_minimal}
    intervals, data_fraction = {name: [] for name in loops}, {name: [] for name in loops}
    for repetition in range(1 if settings.quick else settings.repeats):
        names = list(loops)[repetition % len(loops) :] + list(loops)[: repetition % len(loops)]
        for name in names:
            stamps = []
            settings.synchronize()
            data_seconds = loops[name](stamps)
            settings.synchronize()
            stamps.append(time.perf_counter())
            # the first two steps warm up
            intervals[name] += [later - earlier for earlier, later in zip(stamps, stamps[1:])][2:]
            data_fraction[name].append(data_seconds / (stamps[-1] - stamps[0]))
    seconds = {name: statistics.median(values) for name, values in intervals.items()}
    for name in ("train()", "example loop"):
        report.compare(
            "training",
            f"digits 8x8 batch={batch}",
            name,
            seconds[name],
            "minimal loop",
            seconds["minimal loop"],
            target=round(1 / 0.98, 4) if name == "train()" else None,
            unit="s per optimizer step",
            data_wait_fraction=statistics.median(data_fraction[name]),
        )


if __name__ == "__main__":
    main_for(run, __doc__)
