"""The training loop every script uses: any model, any per-batch loss, any dataset of tensors, with Accelerate.

``train(config, model, loss_fn, train_dataset)`` runs the optimization of Diffusers' training examples (AdamW,
``diffusers.optimization.get_scheduler``, ``EMAModel``, gradient accumulation, mixed precision, tensorboard,
tqdm) with three guarantees the examples do not give:

- Reproducible and resumable exactly: the data order of each epoch and the randomness of each micro-batch
  (timesteps, noise, condition dropout) are drawn from generators seeded by (seed, epoch) and (seed, micro-step),
  so a run killed and resumed from a checkpoint ends with the same weights as an uninterrupted one.
- Process-count invariant: with N processes of ``train_batch_size`` each, every process draws the randomness of
  the global batch and keeps its rows (``losses.BatchRandomness``), and the global batch is the same examples in
  the same order as one process with ``N * train_batch_size``; the gradients DDP averages are then those of one
  process (up to float summation order).
- Crash-safe checkpoints: ``accelerator.save_state`` writes ``checkpoint-<step>.tmp`` and it is renamed to
  ``checkpoint-<step>`` only when complete; old ones are deleted only after the new one is in place. A non-finite
  loss stops the run before the bad update, keeping the last good checkpoint.
"""

import contextlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field

import torch

from .losses import BatchRandomness

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainingConfig:
    """Optimization settings, named as in Diffusers' ``train_unconditional.py``.

    ``train_batch_size`` is per process; the global batch is ``train_batch_size × num_processes ×
    gradient_accumulation_steps``. ``max_train_steps`` (optimizer steps) overrides ``num_epochs``.
    ``checkpointing_steps`` 0/None disables checkpoints; ``save_images_steps`` 0/None disables sample grids
    during training (one is still saved at the end when a ``sample_fn`` is given).
    """

    output_dir: str
    train_batch_size: int = 64
    num_epochs: int = 1
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    use_ema: bool = False
    ema_max_decay: float = 0.9999
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.75
    checkpointing_steps: int | None = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    seed: int = 0
    report_to: str | None = "tensorboard"
    logging_dir: str = "logs"
    save_images_steps: int | None = None
    dataloader_num_workers: int = 0
    tracker_project_name: str = "train"
    extra_log_config: dict = field(default_factory=dict)

    def __post_init__(self):
        positive = ["train_batch_size", "gradient_accumulation_steps", "num_epochs"]
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError(f"--max_train_steps must be a positive integer, got {self.max_train_steps!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed_precision must be one of ('no', 'fp16', 'bf16'), got {self.mixed_precision!r}")
        if self.report_to not in (None, "none", "tensorboard", "wandb", "all"):
            raise ValueError(f"--report_to must be tensorboard, wandb, all or none, got {self.report_to!r}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"--checkpoints_total_limit must be >= 1, got {self.checkpoints_total_limit}")


@dataclass
class TrainingResult:
    """What a finished run reports: optimizer steps done, the last logged loss, the run's loss history."""

    global_step: int
    final_loss: float
    losses: list
    resumed_from: str | None = None


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before applying that update."""


def micro_step_seed(seed: int, micro_step: int) -> int:
    """A distinct 63-bit seed per (run seed, micro-step) for the generator of that micro-batch's randomness."""
    return (seed * 6364136223846793005 + micro_step * 1442695040888963407 + 1) % (2**63)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This process's index batches: epoch e shuffles with seed + e, each global batch of
    ``batch_size × num_processes`` consecutive indices is split in process order, the last partial one dropped."""

    def __init__(self, dataset_size, batch_size, num_processes, process_index, seed, epoch=0, skip_batches=0):
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.epoch = epoch
        self.skip_batches = skip_batches

    @staticmethod
    def batches_per_epoch(dataset_size, batch_size, num_processes):
        return dataset_size // (batch_size * num_processes)

    def __len__(self):
        return self.batches_per_epoch(self.dataset_size, self.batch_size, self.num_processes) - self.skip_batches

    def __iter__(self):
        order = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        global_batch = self.batch_size * self.num_processes
        for batch in range(self.skip_batches, len(self) + self.skip_batches):
            start = batch * global_batch + self.process_index * self.batch_size
            yield order[start : start + self.batch_size].tolist()


def collate(items):
    """Stack a list of dataset items into a batch dict ``{"sample", "class_labels"?, "prompt"?}``.

    Items may be dicts with those keys, tensors (samples only), or ``(sample, label)`` tuples (a ``TensorDataset``).
    """
    first = items[0]
    if isinstance(first, dict):
        batch = {"sample": torch.stack([torch.as_tensor(item["sample"]) for item in items])}
        if "class_labels" in first:
            batch["class_labels"] = torch.as_tensor([int(item["class_labels"]) for item in items])
        if "prompt" in first:
            batch["prompt"] = [item["prompt"] for item in items]
        return batch
    if isinstance(first, torch.Tensor):
        return {"sample": torch.stack(items)}
    if isinstance(first, (tuple, list)):
        batch = {"sample": torch.stack([item[0] for item in items])}
        if len(first) > 1:
            batch["class_labels"] = torch.stack([torch.as_tensor(item[1]) for item in items]).long()
        return batch
    raise TypeError(f"dataset items must be dicts, tensors or (sample, label) tuples, got {type(first).__name__}")


def list_checkpoints(output_dir):
    """Complete checkpoints in ``output_dir`` as ``[(step, path)]``, oldest first (``.tmp`` ones are incomplete)."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        (int(m.group(1)), os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if (m := CHECKPOINT_PATTERN.match(name))
    ]
    return sorted(found)


