#!/usr/bin/env python
"""Run every benchmark in one process and write one table: JSON, Markdown and the scaling figure.

    python benchmarks/run.py                              # everything (about 15 min on one CPU thread)
    python benchmarks/run.py --quick                      # tiny sizes: a smoke test of every script (seconds)
    python benchmarks/run.py --only scheduler,cfg --repeats 7
    python benchmarks/run.py --device cuda --autocast bfloat16 --compile --channels_last
    python benchmarks/run.py --update_committed           # also replace benchmarks/results.json and scaling.png

Each benchmark is also a script of its own (``benchmarks/bench_<name>.py``, same flags). Results go to
``--output_dir`` (default ``benchmarks/output/``, ignored by git); the committed results change only with
``--update_committed``. See docs/benchmarks.md.
"""

import argparse
import importlib
import os
import shutil
import time

import torch
from benchmarking_utils import (
    BENCHMARKS_DIR,
    Report,
    add_arguments,
    markdown_table,
    quiet_diffusers,
    settings_from_args,
    write_results,
)

BENCHMARKS = ("scheduler", "sampling", "cfg", "classifier", "interval", "training", "scaling", "fastpaths", "latent")
COMMITTED = {"results.json": "results.json", "scaling.png": "scaling.png"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}"
    )
    parser.add_argument(
        "--update_committed",
        action="store_true",
        help="copy results.json and scaling.png over the committed ones in benchmarks/ after the run",
    )
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(BENCHMARKS))
    if unknown or not args.only:
        parser.error(f"--only: unknown {unknown or 'empty list'}; choose from {','.join(BENCHMARKS)}")
    return args, settings_from_args(args, parser)


def main(argv=None):
    args, settings = parse_args(argv)
    quiet_diffusers()
    report = Report()
    for name in args.only:
        started = time.perf_counter()
        with torch.inference_mode(False):
            importlib.import_module(f"bench_{name}").run(settings, report)
        print(f"{name}: {time.perf_counter() - started:.1f} s", flush=True)
    path = write_results("results", report, settings)
    with open(os.path.join(settings.output_dir, "results.md"), "w") as handle:
        handle.write(markdown_table(report.rows))
    if args.update_committed:
        for produced, committed in COMMITTED.items():
            source = os.path.join(settings.output_dir, produced)
            if os.path.isfile(source):
                shutil.copyfile(source, os.path.join(BENCHMARKS_DIR, committed))
                print(f"updated benchmarks/{committed}", flush=True)
    return path


if __name__ == "__main__":
    main()
