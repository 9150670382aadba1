#!/usr/bin/env python
"""The one-command demo on the built-in digits (``make demo``): train, sample with three kinds of guidance, evaluate.

    python scripts/demo.py --output_dir demo_output

1. ``train.py``: a class-conditional UNet (ε-prediction, 10 classes + the null label) with condition dropout, so
   one model gives unconditional, conditional and classifier-free guided samples.
2. ``train_classifier.py``: a noisy classifier on the same forward process; saved with the denoiser as a
   ``ClassifierGuidedPipeline``.
3. ``sample.py``: grids of unconditional, classifier-guided and classifier-free guided samples.
4. ``evaluate.py``: test bits/dim, Fréchet distance and guided accuracy over a sweep of scales.

Everything lands in --output_dir (``demo_report.json`` sums it up, with the wall time of each stage).
"""

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import evaluate  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
import train_classifier  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--denoiser_steps", type=int, default=1500)
    parser.add_argument("--classifier_steps", type=int, default=400)
    parser.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help="torch CPU threads: 1 is fastest on a shared 2-core machine (2 threads oversubscribe)",
    )
    parser.add_argument("--num_inference_steps", type=int, default=100)
    parser.add_argument("--cfg_scale", type=float, default=2.0)
    parser.add_argument("--classifier_scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke test, not a demo)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.num_threads)
    if args.quick:
        args.denoiser_steps, args.classifier_steps, args.num_inference_steps = 4, 4, 5
    out = args.output_dir
    denoiser_dir, guided_dir = os.path.join(out, "denoiser"), os.path.join(out, "classifier_guided")
    evaluation_dir = os.path.join(out, "evaluation")
    seed = ["--seed", str(args.seed)]
    timings, cpu_timings, started, cpu_started = {}, {}, time.time(), time.process_time()

    def stage(name, function, argv):
        print(f"\n=== {name}: {' '.join(argv)}", flush=True)
        begin, cpu_begin = time.time(), time.process_time()
        result = function(argv)
        timings[name] = round(time.time() - begin, 1)
        cpu_timings[name] = round(time.process_time() - cpu_begin, 1)
        return result

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
            "--elbo_timesteps",
            "0",
            "--num_inference_steps",
            str(args.num_inference_steps),
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
            *seed,
        ],
    )
    common = ["--num_inference_steps", str(args.num_inference_steps), "--num_samples", "100", *seed]
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
                    "--scale",
                    str(args.classifier_scale),
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
                    "--scale",
                    str(args.cfg_scale),
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
            "--elbo_timesteps",
            "5",
            "--elbo_num_samples",
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
            "--cfg_scales",
            *sorted({"0", "1", f"{args.cfg_scale:g}", "4"}, key=float),
            "--classifier_scales",
            *sorted({"1", f"{args.classifier_scale:g}", "4"}, key=float),
            *seed,
            *(quick or scales),
        ],
    )
    timings["total"] = round(time.time() - started, 1)
    cpu_timings["total"] = round(time.process_time() - cpu_started, 1)

    cfg_result = report.get("cfg", {}).get(f"{args.cfg_scale:g}", {})
    classifier_result = report.get("classifier", {}).get(f"{args.classifier_scale:g}", {})
    summary = {
        "bits_per_dim": report["elbo"]["bits_per_dim"],
        "bits_per_dim_standard_error": report["elbo"]["standard_error"],
        "frechet_distance_unconditional": report["unconditional"]["frechet_distance"],
        "frechet_distance_train_vs_test": report["frechet_distance_train_vs_test"],
        f"cfg_w{args.cfg_scale:g}": cfg_result,
        f"classifier_gamma{args.classifier_scale:g}": classifier_result,
        "wall_time_seconds": timings,
        # CPU time of this process: with one thread, the wall time on an otherwise idle machine
        "cpu_time_seconds": cpu_timings,
    }
    with open(os.path.join(out, "demo_report.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    shutil.copy(os.path.join(out, "samples_cfg.png"), os.path.join(denoiser_dir, "samples", "cfg_grid.png"))
    _update_model_card(denoiser_dir, summary, cfg_result, args.cfg_scale)
    print("\n=== demo report\n" + json.dumps(summary, indent=2))
    return summary


def _update_model_card(denoiser_dir, summary, cfg_result, cfg_scale):
    """Re-render the denoiser's card with the evaluation's numbers."""
    from hvae_diffusion.training.hub import render_model_card

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
        fid=f"{summary['frechet_distance_unconditional']:.2f} (unconditional; real train vs test: "
        f"{summary['frechet_distance_train_vs_test']:.2f})",
        guided_accuracy=f"{cfg_result.get('guided_accuracy', float('nan')):.3f} (classifier-free guidance, w={cfg_scale:g})",
        sample_grid="samples/cfg_grid.png",
        extra=None,
    )


if __name__ == "__main__":
    main()
