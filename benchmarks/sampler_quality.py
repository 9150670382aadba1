#!/usr/bin/env python
"""Which sampler to use: sample quality against the number of steps, on a trained class-conditional pipeline.

    python benchmarks/sampler_quality.py --pipeline_dir runs/demo/denoiser --num_samples 100 --steps 5 10 20 50 100
    python benchmarks/sampler_quality.py --pipeline_dir runs/demo/denoiser --num_samples 100 --steps 1000 \
        --samplers hvae_fixed_small ddim --append --figure docs/figures/sampler_quality.png

For each sampler (ancestral HVAE with fixed_small and fixed_large variances, DDIM, DPM-Solver++ 2M with and without
Karras σ, Euler, Euler ancestral, each built from the pipeline's scheduler config) and each step count it draws
``--num_samples`` unconditional samples (the model's ε(x_t, ∅)) and as many classifier-free guided ones
(``--guidance_scale``, labels cycled 0..9), from the same x_T for every sampler. Quality is the Fréchet distance to
the test split in the feature space of ``hvae_diffusion.training.evaluation.FeatureClassifier`` (trained on the train
split, cached in --output_dir), and for guided samples also the guided accuracy (the share that classifier labels
as asked). The floor is the Fréchet distance between ``--num_samples`` real train images and the test split: the
value of a perfect sampler at this sample count (mean and spread over five draws).

Writes ``sampler_quality.json`` and ``sampler_quality.md`` to --output_dir (each cell as it finishes), and the figure;
``--append`` adds cells to the previous run's table. The built-in digits are the data (the demo's). On one CPU thread
a cell of 100 samples costs about 0.25 s a step (unconditional and guided together): the two commands above take
about 15 minutes, the 1000-step cells most of it.
"""

import argparse
import json
import os
import time

import numpy as np
import torch

