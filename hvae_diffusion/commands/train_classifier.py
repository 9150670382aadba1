"""``hvae-train-classifier``: train a noisy classifier p_φ(y | x_t, t) for classifier guidance, on x_t ~ q(x_t | x_0) at t ~ U{0..T−1}.

    hvae-train-classifier --output_dir runs/guided --denoiser_dir runs/digits --max_train_steps 800

The forward process is the denoiser's (``--denoiser_dir``: its scheduler), else a new ``HVAEScheduler``. With
``--denoiser_dir`` the output folder is a complete ``ClassifierGuidedPipeline`` (unet, scheduler, classifier;
a class-conditional denoiser is folded to its unconditional UNet ε(x_t, ∅)); without, it is the
``NoisyClassifier`` alone (``NoisyClassifier.from_pretrained(output_dir)``). Accuracy on the test split per band
of timesteps goes to ``classifier_accuracy.json``. With ``--vae_dir`` (or a latent ``--denoiser_dir``) the
classifier is trained on a fresh z_0 ~ q(z_0 | x) per step, scaled as the VAE config says, like the denoiser.
"""

import json
import os

import torch

from .. import HVAEScheduler
from ..models import NoisyClassifier
from ..models.noisy_classifier import POOLINGS
from ..pipelines.serialization import load_denoiser_scheduler
from ..training.cli import (
    add_data_arguments,
    add_training_arguments,
    apply_num_threads,
    checked_before_work,
    load_training_data,
    parse_with_defaults_shown,
    program_parser,
    push_output_dir,
    require_extras,
    training_config_from_args,
    warn_if_single_threaded,
)
from ..training.components import classifier_guided_pipeline, default_classifier_config
from ..training.data import RandomFlip, stack_dataset
from ..training.hub import render_model_card
from ..training.latents import (
    LatentDataset,
    LatentDiffusionLoss,
    check_latent_setting,
    load_vae,
    scaled_latents_of,
    vae_downsampling_factor,
)
from ..training.loop import make_accelerator, train
from ..training.losses import NoisyClassifierLoss


def parse_args(argv=None):
    parser = program_parser("hvae-train-classifier", __doc__)
    add_data_arguments(parser)
    parser.add_argument(
        "--denoiser_dir",
        default=None,
        help="a trained denoiser pipeline: its scheduler defines q(x_t | x_0), and the output becomes "
        "a ClassifierGuidedPipeline with it",
    )
    parser.add_argument(
        "--vae_dir",
        default=None,
        help="train on the latents y = (z_0 - shift)·s of this AutoencoderKL (a VAE folder or a latent pipeline); "
        "default: the vae of --denoiser_dir, if it has one",
    )
    parser.add_argument("--classifier_config", default=None, help="a NoisyClassifier config.json")
    parser.add_argument(
        "--init_from_denoiser",
        action="store_true",
        help="start the classifier from the encoder half of --denoiser_dir's UNet (NoisyClassifier.from_unet): "
        "its features already say what x_t tells of x_0 at every t",
    )
    parser.add_argument(
        "--gradient_matching_weight",
        type=float,
        default=0.0,
        help="λ > 0 adds λ·‖√(1−ᾱ_t) ∇log p(y'|x_t) + ε(x_t,y') − ε(x_t,∅)‖² to the loss: the classifier's gradient "
        "is fitted to the one Bayes' rule gives from --denoiser_dir's class-conditional UNet "
        "(losses.ScoreMatchedClassifierLoss)",
    )
    parser.add_argument(
        "--pooling", choices=POOLINGS, default="mean", help="with --init_from_denoiser: the new head's pooling"
    )
    parser.add_argument("--num_train_timesteps", type=int, default=1000)
    parser.add_argument("--beta_schedule", default="squaredcos_cap_v2")
    parser.add_argument("--num_timestep_bands", type=int, default=5, help="accuracy is reported per band of t")
    add_training_arguments(parser, learning_rate=2e-3)
    return parse_with_defaults_shown(parser, argv)


