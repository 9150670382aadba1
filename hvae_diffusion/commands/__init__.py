"""The command-line programs (``hvae-train``, ``hvae-sample``, ...): each module parses arguments and calls the
library; ``scripts/*.py`` and the console entry points run a module's ``main`` through ``<module>_cli``.

A module's ``main(argv=None)`` may return what it made (a report, a training result) for callers in Python, and
raises a ``UsageError`` (a ``ValueError``) for a flag or input refused before any work
(``hvae_diffusion.training.cli`` describes the pattern every program follows). ``<module>_cli`` is the program:
it prints a ``UsageError`` as argparse prints a bad flag (one line ``hvae-<name>: error: ...``, exit status 2), an
interrupted training run's resume command (Ctrl-C, exit status 130), and returns None, so a finished run exits with
status 0.
"""

import importlib
import shlex
import sys

PROGRAMS = ("train", "train_classifier", "train_vae", "sample", "evaluate", "guidance_table", "demo", "toy2d")
RESUMABLE = ("train", "train_classifier", "train_vae")


def program_name(program: str) -> str:
    return f"hvae-{program.replace('_', '-')}"


def resume_command(program: str, argv) -> str:
    """The command that continues an interrupted run: the same flags, with ``--resume_from_checkpoint latest``."""
    argv, kept, skip = list(argv), [], False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--resume_from_checkpoint":
            skip = True
        elif not arg.startswith("--resume_from_checkpoint="):
            kept.append(arg)
    return shlex.join([program_name(program), *kept, "--resume_from_checkpoint", "latest"])


def run_program(program: str, argv=None) -> None:
    """Run ``hvae-<program>`` as a console script: its ``main(argv)``, with user errors and Ctrl-C reported as
    one or two lines instead of a traceback (see the module docstring)."""
    from ..training.cli import UsageError
    from ..training.loop import NonFiniteLossError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        module = importlib.import_module(f"{__name__}.{program}")
    except ModuleNotFoundError as error:  # an extra's module imported by the program itself
        extra = extra_of_module(error.name)
        if extra is None:
            raise
        sys.stderr.write(
            f"{program_name(program)}: error: needs the [{extra}] extra ({error.name} not installed): install the "
            f"package with it, e.g. pip install -e '.[{extra}]' in the source folder\n"
        )
        sys.exit(2)
    try:
        module.main(argv)
    except UsageError as error:
        message = " ".join(str(error).split("\n"))
        sys.stderr.write(f"{program_name(program)}: error: {message}\n")
        sys.exit(2)
    except NonFiniteLossError as error:  # the message says which checkpoint is kept
        sys.stderr.write(f"{program_name(program)}: error: {error}\n")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{program_name(program)}: interrupted\n")
        if program in RESUMABLE:
            sys.stderr.write(f"to continue from the newest checkpoint: {resume_command(program, argv)}\n")
        sys.exit(130)


def extra_of_module(name):
    """The extra of setup.cfg that installs the top-level module ``name``, or None."""
    from ..training.cli import EXTRAS

    top = (name or "").split(".")[0]
    return next((extra for extra, modules in EXTRAS.items() if top in modules), None)


def _console_entry_point(program: str):
    def entry_point() -> None:
        run_program(program)

    entry_point.__name__ = entry_point.__qualname__ = f"{program}_cli"
    entry_point.__doc__ = f"``{program_name(program)}``: runs ``{program}.main`` (see ``run_program``)."
    return entry_point


train_cli = _console_entry_point("train")
train_classifier_cli = _console_entry_point("train_classifier")
train_vae_cli = _console_entry_point("train_vae")
sample_cli = _console_entry_point("sample")
evaluate_cli = _console_entry_point("evaluate")
guidance_table_cli = _console_entry_point("guidance_table")
demo_cli = _console_entry_point("demo")
toy2d_cli = _console_entry_point("toy2d")
