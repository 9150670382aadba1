"""``hvae-train``: train a diffusion HVAE denoiser (a Diffusers UNet) and save it as a pipeline.

    hvae-train --output_dir runs/digits --max_train_steps 2000 --conditioning class --cond_drop_prob 0.1
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/train.py --output_dir runs/digits ...

With no data argument it trains on scikit-learn's bundled digits (8x8, 10 classes). With ``--vae_dir`` it trains a
latent diffusion: the dataset is encoded once, each step draws a fresh z_0 ~ q(z_0 | x) (docs/latent.md), and the
pipeline is saved with the VAE. The output folder holds an
``HVAEPipeline`` (``--conditioning none``) or a ``ClassifierFreeGuidancePipeline`` (class/text) in the standard
layout, a README.md model card, sample grids under ``samples/`` and checkpoints ``checkpoint-<step>`` (the newest
``--checkpoints_total_limit``). Every flag is checked before the first step, and the pipeline is saved before the
final sample grid and the bits/dim evaluation.
"""

import json
import os

import torch

from .. import PREDICTION_TYPES, HVAEScheduler
from ..elbo import LOSS_WEIGHTINGS
from ..models import LearnedNoiseSchedule
from ..pipelines.serialization import load_denoiser_scheduler
from ..scheduling_hvae import VARIANCE_TYPES
from ..training.cli import (
    add_data_arguments,
    add_training_arguments,
    apply_num_threads,
    check_number,
    checked_before_work,
    load_training_data,
    parse_with_defaults_shown,
    program_parser,
    push_output_dir,
    require_extras,
    training_config_from_args,
    warn_if_single_threaded,
)
from ..training.components import CONDITIONINGS, build_unet, denoiser_pipeline, pretrained_unet_config
from ..training.data import RandomFlip, stack_dataset
from ..training.evaluation import elbo_report, image_grid, images_label
from ..training.hub import render_model_card
from ..training.latents import (
    LatentDataset,
    LatentDiffusionLoss,
    check_latent_setting,
    diffusion_elbo_of,
    latent_elbo_report,
    latent_scaling,
    load_vae,
    vae_downsampling_factor,
)
from ..training.loop import make_accelerator, train
from ..training.losses import DiffusionLoss, LearnedScheduleLoss
from ..training.sampling import DEFAULT_GUIDANCE_SCALE
from ..training.timestep_samplers import TIMESTEP_SAMPLERS, make_timestep_sampler

NOISE_SCHEDULES = ("fixed", "linear", "learned")


def parse_args(argv=None):
    parser = program_parser("hvae-train", __doc__)
    add_data_arguments(parser)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="fine-tune a Diffusers UNet or the unet (and scheduler) of a pipeline folder",
    )
    model.add_argument("--unet_config", default=None, help="a UNet2DModel/UNet2DConditionModel config.json")
    model.add_argument(
        "--vae_dir",
        default=None,
        help="train on the latents of this AutoencoderKL (a folder from hvae-train-vae, or a pipeline with a vae/); "
        "the saved pipeline carries it, with the scaling_factor and shift_factor of the training latents",
    )
    model.add_argument(
        "--text_encoder_name_or_path",
        default=None,
        help="text conditioning: a folder with text_encoder/ and tokenizer/ (default: the pretrained pipeline's)",
    )
    objective = parser.add_argument_group("objective")
    objective.add_argument(
        "--prediction_type",
        default=None,
        choices=PREDICTION_TYPES,
        help="what the model predicts (default: the pretrained scheduler's, else epsilon)",
    )
    objective.add_argument("--loss_weighting", default="simple", choices=LOSS_WEIGHTINGS)
    objective.add_argument("--snr_gamma", type=float, default=5.0)
    objective.add_argument(
        "--variance_type",
        default=None,
        choices=VARIANCE_TYPES,
        help="learned_range trains the variance with improved DDPM's hybrid loss",
    )
    objective.add_argument(
        "--noise_schedule",
        default="fixed",
        choices=NOISE_SCHEDULES,
        help="learned: train a monotone log-SNR schedule with the model on the ELBO, as VDM does (needs "
        "--loss_weighting elbo); it starts linear in log-SNR between the ends of --beta_schedule and is saved as the "
        "pipeline's noise_schedule, the scheduler's trained_betas built from it. linear: that starting schedule kept "
        "fixed, trained on the same bound (VDM's fixed baseline)",
    )
    objective.add_argument(
        "--timestep_sampler",
        default="uniform",
        choices=TIMESTEP_SAMPLERS,
        help="importance: draw t by the root second moment of its recent losses (improved DDPM), each loss weighted "
        "by 1/(T p(t)) so the objective is unchanged",
    )
    objective.add_argument("--num_train_timesteps", type=int, default=1000)
    objective.add_argument("--beta_schedule", default="squaredcos_cap_v2")
    objective.add_argument("--conditioning", default="none", choices=CONDITIONINGS)
    objective.add_argument(
        "--cond_drop_prob",
        type=float,
        default=0.0,
        help="probability of replacing the condition by the null label / empty prompt (CFG)",
    )
    evaluation = parser.add_argument_group("samples and evaluation")
    evaluation.add_argument("--num_inference_steps", type=int, default=100, help="for the sample grids")
    evaluation.add_argument(
        "--guidance_scale",
        type=float,
        default=DEFAULT_GUIDANCE_SCALE,
        help="classifier-free guidance weight w of the class/text sample grids",
    )
    evaluation.add_argument(
        "--elbo_timesteps",
        type=int,
        default=50,
        help="test bits/dim for the model card from this many random latents (at least 1; see --skip_elbo)",
    )
    evaluation.add_argument("--skip_elbo", action="store_true", help="no test bits/dim at the end")
    evaluation.add_argument("--elbo_num_samples", type=int, default=256)
    add_training_arguments(parser, learning_rate=1e-3)
    return parse_with_defaults_shown(parser, argv)


