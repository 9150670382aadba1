"""A time-conditioned classifier p_φ(y | x_t): the encoder half of a UNet2DModel, pooled, then a linear head.

Classifier guidance (Dhariwal & Nichol 2021) needs ∇_{x_t} log p_φ(y | x_t) at every noise level, so the classifier
sees the noisy latent x_t and the timestep t, exactly as the denoiser does. The pooling is a global average or, as in
guided-diffusion's classifier, attention pooling: one query (the mean feature) attends over every position.
"""

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class NoisyClassifierOutput(BaseOutput):
    """Output of ``NoisyClassifier``.

    Args:
        logits (`torch.Tensor` of shape `(batch_size, num_classes)`): unnormalized log p_φ(y | x_t).
    """

    logits: torch.Tensor


POOLINGS = ("mean", "attention")


class AttentionPool2d(nn.Module):
    """Pools ``[B, C, H, W]`` to ``[B, C]``: the mean feature, as a query token, attends over itself and every position.

    Each of the H·W + 1 tokens gets a learned position embedding; the output is the query token's attention output.
    Unlike a global average, the head can weigh the few positions that carry the class (a stroke at high noise).
    """

    def __init__(self, num_positions: int, channels: int, num_heads: int):
        super().__init__()
        self.position_embedding = nn.Parameter(torch.randn(num_positions + 1, channels) / math.sqrt(channels))
        self.attention = nn.MultiheadAttention(channels, num_heads, batch_first=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        tokens = hidden.flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        if tokens.shape[1] != self.position_embedding.shape[0]:
            raise ValueError(
                f"attention pooling was built for {self.position_embedding.shape[0] - 1} positions (sample_size), "
                f"got a {hidden.shape[2]}x{hidden.shape[3]} feature map"
            )
        tokens = tokens + self.position_embedding.to(tokens.dtype)
        pooled, _ = self.attention(tokens[:, :1], tokens, tokens, need_weights=False)
        return pooled[:, 0]


class NoisyClassifier(ModelMixin, ConfigMixin):
    """Classifies a noisy sample x_t given its timestep t: ``classifier(x_t, t).logits`` has shape ``[B, num_classes]``.

    Built like the encoder half of ``UNet2DModel``: ``conv_in``, sinusoidal timestep embedding, Diffusers' down blocks
    (ResNet blocks that take the time embedding, optionally with attention), an optional mid block, then group norm,
    SiLU, pooling and a linear head. The arguments mean what they mean for ``UNet2DModel``.

    Args:
        sample_size: the image side (informational, as for ``UNet2DModel``).
        in_channels: C of x_t ``[B, C, H, W]``.
        num_classes: the number of classes.
        down_block_types, block_out_channels, layers_per_block: the encoder's blocks and widths.
        mid_block_type: ``"UNetMidBlock2D"`` or ``None``.
        attention_head_dim, norm_num_groups, norm_eps, act_fn, dropout: as for ``UNet2DModel``.
        flip_sin_to_cos, freq_shift: the sinusoidal timestep projection.
        pooling: ``"mean"`` (global average; the default, so older saved classifiers load unchanged) or
            ``"attention"`` (``AttentionPool2d``; needs ``sample_size``, since it learns one embedding per position).
        pooling_num_heads: the attention heads of ``"attention"`` pooling; they must divide the last block's width.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        num_classes: int = 10,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D"),
        block_out_channels: tuple[int, ...] = (32, 64),
        layers_per_block: int = 1,
        mid_block_type: str | None = None,
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 8,
        norm_eps: float = 1e-5,
        act_fn: str = "silu",
        dropout: float = 0.0,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        pooling: str = "mean",
        pooling_num_heads: int = 4,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if len(block_out_channels) != len(down_block_types):
            raise ValueError(
                f"block_out_channels ({len(block_out_channels)}) and down_block_types ({len(down_block_types)}) "
                "must have the same length"
            )
        if mid_block_type not in (None, "UNetMidBlock2D"):
            raise ValueError(f"mid_block_type must be 'UNetMidBlock2D' or None, got {mid_block_type!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if pooling == "attention":
            if sample_size is None:
                raise ValueError("pooling='attention' needs sample_size (it learns one embedding per position)")
            if pooling_num_heads < 1 or block_out_channels[-1] % pooling_num_heads:
                raise ValueError(
                    f"pooling_num_heads must be >= 1 and divide the last block width {block_out_channels[-1]}, "
                    f"got {pooling_num_heads}"
                )
        time_embed_dim = block_out_channels[0] * 4
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim)

        self.down_blocks = nn.ModuleList()
        output_channel = block_out_channels[0]
        for index, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[index]
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=time_embed_dim,
                    add_downsample=index < len(block_out_channels) - 1,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim if attention_head_dim is not None else output_channel,
                    downsample_padding=1,
                    dropout=dropout,
                )
            )
        self.mid_block = None
        if mid_block_type is not None:
            self.mid_block = UNetMidBlock2D(
                in_channels=block_out_channels[-1],
                temb_channels=time_embed_dim,
                dropout=dropout,
                resnet_eps=norm_eps,
                resnet_act_fn=act_fn,
                attention_head_dim=attention_head_dim if attention_head_dim is not None else block_out_channels[-1],
                resnet_groups=norm_num_groups,
            )
        self.norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[-1], eps=norm_eps)
        self.act_out = nn.SiLU()
        self.attention_pool = None
        if pooling == "attention":
            height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
            # each down block but the last halves the side, rounding up (stride-2 convolution, padding 1)
            for _ in range(len(block_out_channels) - 1):
                height, width = (height + 1) // 2, (width + 1) // 2
            self.attention_pool = AttentionPool2d(height * width, block_out_channels[-1], pooling_num_heads)
        self.classifier_head = nn.Linear(block_out_channels[-1], num_classes)

    @classmethod
    def from_unet(
        cls, unet, num_classes: int, pooling: str = "mean", pooling_num_heads: int = 4, null_class_label=None
    ):
        """A classifier whose features start as the denoiser's: the encoder half of a trained ``UNet2DModel``
        (``conv_in``, the timestep embedding, the down blocks and the mid block) with a new pooled linear head.

        The denoiser has learned at every t what x_t says about x_0, which is what p(y | x_t) needs where a classifier
        trained from scratch is weakest (large t). A class-conditional UNet's embedding of ``null_class_label`` (∅) is
        added to the time embedding's output bias, so the copied blocks see the embedding ε(x_t, ∅) sees. Training
        then fine-tunes every weight; sampling costs one classifier pass as before, not a denoiser backward.

        Args:
            unet: a ``UNet2DModel`` with positional time embedding, no timestep-type class embedding, default time
                scale-shift and, if it has a mid block, one with attention.
            num_classes: classes of the new head.
            pooling, pooling_num_heads: as for ``NoisyClassifier``.
            null_class_label: for a class-conditional UNet (``num_class_embeds``), the label of ∅; a ``ValueError``
                if it is missing there or given for an unconditional UNet.
        """
        config = unet.config
        unsupported = {
            "time_embedding_type": (config.time_embedding_type, "positional"),
            "resnet_time_scale_shift": (config.resnet_time_scale_shift, "default"),
            "class_embed_type": (config.class_embed_type, None),
            "add_attention": (config.add_attention, True),
            "mid_block_scale_factor": (config.mid_block_scale_factor, 1),
            "attn_norm_num_groups": (config.attn_norm_num_groups, None),
        }
        for name, (value, wanted) in unsupported.items():
            if value != wanted:
                raise ValueError(f"from_unet needs unet.config.{name}={wanted!r}, got {value!r}")
        has_class_embedding = getattr(unet, "class_embedding", None) is not None
        if has_class_embedding and null_class_label is None:
            raise ValueError("the unet is class-conditional: give null_class_label, the label of ∅")
        if not has_class_embedding and null_class_label is not None:
            raise ValueError("null_class_label is given but the unet has no class embedding")
        classifier = cls(
            sample_size=config.sample_size,
            in_channels=config.in_channels,
            num_classes=num_classes,
            down_block_types=tuple(config.down_block_types),
            block_out_channels=tuple(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            mid_block_type=None if unet.mid_block is None else "UNetMidBlock2D",
            attention_head_dim=config.attention_head_dim,
            norm_num_groups=config.norm_num_groups,
            norm_eps=config.norm_eps,
            act_fn=config.act_fn,
            dropout=config.dropout,
            flip_sin_to_cos=config.flip_sin_to_cos,
            freq_shift=config.freq_shift,
            pooling=pooling,
            pooling_num_heads=pooling_num_heads,
        )
        for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
            if getattr(classifier, name) is not None:
                getattr(classifier, name).load_state_dict(getattr(unet, name).state_dict())
        if has_class_embedding:
            with torch.no_grad():
                null_embedding = unet.class_embedding.weight[null_class_label]
                classifier.time_embedding.linear_2.bias += null_embedding.to(classifier.dtype)
        return classifier

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, return_dict: bool = True
    ) -> NoisyClassifierOutput | tuple:
        """Logits of p_φ(y | x_t).

        Args:
            sample: x_t, ``[B, C, H, W]``.
            timestep: t, a scalar or ``[B]``.
        """
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"sample must have shape [B, {self.config.in_channels}, H, W], got {tuple(sample.shape)}")
        timesteps = torch.as_tensor(timestep, device=sample.device)
        timesteps = timesteps.reshape(-1).expand(sample.shape[0]) if timesteps.numel() == 1 else timesteps
        embedding = self.time_embedding(self.time_proj(timesteps).to(self.dtype))

        hidden = self.conv_in(sample)
        for block in self.down_blocks:
            hidden, _ = block(hidden_states=hidden, temb=embedding)
        if self.mid_block is not None:
            hidden = self.mid_block(hidden, embedding)
        hidden = self.act_out(self.norm_out(hidden))
        pooled = hidden.mean(dim=(2, 3)) if self.attention_pool is None else self.attention_pool(hidden)
        logits = self.classifier_head(pooled)
        if not return_dict:
            return (logits,)
        return NoisyClassifierOutput(logits=logits)
