"""The official ``UNetModel``'s state_dict, one module after another, and its tensors as diffusers'
``UNet2DModel``'s (as ``unet.build_unet`` builds it) and back.

    official UNetModel                     diffusers UNet2DModel
    input_blocks.0.0                       conv_in
    time_embed.0 / .2                      time_embedding.linear_1 / linear_2
    label_emb                              class_embedding
    input_blocks[k] = [ResBlock, Attn?]    down_blocks[l].resnets[i], .attentions[i]
    input_blocks[k] = [Downsample]         down_blocks[l].downsamplers[0].conv  (after each level but the last)
    middle_block.0 / .1 / .2               mid_block.resnets[0] / attentions[0] / resnets[1]
    output_blocks[k] = [ResBlock, Attn?, Upsample?]
                                           up_blocks[j].resnets[i], .attentions[i], .upsamplers[0].conv
    out.0 / out.2                          conv_norm_out / conv_out
    ResBlock in_layers.0/.2, emb_layers.1, out_layers.0/.3, skip_connection
                                           norm1/conv1, time_emb_proj, norm2/conv2, conv_shortcut
    AttentionBlock norm, qkv, proj_out     group_norm, to_q/to_k/to_v, to_out[0]

The one tensor that is not copied: ``qkv`` is a 1x1 convolution [3C, C, 1] whose output channels
are ordered [head][q, k, v][channel] (the official attention reshapes to (B·heads, 3C/heads, T)
and then splits q, k, v), so it is split per head, ``W.reshape(heads, 3, C/heads, C)[:, i]``;
``chunk(3)`` would mix the heads' queries, keys and values.

A ``structure`` is ``UNetModel``'s keyword arguments: ``in_channels``, ``model_channels``,
``out_channels``, ``num_res_blocks``, ``channel_mult``, ``attention_resolutions`` (downsampling
factors), ``num_classes`` (or None), ``use_scale_shift_norm``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..compat import legacy_unet
from ..errors import ConfigError
from ..unet import UNetConfig


@dataclasses.dataclass
class _Module:
    """One module in both layouts: official key prefix, diffusers key prefix, what it is
    (``conv``, ``linear``, ``norm``, ``embedding``, ``res``, ``attn``, ``attn_up``) and its
    official tensor shapes by key suffix."""

    official: str
    diffusers: str
    kind: str
    shapes: dict[str, tuple[int, ...]]


def _layout(structure: dict[str, Any]) -> list[_Module]:
    """Every module of the official UNetModel of ``structure``, in order, with its diffusers name:
    the official construction replayed (input_block_chans, ds) without building anything."""
    mc, mult, n = structure["model_channels"], structure["channel_mult"], structure["num_res_blocks"]
    emb, ss = 4 * mc, structure["use_scale_shift_norm"]
    attn_ds = set(structure["attention_resolutions"])

    def conv(o: str, d: str, c_in: int, c_out: int, k: int = 3) -> _Module:
        return _Module(o, d, "conv", {"weight": (c_out, c_in, k, k), "bias": (c_out,)})

    def res(o: str, d: str, c_in: int, c_out: int) -> _Module:
        shapes = {"in_layers.0.weight": (c_in,), "in_layers.0.bias": (c_in,),
                  "in_layers.2.weight": (c_out, c_in, 3, 3), "in_layers.2.bias": (c_out,),
                  "emb_layers.1.weight": ((2 if ss else 1) * c_out, emb), "emb_layers.1.bias": ((2 if ss else 1) * c_out,),
                  "out_layers.0.weight": (c_out,), "out_layers.0.bias": (c_out,),
                  "out_layers.3.weight": (c_out, c_out, 3, 3), "out_layers.3.bias": (c_out,)}
        if c_in != c_out:
            shapes |= {"skip_connection.weight": (c_out, c_in, 1, 1), "skip_connection.bias": (c_out,)}
        return _Module(o, d, "res", shapes)

    def attn(o: str, d: str, c: int, up: bool = False) -> _Module:
        return _Module(o, d, "attn_up" if up else "attn", {
            "norm.weight": (c,), "norm.bias": (c,), "qkv.weight": (3 * c, c, 1), "qkv.bias": (3 * c,),
            "proj_out.weight": (c, c, 1), "proj_out.bias": (c,)})

    modules = [_Module("time_embed.0", "time_embedding.linear_1", "linear", {"weight": (emb, mc), "bias": (emb,)}),
               _Module("time_embed.2", "time_embedding.linear_2", "linear", {"weight": (emb, emb), "bias": (emb,)})]
    if structure["num_classes"] is not None:
        modules.append(_Module("label_emb", "class_embedding", "embedding", {"weight": (structure["num_classes"], emb)}))
    modules.append(conv("input_blocks.0.0", "conv_in", structure["in_channels"], mc))
    chans, ch, k = [mc], mc, 1  # channels of every skip, current width, official block index
    for level, m in enumerate(mult):
        for i in range(n):
            modules.append(res(f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{i}", ch, m * mc))
            ch = m * mc
            if 2**level in attn_ds:
                modules.append(attn(f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{i}", ch))
            chans.append(ch)
            k += 1
        if level != len(mult) - 1:
            modules.append(conv(f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv", ch, ch))
            chans.append(ch)
            k += 1
    modules += [res("middle_block.0", "mid_block.resnets.0", ch, ch), attn("middle_block.1", "mid_block.attentions.0", ch),
                res("middle_block.2", "mid_block.resnets.1", ch, ch)]
    k = 0
    for level, m in reversed(list(enumerate(mult))):
        j = len(mult) - 1 - level
        for i in range(n + 1):
            modules.append(res(f"output_blocks.{k}.0", f"up_blocks.{j}.resnets.{i}", ch + chans.pop(), m * mc))
            ch, index = m * mc, 1
            if 2**level in attn_ds:
                modules.append(attn(f"output_blocks.{k}.1", f"up_blocks.{j}.attentions.{i}", ch, up=True))
                index = 2
            if level and i == n:
                modules.append(conv(f"output_blocks.{k}.{index}.conv", f"up_blocks.{j}.upsamplers.0.conv", ch, ch))
            k += 1
    modules += [_Module("out.0", "conv_norm_out", "norm", {"weight": (ch,), "bias": (ch,)}),
                conv("out.2", "conv_out", ch, structure["out_channels"])]
    return modules


def official_shapes(structure: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The key and shape of every tensor of the official UNetModel's state_dict of ``structure``."""
    return {f"{m.official}.{s}": shape for m in _layout(structure) for s, shape in m.shapes.items()}


