"""What the three pipelines share: inputs, timesteps, latents, one denoising step, callbacks and outputs.

Each pipeline's ``__call__`` reads top to bottom as Diffusers' pipelines do (check inputs, encode the condition, set
timesteps, prepare latents, loop, postprocess); this module holds the parts they share, and the math stays in
``parameterization`` and ``guidance``.

Which parameterization? The model predicts in the pipeline's ``prediction_type`` (its config; ``None`` means the
scheduler's ``config.prediction_type``); the scheduler steps in its own ``config.prediction_type``. The pipeline
converts the model output from one to the other with ``parameterization.convert_prediction`` and never copies the
scheduler: ``pipe.scheduler`` is the scheduler that stepped. Diffusers' schedulers cannot step "score", so a score
model sampled with one needs the scheduler built with ``prediction_type="epsilon"`` and the pipeline with
``prediction_type="score"`` (``prediction_types`` raises a ``ValueError`` saying so otherwise).

Which x_t and ᾱ_t? The model sees ``scheduler.scale_model_input(sample, t)``, which for variance-preserving schedulers
is x_t itself and for Karras-style schedulers (Euler, which carry x_t / √ᾱ_t = x_0 + σ ε with σ² = (1 − ᾱ_t) / ᾱ_t)
is that sample scaled back to x_t. Conversions therefore use the model input, and ᾱ_t = 1 / (1 + σ_t²) for
schedulers that keep σ per step (also exact at fractional timesteps), ``alphas_cumprod[t]`` for the others.

Clipping (docs/theory.md, "Guidance and clipping"): without classifier guidance the scheduler clips or thresholds x̂_0
as its config asks, exactly as in Diffusers' pipelines (``DDIMScheduler`` keeps the unclipped ε unless the call passes
``use_clipped_model_output=True``). Classifier guidance follows guided-diffusion: the pipeline clips x̂_0 itself,
guides it, and steps a scheduler that does not clip again (``unclipped_scheduler``). No pipeline ever writes the
scheduler's config.

One step (``scheduler_step``) converts the prediction once, to what the scheduler steps, and reads x̂_0 back from the
scheduler's output (``pred_original_sample``); ``step_end`` runs Diffusers' step-end callback and the progress bar.
A pipeline object samples one call at a time: a second concurrent ``__call__`` raises a ``RuntimeError``
(``exclusive_call``): the state of a call lives on the pipeline and its scheduler.
"""

import functools
import inspect
import os
import threading
import weakref

import numpy as np
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..latent_elbo import unscale_latents
from ..parameterization import PREDICTION_TYPES, check_prediction_type, convert_prediction
from ..scheduling_hvae import HVAEScheduler
from . import serialization

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# The pipelines inside a call, and the lock around their check-and-add (``exclusive_call``): kept beside the
# pipelines, not in them, so that a pipeline deep-copies and pickles, even mid-call, into one free to sample.
_CALLING = weakref.WeakSet()
_CALLING_LOCK = threading.Lock()

# What Diffusers' DDPM-family schedulers step; an HVAEScheduler also steps "score".
DIFFUSERS_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def steppable_prediction_types(scheduler) -> tuple[str, ...]:
    """The parameterizations ``scheduler.step`` accepts."""
    return PREDICTION_TYPES if isinstance(scheduler, HVAEScheduler) else DIFFUSERS_PREDICTION_TYPES


def prediction_types(model_prediction_type: str | None, scheduler) -> tuple[str, str]:
    """(what the model outputs, what ``scheduler.step`` is given); the model's defaults to the scheduler's."""
    step_prediction_type = scheduler.config.prediction_type
    check_prediction_type(step_prediction_type, "scheduler.config.prediction_type")
    if step_prediction_type not in steppable_prediction_types(scheduler):
        raise ValueError(
            f"{type(scheduler).__name__} cannot step prediction_type={step_prediction_type!r} (it steps "
            f"{DIFFUSERS_PREDICTION_TYPES}): build it with prediction_type='epsilon', e.g. "
            f"{type(scheduler).__name__}.from_config(config, prediction_type='epsilon'), and give the model's "
            f"parameterization to the pipeline, e.g. HVAEPipeline(unet, scheduler, prediction_type="
            f"{step_prediction_type!r})"
        )
    model_prediction_type = model_prediction_type or step_prediction_type
    check_prediction_type(model_prediction_type, "prediction_type")
    return model_prediction_type, step_prediction_type


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


