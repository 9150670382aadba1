"""Classifier guidance as a guider in Diffusers' own guider API (``diffusers.guiders.BaseGuidance``).

Diffusers' guiders (classifier-free guidance and its variants) combine the predictions of several forward passes
of the denoiser; none takes the gradient of a classifier. ``ClassifierGuidance`` does, so that a Diffusers user's
own loop, written as Diffusers' modular denoise step is (``set_state``, ``prepare_inputs``, one forward per batch,
``guider(batches)``), gets the classifier guidance of ``ClassifierGuidedPipeline``: the same images from the same
seed (tests/test_guiders.py). The math is ``hvae_diffusion.guidance``'s; this class only adapts it.

Diffusers has had ``diffusers.guiders`` since 0.35; ``setup.cfg`` asks for diffusers >= 0.38, whose guider API is
the one used here.
"""

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import BaseGuidance
from diffusers.guiders.guider_utils import GuiderOutput

from .guidance import (
    GUIDANCE_FORMS,
    check_guidance_scale,
    classifier_guided_score,
    classifier_log_prob_gradient,
    mean_guided_original_sample,
)
from .parameterization import check_prediction_type, convert_prediction


class ClassifierGuidance(BaseGuidance):
    """Classifier guidance (Dhariwal & Nichol 2021) as a Diffusers guider: one unconditional forward per step, then
    ε̃ = ε − √(1 − ᾱ_t) γ ∇log p(y | x_t) (``guidance_form="score"``) or guided-diffusion's μ + γ Σ ∇log p(y | x_t)
    (``"mean"``), after clipping x̂_0 (docs/theory.md, "Guidance and clipping").

    The scheduler must not clip (``clip_sample=False``, no thresholding): the guider clips x̂_0 itself, before it
    guides (``clip_sample``), and a guided x̂_0 must not be clipped again. Between ``start`` and ``stop`` (fractions
    of the steps, as for Diffusers' guiders) the classifier's gradient is taken; outside, no classifier pass is made
    and the prediction is the denoiser's (clipped) one.

    Example, a loop written as Diffusers' modular denoise step::

        guider = ClassifierGuidance(classifier=classifier, scheduler=scheduler, guidance_scale=2.0, clip_sample=True)
        scheduler.set_timesteps(100)
        for i, t in enumerate(scheduler.timesteps):
            guider.set_state(step=i, num_inference_steps=100, timestep=t)
            batches = guider.prepare_inputs({"sample": latents, "class_labels": labels})
            for batch in batches:
                guider.prepare_models(unet)
                batch.noise_pred = unet(latents, t).sample
                guider.cleanup_models(unet)
            latents = scheduler.step(guider(batches).pred, t, latents).prev_sample

    Every argument is a keyword (Diffusers' ``register_to_config`` would file a positional classifier or scheduler
    under the wrong config name, as it skips the ``ignore_for_config`` names when it matches positions).

    Args:
        classifier: a noisy classifier, ``classifier(x_t, t)`` returning logits or an object with ``.logits``
            (``NoisyClassifier``); not part of the saved config.
        scheduler: the scheduler whose ``alphas_cumprod`` and ``timesteps`` the loop steps (after ``set_timesteps``);
            not part of the saved config.
        guidance_scale: γ ≥ 0; 1 samples p(x | y) with an exact classifier.
        guidance_form: "score" or "mean".
        prediction_type: what the denoiser predicts and the scheduler steps ("epsilon", "sample", "v_prediction").
        clip_sample, clip_sample_range: clip x̂_0 to [−r, r] before guiding.
        start, stop, enabled: as for Diffusers' guiders.
    """

    _input_predictions = ["pred_uncond"]
    ignore_for_config = ["classifier", "scheduler"]

    @register_to_config
    def __init__(
        self,
        *,
        classifier=None,
        scheduler=None,
        guidance_scale: float = 1.0,
        guidance_form: str = "score",
        prediction_type: str = "epsilon",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        super().__init__(start, stop, enabled)
        check_guidance_scale(guidance_scale, "guidance_scale")
        if guidance_form not in GUIDANCE_FORMS:
            raise ValueError(f"guidance_form must be one of {GUIDANCE_FORMS}, got {guidance_form!r}")
        check_prediction_type(prediction_type, "prediction_type")
        if prediction_type == "score":
            raise ValueError("prediction_type='score' cannot be stepped by Diffusers' schedulers: use 'epsilon'")
        if scheduler is not None:
            for option in ("clip_sample", "thresholding"):
                if getattr(scheduler.config, option, False):
                    raise ValueError(
                        f"the scheduler has {option}=True: build it with {option}=False; the guider clips x̂_0 "
                        "before guiding (clip_sample=True here), and the guided x̂_0 must not be clipped again"
                    )
        self.classifier = classifier
        self.scheduler = scheduler
        self.guidance_scale = guidance_scale
        self.guidance_form = guidance_form
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range

    def prepare_inputs(self, data: dict) -> list:
        """One batch (the unconditional forward) holding ``data``'s tensors: ``sample`` (x_t) and ``class_labels``
        (y) are needed by ``__call__``."""
        missing = [name for name in ("sample", "class_labels") if name not in data]
        if missing:
            raise ValueError(f"ClassifierGuidance.prepare_inputs needs {missing} in its data (x_t and y)")
        return [self._prepare_batch(data, 0, self._input_predictions[0])]

    def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
        return [self._prepare_batch_from_block_state(input_fields, data, 0, self._input_predictions[0])]

    def __call__(self, data: list) -> GuiderOutput:
        if len(data) != 1 or not hasattr(data[0], "noise_pred"):
            raise ValueError("ClassifierGuidance expects the one batch of prepare_inputs, with its noise_pred set")
        batch = data[0]
        return self.forward(batch.noise_pred, batch.sample, batch.class_labels)

    def _alphas_cumprod(self) -> tuple[float, float]:
        """(ᾱ_t, ᾱ_{t'}) of the current step: ᾱ of the scheduler's next timestep, 1 after the last."""
        from .pipelines.sampling import chain_alphas_cumprod

        timesteps = self.scheduler.timesteps
        alphas_cumprod = chain_alphas_cumprod(self.scheduler, timesteps)
        step = self._step
        return alphas_cumprod[step], alphas_cumprod[step + 1] if step + 1 < len(alphas_cumprod) else 1.0

    def forward(self, pred_uncond: torch.Tensor, sample: torch.Tensor, class_labels) -> GuiderOutput:
        """The guided prediction in ``prediction_type``, from the denoiser's ``pred_uncond`` at x_t = ``sample``."""
        if self.scheduler is None or self._step is None:
            raise ValueError("ClassifierGuidance needs its scheduler and set_state(...) before it is called")
        alphas_cumprod_t, prev_alphas_cumprod = self._alphas_cumprod()
        prediction, prediction_type = pred_uncond, self.prediction_type
        if self.clip_sample:
            original_sample = convert_prediction(prediction, sample, alphas_cumprod_t, prediction_type, "sample")
            prediction, prediction_type = (
                original_sample.clamp(-self.clip_sample_range, self.clip_sample_range),
                "sample",
            )
        if self._is_guidance_enabled():
            if self.classifier is None:
                raise ValueError("ClassifierGuidance needs its classifier to guide")
            labels = torch.as_tensor(class_labels, device=sample.device).reshape(-1).expand(sample.shape[0])
            num_classes = getattr(self.classifier, "num_classes", None)
            gradient = classifier_log_prob_gradient(self.classifier, sample, self._timestep, labels, num_classes)
            if self.guidance_form == "score":
                score = convert_prediction(prediction, sample, alphas_cumprod_t, prediction_type, "score")
                prediction = classifier_guided_score(score, gradient, self.guidance_scale)
                prediction_type = "score"
            else:
                original_sample = convert_prediction(prediction, sample, alphas_cumprod_t, prediction_type, "sample")
                prediction = mean_guided_original_sample(
                    original_sample, gradient, self.guidance_scale, alphas_cumprod_t, prev_alphas_cumprod
                )
                prediction_type = "sample"
        pred = convert_prediction(prediction, sample, alphas_cumprod_t, prediction_type, self.prediction_type)
        return GuiderOutput(pred=pred, pred_cond=None, pred_uncond=pred_uncond)

    def _is_guidance_enabled(self) -> bool:
        if not self._enabled or self.guidance_scale == 0:
            return False
        if self._num_inference_steps is None:
            return True
        return int(self._start * self._num_inference_steps) <= self._step < int(self._stop * self._num_inference_steps)

    @property
    def is_conditional(self) -> bool:
        return False

    @property
    def num_conditions(self) -> int:
        return 1
