"""``hvae-toy2d``: the 2-D toy, end to end: train small MLP denoisers on CPU and draw the figures of every stage of
the HVAE.

    hvae-toy2d --output_dir runs/toy2d/figures
    hvae-toy2d --output_dir runs/toy2d/figures --digits_dir runs/demo   # adds the digits figures
    hvae-toy2d --output_dir runs/toy2d/digits --digits_dir runs/demo --skip_toy   # only those
    hvae-toy2d --output_dir docs/figures --overwrite_output_dir   # regenerate the committed figures

Every model is an ``MLPDenoiser`` (or ``MLPNoisyClassifier``) trained by ``hvae_diffusion.training.train`` with
``DiffusionLoss`` (``NoisyClassifierLoss``), the loop and losses of ``hvae-train``, and saved as a pipeline
under --work_dir. Folders that already hold files (the committed docs/figures, an earlier run) are written over
only with --overwrite_output_dir. The figures (PNG, in --output_dir) are drawn by ``hvae_diffusion.plotting``:

1. ``1_forward_process.png``: two moons dissolving into N(0, I); ᾱ_t and SNR(t) of each built-in schedule.
2. ``2_reverse_<data>.png``: sampling paths x_T → x_0 over the data, for the mixture, two moons and the swiss roll.
3. ``3_score_field_<objective>.png``: the learned score beside the exact score of the Gaussian mixture, and the error.
4. ``4_elbo_terms.png``: the ELBO's three terms and bits/dim for the x0, ε and score objectives side by side, and
   for the mixture's exact denoiser (the best this schedule allows).
5. ``5_guidance_toy.png``: one class of the mixture under classifier guidance (γ) and classifier-free guidance (w);
   ``5_guidance_digits.png`` too with --digits_dir.
6. ``6_denoising_digits.png`` (with --digits_dir): x_t and x̂_0 at several steps of one digits sampling run.

--digits_dir is the output folder of ``hvae-demo`` (its ``denoiser/`` and ``classifier_guided/`` pipelines).
"""

import json
import os
import time

import torch

from ..training.cli import (
    add_num_threads_argument,
    add_overwrite_argument,
    apply_num_threads,
    check_num_threads,
    check_output_dir,
    checked_before_work,
    parse_with_defaults_shown,
    program_parser,
    require_extras,
)

OBJECTIVES = {"x0": "sample", "epsilon": "epsilon", "score": "score"}


def parse_args(argv=None):
    parser = program_parser("hvae-toy2d", __doc__)
    parser.add_argument("--output_dir", default="runs/toy2d/figures", help="where the PNGs go")
    add_overwrite_argument(parser)
    parser.add_argument(
        "--work_dir", default="runs/toy2d/work", help="where the trained toy pipelines and toy2d_report.json go"
    )
    parser.add_argument("--max_train_steps", type=int, default=2000, help="optimizer steps per model")
    parser.add_argument("--train_batch_size", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument(
        "--loss_weighting",
        default="simple",
        choices=("simple", "elbo", "min_snr"),
        help="the weighting of every denoiser's loss (simple: DDPM's uniform MSE on ε)",
    )
    parser.add_argument("--num_train_timesteps", type=int, default=1000, help="T, the number of latents")
    parser.add_argument("--num_samples", type=int, default=8192, help="training points per data set")
    parser.add_argument("--num_inference_steps", type=int, default=100, help="sampling steps of the figures")
    parser.add_argument("--elbo_num_samples", type=int, default=1000, help="held-out points for the ELBO figure")
    parser.add_argument("--guidance_class", type=int, default=0, help="the class of the guidance figures")
    parser.add_argument("--digits_dir", default=None, help="output folder of hvae-demo (digits figures)")
    parser.add_argument("--skip_toy", action="store_true", help="only the digits figures (with --digits_dir)")
    add_num_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke test)")
    return parse_with_defaults_shown(parser, argv)


def toy_scheduler(num_train_timesteps=1000, prediction_type="epsilon"):
    """The toy's scheduler: DDPM's linear schedule (β from 1e-4 to 0.02 for 1000 steps, rescaled for other step
    counts so that ᾱ_T stays near 0), no clipping of x̂_0 (the data is not confined to [−1, 1])."""
    from .. import HVAEScheduler

    scale = 1000 / num_train_timesteps
    return HVAEScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4 * scale,
        beta_end=0.02 * scale,
        clip_sample=False,
        prediction_type=prediction_type,
    )


def figure_path(args, name):
    return os.path.join(args.output_dir, name)


