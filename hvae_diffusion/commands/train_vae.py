"""Train the VAE level of a latent diffusion model: a Diffusers ``AutoencoderKL`` with a discretized-Gaussian decoder.

    python scripts/train_vae.py --output_dir runs/vae --resolution 32 --max_train_steps 400 --report_to none

The loss is −log p(x | z_0) + β KL(q(z_0 | x) ‖ N(0, I)) per pixel dimension (``--kl_weight`` β; see
hvae_diffusion/training/vae.py), trained with the loop of ``hvae-train`` (EMA, atomic checkpoints, exact resume).
The output folder is a standard ``AutoencoderKL`` folder whose config also holds the decoder's per-channel
log-scale (``decoder_log_scale``, refitted by maximum likelihood on the training images at the end) and the ``scaling_factor`` and ``shift_factor`` of the training latents, plus a
README.md model card, reconstruction grids under ``samples/`` and ``training_summary.json``. docs/latent.md has more.
"""

import json
import math
import os

import torch

DEFAULT_BLOCK_OUT_CHANNELS = (16, 32, 32)

CARD_TEMPLATE = """---
{{ card_data }}
---

# AutoencoderKL trained with hvae-diffusion

The VAE level of a latent diffusion HVAE, trained by `hvae-train-vae` on {{ dataset }} for {{ num_train_steps }}
optimizer steps (KL weight {{ kl_weight }}). Its decoder likelihood p(x | z_0) is a Gaussian discretized to 8 bits
with the learned per-channel log-scale `decoder_log_scale` of the config; `scaling_factor` and `shift_factor` map
its latents to unit variance for the diffusion model.

| test split | bits/dim |
|---|---|
| reconstruction −log p(x \\| z_0) | {{ reconstruction }} |
| KL(q(z_0 \\| x) ‖ N(0, I)) | {{ kl }} |

{% if sample_grid %}![reconstructions]({{ sample_grid }})

{% endif %}```python
from diffusers import AutoencoderKL

vae = AutoencoderKL.from_pretrained("{{ repo_id }}")
```
"""


def parse_args(argv=None):
    from ..training.cli import add_data_arguments, add_training_arguments, parse_with_defaults_shown, program_parser

    parser = program_parser("hvae-train-vae", __doc__)
    add_data_arguments(parser)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="fine-tune an AutoencoderKL folder (or a pipeline's vae/)",
    )
    model.add_argument("--vae_config", default=None, help="an AutoencoderKL config.json (overrides the flags below)")
    model.add_argument(
        "--block_out_channels",
        type=int,
        nargs="+",
        default=list(DEFAULT_BLOCK_OUT_CHANNELS),
        help="one width per resolution; the latents are 2^(n-1) times smaller than the images",
    )
    model.add_argument("--latent_channels", type=int, default=4)
    model.add_argument("--layers_per_block", type=int, default=1)
    model.add_argument("--norm_num_groups", type=int, default=8)
    objective = parser.add_argument_group("objective")
    objective.add_argument("--kl_weight", type=float, default=1e-3, help="β, the weight of KL(q(z_0 | x) || N(0, I))")
    objective.add_argument(
        "--initial_log_scale", type=float, default=math.log(0.2), help="the decoder's log σ at the start"
    )
    objective.add_argument("--eval_num_samples", type=int, default=256, help="test images for the summary (0: skip)")
    add_training_arguments(parser, learning_rate=1e-3)
    return parse_with_defaults_shown(parser, argv)


def build_vae(args, resolution, channels):
    """The ``AutoencoderKL`` to train: pretrained, from ``--vae_config``, or from the size flags."""
    from diffusers import AutoencoderKL

    from ..training.latents import load_vae

    if args.pretrained_model_name_or_path is not None:
        vae = load_vae(args.pretrained_model_name_or_path, argument="--pretrained_model_name_or_path")
    elif args.vae_config is not None:
        if not os.path.isfile(args.vae_config):
            raise ValueError(f"--vae_config={args.vae_config!r} is not a file (an AutoencoderKL config.json)")
        with open(args.vae_config) as handle:
            vae = AutoencoderKL.from_config(json.load(handle))
    else:
        widths = args.block_out_channels
        if any(width % args.norm_num_groups for width in widths):
            raise ValueError(
                f"--block_out_channels {widths} must all be multiples of --norm_num_groups={args.norm_num_groups}"
            )
        vae = AutoencoderKL(
            in_channels=channels,
            out_channels=channels,
            down_block_types=["DownEncoderBlock2D"] * len(widths),
            up_block_types=["UpDecoderBlock2D"] * len(widths),
            block_out_channels=widths,
            layers_per_block=args.layers_per_block,
            latent_channels=args.latent_channels,
            norm_num_groups=args.norm_num_groups,
            sample_size=resolution,
        )
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(
            f"--resolution={resolution} must be a multiple of the VAE's downsampling factor {factor} "
            f"({len(vae.config.block_out_channels)} blocks)"
        )
    if vae.config.in_channels != channels:
        raise ValueError(f"the VAE takes {vae.config.in_channels} channels but the images have {channels}")
    return vae


