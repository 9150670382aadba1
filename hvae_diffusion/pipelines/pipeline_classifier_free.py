"""ClassifierFreeGuidancePipeline: ε̃ = ε(x_t, ∅) + w (ε(x_t, y) − ε(x_t, ∅)) with class labels or text prompts."""

import torch

from ..guidance import check_guidance_scale, classifier_free_guidance
from .sampling import HVAESamplingPipeline, SamplingChain, check_batch_size, labels_tensor, model_output_of

# How the unconditional and conditional halves run: "batched", one UNet forward on the doubled batch (the default:
# measured faster than two forwards on a 2-core CPU, see docs/benchmarks.md, and the usual winner on GPUs), or
# "separate", two forwards of the batch (half the peak activation memory).
GUIDANCE_BATCHING = ("batched", "separate")


class ClassifierFreeGuidancePipeline(HVAESamplingPipeline):
    """Classifier-free guidance (Ho & Salimans 2022) with a model trained both with and without its condition.

    Conditions are either class labels, for a ``UNet2DModel`` with ``num_class_embeds`` (the null label ∅ is
    ``null_class_label``, by default the last embedding, ``num_class_embeds − 1``, and is saved in the pipeline
    config), or text prompts, for a ``UNet2DConditionModel`` with a transformers ``text_encoder`` and ``tokenizer``
    (∅ is the empty prompt, or ``negative_prompt``). The guided prediction is formed in the model's parameterization
    (the same combination in every one, see ``guidance.classifier_free_guidance``) and converted for the scheduler.
    The unconditional and conditional halves run as one forward on the doubled batch, or as two forwards with
    ``guidance_batching="separate"`` (``predict_unconditional_and_conditional``).

    Args:
        unet: a class-conditional ``UNet2DModel`` (or any model taking ``class_labels``) or a ``UNet2DConditionModel``.
        scheduler: ``HVAEScheduler`` or a Diffusers scheduler.
        text_encoder, tokenizer: for text prompts (e.g. ``CLIPTextModel`` and ``CLIPTokenizer``).
        null_class_label: the label that means ∅ for class-conditional models.
    """

    _optional_components = ["text_encoder", "tokenizer"]
    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, scheduler, text_encoder=None, tokenizer=None, null_class_label: int | None = None):
        super().__init__()
        num_class_embeds = getattr(unet.config, "num_class_embeds", None)
        if null_class_label is None and num_class_embeds is not None:
            null_class_label = num_class_embeds - 1
        if null_class_label is not None and not (num_class_embeds and 0 <= null_class_label < num_class_embeds):
            raise ValueError(
                f"null_class_label={null_class_label} must lie in [0, unet.config.num_class_embeds={num_class_embeds})"
            )
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(null_class_label=null_class_label)

    @property
    def is_class_conditional(self) -> bool:
        return getattr(self.unet.config, "num_class_embeds", None) is not None

    @property
    def is_text_conditional(self) -> bool:
        return getattr(self.unet.config, "cross_attention_dim", None) is not None

    # ------------------------------------------------------------------ conditions

    def class_conditions(self, class_labels, batch_size):
        """(∅ kwargs, y kwargs) for the UNet from class labels in [0, num_class_embeds) other than the null label."""
        if not self.is_class_conditional:
            raise ValueError(
                "class_labels were given but the unet is not class-conditional (unet.config.num_class_embeds is None)"
            )
        device = self._execution_device
        labels = labels_tensor(class_labels, batch_size, self.unet.config.num_class_embeds, device)
        null_label = self.config.null_class_label
        if bool((labels == null_label).any()):
            raise ValueError(f"class_labels must not contain the null label {null_label} (it means 'no condition')")
        return {"class_labels": torch.full_like(labels, null_label)}, {"class_labels": labels}

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """The text encoder's last hidden states ``[B, L, dim]`` for prompts padded to the tokenizer's max length."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        hidden_states = self.text_encoder(tokens.input_ids.to(self._execution_device))[0]
        return hidden_states.to(dtype=self.unet.dtype)

    def text_conditions(self, prompt, negative_prompt, batch_size):
        """(∅ kwargs, y kwargs) for the UNet: embeddings of ``negative_prompt`` (default "") and of ``prompt``."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("prompt was given but the pipeline has no text_encoder and tokenizer")
        if not self.is_text_conditional:
            raise ValueError("prompt was given but the unet takes no text (unet.config has no cross_attention_dim)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        if batch_size is not None:
            if len(prompts) == 1:
                prompts = prompts * batch_size
            elif len(prompts) != batch_size:
                raise ValueError(f"prompt has {len(prompts)} prompts but batch_size is {batch_size}")
        negative_prompt = "" if negative_prompt is None else negative_prompt
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts) or not all(isinstance(p, str) for p in negatives):
            raise ValueError(
                f"negative_prompt must be a string or a list of {len(prompts)} strings, got {negative_prompt!r}"
            )
        return (
            {"encoder_hidden_states": self.encode_prompt(negatives)},
            {"encoder_hidden_states": self.encode_prompt(prompts)},
        )

    def predict_unconditional_and_conditional(
        self, model_input, timestep, unconditional, conditional, batched: bool = True
    ):
        """The model's outputs without and with the condition: one forward on the doubled batch, or two forwards."""
        if not batched:
            return (
                model_output_of(self.unet(model_input, timestep, **unconditional)),
                model_output_of(self.unet(model_input, timestep, **conditional)),
            )
        conditions = {name: torch.cat([unconditional[name], conditional[name]]) for name in conditional}
        output = model_output_of(self.unet(torch.cat([model_input, model_input]), timestep, **conditions))
        return output.chunk(2)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        batch_size: int | None = None,
        guidance_scale: float = 3.0,
        num_inference_steps: int = 1000,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str | None = None,
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        guidance_batching: str = "batched",
    ):
        """Draw one sample per label or prompt with guidance weight w = ``guidance_scale``.

        Args:
            class_labels: y per sample (or one int repeated ``batch_size`` times), for class-conditional models.
            prompt: a prompt per sample (or one repeated ``batch_size`` times), for text-conditional models.
            negative_prompt: what ∅ means for text (default the empty prompt), one or one per prompt.
            batch_size: the number of samples, when one label or prompt is repeated.
            guidance_scale: w ≥ 0: 1 is the conditional model, 0 the unconditional one, > 1 sharpens.
            num_inference_steps, generator, latents, output_type, return_dict, callback_on_step_end,
            callback_on_step_end_tensor_inputs: as for ``HVAEPipeline``.
            guidance_batching: "batched" (one UNet forward on the doubled batch a step, the default) or "separate"
                (two forwards: half the activation memory); the samples agree up to float rounding.
        """
        check_guidance_scale(guidance_scale, "guidance_scale")
        if guidance_batching not in GUIDANCE_BATCHING:
            raise ValueError(f"guidance_batching must be one of {GUIDANCE_BATCHING}, got {guidance_batching!r}")
        if batch_size is not None:
            check_batch_size(batch_size)
        if (class_labels is None) == (prompt is None):
            raise ValueError(
                "pass exactly one of class_labels (class-conditional unet) or prompt (text-conditional unet)"
            )
        if class_labels is not None:
            unconditional, conditional = self.class_conditions(class_labels, batch_size)
        else:
            unconditional, conditional = self.text_conditions(prompt, negative_prompt, batch_size)
        num_samples = len(next(iter(conditional.values())))
        output_type = output_type or ("latent" if self.is_vector_model else "pil")
        tensor_inputs = self.callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        shape = self.check_sampling_inputs(
            num_samples, num_inference_steps, generator, latents, output_type, callback_on_step_end, tensor_inputs
        )
        latents = self.prepare_latents(shape, generator, latents, self._execution_device, self.unet.dtype)

        def predict(model_input, timestep, step_index: int, chain: SamplingChain):
            if guidance_scale in (0, 1):  # one half is all there is: skip the other forward
                condition = conditional if guidance_scale == 1 else unconditional
                guided = model_output_of(self.unet(model_input, timestep, **condition))
            else:
                unconditional_output, conditional_output = self.predict_unconditional_and_conditional(
                    model_input, timestep, unconditional, conditional, batched=guidance_batching == "batched"
                )
                guided = classifier_free_guidance(unconditional_output, conditional_output, guidance_scale)
            prediction, variance = chain.split(guided, model_input)
            return chain.for_step(prediction, model_input, step_index, variance=variance)

        sample = self.denoise(latents, num_inference_steps, predict, generator, callback_on_step_end, tensor_inputs)
        return self.finish(sample, output_type, return_dict)
