"""Evaluate a trained pipeline: test bits/dim with its standard error (three terms, plot over t), the noisy
classifier's accuracy and calibration against t, Fréchet distance and KID (in the features of an evaluation
classifier; with ``--inception_weights``, also the FID and KID of the literature) and guided accuracy.

    python scripts/evaluate.py --pipeline_dir runs/demo/denoiser --classifier_dir runs/demo/classifier_guided \\
        --output_dir runs/eval --bpd_estimator importance --bpd_nfe 51

The bits/dim are those of the unconditional model ε(x_t, ∅) (for a class-conditional pipeline, the null label).
``--bpd_estimator full`` evaluates every latent (N + 1 forwards per image); ``uniform``, ``stratified`` and
``importance`` sample ``--bpd_nfe`` − 1 latents per image, unbiased, with a standard error that covers both the
image-to-image spread and the sampling of t (docs/evaluation.md). For a latent pipeline (one with a ``vae``) the
bits/dim are the bound in pixels through the VAE, with its three parts and the diffusion's bits per latent
dimension (docs/latent.md); ``--compare_pipeline_dir`` puts a second pipeline's bits/dim (and bits per image) on the
same test split beside them. ``--likelihood ode continuous`` adds, for a pixel pipeline, the exact log-likelihood by
the probability-flow ODE (8-bit pixels dequantized uniformly) and the continuous-time ELBO, each with its standard
error and NFE per image (docs/evaluation.md).

Writes to --output_dir: ``evaluation.json`` (after each stage, so what was computed is kept if a later stage fails);
``elbo_denoising_terms.png`` (the denoising-matching KL of each
evaluated latent over t); a grid per sampling setting (``grid_unconditional.png``, ``grid_cfg_<w>.png``,
``grid_classifier_<γ>.png``); with ``--clipping_sweep``, ``guidance_sweep.png`` (guided accuracy against
guidance_scale for both kinds of guidance, clip_sample on and off); and ``feature_classifier.safetensors``, the
separately trained classifier of clean images whose features define the Fréchet distance and KID and whose labels
define guided accuracy (not the guidance classifier; trained once on the train split and cached). Classifier-free
guidance is evaluated for a ``ClassifierFreeGuidancePipeline``, classifier guidance with ``--classifier_dir``; an
unconditional pipeline (what ``hvae-train`` makes by default) gets the unconditional samples only.
"""

import argparse
import json
import math
import os
import time

import torch

from .. import HVAEScheduler
from ..continuous_elbo import TIME_SAMPLINGS, estimate_continuous_elbo
from ..continuous_schedule import continuous_time_model
from ..elbo_estimation import BPD_ESTIMATORS
from ..likelihood_ode import DIVERGENCES, SOLVERS, ode_log_likelihood
from ..pipelines.serialization import denoiser_scheduler
from ..training.cli import (
    add_data_arguments,
    add_guidance_variant_arguments,
    add_num_threads_argument,
    add_overwrite_argument,
    apply_num_threads,
    check_data_arguments,
    check_folder_path,
    check_num_threads,
    check_number,
    check_output_dir,
    check_pipeline_dir,
    checked_before_work,
    guidance_variant_kwargs,
    load_training_data,
    parse_with_defaults_shown,
    program_parser,
    require_extras,
)
from ..training.data import stack_dataset
from ..training.evaluation import (
    InceptionFeatures,
    classifier_accuracy,
    elbo_report,
    feature_frechet_distance,
    image_grid,
    images_label,
    load_or_train_feature_classifier,
    noisy_classifier_calibration,
    plot_denoising_terms,
    sample_quality,
)
from ..training.guidance_sweep import guided_accuracy_sweep, plot_guidance_sweep
from ..training.latents import (
    check_continuous_vae,
    check_latent_setting,
    diffusion_elbo_of,
    latent_elbo_report,
    scaled_latents_of,
    vae_downsampling_factor,
)
from ..training.sampling import load_sampling_pipeline, sample


