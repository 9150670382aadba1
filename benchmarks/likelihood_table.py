#!/usr/bin/env python
"""Likelihood four ways on one or more trained pipelines and the built-in digits' test split: the discrete ELBO
(full chain and importance-sampled), the continuous-time ELBO L∞ (t uniform, and log-SNR uniform) and the
probability-flow ODE's exact log p.

    python benchmarks/likelihood_table.py --pipeline_dir runs/demo/denoiser --output_dir runs/likelihood_table

Each measure is in bits/dim of the unconditional model (for a class-conditional pipeline, its null label), with its
dataset standard error (std of the per-image values / √n) and the denoiser evaluations per image. The ODE dequantizes
the 8-bit pixels uniformly, so its number bounds −log P of the discrete image like the ELBO's discretized decoder.
Several ``--pipeline_dir`` give several columns of one table (a fixed and a learned schedule, say). Writes
``likelihood_table.json`` and prints the Markdown table of docs/evaluation.md.
"""

import argparse
import json
import os
import sys
import time

import torch

MEASURES = ("full", "importance", "continuous", "continuous_log_snr", "ode")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline_dir", nargs="+", required=True, help="trained denoiser pipelines, one column each")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--measures", nargs="+", default=list(MEASURES), choices=MEASURES)
    parser.add_argument("--num_samples", type=int, default=None, help="test images (default: the whole split)")
    parser.add_argument("--importance_nfe", type=int, default=51)
    parser.add_argument("--continuous_nfe", type=int, default=50)
    parser.add_argument("--continuous_replicates", type=int, default=5)
    parser.add_argument("--ode_rtol", type=float, default=1e-5)
    parser.add_argument("--ode_atol", type=float, default=1e-5)
    parser.add_argument("--ode_num_probes", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=1024, help="(image, t) pairs per forward of the ELBOs")
    parser.add_argument("--ode_batch_size", type=int, default=100, help="images per ODE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=1)
    return parser.parse_args(argv)


def test_split(num_samples):
    from hvae_diffusion.training.cli import add_data_arguments, load_training_data
    from hvae_diffusion.training.data import stack_dataset

    data_parser = argparse.ArgumentParser()
    add_data_arguments(data_parser)
    _, test_dataset, _, _, _ = load_training_data(data_parser.parse_args([]), need_labels=True)
    return stack_dataset(test_dataset)[0][:num_samples]


def measure(pipeline_dir, samples, args):
    """{measure: {bits_per_dim, standard_error, nfe_per_image, seconds, ...}} of one pipeline."""
    from hvae_diffusion.continuous_elbo import estimate_continuous_elbo
    from hvae_diffusion.continuous_schedule import continuous_time_model
    from hvae_diffusion.elbo_estimation import estimate_elbo
    from hvae_diffusion.likelihood_ode import ode_log_likelihood
    from hvae_diffusion.pipelines.serialization import denoiser_scheduler
    from hvae_diffusion.training.sampling import load_sampling_pipeline

    pipe = load_sampling_pipeline(pipeline_dir, "none")
    scheduler = denoiser_scheduler(pipe)
    unet = pipe.unet.eval()

    def denoiser(sample, timesteps):
        return unet(sample, timesteps, **pipe.unconditional_kwargs(len(sample)))

    log_snr, continuous_denoiser, prediction_type = continuous_time_model(pipe)
    results = {}
    for name in args.measures:
        generator = torch.Generator().manual_seed(args.seed)
        started = time.time()
        if name in ("full", "importance"):
            estimate = estimate_elbo(
                scheduler,
                denoiser,
                samples,
                name,
                None if name == "full" else args.importance_nfe,
                generator=generator,
                batch_size=args.batch_size,
            )
        elif name.startswith("continuous"):
            estimate = estimate_continuous_elbo(
                log_snr,
                continuous_denoiser,
                samples,
                prediction_type,
                args.continuous_nfe,
                args.continuous_replicates,
                generator=generator,
                batch_size=args.batch_size,
                time_sampling="log_snr" if name == "continuous_log_snr" else "uniform",
            )
        else:
            estimate = ode_log_likelihood(
                log_snr,
                continuous_denoiser,
                samples,
                prediction_type,
                divergence="hutchinson",
                num_probes=args.ode_num_probes,
                rtol=args.ode_rtol,
                atol=args.ode_atol,
                dequantize=True,
                generator=generator,
                batch_size=args.ode_batch_size,
            )
        with torch.no_grad():
            summary = estimate.to_dict()
        summary["seconds"] = round(time.time() - started, 1)
        summary["mean_per_image_standard_error"] = float(estimate.standard_error.mean())
        results[name] = summary
        print(name, json.dumps(summary), flush=True)
    return results


LABELS = {
    "full": "ELBO, discrete, full chain",
    "importance": "ELBO, discrete, importance-sampled t",
    "continuous": "continuous-time ELBO L∞, t uniform",
    "continuous_log_snr": "continuous-time ELBO L∞, log-SNR uniform",
    "ode": "log-likelihood, probability-flow ODE",
}


def markdown(columns):
    names = list(columns)
    lines = [
        "| measure | " + " | ".join(f"`{name}`: bits/dim ± SE (NFE/image)" for name in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for measure_name in MEASURES:
        cells = []
        for name in names:
            row = columns[name].get(measure_name)
            if row is None:
                cells.append("")
                continue
            cells.append(
                f"{row['bits_per_dim']:.3f} ± {row['standard_error']:.3f} "
                f"({row['num_function_evaluations_per_image']:.0f})"
            )
        if any(cells):
            lines.append(f"| {LABELS[measure_name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    os.makedirs(args.output_dir, exist_ok=True)
    samples = test_split(args.num_samples)
    columns = {path: measure(path, samples, args) for path in args.pipeline_dir}
    report = {"command": " ".join(sys.argv), "num_samples": len(samples), "columns": columns}
    with open(os.path.join(args.output_dir, "likelihood_table.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    print(markdown(columns))
    return report


if __name__ == "__main__":
    main()