def resolve_checkpoint(output_dir, resume_from_checkpoint):
    """The checkpoint to resume from: ``"latest"`` → the newest complete one (None if there is none), else a path.

    A path (or a ``checkpoint-<step>`` name inside ``output_dir``) that does not exist is a ``ValueError``.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(output_dir, resume_from_checkpoint)
    name = os.path.basename(os.path.normpath(path))
    if not os.path.isdir(path) or not CHECKPOINT_PATTERN.match(name):
        available = [os.path.basename(p) for _, p in list_checkpoints(output_dir)]
        raise ValueError(
            f"--resume_from_checkpoint={resume_from_checkpoint!r}: no such checkpoint (a checkpoint-<step> folder); "
            f"complete checkpoints in {output_dir!r}: {available or 'none'}; use 'latest' to pick the newest"
        )
    return path


def save_checkpoint(accelerator, output_dir, global_step, total_limit):
    """``accelerator.save_state`` to ``checkpoint-<step>.tmp``, then an atomic rename; prune beyond ``total_limit``."""
    final_path = os.path.join(output_dir, f"checkpoint-{global_step}")
    temporary_path = final_path + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary_path, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary_path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(temporary_path, "training_state.json"), "w") as handle:
            json.dump({"global_step": global_step}, handle)
        if os.path.isdir(final_path):
            shutil.rmtree(final_path)
        os.replace(temporary_path, final_path)
        if total_limit is not None:
            for _, old_path in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old_path)
    accelerator.wait_for_everyone()
    return final_path


def make_accelerator(config):
    """An ``Accelerator`` for ``config`` (trackers under ``output_dir/logging_dir``)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    # a second run in the same process (a notebook, a test) may change mixed precision; the process group stays
    AcceleratorState._reset_state(reset_partial_state=False)

    report_to = None if config.report_to in (None, "none") else config.report_to
    if report_to == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ValueError("--report_to tensorboard needs `pip install tensorboard` (or pass --report_to none)")
    project_config = ProjectConfiguration(
        project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, config.logging_dir)
    )
    return Accelerator(mixed_precision=config.mixed_precision, log_with=report_to, project_config=project_config)


