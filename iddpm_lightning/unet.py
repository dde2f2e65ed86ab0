"""The UNet: its structure as one dataclass (``UNetConfig``, as nanoGPT's ``GPTConfig``), and
diffusers' ``UNet2DModel`` built from it like the paper's model."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers import UNet2DModel

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
        attention_head_dim: Channels per attention head.
        dropout: Dropout in the residual blocks (the paper uses 0.3 on CIFAR-10).
    """

    block_out_channels: list[PositiveInt] = field(default_factory=lambda: [128, 256, 256, 256])
    layers_per_block: PositiveInt = 3
    attention_resolutions: list[PositiveInt] = field(default_factory=lambda: [16, 8])
    attention_head_dim: PositiveInt = 64
    dropout: UnitIntervalOpenRight = 0.0

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
    ``config.attention_resolutions``. Residual blocks use the timestep embedding as a scale
    and shift of the group norm (the paper's ``use_scale_shift_norm``); the middle block has
    attention, as in the paper. ``in_channels``, ``image_size`` and the classes follow the data.
    """
    block_out_channels, attention_resolutions = list(config.block_out_channels), list(config.attention_resolutions)
    attention_head_dim = config.attention_head_dim
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
    # diffusers gives a level channels // attention_head_dim heads; the middle block (at the last
    # level's width) always has attention
    headless = [c for i, (c, r) in enumerate(zip(block_out_channels, resolutions))
                if (r in attention_resolutions or i == levels - 1) and c < attention_head_dim]
    if headless:
        raise ConfigError(
            f"model.unet.attention_head_dim={attention_head_dim} (channels per head) exceeds the {headless} channels of "
            f"a level with attention or of the middle block, which would get no head; use at most {min(headless)}"
        )
    attention = [r in attention_resolutions for r in resolutions]
    return UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        attention_head_dim=attention_head_dim,
        dropout=config.dropout,
        resnet_time_scale_shift="scale_shift",
        num_class_embeds=num_class_embeds,
    )
