"""``hvae-demo``: the one-command demo on the built-in digits (``make demo``): train, sample with three kinds of
guidance, evaluate.

    hvae-demo --output_dir runs/demo
    hvae-demo --quick --output_dir runs/demo-quick   # a smoke test: a few steps of everything
    hvae-demo --latent                                # the latent variant, in runs/demo-latent


1. ``hvae-train``: a class-conditional UNet (ε-prediction, 10 classes + the null label) with condition dropout, so
   one model gives unconditional, conditional and classifier-free guided samples.
2. ``hvae-train-classifier``: a noisy classifier on the same forward process; saved with the denoiser as a
   ``ClassifierGuidedPipeline``.
3. ``hvae-sample``: grids of unconditional, classifier-guided and classifier-free guided samples.
4. ``hvae-evaluate``: test bits/dim, Fréchet distance and guided accuracy over a sweep of guidance scales.

``--latent`` makes it a latent diffusion on the digits upsampled to 32×32: first ``hvae-train-vae`` trains an
``AutoencoderKL`` with 8×8×4 latents, then the denoiser and the noisy classifier are trained on its latents
(``--vae_dir``), and the evaluation reports the bound in pixels through the VAE (docs/latent.md), beside the bits/dim
of ``--compare_pipeline_dir`` (a pixel model, e.g. runs/demo/denoiser) when given.

Everything lands in --output_dir (``demo_report.json`` sums it up, with the wall time of each stage): by default
``runs/demo``, or ``runs/demo-quick`` with --quick, so a smoke test never replaces a full demo. A folder that
already holds files is written over only with --overwrite_output_dir.
"""

import json
import os
import shutil
import time

from ..training.cli import (
    add_num_threads_argument,
    add_overwrite_argument,
    apply_num_threads,
    check_num_threads,
    check_number,
    check_output_dir,
    checked_before_work,
    parse_with_defaults_shown,
    program_parser,
    require_extras,
)
from ..training.sampling import DEFAULT_GUIDANCE_SCALE
from . import evaluate, sample, train, train_classifier, train_vae


def parse_args(argv=None):
    parser = program_parser("hvae-demo", __doc__)
    parser.add_argument(
        "--output_dir",
        default=None,
        help="default: runs/demo, runs/demo-latent with --latent, and -quick after either with --quick",
    )
    add_overwrite_argument(parser)
    parser.add_argument("--denoiser_steps", type=int, default=1500)
    parser.add_argument("--classifier_steps", type=int, default=2000)
    add_num_threads_argument(parser)
    parser.add_argument("--num_inference_steps", type=int, default=100)
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=DEFAULT_GUIDANCE_SCALE,
        help="the classifier-free weight w and the classifier scale γ of the sample grids and the report",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke test, not a demo)")
    parser.add_argument(
        "--latent", action="store_true", help="the latent variant: a VAE, then diffusion on its latents"
    )
    parser.add_argument("--vae_steps", type=int, default=400, help="with --latent: the VAE's optimizer steps")
    parser.add_argument(
        "--latent_resolution",
        type=int,
        default=32,
        help="with --latent: the digits are upsampled to this size (the VAE downsamples by 4)",
    )
    parser.add_argument(
        "--compare_pipeline_dir",
        default=None,
        help="with --latent: a pixel pipeline whose test bits/dim the report puts beside the latent model's",
    )
    return parse_with_defaults_shown(parser, argv)


def output_dir_of(args):
    return args.output_dir or ("runs/demo" + ("-latent" if args.latent else "") + ("-quick" if args.quick else ""))