@functools.cache
def _parameter_names(function) -> frozenset:
    """The parameter names of ``function``, looked up once: ``inspect.signature`` costs tens of µs, and the
    pipelines ask every step."""
    return frozenset(inspect.signature(function).parameters)


# Adapted from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.retrieve_timesteps (which imports
# transformers with its module; the core install has no transformers)
def set_scheduler_timesteps(scheduler, num_inference_steps: int | None, device, timesteps=None, sigmas=None) -> None:
    """``scheduler.set_timesteps``: ``num_inference_steps`` spaced as its config says, or the custom ``timesteps``
    or ``sigmas`` (at most one of them), for schedulers whose ``set_timesteps`` takes them (a ``ValueError``
    otherwise)."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass timesteps or sigmas, not both")
    for name, schedule in (("timesteps", timesteps), ("sigmas", sigmas)):
        if schedule is None:
            continue
        if name not in _parameter_names(type(scheduler).set_timesteps):
            raise ValueError(
                f"{type(scheduler).__name__}.set_timesteps takes no custom {name}: pass num_inference_steps"
            )
        scheduler.set_timesteps(**{name: schedule}, device=device)
        return
    scheduler.set_timesteps(num_inference_steps, device=device)


def _config_option(scheduler, name: str):
    """The scheduler's setting ``name``, or None when its class has no such option. A config built from another
    scheduler's (``DPMSolverMultistepScheduler.from_config(hvae.config)``) carries that scheduler's ``clip_sample``,
    which the new class never applies; the pipeline must not apply it either."""
    if name not in _parameter_names(type(scheduler).__init__):
        return None
    return scheduler.config.get(name)


def clips(scheduler) -> bool:
    """Whether the scheduler clips or dynamically thresholds x̂_0 (its class has the option and its config sets it)."""
    return bool(_config_option(scheduler, "thresholding") or _config_option(scheduler, "clip_sample"))


def clip_original_sample(original_sample: torch.Tensor, scheduler) -> torch.Tensor:
    """x̂_0 clipped to [−r, r] (``clip_sample``, r = ``clip_sample_range``) or dynamically thresholded
    (``thresholding``, the scheduler's own ``_threshold_sample``), as the scheduler's config asks; differentiable
    (``clamp`` passes no gradient to clipped elements)."""
    if _config_option(scheduler, "thresholding"):
        return scheduler._threshold_sample(original_sample)
    if _config_option(scheduler, "clip_sample"):
        clip_range = scheduler.config.clip_sample_range
        return original_sample.clamp(-clip_range, clip_range)
    return original_sample


CLIPPING_OPTIONS = ("clip_sample", "thresholding")


def unclipped_scheduler(scheduler):
    """``scheduler`` itself when it neither clips nor thresholds x̂_0, else a new scheduler of its class and config
    with both off, for classifier guidance: the pipeline has clipped x̂_0 before guiding it, and the guided x̂_0 must
    not be clipped again (guided-diffusion's order). Built from the config, so ``scheduler``'s own config is never
    written; set its timesteps before stepping it."""
    if not clips(scheduler):
        return scheduler
    switched_off = {name: False for name in CLIPPING_OPTIONS if _config_option(scheduler, name) is not None}
    return type(scheduler).from_config(scheduler.config, **switched_off)


def num_class_labels(denoiser_config) -> int | None:
    """How many class labels a class-conditional denoiser takes, ∅ included; ``None`` for one without class labels.

    A ``UNet2DModel`` has ``num_class_embeds`` embeddings. A DiT (``DiTTransformer2DModel``, or a
    ``Transformer2DModel`` with ``norm_type="ada_norm_zero"``) has ``num_embeds_ada_norm`` = K classes and one more
    embedding for ∅ (in other norm types ``num_embeds_ada_norm`` counts timesteps, not classes).
    """
    num_class_embeds = getattr(denoiser_config, "num_class_embeds", None)
    if num_class_embeds is not None:
        return num_class_embeds
    num_embeds_ada_norm = getattr(denoiser_config, "num_embeds_ada_norm", None)
    if num_embeds_ada_norm is not None and getattr(denoiser_config, "norm_type", None) == "ada_norm_zero":
        return num_embeds_ada_norm + 1
    return None


def null_class_label(denoiser_config) -> int | None:
    """The class label that means "no condition" (∅) of a class-conditional denoiser, from its config: the last of
    its labels (``num_class_labels``). A ``UNet2DModel`` trained with label dropout keeps its last embedding,
    ``num_class_embeds − 1``, for ∅; a DiT keeps ``num_embeds_ada_norm`` (Diffusers' ``DiTPipeline``: 1000 for
    ImageNet). ``None`` for a denoiser without class labels.
    """
    count = num_class_labels(denoiser_config)
    return None if count is None else count - 1


def sample_shape(model_config, batch_size: int) -> tuple[int, ...]:
    """(B, C, H, W) for image models (``sample_size`` an int or (H, W)); (B, D) for vector models (no ``sample_size``)."""
    in_channels = getattr(model_config, "in_channels", None)
    if in_channels is None:
        raise ValueError("the denoiser's config.in_channels must be set to know the shape of the samples to draw")
    sample_size = getattr(model_config, "sample_size", None)
    if sample_size is None:
        return (batch_size, in_channels)
    if isinstance(sample_size, int):
        return (batch_size, in_channels, sample_size, sample_size)
    return (batch_size, in_channels, *sample_size)


def check_batch_size(batch_size, argument: str = "batch_size") -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"{argument} must be an int >= 1, got {batch_size!r}")


def check_generator(generator, batch_size: int) -> None:
    """A ``ValueError`` unless ``generator`` is None, a ``torch.Generator`` or a list of one per sample."""
    generators = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(
            "generator must be None, a torch.Generator or a list of one torch.Generator per sample, got "
            f"{generator!r} (for a seed s pass torch.Generator().manual_seed(s))"
        )
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(f"generator is a list of {len(generator)} generators but the batch size is {batch_size}")


def exclusive_call(call):
    """Decorates a pipeline's ``__call__``: a ``RuntimeError`` when another call on the same object is running.

    A call keeps its state on the pipeline and its scheduler (timesteps, step index, guidance scale), so two at once
    would step each other's chains and return wrong samples without an error; Diffusers' pipelines share the limit
    but do not check it (docs/pipelines.md, "Threads"). The check never waits: the second call fails at once."""

    @functools.wraps(call)
    def exclusive(self, *args, **kwargs):
        with _CALLING_LOCK:
            if self in _CALLING:
                raise RuntimeError(
                    f"this {type(self).__name__} is already sampling (in another thread, or this is a call from its "
                    "own callback): a pipeline object runs one call at a time; give each thread its own pipeline "
                    "(copy.deepcopy(pipe), or one from_pretrained per thread)"
                )
            _CALLING.add(self)
        try:
            return call(self, *args, **kwargs)
        finally:
            with _CALLING_LOCK:
                _CALLING.discard(self)

    return exclusive


class HVAESamplingPipeline(DiffusionPipeline):
    """Base of the pipelines: input checks, timesteps, latents, one denoising step, callbacks and outputs.

    Saved folders name their class so that ``DiffusionPipeline.from_pretrained`` finds it (see ``serialization``).
    The properties ``num_timesteps`` and ``interrupt`` are those Diffusers' callbacks read and set.
    """

    _callback_tensor_inputs = ["latents", "pred_original_sample"]
    # What a saved folder may lack (Diffusers' ``from_pretrained`` reads the class's list): one of the two denoisers,
    # the VAE of a pixel-space model. A pipeline's own list (``note_optional_components``) names only the
    # components it was built without: those its call can do without.
    _optional_components = ["unet", "transformer", "vae", "noise_schedule"]
    model_cpu_offload_seq = "unet->transformer->vae"

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

    # ------------------------------------------------------------------ state of the current call

    @property
    def num_timesteps(self) -> int:
        """The number of timesteps of the current (or last) call: ``len(scheduler.timesteps)``."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipeline._interrupt = True`` (from a callback) to skip the remaining steps."""
        return getattr(self, "_interrupt", False)

    @property
    def denoiser(self):
        """The model that predicts from x_t: the ``unet``, or the ``transformer`` (a DiT), as Diffusers names them;
        None for a pipeline built without one (to encode prompts only)."""
        return self.unet if self.unet is not None else self.transformer

    def note_optional_components(self) -> None:
        """After ``register_modules``: this pipeline's ``_optional_components`` are the class's that it was built
        without (the other denoiser, the VAE of a pixel-space model, ...), so Diffusers' save and load keep them None
        and ``components`` leaves them out."""
        self._optional_components = [
            name for name in type(self)._optional_components if name in self.config and getattr(self, name) is None
        ]

    @property
    def components(self) -> dict:
        """Diffusers' ``components`` without those this pipeline was built without (``note_optional_components``):
        ``type(pipe)(**pipe.components)`` builds the same pipeline, whichever denoiser it has."""
        absent = self.__dict__.get("_optional_components", ())
        return {
            name: component
            for name, component in super().components.items()
            if not (component is None and name in absent)
        }

    @property
    def vae_scale_factor(self) -> int:
        """How many pixels a latent spans per side: 2^(number of VAE levels − 1), as Diffusers computes it; 1 without
        a VAE."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def is_vector_model(self) -> bool:
        return getattr(self.denoiser.config, "sample_size", None) is None

    @staticmethod
    def check_components(unet, transformer, vae, denoiser_required: bool = True) -> None:
        """At construction: a ``ValueError`` unless there is exactly one denoiser (``unet`` or ``transformer``; with
        ``denoiser_required=False`` none is allowed too, for a pipeline that only encodes prompts) and the VAE's
        latents have the channels it takes."""
        if (unet is not None and transformer is not None) or (
            denoiser_required and unet is None and transformer is None
        ):
            raise ValueError(
                "pass exactly one denoiser: unet (UNet2DModel, UNet2DConditionModel, ...) or transformer "
                "(DiTTransformer2DModel, ...)"
            )
        if vae is None or (unet is None and transformer is None):
            return
        in_channels = (unet if unet is not None else transformer).config.in_channels
        latent_channels = getattr(vae.config, "latent_channels", None)
        if latent_channels != in_channels:
            raise ValueError(
                f"vae.config.latent_channels={latent_channels} must equal the denoiser's in_channels={in_channels}"
            )

    def run_denoiser(self, model_input: torch.Tensor, timestep: torch.Tensor, **conditions) -> torch.Tensor:
        """The denoiser's output on ``model_input`` at ``timestep``. A unet takes the step's one timestep; a
        transformer takes it by keyword, one per sample, as Diffusers' ``DiTPipeline`` passes it."""
        if self.unet is not None:
            return model_output_of(self.unet(model_input, timestep, **conditions))
        timesteps = timestep.reshape(-1).expand(len(model_input))
        return model_output_of(self.transformer(model_input, timestep=timesteps, **conditions))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """x = D(z_0): the VAE's decoder on the latents unscaled as its config says (``latent_elbo.unscale_latents``)."""
        config = self.vae.config
        latents = unscale_latents(latents, config.scaling_factor, getattr(config, "shift_factor", None))
        return self.vae.decode(latents.to(self.vae.dtype)).sample

    @property
    def default_output_type(self) -> str:
        return "latent" if self.is_vector_model else "pil"

    # ------------------------------------------------------------------ inputs

    @staticmethod
    def callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs):
        """Diffusers' callback objects name their own tensor inputs."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            return callback_on_step_end.tensor_inputs
        return list(callback_on_step_end_tensor_inputs)

    def check_inputs(
        self,
        batch_size,
        num_inference_steps,
        generator,
        latents,
        output_type,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
        height=None,
        width=None,
    ) -> tuple[int, ...]:
        """Raise a ``ValueError`` for any bad common input; return the shape of the samples to draw (``height`` and
        ``width`` in pixels, by default the denoiser's ``sample_size`` × ``vae_scale_factor``, as Diffusers'
        pipelines). Also works out the call's parameterizations (``prediction_types``), once.
        ``num_inference_steps=None`` stands for a schedule given as ``timesteps`` or ``sigmas``."""
        if self.denoiser is None or self.scheduler is None:
            raise ValueError(
                "this pipeline has no denoiser (unet or transformer) or no scheduler: it can encode prompts but not "
                "sample"
            )
        check_batch_size(batch_size)
        if num_inference_steps is not None and (
            isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer))
        ):
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if num_inference_steps is not None and num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type == "pil" and self.is_vector_model:
            raise ValueError("output_type='pil' needs an image model; for vector samples use 'latent', 'pt' or 'np'")
        check_generator(generator, batch_size)
        shape = sample_shape(self.denoiser.config, batch_size)
        if (height is not None or width is not None) and self.is_vector_model:
            raise ValueError("height and width are for image models; this denoiser draws vectors (no sample_size)")
        for name, size, axis in (("height", height, -2), ("width", width, -1)):
            if size is None:
                continue
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
                raise ValueError(f"{name} must be an int >= 1, got {size!r}")
            if size % self.vae_scale_factor:
                raise ValueError(f"{name} must be divisible by {self.vae_scale_factor} (vae_scale_factor), got {size}")
            shape = (*shape[:axis], size // self.vae_scale_factor, *shape[axis:][1:])
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError("callback_on_step_end must be callable")
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs may only name {self._callback_tensor_inputs}, got {unknown}"
            )
        # the parameterizations of this call, worked out once (``model_prediction_type``, ``scheduler_step``)
        self._prediction_types = prediction_types(self.config.prediction_type, self.scheduler)
        self._wants_original_sample = callback_on_step_end is not None and (
            "pred_original_sample" in callback_on_step_end_tensor_inputs
        )
        return shape

    def unconditional_kwargs(self, batch_size: int) -> dict:
        """What makes the denoiser model p(x): its null class label ∅ for a class-conditional one (trained with label
        dropout, ``null_class_label``), nothing otherwise. This is the one way the package evaluates ε(x_t, ∅)."""
        null_label = null_class_label(self.denoiser.config)
        if null_label is None:
            return {}
        return {"class_labels": torch.full((batch_size,), null_label, dtype=torch.long, device=self._execution_device)}

    # ------------------------------------------------------------------ timesteps and latents

    def set_timesteps(
        self, num_inference_steps: int | None, device, *schedulers, timesteps=None, sigmas=None
    ) -> tuple[torch.Tensor, list[float]]:
        """Set the timesteps of ``self.scheduler`` (and of any other ``schedulers`` of the call, such as
        ``unclipped_scheduler``'s) and return them with ᾱ_t of each: ``num_inference_steps`` evenly spaced, or the
        custom ``timesteps`` or ``sigmas`` of schedulers that take them (``set_scheduler_timesteps``)."""
        for scheduler in {id(scheduler): scheduler for scheduler in (self.scheduler, *schedulers)}.values():
            set_scheduler_timesteps(scheduler, num_inference_steps, device, timesteps=timesteps, sigmas=sigmas)
            # The chain starts at its first timestep: say so instead of letting the scheduler look it up by value,
            # which lands on the wrong step where a schedule repeats a timestep (Karras σ on a capped cosine
            # schedule).
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        if num_inference_steps is None:
            num_inference_steps = len(timesteps)
        self._num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        return timesteps, chain_alphas_cumprod(self.scheduler, timesteps)

    def prepare_latents(self, shape, generator, latents, device, dtype) -> torch.Tensor:
        """x_T ~ N(0, I) drawn with ``randn_tensor`` (or the given ``latents``), scaled by ``init_noise_sigma``, which
        for Karras-style schedulers depends on the timesteps: call after ``set_timesteps``."""
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    # ------------------------------------------------------------------ one step

    @property
    def model_prediction_type(self) -> str:
        """What the model outputs in the current call (set by ``set_timesteps``)."""
        return self._prediction_types[0]

    def clip_prediction(self, prediction, prediction_type: str, model_input, alphas_cumprod_t: float):
        """(prediction, its type): x̂_0 clipped or thresholded as the scheduler's config asks, else as it came."""
        if not clips(self.scheduler):
            return prediction, prediction_type
        original_sample = convert_prediction(prediction, model_input, alphas_cumprod_t, prediction_type, "sample")
        return clip_original_sample(original_sample, self.scheduler), "sample"

    def step_kwargs(self, scheduler=None, **kwargs) -> dict:
        """The ``kwargs`` (``generator``, ``eta``, ``use_clipped_model_output``) that ``scheduler.step`` takes, as
        Diffusers' pipelines pass ``extra_step_kwargs``; the others are dropped (η means nothing to DDPM)."""
        step = (scheduler or self.scheduler).step
        accepted = _parameter_names(getattr(step, "__func__", step))
        return {name: value for name, value in kwargs.items() if name in accepted}

    def scheduler_step(
        self,
        prediction,
        prediction_type: str,
        variance,
        model_input,
        latents,
        timestep,
        alphas_cumprod_t,
        step_kwargs,
        scheduler=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x_{t'}, x̂_0) from ``scheduler.step`` (``self.scheduler`` by default), given the prediction converted
        once to the parameterization the scheduler steps.

        x̂_0 is the scheduler's ``pred_original_sample`` (clipped as its config asks); for a scheduler that returns
        none (DPM-Solver) it is converted from the prediction, and only when a callback asks for it.
        ``variance``, the learned-variance channels (``parameterization.split_learned_variance``), is appended again
        for schedulers that use it (``variance_type`` "learned" or "learned_range") and dropped for the others.
        """
        scheduler = scheduler or self.scheduler
        step_prediction_type = self._prediction_types[1]
        model_output = convert_prediction(
            prediction, model_input, alphas_cumprod_t, prediction_type, step_prediction_type
        )
        if variance is not None and str(getattr(scheduler.config, "variance_type", "")).startswith("learned"):
            model_output = torch.cat([model_output, variance], dim=1)
        output = scheduler.step(model_output, timestep, latents, **step_kwargs)
        original_sample = getattr(output, "pred_original_sample", None)
        if original_sample is None and self._wants_original_sample:
            original_sample = convert_prediction(prediction, model_input, alphas_cumprod_t, prediction_type, "sample")
        return output.prev_sample, original_sample

    def step_end(
        self,
        step_index,
        timestep,
        latents,
        original_sample,
        callback_on_step_end,
        tensor_inputs,
        progress_bar,
        **tensors,
    ) -> dict:
        """The end of a step, as in Diffusers' pipelines: ``callback_on_step_end(pipeline, step_index, timestep,
        callback_kwargs)``, then the progress bar. Returns ``latents`` and the other ``tensors`` of the loop (for
        classifier-free guidance its conditions), replaced by those the callback returned.

        ``callback_kwargs`` holds the ``tensor_inputs`` it asks for among ``latents`` (x_{t'} after the step),
        ``pred_original_sample`` (the step's x̂_0) and ``tensors``; the callback must return a dict."""
        tensors = {"latents": latents, **tensors}
        if callback_on_step_end is not None:
            available = {**tensors, "pred_original_sample": original_sample}
            callback_kwargs = {name: available[name] for name in tensor_inputs}
            outputs = callback_on_step_end(self, step_index, timestep, callback_kwargs)
            if not isinstance(outputs, dict):
                raise TypeError(
                    "callback_on_step_end must return a dict (callback_kwargs, or {} to change nothing), got "
                    f"{type(outputs).__name__}"
                )
            tensors = {name: outputs.get(name, value) for name, value in tensors.items()}
        # schedulers of order k (Heun) take k timesteps per inference step, as Diffusers' pipelines count them
        if step_index == self._num_timesteps - 1 or (
            step_index + 1 > self._num_warmup_steps and (step_index + 1) % self.scheduler.order == 0
        ):
            progress_bar.update()
        return tensors

    # ------------------------------------------------------------------ outputs

    def finish(self, sample: torch.Tensor, output_type: str, return_dict: bool):
        """Check the sample is finite and convert it: "latent" raw (undecoded for a latent model); images (decoded
        once by the VAE for a latent model) through Diffusers' ``VaeImageProcessor``, "pt" [0, 1] NCHW, "np" NHWC,
        "pil".

        For vector models "pt" and "np" are the raw samples too (there is no image range to map).
        """
        # one host sync a call: per-step checks would sync every step on an accelerator
        if not bool(torch.isfinite(sample).all()):
            raise ValueError(
                "the final sample contains NaN or inf: the model diverged, or its parameterization "
                "(the pipeline's or scheduler's prediction_type) is not the one it was trained with"
            )
        if output_type == "latent":
            images = sample
        elif self.vae is not None:
            images = VaeImageProcessor(do_resize=False).postprocess(
                self.decode_latents(sample), output_type=output_type
            )
        elif self.is_vector_model:
            images = sample if output_type == "pt" else sample.cpu().float().numpy()
        else:
            images = VaeImageProcessor(do_resize=False).postprocess(sample, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def flat_labels(class_labels) -> list | None:
    """The ints of a (possibly nested) list or tuple of ints, in order, as ``DiTPipeline`` flattens ``[[1], [1]]``;
    None if anything in it is not an int."""
    flat = []
    for label in class_labels:
        if isinstance(label, (list, tuple)):
            label = flat_labels(label)
            if label is None:
                return None
            flat.extend(label)
        elif isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            flat.append(int(label))
        else:
            return None
    return flat


def labels_tensor(class_labels, batch_size, num_classes: int, device, argument: str = "class_labels") -> torch.Tensor:
    """Class labels as a long tensor ``[B]``: an int is repeated ``batch_size`` times (1 if None), a sequence or
    tensor of ints is flattened as ``DiTPipeline`` does (its length must equal ``batch_size`` if that is given); each
    must lie in [0, ``num_classes``)."""
    if isinstance(class_labels, (int, np.integer)) and not isinstance(class_labels, bool):
        labels = torch.full((1 if batch_size is None else batch_size,), int(class_labels), dtype=torch.long)
    else:
        labels = None
        if isinstance(class_labels, (list, tuple)):
            flat = flat_labels(class_labels)
            labels = torch.tensor(flat, dtype=torch.long) if flat else None
        elif isinstance(class_labels, (np.ndarray, torch.Tensor)):
            labels = torch.as_tensor(class_labels).reshape(-1)
            if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
                labels = None
        if labels is None or not len(labels):
            raise ValueError(
                f"{argument} must be an int or a non-empty sequence (or tensor) of ints, got {class_labels!r}"
            )
        if batch_size is not None and len(labels) != batch_size:
            raise ValueError(f"{argument} has {len(labels)} labels but batch_size is {batch_size}")
        labels = labels.long().cpu()
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"{argument} must lie in [0, {num_classes}), got {labels.tolist()}")
    return labels.to(device)


def model_output_of(output) -> torch.Tensor:
    """The prediction of a Diffusers model output (``.sample``) or a plain tensor."""
    return output if isinstance(output, torch.Tensor) else output.sample


__all__ = [
    "HVAESamplingPipeline",
    "sample_shape",
    "labels_tensor",
    "num_class_labels",
    "null_class_label",
    "clip_original_sample",
]
