"""ClassifierFreeGuidancePipeline: ε̃ = ε(x_t, ∅) + w (ε(x_t, y) − ε(x_t, ∅)) with class labels or text prompts."""

import time

import torch
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.utils import replace_example_docstring

from ..guidance import (
    DEFAULT_GUIDANCE_SCALE,
    adaptive_projected_guidance,
    cfg_plus_plus_scale,
    cfg_zero_star_guidance,
    check_guidance_interval,
    check_guidance_scale,
    classifier_free_guidance,
    in_guidance_interval,
    rescale_guided_prediction,
)
from ..parameterization import convert_prediction, split_learned_variance
from . import sampling
from .sampling import HVAESamplingPipeline, check_batch_size, exclusive_call, labels_tensor

# How the unconditional and conditional halves run: "batched", one denoiser forward on the doubled batch (the
# default, as in Diffusers), "separate", two forwards of the batch (half the peak activation memory), or "auto",
# whichever of the two was faster when timed once for this pipeline, device, dtype and shape (opt-in: a timed
# choice may differ between runs, and the two agree only up to float rounding).
GUIDANCE_BATCHING = ("batched", "separate", "auto")

# How a guided step combines ε(x_t, ∅) and ε(x_t, y) (hvae_diffusion.guidance), with the settings each takes in
# ``guidance_kwargs``: plain classifier-free guidance, CFG++ (w = λ in [0, 1]), adaptive projected guidance and
# CFG-Zero*.
GUIDANCE_METHODS = {
    "cfg": (),
    "cfg++": (),
    "apg": ("eta", "norm_threshold", "momentum"),
    "cfg-zero*": ("zero_init_steps",),
}

# The default guidance weight w for the components of Diffusers' pipelines: StableDiffusionPipeline's for text,
# DiTPipeline's for a DiT; the package's own class-conditional models take ``guidance.DEFAULT_GUIDANCE_SCALE``.
DIFFUSERS_GUIDANCE_SCALES = {"text": 7.5, "dit": 4.0}