def check_arguments(args):
    """Every flag against its range and the others, before the first stage (each stage checks its own again)."""
    if args.compare_pipeline_dir is not None and not args.latent:
        raise ValueError("--compare_pipeline_dir needs --latent (it compares the latent model with a pixel one)")
    if args.compare_pipeline_dir is not None and not os.path.isdir(args.compare_pipeline_dir):
        raise ValueError(f"--compare_pipeline_dir={args.compare_pipeline_dir!r}: no such folder")
    for name in ("denoiser_steps", "classifier_steps", "vae_steps", "latent_resolution"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    # the stages train with the default 1000 timesteps
    if not 1 <= args.num_inference_steps <= 1000:
        raise ValueError(
            f"--num_inference_steps must lie in [1, 1000] (the 1000 training timesteps), got {args.num_inference_steps}"
        )
    check_number("--guidance_scale", args.guidance_scale, minimum=0)
    check_num_threads(args.num_threads)
    check_output_dir(output_dir_of(args), args.overwrite_output_dir)


def main(argv=None):
    args = parse_args(argv)
    with checked_before_work():
        require_extras("hvae-demo", "training", "plots")
        check_arguments(args)
    out = output_dir_of(args)
    apply_num_threads(args.num_threads)
    if args.quick:
        args.denoiser_steps, args.classifier_steps, args.num_inference_steps, args.vae_steps = 4, 4, 5, 4
    denoiser_dir, guided_dir = os.path.join(out, "denoiser"), os.path.join(out, "classifier_guided")
    vae_dir = os.path.join(out, "vae")
    evaluation_dir = os.path.join(out, "evaluation")
    # the folder was checked (or its overwrite allowed) as a whole above
    overwrite = ["--overwrite_output_dir"] if args.overwrite_output_dir else []
    seed = ["--seed", str(args.seed)]
    # hvae-evaluate runs in this process with the threads set above
    threads = ["--num_threads", str(args.num_threads)]
    scale = f"{args.guidance_scale:g}"
    timings, cpu_timings, started, cpu_started = {}, {}, time.time(), time.process_time()

    def stage(name, function, argv):
        print(f"\n=== {name}: {' '.join(argv)}", flush=True)
        begin, cpu_begin = time.time(), time.process_time()
        result = function(argv)
        timings[name] = round(time.time() - begin, 1)
        cpu_timings[name] = round(time.process_time() - cpu_begin, 1)
        return result

    # the data flags of every stage of the latent demo: the VAE's resolution
    latent = ["--resolution", str(args.latent_resolution)] if args.latent else []
    if args.latent:
        stage(
            "train VAE",
            train_vae.main,
            [
                *["--output_dir", vae_dir, "--max_train_steps", str(args.vae_steps), "--checkpointing_steps", "1000"],
                *["--checkpoints_total_limit", "1", "--eval_num_samples", "64" if args.quick else "256"],
                *latent,
                *overwrite,
                *threads,
                *seed,
            ],
        )
    stage(
        "train denoiser",
        train.main,
        [
            "--output_dir",
            denoiser_dir,
            "--conditioning",
            "class",
            "--cond_drop_prob",
            "0.15",
            "--max_train_steps",
            str(args.denoiser_steps),
            "--train_batch_size",
            "64",
            "--learning_rate",
            "2e-3",
            "--lr_warmup_steps",
            str(min(100, args.denoiser_steps // 10)),
            "--use_ema",
            "--ema_max_decay",
            "0.999",
            "--checkpointing_steps",
            "1000",
            "--checkpoints_total_limit",
            "1",
            "--skip_elbo",
            *(["--vae_dir", vae_dir] if args.latent else []),
            *latent,
            "--guidance_scale",
            scale,
            "--num_inference_steps",
            str(args.num_inference_steps),
            *overwrite,
            *threads,
            *seed,
        ],
    )
    stage(
        "train noisy classifier",
        train_classifier.main,
        [
            "--output_dir",
            guided_dir,
            "--denoiser_dir",
            denoiser_dir,
            "--max_train_steps",
            str(args.classifier_steps),
            "--train_batch_size",
            "64",
            "--learning_rate",
            "2e-3",
            "--checkpointing_steps",
            "0",
            *latent,
            *overwrite,
            *threads,
            *seed,
        ],
    )
    common = [
        *["--num_inference_steps", str(args.num_inference_steps), "--num_samples", "100"],
        *overwrite,
        *threads,
        *seed,
    ]
    stage(
        "sample",
        lambda _: [
            sample.main(
                [
                    "--pipeline_dir",
                    denoiser_dir,
                    "--guidance",
                    "none",
                    "--grid",
                    os.path.join(out, "samples_unconditional.png"),
                    *common,
                ]
            ),
            sample.main(
                [
                    "--pipeline_dir",
                    guided_dir,
                    "--guidance",
                    "classifier",
                    "--guidance_scale",
                    scale,
                    "--grid",
                    os.path.join(out, "samples_classifier_guided.png"),
                    *common,
                ]
            ),
            sample.main(
                [
                    "--pipeline_dir",
                    denoiser_dir,
                    "--guidance",
                    "cfg",
                    "--guidance_scale",
                    scale,
                    "--grid",
                    os.path.join(out, "samples_cfg.png"),
                    *common,
                ]
            ),
        ],
        [],
    )
    quick = (
        [
            "--num_samples_per_class",
            "2",
            "--num_unconditional_samples",
            "20",
            "--bpd_nfe",
            "6",
            "--bpd_num_samples",
            "66",
        ]
        if args.quick
        else []
    )
    scales = [] if args.quick else ["--num_samples_per_class", "10", "--num_unconditional_samples", "200"]
    report = stage(
        "evaluate",
        evaluate.main,
        [
            "--pipeline_dir",
            denoiser_dir,
            "--classifier_dir",
            guided_dir,
            "--output_dir",
            evaluation_dir,
            "--num_inference_steps",
            str(args.num_inference_steps),
            "--guidance_scales",
            *sorted({"0", "1", scale, "4"}, key=float),
            *seed,
            *(quick or scales),
            *latent,
            *(["--compare_pipeline_dir", args.compare_pipeline_dir] if args.compare_pipeline_dir else []),
            *overwrite,
        ],
    )
    timings["total"] = round(time.time() - started, 1)
    cpu_timings["total"] = round(time.process_time() - cpu_started, 1)

    cfg_result = report.get("cfg", {}).get(scale, {})
    classifier_result = report.get("classifier", {}).get(scale, {})
    summary = {
        "bits_per_dim": report["elbo"]["bits_per_dim"],
        "bits_per_dim_standard_error": report["elbo"]["standard_error"],
        "frechet_distance_unconditional": report["unconditional"]["frechet_distance"],
        "frechet_distance_train_vs_test": report["frechet_distance_train_vs_test"],
        f"cfg_w{scale}": cfg_result,
        f"classifier_gamma{scale}": classifier_result,
        **latent_summary(report, vae_dir if args.latent else None),
        "wall_time_seconds": timings,
        # CPU time of this process: with one thread, the wall time on an otherwise idle machine
        "cpu_time_seconds": cpu_timings,
    }
    with open(os.path.join(out, "demo_report.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    shutil.copy(os.path.join(out, "samples_cfg.png"), os.path.join(denoiser_dir, "samples", "cfg_grid.png"))
    _update_model_card(denoiser_dir, summary, cfg_result, args.guidance_scale)
    print("\n=== demo report\n" + json.dumps(summary, indent=2))
    return summary


def latent_summary(report, vae_dir):
    """The latent demo's extra numbers: the bound's parts, the diffusion's bits per latent dim, the VAE's own
    bound with its N(0, I) prior, and the compared pipeline's bits/dim; nothing for the pixel demo."""
    if vae_dir is None:
        return {}
    with open(os.path.join(vae_dir, "training_summary.json")) as handle:
        vae_summary = json.load(handle)
    elbo = report["elbo"]
    summary = {
        "bits_per_dim_parts": {name: elbo[name] for name in ("reconstruction", "latent_prior", "entropy")},
        "bits_per_image": elbo["bits_per_image"],
        "diffusion_bits_per_latent_dim": elbo["diffusion_bits_per_latent_dim"],
        "vae_bits_per_dim_with_standard_normal_prior": vae_summary.get("test_bits_per_dim"),
    }
    if "compare" in report:
        summary["compare"] = report["compare"]
    return summary


def _update_model_card(denoiser_dir, summary, cfg_result, guidance_scale):
    """Re-render the denoiser's card with the evaluation's numbers."""
    from ..training.hub import render_model_card

    with open(os.path.join(denoiser_dir, "training_summary.json")) as handle:
        trained = json.load(handle)
    render_model_card(
        denoiser_dir,
        pipeline_class="ClassifierFreeGuidancePipeline",
        dataset="scikit-learn digits (built in)",
        prediction_type=trained["prediction_type"],
        loss_weighting=trained["loss_weighting"],
        variance_type=trained["variance_type"],
        conditioning=trained["conditioning"],
        num_train_steps=trained["global_step"],
        final_loss=f"{trained['final_loss']:.4f}",
        bits_per_dim=f"{summary['bits_per_dim']:.3f} ± {summary['bits_per_dim_standard_error'] or 0:.3f}",
        frechet_distance=f"{summary['frechet_distance_unconditional']:.2f} (unconditional; real train vs test: "
        f"{summary['frechet_distance_train_vs_test']:.2f})",
        guided_accuracy=f"{cfg_result.get('guided_accuracy', float('nan')):.3f} (classifier-free guidance, w={guidance_scale:g})",
        sample_grid="samples/cfg_grid.png",
        extra=None,
    )