def train(
    config, model, loss_fn, train_dataset, *, sample_fn=None, save_fn=None, encode_prompt=None, accelerator=None
):
    """Train ``model`` on ``train_dataset`` by minimizing ``loss_fn``, then save it with ``save_fn``.

    Args:
        config: a ``TrainingConfig``.
        model: a ``torch.nn.Module`` (a Diffusers ``ModelMixin`` for EMA and saving).
        loss_fn: ``loss_fn(model, batch, randomness, encode_prompt=...) -> (loss, {name: value})`` on a batch dict
            (see ``collate``); ``losses.DiffusionLoss`` and ``losses.NoisyClassifierLoss`` are such functions.
        train_dataset: a map-style dataset of dicts, tensors ``[C, H, W]`` / ``[D]``, or ``(sample, label)``.
        sample_fn: ``sample_fn(model, step) -> PIL.Image``, a sample grid saved to ``output_dir/samples``.
        save_fn: ``save_fn(model, output_dir)``, called once at the end on the main process with the (EMA) weights.
        encode_prompt: passed to ``loss_fn`` (text conditioning).
        accelerator: an existing ``Accelerator`` (one is made from ``config`` otherwise).

    Returns:
        a ``TrainingResult``. Raises ``NonFiniteLossError`` if the loss stops being finite.
    """
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    accelerator = accelerator or make_accelerator(config)
    num_processes, process_index = accelerator.num_processes, accelerator.process_index
    os.makedirs(config.output_dir, exist_ok=True)

    batches_per_epoch = GlobalBatchSampler.batches_per_epoch(
        len(train_dataset), config.train_batch_size, num_processes
    )
    if batches_per_epoch < config.gradient_accumulation_steps:
        raise ValueError(
            f"the dataset ({len(train_dataset)} examples) is smaller than one global batch of "
            f"--train_batch_size={config.train_batch_size} x {num_processes} processes x "
            f"--gradient_accumulation_steps={config.gradient_accumulation_steps}"
        )
    steps_per_epoch = batches_per_epoch // config.gradient_accumulation_steps
    max_train_steps = config.max_train_steps or config.num_epochs * steps_per_epoch
    resume_path = resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)
    if config.resume_from_checkpoint == "latest" and resume_path is None:
        accelerator.print(f"no checkpoint in {config.output_dir!r} to resume from: starting a new run")

    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        # the prepared scheduler steps once per process per optimizer step, as in Diffusers' examples
        num_warmup_steps=config.lr_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
    )
    ema_model = None
    if config.use_ema:
        ema_model = EMAModel(
            model.parameters(),
            decay=config.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=config.ema_inv_gamma,
            power=config.ema_power,
            model_cls=type(model),
            model_config=getattr(model, "config", None),
        )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if ema_model is not None:
        ema_model.to(accelerator.device)
        accelerator.register_for_checkpointing(ema_model)

    global_step = 0
    if resume_path is not None:
        accelerator.print(f"resuming from {resume_path}")
        accelerator.load_state(resume_path)
        global_step = int(CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(resume_path))).group(1))

    if accelerator.is_main_process and accelerator.log_with:
        run_config = {k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool))}
        run_config.update(config.extra_log_config)
        accelerator.init_trackers(config.tracker_project_name, config=run_config)

    def save_samples(step):
        if sample_fn is None or not accelerator.is_main_process:
            return
        unwrapped = accelerator.unwrap_model(model)
        if ema_model is not None:
            ema_model.store(unwrapped.parameters())
            ema_model.copy_to(unwrapped.parameters())
        unwrapped.eval()
        with torch.no_grad():
            grid = sample_fn(unwrapped, step)
        unwrapped.train()
        if ema_model is not None:
            ema_model.restore(unwrapped.parameters())
        os.makedirs(os.path.join(config.output_dir, "samples"), exist_ok=True)
        grid.save(os.path.join(config.output_dir, "samples", f"step-{step:06d}.png"))

    progress = tqdm(
        total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="steps"
    )
    last_checkpoint = resume_path
    losses = []
    model.train()
    micro_steps_per_epoch = steps_per_epoch * config.gradient_accumulation_steps
    micro_step = global_step * config.gradient_accumulation_steps
    while global_step < max_train_steps:
        epoch, skip = divmod(micro_step, micro_steps_per_epoch)
        sampler = GlobalBatchSampler(
            len(train_dataset),
            config.train_batch_size,
            num_processes,
            process_index,
            config.seed,
            epoch=epoch,
            skip_batches=skip,
        )
        loader = torch.utils.data.DataLoader(
            train_dataset, batch_sampler=sampler, collate_fn=collate, num_workers=config.dataloader_num_workers
        )
        batches = iter(loader)
        # whole optimizer steps only: the batches of a trailing partial accumulation are dropped
        for _ in range((micro_steps_per_epoch - skip) // config.gradient_accumulation_steps):
            if global_step >= max_train_steps:
                break
            step_loss, step_parts = 0.0, {}
            for accumulation_index in range(config.gradient_accumulation_steps):
                batch = {
                    k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in next(batches).items()
                }
                randomness = BatchRandomness(
                    torch.Generator().manual_seed(micro_step_seed(config.seed, micro_step)),
                    num_processes,
                    process_index,
                )
                is_last = accumulation_index == config.gradient_accumulation_steps - 1
                # gradients are all-reduced only on the last micro-batch of an accumulation
                with contextlib.nullcontext() if is_last else accelerator.no_sync(model):
                    with accelerator.autocast():
                        loss, parts = loss_fn(model, batch, randomness, encode_prompt=encode_prompt)
                    global_loss = accelerator.gather(loss.detach().float().reshape(1)).mean().item()
                    if not math.isfinite(global_loss):
                        progress.close()
                        accelerator.end_training()
                        raise NonFiniteLossError(
                            f"the loss is {global_loss} at step {global_step + 1} (micro-batch {micro_step}): "
                            "training stopped before this update. The last good checkpoint is "
                            f"{last_checkpoint or 'none (no checkpoint was written yet)'}; lower --learning_rate, "
                            "use --mixed_precision no or --max_grad_norm, and resume with "
                            "--resume_from_checkpoint latest"
                        )
                    accelerator.backward(loss / config.gradient_accumulation_steps)
                step_loss += global_loss / config.gradient_accumulation_steps
                for name, value in parts.items():
                    step_parts[name] = step_parts.get(name, 0.0) + float(value) / config.gradient_accumulation_steps
                micro_step += 1
            if config.max_grad_norm is not None and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema_model is not None:
                ema_model.step(accelerator.unwrap_model(model).parameters())
            global_step += 1
            losses.append(step_loss)

            logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0], "step": global_step, **step_parts}
            if ema_model is not None:
                logs["ema_decay"] = ema_model.cur_decay_value
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", step=global_step)
            accelerator.log(logs, step=global_step)
            if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                last_checkpoint = save_checkpoint(
                    accelerator, config.output_dir, global_step, config.checkpoints_total_limit
                )
            if config.save_images_steps and global_step % config.save_images_steps == 0:
                save_samples(global_step)
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if not (config.save_images_steps and global_step % config.save_images_steps == 0):
            save_samples(global_step)
        unwrapped = accelerator.unwrap_model(model)
        if ema_model is not None:
            ema_model.copy_to(unwrapped.parameters())
        if save_fn is not None:
            save_fn(unwrapped, config.output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    final_loss = losses[-1] if losses else float("nan")
    return TrainingResult(global_step=global_step, final_loss=final_loss, losses=losses, resumed_from=resume_path)
