"""HVAEPipeline: ancestral sampling of the diffusion hierarchical VAE, x_T ~ N(0, I), x_{t'} ~ p_θ(x_{t'} | x_t)."""

import torch
from diffusers.utils import replace_example_docstring

from ..parameterization import split_learned_variance
from .sampling import HVAESamplingPipeline, exclusive_call

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import UNet2DModel
        >>> from hvae_diffusion import HVAEPipeline, HVAEScheduler

        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        ...                    layers_per_block=1, norm_num_groups=8)
        >>> pipe = HVAEPipeline(unet, HVAEScheduler())
        >>> images = pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0)).images
        ```
"""


class HVAEPipeline(HVAESamplingPipeline):
    """Unconditional sampling with any UNet (or vector denoiser) and any variance-preserving scheduler.

    The model predicts in ``prediction_type`` (epsilon, sample, v_prediction or score; by default the scheduler's
    ``config.prediction_type``) and its output is converted to what the scheduler steps (``sampling``).

    Args:
        unet: the denoiser, called ``unet(x_t, t)`` returning ``.sample`` (``UNet2DModel`` or alike; a vector model has
            ``config.sample_size = None`` and ``config.in_channels = D``); a class-conditional one trained with label
            dropout is called with its null label (``sampling.null_class_label``).
        scheduler: ``HVAEScheduler`` or a Diffusers scheduler (DDPM, DDIM, DPM-Solver, Euler, ...).
        prediction_type: the model's parameterization when it differs from the scheduler's (a "score" model stepped
            by a Diffusers scheduler built with ``prediction_type="epsilon"``); saved in the pipeline config.
        vae: for a latent model, the autoencoder (``AutoencoderKL``, ``AutoencoderTiny`` or ``VQModel``) whose decoder
            turns the final latents into images, once per sample; ``output_type="latent"`` skips it.
        transformer: the denoiser instead of ``unet`` (then ``unet=None``), e.g. a ``DiTTransformer2DModel``, called
            ``transformer(x_t, timestep=t)`` with one timestep per sample, as in Diffusers' ``DiTPipeline``.
        noise_schedule: the ``LearnedNoiseSchedule`` the model was trained with (``hvae-train --noise_schedule
            learned``), kept with the pipeline; the scheduler's tables are built from it (its ``trained_betas``).
    """

    def __init__(
        self, unet, scheduler, prediction_type: str | None = None, vae=None, transformer=None, noise_schedule=None
    ):
        super().__init__()
        self.check_components(unet, transformer, vae)
        self.register_modules(
            unet=unet, transformer=transformer, scheduler=scheduler, vae=vae, noise_schedule=noise_schedule
        )
        self.register_to_config(prediction_type=prediction_type)
        self.note_optional_components()

    @exclusive_call
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 1000,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        use_clipped_model_output: bool | None = None,
        output_type: str | None = None,
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """Draw ``batch_size`` samples.

        Args:
            batch_size (`int`): how many samples.
            num_inference_steps (`int`): how many latents of the chain (≥ 1).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): for x_T and every step's noise; a
                list gives one generator per sample.
            latents (`torch.Tensor`, *optional*): x_T to start from, shape ``(batch_size, C, H, W)`` or
                ``(batch_size, D)``; it is scaled by the scheduler's ``init_noise_sigma``.
            eta (`float`): DDIM's η (0 deterministic, 1 DDPM's variance); ignored by schedulers without it.
            use_clipped_model_output (`bool`, *optional*): for ``DDIMScheduler`` with ``clip_sample`` or
                ``thresholding``, step with the ε of the clipped x̂_0 (``True``: DDIM as published, and as
                guided-diffusion samples) instead of the model's ε (``None``, Diffusers' ``DDIMPipeline`` default);
                ignored by schedulers without it.
            output_type (`str`, *optional*): "pil" (images, the default), "np", "pt" or "latent" (the raw final
                sample, the default for vector models).
            return_dict (`bool`): return an ``ImagePipelineOutput`` (else a tuple).
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                ``callback(pipeline, step_index, timestep, callback_kwargs)`` returning a dict; a returned
                ``"latents"`` replaces the latents.
            callback_on_step_end_tensor_inputs (`list[str]`): the tensors in ``callback_kwargs``: ``"latents"`` and
                ``"pred_original_sample"`` (x̂_0 of the step).

        Examples:

        Returns:
            `ImagePipelineOutput` with ``images``, or a tuple ``(images,)``.
        """
        # 1. check inputs
        output_type = output_type or self.default_output_type
        tensor_inputs = self.callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        shape = self.check_inputs(
            batch_size, num_inference_steps, generator, latents, output_type, callback_on_step_end, tensor_inputs
        )
        device = self._execution_device
        self._interrupt = False

        # 2. the condition of the denoiser: none, ∅ for a class-conditional one
        denoiser_kwargs = self.unconditional_kwargs(batch_size)

        # 3. timesteps, before the latents: init_noise_sigma may depend on them
        timesteps, alphas_cumprod = self.set_timesteps(num_inference_steps, device)

        # 4. x_T
        latents = self.prepare_latents(shape, generator, latents, device, self.denoiser.dtype)

        # 5. the reverse chain
        step_kwargs = self.step_kwargs(generator=generator, eta=eta, use_clipped_model_output=use_clipped_model_output)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_input = self.scheduler.scale_model_input(latents, t)
                output = self.run_denoiser(model_input, t, **denoiser_kwargs)
                prediction, variance = split_learned_variance(output, model_input)
                latents, original_sample = self.scheduler_step(
                    prediction,
                    self.model_prediction_type,
                    variance,
                    model_input,
                    latents,
                    t,
                    alphas_cumprod[i],
                    step_kwargs,
                )
                latents = self.step_end(
                    i, t, latents, original_sample, callback_on_step_end, tensor_inputs, progress_bar
                )["latents"]

        # 6. outputs
        return self.finish(latents, output_type, return_dict)
