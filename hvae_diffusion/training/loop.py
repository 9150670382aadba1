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
- Crash-safe checkpoints, verified by content: ``accelerator.save_state`` writes ``checkpoint-<step>.tmp``,
  ``training_state.json`` (written last) records the run's id and settings and the size and sha256 of every file,
  and the folder is renamed to ``checkpoint-<step>``; old ones are deleted only after the new one is in place.
  Resuming takes the newest checkpoint of the run whose files all match, with the same settings, and names the ones
  it skips and why (``runs.py``: the folder's lock, its run record, ``--overwrite_output_dir``). The model (and its
  EMA) are stored in Diffusers format (``model/``, ``model_ema/``, loadable with ``from_pretrained``), never as a
  pickle. A non-finite loss stops the run before the bad update; Ctrl-C leaves nothing half-written.

What is Accelerate's is Accelerate's: ``prepare``, ``accumulate()``, ``save_state``/``load_state`` with hooks,
``get_state_dict`` (a gather under DeepSpeed ZeRO-3 and FSDP) and the trackers. Three of its pieces are replaced, for
what they cannot do: ``GlobalBatchSampler`` and ``BatchRandomness`` instead of the seedable sampler and
``skip_first_batches`` (the global batch and its randomness do not depend on the process count, so 1 and N
processes train the same weights), and ``save_checkpoint`` instead of ``ProjectConfiguration(
automatic_checkpoint_naming, total_limit)``, which deletes the oldest checkpoint before writing the new one and
writes in place (a kill then leaves fewer, or no, intact checkpoints).
"""

import contextlib
import json
import logging
import math
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field

import torch

from .losses import BatchRandomness
from .runs import (
    CHECKPOINT_PATTERN,
    TRAINING_STATE_FILE,
    OutputInUseError,
    RunPlan,
    check_output_dir_free,
    checkpoint_folders,
    checkpoint_problem,
    clear_output_dir,
    list_checkpoints,
    lock_output_dir,
    model_identity,
    plan_run,
    read_training_state,
    resolve_checkpoint,
    usable_problem,
    write_run_record,
    write_training_state,
)
from .timestep_samplers import UniformTimestepSampler

logger = logging.getLogger(__name__)

MODEL_FOLDER, EMA_FOLDER = "model", "model_ema"
__all__ = [  # the checkpoint functions live in runs.py; these names stay importable from here
    "CHECKPOINT_PATTERN",
    "TRAINING_STATE_FILE",
    "OutputInUseError",
    "checkpoint_problem",
    "list_checkpoints",
    "read_training_state",
    "resolve_checkpoint",
]


@dataclass
class TrainingConfig:
    """Optimization settings, named as in Diffusers' ``train_unconditional.py``.

    ``train_batch_size`` is per process; the global batch is ``train_batch_size × num_processes ×
    gradient_accumulation_steps``. ``max_train_steps`` (optimizer steps) overrides ``num_epochs``.
    ``checkpointing_steps`` 0/None disables checkpoints; ``checkpoints_total_limit`` keeps that many (None: all);
    ``save_images_steps`` 0/None disables sample grids during training (one is still saved at the end when a
    ``sample_fn`` is given). ``overwrite_output_dir`` clears an ``output_dir`` that holds files (otherwise a new run
    needs an empty one). ``run_settings`` are the flags that define the model and its objective (``{flag: value}``,
    ``runs.run_flags_from_args``): a checkpoint trained with other values is not resumed. ``save_on_each_node``:
    the nodes share no file system, so each writes (and verifies) its own copy of every checkpoint.
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
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None
    seed: int = 0
    report_to: str | None = None
    logging_dir: str = "logs"
    save_images_steps: int | None = None
    dataloader_num_workers: int = 0
    tracker_project_name: str = "train"
    extra_log_config: dict = field(default_factory=dict)
    overwrite_output_dir: bool = False
    run_settings: dict = field(default_factory=dict)
    save_on_each_node: bool = False

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
        for name in ("checkpointing_steps", "save_images_steps", "lr_warmup_steps", "dataloader_num_workers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"--{name} must be an integer >= 0, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate!r}")
        from diffusers.optimization import SchedulerType

        allowed = [member.value for member in SchedulerType]
        if self.lr_scheduler not in allowed:
            raise ValueError(f"--lr_scheduler must be one of {allowed}, got {self.lr_scheduler!r}")