def make_scheduler(args):
    """The noise scheduler: the pretrained pipeline's (checked against the flags) or a new ``HVAEScheduler``."""
    path = args.pretrained_model_name_or_path
    scheduler = None
    if path is not None:
        try:
            scheduler = load_denoiser_scheduler(path)
        except (OSError, ValueError):  # a bare UNet: the flags define a new scheduler
            scheduler = None
    if scheduler is not None:
        for name in ("prediction_type", "variance_type"):
            requested, loaded = getattr(args, name), scheduler.config[name]
            if requested is not None and requested != loaded:
                raise ValueError(
                    f"--{name}={requested!r} contradicts the pretrained scheduler config in {path!r} "
                    f"({name}={loaded!r}); drop the flag to keep {loaded!r}, or start from a UNet without its "
                    "scheduler to change it"
                )
        return scheduler
    return HVAEScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        prediction_type=args.prediction_type or "epsilon",
        variance_type=args.variance_type or "fixed_small",
    )


def load_text_components(args):
    from transformers import AutoTokenizer, CLIPTextModel

    folder = args.text_encoder_name_or_path or args.pretrained_model_name_or_path
    if folder is None:
        raise ValueError(
            "--conditioning text needs --text_encoder_name_or_path or a pretrained pipeline with a "
            "text_encoder and tokenizer"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").requires_grad_(False)
    return text_encoder, tokenizer


def check_arguments(args, scheduler):
    """Every flag against every other, before any data is loaded or any step is taken."""
    check_number("--cond_drop_prob", args.cond_drop_prob, minimum=0, below=1)
    if args.random_flip and args.vae_dir is not None:
        raise ValueError("--random_flip flips images, and --vae_dir trains on latents encoded once: drop one of them")
    if args.cond_drop_prob > 0 and args.conditioning == "none":
        raise ValueError("--cond_drop_prob needs --conditioning class or text")
    check_number("--snr_gamma", args.snr_gamma, above=0)
    if args.noise_schedule != "fixed":
        flag = f"--noise_schedule {args.noise_schedule}"
        if args.loss_weighting != "elbo":
            raise ValueError(
                f"{flag} trains on the ELBO (VDM): pass --loss_weighting elbo, got {args.loss_weighting!r}"
            )
        if args.vae_dir is not None:
            raise ValueError(f"{flag} bounds 8-bit images (a discretized decoder): not with --vae_dir")
        if scheduler.config.variance_type not in ("fixed_small", "fixed_small_log"):
            raise ValueError(
                f"{flag} needs --variance_type fixed_small (the bound's Σ = σ_q²), got {scheduler.config.variance_type!r}"
            )
        if scheduler.config.num_train_timesteps < 2:
            raise ValueError(f"{flag} needs --num_train_timesteps >= 2")
    check_number("--guidance_scale", args.guidance_scale, minimum=0)
    if args.num_train_timesteps < 1:
        raise ValueError(f"--num_train_timesteps must be >= 1, got {args.num_train_timesteps}")
    if args.num_inference_steps < 1:
        raise ValueError(f"--num_inference_steps must be >= 1, got {args.num_inference_steps}")
    if not args.skip_elbo:
        if args.elbo_timesteps < 1 or args.elbo_num_samples < 1:
            raise ValueError(
                f"--elbo_timesteps and --elbo_num_samples must be >= 1, got {args.elbo_timesteps} and "
                f"{args.elbo_num_samples} (pass --skip_elbo to skip the bits/dim)"
            )
        if scheduler.config.num_train_timesteps < 2:
            raise ValueError(
                f"--num_train_timesteps={scheduler.config.num_train_timesteps} leaves the bits/dim no latent to "
                "sample (the bound needs T >= 2); pass --skip_elbo, or train with more timesteps"
            )
    try:  # the sampler's own check, as the final sample grid will run it
        HVAEScheduler.from_config(scheduler.config).set_timesteps(args.num_inference_steps)
    except ValueError as error:
        raise ValueError(
            f"--num_inference_steps={args.num_inference_steps} does not fit the noise schedule of "
            f"{scheduler.config.num_train_timesteps} training timesteps (--num_train_timesteps): {error}"
        ) from error


def main(argv=None) -> None:
    """Run ``hvae-train``: a ``UsageError`` for a flag or input refused before the first step; a non-finite loss
    raises ``NonFiniteLossError`` (the console script prints it and exits with status 1).

    Returns nothing, so that the console script exits with status 0; ``run(parse_args(argv))`` returns the
    ``TrainingResult``."""
    run(parse_args(argv))


def run(args):
    with checked_before_work():
        require_extras("hvae-train", "training", *(["text"] if args.conditioning == "text" else []))
        scheduler = make_scheduler(args)
        check_arguments(args, scheduler)
        config = training_config_from_args(
            args,
            extra_log_config={
                "prediction_type": scheduler.config.prediction_type,
                "variance_type": scheduler.config.variance_type,
                "loss_weighting": args.loss_weighting,
                "noise_schedule": args.noise_schedule,
                "timestep_sampler": args.timestep_sampler,
            },
        )
        vae = None
        if args.vae_dir is not None:
            vae = load_vae(args.vae_dir).eval().requires_grad_(False)
            check_latent_setting(vae, args.resolution, unet_config_of(args))
        train_dataset, test_dataset, num_classes, resolution, channels = load_training_data(
            args, need_labels=args.conditioning == "class", need_captions=args.conditioning == "text"
        )
        if args.conditioning != "class":
            train_dataset.label_column = None  # unconditional and text models ignore the labels
        learned_variance = scheduler.config.variance_type == "learned_range"
        num_class_embeds = num_classes + 1 if args.conditioning == "class" else None
        model_resolution, model_channels = resolution, channels
        if vae is not None:
            check_latent_setting(vae, resolution, unet_config_of(args), channels)
            model_resolution, model_channels = resolution // vae_downsampling_factor(vae), vae.config.latent_channels
        torch.manual_seed(args.seed)
        unet = build_unet(
            args.unet_config,
            args.pretrained_model_name_or_path,
            resolution=model_resolution,
            channels=model_channels,
            num_class_embeds=num_class_embeds,
            learned_variance=learned_variance,
        )
        check_unet_input_size(unet, model_resolution, resolution, vae is not None)
        if args.conditioning == "class" and getattr(unet.config, "num_class_embeds", None) != num_class_embeds:
            raise ValueError(
                f"--conditioning class needs a UNet with num_class_embeds = num_classes + 1 = {num_class_embeds} (the "
                f"last is the null label), got {getattr(unet.config, 'num_class_embeds', None)}"
            )
        text_encoder = tokenizer = None
        if args.conditioning == "text":
            text_encoder, tokenizer = load_text_components(args)

        noise_schedule = make_noise_schedule(args, scheduler)

        def current_scheduler():
            """The run's scheduler: the fixed one, or the one the learned schedule defines now."""
            if noise_schedule is None:
                return HVAEScheduler.from_config(scheduler.config)
            return noise_schedule.scheduler(scheduler)

        def pipeline_of(model):
            return denoiser_pipeline(
                model,
                current_scheduler(),
                args.conditioning,
                text_encoder,
                tokenizer,
                vae=vae,
                noise_schedule=noise_schedule,
            )

        # the pipeline's prompt encoder is the one training conditions on
        encode_prompt = text_encoder_of(pipeline_of(unet)) if args.conditioning == "text" else None
        null_label = num_classes if args.conditioning == "class" else None
        if noise_schedule is None:
            loss_fn = DiffusionLoss(
                scheduler,
                args.loss_weighting,
                args.snr_gamma,
                args.cond_drop_prob,
                null_label=null_label,
                timestep_sampler=make_timestep_sampler(args.timestep_sampler, scheduler.config.num_train_timesteps),
            )
        else:
            loss_fn = LearnedScheduleLoss(
                scheduler,
                noise_schedule,
                make_timestep_sampler(args.timestep_sampler, scheduler.config.num_train_timesteps - 1),
                args.cond_drop_prob,
                null_label=null_label,
            )
        if args.random_flip:
            loss_fn = RandomFlip(loss_fn)
        if vae is not None:
            train_dataset = LatentDataset.encode(vae, train_dataset)
            scaling_factor, shift_factor = latent_scaling(train_dataset.means, train_dataset.stds)
            # the saved pipeline's vae/config.json carries the scaling the denoiser was trained with
            vae.register_to_config(scaling_factor=scaling_factor, shift_factor=shift_factor)
            loss_fn = LatentDiffusionLoss(loss_fn, scaling_factor, shift_factor)

        def sample_fn(model, step):
            pipe = pipeline_of(model)
            pipe.set_progress_bar_config(disable=True)
            generator = torch.Generator().manual_seed(args.seed)
            kwargs = {"batch_size": 20}
            if args.conditioning == "class":
                labels = [i % num_classes for i in range(2 * num_classes)]
                kwargs = {"class_labels": labels, "guidance_scale": args.guidance_scale}
            elif args.conditioning == "text":
                prompts = [test_dataset[i]["prompt"] for i in range(min(8, len(test_dataset)))]
                kwargs = {"prompt": prompts, "guidance_scale": args.guidance_scale}
            images = pipe(
                num_inference_steps=args.num_inference_steps, generator=generator, output_type="pt", **kwargs
            ).images
            return image_grid(images * 2 - 1, num_columns=num_classes or 10)

        def save_fn(model, output_dir):
            pipeline_of(model).save_pretrained(output_dir)

        def evaluate_fn(model):
            test_samples, _ = stack_dataset(
                torch.utils.data.Subset(test_dataset, range(min(args.elbo_num_samples, len(test_dataset))))
            )
            denoiser = null_conditioned(model, num_classes if args.conditioning == "class" else None, encode_prompt)
            nfe = min(args.elbo_timesteps, scheduler.config.num_train_timesteps - 1) + 1
            generator = torch.Generator().manual_seed(0)
            if vae is not None:
                report = latent_elbo_report(
                    vae,
                    diffusion_elbo_of(current_scheduler(), denoiser, "importance", nfe, generator),
                    test_samples,
                    batch_size=len(test_samples),
                    generator=generator,
                )
            else:
                report = elbo_report(
                    current_scheduler(),
                    denoiser,
                    test_samples,
                    "importance",
                    nfe,
                    generator=generator,
                )
            return {
                "test_bits_per_dim": report["bits_per_dim"],
                "test_bits_per_dim_standard_error": report["standard_error"],
            }

        accelerator = make_accelerator(config)
    apply_num_threads(args.num_threads)
    warn_if_single_threaded()
    result = train(
        config,
        unet,
        loss_fn,
        train_dataset,
        sample_fn=sample_fn,
        save_fn=save_fn,
        evaluate_fn=None if args.skip_elbo else evaluate_fn,
        encode_prompt=encode_prompt,
        accelerator=accelerator,
    )
    if not accelerator.is_main_process:
        return result

    summary = {
        "global_step": result.global_step,
        "final_loss": result.final_loss,
        "prediction_type": scheduler.config.prediction_type,
        "loss_weighting": args.loss_weighting,
        "variance_type": scheduler.config.variance_type,
        "conditioning": args.conditioning,
        "noise_schedule": args.noise_schedule,
        "timestep_sampler": args.timestep_sampler,
        **result.metrics,
    }
    if "test_bits_per_dim" in summary:  # which images: evaluate's bits/dim may be of others
        summary["test_bits_per_dim_images"] = images_label(
            min(args.elbo_num_samples, len(test_dataset)), len(test_dataset)
        )
    with open(os.path.join(args.output_dir, "training_summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    grids = sorted(os.listdir(os.path.join(args.output_dir, "samples")))
    render_model_card(
        args.output_dir,
        repo_id=args.hub_model_id,
        pipeline_class=pipeline_of(unet).__class__.__name__,
        dataset=args.dataset_name or args.train_data_dir or "scikit-learn digits (built in)",
        prediction_type=scheduler.config.prediction_type,
        loss_weighting=args.loss_weighting,
        variance_type=scheduler.config.variance_type,
        conditioning=args.conditioning,
        num_train_steps=result.global_step,
        final_loss=f"{result.final_loss:.4f}",
        bits_per_dim=(
            f"{summary['test_bits_per_dim']:.3f} ± {summary['test_bits_per_dim_standard_error']:.3f} (on "
            f"{summary['test_bits_per_dim_images']})"
            if "test_bits_per_dim" in summary
            else None
        ),
        sample_grid=f"samples/{grids[-1]}" if grids else None,
        frechet_distance=None,
        guided_accuracy=None,
        extra=None,
    )
    print(json.dumps(summary))
    if args.push_to_hub:
        push_output_dir(args)
    return result


def check_unet_input_size(unet, size, resolution, latent=False):
    """Refuse an input ``size`` the UNet's downsampling cannot take (its skip connections would not match at step
    1): each down block but the last halves the size, so it must be a multiple of 2^(blocks − 1)."""
    factor = 2 ** (len(unet.config.down_block_types) - 1)
    if size % factor:
        latents = f" (latents of {size}x{size})" if latent else ""
        raise ValueError(
            f"--resolution={resolution}{latents}: the UNet's {len(unet.config.down_block_types)} down blocks "
            f"downsample by {factor}, so its input size must be a multiple of {factor}; pass a --resolution that "
            "gives one"
        )


def make_noise_schedule(args, scheduler):
    """``--noise_schedule learned``/``linear``: the pretrained pipeline's ``noise_schedule`` if it has one, else a
    ``LearnedNoiseSchedule`` linear in log-SNR between the ends of the fixed table, frozen for ``linear``; None for
    ``fixed``."""
    if args.noise_schedule == "fixed":
        return None
    schedule = None
    if args.pretrained_model_name_or_path is not None:
        try:
            schedule = LearnedNoiseSchedule.from_pretrained(
                args.pretrained_model_name_or_path, subfolder="noise_schedule"
            )
        except (OSError, ValueError):  # no learned schedule there: start one from the scheduler's table
            schedule = None
    if schedule is None:
        schedule = LearnedNoiseSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    return schedule.requires_grad_(args.noise_schedule == "learned")


def unet_config_of(args):
    """The denoiser config the flags give (``--unet_config`` or the pretrained UNet's), or None for the default."""
    if args.unet_config is not None:
        with open(args.unet_config) as handle:
            return json.load(handle)
    if args.pretrained_model_name_or_path is not None:
        return pretrained_unet_config(args.pretrained_model_name_or_path)[1]
    return None


def text_encoder_of(pipeline):
    """``encode(prompts) -> [B, L, dim]`` embeddings by the pipeline's own ``encode_prompt`` (Stable Diffusion's
    signature), so that training conditions on exactly what the saved pipeline will feed its UNet."""

    def encode(prompts):
        return pipeline.encode_prompt(prompts, pipeline.text_encoder.device, 1, False)[0]

    return encode


def null_conditioned(unet, null_label=None, encode_prompt=None):
    """``denoiser(x_t, t)`` for the ELBO of the unconditional model: the UNet given the null label (class
    conditioning) or the empty prompt (text conditioning)."""
    if null_label is not None:
        return lambda sample, timesteps: unet(sample, timesteps, class_labels=torch.full_like(timesteps, null_label))
    if encode_prompt is not None:
        empty = encode_prompt([""])
        return lambda sample, timesteps: unet(
            sample, timesteps, encoder_hidden_states=empty.expand(sample.shape[0], -1, -1)
        )
    return unet
