"""ClassifierGuidedPipeline: sampling p(x | y) with the guided score ∇log p(x_t) + γ ∇log p(y | x_t)."""

import torch
from diffusers.utils import replace_example_docstring

from ..guidance import (
    DEFAULT_GUIDANCE_SCALE,
    GUIDANCE_FORMS,
    check_guidance_interval,
    check_guidance_scale,
    classifier_guided_score,
    classifier_log_prob_gradient,
    denoised_classifier_log_prob_gradient,
    in_guidance_interval,
    mean_guided_original_sample,
)
from ..parameterization import convert_prediction, split_learned_variance
from .sampling import HVAESamplingPipeline, exclusive_call, labels_tensor, unclipped_scheduler

CLASSIFIER_INPUTS = ("noisy", "denoised")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from hvae_diffusion import ClassifierGuidedPipeline, HVAEScheduler
        >>> from hvae_diffusion.testing import ExactMixtureClassifier, ExactMixtureDenoiser

        >>> scheduler = HVAEScheduler(clip_sample=False)
        >>> means, alphas_cumprod = [[-1.0, 0.0], [1.0, 0.0]], scheduler.alphas_cumprod.tolist()
        >>> unet = ExactMixtureDenoiser(means, 0.3, alphas_cumprod=alphas_cumprod, in_channels=2)
        >>> classifier = ExactMixtureClassifier(means, 0.3, alphas_cumprod=alphas_cumprod)
        >>> pipe = ClassifierGuidedPipeline(unet, scheduler, classifier)
        >>> samples = pipe(class_labels=[1, 1], guidance_scale=2.0, num_inference_steps=20).images
        ```
"""


def classifier_num_classes(classifier) -> int | None:
    """The classifier's declared class count: ``.num_classes``, ``.config.num_classes`` or ``.config.num_labels``."""
    for owner, name in (
        (classifier, "num_classes"),
        (getattr(classifier, "config", None), "num_classes"),
        (getattr(classifier, "config", None), "num_labels"),
    ):
        value = getattr(owner, name, None) if owner is not None else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class ClassifierGuidedPipeline(HVAESamplingPipeline):
    """Classifier guidance (Dhariwal & Nichol 2021) as the theory writes it, on the score, after clipping.

    At every step the model's x̂_0 is clipped (if the scheduler's config asks), the classifier's ∇log p(y | x_t) (by
    autograd) is added with weight γ = ``guidance_scale`` to the score made from it, and the guided prediction,
    converted to the parameterization the scheduler steps, is stepped without clipping again (docs/theory.md):
    γ = 1 samples p(x | y) when model and classifier are exact, γ > 1 sharpens p(y | x).

    Args:
        unet: the denoiser, as for ``HVAEPipeline``. A class-conditional one (``num_class_embeds``, trained with label
            dropout) is called with its null label (``sampling.null_class_label``): ε(x_t, ∅).
        scheduler: ``HVAEScheduler`` or a Diffusers scheduler.
        classifier: declares its class count (``.num_classes``, ``.config.num_classes`` or ``.config.num_labels``)
            and returns logits or an object with ``.logits``. With ``classifier_input="noisy"`` it is a noisy classifier
            called ``classifier(x_t, t)`` (``NoisyClassifier``, ``ExactMixtureClassifier``); with ``"denoised"`` it
            classifies clean data, is called ``classifier(x̂_0)`` on the Tweedie estimate x̂_0 = E[x_0 | x_t] after
            clipping (for example a transformers image classifier), and the gradient flows through the denoiser.
        classifier_input: ``"noisy"`` or ``"denoised"``; saved in the pipeline config.
        prediction_type: the model's parameterization when it differs from the scheduler's (see ``HVAEPipeline``).
        vae: for a latent model (see ``HVAEPipeline``); a "denoised" classifier then sees the decoded x̂_0, and its
            gradient flows back through the decoder, so any pixel classifier steers a latent model (the decoder's
            activations can be recomputed instead of stored: ``pipe.vae.enable_gradient_checkpointing()``, see
            docs/pipelines.md).
        transformer: the denoiser instead of ``unet`` (see ``HVAEPipeline``).
        noise_schedule: the learned noise schedule the model was trained with (see ``HVAEPipeline``).
    """

    model_cpu_offload_seq = "unet->transformer->classifier->vae"

    def __init__(
        self,
        unet,
        scheduler,
        classifier,
        classifier_input: str = "noisy",
        prediction_type: str | None = None,
        vae=None,
        transformer=None,
        noise_schedule=None,
    ):
        super().__init__()
        if classifier_input not in CLASSIFIER_INPUTS:
            raise ValueError(f"classifier_input must be one of {CLASSIFIER_INPUTS}, got {classifier_input!r}")
        if classifier_num_classes(classifier) is None:
            raise ValueError(
                "classifier must declare its number of classes as .num_classes, .config.num_classes or "
                ".config.num_labels"
            )
        self.check_components(unet, transformer, vae)
        self.register_modules(
            unet=unet,
            transformer=transformer,
            scheduler=scheduler,
            classifier=classifier,
            vae=vae,
            noise_schedule=noise_schedule,
        )
        self.register_to_config(classifier_input=classifier_input, prediction_type=prediction_type)
        self.note_optional_components()

    @property
    def num_classes(self) -> int:
        return classifier_num_classes(self.classifier)

    @property
    def guidance_scale(self) -> float:
        """γ of the current (or last) call."""
        return self._guidance_scale

    def denoised_gradient(self, model_input, timestep, alphas_cumprod_t, labels, denoiser_kwargs):
        """(∇_{x_t} log p(y | x̂_0(x_t)), clipped x̂_0, variance channels): the clean-data classifier on the clipped
        Tweedie estimate; clipped elements of x̂_0 pass no gradient (``sampling.clip_original_sample``)."""
        variances = []

        def predict_original_sample(sample):
            prediction, variance = split_learned_variance(
                self.run_denoiser(sample, timestep, **denoiser_kwargs), sample
            )
            variances.append(None if variance is None else variance.detach())
            prediction, prediction_type = self.clip_prediction(
                prediction, self.model_prediction_type, sample, alphas_cumprod_t
            )
            return convert_prediction(prediction, sample, alphas_cumprod_t, prediction_type, "sample")

        classifier = self.classifier
        if self.vae is not None:

            def classifier(original_sample):
                return self.classifier(self.decode_latents(original_sample))

        gradient, original_sample = denoised_classifier_log_prob_gradient(
            classifier, predict_original_sample, model_input, labels, self.num_classes
        )
        return gradient, original_sample, variances[0]

    def guide(self, prediction, prediction_type, gradient, model_input, alphas_cumprod, step_index, guidance_form):
        """(guided prediction, its type) in ``guidance_form``: the score, or the mean of the step (``guidance``)."""
        alphas_cumprod_t = alphas_cumprod[step_index]
        if guidance_form == "score":
            score = convert_prediction(prediction, model_input, alphas_cumprod_t, prediction_type, "score")
            return classifier_guided_score(score, gradient, self.guidance_scale), "score"
        original_sample = convert_prediction(prediction, model_input, alphas_cumprod_t, prediction_type, "sample")
        prev_alphas_cumprod = alphas_cumprod[step_index + 1] if step_index + 1 < len(alphas_cumprod) else 1.0
        guided = mean_guided_original_sample(
            original_sample, gradient, self.guidance_scale, alphas_cumprod_t, prev_alphas_cumprod
        )
        return guided, "sample"

    @exclusive_call
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor,
        batch_size: int | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        guidance_form: str = "score",
        guidance_interval: tuple[float, float] | None = None,
        num_inference_steps: int = 1000,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str | None = None,
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """Draw one sample per class label from p_γ(x | y) ∝ p(x) p(y | x)^γ.

        Args:
            class_labels (`int`, `list[int]` or `torch.Tensor`): y per sample (a sequence, or one int repeated
                ``batch_size`` times), in [0, num_classes).
            batch_size (`int`, *optional*): the number of samples; with a sequence of labels it must equal their count.
            guidance_scale (`float`): γ ≥ 0 (0 is unconditional sampling, 1 the exact conditional; by default the
                package's ``guidance.DEFAULT_GUIDANCE_SCALE``, 2.0, which sharpens p(y | x) as learned models need).
            guidance_form (`str`): "score" (the default: ε̃ = ε − √(1 − ᾱ_t) γ ∇log p(y | x_t)) or "mean"
                (guided-diffusion's μ + γ Σ ∇log p(y | x_t)); see docs/theory.md.
            guidance_interval (`tuple[float, float]`, *optional*): (t_lo, t_hi): guide only the steps with
                t_lo < t ≤ t_hi (Kynkäänniemi et al. 2024, ``guidance.in_guidance_interval``); the other steps make no
                classifier pass and step the unguided prediction. ``None`` guides every step.
            num_inference_steps, generator, latents, eta, output_type, return_dict, callback_on_step_end,
            callback_on_step_end_tensor_inputs: as for ``HVAEPipeline``.

        Examples:

        Returns:
            `ImagePipelineOutput` with ``images``, or a tuple ``(images,)``.
        """
        # 1. check inputs
        check_guidance_scale(guidance_scale, "guidance_scale")
        if guidance_form not in GUIDANCE_FORMS:
            raise ValueError(f"guidance_form must be one of {GUIDANCE_FORMS}, got {guidance_form!r}")
        check_guidance_interval(guidance_interval, "guidance_interval")
        device = self._execution_device
        labels = labels_tensor(class_labels, batch_size, self.num_classes, device)
        output_type = output_type or self.default_output_type
        tensor_inputs = self.callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        shape = self.check_inputs(
            len(labels), num_inference_steps, generator, latents, output_type, callback_on_step_end, tensor_inputs
        )
        self._guidance_scale = guidance_scale
        self._interrupt = False

        # 2. the condition of the denoiser: none, ∅ for a class-conditional one
        denoiser_kwargs = self.unconditional_kwargs(len(labels))

        # 3. timesteps, before the latents: init_noise_sigma may depend on them. The pipeline clips x̂_0 before
        # guiding it, and steps a scheduler that does not clip the guided x̂_0 again.
        stepping_scheduler = unclipped_scheduler(self.scheduler)
        timesteps, alphas_cumprod = self.set_timesteps(num_inference_steps, device, stepping_scheduler)

        # 4. x_T
        latents = self.prepare_latents(shape, generator, latents, device, self.denoiser.dtype)

        # 5. the reverse chain: clip x̂_0, then guide
        step_kwargs = self.step_kwargs(stepping_scheduler, generator=generator, eta=eta)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_input = self.scheduler.scale_model_input(latents, t)
                guided = self.guidance_scale > 0 and in_guidance_interval(t, guidance_interval)
                if guided and self.config.classifier_input == "denoised":
                    gradient, prediction, variance = self.denoised_gradient(
                        model_input, t, alphas_cumprod[i], labels, denoiser_kwargs
                    )
                    prediction_type = "sample"
                else:
                    output = self.run_denoiser(model_input, t, **denoiser_kwargs)
                    prediction, variance = split_learned_variance(output, model_input)
                    prediction, prediction_type = self.clip_prediction(
                        prediction, self.model_prediction_type, model_input, alphas_cumprod[i]
                    )
                    gradient = None
                    if guided:
                        gradient = classifier_log_prob_gradient(
                            self.classifier, model_input, t, labels, self.num_classes
                        )
                if gradient is not None:
                    prediction, prediction_type = self.guide(
                        prediction, prediction_type, gradient, model_input, alphas_cumprod, i, guidance_form
                    )
                latents, original_sample = self.scheduler_step(
                    prediction,
                    prediction_type,
                    variance,
                    model_input,
                    latents,
                    t,
                    alphas_cumprod[i],
                    step_kwargs,
                    scheduler=stepping_scheduler,
                )
                latents = self.step_end(
                    i, t, latents, original_sample, callback_on_step_end, tensor_inputs, progress_bar
                )["latents"]

        # 6. outputs
        return self.finish(latents, output_type, return_dict)
