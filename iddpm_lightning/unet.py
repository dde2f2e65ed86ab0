"""The UNet: diffusers' ``UNet2DModel`` configured like the paper's model."""

from __future__ import annotations

from diffusers import UNet2DModel

from .errors import ConfigError


def build_unet(
    image_size: int,
    in_channels: int,
    out_channels: int,
    block_out_channels: list[int],
    layers_per_block: int,
    attention_resolutions: list[int],
    attention_head_dim: int,
    dropout: float,
    num_class_embeds: int | None = None,
) -> UNet2DModel:
    """A UNet with one level per entry of ``block_out_channels``; level i works at
    ``image_size / 2**i`` pixels and has self-attention if that resolution is in
    ``attention_resolutions``. Residual blocks use the timestep embedding as a scale and
    shift of the group norm (the paper's ``use_scale_shift_norm``); the middle block has
    attention, as in the paper.
    """
    levels = len(block_out_channels)
    if levels < 1:
        raise ConfigError("model.block_out_channels needs at least one level, e.g. [64, 128]")
    factor = 2 ** (levels - 1)
    if image_size % factor != 0:
        raise ConfigError(
            f"an image size of {image_size} cannot be down-sampled {levels - 1} times by 2 for the "
            f"{levels} levels of model.block_out_channels; use an image size divisible by {factor} "
            f"or fewer levels"
        )
    bad = [c for c in block_out_channels if c % 32 != 0]
    if bad:
        raise ConfigError(
            f"model.block_out_channels {block_out_channels} must be multiples of 32 (the UNet's group "
            f"norm has 32 groups); change {bad}"
        )
    resolutions = [image_size // 2**i for i in range(levels)]
    stray = [r for r in attention_resolutions if r not in resolutions]
    if stray:
        raise ConfigError(
            f"model.attention_resolutions {list(attention_resolutions)} names {stray}, which no level of this UNet "
            f"works at (its levels are at {resolutions} pixels); use some of {resolutions}, or [] for none"
        )
    # diffusers gives a level channels // attention_head_dim heads; the middle block (at the last
    # level's width) always has attention
    headless = [c for i, (c, r) in enumerate(zip(block_out_channels, resolutions))
                if (r in attention_resolutions or i == levels - 1) and c < attention_head_dim]
    if headless:
        raise ConfigError(
            f"model.attention_head_dim={attention_head_dim} (channels per head) exceeds the {headless} channels of "
            f"a level with attention or of the middle block, which would get no head; use at most {min(headless)}"
        )
    attention = [r in attention_resolutions for r in resolutions]
    return UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        attention_head_dim=attention_head_dim,
        dropout=dropout,
        resnet_time_scale_shift="scale_shift",
        num_class_embeds=num_class_embeds,
    )