@torch.no_grad()
def accuracy_by_timestep_band(classifier, scheduler, samples, labels, num_bands, seed=0, batch_size=256):
    """Test accuracy of the noisy classifier on x_t with t drawn uniformly within each of ``num_bands`` equal bands."""
    generator = torch.Generator().manual_seed(seed)
    num_train_timesteps = scheduler.config.num_train_timesteps
    edges = [round(i * num_train_timesteps / num_bands) for i in range(num_bands + 1)]
    bands = []
    for low, high in zip(edges[:-1], edges[1:]):
        correct = 0
        for start in range(0, samples.shape[0], batch_size):
            batch = samples[start : start + batch_size]
            timesteps = torch.randint(low, high, (batch.shape[0],), generator=generator)
            noise = torch.randn(batch.shape, generator=generator)
            logits = classifier(scheduler.add_noise(batch, noise, timesteps), timesteps).logits
            correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
        bands.append({"timesteps": [low, high - 1], "accuracy": correct / samples.shape[0]})
    return bands


def main(argv=None) -> None:
    """Run ``hvae-train-classifier``: a ``UsageError`` for a flag or input refused before the first step; a
    non-finite loss raises ``NonFiniteLossError`` (the console script prints it and exits with status 1).

    Returns nothing, so that the console script exits with status 0; ``run(parse_args(argv))`` returns the
    ``TrainingResult``."""
    run(parse_args(argv))


def classifier_from_denoiser(denoiser_dir, num_classes, pooling="mean"):
    """``NoisyClassifier.from_unet`` on the UNet of a saved denoiser pipeline, with ∅ of a class-conditional one."""
    from diffusers import UNet2DModel

    from ..pipelines import null_class_label

    unet = UNet2DModel.from_pretrained(denoiser_dir, subfolder="unet")
    return NoisyClassifier.from_unet(
        unet, num_classes, pooling=pooling, null_class_label=null_class_label(unet.config)
    )


def score_matched_loss(denoiser_dir, scheduler, num_classes, weight):
    """``losses.ScoreMatchedClassifierLoss`` with the class-conditional UNet of a saved denoiser pipeline."""
    from diffusers import UNet2DModel

    from ..pipelines import null_class_label
    from ..training.losses import ScoreMatchedClassifierLoss

    unet = UNet2DModel.from_pretrained(denoiser_dir, subfolder="unet")
    null_label = null_class_label(unet.config)
    if null_label is None:
        raise ValueError("--gradient_matching_weight needs a class-conditional denoiser (num_class_embeds)")
    return ScoreMatchedClassifierLoss(scheduler, unet, null_label, num_classes, weight)


def check_arguments(args):
    """The program's own flags against their ranges, before any work (``training_config_from_args`` checks the
    shared ones)."""
    if args.num_timestep_bands < 1:
        raise ValueError(f"--num_timestep_bands must be >= 1, got {args.num_timestep_bands}")
    if args.num_train_timesteps < 1:
        raise ValueError(f"--num_train_timesteps must be >= 1, got {args.num_train_timesteps}")
    if args.denoiser_dir is not None and not os.path.isfile(
        os.path.join(args.denoiser_dir, "scheduler", "scheduler_config.json")
    ):
        raise ValueError(f"--denoiser_dir={args.denoiser_dir!r} is not a saved pipeline (no scheduler/ folder)")
    if not args.gradient_matching_weight >= 0 or args.gradient_matching_weight == float("inf"):
        raise ValueError(
            f"--gradient_matching_weight must be a finite number >= 0, got {args.gradient_matching_weight}"
        )
    if args.gradient_matching_weight > 0 and args.denoiser_dir is None:
        raise ValueError("--gradient_matching_weight needs --denoiser_dir (a class-conditional denoiser)")
    if args.init_from_denoiser and args.denoiser_dir is None:
        raise ValueError("--init_from_denoiser needs --denoiser_dir (the UNet whose encoder it copies)")
    if args.init_from_denoiser and args.classifier_config is not None:
        raise ValueError("--init_from_denoiser and --classifier_config both choose the architecture: give one")
    if args.init_from_denoiser and not os.path.isdir(os.path.join(args.denoiser_dir, "unet")):
        raise ValueError(f"--init_from_denoiser needs a UNet2DModel in {args.denoiser_dir}/unet")


