"""What the three pipelines share: the denoising loop, the bridge between parameterizations, inputs and outputs.

A model predicts in the parameterization it was trained in (``scheduler.config.prediction_type``: epsilon, sample,
v_prediction or score). The scheduler that steps may want another one: Diffusers' schedulers cannot step a score,
so a swapped-in ``DDIMScheduler.from_config(hvae_scheduler.config)`` still says "score" in its config. ``SamplingChain``
is the one place where that is resolved: it picks the parameterization the scheduler steps in (the model's own when
the scheduler supports it, ε otherwise, with a copy of the scheduler configured for it), and holds ᾱ of every step
of the chain so that outputs convert with ``parameterization.convert_prediction``.

Which x_t and ᾱ_t? The model sees ``scheduler.scale_model_input(sample, t)``, which for variance-preserving schedulers
is x_t itself and for Karras-style schedulers (Euler, which carry x_t / √ᾱ_t = x_0 + σ ε with σ² = (1 − ᾱ_t) / ᾱ_t)
is that sample scaled back to x_t. Conversions therefore use the model input, and ᾱ_t = 1 / (1 + σ_t²) for
schedulers that keep σ per step (also exact at fractional timesteps), ``alphas_cumprod[t]`` for the others.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..parameterization import PREDICTION_TYPES, check_prediction_type, convert_prediction
from ..scheduling_hvae import HVAEScheduler
from . import serialization

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# What Diffusers' DDPM-family schedulers step; an HVAEScheduler also steps "score".
DIFFUSERS_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def steppable_prediction_types(scheduler) -> tuple[str, ...]:
    """The parameterizations ``scheduler.step`` accepts."""
    return PREDICTION_TYPES if isinstance(scheduler, HVAEScheduler) else DIFFUSERS_PREDICTION_TYPES


@dataclass
class SamplingChain:
    """The timesteps being sampled, the scheduler that steps them, and ᾱ_t of each step.

    Attributes:
        scheduler: the scheduler whose ``step`` is called (the pipeline's own, or a copy of it configured for
            ``step_prediction_type`` when it cannot step the model's parameterization).
        timesteps: ``scheduler.timesteps``.
        alphas_cumprod: ᾱ_t of each step as Python floats (no host sync in the loop).
        model_prediction_type: what the model outputs.
        step_prediction_type: what ``scheduler.step`` is given.
    """

    scheduler: object
    timesteps: torch.Tensor
    alphas_cumprod: list[float]
    model_prediction_type: str
    step_prediction_type: str

    def convert(self, model_output, model_input, step_index: int, from_type: str, to_type: str):
        """``convert_prediction`` at step ``step_index``; ``model_input`` is x_t as the model saw it."""
        return convert_prediction(model_output, model_input, self.alphas_cumprod[step_index], from_type, to_type)

    @staticmethod
    def split(model_output, model_input):
        """(prediction, variance channels or None): a model with learned variance outputs 2C channels for C."""
        if model_output.ndim == model_input.ndim and model_output.shape[1] == 2 * model_input.shape[1]:
            return model_output.chunk(2, dim=1)
        return model_output, None

    def for_step(self, prediction, model_input, step_index: int, from_type: str | None = None, variance=None):
        """A prediction (in ``from_type``, by default the model's) expressed as ``scheduler.step`` expects it.

        ``variance``, the learned-variance channels split off by ``split``, is appended again for schedulers that
        use it (``variance_type`` "learned" or "learned_range") and dropped for the others.
        """
        from_type = from_type or self.model_prediction_type
        prediction = self.convert(prediction, model_input, step_index, from_type, self.step_prediction_type)
        if variance is not None and str(getattr(self.scheduler.config, "variance_type", "")).startswith("learned"):
            return torch.cat([prediction, variance], dim=1)
        return prediction


def chain_alphas_cumprod(scheduler, timesteps: torch.Tensor) -> list[float]:
    """ᾱ_t at each of ``timesteps``: 1 / (1 + σ²) from the scheduler's per-step σ when it keeps one (Euler,
    DPM-Solver), else ``alphas_cumprod[t]``."""
    if not hasattr(scheduler, "alphas_cumprod"):
        raise TypeError(
            f"{type(scheduler).__name__} has no alphas_cumprod: only variance-preserving (DDPM-family) schedulers are "
            "supported"
        )
    sigmas = getattr(scheduler, "sigmas", None)
    if not isinstance(scheduler, HVAEScheduler) and isinstance(sigmas, torch.Tensor) and len(sigmas) >= len(timesteps):
        alphas_cumprod = 1.0 / (1.0 + sigmas[: len(timesteps)].detach().cpu().double() ** 2)
    else:
        alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod).double()[timesteps.detach().cpu().long()]
    return alphas_cumprod.tolist()


def prepare_sampling_chain(scheduler, num_inference_steps: int, device) -> SamplingChain:
    """Set the timesteps of the scheduler that will step (see the module docstring) and read ᾱ_t of each step."""
    model_prediction_type = scheduler.config.prediction_type
    check_prediction_type(model_prediction_type, "scheduler.config.prediction_type")
    if model_prediction_type in steppable_prediction_types(scheduler):
        step_prediction_type = model_prediction_type
    else:
        step_prediction_type = "epsilon"
        scheduler = type(scheduler).from_config(scheduler.config, prediction_type=step_prediction_type)
    scheduler.set_timesteps(num_inference_steps, device=device)
    return SamplingChain(
        scheduler=scheduler,
        timesteps=scheduler.timesteps,
        alphas_cumprod=chain_alphas_cumprod(scheduler, scheduler.timesteps),
        model_prediction_type=model_prediction_type,
        step_prediction_type=step_prediction_type,
    )


def sample_shape(model_config, batch_size: int) -> tuple[int, ...]:
    """(B, C, H, W) for image models (``sample_size`` an int or (H, W)); (B, D) for vector models (no ``sample_size``)."""
    in_channels = getattr(model_config, "in_channels", None)
    if in_channels is None:
        raise ValueError("unet.config.in_channels must be set to know the shape of the samples to draw")
    sample_size = getattr(model_config, "sample_size", None)
    if sample_size is None:
        return (batch_size, in_channels)
    if isinstance(sample_size, int):
        return (batch_size, in_channels, sample_size, sample_size)
    return (batch_size, in_channels, *sample_size)


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


class HVAESamplingPipeline(DiffusionPipeline):
    """Base of the pipelines: checks, latents, the denoising loop and outputs; subclasses give the prediction per step.

    Saved folders name their class so that ``DiffusionPipeline.from_pretrained`` finds it (see ``serialization``).
    """

    _callback_tensor_inputs = ["latents"]
    model_cpu_offload_seq = "unet"

    def save_config(self, save_directory: str | os.PathLike, *args, **kwargs):
        """model_index.json, naming this class so that ``DiffusionPipeline.from_pretrained`` finds it, and the module
        that imports it (``serialization``). ``save_pretrained`` calls this after saving the components and before
        any upload, so ``push_to_hub`` carries both files."""
        super().save_config(save_directory, *args, **kwargs)
        serialization.write_pipeline_reference(save_directory, type(self))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Diffusers' loading, after checking that a local folder has every component it lists (a ``ValueError``
        naming the component and the folder otherwise). Loads folders saved by Diffusers' own pipelines too."""
        index_path = os.path.join(str(pretrained_model_name_or_path), "model_index.json")
        if os.path.isfile(index_path):
            serialization.check_components_present(pretrained_model_name_or_path, cls.load_config(index_path))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------ inputs

    @property
    def is_vector_model(self) -> bool:
        return getattr(self.unet.config, "sample_size", None) is None

    def check_sampling_inputs(
        self,
        batch_size,
        num_inference_steps,
        generator,
        latents,
        output_type,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ) -> tuple[int, ...]:
        """Raise a ``ValueError`` for any bad common input; return the shape of the samples to draw."""
        check_batch_size(batch_size)
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type == "pil" and self.is_vector_model:
            raise ValueError("output_type='pil' needs an image model; for vector samples use 'latent', 'pt' or 'np'")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"generator is a list of {len(generator)} generators but the batch size is {batch_size}")
        shape = sample_shape(self.unet.config, batch_size)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError("callback_on_step_end must be callable")
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs may only name {self._callback_tensor_inputs}, got {unknown}"
            )
        return shape

    def prepare_latents(self, shape, generator, latents, device, dtype) -> torch.Tensor:
        """x_T ~ N(0, I) drawn with ``randn_tensor`` (or the given ``latents``), scaled by ``init_noise_sigma``."""
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    # ------------------------------------------------------------------ the loop

    def denoise(
        self,
        latents: torch.Tensor,
        num_inference_steps: int,
        predict: Callable[[torch.Tensor, torch.Tensor, int, SamplingChain], torch.Tensor],
        generator=None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ) -> torch.Tensor:
        """Run the reverse chain from ``latents``.

        Args:
            predict: ``predict(model_input, timestep, step_index, chain)`` returns the (guided) prediction in
                ``chain.step_prediction_type``; ``model_input`` is ``scheduler.scale_model_input(latents, t)``.
            callback_on_step_end: ``callback(pipeline, step_index, timestep, callback_kwargs)`` returning a dict; a
                returned ``"latents"`` replaces the current latents.
        """
        chain = prepare_sampling_chain(self.scheduler, num_inference_steps, latents.device)
        self._num_timesteps = len(chain.timesteps)
        with self.progress_bar(total=len(chain.timesteps)) as progress_bar:
            for step_index, timestep in enumerate(chain.timesteps):
                model_input = chain.scheduler.scale_model_input(latents, timestep)
                model_output = predict(model_input, timestep, step_index, chain)
                latents = chain.scheduler.step(
                    model_output, timestep, latents, generator=generator, return_dict=False
                )[0]
                if callback_on_step_end is not None:
                    callback_kwargs = {"latents": latents}
                    callback_kwargs = {name: callback_kwargs[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, step_index, timestep, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()
        return latents

    @staticmethod
    def callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs):
        """Diffusers' callback objects name their own tensor inputs."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            return callback_on_step_end.tensor_inputs
        return callback_on_step_end_tensor_inputs

    # ------------------------------------------------------------------ outputs

    def finish(self, sample: torch.Tensor, output_type: str, return_dict: bool):
        """Check the sample is finite and convert it: "latent" raw; images "pt" [0, 1] NCHW, "np" NHWC, "pil".

        For vector models "pt" and "np" are the raw samples too (there is no image range to map).
        """
        # one host sync a call: per-step checks would sync every step on an accelerator
        if not bool(torch.isfinite(sample).all()):
            raise ValueError(
                "the final sample contains NaN or inf: the model diverged, or its parameterization "
                "(scheduler.config.prediction_type) is not the one it was trained with"
            )
        if output_type == "latent":
            images = sample
        elif self.is_vector_model:
            images = sample if output_type == "pt" else sample.cpu().float().numpy()
        else:
            images = (sample / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def labels_tensor(class_labels, batch_size, num_classes: int, device, argument: str = "class_labels") -> torch.Tensor:
    """Class labels as a long tensor ``[B]``: an int is repeated ``batch_size`` times (1 if None), a sequence is taken
    as is (its length must equal ``batch_size`` if that is given); each must lie in [0, ``num_classes``)."""
    if isinstance(class_labels, (int, np.integer)) and not isinstance(class_labels, bool):
        labels = torch.full((1 if batch_size is None else batch_size,), int(class_labels), dtype=torch.long)
    else:
        labels = torch.as_tensor(class_labels)
        if labels.ndim != 1 or labels.numel() == 0 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"{argument} must be an int or a non-empty 1-D sequence of ints, got {class_labels!r}")
        if batch_size is not None and len(labels) != batch_size:
            raise ValueError(f"{argument} has {len(labels)} labels but batch_size is {batch_size}")
        labels = labels.long().cpu()
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"{argument} must lie in [0, {num_classes}), got {labels.tolist()}")
    return labels.to(device)


def model_output_of(output) -> torch.Tensor:
    """The prediction of a Diffusers model output (``.sample``) or a plain tensor."""
    return output if isinstance(output, torch.Tensor) else output.sample


__all__ = ["HVAESamplingPipeline", "SamplingChain", "prepare_sampling_chain", "sample_shape", "labels_tensor"]
