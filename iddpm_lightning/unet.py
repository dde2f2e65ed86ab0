"""The UNet: its structure as one dataclass (``UNetConfig``, as nanoGPT's ``GPTConfig``), and
diffusers' ``UNet2DModel`` built from it like the paper's model (improved-diffusion's ``unet.py``).

Made to match the paper's UNet:
- residual blocks take the timestep embedding as a scale and shift of their second group norm
  (``use_scale_shift_norm``): ``resnet_time_scale_shift="scale_shift"``; without it (the paper's
  LSUN models) the embedding is added to the hidden state before that norm: ``"default"``;
- every attention layer, the middle block's too, normalises its input with a 32-group norm first
  (diffusers leaves the middle block's out under ``scale_shift`` unless ``attn_norm_num_groups``
  is given);
- 4 heads in every attention layer (``num_heads``), whatever its width; the up path's layers may
  have another count (``num_heads_upsample``), the middle block has ``num_heads``;
- the last convolution of every residual block, the output projection of every attention layer
  and the output convolution start at zero (the paper's ``zero_module``), so that each block
  starts as the identity and the model's first output is 0.

Already the same in diffusers: the sinusoidal timestep embedding ([cos, sin], max period
10,000) and its 2-layer SiLU MLP to 4x the first width; the class embedding added to it; the
down path (blocks, then a stride-2 convolution, except at the last level) and the up path
(blocks + 1 per level, with the skips concatenated); GroupNorm(32, eps 1e-5) and SiLU; the
output's norm, SiLU and 3x3 convolution; attention scaled by 1/sqrt(channels per head); every
other weight with PyTorch's default initialisation, as in the paper's code.

What still differs: the attention's query, key and value are three linear maps where the paper
has one 1x1 convolution into 3x the channels (the same function class, drawn from the same
initial distribution, but other parameter names; ``official/`` converts the paper's released
weights); and when the attention layers differ in channels per head (4 heads on the ImageNet-64
model's 256, 384 and 512 channels, or an up path with other heads than the down path), diffusers'
config cannot say so (it has one ``attention_head_dim``): the heads are then set on the built
layers, and ``export`` refuses such a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

from .errors import ConfigError
from .settings import PositiveInt, UnitIntervalOpenRight, check_args


@dataclass
class UNetConfig:
    """The UNet's structure; the defaults are the paper's CIFAR-10 model (128 channels,
    multipliers 1, 2, 2, 2, three residual blocks per level, attention at 16 and 8 pixels).

    Args:
        block_out_channels: Channels of each resolution level (multiples of 32, the group
            norm's groups), e.g. [128, 256, 256, 256].
        layers_per_block: Residual blocks per resolution level.
        attention_resolutions: Resolutions (in pixels) whose blocks get self-attention.
        attention_head_dim: Channels per head instead of ``num_heads`` heads (diffusers'
            convention, and guided-diffusion's ``num_head_channels``): the heads then grow
            with the width. Checkpoints written before ``num_heads`` existed set it.
        dropout: Dropout in the residual blocks (the paper uses 0.3 on CIFAR-10).
        num_heads: Heads of every attention layer (the paper's 4), unless
            ``attention_head_dim`` is set.
        mid_attention_norm: Group-normalise the middle block's attention input, as the
            paper; false builds the UNet of checkpoints written before this setting existed.
        use_scale_shift_norm: Residual blocks apply the timestep embedding as a scale and shift
            of their second group norm, GN(h)·(1 + s) + b (the paper's default); false adds it to
            the hidden state before that norm, h + e (the paper's LSUN models).
        num_heads_upsample: Heads of the up path's attention layers; null: ``num_heads`` (the
            paper's -1). Unused with ``attention_head_dim``.
    """

    block_out_channels: list[PositiveInt] = field(default_factory=lambda: [128, 256, 256, 256])
    layers_per_block: PositiveInt = 3
    attention_resolutions: list[PositiveInt] = field(default_factory=lambda: [16, 8])
    attention_head_dim: PositiveInt | None = None
    dropout: UnitIntervalOpenRight = 0.0
    num_heads: PositiveInt = 4
    mid_attention_norm: bool = True
    use_scale_shift_norm: bool = True
    num_heads_upsample: PositiveInt | None = None

    def __post_init__(self) -> None:
        check_args("model.unet.", UNetConfig, vars(self))


def build_unet(
    config: UNetConfig,
    image_size: int,
    in_channels: int,
    out_channels: int,
    num_class_embeds: int | None = None,
) -> UNet2DModel:
    """A UNet with one level per entry of ``config.block_out_channels``; level i works at
    ``image_size / 2**i`` pixels and has self-attention if that resolution is in
    ``config.attention_resolutions``; the middle block (at the last level's width) always has
    attention, as in the paper. ``in_channels``, ``image_size`` and the classes follow the data.
    """
    block_out_channels, attention_resolutions = list(config.block_out_channels), list(config.attention_resolutions)
    levels = len(block_out_channels)
    if levels < 1:
        raise ConfigError("model.unet.block_out_channels needs at least one level, e.g. [64, 128]")
    factor = 2 ** (levels - 1)
    if image_size % factor != 0:
        raise ConfigError(
            f"an image size of {image_size} cannot be down-sampled {levels - 1} times by 2 for the "
            f"{levels} levels of model.unet.block_out_channels; use an image size divisible by {factor} "
            f"or fewer levels"
        )
    bad = [c for c in block_out_channels if c % 32 != 0]
    if bad:
        raise ConfigError(
            f"model.unet.block_out_channels {block_out_channels} must be multiples of 32 (the UNet's group "
            f"norm has 32 groups); change {bad}"
        )
    resolutions = [image_size // 2**i for i in range(levels)]
    stray = [r for r in attention_resolutions if r not in resolutions]
    if stray:
        raise ConfigError(
            f"model.unet.attention_resolutions {list(attention_resolutions)} names {stray}, which no level of this UNet "
            f"works at (its levels are at {resolutions} pixels); use some of {resolutions}, or [] for none"
        )
    attention = [r in attention_resolutions for r in resolutions]
    if not config.use_scale_shift_norm and not config.mid_attention_norm:
        raise ConfigError(
            "model.unet.mid_attention_norm=false exists only for the scale-shift UNet of old checkpoints (diffusers "
            "always normalises the middle attention when use_scale_shift_norm is false); set mid_attention_norm: true"
        )
    # (width, up path?) of every kind of attention layer: the levels with attention on the way down,
    # the middle block (num_heads, as the paper), the same levels on the way up (num_heads_upsample)
    attended = [c for c, a in zip(block_out_channels, attention) if a]
    layers = [(c, False) for c in attended + [block_out_channels[-1]]] + [(c, True) for c in attended]
    head_dims = {layer: _head_dim(config, *layer) for layer in layers}  # channels per head
    uniform = len(set(head_dims.values())) == 1
    unet = UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        # one attention_head_dim for every layer, so heads = width // it: right for every layer
        # only when all have the same channels per head; else set per layer below
        attention_head_dim=head_dims[layers[0]] if uniform else None,
        attn_norm_num_groups=32 if config.mid_attention_norm else None,
        dropout=config.dropout,
        resnet_time_scale_shift="scale_shift" if config.use_scale_shift_norm else "default",
        num_class_embeds=num_class_embeds,
    )
    if not uniform:
        for blocks, up in ((unet.down_blocks, False), ([unet.mid_block], False), (unet.up_blocks, True)):
            for module in (m for block in blocks for m in block.modules() if isinstance(m, Attention)):
                head_dim = head_dims[(module.to_q.in_features, up)]
                module.heads = module.sliceable_head_dim = module.to_q.in_features // head_dim
                module.scale = head_dim**-0.5
    zero_init_like_the_paper(unet)
    return unet


def _head_dim(config: UNetConfig, width: int, up: bool = False) -> int:
    """Channels per head of an attention layer ``width`` channels wide (of the up path if ``up``)."""
    if config.attention_head_dim is not None:
        if width < config.attention_head_dim:
            raise ConfigError(
                f"model.unet.attention_head_dim={config.attention_head_dim} (channels per head) exceeds the {width} "
                f"channels of a level with attention or of the middle block, which would get no head; use at most "
                f"{width}"
            )
        return config.attention_head_dim
    name, heads = "num_heads", config.num_heads
    if up and config.num_heads_upsample is not None:
        name, heads = "num_heads_upsample", config.num_heads_upsample
    if width % heads != 0:
        raise ConfigError(
            f"model.unet.{name}={heads} does not divide the {width} channels of a level with attention"
            f"{'' if up else ' or of the middle block'}; use a divisor of {width} such as 4"
        )
    return width // heads


@torch.no_grad()
def zero_init_like_the_paper(unet: UNet2DModel) -> None:
    """Zero the weights and biases of each residual block's last convolution, each attention
    layer's output projection and the output convolution (improved-diffusion's
    ``zero_module``): every block starts as its skip connection and the UNet's output as 0,
    while each of those layers still gets a gradient from its input."""
    layers = [unet.conv_out]
    for module in unet.modules():
        if isinstance(module, ResnetBlock2D):
            layers.append(module.conv2)
        elif isinstance(module, Attention):
            layers.append(module.to_out[0])
    for layer in layers:
        for p in layer.parameters():
            p.zero_()


def attention_heads(unet: UNet2DModel) -> list[tuple[int, int]]:
    """(width, heads) of every attention layer, in module order."""
    return [(m.to_q.in_features, m.heads) for m in unet.modules() if isinstance(m, Attention)]
