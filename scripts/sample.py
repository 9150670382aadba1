#!/usr/bin/env python
"""Sample from a saved pipeline: a PNG grid, and with --output the samples as arrays.

    python scripts/sample.py --pipeline_dir runs/digits --guidance cfg --scale 3 --class_labels 0 1 2 3 4 5 6 7 8 9
    python scripts/sample.py --pipeline_dir runs/digits --guidance classifier --classifier_dir runs/classifier \\
        --scale 2 --num_samples 100 --grid samples.png --output samples.npz

``--guidance none`` samples the unconditional model (ε(x_t, ∅) of a class-conditional one); ``classifier``
guides it with a noisy classifier (a ClassifierGuidedPipeline folder or a NoisyClassifier folder given by
``--classifier_dir``; the pipeline itself when it is a ClassifierGuidedPipeline); ``cfg`` is classifier-free
guidance with weight ``--scale``. ``--scheduler`` swaps in DDIM, DPM-Solver++ or Euler (same config).
The .npz holds ``images`` (uint8, N x H x W x C) and ``labels`` (int, -1 for unconditional samples).
"""

import argparse
import json
import os

import numpy as np
import torch

SCHEDULERS = ("hvae", "ddim", "dpmsolver", "euler")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline_dir", required=True, help="a saved pipeline folder (or Hub id)")
    parser.add_argument("--classifier_dir", default=None, help="noisy classifier for --guidance classifier")
    parser.add_argument("--guidance", default="none", choices=["none", "classifier", "cfg"])
    parser.add_argument("--scale", type=float, default=1.0, help="guidance_scale γ or w")
    parser.add_argument(
        "--class_labels",
        type=int,
        nargs="+",
        default=None,
        help="labels to sample (cycled to --num_samples; default 0..num_classes-1 cycled)",
    )
    parser.add_argument("--prompt", nargs="+", default=None, help="prompts for a text-conditional model")
    parser.add_argument("--num_samples", type=int, default=None, help="default: one per label, else 16")
    parser.add_argument("--num_inference_steps", type=int, default=100)
    parser.add_argument("--scheduler", default="hvae", choices=SCHEDULERS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=256, help="samples per pipeline call")
    parser.add_argument("--grid", default="samples.png", help="PNG grid path")
    parser.add_argument("--num_columns", type=int, default=10)
    parser.add_argument("--output", default=None, help="write the samples to this .npz")
    return parser.parse_args(argv)


def swap_scheduler(pipe, name):
    """Replace the pipeline's scheduler by ``name``'s, built from the same config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from hvae_diffusion import HVAEScheduler

    cls = {
        "hvae": HVAEScheduler,
        "ddim": DDIMScheduler,
        "dpmsolver": DPMSolverMultistepScheduler,
        "euler": EulerDiscreteScheduler,
    }[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe


def load_sampling_pipeline(pipeline_dir, guidance, classifier_dir=None):
    """The pipeline that samples with ``guidance`` ("none", "classifier", "cfg") from saved folders."""
    from diffusers import DiffusionPipeline

    import hvae_diffusion  # noqa: F401  (registers the pipeline classes)
    from hvae_diffusion.models import NoisyClassifier
    from hvae_diffusion.pipelines import ClassifierFreeGuidancePipeline, ClassifierGuidedPipeline, HVAEPipeline
    from hvae_diffusion.training.components import classifier_guided_pipeline

    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    if guidance == "cfg":
        if not isinstance(pipe, ClassifierFreeGuidancePipeline):
            raise ValueError(
                f"--guidance cfg needs a ClassifierFreeGuidancePipeline, {pipeline_dir!r} holds {type(pipe).__name__}"
            )
        return pipe
    if guidance == "classifier":
        if isinstance(pipe, ClassifierGuidedPipeline) and classifier_dir is None:
            return pipe
        if classifier_dir is None:
            raise ValueError("--guidance classifier needs --classifier_dir (a noisy classifier or guided pipeline)")
        subfolder = "classifier" if os.path.isdir(os.path.join(classifier_dir, "classifier")) else None
        classifier = NoisyClassifier.from_pretrained(classifier_dir, subfolder=subfolder)
        return classifier_guided_pipeline(pipe, classifier)
    return HVAEPipeline(unet=pipe.unet, scheduler=pipe.scheduler)


def sample(pipe, guidance, scale, labels, prompts, num_samples, num_inference_steps, seed, batch_size=256):
    """``num_samples`` samples ``[N, C, H, W]`` in [−1, 1] and their labels (−1 when unconditional)."""
    generator = torch.Generator().manual_seed(seed)
    chunks, chunk_labels = [], []
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        kwargs = {"num_inference_steps": num_inference_steps, "generator": generator, "output_type": "pt"}
        batch_labels = [labels[(start + i) % len(labels)] for i in range(count)] if labels else None
        if guidance == "none":
            kwargs["batch_size"] = count
        elif guidance == "classifier":
            kwargs.update(class_labels=batch_labels, guidance_scale=scale)
        elif prompts:
            kwargs.update(prompt=[prompts[(start + i) % len(prompts)] for i in range(count)], guidance_scale=scale)
        else:
            kwargs.update(class_labels=batch_labels, guidance_scale=scale)
        chunks.append(pipe(**kwargs).images.cpu() * 2 - 1)
        chunk_labels += batch_labels if (batch_labels and guidance != "none") else [-1] * count
    return torch.cat(chunks), np.asarray(chunk_labels, dtype=np.int64)


def num_classes_of_pipeline(pipe):
    classifier = getattr(pipe, "classifier", None)
    if classifier is not None:
        return classifier.config.num_classes
    null_label = getattr(pipe.config, "null_class_label", None)
    return null_label


def main(argv=None):
    args = parse_args(argv)
    from hvae_diffusion.training.data import tensor_to_uint8
    from hvae_diffusion.training.evaluation import image_grid

    if args.guidance == "none" and (args.class_labels or args.prompt):
        raise ValueError("--class_labels/--prompt need --guidance classifier or cfg")
    pipe = swap_scheduler(
        load_sampling_pipeline(args.pipeline_dir, args.guidance, args.classifier_dir), args.scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    labels = args.class_labels
    if args.guidance != "none" and not labels and not args.prompt:
        num_classes = num_classes_of_pipeline(pipe)
        if num_classes is None:
            raise ValueError("give --class_labels or --prompt for this pipeline")
        labels = list(range(num_classes))
    num_samples = args.num_samples or (len(labels or args.prompt or []) or 16)
    samples, sample_labels = sample(
        pipe,
        args.guidance,
        args.scale,
        labels,
        args.prompt,
        num_samples,
        args.num_inference_steps,
        args.seed,
        args.batch_size,
    )
    image_grid(samples, args.num_columns).save(args.grid)
    if args.output:
        np.savez(args.output, images=tensor_to_uint8(samples), labels=sample_labels)
    print(json.dumps({"grid": args.grid, "output": args.output, "num_samples": num_samples}))


if __name__ == "__main__":
    main()
