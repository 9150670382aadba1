"""``hvae-guidance-table``: guided accuracy, Fréchet distance, KID and cost of every kind of guidance on one model.

    hvae-guidance-table --pipeline_dir runs/demo/denoiser \\
        --classifier_dir runs/demo/classifier_guided --output_dir runs/guidance-table

For classifier-free guidance (a class-conditional ``--pipeline_dir``): plain, in an interval, CFG++, adaptive
projected guidance and CFG-Zero*; for classifier guidance (``--classifier_dir``): plain and in an interval; each at
three scales, ``--num_samples_per_class`` samples per class and cell, the same seed in every cell
(``training.guidance_sweep.guidance_table``). The interval is Kynkäänniemi et al.'s σ ∈ (σ_lo, σ_hi] (EDM2's
(0.28, 2.9] by default) on the model's own schedule. The judge is the evaluation CNN of ``hvae-evaluate``
(trained once on the train split, cached in --output_dir). Writes ``guidance_table.json`` (after every cell),
``guidance_table.md`` and ``guidance_table.png``.
"""

import json
import os

from ..training.cli import (
    add_data_arguments,
    add_num_threads_argument,
    add_overwrite_argument,
    apply_num_threads,
    check_number,
    check_output_dir,
    checked_before_work,
    load_training_data,
    parse_with_defaults_shown,
    program_parser,
)

METHODS = ("cfg", "cfg-interval", "cfg++", "apg", "cfg-zero*", "classifier", "classifier-interval")
# the three scales of each method: w for classifier-free guidance, λ ∈ [0, 1] for CFG++ (at 100 steps of the demo's
# cosine schedule its equivalent weight w_t is about 12 λ at the middle steps), γ for classifier guidance
DEFAULT_SCALES = {"cfg": (1.5, 2.0, 4.0), "cfg++": (0.1, 0.2, 0.4), "classifier": (1.0, 2.0, 4.0)}
# adaptive projected guidance as its paper recommends: no parallel part, momentum −0.5 (rescaling needs a radius
# suited to the data's scale, so it is off)
APG_SETTINGS = {"eta": 0.0, "momentum": -0.5}
CFG_ZERO_STAR_SETTINGS = {"zero_init_steps": 1}  # Diffusers' default


def parse_args(argv=None):
    parser = program_parser("hvae-guidance-table", __doc__)
    add_data_arguments(parser)
    parser.add_argument("--pipeline_dir", required=True, help="a class-conditional denoiser pipeline")
    parser.add_argument("--classifier_dir", default=None, help="a noisy classifier or guided pipeline")
    parser.add_argument("--output_dir", required=True)
    add_overwrite_argument(parser)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    for name, key in (("cfg", "cfg"), ("cfg_plus_plus", "cfg++"), ("classifier", "classifier")):
        parser.add_argument(
            f"--{name}_scales",
            type=float,
            nargs="+",
            default=list(DEFAULT_SCALES[key]),
            help=f"the scales of the {key} method(s)"
            if key != "cfg"
            else "the w of cfg, cfg-interval, apg, cfg-zero*",
        )
    parser.add_argument("--num_samples_per_class", type=int, default=50)
    parser.add_argument("--num_inference_steps", type=int, default=100)
    parser.add_argument(
        "--interval_sigmas",
        type=float,
        nargs=2,
        default=[0.28, 2.9],
        metavar=("SIGMA_LO", "SIGMA_HI"),
        help="the guidance interval σ ∈ (σ_lo, σ_hi] of the interval methods",
    )
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    add_num_threads_argument(parser)
    return parse_with_defaults_shown(parser, argv)


