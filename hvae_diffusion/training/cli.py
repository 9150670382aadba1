"""Command-line pieces the programs share: the data, optimization and Hub arguments (named as in Diffusers'
training examples), the ``TrainingConfig`` they make, the data they load, ``--num_threads``, the output-folder
guard, and the Accelerate thread check."""

import importlib.util
import os
import sys
import warnings
from dataclasses import fields

from .data import image_dataset_to_tensors, load_image_dataset, num_classes_of
from .loop import TrainingConfig, check_run_folder
from .runs import run_flags_from_args


def add_data_arguments(parser):
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        default=None,
        help="a dataset on the Hub (or a local dataset folder); default: the built-in digits",
    )
    group.add_argument("--dataset_config_name", default=None)
    group.add_argument("--train_data_dir", default=None, help="a local image folder (imagefolder layout)")
    group.add_argument("--cache_dir", default=None)
    group.add_argument("--image_column", default="image")
    group.add_argument("--label_column", default="label")
    group.add_argument("--caption_column", default="text")
    group.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="images are resized to this size (default: the dataset's own, 8 for the digits)",
    )
    group.add_argument(
        "--num_classes",
        type=int,
        default=None,
        help="the class count (default: from the label column's ClassLabel, else max label + 1)",
    )


def add_num_threads_argument(parser):
    parser.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: these small models run fastest on one thread of a shared machine; "
        "0 keeps torch's default)",
    )


def apply_num_threads(num_threads):
    """``torch.set_num_threads`` for ``--num_threads`` (0: leave torch's default)."""
    import torch

    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
        raise ValueError(f"--num_threads must be an integer >= 0 (0: torch's default), got {num_threads!r}")
    if num_threads:
        torch.set_num_threads(num_threads)


def add_overwrite_argument(parser):
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="write into an --output_dir that already holds files (a finished run, committed figures)",
    )


def check_output_dir(output_dir, overwrite_output_dir, resuming=None, resumable=False):
    """Refuse, before any work, to write into a folder that already holds files, unless the run resumes there
    (``resuming``) or ``--overwrite_output_dir`` says so: a finished run or committed files are never replaced
    silently. ``resumable``: the program takes ``--resume_from_checkpoint`` (the message offers it)."""
    if resuming or overwrite_output_dir or not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return
    resume = "pass --resume_from_checkpoint latest to continue the run there, " if resumable else ""
    raise ValueError(
        f"--output_dir={output_dir!r} already holds files ({', '.join(sorted(os.listdir(output_dir))[:5])}, ...); "
        f"choose a new folder, {resume}or pass --overwrite_output_dir to write over it"
    )


def default_report_to():
    """tensorboard when it is installed (it is only a test extra), else none: the default works on a plain install."""
    return "tensorboard" if importlib.util.find_spec("tensorboard") is not None else "none"


def add_training_arguments(parser, learning_rate=1e-4, train_batch_size=64):
    group = parser.add_argument_group("optimization (as in diffusers' train_unconditional.py)")
    group.add_argument("--output_dir", required=True)
    add_overwrite_argument(group)
    group.add_argument("--train_batch_size", type=int, default=train_batch_size, help="per process")
    group.add_argument("--num_epochs", type=int, default=1)
    group.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps; overrides --num_epochs")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--learning_rate", type=float, default=learning_rate)
    group.add_argument(
        "--lr_scheduler",
        default="cosine",
        help="linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup",
    )
    group.add_argument("--lr_warmup_steps", type=int, default=0)
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=0.0)
    group.add_argument("--adam_epsilon", type=float, default=1e-8)
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    group.add_argument("--use_ema", action="store_true", help="keep an EMA of the weights (diffusers' EMAModel)")
    group.add_argument("--ema_max_decay", type=float, default=0.9999)
    group.add_argument("--ema_inv_gamma", type=float, default=1.0)
    group.add_argument("--ema_power", type=float, default=0.75)
    group.add_argument("--checkpointing_steps", type=int, default=500)
    group.add_argument(
        "--checkpoints_total_limit", type=int, default=2, help="checkpoints kept (the newest ones); 0: keep all"
    )
    group.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-<step> folder")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument(
        "--report_to",
        default=None,
        choices=["tensorboard", "wandb", "all", "none"],
        help="trackers for losses, sample grids and evaluation numbers (default: tensorboard if installed, else none)",
    )
    group.add_argument("--logging_dir", default="logs")
    group.add_argument("--save_images_steps", type=int, default=None, help="save a sample grid every N steps")
    group.add_argument("--dataloader_num_workers", type=int, default=0)
    add_num_threads_argument(group)
    hub = parser.add_argument_group("Hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id", default=None)
    hub.add_argument("--hub_token", default=None)
    hub.add_argument("--hub_private_repo", action="store_true")