@dataclass
class TrainingResult:
    """What a finished run reports: optimizer steps done, the last loss, the run's loss history (a resumed run's
    includes the steps before its checkpoint) and the numbers ``evaluate_fn`` returned."""

    global_step: int
    final_loss: float
    losses: list
    resumed_from: str | None = None
    metrics: dict = field(default_factory=dict)


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


def local_parameters(model):
    """This process's share of each parameter: the whole parameter, or its shard under DeepSpeed ZeRO-3 (whose
    parameters are empty placeholders outside a gather)."""
    return [getattr(parameter, "ds_tensor", parameter) for parameter in model.parameters()]


def max_abs_weight(model, accelerator=None):
    """max |w| over the parameters of ``model`` (what a diverging run shows before its loss does). With an
    ``accelerator`` of several processes, the maximum over all of them (each holds a shard under ZeRO-3 and FSDP);
    every process must then call it."""
    local = max((float(p.detach().abs().max()) for p in local_parameters(model) if p.numel()), default=0.0)
    if accelerator is None or accelerator.num_processes == 1:
        return local
    return float(accelerator.gather(torch.tensor([local], device=accelerator.device)).max())


def writes_checkpoint_files(accelerator, save_on_each_node=False):
    """Whether this process writes the shared files of a checkpoint: the main process, or each node's local main
    one when the nodes share no file system (``save_on_each_node``, as in ``ProjectConfiguration``)."""
    return accelerator.is_main_process or (save_on_each_node and accelerator.is_local_main_process)


