"""MLPDenoiser and MLPNoisyClassifier: a small denoiser and a noisy classifier for vector data ``[B, D]``.

The denoiser is called like ``UNet2DModel`` and the classifier like ``NoisyClassifier``, so every pipeline,
scheduler and guidance method of the package runs on 2-D toy data: the denoiser's
``model(sample, timestep, class_labels=None, return_dict=True)`` returns a ``UNet2DOutput`` exactly as a UNet does,
the classifier's ``model(sample, timestep)`` returns a ``NoisyClassifierOutput`` of logits log p_φ(y | x_t), and
the denoiser's config follows the UNet's names (``in_channels`` = D, ``out_channels``, ``num_class_embeds``) with
``sample_size = None``, the package's mark of vector data.
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from .noisy_classifier import NoisyClassifierOutput


class ResidualBlock(nn.Module):
    """h ← h + W₂ act(W₁ act(h) + W_e e): one residual MLP block, conditioned on the embedding e of (t, y)."""

    def __init__(self, hidden_dim: int, embedding_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(hidden_dim, hidden_dim)
        self.embedding_projection = nn.Linear(embedding_dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, hidden_dim)
        self.act = nn.SiLU()

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        update = self.linear_1(self.act(hidden)) + self.embedding_projection(embedding)
        return hidden + self.linear_2(self.act(update))


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def _timesteps_for(sample: torch.Tensor, timestep) -> torch.Tensor:
    """``timestep`` (a number, or a tensor ``[]``, ``[1]`` or ``[B]``) as a tensor ``[B]`` on ``sample``'s device."""
    timesteps = torch.as_tensor(timestep, device=sample.device)
    if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.shape[0] not in (1, sample.shape[0])):
        raise ValueError(f"timestep must be a scalar or have shape [{sample.shape[0]}], got {tuple(timesteps.shape)}")
    return timesteps.reshape(-1).expand(sample.shape[0])


