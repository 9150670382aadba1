"""HVAEPipeline: ancestral sampling of the diffusion hierarchical VAE, x_T ~ N(0, I), x_{t'} ~ p_θ(x_{t'} | x_t)."""

import torch

from .sampling import HVAESamplingPipeline, SamplingChain, model_output_of


class HVAEPipeline(HVAESamplingPipeline):
    """Unconditional sampling with any UNet (or vector denoiser) and any variance-preserving scheduler.

    The model predicts in ``scheduler.config.prediction_type`` (epsilon, sample, v_prediction or score); a scheduler
    that cannot step that parameterization (a Diffusers scheduler given a "score" model) is stepped in ε.

    Args:
        unet: the denoiser, called ``unet(x_t, t)`` returning ``.sample`` (``UNet2DModel`` or alike; a vector model has
            ``config.sample_size = None`` and ``config.in_channels = D``).
        scheduler: ``HVAEScheduler`` or a Diffusers scheduler (DDPM, DDIM, DPM-Solver, Euler, ...).
    """

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 1000,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str | None = None,
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """Draw ``batch_size`` samples.

        Args:
            batch_size: how many samples.
            num_inference_steps: how many latents of the chain (≥ 1).
            generator: a ``torch.Generator`` or one per sample, for x_T and every step's noise.
            latents: x_T to start from, shape ``(batch_size, C, H, W)`` or ``(batch_size, D)``.
            output_type: "pil" (images, the default), "np", "pt" or "latent" (the raw final sample, the default for
                vector models).
            return_dict: return an ``ImagePipelineOutput`` (else a tuple).
            callback_on_step_end: ``callback(pipeline, step_index, timestep, callback_kwargs) -> dict``.
            callback_on_step_end_tensor_inputs: the tensors passed in ``callback_kwargs`` (``["latents"]``).

        Returns:
            ``ImagePipelineOutput`` with ``images``.
        """
        output_type = output_type or ("latent" if self.is_vector_model else "pil")
        tensor_inputs = self.callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        shape = self.check_sampling_inputs(
            batch_size, num_inference_steps, generator, latents, output_type, callback_on_step_end, tensor_inputs
        )
        latents = self.prepare_latents(shape, generator, latents, self._execution_device, self.unet.dtype)

        def predict(model_input, timestep, step_index: int, chain: SamplingChain):
            prediction, variance = chain.split(model_output_of(self.unet(model_input, timestep)), model_input)
            return chain.for_step(prediction, model_input, step_index, variance=variance)

        sample = self.denoise(latents, num_inference_steps, predict, generator, callback_on_step_end, tensor_inputs)
        return self.finish(sample, output_type, return_dict)
