#!/usr/bin/env python
"""Latent sampling against Diffusers' own latent pipelines on the same tiny components (target ≤ 1.02×).

``ClassifierFreeGuidancePipeline`` built from the components of a ``DiTPipeline`` (class labels, a learned-sigma
transformer, DDIM) and of a ``StableDiffusionPipeline`` (prompts, a UNet2DConditionModel, a CLIP text encoder, DDIM): the same
components, seed and guidance scale, timed side by side. Also counts the VAE decoder's forwards in one call: it
must run once per call (one batch of samples), never once per step. And a training step on latents drawn from the
cached posterior (``hvae-train --vae_dir``) against the same step on pre-encoded latents (target ≤ 1.05×).

    python benchmarks/bench_latent.py [--quick] [--device cuda]
"""

import inspect
import json
import tempfile

import torch
from benchmarking_utils import main_for, quiet, time_interleaved


def tiny_vae(settings):
    """An AutoencoderKL from 16x16 RGB images to 8x8x4 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()
    return settings.prepare(vae)


def dit_pipeline(settings):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=8,  # learned sigma
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        patch_size=2,
        norm_num_groups=4,
        num_embeds_ada_norm=1000,  # DiTPipeline's null label is 1000
    ).eval()
    return quiet(DiTPipeline(settings.prepare(transformer), tiny_vae(settings), DDIMScheduler(clip_sample=False)))


def stable_diffusion_pipeline(settings, directory):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in "abcdefghijklmnopqrstuvwxyz":
        vocab[character] = len(vocab)
        vocab[character + "</w>"] = len(vocab)
    with open(f"{directory}/vocab.json", "w") as handle:
        json.dump(vocab, handle)
    with open(f"{directory}/merges.txt", "w") as handle:
        handle.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(f"{directory}/vocab.json", f"{directory}/merges.txt", model_max_length=8)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()
    return quiet(
        StableDiffusionPipeline(
            vae=tiny_vae(settings),
            text_encoder=settings.prepare(text_encoder),
            tokenizer=tokenizer,
            unet=settings.prepare(unet),
            scheduler=DDIMScheduler(clip_sample=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    )


def run(settings, report):
    from hvae_diffusion import ClassifierFreeGuidancePipeline

    # the reference's components that the pipeline also takes (not Stable Diffusion's safety checker, for one)
    parameters = inspect.signature(ClassifierFreeGuidancePipeline.__init__).parameters
    batch, steps = (2, 3) if settings.quick else (8, 50)
    with tempfile.TemporaryDirectory() as directory:
        references = {
            "DiTPipeline": (dit_pipeline(settings), {"class_labels": list(range(batch))}),
            "StableDiffusionPipeline": (stable_diffusion_pipeline(settings, directory), {"prompt": ["a cat"] * batch}),
        }
        for name, (reference, inputs) in references.items():
            shared = {name: component for name, component in reference.components.items() if name in parameters}
            ours = quiet(ClassifierFreeGuidancePipeline(**{"unet": None, **shared}))
            calls = {
                pipeline: lambda pipeline=pipeline: pipeline(
                    **inputs,
                    guidance_scale=4.0,
                    num_inference_steps=steps,
                    generator=settings.generator(),
                    output_type="np",
                )
                for pipeline in (ours, reference)
            }
            seconds = time_interleaved(calls, settings)
            decoder_calls = []
            handle = reference.vae.decoder.register_forward_pre_hook(lambda *_: decoder_calls.append(1))
            try:
                calls[ours]()
            finally:
                handle.remove()
            report.compare(
                "latent",
                f"batch={batch} steps={steps} w=4",
                "ClassifierFreeGuidancePipeline",
                seconds[ours],
                name,
                seconds[reference],
                target=1.02,
                unit="s per call",
                vae_decoder_calls=len(decoder_calls),
            )
    training_step_row(settings, report)


def training_step_row(settings, report):
    """One training step on latents drawn from the cached posterior (``LatentDiffusionLoss``, as ``hvae-train
    --vae_dir`` trains) against the same step on a fixed tensor of pre-encoded latents (the posterior means, scaled):
    the same UNet, AdamW, batches and seed; the difference is drawing z_0 = μ + σ ε each step (target ≤ 1.05×)."""
    import copy

    from diffusers import UNet2DModel

    from hvae_diffusion import HVAEScheduler
    from hvae_diffusion.latent_elbo import scale_latents
    from hvae_diffusion.training.latents import LatentDataset, LatentDiffusionLoss, encode_posteriors, latent_scaling
    from hvae_diffusion.training.losses import DiffusionLoss

    num_images, batch, steps = (8, 4, 2) if settings.quick else (256, 32, 10)
    images = settings.randn(num_images, 3, 16, 16, seed=1).clamp(-1, 1)
    means, stds = encode_posteriors(tiny_vae(settings), images)
    dataset = LatentDataset(means, stds)
    scaling_factor, shift_factor = latent_scaling(means, stds)
    pre_encoded = scale_latents(means, scaling_factor, shift_factor)
    torch.manual_seed(0)
    initial_unet = UNet2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16) if settings.quick else (16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(0))
    batches = [order[(i * batch) % num_images :][:batch] for i in range(steps)]

    def training_steps(loss_fn, samples):
        model = settings.prepare(copy.deepcopy(initial_unet).train(), cast=False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(0)

        def call():
            for indices in batches:
                loss, _ = loss_fn(model, {"sample": samples[indices]}, generator)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return call

    latent = training_steps(
        LatentDiffusionLoss(DiffusionLoss(HVAEScheduler()), scaling_factor, shift_factor), dataset.posterior_parameters
    )
    plain = training_steps(DiffusionLoss(HVAEScheduler()), pre_encoded)
    seconds = time_interleaved({"latent": latent, "plain": plain}, settings, repeats=settings.repeats * 3)
    report.compare(
        "latent",
        f"training step batch={batch} 8x8x4",
        "LatentDiffusionLoss (q(z_0|x))",
        seconds["latent"] / steps,
        "DiffusionLoss pre-encoded",
        seconds["plain"] / steps,
        target=1.05,
        unit="s per step",
    )


if __name__ == "__main__":
    main_for(run, __doc__)