_EXPECTED = ("a plain improved-diffusion UNetModel state_dict (what its training saves as model*.pt and "
             "ema_*.pt, and the released checkpoints are)")


def structure_of(state_dict: Any) -> dict[str, Any]:
    """What the tensors of an official state_dict say, as ``UNetModel``'s keyword arguments:
    ``in_channels``, ``model_channels``, ``out_channels``, ``num_res_blocks``, ``channel_mult``
    (per level), ``attention_resolutions`` (downsampling factors 2**level of the levels with
    attention), ``num_classes`` (label_emb's rows, or None), ``use_scale_shift_norm``
    (emb_layers.1 has 2x the block's channels as rows). Anything else: one ConfigError sentence."""
    if not isinstance(state_dict, dict):
        raise ConfigError(f"the file holds a {type(state_dict).__name__}, not {_EXPECTED}")
    if "state_dict" in state_dict or "pytorch-lightning_version" in state_dict:
        raise ConfigError(f"the file is a checkpoint with a 'state_dict' entry (a Lightning checkpoint, e.g. this "
                          f"template's: use it with --ckpt_path), not {_EXPECTED}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise ConfigError(f"the file is a dict of other things than named tensors, not {_EXPECTED}")
    required = ("input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight", "input_blocks.1.0.in_layers.2.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ConfigError(f"the file has no tensor {missing[0]}, so it is not {_EXPECTED}")

    model_channels, in_channels = state_dict["input_blocks.0.0.weight"].shape[:2]
    widths: list[list[int]] = [[]]  # residual blocks' output channels per level
    attention: list[list[bool]] = [[]]
    k = 1
    while f"input_blocks.{k}.0.op.weight" in state_dict or f"input_blocks.{k}.0.in_layers.2.weight" in state_dict:
        if f"input_blocks.{k}.0.op.weight" in state_dict:  # a Downsample: the next level starts
            widths.append([])
            attention.append([])
        else:
            widths[-1].append(state_dict[f"input_blocks.{k}.0.in_layers.2.weight"].shape[0])
            attention[-1].append(f"input_blocks.{k}.1.qkv.weight" in state_dict)
        k += 1
    first = state_dict["input_blocks.1.0.emb_layers.1.weight"].shape[0] if "input_blocks.1.0.emb_layers.1.weight" \
        in state_dict else 0
    structure = {
        "in_channels": int(in_channels),
        "model_channels": int(model_channels),
        "out_channels": int(state_dict["out.2.weight"].shape[0]),
        "num_res_blocks": len(widths[0]),
        "attention_resolutions": [2**level for level, a in enumerate(attention) if a and a[0]],
        "channel_mult": [w[0] // model_channels if w else 0 for w in widths],
        "num_classes": int(state_dict["label_emb.weight"].shape[0]) if "label_emb.weight" in state_dict else None,
        "use_scale_shift_norm": first == 2 * widths[0][0],
    }
    expected = official_shapes(structure)
    actual = {k: tuple(v.shape) for k, v in state_dict.items()}
    if expected != actual:
        key = next(k for k in [*expected, *actual] if expected.get(k) != actual.get(k))
        what = (f"it lacks {key}" if key not in actual else f"it has an unexpected {key}" if key not in expected
                else f"its {key} has shape {list(actual[key])}, not {list(expected[key])}")
        raise ConfigError(
            f"the file's tensors are not one consistent UNetModel layout (its first blocks imply channel_mult "
            f"{structure['channel_mult']} with {structure['num_res_blocks']} residual blocks per level, but {what}); "
            f"expected {_EXPECTED}"
        )
    return structure


def attention_widths(structure: dict[str, Any]) -> tuple[set[int], int]:
    """(channels of the levels with attention, channels of the middle block)."""
    widths = [structure["model_channels"] * m for m in structure["channel_mult"]]
    return {widths[d.bit_length() - 1] for d in structure["attention_resolutions"]}, widths[-1]


def csv(values) -> str:
    """1,2,2,2 (or "none")."""
    return ",".join(map(str, values)) or "none"


def _heads(heads: int | tuple[int, int], structure: dict[str, Any]) -> tuple[int, int]:
    """(heads of the down path and middle block, heads of the up path), each dividing the widths
    of its attention layers."""
    down, up = (heads, heads) if isinstance(heads, int) else heads
    attended, middle = attention_widths(structure)
    for n, widths in ((down, attended | {middle}), (up, attended)):
        if any(w % n for w in widths):
            raise ConfigError(f"heads={heads} does not divide the attention layers' {csv(sorted(widths))} channels; "
                              f"pass the num_heads (and num_heads_upsample) the model was trained with")
    return down, up


def _same_keys(state_dict: dict[str, torch.Tensor], expected: set[str], structure: dict[str, Any]) -> None:
    """Refuse a state_dict whose keys are not those of ``structure``'s layout."""
    if set(state_dict) != expected:
        key = sorted(set(state_dict) ^ expected)[0]
        raise ConfigError(f"the state_dict {'has no' if key in expected else 'has an unexpected'} tensor {key} for "
                          f"the layout of {structure}; pass the structure its model was built with")


_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
        "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def official_to_diffusers(state_dict: dict[str, torch.Tensor], structure: dict[str, Any],
                          heads: int | tuple[int, int]) -> dict[str, torch.Tensor]:
    """The official state_dict of ``structure`` as the state_dict of ``build_unet``'s UNet2DModel,
    float32. ``heads``: num_heads, or (num_heads, num_heads_upsample)."""
    down_heads, up_heads = _heads(heads, structure)
    _same_keys(state_dict, {f"{m.official}.{k}" for m in _layout(structure) for k in m.shapes}, structure)
    out: dict[str, torch.Tensor] = {}
    for m in _layout(structure):
        src = {s: state_dict[f"{m.official}.{s}"].float() for s in m.shapes}
        if m.kind == "res":
            for s, t in src.items():
                layer, _, param = s.rpartition(".")
                out[f"{m.diffusers}.{_RES[layer]}.{param}"] = t
        elif m.kind in ("attn", "attn_up"):
            h = up_heads if m.kind == "attn_up" else down_heads
            C = src["norm.weight"].shape[0]
            w = src["qkv.weight"].reshape(h, 3, C // h, C)  # (heads, [q, k, v], C/heads, C)
            b = src["qkv.bias"].reshape(h, 3, C // h)  # (heads, [q, k, v], C/heads)
            out |= {f"{m.diffusers}.group_norm.weight": src["norm.weight"],
                    f"{m.diffusers}.group_norm.bias": src["norm.bias"]}
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                out[f"{m.diffusers}.{name}.weight"] = w[:, i].reshape(C, C)  # (C out, C in), heads major
                out[f"{m.diffusers}.{name}.bias"] = b[:, i].reshape(C)
            out[f"{m.diffusers}.to_out.0.weight"] = src["proj_out.weight"][:, :, 0]  # (C, C, 1) -> (C, C)
            out[f"{m.diffusers}.to_out.0.bias"] = src["proj_out.bias"]
        else:
            out |= {f"{m.diffusers}.{s}": t for s, t in src.items()}
    return {k: v.contiguous() for k, v in out.items()}


def diffusers_to_official(state_dict: dict[str, torch.Tensor], structure: dict[str, Any],
                          heads: int | tuple[int, int]) -> dict[str, torch.Tensor]:
    """The inverse of ``official_to_diffusers``: a ``build_unet`` UNet's state_dict in the official
    layout (bitwise the same tensors back for a float32 input)."""
    down_heads, up_heads = _heads(heads, structure)
    _same_keys(state_dict, {f"{m.diffusers}.{k}" for m in _layout(structure) for k in _diffusers_suffixes(m)},
               structure)
    out: dict[str, torch.Tensor] = {}
    for m in _layout(structure):
        if m.kind == "res":
            for s in m.shapes:
                layer, _, param = s.rpartition(".")
                out[f"{m.official}.{s}"] = state_dict[f"{m.diffusers}.{_RES[layer]}.{param}"]
        elif m.kind in ("attn", "attn_up"):
            h = up_heads if m.kind == "attn_up" else down_heads
            p = m.diffusers
            C = state_dict[f"{p}.group_norm.weight"].shape[0]
            w = torch.stack([state_dict[f"{p}.to_{n}.weight"].reshape(h, C // h, C) for n in "qkv"], dim=1)
            b = torch.stack([state_dict[f"{p}.to_{n}.bias"].reshape(h, C // h) for n in "qkv"], dim=1)
            out |= {f"{m.official}.norm.weight": state_dict[f"{p}.group_norm.weight"],
                    f"{m.official}.norm.bias": state_dict[f"{p}.group_norm.bias"],
                    f"{m.official}.qkv.weight": w.reshape(3 * C, C, 1),  # (heads, 3, C/heads, C) -> (3C, C, 1)
                    f"{m.official}.qkv.bias": b.reshape(3 * C),  # (heads, 3, C/heads) -> (3C,)
                    f"{m.official}.proj_out.weight": state_dict[f"{p}.to_out.0.weight"][:, :, None],  # (C, C, 1)
                    f"{m.official}.proj_out.bias": state_dict[f"{p}.to_out.0.bias"]}
        else:
            out |= {f"{m.official}.{s}": state_dict[f"{m.diffusers}.{s}"] for s in m.shapes}
    return {k: v.float().contiguous() for k, v in out.items()}


def _diffusers_suffixes(m: _Module) -> list[str]:
    """The diffusers key suffixes of module ``m``."""
    if m.kind == "res":
        return [f"{_RES[s.rpartition('.')[0]]}.{s.rpartition('.')[2]}" for s in m.shapes]
    if m.kind in ("attn", "attn_up"):
        return [f"{n}.{p}" for n in ("group_norm", "to_q", "to_k", "to_v", "to_out.0") for p in ("weight", "bias")]
    return list(m.shapes)


def unet_settings(hparams: dict[str, Any]) -> dict[str, Any]:
    """hparams["unet"] (a UNetConfig, or the dict IDDPM saves: an old checkpoint's missing settings
    read as it was built, ``compat.legacy_unet``) as a complete, checked dict."""
    unet = hparams["unet"]
    return dataclasses.asdict(unet if isinstance(unet, UNetConfig) else UNetConfig(**legacy_unet(dict(unet))))


def template_structure(hparams: dict[str, Any]) -> dict[str, Any]:
    """The official ``structure`` (see ``structure_of``) of a template model's hyper-parameters."""
    unet = unet_settings(hparams)
    widths, image_size = list(unet["block_out_channels"]), hparams["image_size"]
    mc = widths[0]
    if any(w % mc for w in widths):
        raise ConfigError(f"model.unet.block_out_channels {widths} are not all multiples of the first width, as the "
                          f"official UNetModel's model_channels x channel_mult are; only such models convert")
    if not unet["mid_attention_norm"]:
        raise ConfigError("model.unet.mid_attention_norm=false has no official counterpart (its middle attention "
                          "always has a group norm); only models built with mid_attention_norm true convert")
    return {
        "in_channels": hparams["in_channels"],
        "model_channels": mc,
        "out_channels": (2 if hparams["model_var_type"] == "learned_range" else 1) * hparams["in_channels"],
        "num_res_blocks": unet["layers_per_block"],
        "attention_resolutions": [2**level for level in range(len(widths))
                                  if image_size // 2**level in unet["attention_resolutions"]],
        "channel_mult": [w // mc for w in widths],
        "num_classes": hparams["num_classes"] if hparams["class_cond"] else None,
        "use_scale_shift_norm": unet["use_scale_shift_norm"],
    }