def parse_args(argv=None):
    parser = program_parser("hvae-evaluate", __doc__)
    add_data_arguments(parser, augmentation=False)
    parser.add_argument("--pipeline_dir", required=True, help="the trained denoiser pipeline")
    parser.add_argument("--classifier_dir", default=None, help="noisy classifier, for the classifier-guidance sweep")
    parser.add_argument(
        "--compare_pipeline_dir",
        default=None,
        help="another pipeline (the pixel model beside a latent one, say) whose bits/dim on the same test split, at "
        "its own resolution, the report puts beside this one's",
    )
    parser.add_argument("--output_dir", required=True)
    add_overwrite_argument(parser)
    parser.add_argument(
        "--guidance_scales",
        type=float,
        nargs="*",
        default=[1.0, 2.0, 4.0],
        help="the sweep of guidance_scale, for classifier-free and classifier guidance alike (empty: no sweep)",
    )
    parser.add_argument("--num_samples_per_class", type=int, default=20)
    parser.add_argument("--num_unconditional_samples", type=int, default=300)
    parser.add_argument("--num_inference_steps", type=int, default=100)
    parser.add_argument(
        "--bpd_estimator",
        default="importance",
        choices=BPD_ESTIMATORS,
        help="how the sum over latents is evaluated: every latent (full) or sampled t (docs/evaluation.md)",
    )
    parser.add_argument(
        "--bpd_nfe",
        type=int,
        default=51,
        help="denoiser forwards per image for the sampled estimators, the decoder's included (not used by full)",
    )
    parser.add_argument("--bpd_num_samples", type=int, default=None, help="test images for the bits/dim (default all)")
    parser.add_argument("--bpd_batch_size", type=int, default=256, help="(image, t) pairs per denoiser forward")
    parser.add_argument(
        "--calibration_bands", type=int, default=5, help="bands of t for the noisy classifier's accuracy and ECE"
    )
    parser.add_argument(
        "--clipping_sweep",
        action="store_true",
        help="also sweep guided accuracy over guidance_scale 0 and --guidance_scales for both kinds of guidance, "
        "with clip_sample on and off (guidance_sweep.png)",
    )
    parser.add_argument(
        "--inception_weights",
        default=None,
        help="a local TorchScript Inception-v3 of FID (inception-2015-12-05.pt, docs/evaluation.md): adds the FID and "
        "KID of the literature to every sample set (nothing is downloaded; TorchScript is code: only a file you trust)",
    )
    add_likelihood_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    add_guidance_variant_arguments(parser, methods=False)
    add_num_threads_argument(parser)
    return parse_with_defaults_shown(parser, argv)


LIKELIHOODS = ("ode", "continuous")


def add_likelihood_arguments(parser):
    """``--likelihood`` and the options of the probability-flow ODE and of the continuous-time ELBO."""
    parser.add_argument(
        "--likelihood",
        nargs="+",
        default=[],
        choices=LIKELIHOODS,
        help="beside the discrete ELBO: the exact log-likelihood by the probability-flow ODE (ode, 8-bit pixels "
        "dequantized uniformly) and the continuous-time ELBO (continuous), of pixel pipelines (docs/evaluation.md)",
    )
    parser.add_argument("--ode_solver", default="adaptive", choices=SOLVERS)
    parser.add_argument("--ode_rtol", type=float, default=1e-5, help="relative tolerance of the adaptive solver")
    parser.add_argument("--ode_atol", type=float, default=1e-5, help="absolute tolerance of the adaptive solver")
    parser.add_argument("--ode_num_steps", type=int, default=100, help="Heun steps of the fixed solver (2 NFE each)")
    parser.add_argument(
        "--ode_divergence",
        default="auto",
        choices=DIVERGENCES,
        help="exact trace or Hutchinson's estimate; auto: exact up to 32 dimensions",
    )
    parser.add_argument("--ode_num_probes", type=int, default=4, help="Rademacher probes of Hutchinson's estimate")
    parser.add_argument("--ode_batch_size", type=int, default=64, help="images per ODE (they share its steps)")
    parser.add_argument(
        "--continuous_nfe", type=int, default=50, help="forwards per image of the continuous-time ELBO"
    )
    parser.add_argument(
        "--continuous_replicates",
        type=int,
        default=5,
        help="independent low-discrepancy sets per image (its standard error needs >= 2); divides --continuous_nfe",
    )
    parser.add_argument(
        "--continuous_time_sampling",
        default="log_snr",
        choices=TIME_SAMPLINGS,
        help="t uniform (VDM), or t at which the log-SNR is uniform (the same bound, less noise on a fixed schedule)",
    )