def training_config_from_args(args, **overrides):
    """A ``TrainingConfig`` from the parsed arguments of ``add_training_arguments`` (checked before any work)."""
    if getattr(args, "push_to_hub", False) and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (for example your-name/hvae-digits)")
    names = {field.name for field in fields(TrainingConfig)}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if values.get("report_to") is None:
        values["report_to"] = default_report_to()
    if values.get("checkpoints_total_limit") == 0:
        values["checkpoints_total_limit"] = None
    values.update(overrides)
    values["run_settings"] = run_flags_from_args(args, values.get("extra_log_config"))
    config = TrainingConfig(**values)
    check_run_folder(config)  # the output-folder guard of a training run: lock, finished run, checkpoint, flags
    apply_num_threads(getattr(args, "num_threads", 0))
    return config


def load_training_data(args, need_labels=False, need_captions=False):
    """(train dataset, test dataset, num_classes or None, resolution, channels) from the data arguments.

    Labels are used when the label column exists (or ``need_labels``, which makes a missing one an error).
    """
    splits = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir)
    train_split = splits["train"]
    label_column = args.label_column if (need_labels or args.label_column in train_split.column_names) else None
    num_classes = None
    if label_column is not None:
        if label_column not in train_split.column_names:
            raise ValueError(
                f"--label_column={label_column!r} is not a column of the dataset; columns: {train_split.column_names}"
            )
        num_classes = args.num_classes or num_classes_of(train_split, label_column)
    caption_column = args.caption_column if need_captions else None
    resolution = args.resolution
    datasets = [
        image_dataset_to_tensors(split, args.image_column, resolution, label_column, caption_column, num_classes)
        for split in (train_split, splits["test"])
    ]
    first = datasets[0][0]["sample"]
    return datasets[0], datasets[1], num_classes, first.shape[-1], first.shape[0]


def warn_if_single_threaded():
    """Warn when ``accelerate launch --cpu`` pinned each process to one thread while more cores are free."""
    cores = os.cpu_count() or 1
    launched = any(name in os.environ for name in ("ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION", "LOCAL_RANK"))
    if launched and os.environ.get("OMP_NUM_THREADS") == "1" and cores > int(os.environ.get("WORLD_SIZE", "1")):
        warnings.warn(
            f"OMP_NUM_THREADS=1: `accelerate launch` without a config pins every process to one thread, leaving "
            f"{cores - int(os.environ.get('WORLD_SIZE', '1'))} of {cores} cores idle. Run one process with "
            "`python scripts/train.py ...`, or give each process its share: `ACCELERATE_USE_CPU=1 accelerate launch "
            f"--multi_gpu --num_processes N --num_cpu_threads_per_process {max(1, cores // 2)} scripts/train.py ...`",
            stacklevel=2,
        )


def push_output_dir(args):
    """Upload ``--output_dir`` to ``--hub_model_id``; on failure exit with the error, which says how to retry.

    The local output is complete before the upload starts, so a failed upload loses nothing.
    """
    from .hub import HubUploadError, push_to_hub

    try:
        print("uploaded:", push_to_hub(args.output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo))
    except HubUploadError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
