"""The UNet against the paper's: zero-initialised residual branches and output, 4 heads in every
attention layer, a group norm before every attention (the middle block's too), and checkpoints
of the UNet before these changes still loading."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D

from iddpm_lightning.compat import check_compatible
from iddpm_lightning.errors import ConfigError
from iddpm_lightning.module import IDDPM
from iddpm_lightning.unet import UNetConfig, attention_heads, build_unet

DIGITS = UNetConfig([64, 128], 1, [4], dropout=0.1)


def test_every_residual_branch_attention_and_the_output_start_at_zero_and_still_learn():
    torch.manual_seed(0)
    unet = build_unet(DIGITS, 8, 1, 2)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    out = unet(x, t).sample  # (4, 2, 8, 8)
    assert out.abs().max() == 0
    temb = unet.time_embedding(unet.time_proj(t))  # (4, 256)
    blocks = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    assert len(blocks) == 8  # 2 down, 2 in the middle, 2 x 2 up
    for block in blocks:  # each block is its skip connection at initialisation
        h = torch.randn(4, block.in_channels, 4, 4)
        skip = block.conv_shortcut(h) if block.conv_shortcut is not None else h
        torch.testing.assert_close(block(h, temb), skip, rtol=0, atol=0)
    for attn in (m for m in unet.modules() if isinstance(m, Attention)):
        h = torch.randn(4, attn.to_q.in_features, 4, 4)
        torch.testing.assert_close(attn(h), h, rtol=0, atol=0)
    # the zeroed output layer gets a gradient, so one step makes the output non-zero
    (out - torch.randn_like(out)).pow(2).mean().backward()
    assert unet.conv_out.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in unet.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    assert unet(x, t).sample.abs().max() > 0


@pytest.mark.parametrize("widths, size, attention", [([64, 128], 8, [4]), ([128, 256, 256, 256], 32, [16, 8]),
                                                     ([128, 256, 384, 512], 64, [16, 8])])
def test_the_paper_configs_have_4_heads_and_a_norm_before_every_attention(widths, size, attention):
    with torch.device("meta"):  # the shapes only: the ImageNet-64 UNet has 121M parameters
        unet = build_unet(UNetConfig(widths, 3, attention), size, 3, 6)
    heads = attention_heads(unet)
    assert heads and all(h == 4 for _, h in heads)
    assert all(m.group_norm is not None for m in unet.modules() if isinstance(m, Attention))
    assert unet.mid_block.attentions[0].group_norm.num_groups == 32


def _multi_head_attention(attn: Attention, x: torch.Tensor, heads: int) -> torch.Tensor:
    """The paper's QKVAttention written out: per head softmax(q kᵀ / √d) v, then the output
    projection and the residual. x (B, C, H, W)."""
    B, C, H, W = x.shape
    h = attn.group_norm(x).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)
    q, k, v = (f(h).reshape(B, H * W, heads, C // heads).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // heads), dim=-1)  # (B, heads, HW, HW)
    o = (w @ v).transpose(1, 2).reshape(B, H * W, C)
    return attn.to_out[0](o).transpose(1, 2).reshape(B, C, H, W) + x


def test_heads_set_per_layer_compute_4_head_attention_with_either_processor():
    torch.manual_seed(0)
    # widths 32 and 64 with attention in both: 8 and 16 channels per head, which diffusers'
    # single attention_head_dim cannot express, so the heads are set on the built layers
    unet = build_unet(UNetConfig([32, 64], 1, [8, 4]), 8, 1, 2)
    assert unet.config.attention_head_dim is None
    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    assert {m.to_q.in_features for m in layers} == {32, 64}
    for attn in layers:
        for p in attn.to_out[0].parameters():  # undo the zero init, so the attention shows
            torch.nn.init.normal_(p, std=0.2)
        x = torch.randn(2, attn.to_q.in_features, 4, 4)
        expected = _multi_head_attention(attn, x, 4)
        for processor in (AttnProcessor2_0(), AttnProcessor()):
            attn.set_processor(processor)
            torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(expected, _multi_head_attention(attn, x, 1), atol=1e-3)  # heads matter


def test_attention_head_dim_sets_channels_per_head_instead():
    assert {h for _, h in attention_heads(build_unet(UNetConfig([64, 128], 1, [4], attention_head_dim=32), 8, 1, 2))} \
        == {4}
    assert {h for _, h in attention_heads(build_unet(UNetConfig([64, 128], 1, [4], attention_head_dim=64), 8, 1, 2))} \
        == {2}
    with pytest.raises(ConfigError, match="model.unet.num_heads=3 does not divide the 128 channels"):
        build_unet(UNetConfig([64, 128], 1, [4], num_heads=3), 8, 1, 2)


def test_a_checkpoint_of_the_unet_without_the_middle_attention_norm_still_loads(tmp_path):
    """Checkpoints written before ``mid_attention_norm`` existed hold no such key and no norm weights."""
    torch.manual_seed(0)
    old = IDDPM(unet=UNetConfig([32], 1, [], attention_head_dim=8, mid_attention_norm=False), image_size=8,
                in_channels=1, timesteps=20)
    assert old.unet.mid_block.attentions[0].group_norm is None
    for p in old.unet.parameters():  # weights unlike any initialisation
        torch.nn.init.normal_(p, std=0.05)
    old.ema_unet.load_state_dict(old.unet.state_dict())
    # as the CLI saves them: rebuilt through jsonargparse, which fills a missing key with its default
    hparams = {**old.hparams, "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    hparams["unet"] = {k: v for k, v in hparams["unet"].items() if k not in (
        "mid_attention_norm", "num_heads", "use_scale_shift_norm", "num_heads_upsample")}  # settings added since
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": old.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": "2.6.6"},
               path)

    loaded = IDDPM.load_from_checkpoint(path)
    assert loaded.unet.mid_block.attentions[0].group_norm is None
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 7, 19])
    torch.testing.assert_close(loaded.ema_unet(x, t).sample, old.ema_unet(x, t).sample, rtol=0, atol=0)
    # a model with the norm is told which setting differs, before its weights meet a missing key
    with pytest.raises(ConfigError, match="unet.mid_attention_norm=False"):
        check_compatible({k: v for k, v in hparams.items() if k != "_instantiator"}, IDDPM(unet=UNetConfig([32], 1, [], attention_head_dim=8), image_size=8,
                                        in_channels=1, timesteps=20).hparams)
