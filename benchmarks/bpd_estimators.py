#!/usr/bin/env python
"""How many denoiser forwards the bits/dim needs: each ELBO estimator's dataset standard error against NFEs.

    python benchmarks/bpd_estimators.py --pipeline_dir runs/demo/denoiser --output_dir runs/bpd_estimators \
        --plot docs/figures/bpd_estimators_nfe.png

1. The full chain on the whole test split (N + 1 forwards per image), the reference. Its per-(image, latent) terms
   are kept in ``full_chain_terms.npz`` in ``--output_dir`` and reused by later runs with the same arguments.
2. For each estimator and each budget in ``--nfe``: the dataset standard error that ``estimate_elbo`` reports,
   averaged over ``--repeats`` sets of t draws. These draws index the full chain's recorded terms (the same x_t
   for the same (image, latent)), so they cost no new forward; the NFE axis counts the forwards the estimator
   itself would spend, its pilot included.
3. One live ``estimate_elbo`` run per estimator at ``--live_nfe`` (fresh x_t and t, real forwards), to show
   that the live estimates agree with the full chain.

Writes ``bpd_estimators.json`` and a plot (``--plot``, default ``bpd_estimators.png`` in ``--output_dir``), and
prints a Markdown table. The bits/dim are those of the unconditional model ε(x_t, ∅), as ``hvae-evaluate``
reports them.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

from hvae_diffusion.elbo_estimation import (
    estimate_elbo,
    importance_proposal,
    importance_timestep_draws,
    per_image_standard_error,
    pilot_chain_indices,
    stratified_timestep_draws,
    stratum_of_draws,
    uniform_timestep_draws,
)

SAMPLED_ESTIMATORS = ("uniform", "stratified", "importance")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline_dir", required=True, help="a trained denoiser pipeline (class-conditional or not)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--plot", default=None, help="PNG path (default: bpd_estimators.png in --output_dir)")
    parser.add_argument(
        "--nfe", type=int, nargs="+", default=[3, 6, 11, 21, 31, 41, 49, 101, 201], help="forwards per image"
    )
    parser.add_argument("--live_nfe", type=int, default=49)
    parser.add_argument("--repeats", type=int, default=20, help="t-draw sets per (estimator, NFE)")
    parser.add_argument("--num_samples", type=int, default=None, help="test images (default: the whole split)")
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=1)
    return parser.parse_args(argv)


def load_model_and_data(pipeline_dir, num_samples):
    """The scheduler, the unconditional denoiser and the built-in digits' test split (first ``num_samples``)."""
    from hvae_diffusion.pipelines.serialization import denoiser_scheduler
    from hvae_diffusion.training.cli import add_data_arguments, load_training_data
    from hvae_diffusion.training.data import stack_dataset
    from hvae_diffusion.training.sampling import load_sampling_pipeline

    data_parser = argparse.ArgumentParser()
    add_data_arguments(data_parser)
    _, test_dataset, _, _, _ = load_training_data(data_parser.parse_args([]), need_labels=True)
    samples, _ = stack_dataset(test_dataset)
    unconditional = load_sampling_pipeline(pipeline_dir, "none")
    scheduler = denoiser_scheduler(unconditional)
    return scheduler, unconditional.unet.eval(), samples[:num_samples]


def resampled_standard_error(full, estimator, nfe, generator, pilot_images=8, pilot_timesteps=32):
    """The dataset SE ``estimate_elbo`` would report with ``nfe`` forwards per image, t drawn from recorded terms."""
    terms = torch.from_numpy(full["denoising_terms"])  # [n, N] bits/dim
    num_images, num_latents = terms.shape
    num_draws = nfe - 1
    strata, pilot = None, 0
    if estimator == "uniform":
        indices, weights = uniform_timestep_draws(num_latents, num_draws, num_images, generator)
    elif estimator == "stratified":
        strata, _ = stratum_of_draws(num_latents, num_draws)
        indices, weights = stratified_timestep_draws(num_latents, num_draws, num_images, generator)
    else:
        pilot_rows = torch.randperm(num_images, generator=generator)[:pilot_images]
        pilot_indices = pilot_chain_indices(num_latents, pilot_timesteps)
        proposal = importance_proposal(pilot_indices, terms[pilot_rows][:, pilot_indices], num_latents)
        indices, weights = importance_timestep_draws(proposal, num_draws, num_images, generator)
        pilot = pilot_images * len(pilot_indices)
    drawn = terms.gather(1, indices)
    per_image = full["fixed"] + (drawn * weights).sum(1).numpy()
    per_image_se = per_image_standard_error(drawn, weights, strata).numpy()
    return {
        "dataset_standard_error": float(per_image.std(ddof=1) / math.sqrt(num_images)),
        "dataset_bits_per_dim": float(per_image.mean()),
        "mean_per_image_standard_error": float(per_image_se.mean()),
        "nfe_per_image": nfe + pilot / num_images,
    }