def check_arguments(args):
    if args.num_samples_per_class < 1:
        raise ValueError(f"--num_samples_per_class must be >= 1, got {args.num_samples_per_class}")
    if args.num_inference_steps < 1:
        raise ValueError(f"--num_inference_steps must be >= 1, got {args.num_inference_steps}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    low, high = args.interval_sigmas
    if not 0 <= low < high < float("inf"):
        raise ValueError(f"--interval_sigmas needs 0 <= SIGMA_LO < SIGMA_HI (finite), got {low} {high}")
    for flag in ("cfg_scales", "cfg_plus_plus_scales", "classifier_scales"):
        for scale in getattr(args, flag):
            check_number(f"--{flag}", scale, minimum=0, maximum=1 if flag == "cfg_plus_plus_scales" else None)
    if any(method.startswith("classifier") for method in args.methods) and args.classifier_dir is None:
        raise ValueError("--methods classifier and classifier-interval need --classifier_dir")


def table_settings(methods, cfg_pipe, guided_pipe, interval, scales=None):
    """The cells: ``{"method", "guidance_scale", "pipeline", "kwargs"}`` for each method and its scales
    (``scales``: "cfg", "cfg++" and "classifier" to their scales, default ``DEFAULT_SCALES``)."""
    scales_of = {**DEFAULT_SCALES, **(scales or {})}
    settings = []
    for method in methods:
        if method.startswith("classifier"):
            pipeline, scales = guided_pipe, scales_of["classifier"]
        else:
            pipeline, scales = cfg_pipe, scales_of["cfg++" if method == "cfg++" else "cfg"]
        kwargs = {}
        if method.endswith("interval"):
            kwargs["guidance_interval"] = interval
        if method in ("cfg++", "apg", "cfg-zero*"):
            kwargs["guidance_method"] = method
        if method == "apg":
            kwargs["guidance_kwargs"] = APG_SETTINGS
        if method == "cfg-zero*":
            kwargs["guidance_kwargs"] = CFG_ZERO_STAR_SETTINGS
        settings += [
            {"method": method, "guidance_scale": scale, "pipeline": pipeline, "kwargs": kwargs} for scale in scales
        ]
    return settings


def main(argv=None):
    from ..guidance import guidance_interval_from_sigmas
    from ..training.data import stack_dataset
    from ..training.evaluation import load_or_train_feature_classifier
    from ..training.guidance_sweep import format_guidance_table, guidance_table, plot_guidance_table
    from ..training.sampling import load_sampling_pipeline

    args = parse_args(argv)
    with checked_before_work():
        check_arguments(args)
        check_output_dir(args.output_dir, args.overwrite_output_dir)
        needs_cfg = any(not method.startswith("classifier") for method in args.methods)
        cfg_pipe = load_sampling_pipeline(args.pipeline_dir, "cfg") if needs_cfg else None
        guided_pipe = (
            load_sampling_pipeline(args.pipeline_dir, "classifier", args.classifier_dir)
            if args.classifier_dir is not None
            else None
        )
        pipe = cfg_pipe or guided_pipe
        args.resolution = args.resolution or pipe.denoiser.config.sample_size
        train_dataset, test_dataset, num_classes, _, _ = load_training_data(args, need_labels=True)
    apply_num_threads(args.num_threads)
    os.makedirs(args.output_dir, exist_ok=True)
    for pipeline in (cfg_pipe, guided_pipe):
        if pipeline is not None:
            pipeline.set_progress_bar_config(disable=True)
    train_samples, train_labels = stack_dataset(train_dataset)
    test_samples, _ = stack_dataset(test_dataset)
    judge = load_or_train_feature_classifier(
        os.path.join(args.output_dir, "feature_classifier.safetensors"), train_samples, train_labels, num_classes
    )
    interval = guidance_interval_from_sigmas(*args.interval_sigmas, pipe.scheduler.alphas_cumprod)
    labels = [index % num_classes for index in range(args.num_samples_per_class * num_classes)]
    report = {
        "pipeline_dir": args.pipeline_dir,
        "classifier_dir": args.classifier_dir,
        "num_inference_steps": args.num_inference_steps,
        "interval_sigmas": args.interval_sigmas,
        "guidance_interval": list(interval),
        "apg": APG_SETTINGS,
        "cfg_zero_star": CFG_ZERO_STAR_SETTINGS,
        "rows": [],
    }
    path = os.path.join(args.output_dir, "guidance_table.json")

    def save(row):
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        with open(path + ".tmp", "w") as handle:
            json.dump(report, handle, indent=2)
        os.replace(path + ".tmp", path)

    scales = {"cfg": args.cfg_scales, "cfg++": args.cfg_plus_plus_scales, "classifier": args.classifier_scales}
    settings = table_settings(args.methods, cfg_pipe, guided_pipe, interval, scales)
    rows = guidance_table(
        settings,
        judge,
        test_samples,
        labels,
        num_inference_steps=args.num_inference_steps,
        seed=args.seed,
        batch_size=args.batch_size,
        on_row=save,
    )
    with open(os.path.join(args.output_dir, "guidance_table.md"), "w") as handle:
        handle.write(format_guidance_table(rows))
    plot_guidance_table(rows, os.path.join(args.output_dir, "guidance_table.png"))
    return report


if __name__ == "__main__":
    from . import guidance_table_cli

    guidance_table_cli()
