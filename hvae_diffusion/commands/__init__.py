"""The command-line programs (``hvae-train``, ``hvae-sample``, ...): each module parses arguments and calls the
library; ``scripts/*.py`` run a module's ``main``, and the console entry points run it through ``<module>_cli``.

A module's ``main(argv=None)`` may return what it made (a report, a training result) for callers in Python; a
console script passes ``main``'s return value to ``sys.exit``, where anything but None or an int is printed and
exits with status 1. The ``*_cli`` functions return None, so a finished run exits with status 0.
"""

import importlib

PROGRAMS = ("train", "train_classifier", "train_vae", "sample", "evaluate", "demo", "toy2d")


def _console_entry_point(program: str):
    def entry_point() -> None:
        importlib.import_module(f"{__name__}.{program}").main()

    entry_point.__name__ = entry_point.__qualname__ = f"{program}_cli"
    entry_point.__doc__ = f"``hvae-{program.replace('_', '-')}``: runs ``{program}.main`` and returns None."
    return entry_point


train_cli = _console_entry_point("train")
train_classifier_cli = _console_entry_point("train_classifier")
train_vae_cli = _console_entry_point("train_vae")
sample_cli = _console_entry_point("sample")
evaluate_cli = _console_entry_point("evaluate")
demo_cli = _console_entry_point("demo")
toy2d_cli = _console_entry_point("toy2d")