def full_chain(scheduler, denoiser, samples, args):
    path = os.path.join(args.output_dir, "full_chain_terms.npz")
    if os.path.isfile(path):
        saved = np.load(path)
        if saved["denoising_terms"].shape[0] == samples.shape[0] and int(saved["seed"]) == args.seed:
            print(f"reusing {path}")
            return {key: saved[key] for key in saved.files}
    started = time.time()
    result = estimate_elbo(
        scheduler,
        denoiser,
        samples,
        "full",
        generator=torch.Generator().manual_seed(args.seed),
        batch_size=args.batch_size,
    )
    full = {
        "denoising_terms": result.denoising_terms.numpy(),
        "fixed": (result.prior_matching + result.reconstruction).numpy(),
        "bits_per_dim": result.bits_per_dim.numpy(),
        "num_function_evaluations": np.asarray(result.num_function_evaluations),
        "wall_time_seconds": np.asarray(time.time() - started),
        "seed": np.asarray(args.seed),
    }
    np.savez(path, **full)
    return full


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4))
    for estimator in SAMPLED_ESTIMATORS:
        rows = report["curves"][estimator]
        line = axis.plot(
            [r["nfe_per_image"] for r in rows], [r["dataset_standard_error"] for r in rows], "o-", label=estimator
        )[0]
        live = report["live"][estimator]
        axis.plot(
            [live["num_function_evaluations_per_image"]],
            [live["standard_error"]],
            "x",
            color=line.get_color(),
            markersize=9,
            label=f"{estimator}, live run (fresh x_t)",
        )
    full = report["full"]
    axis.axhline(full["standard_error"], color="black", linestyle="--", label="full chain (image spread)")
    axis.axhline(1.1 * full["standard_error"], color="grey", linestyle=":", label="1.1 × full chain")
    axis.plot([full["nfe_per_image"]], [full["standard_error"]], "ks")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("denoiser forwards per image (NFE)")
    axis.set_ylabel("dataset standard error [bits/dim]")
    axis.set_title(f"bits/dim of {report['num_samples']} test images: {full['bits_per_dim']:.3f} (full chain)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown_table(report):
    full = report["full"]
    lines = [
        "| estimator | NFE / image | dataset bits/dim | dataset SE | SE / full chain's | NFE saving |",
        "|---|---|---|---|---|---|",
        f"| full chain | {full['nfe_per_image']:.0f} | {full['bits_per_dim']:.3f} | {full['standard_error']:.4f} "
        "| 1.00 | 1× |",
    ]
    for estimator in SAMPLED_ESTIMATORS:
        for row in report["curves"][estimator]:
            lines.append(
                f"| {estimator} | {row['nfe_per_image']:.1f} | {row['dataset_bits_per_dim']:.3f} "
                f"| {row['dataset_standard_error']:.4f} | {row['dataset_standard_error'] / full['standard_error']:.2f} "
                f"| {full['nfe_per_image'] / row['nfe_per_image']:.0f}× |"
            )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    os.makedirs(args.output_dir, exist_ok=True)
    scheduler, denoiser, samples = load_model_and_data(args.pipeline_dir, args.num_samples)
    num_latents = len(scheduler.timesteps) - 1
    for nfe in [*args.nfe, args.live_nfe]:
        if not 3 <= nfe <= num_latents + 1:
            raise ValueError(f"--nfe and --live_nfe must lie in [3, {num_latents + 1}], got {nfe}")

    full = full_chain(scheduler, denoiser, samples, args)
    num_images = samples.shape[0]
    report = {
        "pipeline_dir": args.pipeline_dir,
        "num_samples": num_images,
        "num_latents": num_latents,
        "repeats": args.repeats,
        "full": {
            "bits_per_dim": float(full["bits_per_dim"].mean()),
            "standard_error": float(full["bits_per_dim"].std(ddof=1) / math.sqrt(num_images)),
            "nfe_per_image": float(full["num_function_evaluations"]) / num_images,
            "wall_time_seconds": float(full["wall_time_seconds"]),
        },
        "curves": {},
        "live": {},
    }
    generator = torch.Generator().manual_seed(args.seed + 1)
    for estimator in SAMPLED_ESTIMATORS:
        rows = []
        for nfe in args.nfe:
            repeats = [resampled_standard_error(full, estimator, nfe, generator) for _ in range(args.repeats)]
            rows.append({key: float(np.mean([r[key] for r in repeats])) for key in repeats[0]})
        report["curves"][estimator] = rows
    for estimator in SAMPLED_ESTIMATORS:
        started = time.time()
        live = estimate_elbo(
            scheduler,
            denoiser,
            samples,
            estimator,
            args.live_nfe,
            generator=torch.Generator().manual_seed(args.seed + 2),
            batch_size=args.batch_size,
        )
        report["live"][estimator] = {**live.to_dict(), "wall_time_seconds": time.time() - started}
    with open(os.path.join(args.output_dir, "bpd_estimators.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    plot(report, args.plot or os.path.join(args.output_dir, "bpd_estimators.png"))
    print(markdown_table(report))
    print("\nlive runs at", args.live_nfe, "NFE per image:")
    for estimator, live in report["live"].items():
        print(
            f"  {estimator}: {live['bits_per_dim']:.3f} ± {live['standard_error']:.4f} bits/dim, "
            f"{live['num_function_evaluations_per_image']:.1f} NFE/image, {live['wall_time_seconds']:.0f} s"
        )
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