def run(args):
    with checked_before_work():
        require_extras("hvae-train-classifier", "training")
        check_arguments(args)
        config = training_config_from_args(args)
        if args.denoiser_dir is not None:
            scheduler = load_denoiser_scheduler(args.denoiser_dir)
        else:
            scheduler = HVAEScheduler(num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule)
        if args.num_timestep_bands > scheduler.config.num_train_timesteps:
            raise ValueError(
                f"--num_timestep_bands={args.num_timestep_bands} exceeds the {scheduler.config.num_train_timesteps} "
                "training timesteps (each band needs at least one)"
            )
        vae_dir = args.vae_dir
        if vae_dir is None and args.denoiser_dir is not None and os.path.isdir(os.path.join(args.denoiser_dir, "vae")):
            vae_dir = args.denoiser_dir  # the denoiser's latents are the ones guidance will classify
        vae = load_vae(vae_dir).eval().requires_grad_(False) if vae_dir is not None else None
        if vae is not None:
            check_latent_setting(vae, args.resolution)
        train_dataset, test_dataset, num_classes, resolution, channels = load_training_data(args, need_labels=True)
        loss_fn = NoisyClassifierLoss(scheduler)
        if args.gradient_matching_weight > 0:
            loss_fn = score_matched_loss(args.denoiser_dir, scheduler, num_classes, args.gradient_matching_weight)
        if args.random_flip:
            if vae is not None:
                raise ValueError(
                    "--random_flip flips images, and a latent classifier trains on latents encoded once: drop it"
                )
            loss_fn = RandomFlip(loss_fn)
        test_samples, test_labels = stack_dataset(test_dataset)
        if vae is not None:
            check_latent_setting(vae, resolution, channels=channels)
            resolution, channels = resolution // vae_downsampling_factor(vae), vae.config.latent_channels
            scaling = (vae.config.scaling_factor, getattr(vae.config, "shift_factor", None))
            train_dataset = LatentDataset.encode(vae, train_dataset)
            loss_fn = LatentDiffusionLoss(loss_fn, *scaling)
            test_samples = scaled_latents_of(vae, test_samples, torch.Generator().manual_seed(args.seed))
        torch.manual_seed(args.seed)
        if args.init_from_denoiser:
            classifier = classifier_from_denoiser(args.denoiser_dir, num_classes, args.pooling)
        elif args.classifier_config is not None:
            with open(args.classifier_config) as handle:
                classifier = NoisyClassifier.from_config(json.load(handle))
        else:
            classifier = NoisyClassifier.from_config(default_classifier_config(resolution, channels, num_classes))
        if classifier.config.num_classes != num_classes:
            raise ValueError(
                f"the classifier has {classifier.config.num_classes} classes but the data has {num_classes}"
            )

        def save_fn(model, output_dir):
            if args.denoiser_dir is None:
                model.save_pretrained(output_dir)
            else:
                classifier_guided_pipeline(args.denoiser_dir, model).save_pretrained(output_dir)

        accelerator = make_accelerator(config)
    apply_num_threads(args.num_threads)
    warn_if_single_threaded()
    result = train(config, classifier, loss_fn, train_dataset, save_fn=save_fn, accelerator=accelerator)
    if not accelerator.is_main_process:
        return result
    classifier.eval()
    bands = accuracy_by_timestep_band(
        classifier, scheduler, test_samples, test_labels, args.num_timestep_bands, seed=args.seed
    )
    report = {"global_step": result.global_step, "final_loss": result.final_loss, "accuracy_by_timestep": bands}
    with open(os.path.join(args.output_dir, "classifier_accuracy.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps(report))
    if args.denoiser_dir is not None:
        render_model_card(
            args.output_dir,
            repo_id=args.hub_model_id,
            pipeline_class="ClassifierGuidedPipeline",
            dataset=args.dataset_name or args.train_data_dir or "scikit-learn digits (built in)",
            prediction_type=scheduler.config.prediction_type,
            loss_weighting="(denoiser: see its card)",
            variance_type=scheduler.config.variance_type,
            conditioning="classifier guidance",
            num_train_steps=result.global_step,
            final_loss=f"{result.final_loss:.4f} (classifier cross-entropy)",
            bits_per_dim=None,
            sample_grid=None,
            frechet_distance=None,
            guided_accuracy=None,
            extra="Noisy-classifier test accuracy by timestep band: "
            + ", ".join(f"t in {b['timesteps']}: {b['accuracy']:.3f}" for b in bands),
        )
    if args.push_to_hub:
        push_output_dir(args)
    return result