def save_checkpoint(accelerator, output_dir, global_step, total_limit, state, save_on_each_node=False):
    """``accelerator.save_state`` to ``checkpoint-<step>.tmp``, ``training_state.json`` (``state`` plus every
    file's size and sha256) last, then an atomic rename; then prune this run's oldest checkpoints beyond
    ``total_limit``. Interrupted, it leaves only a ``.tmp`` folder, which is never resumed.

    The listing is written by each process that wrote the folder's files, from its own disk (every node's with
    ``save_on_each_node``), so it describes what that disk holds."""
    final_path = os.path.join(output_dir, f"checkpoint-{global_step}")
    temporary_path = final_path + ".tmp"
    writer = writes_checkpoint_files(accelerator, save_on_each_node)
    try:
        if writer:
            shutil.rmtree(temporary_path, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(temporary_path)
        accelerator.wait_for_everyone()
        if writer:
            write_training_state(temporary_path, {"global_step": global_step, **state})
            if os.path.isdir(final_path):
                shutil.rmtree(final_path)
            os.replace(temporary_path, final_path)
            if total_limit is not None:
                own = list_checkpoints(output_dir, verify_content=False, run_id=state["run_id"])
                for _, old_path in own[:-total_limit]:
                    shutil.rmtree(old_path)
    except BaseException:
        if writer:
            shutil.rmtree(temporary_path, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final_path


def diffusers_format_hooks(accelerator, ema_model=None, save_on_each_node=False):
    """The ``(save_hook, load_hook)`` that make ``save_state``/``load_state`` store the model (and its EMA) with
    ``save_pretrained`` in ``model/`` (``model_ema/``), as Diffusers' ``train_unconditional.py`` does: safetensors,
    loadable with ``from_pretrained``.

    Models that are not Diffusers ``ModelMixin``s keep accelerate's own ``model.safetensors``. DeepSpeed and FSDP
    save and load the model with their own engines before the hooks run: they pass no ``weights`` to the save hook
    and no models to the load hook, so only the EMA (whole on every process) is stored here then.
    """
    from diffusers import ModelMixin

    def save_hook(models, weights, output_dir):
        writer = writes_checkpoint_files(accelerator, save_on_each_node)
        if ema_model is not None and writer:
            ema_model.save_pretrained(os.path.join(output_dir, EMA_FOLDER))
        if not weights:  # the engine (DeepSpeed, FSDP) saved the models itself
            return
        for index in reversed(range(len(models))):
            model = accelerator.unwrap_model(models[index])
            if isinstance(model, ModelMixin):
                if writer:
                    model.save_pretrained(os.path.join(output_dir, MODEL_FOLDER))
                weights.pop(index)

    def load_hook(models, input_dir):
        from diffusers.training_utils import EMAModel

        if ema_model is not None:
            with quiet_ema_loading():
                loaded = EMAModel.from_pretrained(os.path.join(input_dir, EMA_FOLDER), ema_model.model_cls)
            ema_model.load_state_dict(loaded.state_dict())
            ema_model.to(accelerator.device)
        for index in reversed(range(len(models))):
            model = accelerator.unwrap_model(models[index])
            if isinstance(model, ModelMixin):
                models.pop(index)
                model.load_state_dict(type(model).from_pretrained(input_dir, subfolder=MODEL_FOLDER).state_dict())

    return save_hook, load_hook


@contextlib.contextmanager
def quiet_ema_loading():
    """Silence what ``EMAModel.from_pretrained`` says about its own calls, not about the user's files: it passes the
    folder to ``from_config`` (a FutureWarning raised by Diffusers' own code) and builds the model from a config.json
    that holds the EMA's fields (decay, power, ...: twice "config attributes ... will be ignored")."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
            yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


def register_diffusers_format_hooks(accelerator, ema_model=None, save_on_each_node=False):
    """Register ``diffusers_format_hooks`` with ``accelerator``."""
    save_hook, load_hook = diffusers_format_hooks(accelerator, ema_model, save_on_each_node)
    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


LOSS_STATE_FILE = "timestep_sampler.json"


def register_loss_state_hooks(accelerator, loss_fn):
    """Make ``save_state``/``load_state`` carry the loss's own state: each of its ``trainable_modules`` (a learned
    noise schedule) with ``save_pretrained`` in a folder of its name, and its ``timestep_sampler``'s loss history as
    JSON (``timestep_sampler.json``), so that a resumed run continues bitwise. Losses without them add nothing."""
    modules = dict(getattr(loss_fn, "trainable_modules", {}))
    sampler = getattr(loss_fn, "timestep_sampler", None)
    if type(sampler) is UniformTimestepSampler:  # stateless: checkpoints stay as they were
        sampler = None
    if not modules and sampler is None:
        return

    def save_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        for name, module in modules.items():
            module.save_pretrained(os.path.join(output_dir, name))
        if sampler is not None:
            with open(os.path.join(output_dir, LOSS_STATE_FILE), "w") as handle:
                json.dump(sampler.state_dict(), handle)

    def load_hook(models, input_dir):
        for name, module in modules.items():
            loaded = type(module).from_pretrained(os.path.join(input_dir, name))
            module.load_state_dict(loaded.state_dict())
        if sampler is not None:
            state_path = os.path.join(input_dir, LOSS_STATE_FILE)
            if not os.path.isfile(state_path):
                raise ValueError(
                    f"{input_dir} has no {LOSS_STATE_FILE}: it was not trained with --timestep_sampler importance, so "
                    "it cannot continue this run's loss history; resume with the sampler it was trained with"
                )
            with open(state_path) as handle:
                sampler.load_state_dict(json.load(handle))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def is_sharded(accelerator):
    """Whether the prepared model is split over the processes (DeepSpeed, FSDP): no process holds it whole."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def whole_model(accelerator, model, ema_model=None, parameter_names=None, in_place=False):
    """The whole trained model on the main process (None on the others), the EMA's weights in place of the
    parameters when there is one.

    Every process must call it: the weights come from ``accelerator.get_state_dict``, a gather under DeepSpeed
    ZeRO-3 and FSDP (as in Diffusers' training scripts). ``in_place`` loads them into the unwrapped model itself
    (the end of a run whose processes each hold the whole model); otherwise into a new copy, so the model in
    training is left as it is. ``parameter_names`` are the names of the EMA's parameters, in order.
    """
    import copy

    from diffusers import ModelMixin

    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    unwrapped = accelerator.unwrap_model(model)
    if ema_model is not None:
        state = dict(state)
        for name, shadow in zip(parameter_names, ema_model.shadow_params):
            state[name] = shadow.detach().to(state[name].device, state[name].dtype)
    if in_place and not is_sharded(accelerator):
        target = unwrapped
    elif isinstance(unwrapped, ModelMixin):
        target = type(unwrapped).from_config(unwrapped.config).to(accelerator.device)
    elif not is_sharded(accelerator):
        target = copy.deepcopy(unwrapped)
    else:
        raise TypeError(f"gathering a sharded model needs a Diffusers ModelMixin, got {type(unwrapped).__name__}")
    target.load_state_dict(state)
    return target


def make_accelerator(config):
    """An ``Accelerator`` for ``config`` (trackers under ``output_dir/logging_dir``).

    Accelerate fixes the mixed precision once per process: a second run in the same process with another
    ``mixed_precision`` is a ``ValueError`` that says so (Accelerate offers no public way to change it)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    report_to = None if config.report_to in (None, "none") else config.report_to
    if report_to == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ValueError("--report_to tensorboard needs `pip install tensorboard` (or pass --report_to none)")
    project_config = ProjectConfiguration(
        project_dir=config.output_dir,
        logging_dir=os.path.join(config.output_dir, config.logging_dir),
        save_on_each_node=config.save_on_each_node,
    )
    try:
        return Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=report_to,
            project_config=project_config,
        )
    except ValueError as error:
        if "already been initialized" not in str(error):
            raise
        raise ValueError(
            f"--mixed_precision={config.mixed_precision}: this process already runs Accelerate with another mixed "
            "precision, which Accelerate fixes once per process; run this training in a new process"
        ) from error


def train(
    config,
    model,
    loss_fn,
    train_dataset,
    *,
    sample_fn=None,
    save_fn=None,
    evaluate_fn=None,
    encode_prompt=None,
    accelerator=None,
):
    """Train ``model`` on ``train_dataset`` by minimizing ``loss_fn``, save it with ``save_fn``, then sample and
    evaluate it (so that a failure there never costs the weights).

    Args:
        config: a ``TrainingConfig``.
        model: a ``torch.nn.Module`` (a Diffusers ``ModelMixin`` for EMA and Diffusers-format checkpoints).
        loss_fn: ``loss_fn(model, batch, randomness, encode_prompt=...) -> (loss, {name: value})`` on a batch dict
            (see ``collate``); ``losses.DiffusionLoss`` and ``losses.NoisyClassifierLoss`` are such functions.
        train_dataset: a map-style dataset of dicts, tensors ``[C, H, W]`` / ``[D]``, or ``(sample, label)``.
        sample_fn: ``sample_fn(model, step) -> PIL.Image``, a sample grid saved to ``output_dir/samples`` and logged
            to the trackers.
        save_fn: ``save_fn(model, output_dir)``, called once at the end on the main process with the (EMA) weights.
        evaluate_fn: ``evaluate_fn(model) -> {name: number}``, called after ``save_fn`` on the main process; the
            numbers are logged to the trackers and returned in ``TrainingResult.metrics``.
        encode_prompt: passed to ``loss_fn`` (text conditioning).
        accelerator: an existing ``Accelerator`` (one is made from ``config`` otherwise).

    Returns:
        a ``TrainingResult``. Raises ``NonFiniteLossError`` if the loss stops being finite, and ``ValueError``
        before any work for a checkpoint that cannot continue this run.
    """
    from diffusers import ModelMixin

    if config.use_ema and not isinstance(model, ModelMixin):
        raise TypeError(f"--use_ema needs a Diffusers ModelMixin model, got {type(model).__name__}")
    accelerator = accelerator or make_accelerator(config)
    # accumulate() below syncs gradients and steps the optimizer on the last micro-batch of each global batch
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
    num_processes = accelerator.num_processes

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
    settings = {"flags": run_flags(config), "model": model_identity(model)}
    lock, plan = open_run(accelerator, config, settings, max_train_steps)
    try:
        return _train(
            config, model, loss_fn, train_dataset, accelerator, plan, settings, max_train_steps, steps_per_epoch,
            sample_fn=sample_fn, save_fn=save_fn, evaluate_fn=evaluate_fn, encode_prompt=encode_prompt,
        )  # fmt: skip
    finally:
        if lock is not None:
            lock.release()


def run_flags(config):
    """The flags of ``config`` that define the run's model and objective: ``run_settings`` and ``--use_ema``."""
    return {**config.run_settings, "use_ema": config.use_ema}


def check_run_folder(config, log=None):
    """Refuse, before any work, what ``train(config, ...)`` would refuse about its output folder: another run
    writing there, a new run over files or a finished run, a checkpoint of another run, one that cannot continue
    (``check_resumable``) or one trained with other flags (the model itself is compared when training starts).
    Reads only, and only in the launcher's first process (``RANK`` 0, or no launcher): the others would see the
    folder the first one is already writing; ``train`` agrees on one plan for all of them."""
    if os.environ.get("RANK", "0") != "0":
        return None
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise ValueError(f"--output_dir={config.output_dir!r} is a file, not a folder")
    if os.path.isdir(config.output_dir):
        check_output_dir_free(config.output_dir)
    plan = plan_run(
        config.output_dir,
        config.resume_from_checkpoint,
        config.overwrite_output_dir,
        {"flags": run_flags(config)},
        log=log or (lambda message: None),
    )
    if plan.resume_path is not None and config.max_train_steps is not None:
        check_resumable(plan.resume_path, read_training_state(plan.resume_path), config, config.max_train_steps)
    return plan


def open_run(accelerator, config, settings, max_train_steps):
    """Take the output folder for this run and agree on its plan on every process: ``(lock, plan)``.

    The main process locks the folder and plans the run (``plan_run``); every process then verifies, on its own
    disk, the checkpoint it will read, and they resume the newest one intact on all of them. The old run is cleared
    (``--overwrite_output_dir``) and the run recorded only after every check passed. An error reaches every
    process, so none waits for the others at a barrier."""
    from accelerate.utils import broadcast_object_list, gather_object

    lock, outcome = None, [None]
    if accelerator.is_main_process:
        try:
            lock = lock_output_dir(config.output_dir)
            outcome = [plan_run(config.output_dir, config.resume_from_checkpoint, config.overwrite_output_dir,
                                settings, log=accelerator.print)]  # fmt: skip
        except ValueError as error:  # sent to every process, which all raise it
            outcome = [error]
    if accelerator.num_processes > 1:
        outcome = broadcast_object_list(outcome)
    plan = outcome[0]
    if not isinstance(plan, RunPlan):
        if lock is not None:
            lock.release()
        raise plan
    try:
        if plan.resume_path is not None and accelerator.num_processes > 1:
            plan.resume_path = agreed_checkpoint(accelerator, config, plan, gather_object)
        if plan.resume_path is not None:
            check_resumable(plan.resume_path, read_training_state(plan.resume_path), config, max_train_steps)
        if writes_checkpoint_files(accelerator, config.save_on_each_node):
            os.makedirs(config.output_dir, exist_ok=True)
            if plan.clear:
                clear_output_dir(config.output_dir)
            write_run_record(config.output_dir, plan.run_id, settings)
        accelerator.wait_for_everyone()
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock, plan


def agreed_checkpoint(accelerator, config, plan, gather_object):
    """The checkpoint every process resumes: each verifies the ones of the run on its own disk (a multi-node run
    without a shared file system reads each node's copy), and they take the newest intact on all of them."""
    if config.resume_from_checkpoint == "latest":
        candidates = [path for _, path in checkpoint_folders(config.output_dir)]
    else:
        candidates = [plan.resume_path]
    names = {os.path.basename(os.path.normpath(path)): path for path in candidates}
    intact = [name for name, path in names.items() if usable_problem(path, plan.run_id) is None]
    everywhere = set(names)
    for process_intact in gather_object([intact]):
        everywhere &= set(process_intact)
    if not everywhere:
        raise ValueError(
            f"--resume_from_checkpoint={config.resume_from_checkpoint!r}: no checkpoint of the run is intact on "
            f"every process ({plan.resume_path} is not, on some node); copy an intact one to every node's "
            f"{config.output_dir!r}"
        )
    chosen = max(everywhere, key=lambda name: int(CHECKPOINT_PATTERN.match(name).group(1)))
    if names[chosen] != plan.resume_path:
        accelerator.print(f"resuming from {names[chosen]}, the newest checkpoint intact on every process")
    return names[chosen]


def _train(
    config, model, loss_fn, train_dataset, accelerator, plan, settings, max_train_steps, steps_per_epoch, *,
    sample_fn, save_fn, evaluate_fn, encode_prompt,
):  # fmt: skip
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    num_processes, process_index = accelerator.num_processes, accelerator.process_index
    resume_path = plan.resume_path
    resumed_state = read_training_state(resume_path) if resume_path is not None else {}

    loss_modules = dict(getattr(loss_fn, "trainable_modules", {}))
    for module in loss_modules.values():
        module.to(accelerator.device).train()
    loss_parameters = [parameter for module in loss_modules.values() for parameter in module.parameters()]
    optimizer = torch.optim.AdamW(
        [*model.parameters(), *loss_parameters],
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
    parameter_names = [name for name, _ in model.named_parameters()]
    if config.use_ema:
        if accelerator.distributed_type.name == "FSDP":
            raise ValueError("--use_ema with FSDP: its parameters are flat shards that EMAModel cannot follow; "
                             "use DeepSpeed ZeRO (whose parameters EMAModel gathers) or DDP")  # fmt: skip
        ema_model = EMAModel(
            model.parameters(),
            decay=config.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=config.ema_inv_gamma,
            power=config.ema_power,
            model_cls=type(model),
            model_config=model.config,
        )
    if accelerator.distributed_type.name == "DEEPSPEED":
        # DeepSpeed reads the batch size from a prepared DataLoader, and the loop's sampler is its own
        deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if deepspeed_config.get("train_micro_batch_size_per_gpu") in (None, "auto"):
            deepspeed_config["train_micro_batch_size_per_gpu"] = config.train_batch_size
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if ema_model is not None:
        ema_model.to(accelerator.device)
    register_diffusers_format_hooks(accelerator, ema_model, config.save_on_each_node)
    register_loss_state_hooks(accelerator, loss_fn)

    global_step = 0
    losses = []
    accelerator.step = 0  # accumulate()'s micro-batch count: a run starts (and a checkpoint was saved) at a boundary
    if resume_path is not None:
        if config.resume_from_checkpoint != "latest":  # "latest" was named when it was resolved
            accelerator.print(f"resuming from {resume_path}")
        accelerator.load_state(resume_path)
        global_step = resumed_state["global_step"]
        losses = list(resumed_state.get("losses", []))

    if accelerator.is_main_process and accelerator.log_with:
        run_config = {k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool))}
        run_config.update(config.extra_log_config)
        accelerator.init_trackers(config.tracker_project_name, config=run_config)

    def save_samples(step, trained):
        """Save and log a sample grid of ``trained`` (a ``whole_model``) on the main process."""
        if sample_fn is None or not accelerator.is_main_process:
            return
        trained.eval()
        with torch.no_grad():
            grid = sample_fn(trained, step)
        trained.train()
        os.makedirs(os.path.join(config.output_dir, "samples"), exist_ok=True)
        grid.save(os.path.join(config.output_dir, "samples", f"step-{step:06d}.png"))
        log_image(accelerator, "samples", grid, step)

    progress = tqdm(
        total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="steps"
    )
    model.train()
    micro_steps_per_epoch = steps_per_epoch * config.gradient_accumulation_steps
    micro_step = global_step * config.gradient_accumulation_steps
    try:
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
                for _ in range(config.gradient_accumulation_steps):
                    batch = {
                        k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v
                        for k, v in next(batches).items()
                    }
                    randomness = BatchRandomness(
                        torch.Generator().manual_seed(micro_step_seed(config.seed, micro_step)),
                        num_processes,
                        process_index,
                    )
                    # gradients are all-reduced (and the optimizer steps) only on the last micro-batch
                    with accelerator.accumulate(model):
                        with accelerator.autocast():
                            loss, parts = loss_fn(model, batch, randomness, encode_prompt=encode_prompt)
                        global_loss = accelerator.gather(loss.detach().float().reshape(1)).mean().item()
                        if not math.isfinite(global_loss):
                            raise NonFiniteLossError(
                                non_finite_report(
                                    global_loss,
                                    global_step,
                                    micro_step,
                                    losses,
                                    model,
                                    config.output_dir,
                                    accelerator,
                                    plan.run_id,
                                )  # fmt: skip
                            )
                        accelerator.backward(loss)  # divided by the accumulation steps inside accumulate()
                        if hasattr(loss_fn, "update_timestep_sampler"):
                            loss_fn.update_timestep_sampler(accelerator.gather)
                        if accelerator.sync_gradients:
                            if num_processes > 1:  # the loss's own modules are not DDP-wrapped: average them here
                                for parameter in loss_parameters:
                                    if parameter.grad is not None:
                                        parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")
                            if config.max_grad_norm is not None and config.max_grad_norm > 0:
                                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    step_loss += global_loss / config.gradient_accumulation_steps
                    for name, value in parts.items():
                        step_parts[name] = (
                            step_parts.get(name, 0.0) + float(value) / config.gradient_accumulation_steps
                        )
                    micro_step += 1
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
                    state = {
                        "run_id": plan.run_id,
                        "settings": settings,
                        "learning_rate": config.learning_rate,
                        "losses": losses,
                        "max_abs_weight": max_abs_weight(model, accelerator),
                    }
                    save_checkpoint(
                        accelerator, config.output_dir, global_step, config.checkpoints_total_limit, state,
                        config.save_on_each_node,
                    )  # fmt: skip
                if sample_fn is not None and config.save_images_steps and global_step % config.save_images_steps == 0:
                    # the (EMA) weights now, gathered from every process into a copy
                    save_samples(global_step, whole_model(accelerator, model, ema_model, parameter_names))
    except KeyboardInterrupt:
        progress.close()
        newest = list_checkpoints(config.output_dir, verify_content=False, run_id=plan.run_id)
        where = f"its newest checkpoint is {newest[-1][1]}" if newest else "it has no checkpoint yet"
        accelerator.print(
            f"\ninterrupted at step {global_step}: nothing half-written is kept and {where}. To continue, run the "
            "same command with --resume_from_checkpoint latest"
        )
        raise
    except NonFiniteLossError:
        progress.close()
        finish_trackers(accelerator)
        raise
    progress.close()

    accelerator.wait_for_everyone()
    trained = whole_model(accelerator, model, ema_model, parameter_names, in_place=True)
    metrics = {}
    if accelerator.is_main_process:
        # the weights are saved first: a failing sample grid or evaluation must not cost them
        if save_fn is not None:
            save_fn(trained, config.output_dir)
        write_run_record(config.output_dir, plan.run_id, settings, finished=True)
    if not (config.save_images_steps and global_step % config.save_images_steps == 0):
        save_samples(global_step, trained)
    if accelerator.is_main_process and evaluate_fn is not None:
        trained.eval()
        with torch.no_grad():
            metrics = dict(evaluate_fn(trained))
        accelerator.log(metrics, step=global_step)
    accelerator.wait_for_everyone()
    finish_trackers(accelerator)
    final_loss = losses[-1] if losses else float("nan")
    return TrainingResult(
        global_step=global_step, final_loss=final_loss, losses=losses, resumed_from=resume_path, metrics=metrics
    )