def check_arguments(args):
    """The program's own flags against their ranges, before any work (``training_config_from_args`` checks the
    shared ones)."""
    from ..training.cli import check_number

    if args.eval_num_samples < 0:
        raise ValueError(f"--eval_num_samples must be >= 0, got {args.eval_num_samples}")
    for name in ("latent_channels", "layers_per_block", "norm_num_groups"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(width < 1 for width in args.block_out_channels):
        raise ValueError(f"--block_out_channels must all be >= 1, got {args.block_out_channels}")
    check_number("--kl_weight", args.kl_weight, minimum=0)
    check_number("--initial_log_scale", args.initial_log_scale)


def main(argv=None):
    """Run ``hvae-train-vae``: a ``UsageError`` for a flag or input refused before the first step; a non-finite loss
    raises ``NonFiniteLossError`` (the console script prints it and exits with status 1)."""
    from ..training.cli import (
        apply_num_threads,
        checked_before_work,
        load_training_data,
        push_output_dir,
        require_extras,
        training_config_from_args,
        warn_if_single_threaded,
    )
    from ..training.data import RandomFlip, stack_dataset
    from ..training.evaluation import image_grid
    from ..training.latents import encode_posteriors, latent_scaling
    from ..training.loop import make_accelerator, train
    from ..training.vae import VAELoss, VAEWithLikelihood, fit_decoder_log_scale, vae_report

    args = parse_args(argv)
    with checked_before_work():
        require_extras("hvae-train-vae", "training")
        check_arguments(args)
        loss_fn = RandomFlip(VAELoss(args.kl_weight)) if args.random_flip else VAELoss(args.kl_weight)
        config = training_config_from_args(
            args, tracker_project_name="train_vae", extra_log_config={"kl_weight": args.kl_weight}
        )
        train_dataset, test_dataset, _, resolution, channels = load_training_data(args)
        train_dataset.label_column = None  # the VAE ignores labels
        torch.manual_seed(args.seed)
        model = VAEWithLikelihood.from_vae(build_vae(args, resolution, channels), args.initial_log_scale)
        test_samples, _ = stack_dataset(
            torch.utils.data.Subset(test_dataset, range(min(max(args.eval_num_samples, 10), len(test_dataset))))
        )

        def sample_fn(model, step):
            originals = test_samples[:10]
            reconstructions = model.vae.decode(model.vae.encode(originals).latent_dist.mean).sample
            return image_grid(torch.cat([originals, reconstructions.clamp(-1, 1)]), num_columns=10)

        def save_fn(model, output_dir):
            train_samples, _ = stack_dataset(train_dataset)
            model.log_scale.data = fit_decoder_log_scale(
                model.vae, train_samples, generator=torch.Generator().manual_seed(args.seed)
            ).to(model.log_scale)
            with torch.no_grad():
                scaling_factor, shift_factor = latent_scaling(*encode_posteriors(model.vae, train_samples))
            model.export_vae(scaling_factor=scaling_factor, shift_factor=shift_factor).save_pretrained(output_dir)

        accelerator = make_accelerator(config)
    apply_num_threads(args.num_threads)
    warn_if_single_threaded()
    result = train(
        config, model, loss_fn, train_dataset, sample_fn=sample_fn, save_fn=save_fn, accelerator=accelerator
    )
    if not accelerator.is_main_process:
        return result

    vae = model.vae.eval()
    summary = {
        "global_step": result.global_step,
        "final_loss": result.final_loss,
        "kl_weight": args.kl_weight,
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": vae.config.shift_factor,
        "decoder_log_scale": list(vae.config.decoder_log_scale),
    }
    if args.eval_num_samples:
        report = vae_report(vae, test_samples[: args.eval_num_samples], generator=torch.Generator().manual_seed(0))
        summary.update({f"test_{name}": value for name, value in report.items()})
    with open(os.path.join(args.output_dir, "training_summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    render_card(args, summary)
    print(json.dumps(summary))
    if args.push_to_hub:
        push_output_dir(args)
    return result


def render_card(args, summary):
    """Write the VAE's model card into ``--output_dir/README.md``."""
    from huggingface_hub import ModelCard, ModelCardData

    grids = (
        sorted(os.listdir(os.path.join(args.output_dir, "samples")))
        if os.path.isdir(os.path.join(args.output_dir, "samples"))
        else []
    )
    card = ModelCard.from_template(
        ModelCardData(library_name="diffusers", license="apache-2.0", tags=["diffusers", "hvae-diffusion", "vae"]),
        template_str=CARD_TEMPLATE,
        repo_id=args.hub_model_id or os.path.abspath(args.output_dir),
        dataset=args.dataset_name or args.train_data_dir or "scikit-learn digits (built in)",
        num_train_steps=summary["global_step"],
        kl_weight=args.kl_weight,
        reconstruction=f"{summary['test_reconstruction_bits_per_dim']:.3f}" if "test_bits_per_dim" in summary else "-",
        kl=f"{summary['test_kl_bits_per_dim']:.3f}" if "test_bits_per_dim" in summary else "-",
        sample_grid=f"samples/{grids[-1]}" if grids else None,
    )
    card.save(os.path.join(args.output_dir, "README.md"))


if __name__ == "__main__":
    from . import train_vae_cli

    train_vae_cli()
