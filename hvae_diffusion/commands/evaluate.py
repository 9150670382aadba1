"""Evaluate a trained pipeline: test ELBO in bits/dim (three terms, plot over t), Fréchet distance and guided accuracy.

    python scripts/evaluate.py --pipeline_dir runs/digits --classifier_dir runs/classifier --output_dir runs/eval

Writes to --output_dir: ``evaluation.json``; ``elbo_denoising_terms.png`` (the denoising-matching KL of each latent
over t); a grid per sampling setting (``grid_unconditional.png``, ``grid_cfg_<w>.png``,
``grid_classifier_<γ>.png``); and ``feature_classifier.pt``, the separately trained classifier of clean test-split
images whose features define the Fréchet distance and whose labels define guided accuracy (not the guidance
classifier; trained once on the train split and cached).
"""

import argparse
import json
import os
import time

import torch

from hvae_diffusion.training.cli import add_data_arguments, load_training_data
from hvae_diffusion.training.data import stack_dataset
from hvae_diffusion.training.evaluation import (
    classifier_accuracy,
    elbo_report,
    feature_frechet_distance,
    image_grid,
    load_or_train_feature_classifier,
    plot_denoising_terms,
)
from hvae_diffusion.training.sampling import load_sampling_pipeline, sample


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--pipeline_dir", required=True, help="the trained denoiser pipeline")
    parser.add_argument("--classifier_dir", default=None, help="noisy classifier, for the classifier-guidance sweep")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--cfg_scales", type=float, nargs="*", default=[0.0, 1.0, 2.0, 4.0])
    parser.add_argument("--classifier_scales", type=float, nargs="*", default=[1.0, 2.0, 4.0])
    parser.add_argument("--num_samples_per_class", type=int, default=20)
    parser.add_argument("--num_unconditional_samples", type=int, default=300)
    parser.add_argument("--num_inference_steps", type=int, default=100)
    parser.add_argument(
        "--elbo_timesteps",
        type=int,
        default=100,
        help="evaluate this many random latents per batch (unbiased, with a standard error); "
        "0 = every latent of the chain",
    )
    parser.add_argument("--elbo_num_samples", type=int, default=None, help="test images for the ELBO (default all)")
    parser.add_argument("--elbo_batch_size", type=int, default=33)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def format_scale(scale):
    return f"{scale:g}"


def main(argv=None):
    args = parse_args(argv)
    from hvae_diffusion import HVAEScheduler
    from hvae_diffusion.pipelines import ClassifierFreeGuidancePipeline

    started = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    train_dataset, test_dataset, num_classes, _, _ = load_training_data(args, need_labels=True)
    train_samples, train_labels = stack_dataset(train_dataset)
    test_samples, test_labels = stack_dataset(test_dataset)
    feature_classifier = load_or_train_feature_classifier(
        os.path.join(args.output_dir, "feature_classifier.pt"), train_samples, train_labels, num_classes, args.seed
    )
    report = {
        "pipeline_dir": args.pipeline_dir,
        "num_inference_steps": args.num_inference_steps,
        "feature_classifier_test_accuracy": classifier_accuracy(feature_classifier, test_samples, test_labels),
    }
    # the Fréchet distance between real sets of the same size: the floor that sample noise alone gives
    reference = train_samples[
        torch.randperm(len(train_samples), generator=torch.Generator().manual_seed(0))[: len(test_samples)]
    ]
    report["frechet_distance_train_vs_test"] = feature_frechet_distance(feature_classifier, reference, test_samples)

    # --- ELBO of the unconditional model ε(x_t, ∅)
    unconditional = load_sampling_pipeline(args.pipeline_dir, "none")
    scheduler = HVAEScheduler.from_config(unconditional.scheduler.config)
    elbo_samples = test_samples[: args.elbo_num_samples] if args.elbo_num_samples else test_samples
    unet = unconditional.unet.eval()
    elbo = elbo_report(
        scheduler,
        lambda x, t: unet(x, t),
        elbo_samples,
        batch_size=args.elbo_batch_size,
        num_timesteps=args.elbo_timesteps or None,
        generator=torch.Generator().manual_seed(args.seed),
    )
    plot_denoising_terms(elbo, os.path.join(args.output_dir, "elbo_denoising_terms.png"))
    report["elbo"] = elbo

    # --- sample quality
    def evaluate_samples(name, pipe, guidance, scale, labels, count):
        pipe.set_progress_bar_config(disable=True)
        samples, sample_labels = sample(
            pipe, guidance, scale, labels, None, count, args.num_inference_steps, args.seed
        )
        image_grid(samples[: 10 * min(10, -(-count // 10))], num_columns=10).save(
            os.path.join(args.output_dir, f"grid_{name}.png")
        )
        result = {
            "num_samples": count,
            "frechet_distance": feature_frechet_distance(feature_classifier, samples, test_samples),
        }
        if guidance != "none":
            result["guided_accuracy"] = classifier_accuracy(
                feature_classifier, samples, torch.as_tensor(sample_labels)
            )
        return result

    report["unconditional"] = evaluate_samples(
        "unconditional", unconditional, "none", 0.0, None, args.num_unconditional_samples
    )
    labels = list(range(num_classes))
    count = args.num_samples_per_class * num_classes
    cfg_pipe = load_sampling_pipeline(args.pipeline_dir, "cfg") if args.cfg_scales else None
    if cfg_pipe is not None and isinstance(cfg_pipe, ClassifierFreeGuidancePipeline):
        report["cfg"] = {
            format_scale(w): evaluate_samples(f"cfg_{format_scale(w)}", cfg_pipe, "cfg", w, labels, count)
            for w in args.cfg_scales
        }
    if args.classifier_dir is not None and args.classifier_scales:
        guided = load_sampling_pipeline(args.pipeline_dir, "classifier", args.classifier_dir)
        report["classifier"] = {
            format_scale(g): evaluate_samples(f"classifier_{format_scale(g)}", guided, "classifier", g, labels, count)
            for g in args.classifier_scales
        }
    report["wall_time_seconds"] = time.time() - started
    with open(os.path.join(args.output_dir, "evaluation.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    summary = {key: value for key, value in report.items() if key != "elbo"}
    summary["bits_per_dim"] = elbo["bits_per_dim"]
    summary["bits_per_dim_standard_error"] = elbo["standard_error"]
    print(json.dumps(summary, indent=1))
    return report


if __name__ == "__main__":
    main()