class TimeConditionedMLP(nn.Module):
    """The network both vector models share: x ↦ W_out act(norm(blocks(W_in x, e))), e the embedding of t (+ y).

    The timestep goes through Diffusers' sinusoidal ``Timesteps`` projection and ``TimestepEmbedding`` MLP, as in a
    UNet; ``forward`` takes an extra embedding (a class label's) to add to it.
    """

    def __init__(
        self, in_channels, out_channels, hidden_dim, num_blocks, time_embedding_dim, flip_sin_to_cos, freq_shift
    ):
        super().__init__()
        self.time_proj = Timesteps(hidden_dim, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(hidden_dim, time_embedding_dim)
        self.input_projection = nn.Linear(in_channels, hidden_dim)
        self.blocks = nn.ModuleList(ResidualBlock(hidden_dim, time_embedding_dim) for _ in range(num_blocks))
        self.output_norm = nn.LayerNorm(hidden_dim)
        self.output_projection = nn.Linear(hidden_dim, out_channels)
        self.act = nn.SiLU()

    def forward(self, sample, timesteps, extra_embedding=None):
        dtype = self.input_projection.weight.dtype
        # Timesteps returns float32 whatever the model's dtype; cast as UNet2DModel does.
        embedding = self.time_embedding(self.time_proj(timesteps).to(dtype=dtype))
        if extra_embedding is not None:
            embedding = embedding + extra_embedding.to(dtype=dtype)
        hidden = self.input_projection(sample.to(dtype))
        for block in self.blocks:
            hidden = block(hidden, embedding)
        return self.output_projection(self.act(self.output_norm(hidden)))


def _check_vector_sample(sample: torch.Tensor, in_channels: int) -> None:
    if not isinstance(sample, torch.Tensor) or sample.ndim != 2 or sample.shape[1] != in_channels:
        shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
        raise ValueError(f"sample must have shape [batch, {in_channels}] (in_channels), got {shape}")


class MLPDenoiser(ModelMixin, ConfigMixin):
    """A residual MLP denoiser for vectors, with the call signature and output of ``UNet2DModel``.

    The timestep goes through Diffusers' sinusoidal ``Timesteps`` projection and ``TimestepEmbedding`` MLP, as in a
    UNet; a class label, when ``num_class_embeds`` is set, adds a learned embedding to it. As with
    ``UNet2DModel``, ``num_class_embeds`` is the size of the label table: for classifier-free guidance reserve the
    last label as the null label ∅ (``num_class_embeds = num_classes + 1``, ∅ = ``num_classes``).

    Args:
        in_channels: D, the dimension of a sample.
        out_channels: the output dimension; D by default, 2D for ``variance_type="learned_range"``.
        sample_size: must be ``None`` (vector data); kept in the config so pipelines can tell vectors from images.
        hidden_dim: width of the residual blocks.
        num_blocks: number of residual blocks.
        time_embedding_dim: width of the (t, y) embedding; ``hidden_dim`` by default.
        num_class_embeds: number of class labels (including a null label, if any); ``None`` for an unconditional
            model.
        flip_sin_to_cos, freq_shift: passed to ``Timesteps``, as in ``UNet2DModel``.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int | None = None,
        sample_size: None = None,
        hidden_dim: int = 128,
        num_blocks: int = 3,
        time_embedding_dim: int | None = None,
        num_class_embeds: int | None = None,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("hidden_dim", hidden_dim), ("num_blocks", num_blocks)):
            _check_positive_int(name, value)
        _check_positive_int("out_channels", out_channels, allow_none=True)
        _check_positive_int("time_embedding_dim", time_embedding_dim, allow_none=True)
        _check_positive_int("num_class_embeds", num_class_embeds, allow_none=True)
        if sample_size is not None:
            raise ValueError(f"sample_size must be None for vector data (MLPDenoiser), got {sample_size!r}")
        time_embedding_dim = time_embedding_dim or hidden_dim
        self.network = TimeConditionedMLP(
            in_channels,
            out_channels or in_channels,
            hidden_dim,
            num_blocks,
            time_embedding_dim,
            flip_sin_to_cos,
            freq_shift,
        )
        self.class_embedding = nn.Embedding(num_class_embeds, time_embedding_dim) if num_class_embeds else None

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple:
        """The model output for x_t at ``timestep`` (a number, or a tensor of shape ``[]`` or ``[B]``).

        Args:
            sample: x_t, shape ``[B, in_channels]``.
            class_labels: ints ``[B]`` in [0, ``num_class_embeds``), required when the model is conditional.
        Returns:
            ``UNet2DOutput(sample=...)`` of shape ``[B, out_channels]`` (or a 1-tuple when ``return_dict`` is False).
        """
        _check_vector_sample(sample, self.config.in_channels)
        timesteps = _timesteps_for(sample, timestep)
        class_embedding = None
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(
                    "class_labels must be given: this model is class-conditional (num_class_embeds is set)"
                )
            class_labels = torch.as_tensor(class_labels, device=sample.device).long().reshape(-1)
            if class_labels.shape[0] != sample.shape[0]:
                raise ValueError(f"class_labels must have shape [{sample.shape[0]}], got {tuple(class_labels.shape)}")
            if bool(((class_labels < 0) | (class_labels >= self.config.num_class_embeds)).any()):
                raise ValueError(
                    f"class_labels must lie in [0, {self.config.num_class_embeds}) (num_class_embeds), "
                    f"got {class_labels.tolist()[:8]}"
                )
            class_embedding = self.class_embedding(class_labels)
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional model (num_class_embeds is None)")

        output = self.network(sample, timesteps, class_embedding)
        if not return_dict:
            return (output,)
        return UNet2DOutput(sample=output)


class MLPNoisyClassifier(ModelMixin, ConfigMixin):
    """A noisy classifier p_φ(y | x_t) for vectors, called like ``NoisyClassifier``: ``model(x_t, t).logits``.

    The same time-conditioned residual MLP as ``MLPDenoiser``, with ``num_classes`` outputs; train it with
    ``hvae_diffusion.training.NoisyClassifierLoss`` and use it in ``ClassifierGuidedPipeline``.

    Args:
        in_channels: D, the dimension of a sample.
        num_classes: the number of classes.
        sample_size: must be ``None`` (vector data).
        hidden_dim, num_blocks, time_embedding_dim, flip_sin_to_cos, freq_shift: as for ``MLPDenoiser``.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 2,
        num_classes: int = 2,
        sample_size: None = None,
        hidden_dim: int = 128,
        num_blocks: int = 3,
        time_embedding_dim: int | None = None,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
    ):
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("hidden_dim", hidden_dim),
            ("num_blocks", num_blocks),
        ):
            _check_positive_int(name, value)
        _check_positive_int("time_embedding_dim", time_embedding_dim, allow_none=True)
        if sample_size is not None:
            raise ValueError(f"sample_size must be None for vector data (MLPNoisyClassifier), got {sample_size!r}")
        self.network = TimeConditionedMLP(
            in_channels,
            num_classes,
            hidden_dim,
            num_blocks,
            time_embedding_dim or hidden_dim,
            flip_sin_to_cos,
            freq_shift,
        )

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward(self, sample: torch.Tensor, timestep, return_dict: bool = True):
        """Logits log p_φ(y | x_t) (unnormalized), ``[B, num_classes]``, for x_t ``[B, in_channels]`` at ``timestep``."""
        _check_vector_sample(sample, self.config.in_channels)
        logits = self.network(sample, _timesteps_for(sample, timestep))
        if not return_dict:
            return (logits,)
        return NoisyClassifierOutput(logits=logits)
