"""Command-line pieces the programs share: the parser every program builds (``program_parser``), the checks before
any work (``checked_before_work``, ``require_extras``), the data, optimization and Hub arguments (named as in
Diffusers' training examples), the ``TrainingConfig`` they make, the data they load, ``--num_threads``, the
output-folder guard, and the Accelerate thread check.

Every program follows one pattern, so that a bad flag never costs a step of work::

    def main(argv=None):
        args = parse_args(argv)              # program_parser(...): defaults in --help, no prefix matching
        with checked_before_work():          # ValueError/TypeError/OSError in here → UsageError
            check_arguments(args)            # every flag against its range and the others, naming the flag
            ...                              # loading what the run needs (data, models) before the first step
        ...                                  # the work; errors here are bugs or failures and keep their traceback

``main(argv)`` raises the ``UsageError`` (a ``ValueError``) to callers in Python; the console scripts
(``hvae_diffusion.commands``) print it as argparse prints a bad flag: one line ``hvae-<name>: error: ...`` on stderr,
exit status 2.
"""

import argparse
import contextlib
import importlib.util
import os
import sys
import warnings
from dataclasses import fields

from .data import image_dataset_to_tensors, load_image_dataset, num_classes_of
from .loop import TrainingConfig, check_run_folder
from .runs import run_flags_from_args


class UsageError(ValueError):
    """A flag or an input refused before any work (see the module docstring): the console scripts report it in one
    line, ``hvae-<name>: error: <message>``, with exit status 2, as argparse reports a bad flag."""


@contextlib.contextmanager
def checked_before_work():
    """The checks and the loading before a program's first step of work: a ``ValueError``, ``TypeError`` or
    ``OSError`` (a missing or unreadable file) raised inside is the user's input, re-raised as a ``UsageError`` with
    the same message. Anything else (and everything after this block) keeps its traceback: it is a bug."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, OSError) as error:
        raise UsageError(str(error)) from error


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default (but "None" and "False": a flag left out)."""

    def _get_help_string(self, action):  # the one method ArgumentDefaultsHelpFormatter itself overrides
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def program_parser(prog, description):
    """The ``ArgumentParser`` of ``hvae-<prog>``: named ``hvae-<prog>`` in its messages (also when run as
    ``scripts/<prog>.py``), its description as written, no prefix matching (``--max_train_step`` is an error, not
    ``--max_train_steps``). Call ``parse_with_defaults_shown`` to parse, so that ``--help`` shows every default."""
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=_HelpFormatter, allow_abbrev=False
    )


def parse_with_defaults_shown(parser, argv=None):
    """``parser.parse_args(argv)``, after giving every flag without a help text one that shows its default:
    ``ArgumentDefaultsHelpFormatter`` adds the default only to flags with help."""
    for action in parser._actions:  # argparse keeps its actions here; there is no public accessor
        if action.help is None and action.default is not None and action.default is not False:
            action.help = "(default: %(default)s)"
    return parser.parse_args(argv)


EXTRAS = {
    "training": ("accelerate", "datasets", "sklearn", "scipy"),
    "plots": ("matplotlib",),
    "text": ("transformers",),
}


def require_extras(program, *extras):
    """Raise a ``UsageError`` naming the extra to install when a module of one of ``extras`` (``EXTRAS``) is missing:
    ``pip install hvae-diffusion`` brings the core only, and a bare ``ModuleNotFoundError: datasets`` says nothing
    of ``[training]``."""
    for extra in extras:
        missing = [module for module in EXTRAS[extra] if importlib.util.find_spec(module) is None]
        if missing:
            raise UsageError(
                f"{program} needs the [{extra}] extra ({', '.join(missing)} not installed): install the package "
                f"with it, e.g. pip install -e '.[{extra}]' in the source folder"
            )


