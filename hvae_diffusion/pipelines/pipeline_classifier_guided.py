"""ClassifierGuidedPipeline: sampling p(x | y) with the guided score ∇log p(x_t) + γ ∇log p(y | x_t)."""

import torch

from ..guidance import (
    check_guidance_scale,
    classifier_guided_score,
    classifier_log_prob_gradient,
    denoised_classifier_log_prob_gradient,
)
from .sampling import HVAESamplingPipeline, SamplingChain, labels_tensor, model_output_of

CLASSIFIER_INPUTS = ("noisy", "denoised")


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
    """Classifier guidance (Dhariwal & Nichol 2021) as the theory writes it, on the score.

    At every step the model output is converted to the score ∇log p(x_t), the classifier's ∇log p(y | x_t) (by
    autograd) is added with weight γ = ``classifier_scale``, and the guided score, converted to the parameterization
    the scheduler steps in, is handed to the scheduler: γ = 1 samples p(x | y) when model and classifier are exact,
    γ > 1 sharpens p(y | x).

    Args:
        unet: the (unconditional) denoiser, as for ``HVAEPipeline``.
        scheduler: ``HVAEScheduler`` or a Diffusers scheduler.
        classifier: declares its class count (``.num_classes``, ``.config.num_classes`` or ``.config.num_labels``)
            and returns logits or an object with ``.logits``. With ``classifier_input="noisy"`` it is a noisy classifier
            called ``classifier(x_t, t)`` (``NoisyClassifier``, ``ExactMixtureClassifier``); with ``"denoised"`` it
            classifies clean data, is called ``classifier(x̂_0)`` on the Tweedie estimate x̂_0 = E[x_0 | x_t] (for
            example a transformers image classifier), and the gradient flows through the denoiser.
        classifier_input: ``"noisy"`` or ``"denoised"``; saved in the pipeline config.
    """

    model_cpu_offload_seq = "unet->classifier"

    def __init__(self, unet, scheduler, classifier, classifier_input: str = "noisy"):
        super().__init__()
        if classifier_input not in CLASSIFIER_INPUTS:
            raise ValueError(f"classifier_input must be one of {CLASSIFIER_INPUTS}, got {classifier_input!r}")
        if classifier_num_classes(classifier) is None:
            raise ValueError(
                "classifier must declare its number of classes as .num_classes, .config.num_classes or "
                ".config.num_labels"
            )
        self.register_modules(unet=unet, scheduler=scheduler, classifier=classifier)
        self.register_to_config(classifier_input=classifier_input)

    @property
    def num_classes(self) -> int:
        return classifier_num_classes(self.classifier)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor,
        batch_size: int | None = None,
        classifier_scale: float = 1.0,
        num_inference_steps: int = 1000,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str | None = None,
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """Draw one sample per class label from p_γ(x | y) ∝ p(x) p(y | x)^γ.

        Args:
            class_labels: y per sample (a sequence, or one int repeated ``batch_size`` times), in [0, num_classes).
            batch_size: the number of samples; with a sequence of labels it must equal their count if given.
            classifier_scale: γ ≥ 0 (0 is unconditional sampling, 1 the exact conditional).
            num_inference_steps, generator, latents, output_type, return_dict, callback_on_step_end,
            callback_on_step_end_tensor_inputs: as for ``HVAEPipeline``.
        """
        check_guidance_scale(classifier_scale, "classifier_scale")
        labels = labels_tensor(class_labels, batch_size, self.num_classes, self._execution_device)
        output_type = output_type or ("latent" if self.is_vector_model else "pil")
        tensor_inputs = self.callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        shape = self.check_sampling_inputs(
            len(labels), num_inference_steps, generator, latents, output_type, callback_on_step_end, tensor_inputs
        )
        latents = self.prepare_latents(shape, generator, latents, self._execution_device, self.unet.dtype)
        num_classes = self.num_classes

        def predict(model_input, timestep, step_index: int, chain: SamplingChain):
            if classifier_scale == 0:
                prediction, variance = chain.split(model_output_of(self.unet(model_input, timestep)), model_input)
                return chain.for_step(prediction, model_input, step_index, variance=variance)
            if self.config.classifier_input == "noisy":
                prediction, variance = chain.split(model_output_of(self.unet(model_input, timestep)), model_input)
                score = chain.convert(prediction, model_input, step_index, chain.model_prediction_type, "score")
                gradient = classifier_log_prob_gradient(self.classifier, model_input, timestep, labels, num_classes)
            else:
                variances = []

                def predict_original_sample(sample):
                    prediction, variance = chain.split(model_output_of(self.unet(sample, timestep)), sample)
                    variances.append(variance)
                    return chain.convert(prediction, sample, step_index, chain.model_prediction_type, "sample")

                gradient, predicted_original_sample = denoised_classifier_log_prob_gradient(
                    self.classifier, predict_original_sample, model_input, labels, num_classes
                )
                variance = None if variances[0] is None else variances[0].detach()
                score = chain.convert(predicted_original_sample, model_input, step_index, "sample", "score")
            guided_score = classifier_guided_score(score, gradient, classifier_scale)
            return chain.for_step(guided_score, model_input, step_index, from_type="score", variance=variance)

        sample = self.denoise(latents, num_inference_steps, predict, generator, callback_on_step_end, tensor_inputs)
        return self.finish(sample, output_type, return_dict)