def is_prompt(prompt) -> bool:
    """Whether ``prompt`` is text: a string or a list or tuple of strings."""
    if isinstance(prompt, str):
        return True
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(p, str) for p in prompt)


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import UNet2DModel
        >>> from hvae_diffusion import ClassifierFreeGuidancePipeline, HVAEScheduler

        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        ...                    layers_per_block=1, norm_num_groups=8, num_class_embeds=4)  # 3 classes and ∅
        >>> pipe = ClassifierFreeGuidancePipeline(unet, HVAEScheduler())
        >>> images = pipe(class_labels=[0, 2], guidance_scale=2.0, num_inference_steps=10).images
        ```
"""


def fastest(candidates: dict, device: torch.device, repeats: int = 2) -> str:
    """The name of the fastest of ``candidates`` (name -> function of no arguments), each timed ``repeats`` times,
    interleaved, with the device synchronized around each run; the best time of each counts."""
    synchronize = getattr(torch, device.type).synchronize if device.type != "cpu" else (lambda: None)
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(repeats):
        for name, run in candidates.items():
            synchronize()
            start = time.perf_counter()
            run()
            synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.get)


class ClassifierFreeGuidancePipeline(HVAESamplingPipeline, StableDiffusionMixin):
    """Classifier-free guidance (Ho & Salimans 2022) with a model trained both with and without its condition.

    Conditions are either class labels, for a ``UNet2DModel`` with ``num_class_embeds`` (the null label ∅ is
    ``null_class_label``, by default the last embedding, ``num_class_embeds − 1``, see ``sampling.null_class_label``,
    and is saved in the pipeline config), or text prompts, for a ``UNet2DConditionModel`` with a transformers
    ``text_encoder`` and ``tokenizer`` (∅ is the empty prompt, or ``negative_prompt``). The guided prediction is formed
    in the model's parameterization (the same combination in every one, see ``guidance.classifier_free_guidance``)
    on the mean channels only (a learned variance is the conditional model's, as in Diffusers' ``DiTPipeline``) and
    converted for the scheduler, which clips its x̂_0 if its config asks, as in Diffusers' pipelines.

    As in Diffusers' pipelines the conditions of a guided step are one tensor, ∅ first then y (``prompt_embeds`` or
    ``class_labels`` in ``callback_kwargs``), and a step is guided while ``do_classifier_free_guidance`` (w ∉ {0, 1});
    otherwise the denoiser sees the conditions as they are, so Diffusers' ``SDCFGCutoffCallback`` works.

    Args:
        unet: a class-conditional ``UNet2DModel`` (or any model taking ``class_labels``) or a ``UNet2DConditionModel``.
        scheduler: ``HVAEScheduler`` or a Diffusers scheduler.
        text_encoder, tokenizer: for text prompts (e.g. ``CLIPTextModel`` and ``CLIPTokenizer``).
        null_class_label: the label that means ∅ for class-conditional models.
        prediction_type: the model's parameterization when it differs from the scheduler's (see ``HVAEPipeline``).
        vae: for a latent model (see ``HVAEPipeline``).
        transformer: the denoiser instead of ``unet`` (then ``unet=None``): a DiT (``DiTTransformer2DModel``), whose
            ∅ is ``num_embeds_ada_norm``, or another Diffusers transformer taking ``class_labels`` or
            ``encoder_hidden_states``. Folders saved by Diffusers' ``DiTPipeline`` and ``StableDiffusionPipeline``
            load with ``from_pretrained`` and sample the same images (docs/pipelines.md).
        noise_schedule: the learned noise schedule the model was trained with (see ``HVAEPipeline``).
    """

    # What a saved folder may lack (see ``HVAESamplingPipeline``): a DiT folder has no unet and no text parts, a
    # Stable Diffusion folder no transformer; a pipeline that only encodes prompts has no scheduler.
    _optional_components = ["unet", "transformer", "scheduler", "text_encoder", "tokenizer", "vae", "noise_schedule"]
    # The conditions a callback may read and replace are the denoiser's: "class_labels" or "prompt_embeds"
    # (each pipeline's own list, ``callback_conditions``).
    _callback_tensor_inputs = ["latents", "pred_original_sample", "prompt_embeds", "class_labels"]
    model_cpu_offload_seq = "text_encoder->unet->transformer->vae"

    def __init__(
        self,
        unet=None,
        scheduler=None,
        text_encoder=None,
        tokenizer=None,
        null_class_label: int | None = None,
        prediction_type: str | None = None,
        vae=None,
        transformer=None,
        noise_schedule=None,
    ):
        super().__init__()
        self.check_components(unet, transformer, vae, denoiser_required=False)
        denoiser = unet if unet is not None else transformer
        num_class_labels = None if denoiser is None else sampling.num_class_labels(denoiser.config)
        if null_class_label is None and denoiser is not None:
            null_class_label = sampling.null_class_label(denoiser.config)
        if null_class_label is not None and not (num_class_labels and 0 <= null_class_label < num_class_labels):
            raise ValueError(
                f"null_class_label={null_class_label} must lie in [0, {num_class_labels}), the class labels the "
                "denoiser takes (unet.config.num_class_embeds, or a DiT's num_embeds_ada_norm + 1)"
            )
        self.register_modules(
            unet=unet,
            transformer=transformer,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            vae=vae,
            noise_schedule=noise_schedule,
        )
        self.register_to_config(null_class_label=null_class_label, prediction_type=prediction_type)
        self.note_optional_components()
        self._callback_tensor_inputs = ["latents", "pred_original_sample", *self.callback_conditions()]

    def callback_conditions(self) -> list[str]:
        """The conditions of this pipeline's denoiser that callbacks see: "class_labels" for a class-conditional one,
        "prompt_embeds" for a text-conditional one (both when there is no denoiser yet)."""
        if self.denoiser is None:
            return ["prompt_embeds", "class_labels"]
        return [
            name
            for name, takes in (
                ("prompt_embeds", self.is_text_conditional),
                ("class_labels", self.is_class_conditional),
            )
            if takes
        ]

    @property
    def is_class_conditional(self) -> bool:
        return self.denoiser is not None and sampling.num_class_labels(self.denoiser.config) is not None

    @property
    def is_text_conditional(self) -> bool:
        return self.denoiser is not None and getattr(self.denoiser.config, "cross_attention_dim", None) is not None

    def default_guidance_scale(self, text: bool) -> float:
        """w when the call gives none: Diffusers' for the denoisers of its pipelines (7.5 for text as
        ``StableDiffusionPipeline``, 4.0 for a DiT transformer as ``DiTPipeline``), else the package's one default
        for its own class-conditional models, ``guidance.DEFAULT_GUIDANCE_SCALE`` (2.0)."""
        if text:
            return DIFFUSERS_GUIDANCE_SCALES["text"]
        if self.unet is None:
            return DIFFUSERS_GUIDANCE_SCALES["dit"]
        return DEFAULT_GUIDANCE_SCALE

    @property
    def guidance_scale(self) -> float:
        """w of the current (or last) call; Diffusers' CFG cutoff callbacks set it to 0."""
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether a step combines two predictions: w = 0 and w = 1 need only the unconditional or conditional one
        (for CFG++, whose λ = 1 is not the conditional model, only λ = 0 needs one)."""
        if self.guidance_embedded:
            return False
        if getattr(self, "_guidance_method", "cfg") == "cfg++":
            return self._guidance_scale != 0
        return self._guidance_scale not in (0, 1)

    @property
    def guidance_embedded(self) -> bool:
        """Whether the unet takes w as an input instead of being guided: a guidance-distilled unet (a Latent
        Consistency Model's, ``time_cond_proj_dim`` set) gets the embedding of w − 1 as ``timestep_cond`` and runs
        once a step on the conditions, as in ``StableDiffusionPipeline``."""
        return self.unet is not None and getattr(self.unet.config, "time_cond_proj_dim", None) is not None

    def cfg_plus_plus_eta(self, eta: float) -> float:
        """η of the DDIM form the scheduler steps: its own ``eta`` for DDIM, 1 for the ancestral step of
        ``HVAEScheduler`` and ``DDPMScheduler`` (the posterior mean is DDIM's η = 1 mean); CFG++'s equivalent weight
        (``guidance.cfg_plus_plus_scale``) depends on it."""
        from diffusers import DDIMScheduler, DDPMScheduler

        from ..scheduling_hvae import HVAEScheduler

        if isinstance(self.scheduler, DDIMScheduler):
            return eta
        if isinstance(self.scheduler, (HVAEScheduler, DDPMScheduler)):
            return 1.0
        raise ValueError(
            f"guidance_method='cfg++' needs a scheduler that steps DDIM's form (HVAEScheduler, DDPMScheduler, "
            f"DDIMScheduler), got {type(self.scheduler).__name__}"
        )

    def guided_prediction(self, method, kwargs, unconditional, conditional, model_input, step_index, alphas_cumprod):
        """(prediction, its type) of a guided step by ``method`` (``GUIDANCE_METHODS``), from the two predictions in
        the model's parameterization; ``kwargs`` holds the method's settings and, for APG, its running average."""
        prediction_type = self.model_prediction_type
        if method == "cfg":
            return classifier_free_guidance(unconditional, conditional, self.guidance_scale), prediction_type
        alphas_cumprod_t = alphas_cumprod[step_index]
        if method == "cfg++":
            prev_alphas_cumprod = alphas_cumprod[step_index + 1] if step_index + 1 < len(alphas_cumprod) else 1.0
            weight = cfg_plus_plus_scale(self.guidance_scale, alphas_cumprod_t, prev_alphas_cumprod, kwargs["eta"])
            return classifier_free_guidance(unconditional, conditional, weight), prediction_type
        # APG works on x̂_0 as its paper does, CFG-Zero* on ε (its zero is DDIM's probability flow at rest)
        to_type = "sample" if method == "apg" else "epsilon"
        unconditional, conditional = (
            convert_prediction(p, model_input, alphas_cumprod_t, prediction_type, to_type)
            for p in (unconditional, conditional)
        )
        if method == "apg":
            guided, kwargs["running_average"] = adaptive_projected_guidance(
                unconditional,
                conditional,
                self.guidance_scale,
                eta=kwargs.get("eta", 0.0),
                norm_threshold=kwargs.get("norm_threshold", 0.0),
                momentum=kwargs.get("momentum", 0.0),
                running_average=kwargs.get("running_average"),
            )
            return guided, to_type
        zero_init_steps = kwargs.get("zero_init_steps", 0)
        return cfg_zero_star_guidance(
            unconditional, conditional, self.guidance_scale, step_index, zero_init_steps
        ), to_type

    def guider_prediction(self, guider, step_index, num_steps, timestep, model_input, name, conditions):
        """(prediction, variance) of a Diffusers guider, called as Diffusers' modular denoise step calls it:
        ``set_state``, ``prepare_inputs`` of (y, ∅), one denoiser forward per batch it returns, ``guider(batches)``."""
        unconditional, conditional = conditions.chunk(2)
        guider.set_state(step=step_index, num_inference_steps=num_steps, timestep=timestep)
        batches = guider.prepare_inputs({name: (conditional, unconditional)})
        variance = None
        for batch in batches:
            guider.prepare_models(self.denoiser)
            output = self.run_denoiser(model_input, timestep, **{name: getattr(batch, name)})
            batch.noise_pred, batch_variance = split_learned_variance(output, model_input)
            # a learned variance is the conditional model's, as in Diffusers' DiTPipeline
            if variance is None or getattr(batch, guider._identifier_key) == "pred_cond":
                variance = batch_variance
            guider.cleanup_models(self.denoiser)
        return guider(batches).pred, variance

    # ------------------------------------------------------------------ conditions

    def class_conditions(self, class_labels, batch_size, num_images_per_prompt: int = 1):
        """(∅, y): label tensors for the denoiser from class labels it takes (``sampling.num_class_labels``) other
        than the null label, each label repeated ``num_images_per_prompt`` times."""
        if not self.is_class_conditional:
            raise ValueError(
                "class_labels were given but the denoiser is not class-conditional (its config has neither "
                "num_class_embeds nor a DiT's num_embeds_ada_norm)"
            )
        num_class_labels = sampling.num_class_labels(self.denoiser.config)
        labels = labels_tensor(class_labels, batch_size, num_class_labels, self._execution_device)
        null_label = self.config.null_class_label
        if bool((labels == null_label).any()):
            raise ValueError(f"class_labels must not contain the null label {null_label} (it means 'no condition')")
        labels = labels.repeat_interleave(num_images_per_prompt)
        return torch.full_like(labels, null_label), labels

    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ):
        """``StableDiffusionPipeline.encode_prompt``, the same arguments and the same embeddings: Diffusers' own
        method runs on this pipeline's ``tokenizer`` and ``text_encoder`` (the only parts it needs).

        Returns:
            ``(prompt_embeds, negative_prompt_embeds)``, each ``[B × num_images_per_prompt, L, dim]``; the negative
            ones (of ``negative_prompt``, by default the empty prompt) only with ``do_classifier_free_guidance``.
        """
        if self.text_encoder is None or self.tokenizer is None:
            if prompt_embeds is None:
                raise ValueError("prompt was given but the pipeline has no text_encoder and tokenizer")
            if do_classifier_free_guidance and negative_prompt_embeds is None:
                raise ValueError(
                    "guiding with prompt_embeds needs negative_prompt_embeds when the pipeline has no text_encoder and "
                    "tokenizer to encode the negative prompt"
                )
        from diffusers import StableDiffusionPipeline  # its module imports transformers, a text-only dependency

        prompt_embeds, negative_prompt_embeds = StableDiffusionPipeline.encode_prompt(
            self,
            prompt,
            device,
            num_images_per_prompt,
            do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        return prompt_embeds, negative_prompt_embeds

    def text_conditions(
        self,
        prompt,
        negative_prompt=None,
        batch_size=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        clip_skip: int | None = None,
    ):
        """(∅, y) for the unet: the embeddings of ``negative_prompt`` (default "") and of ``prompt``, or those given;
        ∅ is None without ``do_classifier_free_guidance`` (a call with w = 1 needs only y)."""
        if not self.is_text_conditional:
            raise ValueError("prompt was given but the unet takes no text (unet.config has no cross_attention_dim)")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass prompt or prompt_embeds, not both")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if batch_size is not None:
                if len(prompts) == 1:
                    prompts = prompts * batch_size
                elif len(prompts) != batch_size:
                    raise ValueError(f"prompt has {len(prompts)} prompts but batch_size is {batch_size}")
            if isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * len(prompts)
            if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) != len(prompts):
                raise ValueError(
                    f"negative_prompt must be a string or a list of {len(prompts)} strings, got {negative_prompt!r}"
                )
            prompt = prompts
        elif negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
        elif batch_size is not None and len(prompt_embeds) != batch_size:
            raise ValueError(f"prompt_embeds has {len(prompt_embeds)} prompts but batch_size is {batch_size}")
        conditional, unconditional = self.encode_prompt(
            prompt,
            self._execution_device,
            num_images_per_prompt,
            do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            clip_skip=clip_skip,
        )
        return unconditional, conditional

    def unconditional_and_conditional(
        self, model_input, timestep, name: str, conditions, guidance_batching: str, **denoiser_kwargs
    ):
        """The unet's outputs without and with the condition (``conditions`` is ∅ then y): one forward on the doubled
        batch ("batched"), two forwards ("separate"), or the faster of the two, timed once ("auto");
        ``denoiser_kwargs`` (``cross_attention_kwargs``) go to every forward."""

        def batched():
            doubled = torch.cat([model_input, model_input])
            return self.run_denoiser(doubled, timestep, **{name: conditions}, **denoiser_kwargs).chunk(2)

        def separate():
            return tuple(
                self.run_denoiser(model_input, timestep, **{name: condition}, **denoiser_kwargs)
                for condition in conditions.chunk(2)
            )

        if guidance_batching == "auto":
            guidance_batching = self.timed_guidance_batching(model_input, conditions, batched, separate)
        return batched() if guidance_batching == "batched" else separate()

    def timed_guidance_batching(self, model_input, conditions, batched, separate) -> str:
        """The faster of "batched" and "separate" for this denoiser, device, dtype and shapes, timed on first use and
        kept on the pipeline (``guidance_batching_choices``) until its denoiser is replaced."""
        choices = self.__dict__.get("_guidance_batching_choices")
        if choices is None or choices[0] is not self.denoiser:
            choices = self._guidance_batching_choices = (self.denoiser, {})
        key = (str(model_input.device), model_input.dtype, tuple(model_input.shape), tuple(conditions.shape))
        if key not in choices[1]:
            choices[1][key] = fastest({"batched": batched, "separate": separate}, model_input.device)
        return choices[1][key]

    @property
    def guidance_batching_choices(self) -> dict:
        """What ``guidance_batching="auto"`` chose on this pipeline: (device, dtype, sample shape, condition shape) →
        "batched" or "separate", for the current denoiser."""
        choices = self.__dict__.get("_guidance_batching_choices")
        return dict(choices[1]) if choices is not None and choices[0] is self.denoiser else {}

    # ------------------------------------------------------------------ sampling

    @exclusive_call
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = None,
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        class_labels: int | list[int] | torch.Tensor | None = None,
        batch_size: int | None = None,
        guidance_batching: str = "batched",
        guidance_interval: tuple[float, float] | None = None,
        guidance_method: str = "cfg",
        guidance_kwargs: dict | None = None,
        guider=None,
    ):
        """Draw ``num_images_per_prompt`` samples per prompt or class label with guidance weight w =
        ``guidance_scale``. The arguments are ``StableDiffusionPipeline``'s, then ``class_labels``
        (``DiTPipeline``'s) and this pipeline's own.

        Args:
            prompt (`str` or `list[str]`, *optional*): a prompt per sample (or one repeated ``batch_size`` times), for
                text-conditional models. Class labels given here (an int, a list of ints, a tensor), as one passes
                them first to ``DiTPipeline``, are read as ``class_labels``.
            height, width (`int`, *optional*): the size of the images in pixels, by default the denoiser's
                ``sample_size`` × ``vae_scale_factor``; the latents are ``vae_scale_factor`` times smaller.
            num_inference_steps (`int`): how many steps (50, as Diffusers' ``DiTPipeline`` and
                ``StableDiffusionPipeline``); ignored when ``timesteps`` or ``sigmas`` are given.
            timesteps, sigmas (`list`, *optional*): a custom schedule, for schedulers whose ``set_timesteps`` takes
                one (Diffusers' ``retrieve_timesteps``).
            guidance_scale (`float`, *optional*): w ≥ 0: 1 is the conditional model, 0 the unconditional one, > 1
                sharpens. By default Diffusers' for the components of its pipelines, 7.5 for text
                (``StableDiffusionPipeline``'s) and 4.0 for a DiT (``DiTPipeline``'s), and the package's
                ``guidance.DEFAULT_GUIDANCE_SCALE`` (2.0) for its own class-conditional models
                (``default_guidance_scale``).
            negative_prompt (`str` or `list[str]`, *optional*): what ∅ means for text (default the empty prompt), one
                or one per prompt.
            num_images_per_prompt (`int`): samples per prompt or class label.
            eta, generator, latents, output_type, return_dict: as for ``HVAEPipeline``.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): text embeddings to use instead of
                ``prompt`` and ``negative_prompt`` (as ``encode_prompt`` returns them).
            cross_attention_kwargs (`dict`, *optional*): passed to the unet's attention processors.
            guidance_rescale (`float`): φ in [0, 1] of Lin et al. 2023 (``guidance.rescale_guided_prediction``).
            clip_skip (`int`, *optional*): how many of the text encoder's last layers to skip (as in
                ``StableDiffusionPipeline``).
            callback_on_step_end, callback_on_step_end_tensor_inputs: as for ``HVAEPipeline``; the tensors may also
                be the denoiser's conditions, ``"prompt_embeds"`` (text) or ``"class_labels"`` (class labels): ∅
                then y while guiding, and a callback may return replacements (Diffusers' ``SDCFGCutoffCallback``
                does).
            class_labels (`int`, `list[int]` or `torch.Tensor`, *optional*): y per sample (or one int repeated
                ``batch_size`` times; nested lists are flattened, as ``DiTPipeline`` does), for class-conditional
                models.
            batch_size (`int`, *optional*): the number of labels or prompts, when one is repeated.
            guidance_batching (`str`): "batched" (the default, as in Diffusers: one denoiser forward on the doubled
                batch a step), "separate" (two forwards: half the activation memory) or "auto" (the faster of the
                two, timed once per pipeline, device, dtype and shape: opt-in, as a timed choice may differ between
                runs); the samples agree up to float rounding.
            guidance_interval (`tuple[float, float]`, *optional*): (t_lo, t_hi): guide only the steps with
                t_lo < t ≤ t_hi (Kynkäänniemi et al. 2024, ``guidance.in_guidance_interval``); the other steps run the
                conditional model alone, one forward (w = 1, as the paper does). ``None`` guides every step.
            guidance_method (`str`): how a guided step combines the two predictions: "cfg" (the default),
                "cfg++" (Chung et al. 2024; ``guidance_scale`` is λ in [0, 1], run as the CFG weight that gives the
                same DDIM step, ``guidance.cfg_plus_plus_scale``; exact without clipping), "apg" (Sadat et al. 2024,
                on x̂_0) or "cfg-zero*" (Fan et al. 2025, on ε).
            guidance_kwargs (`dict`, *optional*): the method's settings: for "apg" ``eta`` (default 0),
                ``norm_threshold`` (r, default 0: no rescaling) and ``momentum`` (β, default 0); for "cfg-zero*"
                ``zero_init_steps`` (default 0).
            guider (`diffusers.guiders.BaseGuidance`, *optional*): a Diffusers guider (``ClassifierFreeGuidance``,
                ``AdaptiveProjectedGuidance``, ``ClassifierFreeZeroStarGuidance``, ...) that combines the
                predictions instead, called as Diffusers' modular denoise step calls it, with its own scale and
                start/stop; ``guidance_scale``, ``guidance_interval`` and ``guidance_method`` are then not used.

        Examples:

        Returns:
            `ImagePipelineOutput` with ``images``, or a tuple ``(images,)``.
        """
        # 1. check inputs
        if self.denoiser is None:
            raise ValueError(
                "this pipeline has no denoiser (unet or transformer): it can encode prompts but not sample"
            )
        if class_labels is None and prompt is not None and not is_prompt(prompt):
            # class labels passed first, as DiTPipeline takes them
            class_labels, prompt = prompt, None
        text = prompt is not None or prompt_embeds is not None
        if (class_labels is None) == (not text):
            raise ValueError(
                "pass exactly one of class_labels (class-conditional denoiser) or prompt / prompt_embeds "
                "(text-conditional denoiser)"
            )
        if class_labels is not None and (negative_prompt is not None or negative_prompt_embeds is not None):
            raise ValueError("negative_prompt and negative_prompt_embeds are for prompts, not class_labels")
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale(text)
        check_guidance_scale(guidance_scale, "guidance_scale")
        if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float)):
            raise ValueError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
        if not 0 <= guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
        if guidance_batching not in GUIDANCE_BATCHING:
            raise ValueError(f"guidance_batching must be one of {GUIDANCE_BATCHING}, got {guidance_batching!r}")
        check_guidance_interval(guidance_interval, "guidance_interval")
        if guidance_method not in GUIDANCE_METHODS:
            raise ValueError(f"guidance_method must be one of {tuple(GUIDANCE_METHODS)}, got {guidance_method!r}")
        method_kwargs = dict(guidance_kwargs or {})
        unknown = set(method_kwargs) - set(GUIDANCE_METHODS[guidance_method])
        if unknown:
            raise ValueError(
                f"guidance_kwargs {sorted(unknown)} are not settings of guidance_method={guidance_method!r} "
                f"(it takes {GUIDANCE_METHODS[guidance_method] or 'none'})"
            )
        if guidance_method == "cfg++" and guidance_scale > 1:
            raise ValueError(f"guidance_method='cfg++' takes guidance_scale = λ in [0, 1], got {guidance_scale}")
        if guider is not None:
            from diffusers.guiders import BaseGuidance

            if not isinstance(guider, BaseGuidance):
                raise TypeError(f"guider must be a diffusers.guiders.BaseGuidance, got {type(guider).__name__}")
            if guidance_interval is not None or guidance_method != "cfg":
                raise ValueError(
                    "guider combines the predictions itself: give its start/stop to the guider, and leave "
                    "guidance_interval and guidance_method unset"
                )
        if batch_size is not None:
            check_batch_size(batch_size)
        check_batch_size(num_images_per_prompt, "num_images_per_prompt")
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass timesteps or sigmas, not both")
        if timesteps is not None or sigmas is not None:
            num_inference_steps = None
        if cross_attention_kwargs is not None and not isinstance(cross_attention_kwargs, dict):
            raise ValueError(f"cross_attention_kwargs must be a dict, got {cross_attention_kwargs!r}")
        tensor_inputs = self.callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        condition_input = "class_labels" if class_labels is not None else "prompt_embeds"
        other_input = "prompt_embeds" if class_labels is not None else "class_labels"
        if other_input in tensor_inputs:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs names {other_input!r}, but the pipeline is called with "
                f"{'class_labels' if class_labels is not None else 'prompt'}; its conditions are {condition_input!r}"
            )
        output_type = output_type or self.default_output_type
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._guidance_method = guidance_method
        self._interrupt = False
        device = self._execution_device
        if guidance_method == "cfg++":
            method_kwargs["eta"] = self.cfg_plus_plus_eta(eta)

        # 2. encode the conditions: ∅ then y while guiding, else the one half a step needs
        if class_labels is not None:
            unconditional, conditional = self.class_conditions(class_labels, batch_size, num_images_per_prompt)
        else:
            unconditional, conditional = self.text_conditions(
                prompt,
                negative_prompt,
                batch_size,
                prompt_embeds,
                negative_prompt_embeds,
                num_images_per_prompt,
                do_classifier_free_guidance=(guidance_scale != 1 and not self.guidance_embedded) or guider is not None,
                clip_skip=clip_skip,
            )
        shape = self.check_inputs(
            len(conditional),
            num_inference_steps,
            generator,
            latents,
            output_type,
            callback_on_step_end,
            tensor_inputs,
            height=height,
            width=width,
        )
        if self.do_classifier_free_guidance or guider is not None:
            conditions = torch.cat([unconditional, conditional])
        else:
            conditions = conditional if guidance_scale == 1 or self.guidance_embedded else unconditional
        name = "class_labels" if class_labels is not None else "encoder_hidden_states"
        denoiser_kwargs = {} if cross_attention_kwargs is None else {"cross_attention_kwargs": cross_attention_kwargs}
        if self.guidance_embedded:
            from diffusers import StableDiffusionPipeline  # its module imports transformers, a text-only dependency

            w = torch.tensor(guidance_scale - 1).repeat(len(conditional))
            embedding = StableDiffusionPipeline.get_guidance_scale_embedding(
                self, w, embedding_dim=self.unet.config.time_cond_proj_dim
            )
            denoiser_kwargs["timestep_cond"] = embedding.to(device=device, dtype=self.denoiser.dtype)

        # 3. timesteps, before the latents: init_noise_sigma may depend on them
        timesteps, alphas_cumprod = self.set_timesteps(num_inference_steps, device, timesteps=timesteps, sigmas=sigmas)
        num_inference_steps = num_inference_steps or len(timesteps)

        # 4. x_T
        latents = self.prepare_latents(shape, generator, latents, device, self.denoiser.dtype)

        # 5. the reverse chain
        step_kwargs = self.step_kwargs(generator=generator, eta=eta)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_input = self.scheduler.scale_model_input(latents, t)
                prediction_type = self.model_prediction_type
                if guider is not None:
                    prediction, variance = self.guider_prediction(
                        guider, i, len(timesteps), t, model_input, name, conditions
                    )
                elif self.do_classifier_free_guidance and in_guidance_interval(t, guidance_interval):
                    unconditional_output, conditional_output = self.unconditional_and_conditional(
                        model_input, t, name, conditions, guidance_batching, **denoiser_kwargs
                    )
                    unconditional_prediction, _ = split_learned_variance(unconditional_output, model_input)
                    conditional_prediction, variance = split_learned_variance(conditional_output, model_input)
                    prediction, prediction_type = self.guided_prediction(
                        guidance_method,
                        method_kwargs,
                        unconditional_prediction,
                        conditional_prediction,
                        model_input,
                        i,
                        alphas_cumprod,
                    )
                    if self.guidance_rescale > 0:
                        conditional_prediction = convert_prediction(
                            conditional_prediction,
                            model_input,
                            alphas_cumprod[i],
                            self.model_prediction_type,
                            prediction_type,
                        )
                        prediction = rescale_guided_prediction(
                            prediction, conditional_prediction, self.guidance_rescale
                        )
                else:
                    # outside the interval: the conditional model alone (the y half of the conditions)
                    step_conditions = conditions.chunk(2)[1] if self.do_classifier_free_guidance else conditions
                    output = self.run_denoiser(model_input, t, **{name: step_conditions}, **denoiser_kwargs)
                    prediction, variance = split_learned_variance(output, model_input)
                latents, original_sample = self.scheduler_step(
                    prediction,
                    prediction_type,
                    variance,
                    model_input,
                    latents,
                    t,
                    alphas_cumprod[i],
                    step_kwargs,
                )
                tensors = self.step_end(
                    i,
                    t,
                    latents,
                    original_sample,
                    callback_on_step_end,
                    tensor_inputs,
                    progress_bar,
                    **{condition_input: conditions},
                )
                latents, conditions = tensors["latents"], tensors[condition_input]

        # 6. outputs
        return self.finish(latents, output_type, return_dict)