SAMPLERS = ("hvae_fixed_small", "hvae_fixed_large", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_ancestral")
STEPS = (5, 10, 20, 50, 100, 1000)
DEFAULT_OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output", "sampler_quality")


def make_scheduler(name, config):
    """The sampler ``name`` built from the pipeline's scheduler ``config`` (its β schedule and prediction type)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    from hvae_diffusion import HVAEScheduler

    if name.startswith("hvae_"):
        return HVAEScheduler.from_config(config, variance_type=name.removeprefix("hvae_"))
    if name.startswith("dpmpp_2m"):
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=name.endswith("karras")
        )
    classes = {
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "euler_ancestral": EulerAncestralDiscreteScheduler,
    }
    return classes[name].from_config(config)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pipeline_dir", required=True, help="a saved class-conditional ClassifierFreeGuidancePipeline"
    )
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="num_inference_steps values")
    parser.add_argument("--num_samples", type=int, default=10, help="samples per cell, unconditional and guided each")
    parser.add_argument("--guidance_scale", type=float, default=2.0, help="classifier-free guidance weight w")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help="default benchmarks/output/sampler_quality")
    parser.add_argument("--figure", default=None, help="PNG path (default <output_dir>/sampler_quality.png)")
    parser.add_argument(
        "--append",
        action="store_true",
        help="add these cells to <output_dir>/sampler_quality.json (same pipeline, samples, w, seed), replacing any "
        "cell measured again, so that a grid can be filled in several runs",
    )
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        parser.error(f"--num_samples must be at least 2 (a covariance needs two samples), got {args.num_samples}")
    if min(args.steps) < 1:
        parser.error(f"--steps must all be at least 1, got {args.steps}")
    if args.guidance_scale < 0:
        parser.error(f"--guidance_scale must be ≥ 0, got {args.guidance_scale}")
    if not os.path.isdir(args.pipeline_dir):
        parser.error(f"--pipeline_dir {args.pipeline_dir!r} is not a folder (make demo writes runs/demo/denoiser)")
    args.figure = args.figure or os.path.join(args.output_dir, "sampler_quality.png")
    if args.append:
        args.previous = previous_result(args, parser)
    return args


def previous_result(args, parser):
    """The result in --output_dir that --append adds to, after checking it was measured with these settings."""
    path = os.path.join(args.output_dir, "sampler_quality.json")
    if not os.path.isfile(path):
        parser.error(f"--append needs a previous run's {path}")
    with open(path) as handle:
        previous = json.load(handle)
    for name in ("pipeline_dir", "num_samples", "guidance_scale", "seed"):
        if previous.get(name) != getattr(args, name):
            parser.error(
                f"--append: --{name} {getattr(args, name)!r} differs from the previous run's {previous.get(name)!r}"
            )
    return previous


def real_data(output_dir, seed):
    """(train images, test images, test labels, the feature classifier), images in [−1, 1]."""
    from hvae_diffusion.training.data import image_dataset_to_tensors, load_digits_dataset, stack_dataset
    from hvae_diffusion.training.evaluation import load_or_train_feature_classifier

    splits = load_digits_dataset()
    train_images, train_labels = stack_dataset(image_dataset_to_tensors(splits["train"], label_column="label"))
    test_images, test_labels = stack_dataset(image_dataset_to_tensors(splits["test"], label_column="label"))
    path = os.path.join(output_dir, "feature_classifier.safetensors")
    classifier = load_or_train_feature_classifier(path, train_images, train_labels, 10, seed)
    return train_images, test_images, test_labels, classifier


def main(argv=None):
    args = parse_args(argv)
    from hvae_diffusion import ClassifierFreeGuidancePipeline, HVAEPipeline
    from hvae_diffusion.training.evaluation import classifier_accuracy, feature_frechet_distance

    torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    train_images, test_images, _, classifier = real_data(args.output_dir, args.seed)
    count = args.num_samples
    floors = [
        feature_frechet_distance(
            classifier,
            train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(s))[:count]],
            test_images,
        )
        for s in range(5)
    ]
    guided = ClassifierFreeGuidancePipeline.from_pretrained(args.pipeline_dir)
    guided.set_progress_bar_config(disable=True)
    null_label = guided.config.null_class_label
    # HVAEPipeline calls a class-conditional unet with its null label: this samples p(x)
    unconditional = HVAEPipeline(unet=guided.unet, scheduler=guided.scheduler)
    unconditional.set_progress_bar_config(disable=True)
    config = guided.scheduler.config
    shape = (count, guided.unet.config.in_channels, guided.unet.config.sample_size, guided.unet.config.sample_size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    labels = [i % null_label for i in range(count)]
    result = {
        "pipeline_dir": args.pipeline_dir,
        "num_samples": count,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "threads": args.threads,
        "frechet_distance_floor": {"mean": float(np.mean(floors)), "std": float(np.std(floors)), "draws": floors},
        "rows": [],
    }
    print(f"Fréchet distance floor ({count} real vs test): {np.mean(floors):.2f} ± {np.std(floors):.2f}", flush=True)
    new_cells = {(name, steps) for name in args.samplers for steps in args.steps}
    if args.append:
        result["rows"] = [row for row in args.previous["rows"] if (row["sampler"], row["steps"]) not in new_cells]
    started = time.perf_counter()
    for name in args.samplers:
        for steps in args.steps:
            cell_started = time.perf_counter()
            row = {"sampler": name, "steps": steps}
            try:  # a sampler that fails in this pipeline is a finding of the table, not the end of the run
                for kind, pipeline, kwargs in (
                    ("unconditional", unconditional, {"batch_size": count}),
                    ("guided", guided, {"class_labels": labels, "guidance_scale": args.guidance_scale}),
                ):
                    pipeline.scheduler = make_scheduler(name, config)
                    images = pipeline(
                        num_inference_steps=steps,
                        latents=x_T,
                        generator=torch.Generator().manual_seed(args.seed + 1),
                        output_type="pt",
                        **kwargs,
                    ).images
                    images = images * 2 - 1
                    row[f"{kind}_frechet_distance"] = feature_frechet_distance(classifier, images, test_images)
                    if kind == "guided":
                        row["guided_accuracy"] = classifier_accuracy(classifier, images, torch.as_tensor(labels))
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"
            row["seconds"] = time.perf_counter() - cell_started
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            write(result, args)
    # with --append, the compute of every run that made the table
    result["wall_time_seconds"] = (
        time.perf_counter() - started + (args.previous["wall_time_seconds"] if args.append else 0)
    )
    write(result, args)
    plot(result, args.figure)
    return result


def markdown(result) -> str:
    """Rows: samplers; columns: steps; each cell "unconditional FD / guided FD / guided accuracy"."""
    steps = sorted({row["steps"] for row in result["rows"]})
    cells = {(row["sampler"], row["steps"]): row for row in result["rows"]}
    lines = ["| sampler | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for sampler in dict.fromkeys(row["sampler"] for row in result["rows"]):
        shown = []
        for s in steps:
            row = cells.get((sampler, s))
            if row is None:
                shown.append("not run")
            elif "error" in row:
                shown.append(f"fails: {row['error'].split(':')[0]}")
            else:
                shown.append(
                    f"{row['unconditional_frechet_distance']:.1f} / {row['guided_frechet_distance']:.1f} / "
                    f"{row['guided_accuracy']:.2f}"
                )
        lines.append(f"| {sampler} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def write(result, args):
    with open(os.path.join(args.output_dir, "sampler_quality.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    with open(os.path.join(args.output_dir, "sampler_quality.md"), "w") as handle:
        handle.write(markdown(result))


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [
        ("unconditional_frechet_distance", "Fréchet distance, unconditional"),
        ("guided_frechet_distance", f"Fréchet distance, guided (w = {result['guidance_scale']:g})"),
        ("guided_accuracy", "guided accuracy"),
    ]
    floor = result["frechet_distance_floor"]["mean"]
    for axis, (key, title) in zip(axes, panels):
        for index, sampler in enumerate(dict.fromkeys(row["sampler"] for row in result["rows"])):
            rows = sorted(
                (row for row in result["rows"] if row["sampler"] == sampler and "error" not in row),
                key=lambda row: row["steps"],
            )
            style = "o-" if index < 5 else "s--"
            axis.plot([row["steps"] for row in rows], [row[key] for row in rows], style, label=sampler, markersize=4)
        if key != "guided_accuracy":
            axis.axhline(floor, color="grey", linestyle=":", label=f"floor (real vs real, n={result['num_samples']})")
        axis.set(xscale="log", xlabel="num_inference_steps", title=title)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"Sample quality against steps, {result['num_samples']} samples a cell")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