def check_resumable(resume_path, state, config, max_train_steps):
    """Refuse, before any work, a checkpoint this run cannot continue as asked: one past ``max_train_steps``, or
    one trained with another learning rate (the checkpoint's LR schedule would silently override the flag)."""
    if resume_path is None:
        return
    if state["global_step"] > max_train_steps:
        raise ValueError(
            f"--resume_from_checkpoint: {resume_path} is at step {state['global_step']}, past "
            f"--max_train_steps={max_train_steps}; raise --max_train_steps to continue it, or resume an earlier "
            "checkpoint"
        )
    trained_with = state.get("learning_rate")
    if trained_with is not None and not math.isclose(trained_with, config.learning_rate, rel_tol=1e-12):
        raise ValueError(
            f"--learning_rate={config.learning_rate:g} differs from the {trained_with:g} that {resume_path} was "
            f"trained with; the learning-rate schedule continues from the checkpoint, so pass --learning_rate "
            f"{trained_with:g} to resume it (or start a new run in another --output_dir)"
        )


def non_finite_report(loss, global_step, micro_step, losses, model, output_dir, accelerator=None, run_id=None):
    """What is known when the loss stops being finite: where, the recent losses, the weights now and at each
    checkpoint on disk (finite weights may already be diverging, so no checkpoint is called good)."""
    checkpoints = [
        f"{os.path.basename(path)} (max|w| = {read_training_state(path).get('max_abs_weight', float('nan')):.3g})"
        for _, path in list_checkpoints(output_dir, verify_content=False, run_id=run_id)
    ]
    recent = ", ".join(f"{value:.4g}" for value in losses[-5:])
    return (
        f"the loss is {loss} at step {global_step + 1} (micro-batch {micro_step}): training stopped before this "
        f"update. Losses of the last steps: [{recent}]; the largest |weight| now is {max_abs_weight(model, accelerator):.3g}. "
        f"Checkpoints on disk: {', '.join(checkpoints) or 'none'}. A checkpoint whose max|w| grew far beyond the "
        "earlier ones is already diverging. Resuming keeps the checkpoint's learning rate; to lower it, start a new "
        "run from the model of a checkpoint before the growth (its model/ folder, e.g. --pretrained_model_name_or_path "
        "<checkpoint>/model) with a lower --learning_rate, or use --max_grad_norm or --mixed_precision no"
    )


def finish_trackers(accelerator):
    """What ``accelerator.end_training()`` does but for destroying the process group: a program may run several
    trainings in one launch (the group cannot be made again in the same processes), and it ends with the process."""
    for tracker in accelerator.trackers:
        tracker.finish()


def log_image(accelerator, name, image, step):
    """Log a PIL image to the configured trackers (tensorboard, wandb)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Image(image)}, step=step)
