#!/usr/bin/env python
"""The bound and the variance of its estimate, for pipelines trained with different noise schedules or samplers.

    python benchmarks/learned_schedule.py --output_dir runs/learned_schedule \
        --pipeline_dir fixed=runs/fixed learned=runs/learned importance=runs/importance

For each pipeline (with its own scheduler, so a learned schedule's tables), on the built-in digits' test split:

- the test −ELBO in bits/dim from ``estimate_elbo``'s importance estimator at ``--nfe`` forwards per image, with
  its dataset standard error (over images and draws), on the whole split;
- the variance of the single-draw estimate of the denoising sum with t ~ U(chain) and a fresh x_t,
  N² Var_t(L_t(x_0)) averaged over images, in (bits/dim)²: what one training example's ELBO loss spreads by, and
  what VDM's learned schedule minimises. It is measured from ``--variance_draws`` uniform draws on each of the
  first ``--variance_images`` images, and reported with its standard error over those images;
- the uniform estimator's own −ELBO and dataset standard error from the same draws;
- the continuous-time bound −L∞ (``continuous_elbo.estimate_continuous_elbo``) on the same images, on the learned
  schedule γ_η itself or on the spline through a fixed table, with ``--variance_draws`` replicates of one time each:
  its per-image replicate spread is the single-draw variance of the continuous-time estimate (VDM's objective).

Writes ``learned_schedule.json`` and prints a Markdown table.
"""

import argparse
import json
import math
import os
import sys

import torch

from hvae_diffusion.continuous_elbo import estimate_continuous_elbo
from hvae_diffusion.continuous_schedule import DiscreteLogSNRSpline, continuous_time_denoiser
from hvae_diffusion.elbo_estimation import estimate_elbo
from hvae_diffusion.models import LearnedNoiseSchedule

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bpd_estimators import load_model_and_data  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline_dir", nargs="+", required=True, help="name=folder of each trained pipeline")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--nfe", type=int, default=51, help="forwards per image of the importance estimate")
    parser.add_argument("--variance_draws", type=int, default=100, help="uniform draws per image for the variance")
    parser.add_argument("--variance_images", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=1)
    return parser.parse_args(argv)


def single_draw_variance(denoising_terms, num_latents):
    """Per image, N² × the sample variance of its uniformly drawn terms L_t (each at its own x_t): the variance of
    the one-draw estimate N·L_t of Σ_t L_t. ``denoising_terms`` is ``[n, K]``."""
    terms = torch.as_tensor(denoising_terms, dtype=torch.float64)
    return num_latents**2 * terms.var(dim=1)


def continuous_log_snr(pipeline_dir, scheduler):
    """λ(t): the pipeline's learned schedule (−γ_η) if it has one, else the spline through its scheduler's table."""
    if os.path.isdir(os.path.join(pipeline_dir, "noise_schedule")):
        schedule = LearnedNoiseSchedule.from_pretrained(pipeline_dir, subfolder="noise_schedule").eval()
        return lambda t: -schedule(t), "learned γη"
    return DiscreteLogSNRSpline(scheduler.alphas_cumprod), "spline of the table"


def evaluate(pipeline_dir, args):
    scheduler, denoiser, samples = load_model_and_data(pipeline_dir, None)
    num_latents = len(scheduler.timesteps) - 1
    log_snr, log_snr_source = continuous_log_snr(pipeline_dir, scheduler)
    with torch.no_grad():
        importance = estimate_elbo(
            scheduler,
            denoiser,
            samples,
            "importance",
            args.nfe,
            generator=torch.Generator().manual_seed(args.seed),
            batch_size=args.batch_size,
            show_progress=False,
        )
        uniform = estimate_elbo(
            scheduler,
            denoiser,
            samples[: args.variance_images],
            "uniform",
            args.variance_draws + 1,
            generator=torch.Generator().manual_seed(args.seed + 1),
            batch_size=args.batch_size,
            show_progress=False,
        )
        continuous = estimate_continuous_elbo(
            log_snr,
            continuous_time_denoiser(denoiser, scheduler.config.num_train_timesteps),
            samples[: args.variance_images],
            scheduler.config.prediction_type,
            num_function_evaluations=2 * args.variance_draws,
            num_replicates=args.variance_draws,
            generator=torch.Generator().manual_seed(args.seed + 2),
            batch_size=args.batch_size,
            show_progress=False,
        )
    variance = single_draw_variance(uniform.denoising_terms, num_latents)
    # one time per replicate: R × the squared per-image standard error is the variance of one draw
    continuous_variance = continuous.standard_error.double() ** 2 * args.variance_draws
    log_snr = torch.logit(scheduler.alphas_cumprod)
    return {
        "pipeline_dir": pipeline_dir,
        "num_images": int(samples.shape[0]),
        "bits_per_dim": importance.dataset_bits_per_dim,
        "standard_error": importance.dataset_standard_error,
        "nfe_per_image": importance.num_function_evaluations / samples.shape[0],
        "single_draw_variance": float(variance.mean()),
        "single_draw_variance_standard_error": float(variance.std() / math.sqrt(len(variance))),
        "uniform_bits_per_dim": uniform.dataset_bits_per_dim,
        "uniform_standard_error": uniform.dataset_standard_error,
        "continuous_bits_per_dim": continuous.dataset_bits_per_dim,
        "continuous_standard_error": continuous.dataset_standard_error,
        "continuous_single_draw_variance": float(continuous_variance.mean()),
        "continuous_single_draw_variance_standard_error": float(
            continuous_variance.std() / math.sqrt(len(continuous_variance))
        ),
        "continuous_log_snr": log_snr_source,
        "variance_images": int(len(variance)),
        "variance_draws": args.variance_draws,
        "log_snr_first": float(log_snr[0]),
        "log_snr_last": float(log_snr[-1]),
    }


def markdown_table(report):
    lines = [
        "| pipeline | test −ELBO, importance (bits/dim) | single-draw variance ((bits/dim)²) | "
        "uniform estimate (bits/dim) | −L∞ (bits/dim) | single-draw variance of L∞ ((bits/dim)²) | "
        "log-SNR first / last latent |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in report.items():
        lines.append(
            f"| {name} | {row['bits_per_dim']:.3f} ± {row['standard_error']:.3f} ({row['nfe_per_image']:.0f} NFE) | "
            f"{row['single_draw_variance']:.4g} ± {row['single_draw_variance_standard_error']:.2g} | "
            f"{row['uniform_bits_per_dim']:.3f} ± {row['uniform_standard_error']:.3f} ({row['variance_draws'] + 1} "
            f"NFE, {row['variance_images']} images) | "
            f"{row['continuous_bits_per_dim']:.3f} ± {row['continuous_standard_error']:.3f} | "
            f"{row['continuous_single_draw_variance']:.4g} ± {row['continuous_single_draw_variance_standard_error']:.2g} | "
            f"{row['log_snr_first']:.2f} / {row['log_snr_last']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    os.makedirs(args.output_dir, exist_ok=True)
    report = {}
    for item in args.pipeline_dir:
        name, separator, folder = item.partition("=")
        if not separator or not name or not folder:
            raise SystemExit(f"error: --pipeline_dir takes name=folder, got {item!r}")
        report[name] = evaluate(folder, args)
        print(name, json.dumps(report[name]), flush=True)
    with open(os.path.join(args.output_dir, "learned_schedule.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    print(markdown_table(report))


if __name__ == "__main__":
    main()
