"""The models the scripts train by default, and turning trained models into saved pipelines.

The default denoiser is a small ``UNet2DModel`` sized for a CPU and 8x8 digits; the default noisy classifier is
``NoisyClassifier`` with the same block widths. A class-conditional UNet trained with condition dropout serves as
the unconditional ε(x_t, ∅) as it is: the pipelines call it with its null label (``pipelines.null_class_label``).
"""

import json
import os

CONDITIONINGS = ("none", "class", "text")


def default_unet_config(resolution, channels, num_class_embeds=None, learned_variance=False):
    """A small ``UNet2DModel`` config: two resolutions (32, 64 channels), one ResNet per block, no attention.

    At 8x8 this is ~0.5M parameters and one optimizer step on a batch of 64 takes ~0.1 s on one CPU core; larger
    images get a third, attention block.
    """
    down_blocks = ["DownBlock2D", "DownBlock2D"]
    widths = [32, 64]
    if resolution > 16:
        down_blocks.append("AttnDownBlock2D")
        widths.append(128)
    return {
        "sample_size": resolution,
        "in_channels": channels,
        "out_channels": 2 * channels if learned_variance else channels,
        "block_out_channels": widths,
        "down_block_types": down_blocks,
        "up_block_types": [name.replace("Down", "Up") for name in reversed(down_blocks)],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "num_class_embeds": num_class_embeds,
    }


def pretrained_unet_config(pretrained_model_name_or_path):
    """``(subfolder, config)`` of the UNet in a pipeline (``unet/``) or UNet folder or Hub repo."""
    from diffusers import UNet2DModel

    for subfolder in ("unet", None):
        try:
            return subfolder, UNet2DModel.load_config(pretrained_model_name_or_path, subfolder=subfolder)
        except (OSError, ValueError):
            continue
    raise ValueError(
        f"--pretrained_model_name_or_path={pretrained_model_name_or_path!r}: no UNet config.json in it or in its "
        "unet/ subfolder"
    )


def build_unet(config_file=None, pretrained_model_name_or_path=None, **default_kwargs):
    """A ``UNet2DModel`` (or ``UNet2DConditionModel``) from a pretrained model/pipeline, a config file or the default.

    ``pretrained_model_name_or_path`` may be a UNet or a pipeline (with a ``unet`` subfolder), local or on the Hub.
    """
    from diffusers import UNet2DConditionModel, UNet2DModel

    if pretrained_model_name_or_path is not None:
        subfolder, config = pretrained_unet_config(pretrained_model_name_or_path)
        cls = UNet2DConditionModel if config.get("_class_name") == "UNet2DConditionModel" else UNet2DModel
        return cls.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder)
    if config_file is not None:
        with open(config_file) as handle:
            config = json.load(handle)
        cls = UNet2DConditionModel if config.get("_class_name") == "UNet2DConditionModel" else UNet2DModel
        return cls.from_config(config)
    return UNet2DModel.from_config(default_unet_config(**default_kwargs))


def default_classifier_config(resolution, channels, num_classes):
    """A small ``NoisyClassifier`` config matching ``default_unet_config``'s widths."""
    return {
        "sample_size": resolution,
        "in_channels": channels,
        "num_classes": num_classes,
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "norm_num_groups": 8,
    }


def denoiser_pipeline(
    unet, scheduler, conditioning="none", text_encoder=None, tokenizer=None, vae=None, noise_schedule=None
):
    """The pipeline a trained denoiser is saved as: ``HVAEPipeline`` (none) or ``ClassifierFreeGuidancePipeline``,
    with the ``vae`` of a latent model and the learned ``noise_schedule`` the scheduler was built from."""
    from ..pipelines import ClassifierFreeGuidancePipeline, HVAEPipeline

    if conditioning == "none":
        return HVAEPipeline(unet=unet, scheduler=scheduler, vae=vae, noise_schedule=noise_schedule)
    return ClassifierFreeGuidancePipeline(
        unet=unet,
        scheduler=scheduler,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=vae,
        noise_schedule=noise_schedule,
    )


def classifier_guided_pipeline(denoiser_pipeline_or_dir, classifier):
    """A ``ClassifierGuidedPipeline`` from a saved (or loaded) denoiser pipeline and a noisy classifier.

    A class-conditional denoiser is called with its null label by the pipeline.
    """
    from diffusers import DiffusionPipeline

    from ..pipelines import ClassifierGuidedPipeline

    pipe = denoiser_pipeline_or_dir
    if isinstance(pipe, (str, os.PathLike)):
        pipe = DiffusionPipeline.from_pretrained(pipe)
    return ClassifierGuidedPipeline(
        unet=pipe.unet,
        scheduler=pipe.scheduler,
        classifier=classifier,
        prediction_type=pipe.config.get("prediction_type"),
        vae=getattr(pipe, "vae", None),
        noise_schedule=getattr(pipe, "noise_schedule", None),
    )
