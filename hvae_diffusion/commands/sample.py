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
unconditional samples); it is written before the grid. Existing files are replaced only with
``--overwrite_output_dir``.
"""

import json
import os

import numpy as np

from ..training.cli import (
    add_guidance_variant_arguments,
    add_num_threads_argument,
    apply_num_threads,
    check_num_threads,
    check_number,
    check_pipeline_dir,
    checked_before_work,
    guidance_variant_kwargs,
    parse_with_defaults_shown,
    program_parser,
)
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
    parser = program_parser("hvae-sample", __doc__)
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
    parser.add_argument(
        "--num_samples", type=int, default=None, help="default: one per label or prompt (one per class), else 16"
    )
    parser.add_argument("--num_inference_steps", type=int, default=100)
    parser.add_argument("--scheduler", default="hvae", choices=SCHEDULERS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=256, help="samples per pipeline call")
    parser.add_argument("--grid", required=True, help="the grid image (.png, or another format PIL writes)")
    parser.add_argument("--num_columns", type=int, default=10)
    parser.add_argument("--output", default=None, help="write the samples to this .npz")
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="replace an existing --grid or --output file"
    )
    add_guidance_variant_arguments(parser)
    add_num_threads_argument(parser)
    return parse_with_defaults_shown(parser, argv)


def check_arguments(args):
    """Every flag against its range and the others, before the pipeline is loaded."""
    from PIL import Image

    if args.guidance == "none" and (args.class_labels or args.prompt):
        raise ValueError("--class_labels/--prompt need --guidance classifier or cfg")
    check_number("--guidance_scale", args.guidance_scale, minimum=0)
    if args.guidance == "none" and (args.guidance_interval is not None or args.guidance_method != "cfg"):
        raise ValueError("--guidance_interval/--guidance_method need --guidance classifier or cfg")
    guidance_variant_kwargs(args, args.guidance)
    if args.guidance_method == "cfg++" and args.guidance_scale > 1:
        raise ValueError(f"--guidance_method cfg++ takes --guidance_scale = λ in [0, 1], got {args.guidance_scale}")
    for name in ("num_inference_steps", "batch_size", "num_columns"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_samples is not None and args.num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1 (or omitted for the default), got {args.num_samples}")
    extension = os.path.splitext(args.grid)[1].lower()
    if extension not in Image.registered_extensions():
        raise ValueError(f"--grid={args.grid!r}: not an image file name PIL can write (give it a .png ending)")
    if args.output is not None and not args.output.endswith(".npz"):
        raise ValueError(f"--output={args.output!r} must end with .npz (numpy would append it)")
    for flag, path in (("--grid", args.grid), ("--output", args.output)):
        if path and os.path.isdir(path):
            raise ValueError(f"{flag}={path!r} is a folder, not a file")
        if path and os.path.exists(path) and not args.overwrite_output_dir:
            raise ValueError(f"{path!r} exists; pass --overwrite_output_dir to replace it")
    check_num_threads(args.num_threads)
    check_pipeline_dir("--pipeline_dir", args.pipeline_dir)
    if args.classifier_dir is not None:
        check_pipeline_dir("--classifier_dir", args.classifier_dir)


def check_class_labels(labels, num_classes):
    """``--class_labels`` against the pipeline's real classes (its null label is not one)."""
    bad = [label for label in labels or () if not 0 <= label < num_classes]
    if bad:
        raise ValueError(
            f"--class_labels must lie in [0, {num_classes - 1}] (the pipeline's {num_classes} classes), got {bad}"
        )


def main(argv=None):
    args = parse_args(argv)
    from ..training.data import tensor_to_uint8
    from ..training.evaluation import image_grid
    from ..training.runs import write_output_file

    with checked_before_work():
        check_arguments(args)
        apply_num_threads(args.num_threads)
        pipe = swap_scheduler(
            load_sampling_pipeline(args.pipeline_dir, args.guidance, args.classifier_dir), args.scheduler
        )
        pipe.set_progress_bar_config(disable=True)
        num_classes = num_classes_of_pipeline(pipe) if args.guidance != "none" else None
        if args.class_labels and num_classes is not None:
            check_class_labels(args.class_labels, num_classes)
        if args.guidance != "none" and not args.class_labels and not args.prompt and num_classes is None:
            raise ValueError("give --class_labels or --prompt for this pipeline")
    labels = args.class_labels
    if args.guidance != "none" and not labels and not args.prompt:
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
        guidance_kwargs=guidance_variant_kwargs(args, args.guidance),
    )
    for path in (args.grid, args.output):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    # the samples first (the grid is only a view of them); atomic writes, refused when another run writes the file
    if args.output:
        arrays = {"images": tensor_to_uint8(samples), "labels": sample_labels}
        write_output_file(
            args.output, lambda handle: np.savez(handle, **arrays), args.overwrite_output_dir, "--output"
        )
    grid = image_grid(samples, args.num_columns)
    write_output_file(args.grid, grid.save, args.overwrite_output_dir, "--grid")
    print(json.dumps({"grid": args.grid, "output": args.output, "num_samples": num_samples}))