def add_data_arguments(parser, augmentation=True):
    """The data flags of Diffusers' training examples; ``augmentation``: also ``--random_flip`` (training programs)."""
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
    group.add_argument(
        "--center_crop",
        action="store_true",
        help="with --resolution: resize the shorter side to it and cut out the central square (aspect ratio kept); "
        "without, images are resized to resolution x resolution",
    )
    if augmentation:
        group.add_argument(
            "--random_flip",
            action="store_true",
            help="mirror each training image left-right with probability 1/2 at every step (drawn from the run's "
            "seeded randomness, so a resumed run flips the same images)",
        )


def add_num_threads_argument(parser):
    parser.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: these small models run fastest on one thread of a shared machine; "
        "0 keeps torch's default)",
    )


def check_number(flag, value, minimum=None, maximum=None, above=None, below=None):
    """Raise a ``ValueError`` naming ``flag`` unless ``value`` is a finite number with ``minimum <= value <=
    maximum`` and ``above < value < below`` (the bounds given). NaN and ±inf are refused by name: a NaN passes no
    comparison, so a check written as ``if value < 0: raise`` lets it through."""
    import math

    bounds = [
        f"{symbol} {bound:g}"
        for symbol, bound in ((">=", minimum), ("<=", maximum), (">", above), ("<", below))
        if bound is not None
    ]
    allowed = f"a finite number {' and '.join(bounds)}" if bounds else "a finite number"
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
        or (above is not None and value <= above)
        or (below is not None and value >= below)
    ):
        raise ValueError(f"{flag} must be {allowed}, got {value!r}")


def check_num_threads(num_threads):
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
        raise ValueError(f"--num_threads must be an integer >= 0 (0: torch's default), got {num_threads!r}")


def apply_num_threads(num_threads):
    """``torch.set_num_threads`` for ``--num_threads`` (0: leave torch's default): a program's ``main`` calls it after
    its checks; nothing that only builds a configuration changes this process-wide setting."""
    import torch

    check_num_threads(num_threads)
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
    group.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="optimizer steps; overrides --num_epochs (default: --num_epochs passes over the data)",
    )
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
    group.add_argument(
        "--save_on_each_node",
        action="store_true",
        help="the machines of a multi-node run share no file system: each writes and verifies its own checkpoints",
    )
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


def check_pipeline_dir(flag, path):
    """A saved pipeline (or model) folder, or a Hub repo id: a path that is neither is "no such folder", not the
    Hub's "not cached locally" after a failed download."""
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise ValueError(f"{flag}={path!r} is a file, not a folder")
    from huggingface_hub.utils import validate_repo_id

    local = path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.isdir(os.path.dirname(path) or "/.")
    try:
        validate_repo_id(path)
    except ValueError:
        local = True
    if local:
        raise ValueError(f"{flag}={path!r}: no such folder")


