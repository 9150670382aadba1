"""``hvae-sample``: sample from a saved pipeline: a PNG grid, and with --output the samples as arrays.

    hvae-sample --pipeline_dir runs/demo/denoiser --guidance cfg --guidance_scale 3 --class_labels 0 1 2 3 \\
        --grid runs/samples/cfg.png
    hvae-sample --pipeline_dir runs/demo/classifier_guided --guidance classifier --guidance_scale 2 \\
        --num_samples 100 --grid runs/samples/guided.png --output runs/samples/guided.npz

``--guidance none`` samples the unconditional model (ε(x_t, ∅) of a class-conditional one); ``classifier``
guides it with a noisy classifier (a ClassifierGuidedPipeline folder or a NoisyClassifier folder given by
``--classifier_dir``; the pipeline itself when it is a ClassifierGuidedPipeline); ``cfg`` is classifier-free
guidance. ``--guidance_scale`` is the weight w (cfg) or the scale γ (classifier). ``--scheduler`` swaps in DDIM,
DPM-Solver++ or Euler (same config). The .npz holds ``images`` (uint8, N x H x W x C) and ``labels`` (int, -1 for
unconditional samples). Existing files are replaced only with ``--overwrite_output_dir``.
"""

import argparse
import json
import os

import numpy as np

from ..training.cli import add_num_threads_argument, apply_num_threads
from ..training.sampling import (
    DEFAULT_GUIDANCE_SCALE,
    GUIDANCES,
    SCHEDULERS,
    load_sampling_pipeline,
    num_classes_of_pipeline,
    sample,
    swap_scheduler,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline_dir", required=True, help="a saved pipeline folder (or Hub id)")
    parser.add_argument("--classifier_dir", default=None, help="noisy classifier for --guidance classifier")
    parser.add_argument("--guidance", default="none", choices=GUIDANCES)
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=DEFAULT_GUIDANCE_SCALE,
        help="classifier-free guidance weight w, or classifier guidance scale γ",
    )
    parser.add_argument(
        "--class_labels",
        type=int,
        nargs="+",
        default=None,
        help="labels to sample (cycled to --num_samples; default 0..num_classes-1 cycled)",
    )
    parser.add_argument("--prompt", nargs="+", default=None, help="prompts for a text-conditional model")
    parser.add_argument("--num_samples", type=int, default=None, help="default: one per label, else 16")
    parser.add_argument("--num_inference_steps", type=int, default=100)
    parser.add_argument("--scheduler", default="hvae", choices=SCHEDULERS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=256, help="samples per pipeline call")
    parser.add_argument("--grid", required=True, help="PNG grid path")
    parser.add_argument("--num_columns", type=int, default=10)
    parser.add_argument("--output", default=None, help="write the samples to this .npz")
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="replace an existing --grid or --output file"
    )
    add_num_threads_argument(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from ..training.data import tensor_to_uint8
    from ..training.evaluation import image_grid
    from ..training.runs import write_output_file

    if args.guidance == "none" and (args.class_labels or args.prompt):
        raise ValueError("--class_labels/--prompt need --guidance classifier or cfg")
    if args.guidance_scale < 0:
        raise ValueError(f"--guidance_scale must be >= 0, got {args.guidance_scale}")
    for path in (args.grid, args.output):
        if path and os.path.exists(path) and not args.overwrite_output_dir:
            raise ValueError(f"{path!r} exists; pass --overwrite_output_dir to replace it")
    apply_num_threads(args.num_threads)
    pipe = swap_scheduler(
        load_sampling_pipeline(args.pipeline_dir, args.guidance, args.classifier_dir), args.scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    labels = args.class_labels
    if args.guidance != "none" and not labels and not args.prompt:
        num_classes = num_classes_of_pipeline(pipe)
        if num_classes is None:
            raise ValueError("give --class_labels or --prompt for this pipeline")
        labels = list(range(num_classes))
    num_samples = args.num_samples or (len(labels or args.prompt or []) or 16)
    samples, sample_labels = sample(
        pipe,
        args.guidance,
        args.guidance_scale,
        labels,
        args.prompt,
        num_samples,
        args.num_inference_steps,
        args.seed,
        args.batch_size,
    )
    for path in (args.grid, args.output):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    # atomic writes, refused when another run is writing the same file
    grid = image_grid(samples, args.num_columns)
    write_output_file(args.grid, grid.save, args.overwrite_output_dir, "--grid")
    if args.output:
        arrays = {"images": tensor_to_uint8(samples), "labels": sample_labels}
        write_output_file(
            args.output, lambda handle: np.savez(handle, **arrays), args.overwrite_output_dir, "--output"
        )
    print(json.dumps({"grid": args.grid, "output": args.output, "num_samples": num_samples}))