def check_likelihood_arguments(args):
    """The ODE's and the continuous-time ELBO's flags against their ranges."""
    for name in ("ode_num_steps", "ode_num_probes", "ode_batch_size", "continuous_replicates"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("ode_rtol", "ode_atol"):
        check_number(f"--{name}", getattr(args, name), above=0, below=1)
    if args.continuous_nfe < 2 * args.continuous_replicates or args.continuous_nfe % args.continuous_replicates:
        raise ValueError(
            f"--continuous_nfe must be a multiple of --continuous_replicates={args.continuous_replicates} and at "
            f"least twice it (each set: the decoder and one time or more), got {args.continuous_nfe}"
        )


def check_arguments(args):
    """Every flag against its range and the others, before anything is loaded (``check_pipeline`` checks them
    against the loaded pipeline)."""
    for name in ("num_samples_per_class", "num_unconditional_samples", "num_inference_steps", "bpd_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.bpd_num_samples is not None and args.bpd_num_samples < 1:
        raise ValueError(
            f"--bpd_num_samples must be >= 1 (or omitted for the whole test split), got {args.bpd_num_samples}"
        )
    minimum = 3 if args.bpd_estimator == "stratified" else 2
    if args.bpd_estimator != "full" and args.bpd_nfe < minimum:
        raise ValueError(
            f"--bpd_nfe must be >= {minimum} for --bpd_estimator {args.bpd_estimator} (forwards per image, the "
            f"decoder's included), got {args.bpd_nfe}"
        )
    if args.calibration_bands < 1:
        raise ValueError(f"--calibration_bands must be >= 1, got {args.calibration_bands}")
    check_likelihood_arguments(args)
    for scale in args.guidance_scales:
        check_number("--guidance_scales", scale, minimum=0)
    guidance_variant_kwargs(args, "classifier")
    check_num_threads(args.num_threads)
    check_data_arguments(args)
    check_folder_path("--output_dir", args.output_dir)
    check_output_dir(args.output_dir, args.overwrite_output_dir)
    if args.inception_weights is not None and not os.path.isfile(args.inception_weights):
        raise ValueError(f"--inception_weights={args.inception_weights!r}: no such file")
    for flag in ("--pipeline_dir", "--classifier_dir", "--compare_pipeline_dir"):
        path = getattr(args, flag[2:])
        if path is not None:
            check_pipeline_dir(flag, path)


def check_pipeline(args, scheduler):
    """The flags against the loaded pipeline's noise schedule."""
    try:  # the sampler's own check, as the sampling will run it
        HVAEScheduler.from_config(scheduler.config).set_timesteps(args.num_inference_steps)
    except ValueError as error:
        raise ValueError(
            f"--num_inference_steps={args.num_inference_steps} does not fit the pipeline's noise schedule of "
            f"{scheduler.config.num_train_timesteps} training timesteps: {error}"
        ) from error
    num_latents = len(HVAEScheduler.from_config(scheduler.config).timesteps) - 1
    if args.bpd_estimator != "full" and args.bpd_nfe > num_latents + 1:
        raise ValueError(f"--bpd_nfe must be <= {num_latents + 1} (every latent and the decoder), got {args.bpd_nfe}")
    if args.calibration_bands > scheduler.config.num_train_timesteps:
        raise ValueError(
            f"--calibration_bands must be <= {scheduler.config.num_train_timesteps} (the training timesteps), got "
            f"{args.calibration_bands}"
        )


def load_test_split(args, resolution):
    """``load_training_data`` of the data flags with the images resized to ``resolution``."""
    return load_training_data(argparse.Namespace(**{**vars(args), "resolution": resolution}), need_labels=True)


def pipeline_resolution(pipe):
    """The image size a pipeline samples: its denoiser's ``sample_size``, times the VAE's downsampling."""
    size = pipe.unet.config.sample_size
    return size * vae_downsampling_factor(pipe.vae) if pipe.vae is not None else size


def bits_per_dim_report(pipe, test_samples, args):
    """The test bits/dim of an unconditional pipeline with ``--bpd_estimator``: ``elbo_report`` of a pixel model;
    for a latent model, the bound in pixels through its VAE (``latent_elbo_report``, the estimator giving the
    diffusion part) with its three parts and the diffusion's own bits per latent dimension."""
    scheduler = denoiser_scheduler(pipe)
    num_latents = len(scheduler.timesteps) - 1
    nfe = None if args.bpd_estimator == "full" else args.bpd_nfe
    generator = torch.Generator().manual_seed(args.seed)
    samples = test_samples[: args.bpd_num_samples]

    def denoiser(sample, timesteps):
        return pipe.unet.eval()(sample, timesteps, **pipe.unconditional_kwargs(len(sample)))

    if pipe.vae is None:
        report = elbo_report(
            scheduler, denoiser, samples, args.bpd_estimator, nfe, batch_size=args.bpd_batch_size, generator=generator
        )
        return with_bits_per_image(report, samples)
    diffusion_elbo = diffusion_elbo_of(scheduler, denoiser, args.bpd_estimator, nfe, generator, args.bpd_batch_size)
    report = latent_elbo_report(pipe.vae.eval(), diffusion_elbo, samples, batch_size=len(samples), generator=generator)
    report["estimator"] = args.bpd_estimator
    report["summary"] = (
        f"{report['bits_per_dim']:.3f} ± {report['standard_error']:.3f} bits/dim = reconstruction "
        f"{report['reconstruction']:.3f} + latent prior {report['latent_prior']:.3f} − entropy "
        f"{report['entropy']:.3f} (latent bound; diffusion {report['diffusion_bits_per_latent_dim']:.3f} bits per "
        f"latent dim; {args.bpd_estimator}, {nfe or num_latents + 1} NFE/image, {report['num_samples']} images)"
    )
    return with_bits_per_image(report, samples)


def likelihood_report(pipe, test_samples, name, args):
    """``--likelihood`` ``name`` of a pixel pipeline's unconditional model on the test split: a ``to_dict`` summary
    of ``likelihood_ode.ode_log_likelihood`` (8-bit pixels dequantized uniformly) or of
    ``continuous_elbo.estimate_continuous_elbo``, with ``summary`` and the bits per image."""
    log_snr, denoiser, prediction_type = continuous_time_model(pipe)
    samples = test_samples[: args.bpd_num_samples]
    generator = torch.Generator().manual_seed(args.seed)
    if name == "ode":
        estimate = ode_log_likelihood(
            log_snr,
            denoiser,
            samples,
            prediction_type,
            divergence=args.ode_divergence,
            num_probes=args.ode_num_probes,
            solver=args.ode_solver,
            rtol=args.ode_rtol,
            atol=args.ode_atol,
            num_steps=args.ode_num_steps,
            dequantize=True,
            generator=generator,
            batch_size=args.ode_batch_size,
        )
        method = f"probability-flow ODE, {estimate.divergence} divergence, {estimate.solver} solver, dequantized"
    else:
        estimate = estimate_continuous_elbo(
            log_snr,
            denoiser,
            samples,
            prediction_type,
            args.continuous_nfe,
            args.continuous_replicates,
            generator=generator,
            batch_size=args.bpd_batch_size,
            time_sampling=args.continuous_time_sampling,
        )
        method = f"continuous-time ELBO, {args.continuous_time_sampling} times"
    report = estimate.to_dict()
    error = report["standard_error"]
    report["summary"] = (
        f"{report['bits_per_dim']:.3f}{'' if error is None else f' ± {error:.3f}'} bits/dim ({method}, "
        f"{report['num_function_evaluations_per_image']:.0f} NFE/image, {report['num_samples']} images)"
    )
    return with_bits_per_image(report, samples)


def with_bits_per_image(report, samples):
    """Add ``bits_per_image`` (−ELBO in bits per image) to a bits/dim report: the number that compares models of
    one dataset at two resolutions, where bits/dim divide by different dimension counts."""
    num_dims = math.prod(samples.shape[1:])
    report["bits_per_image"] = report["bits_per_dim"] * num_dims
    standard_error = report["standard_error"]
    report["bits_per_image_standard_error"] = None if standard_error is None else standard_error * num_dims
    return report


def format_scale(scale):
    return f"{scale:g}"


def write_report(report, path):
    """Write the report so far, atomically: what is computed is saved before anything that can still fail."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as handle:
        json.dump(report, handle, indent=2)
    os.replace(temporary, path)


def main(argv=None):
    args = parse_args(argv)
    from diffusers import DiffusionPipeline

    from ..pipelines import ClassifierFreeGuidancePipeline, ClassifierGuidedPipeline

    with checked_before_work():
        require_extras("hvae-evaluate", "training", "plots")
        check_arguments(args)
        unconditional = load_sampling_pipeline(args.pipeline_dir, "none")
        check_pipeline(args, unconditional.scheduler)
        vae = unconditional.vae
        if vae is not None and args.likelihood:
            raise ValueError(f"--likelihood {' '.join(args.likelihood)} is for pixel pipelines; this one has a vae")
        if vae is not None:
            check_continuous_vae(vae, argument="--pipeline_dir")
            check_latent_setting(vae, args.resolution, argument="--resolution")
        # classifier-free guidance needs a ClassifierFreeGuidancePipeline: other pipelines evaluate without it
        cfg_pipe = DiffusionPipeline.from_pretrained(args.pipeline_dir)
        if not isinstance(cfg_pipe, ClassifierFreeGuidancePipeline):
            cfg_pipe = None
        other = None
        if args.compare_pipeline_dir is not None:
            other = load_sampling_pipeline(args.compare_pipeline_dir, "none")
            check_pipeline(args, other.scheduler)
        guided = None
        if args.classifier_dir is not None:
            guided = load_sampling_pipeline(args.pipeline_dir, "classifier", args.classifier_dir)
        inception = InceptionFeatures(args.inception_weights) if args.inception_weights is not None else None
        train_dataset, test_dataset, num_classes, _, _ = load_test_split(
            args, args.resolution or pipeline_resolution(unconditional)
        )
        train_samples, train_labels = stack_dataset(train_dataset)
        test_samples, test_labels = stack_dataset(test_dataset)
    apply_num_threads(args.num_threads)
    started = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    report_path = os.path.join(args.output_dir, "evaluation.json")
    feature_classifier = load_or_train_feature_classifier(
        os.path.join(args.output_dir, "feature_classifier.safetensors"),
        train_samples,
        train_labels,
        num_classes,
        args.seed,
    )
    report = {
        "pipeline_dir": args.pipeline_dir,
        "num_inference_steps": args.num_inference_steps,
        "feature_space": "the feature classifier (feature_classifier.safetensors, trained on the train split): "
        "frechet_distance and kid here are not Inception FID/KID"
        + ("; fid and inception_kid are" if inception is not None else ""),
        "feature_classifier_test_accuracy": classifier_accuracy(feature_classifier, test_samples, test_labels),
    }
    # the distances between real sets of the same size: the floor that sample noise alone gives
    reference = train_samples[
        torch.randperm(len(train_samples), generator=torch.Generator().manual_seed(0))[: len(test_samples)]
    ]
    report["frechet_distance_train_vs_test"] = feature_frechet_distance(feature_classifier, reference, test_samples)
    report["train_vs_test"] = quality_of(feature_classifier, inception, reference, test_samples, args.seed)

    # --- bits/dim of the unconditional model ε(x_t, ∅): in pixels, through the VAE for a latent model
    elbo = bits_per_dim_report(unconditional, test_samples, args)
    elbo["images"] = images_label(elbo["num_samples"], len(test_samples))
    report["elbo"] = elbo
    write_report(report, report_path)
    if vae is None:
        plot_denoising_terms(elbo, os.path.join(args.output_dir, "elbo_denoising_terms.png"))
    print(f"test bits/dim ({elbo['images']}): {elbo['summary']}", flush=True)
    if other is not None:
        resolution = pipeline_resolution(other)
        other_test_samples, _ = stack_dataset(load_test_split(args, resolution)[1])
        other_elbo = bits_per_dim_report(other, other_test_samples, args)
        report["compare"] = {
            "pipeline_dir": args.compare_pipeline_dir,
            "resolution": resolution,
            **{
                key: other_elbo[key]
                for key in ("bits_per_dim", "standard_error", "bits_per_image", "summary", "num_samples")
            },
        }
        write_report(report, report_path)
        print(f"test bits/dim of {args.compare_pipeline_dir}: {other_elbo['summary']}", flush=True)
    for name in args.likelihood:
        key = "ode_likelihood" if name == "ode" else "continuous_elbo"
        report[key] = likelihood_report(unconditional, test_samples, name, args)
        write_report(report, report_path)
        print(f"test bits/dim, {key}: {report[key]['summary']}", flush=True)
    scheduler = denoiser_scheduler(unconditional)

    # --- the noisy classifier of classifier guidance: accuracy and calibration against t
    if guided is not None:
        report["classifier_calibration"] = noisy_classifier_calibration(
            guided.classifier.eval(),
            scheduler,
            test_samples
            if vae is None
            else scaled_latents_of(vae, test_samples, torch.Generator().manual_seed(args.seed)),
            test_labels,
            num_bands=args.calibration_bands,
            generator=torch.Generator().manual_seed(args.seed),
        )
        write_report(report, report_path)

    # --- sample quality
    def evaluate_samples(name, pipe, guidance, scale, labels, count):
        pipe.set_progress_bar_config(desc=f"sampling {name}", leave=False)
        samples, sample_labels = sample(
            pipe,
            guidance,
            scale,
            labels,
            None,
            count,
            args.num_inference_steps,
            args.seed,
            guidance_kwargs=guidance_variant_kwargs(args, guidance) if guidance != "none" else None,
        )
        image_grid(samples[: 10 * min(10, -(-count // 10))], num_columns=10).save(
            os.path.join(args.output_dir, f"grid_{name}.png")
        )
        result = {"num_samples": count, **quality_of(feature_classifier, inception, samples, test_samples, args.seed)}
        if guidance != "none":
            result["guided_accuracy"] = classifier_accuracy(
                feature_classifier, samples, torch.as_tensor(sample_labels)
            )
        return result

    report["unconditional"] = evaluate_samples(
        "unconditional", unconditional, "none", 0.0, None, args.num_unconditional_samples
    )
    write_report(report, report_path)
    labels = list(range(num_classes))
    count = args.num_samples_per_class * num_classes
    if cfg_pipe is not None and args.guidance_scales:
        report["cfg"] = {}
        for w in args.guidance_scales:
            report["cfg"][format_scale(w)] = evaluate_samples(
                f"cfg_{format_scale(w)}", cfg_pipe, "cfg", w, labels, count
            )
            write_report(report, report_path)
    if guided is not None and args.guidance_scales:
        report["classifier"] = {}
        for g in args.guidance_scales:
            report["classifier"][format_scale(g)] = evaluate_samples(
                f"classifier_{format_scale(g)}", guided, "classifier", g, labels, count
            )
            write_report(report, report_path)
    if args.clipping_sweep:
        swept = {"classifier-free": cfg_pipe, "classifier": guided}
        swept = {
            name: pipe
            for name, pipe in swept.items()
            if isinstance(pipe, (ClassifierFreeGuidancePipeline, ClassifierGuidedPipeline))
        }
        if swept:
            report["guidance_sweep"] = guided_accuracy_sweep(
                swept,
                feature_classifier,
                [0.0, *args.guidance_scales],
                labels * args.num_samples_per_class,
                num_inference_steps=args.num_inference_steps,
                seed=args.seed,
            )
            write_report(report, report_path)
            plot_guidance_sweep(
                report["guidance_sweep"], os.path.join(args.output_dir, "guidance_sweep.png"), chance=1 / num_classes
            )
    report["wall_time_seconds"] = time.time() - started
    write_report(report, report_path)
    summary = {key: value for key, value in report.items() if key != "elbo"}
    summary["bits_per_dim"] = elbo["bits_per_dim"]
    summary["bits_per_dim_standard_error"] = elbo["standard_error"]
    summary["bits_per_dim_images"] = elbo["images"]
    summary["bits_per_dim_summary"] = elbo["summary"]
    print(json.dumps(summary, indent=1))
    return report


def quality_of(feature_classifier, inception, samples, reference, seed):
    """Fréchet distance and KID of ``samples`` against ``reference`` in the feature classifier's space, and with an
    Inception file, the FID and KID of the literature (``fid``, ``inception_kid``)."""
    result = sample_quality(feature_classifier, samples, reference, torch.Generator().manual_seed(seed))
    if inception is not None:
        inception_quality = sample_quality(inception, samples, reference, torch.Generator().manual_seed(seed))
        result["fid"] = inception_quality["frechet_distance"]
        result["inception_kid"] = inception_quality["kid"]
        result["inception_kid_standard_error"] = inception_quality["kid_standard_error"]
    return result


if __name__ == "__main__":
    from . import evaluate_cli

    evaluate_cli()
