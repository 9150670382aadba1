"""Sampling from saved pipelines: the library side of ``hvae-sample``, the demo and the evaluation.

``load_sampling_pipeline`` turns saved folders into the pipeline for one kind of guidance, and ``sample`` draws
samples from it in batches with their labels.
"""

import os

import numpy as np
import torch

# the programs' default guidance scale: the package's one default (classifier-free and classifier guidance alike)
from ..guidance import DEFAULT_GUIDANCE_SCALE  # noqa: F401

GUIDANCES = ("none", "classifier", "cfg")
SCHEDULERS = ("hvae", "ddim", "dpmsolver", "euler")


def swap_scheduler(pipe, name):
    """Replace the pipeline's scheduler by ``name``'s (one of ``SCHEDULERS``), built from the same config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from ..scheduling_hvae import HVAEScheduler

    classes = {
        "hvae": HVAEScheduler,
        "ddim": DDIMScheduler,
        "dpmsolver": DPMSolverMultistepScheduler,
        "euler": EulerDiscreteScheduler,
    }
    if name not in classes:
        raise ValueError(f"--scheduler must be one of {SCHEDULERS}, got {name!r}")
    pipe.scheduler = classes[name].from_config(pipe.scheduler.config)
    return pipe


def load_sampling_pipeline(pipeline_dir, guidance, classifier_dir=None):
    """The pipeline that samples with ``guidance`` ("none", "classifier", "cfg") from saved folders.

    ``none`` gives an ``HVAEPipeline`` (the unconditional UNet ε(x_t, ∅) of a class-conditional one);
    ``classifier`` the pipeline itself when it is a ``ClassifierGuidedPipeline``, else one made with the noisy
    classifier of ``classifier_dir`` (a ``NoisyClassifier`` folder or a guided pipeline); ``cfg`` needs a
    ``ClassifierFreeGuidancePipeline``.
    """
    from diffusers import DiffusionPipeline

    from ..models import NoisyClassifier
    from ..pipelines import ClassifierFreeGuidancePipeline, ClassifierGuidedPipeline, HVAEPipeline
    from .components import classifier_guided_pipeline

    if guidance not in GUIDANCES:
        raise ValueError(f"--guidance must be one of {GUIDANCES}, got {guidance!r}")
    if (
        guidance == "classifier"
        and classifier_dir is None
        and not os.path.isdir(os.path.join(pipeline_dir, "classifier"))
    ):
        raise ValueError("--guidance classifier needs --classifier_dir (a noisy classifier or guided pipeline)")
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
        subfolder = "classifier" if os.path.isdir(os.path.join(classifier_dir, "classifier")) else None
        classifier = NoisyClassifier.from_pretrained(classifier_dir, subfolder=subfolder)
        return classifier_guided_pipeline(pipe, classifier)
    return HVAEPipeline(
        unet=pipe.unet,
        scheduler=pipe.scheduler,
        prediction_type=pipe.config.get("prediction_type"),
        vae=getattr(pipe, "vae", None),
    )


def num_classes_of_pipeline(pipe):
    """The number of real classes a pipeline samples: its classifier's, or a class-conditional UNet's embeddings
    less the null label; None for unconditional and text-conditional pipelines."""
    classifier = getattr(pipe, "classifier", None)
    if classifier is not None:
        return classifier.config.num_classes
    num_class_embeds = getattr(pipe.unet.config, "num_class_embeds", None)
    return num_class_embeds - 1 if num_class_embeds else None


def sample(
    pipe,
    guidance,
    guidance_scale,
    labels,
    prompts,
    num_samples,
    num_inference_steps,
    seed,
    batch_size=256,
    guidance_kwargs=None,
):
    """``num_samples`` samples ``[N, C, H, W]`` in [−1, 1] and their labels (−1 when unconditional).

    ``labels`` (or ``prompts``) are cycled over the samples; ``guidance_scale`` is the classifier-free weight w or
    the classifier scale γ; ``guidance_kwargs`` go to every guided call (``guidance_interval``, ``guidance_method``).
    """
    generator = torch.Generator().manual_seed(seed)
    chunks, chunk_labels = [], []
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        kwargs = {"num_inference_steps": num_inference_steps, "generator": generator, "output_type": "pt"}
        batch_labels = [labels[(start + i) % len(labels)] for i in range(count)] if labels else None
        if guidance == "none":
            kwargs["batch_size"] = count
        elif guidance == "classifier":
            kwargs.update(class_labels=batch_labels, guidance_scale=guidance_scale)
        elif prompts:
            prompt = [prompts[(start + i) % len(prompts)] for i in range(count)]
            kwargs.update(prompt=prompt, guidance_scale=guidance_scale)
        else:
            kwargs.update(class_labels=batch_labels, guidance_scale=guidance_scale)
        if guidance != "none":
            kwargs.update(guidance_kwargs or {})
        chunks.append(pipe(**kwargs).images.cpu() * 2 - 1)
        chunk_labels += batch_labels if (batch_labels and guidance != "none") else [-1] * count
    return torch.cat(chunks), np.asarray(chunk_labels, dtype=np.int64)