def train_toy_model(name, make_model, loss_fn, dataset, pipeline_of, args):
    """Build ``make_model()`` from ``--seed``, train it with the package's training loop, save ``pipeline_of(model)``
    in ``work_dir/name`` and return the trained model (in eval mode) and a summary of the run."""
    from ..training import TrainingConfig, train

    config = TrainingConfig(
        output_dir=os.path.join(args.work_dir, name),
        overwrite_output_dir=args.overwrite_output_dir,  # work_dir was checked as a whole
        train_batch_size=args.train_batch_size,
        max_train_steps=args.max_train_steps,
        learning_rate=args.learning_rate,
        lr_warmup_steps=min(100, args.max_train_steps // 10),
        checkpointing_steps=None,
        report_to=None,
        seed=args.seed,
    )
    torch.manual_seed(args.seed)
    model = make_model()
    started = time.time()
    result = train(
        config,
        model,
        loss_fn,
        dataset,
        save_fn=lambda trained, output_dir: pipeline_of(trained).save_pretrained(output_dir),
    )
    seconds = time.time() - started
    print(f"{name}: {result.global_step} steps in {seconds:.1f} s, final loss {result.final_loss:.4f}", flush=True)
    return model.eval(), {"steps": result.global_step, "seconds": round(seconds, 1), "final_loss": result.final_loss}


def toy_figures(args, report):
    """Train the toy models and draw figures 1 to 5 on 2-D data; numbers go into ``report``."""
    from .. import (
        ClassifierFreeGuidancePipeline,
        ClassifierGuidedPipeline,
        HVAEPipeline,
        MLPDenoiser,
        MLPNoisyClassifier,
        plotting,
    )
    from ..testing import ExactMixtureDenoiser
    from ..toy_data import make_toy_dataset, make_toy_samples, toy_gaussian_mixture
    from ..training import DiffusionLoss, NoisyClassifierLoss

    at_fractions = lambda *fractions: [round(f * (args.num_train_timesteps - 1)) for f in fractions]  # noqa: E731
    mixture = toy_gaussian_mixture()
    mixture_data = make_toy_dataset("gaussian_mixture", args.num_samples, seed=args.seed)

    # 1. the forward process needs no training
    moons, _ = make_toy_samples("moons", 1000, seed=args.seed)
    plotting.plot_forward_process(
        moons,
        figure_path(args, "1_forward_process.png"),
        toy_scheduler(args.num_train_timesteps),
        timesteps=at_fractions(0, 0.05, 0.1, 0.2, 0.4, 1),
        generator=torch.Generator().manual_seed(args.seed),
    )

    # the three objectives on the Gaussian mixture (whose score is exact)
    denoisers = {}
    for objective, prediction_type in OBJECTIVES.items():
        scheduler = toy_scheduler(args.num_train_timesteps, prediction_type)
        model, report["training"][f"mixture_{objective}"] = train_toy_model(
            f"mixture_{objective}",
            lambda: MLPDenoiser(in_channels=2),
            DiffusionLoss(scheduler, args.loss_weighting),
            mixture_data,
            lambda m, s=scheduler: HVAEPipeline(unet=m, scheduler=s),
            args,
        )
        denoisers[objective] = (model, scheduler)
        field = plotting.plot_score_field(
            mixture,
            figure_path(args, f"3_score_field_{objective}.png"),
            scheduler,
            model=model,
            timesteps=at_fractions(0.01, 0.1, 0.3),
        )
        report["figures"][f"3_score_field_{objective}"] = {
            f"t={t}": {
                "mean_error": float(error.mean()),
                "density_weighted_error": float(
                    (error * mixture.log_prob(field["grid"], float(scheduler.alphas_cumprod[t])).exp()).sum()
                    / mixture.log_prob(field["grid"], float(scheduler.alphas_cumprod[t])).exp().sum()
                ),
            }
            for t, error in zip(field["timesteps"], field["error"])
        }

    # 4. the ELBO of each objective on held-out points
    held_out, _ = mixture.sample(args.elbo_num_samples, generator=torch.Generator().manual_seed(args.seed + 1))
    # beside them the exact denoiser of the mixture: the best ELBO this schedule and decoder variance allow
    oracle_scheduler = toy_scheduler(args.num_train_timesteps)
    oracle = ExactMixtureDenoiser(
        mixture.means,
        mixture.stds,
        component_labels=mixture.component_labels.tolist(),
        alphas_cumprod=oracle_scheduler.alphas_cumprod,
    )
    elbo = plotting.plot_elbo_terms(
        {**denoisers, "exact denoiser": (oracle, oracle_scheduler)},
        held_out.float(),
        figure_path(args, "4_elbo_terms.png"),
        seed=args.seed,
    )
    report["figures"]["4_elbo_terms"] = {
        label: {k: v for k, v in values.items() if isinstance(v, float)} for label, values in elbo.items()
    }

    # 2. reverse trajectories: the mixture (ε model), two moons and the swiss roll
    epsilon_model, epsilon_scheduler = denoisers["epsilon"]
    pipelines = {"gaussian_mixture": HVAEPipeline(unet=epsilon_model, scheduler=epsilon_scheduler)}
    for name in ("moons", "swiss_roll"):
        scheduler = toy_scheduler(args.num_train_timesteps)
        model, report["training"][name] = train_toy_model(
            name,
            lambda: MLPDenoiser(in_channels=2),
            DiffusionLoss(scheduler, args.loss_weighting),
            make_toy_dataset(name, args.num_samples, seed=args.seed),
            lambda m, s=scheduler: HVAEPipeline(unet=m, scheduler=s),
            args,
        )
        pipelines[name] = HVAEPipeline(unet=model, scheduler=scheduler)
    for name, pipeline in pipelines.items():
        pipeline.set_progress_bar_config(disable=True)
        reference, _ = make_toy_samples(name, 5000, seed=args.seed + 2)
        plotting.plot_reverse_trajectories(
            pipeline,
            figure_path(args, f"2_reverse_{name}.png"),
            seed=args.seed,
            num_inference_steps=args.num_inference_steps,
            reference_samples=reference,
        )

    # 5. guidance on the mixture: a noisy classifier + the unconditional ε model; a conditional model with dropout
    labelled = make_toy_dataset("gaussian_mixture", args.num_samples, seed=args.seed, with_labels=True)
    classifier, report["training"]["mixture_classifier"] = train_toy_model(
        "mixture_classifier",
        lambda: MLPNoisyClassifier(in_channels=2, num_classes=mixture.num_classes),
        NoisyClassifierLoss(toy_scheduler(args.num_train_timesteps)),
        labelled,
        lambda m: ClassifierGuidedPipeline(unet=epsilon_model, scheduler=epsilon_scheduler, classifier=m),
        args,
    )
    scheduler = toy_scheduler(args.num_train_timesteps)
    conditional, report["training"]["mixture_conditional"] = train_toy_model(
        "mixture_conditional",
        lambda: MLPDenoiser(in_channels=2, num_class_embeds=mixture.num_classes + 1),
        DiffusionLoss(scheduler, args.loss_weighting, cond_drop_prob=0.2, null_label=mixture.num_classes),
        labelled,
        lambda m, s=scheduler: ClassifierFreeGuidancePipeline(unet=m, scheduler=s),
        args,
    )
    guided = ClassifierGuidedPipeline(unet=epsilon_model, scheduler=epsilon_scheduler, classifier=classifier)
    free = ClassifierFreeGuidancePipeline(unet=conditional, scheduler=scheduler)
    for pipeline in (guided, free):
        pipeline.set_progress_bar_config(disable=True)
    reference, _ = mixture.sample(5000, generator=torch.Generator().manual_seed(args.seed + 3))
    guidance = plotting.plot_guidance(
        figure_path(args, "5_guidance_toy.png"),
        args.guidance_class,
        classifier_pipeline=guided,
        cfg_pipeline=free,
        num_inference_steps=args.num_inference_steps,
        seed=args.seed,
        reference_samples=reference.float(),
    )
    # the share of guided samples whose most likely class under the exact mixture is the class asked for
    report["figures"]["5_guidance_toy"] = {
        kind: {
            f"{scale:g}": float(
                (mixture.class_log_posterior(samples.double(), 1.0).argmax(1) == args.guidance_class).double().mean()
            )
            for scale, samples in runs.items()
        }
        for kind, runs in guidance.items()
    }


def digits_figures(args):
    """Figures 5 and 6 from the saved digits pipelines of ``hvae-demo`` (``args.digits_dir``)."""
    from .. import plotting

    cfg_dir = os.path.join(args.digits_dir, "denoiser")
    classifier_dir = os.path.join(args.digits_dir, "classifier_guided")
    plotting.plot_guidance(
        figure_path(args, "5_guidance_digits.png"),
        args.guidance_class,
        classifier_pipeline=classifier_dir if os.path.isdir(classifier_dir) else None,
        classifier_scales=(0.0, 1.0, 2.0, 4.0),
        cfg_pipeline=cfg_dir,
        guidance_scales=(0.0, 1.0, 2.0, 4.0),
        num_samples=36,
        num_inference_steps=args.num_inference_steps,
        seed=args.seed,
    )
    plotting.plot_denoising_grid(
        cfg_dir,
        figure_path(args, "6_denoising_digits.png"),
        num_inference_steps=args.num_inference_steps,
        num_shown=6,
        batch_size=16,
        seed=args.seed,
        class_labels=args.guidance_class,
    )


def check_arguments(args):
    """Every flag against its range and the others, before any work."""
    if args.skip_toy and args.digits_dir is None:
        raise ValueError("--skip_toy leaves nothing to draw without --digits_dir")
    check_num_threads(args.num_threads)
    check_output_dir(args.output_dir, args.overwrite_output_dir)
    if not args.skip_toy:
        check_output_dir(args.work_dir, args.overwrite_output_dir)


def main(argv=None):
    args = parse_args(argv)
    with checked_before_work():
        require_extras("hvae-toy2d", "training", "plots")
        check_arguments(args)
    apply_num_threads(args.num_threads)
    if args.quick:
        args.max_train_steps, args.num_samples, args.num_inference_steps, args.elbo_num_samples = 5, 512, 5, 64
        args.num_train_timesteps = 50
    report = {"training": {}, "figures": {}}
    if not args.skip_toy:
        toy_figures(args, report)
    if args.digits_dir is not None:
        digits_figures(args)
    os.makedirs(args.work_dir, exist_ok=True)
    with open(os.path.join(args.work_dir, "toy2d_report.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=2))
    return report