def check_folder_path(flag, path):
    """Refuse an output folder path that names an existing file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag}={path!r} is a file, not a folder; choose a folder path")


def check_training_arguments(args):
    """The optimization flags of ``add_training_arguments`` that ``TrainingConfig`` takes as given: every float
    finite and in its range, and ``--mixed_precision fp16`` only where it does something."""
    for flag in ("adam_beta1", "adam_beta2"):
        check_number(f"--{flag}", getattr(args, flag), minimum=0, below=1)
    check_number("--adam_epsilon", args.adam_epsilon, above=0)
    check_number("--adam_weight_decay", args.adam_weight_decay, minimum=0)
    check_number("--max_grad_norm", args.max_grad_norm, above=0)
    check_number("--learning_rate", args.learning_rate, above=0)
    check_number("--ema_max_decay", args.ema_max_decay, minimum=0, maximum=1)
    check_number("--ema_inv_gamma", args.ema_inv_gamma, above=0)
    check_number("--ema_power", args.ema_power, above=0)
    check_folder_path("--output_dir", args.output_dir)
    if args.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            # Accelerate runs fp16 on a CPU as fp32 without a word
            raise ValueError("--mixed_precision fp16 needs a CUDA GPU; on a CPU pass bf16 or no")
    if getattr(args, "push_to_hub", False):
        if not args.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (for example your-name/hvae-digits)")
        from .hub import check_hub_credentials

        check_hub_credentials(args.hub_token)


def training_config_from_args(args, **overrides):
    """A ``TrainingConfig`` from the parsed arguments of ``add_training_arguments``, every flag checked
    (``check_training_arguments``); no process-wide setting is changed (``apply_num_threads`` is the program's)."""
    check_training_arguments(args)
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
    check_num_threads(getattr(args, "num_threads", 0))
    return config


def check_data_arguments(args):
    """The data flags of ``add_data_arguments`` against their ranges, before anything is loaded."""
    if args.resolution is not None and args.resolution < 1:
        raise ValueError(f"--resolution must be >= 1, got {args.resolution}")
    if args.num_classes is not None and args.num_classes < 1:
        raise ValueError(f"--num_classes must be >= 1, got {args.num_classes}")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise ValueError(f"--train_data_dir={args.train_data_dir!r}: no such folder")
    if args.center_crop and args.resolution is None:
        raise ValueError("--center_crop needs --resolution (the size of the square it cuts out)")


def load_training_data(args, need_labels=False, need_captions=False):
    """(train dataset, test dataset, num_classes or None, resolution, channels) from the data arguments.

    Labels are used when the label column exists (or ``need_labels``, which makes a missing one an error).
    """
    check_data_arguments(args)
    splits = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir)
    train_split = splits["train"]
    label_column = args.label_column if (need_labels or args.label_column in train_split.column_names) else None
    num_classes = None
    if label_column is not None:
        if label_column not in train_split.column_names:
            raise ValueError(
                f"--label_column={label_column!r} is not a column of the dataset; columns: {train_split.column_names}"
            )
        num_classes = args.num_classes if args.num_classes is not None else num_classes_of(train_split, label_column)
    caption_column = args.caption_column if need_captions else None
    resolution = args.resolution
    datasets = [
        image_dataset_to_tensors(
            split, args.image_column, resolution, label_column, caption_column, num_classes, args.center_crop
        )
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


def add_guidance_variant_arguments(parser, methods=True):
    """``--guidance_interval T_LO T_HI`` (both kinds of guidance) and ``--guidance_method`` (classifier-free)."""
    parser.add_argument(
        "--guidance_interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("T_LO", "T_HI"),
        help="guide only the steps with T_LO < t <= T_HI (train timesteps; Kynkäänniemi et al. 2024); the others "
        "run the conditional model (cfg) or take no classifier gradient (classifier)",
    )
    if methods:
        from ..pipelines.pipeline_classifier_free import GUIDANCE_METHODS

        parser.add_argument(
            "--guidance_method",
            default="cfg",
            choices=tuple(GUIDANCE_METHODS),
            help="with cfg guidance: how a step combines the two predictions (cfg++ takes --guidance_scale = λ in "
            "[0, 1]; apg and cfg-zero* run with their defaults, see ClassifierFreeGuidancePipeline)",
        )


def guidance_variant_kwargs(args, guidance):
    """The pipeline call arguments of ``--guidance_interval`` and ``--guidance_method`` for ``guidance``, checked
    (a ``ValueError`` naming the flag)."""
    from ..guidance import check_guidance_interval

    kwargs = {}
    if args.guidance_interval is not None:
        check_guidance_interval(tuple(args.guidance_interval), "--guidance_interval")
        kwargs["guidance_interval"] = tuple(args.guidance_interval)
    method = getattr(args, "guidance_method", "cfg")
    if method != "cfg":
        if guidance != "cfg":
            raise ValueError(f"--guidance_method {method} needs --guidance cfg")
        kwargs["guidance_method"] = method
    return kwargs
