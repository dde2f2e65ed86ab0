"""The importer of openai/improved-diffusion's checkpoints (``iddpm_lightning/official/``) against two tiny models
made and run by the official code itself (tests/data/improved_diffusion/, see its README): the
converted UNet, p_θ and DDIM give the official numbers; the mapping is exact both ways; every
disagreement between flags and tensors is refused in one sentence."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iddpm_lightning.diffusion import GaussianDiffusion, Sampler, get_named_beta_schedule
from iddpm_lightning.module import IDDPM
from iddpm_lightning.errors import ConfigError
from iddpm_lightning.official import (MODEL_FLAGS, OFFICIAL_DEFAULTS, RELEASED_FLAGS, check_against_flags, convert,
                                      diffusers_to_official, import_notes, model_and_state, official_flags_of,
                                      official_shapes, official_to_diffusers, parse_flags, structure_of,
                                      template_settings, template_structure)
from iddpm_lightning.unet import UNetConfig, attention_heads, build_unet

DATA = Path(__file__).parent / "data" / "improved_diffusion"
FIXTURES = ("cifar10_like", "class_cond")


@functools.cache
def fixture(name: str):
    """(flags.json, reference arrays as tensors, official state_dict, import flags line) of a fixture."""
    flags = json.loads((DATA / name / "flags.json").read_text())
    ref = {k: torch.from_numpy(v) for k, v in np.load(DATA / name / "reference.npz").items()}
    state = torch.load(DATA / name / "model.pt", map_location="cpu", weights_only=True)
    u = flags["UNetModel"]
    line = f"{flags['flags_line']} --channel_mult {','.join(map(str, u['channel_mult']))} --in_channels {u['in_channels']}"
    return flags, ref, state, line


def template_unet(hparams: dict, state_dict: dict | None = None):
    """The UNet the template builds from imported hyper-parameters, in eval mode."""
    C = hparams["in_channels"]
    unet = build_unet(UNetConfig(**hparams["unet"]), hparams["image_size"], C,
                      2 * C if hparams["model_var_type"] == "learned_range" else C,
                      hparams["num_classes"] if hparams["class_cond"] else None)
    if state_dict is not None:
        unet.load_state_dict(state_dict, strict=True)
    return unet.eval()


def model_fn(unet, T: int, y: torch.Tensor | None):
    """model(x_t, t) at ORIGINAL timesteps, seeing t·1000/T as the official rescale_timesteps."""
    return lambda x, t: unet(x, t.float() * (1000.0 / T), class_labels=y).sample


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max|b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def official_forward(sd: dict, s: dict, heads: tuple[int, int], x, t, y=None) -> torch.Tensor:
    """improved-diffusion's UNetModel.forward written out on its state_dict ``sd`` of structure ``s``
    (heads of the down path and middle block, of the up path); x (B, C, H, W) -> (B, out, H, W).
    Checked against the official outputs below, then used where no official output exists."""
    sd = {k: v.float() for k, v in sd.items()}
    half = s["model_channels"] // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = t.float()[:, None] * freqs[None]  # (B, mc/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, mc)
    emb = F.linear(F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                   sd["time_embed.2.weight"], sd["time_embed.2.bias"])  # (B, 4 mc)
    if y is not None:
        emb = emb + sd["label_emb.weight"][y]

    def norm(h, p):
        return F.group_norm(h, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)

    def conv(h, p, **kw):
        return F.conv2d(h, sd[f"{p}.weight"], sd[f"{p}.bias"], **kw)

    def res(h, p):
        r = conv(F.silu(norm(h, f"{p}.in_layers.0")), f"{p}.in_layers.2", padding=1)
        e = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])[:, :, None, None]
        if s["use_scale_shift_norm"]:
            scale, shift = e.chunk(2, dim=1)
            r = norm(r, f"{p}.out_layers.0") * (1 + scale) + shift
        else:
            r = norm(r + e, f"{p}.out_layers.0")
        r = conv(F.silu(r), f"{p}.out_layers.3", padding=1)
        return (conv(h, f"{p}.skip_connection") if f"{p}.skip_connection.weight" in sd else h) + r

    def attn(h, p, n):
        B, C, H, W = h.shape
        qkv = F.conv1d(norm(h, f"{p}.norm").reshape(B, C, H * W), sd[f"{p}.qkv.weight"], sd[f"{p}.qkv.bias"])
        q, k, v = qkv.reshape(B * n, 3 * C // n, H * W).chunk(3, dim=1)  # (B·heads, C/heads, HW) each
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(C // n), dim=-1)  # (B·heads, HW, HW)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(B, C, H * W)
        return h + F.conv1d(a, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"]).reshape(B, C, H, W)

    def block(h, p, n):  # a TimestepEmbedSequential: its children in order
        for i in range(3):
            if f"{p}.{i}.in_layers.0.weight" in sd:
                h = res(h, f"{p}.{i}")
            elif f"{p}.{i}.qkv.weight" in sd:
                h = attn(h, f"{p}.{i}", n)
            elif f"{p}.{i}.op.weight" in sd:
                h = conv(h, f"{p}.{i}.op", stride=2, padding=1)
            elif f"{p}.{i}.conv.weight" in sd:
                h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"{p}.{i}.conv", padding=1)
        return h

    def exists(p):
        return any(k.startswith(f"{p}.") for k in sd)

    hs = [conv(x, "input_blocks.0.0", padding=1)]
    k = 1
    while exists(f"input_blocks.{k}"):
        hs.append(block(hs[-1], f"input_blocks.{k}", heads[0]))
        k += 1
    h = block(hs[-1], "middle_block", heads[0])
    k = 0
    while exists(f"output_blocks.{k}"):
        h = block(torch.cat([h, hs.pop()], dim=1), f"output_blocks.{k}", heads[1])
        k += 1
    return conv(F.silu(norm(h, "out.0")), "out.2", padding=1)


# ------------------------------------------------------------------- the official numbers

@pytest.mark.parametrize("name", FIXTURES)
def test_the_imported_model_gives_the_official_outputs_p_theta_and_ddim_samples(name):
    flags, ref, _, line = fixture(name)
    hparams, state, notes = model_and_state(DATA / name / "model.pt", line)
    assert notes == []
    unet = template_unet(hparams, state)
    T, y = hparams["timesteps"], ref.get("y")
    model = model_fn(unet, T, y)
    with torch.no_grad():
        out = unet(ref["x"], ref["t"].float() * (1000.0 / T), class_labels=y).sample
    err = max_rel(out, ref["model_out"])
    assert err <= 1e-5, f"model_out: max relative error {err:.2e}"

    diffusion = GaussianDiffusion(get_named_beta_schedule(hparams["noise_schedule"], T), hparams["model_var_type"])
    with torch.no_grad():
        p = diffusion.p_mean_variance(model, ref["x"], ref["t"])
    for key in ("mean", "log_variance"):
        err = max_rel(p[key], ref[key])
        assert err <= 1e-5, f"{key}: max relative error {err:.2e}"
    # x̂_0 = x_t/√ᾱ_t − √(1/ᾱ_t − 1)·ε multiplies the UNet's float32 rounding (~1e-6 of ε) by
    # √(1/ᾱ_t − 1), 257 at t = T − 2 of the class_cond fixture, the reference's rounding as well as ours
    # (the template's UNet in float64 is 1.5e-5 from it there): the largest error is measured in that
    # unit (measured: 1.8e-6), the whole tensor's in norm (measured: 5.1e-7); from the official UNet
    # output the template's p_θ is the official one (measured: bitwise)
    assert ((p["pred_xstart"] - ref["pred_xstart"]).norm() / ref["pred_xstart"].norm()).item() <= 1e-5
    gain = diffusion.sqrt_recipm1_alphas_cumprod[ref["t"]].clamp(min=1).float()  # (B,)
    err = (((p["pred_xstart"] - ref["pred_xstart"]).abs().flatten(1).amax(1) / gain).max()
           / ref["pred_xstart"].abs().max()).item()
    assert err <= 1e-5, f"pred_xstart: max relative error {err:.2e} per unit of √(1/ᾱ_t − 1)"
    exact = diffusion.p_from_output(ref["model_out"], ref["x"], ref["t"])
    for key in ("mean", "log_variance", "pred_xstart"):
        assert max_rel(exact[key], ref[key]) <= 1e-6, key

    ddim_model = model_fn(unet, T, ref.get("ddim_y"))
    samples = Sampler("ddim", flags["ddim_respacing"]).sample(diffusion, ddim_model, noise=ref["ddim_noise"])
    err = (samples - ref["ddim_samples"]).abs().max().item()
    assert err <= 1e-4, f"DDIM samples: max absolute error {err:.2e}"


@pytest.mark.parametrize("name", FIXTURES)
def test_the_import_command_s_checkpoint_gives_the_official_numbers_through_the_module(name, tmp_path, run_main):
    """The same numbers through the public route: ``python -m iddpm_lightning import``, then the
    checkpoint loaded as an IDDPM (its model_fn rescales t, its sample draws DDIM from given noise)."""
    flags, ref, _, line = fixture(name)
    code, out = run_main(["import", str(DATA / name / "model.pt"), "--flags", line, "--out",
                          str(tmp_path / "imported.ckpt")], cwd=tmp_path, ok=True)
    assert code == 0 and "rescale_timesteps=True" in out, out
    model = IDDPM.load_from_checkpoint(tmp_path / "imported.ckpt", map_location="cpu").eval()
    assert model.hparams.rescale_timesteps and torch.equal(
        torch.cat([p.flatten() for p in model.unet.parameters()]),
        torch.cat([p.flatten() for p in model.ema_unet.parameters()]))  # raw or EMA weights: loaded as both
    with torch.no_grad():
        out = model.model_fn(model.ema_unet, ref.get("y"))(ref["x"], ref["t"])
        p = model.diffusion.p_mean_variance(model.model_fn(model.ema_unet, ref.get("y")), ref["x"], ref["t"])
    assert max_rel(out, ref["model_out"]) <= 1e-5
    for key in ("mean", "log_variance"):
        assert max_rel(p[key], ref[key]) <= 1e-5, key
    samples = model.sample(Sampler("ddim", flags["ddim_respacing"]), noise=ref["ddim_noise"], labels=ref.get("ddim_y"))
    assert (samples - ref["ddim_samples"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", FIXTURES)
def test_the_written_out_official_forward_used_below_gives_the_official_outputs(name):
    flags, ref, state, _ = fixture(name)
    structure = structure_of(state)
    T = flags["official_flags"]["diffusion_steps"]
    with torch.no_grad():
        out = official_forward(state, structure, (4, 4), ref["x"], ref["t"].float() * (1000.0 / T), ref.get("y"))
    assert max_rel(out, ref["model_out"]) <= 1e-5


@pytest.mark.parametrize("name", FIXTURES)
def test_the_mapping_is_exact_both_ways(name):
    _, _, state, line = fixture(name)
    structure = structure_of(state)
    diffusers = official_to_diffusers(state, structure, 4)
    assert all(v.dtype == torch.float32 for v in diffusers.values())
    back = diffusers_to_official(diffusers, structure, 4)
    assert list(back) == list(state)  # the same keys, in the official order
    for k, v in state.items():
        assert torch.equal(back[k], v.float()), k
    again = official_to_diffusers(back, structure, 4)
    assert set(again) == set(diffusers)
    for k, v in diffusers.items():
        assert torch.equal(again[k], v), k
    assert set(diffusers) == set(template_unet(model_and_state(DATA / name / "model.pt", line)[0]).state_dict())
    # heads that do not divide a width, a structure the tensors do not have: one sentence each
    _refused("heads=3 does not divide", official_to_diffusers, state, structure, 3)
    _refused("has no tensor", diffusers_to_official, diffusers, {**structure, "num_res_blocks": 3}, 4)


def test_a_chunk3_split_of_qkv_mixes_the_heads_and_gives_other_outputs():
    flags, ref, state, line = fixture("cifar10_like")
    hparams, good, _ = model_and_state(DATA / "cifar10_like" / "model.pt", line)
    structure = structure_of(state)
    naive = official_to_diffusers(state, structure, 1)  # one head: W.reshape(1, 3, C, C)[:, i] is chunk(3)
    qkv = state["middle_block.1.qkv.weight"].float()[:, :, 0]  # (3C, C)
    assert torch.equal(naive["mid_block.attentions.0.to_k.weight"], qkv.chunk(3)[1])
    assert not torch.equal(good["mid_block.attentions.0.to_k.weight"], qkv.chunk(3)[1])
    T = hparams["timesteps"]
    with torch.no_grad():
        out = template_unet(hparams, naive)(ref["x"], ref["t"].float() * (1000.0 / T)).sample  # 4 heads
    assert max_rel(out, ref["model_out"]) > 1e-2


def official_parameter_count(f: dict) -> int:
    """The parameters of improved-diffusion's ``UNetModel`` for the parsed flags ``f``, counted as its
    ``__init__`` builds the layers (ResBlock: norm, 3x3 conv, the embedding's linear to 2C with the
    scale-shift norm, norm, 3x3 conv, a 1x1 skip where the width changes; AttentionBlock: norm, the
    qkv and proj 1x1 convs): a second route to the importer's ``official_shapes``."""
    mc, nrb, temb = f["num_channels"], f["num_res_blocks"], 4 * f["num_channels"]
    attention_ds = {f["image_size"] // int(r) for r in f["attention_resolutions"].split(",")}

    def conv(c_in, c_out, k=3):
        return c_in * c_out * k * k + c_out

    def res(c_in, c_out):
        emb = temb * (2 * c_out if f["use_scale_shift_norm"] else c_out) + (2 * c_out if f["use_scale_shift_norm"] else c_out)
        return 2 * c_in + conv(c_in, c_out) + emb + 2 * c_out + conv(c_out, c_out) + (conv(c_in, c_out, 1) if c_in != c_out else 0)

    def attn(c):
        return 2 * c + conv(c, 3 * c, 1) + conv(c, c, 1)

    n = (mc * temb + temb) + (temb * temb + temb) + (1000 * temb if f["class_cond"] else 0) + conv(3, mc)
    chans, ch, ds = [mc], mc, 1
    for level, mult in enumerate(f["channel_mult"]):
        for _ in range(nrb):
            n, ch = n + res(ch, mult * mc) + (attn(mult * mc) if ds in attention_ds else 0), mult * mc
            chans.append(ch)
        if level != len(f["channel_mult"]) - 1:
            n, ds = n + conv(ch, ch), ds * 2
            chans.append(ch)
    n += 2 * res(ch, ch) + attn(ch)
    for level, mult in list(enumerate(f["channel_mult"]))[::-1]:
        for i in range(nrb + 1):
            n, ch = n + res(ch + chans.pop(), mult * mc) + (attn(mult * mc) if ds in attention_ds else 0), mult * mc
            if level and i == nrb:
                n, ds = n + conv(ch, ch), ds // 2
    return n + 2 * ch + conv(mc, 6 if f["learn_sigma"] else 3)


@pytest.mark.parametrize("name", [n for n in RELEASED_FLAGS if n != "upsample_cond_500K"])
def test_every_released_model_s_layout_converts_with_its_built_in_flags(name):
    """Each released file's layout (shapes only: meta tensors), as its README flags describe it, is read,
    checked against the flags and converted onto the template's UNet, every tensor in its place."""
    f = parse_flags(RELEASED_FLAGS[name])
    structure = {"in_channels": 3, "model_channels": f["num_channels"], "out_channels": 6 if f["learn_sigma"] else 3,
                 "num_res_blocks": f["num_res_blocks"], "channel_mult": f["channel_mult"],
                 "attention_resolutions": sorted(f["image_size"] // int(r) for r in f["attention_resolutions"].split(",")),
                 "num_classes": 1000 if f["class_cond"] else None, "use_scale_shift_norm": f["use_scale_shift_norm"]}
    shapes = official_shapes(structure)
    assert sum(math.prod(s) for s in shapes.values()) == official_parameter_count(f)
    if name == "imagenet64_cond_270M_250K":
        assert round(official_parameter_count(f) / 1e7) == 27  # "270M parameters" (the README)
    hparams, state, notes = convert({k: torch.empty(s, device="meta") for k, s in shapes.items()}, RELEASED_FLAGS[name])
    with torch.device("meta"):
        unet = template_unet(hparams)
    assert {k: v.shape for k, v in unet.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert hparams["rescale_timesteps"] == f["rescale_timesteps"] and hparams["timesteps"] == f["diffusion_steps"]
    assert hparams["class_cond"] == f["class_cond"] and hparams["loss_type"] == ("vlb" if f["use_kl"] else "hybrid")


def test_the_released_upsampler_is_refused_by_its_tensors_and_by_its_flags():
    s = {"in_channels": 6, "model_channels": 192, "out_channels": 6, "num_res_blocks": 2, "attention_resolutions": [16, 32],
         "channel_mult": [1, 1, 2, 2, 4, 4], "num_classes": 1000, "use_scale_shift_norm": True}
    shapes = official_shapes(s)
    assert round(sum(math.prod(v) for v in shapes.values()) / 1e7) == 28  # "280M parameters" (the README)
    sd = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    with pytest.raises(ConfigError, match="super-resolution model"):
        convert(sd, RELEASED_FLAGS["upsample_cond_500K"])
    with pytest.raises(ConfigError, match="super-resolution model"):
        convert(sd, "--large_size 256 --small_size 64 " + RELEASED_FLAGS["upsample_cond_500K"])


def test_structure_of_reads_each_fixture():
    assert structure_of(fixture("cifar10_like")[2]) == {
        "in_channels": 3, "model_channels": 32, "out_channels": 6, "num_res_blocks": 2, "attention_resolutions": [2],
        "channel_mult": [1, 2], "num_classes": None, "use_scale_shift_norm": True}
    assert structure_of(fixture("class_cond")[2]) == {
        "in_channels": 1, "model_channels": 32, "out_channels": 1, "num_res_blocks": 1, "attention_resolutions": [2, 4],
        "channel_mult": [1, 2, 3], "num_classes": 10, "use_scale_shift_norm": True}
    # the structure is UNetModel's own arguments
    for name in FIXTURES:
        u = fixture(name)[0]["UNetModel"]
        assert structure_of(fixture(name)[2]) == {k: u[k] for k in structure_of(fixture(name)[2])}


def test_the_settings_of_each_fixture():
    hparams = model_and_state(DATA / "class_cond" / "model.pt", fixture("class_cond")[3])[0]
    assert hparams == {
        "unet": {"block_out_channels": [32, 64, 96], "layers_per_block": 1, "attention_resolutions": [8, 4],
                 "attention_head_dim": None, "dropout": 0.1, "num_heads": 4, "mid_attention_norm": True,
                 "use_scale_shift_norm": True, "num_heads_upsample": None},
        "image_size": 16, "in_channels": 1, "num_classes": 10, "class_cond": True, "timesteps": 400,
        "noise_schedule": "cosine", "model_var_type": "fixed_small", "loss_type": "simple", "rescale_timesteps": True}
    hparams = model_and_state(DATA / "cifar10_like" / "model.pt", fixture("cifar10_like")[3] + " --lr 2e-5")[0]
    assert (hparams["model_var_type"], hparams["loss_type"], hparams["lr"]) == ("learned_range", "hybrid", 2e-5)
    # the template's module takes them (rescale_timesteps is handled around it)
    from iddpm_lightning.module import IDDPM

    model = IDDPM(**{k: v for k, v in hparams.items() if k != "rescale_timesteps"})
    model.unet.load_state_dict(model_and_state(DATA / "cifar10_like" / "model.pt", fixture("cifar10_like")[3])[1])


# ------------------------------------------------------------------------------ flags

def test_parse_flags_reads_the_readme_lines():
    # the LSUN bedroom model, its --use_scale_shift_norm False written twice in the README
    lsun = parse_flags("--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True "
                       "--use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps 1000 "
                       "--noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False "
                       "--use_scale_shift_norm False --lr 2e-5 --batch_size 128")
    assert lsun["channel_mult"] == [1, 1, 2, 2, 4, 4] and lsun["num_heads"] == 1 and not lsun["use_scale_shift_norm"]
    assert lsun["script"] == {"lr": 2e-5, "batch_size": 128}
    assert {k: lsun[k] for k in OFFICIAL_DEFAULTS if k not in lsun["given"]} == \
        {k: v for k, v in OFFICIAL_DEFAULTS.items() if k not in lsun["given"]}
    # --flag=value, a repeated flag (the last wins), str2bool's spellings
    f = parse_flags("--image_size=32 --num_res_blocks 2 --num_res_blocks=3 --learn_sigma yes --class_cond 0 "
                    "--dropout=0.3 --num_heads_upsample -1")
    assert (f["image_size"], f["num_res_blocks"], f["learn_sigma"], f["class_cond"], f["dropout"]) == \
        (32, 3, True, False, 0.3)
    assert f["channel_mult"] == [1, 2, 2, 2] and f["in_channels"] == 3 and f["script"] == {}
    # the class-conditional ImageNet-64 model: rescale_learned_sigmas False is a note, not a refusal
    cond = parse_flags("--image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True --class_cond True "
                       "--diffusion_steps 4000 --noise_schedule cosine --rescale_learned_sigmas False "
                       "--rescale_timesteps False --lr 3e-4 --batch_size 2048 --schedule_sampler loss-second-moment")
    notes = import_notes(cond)
    assert any("--rescale_learned_sigmas False" in n and "T/1000 = 4" in n for n in notes)
    assert not any("rescale_learned_sigmas" in n for n in import_notes(lsun))  # at T = 1000 the weights agree
    assert any("--batch_size" in n for n in notes) and any("importance-sampling" in n for n in notes)
    imagenet64 = {"in_channels": 3, "model_channels": 192, "out_channels": 6, "num_res_blocks": 3,
                  "attention_resolutions": [4, 8], "channel_mult": [1, 2, 3, 4], "num_classes": 1000,
                  "use_scale_shift_norm": True}
    settings = template_settings(cond, imagenet64)
    assert settings["unet"]["attention_resolutions"] == [16, 8] and settings["lr"] == 3e-4
    assert (settings["rescale_timesteps"], settings["num_classes"], settings["timesteps"]) == (False, 1000, 4000)
    assert (settings["model_var_type"], settings["loss_type"]) == ("learned_range", "hybrid")
    vlb = template_settings(parse_flags("--image_size 64 --learn_sigma True --use_kl True"), imagenet64)
    assert vlb["loss_type"] == "vlb" and "lr" not in vlb
    assert template_settings(parse_flags("--image_size 64"), imagenet64)["model_var_type"] == "fixed_large"
    assert template_settings(parse_flags("--image_size 64 --sigma_small True"), imagenet64)["model_var_type"] \
        == "fixed_small"


def _refused(match: str, call, *args) -> str:
    """The one-sentence ConfigError of ``call(*args)``, which must contain ``match``."""
    with pytest.raises(ConfigError) as info:
        call(*args)
    message = str(info.value)
    assert match in message and "\n" not in message, message
    return message


def test_bad_flags_are_refused_in_one_sentence():
    assert "did you mean --num_channels" in _refused("--num_channel", parse_flags, "--num_channel 64")
    _refused("model_and_diffusion_defaults", parse_flags, "--foo 1")
    _refused("--predict_xstart True", parse_flags, "--image_size 32 --predict_xstart True")
    _refused("--large_size", parse_flags, "--large_size 256 --small_size 64")
    _refused("--learn_sigma 'maybe'", parse_flags, "--learn_sigma maybe")
    _refused("--num_channels '1.5'", parse_flags, "--num_channels 1.5")
    _refused("--learn_sigma has no value", parse_flags, "--learn_sigma --class_cond True")
    _refused("--noise_schedule", parse_flags, "--noise_schedule quadratic")
    _refused("--attention_resolutions", parse_flags, "--image_size 32 --attention_resolutions 12")
    _refused("--timestep_respacing 'fast'", parse_flags, "--timestep_respacing fast")
    _refused("close the quotes", parse_flags, "--data_dir 'images")
    assert parse_flags("--timestep_respacing ddim25 --data_dir ''")["timestep_respacing"] == "ddim25"
    assert "--channel_mult" in _refused("--image_size 48", parse_flags, "--image_size 48")
    assert parse_flags("--image_size 48 --channel_mult 1,2,3")["channel_mult"] == [1, 2, 3]


@pytest.mark.parametrize("name, extra, match", [
    ("cifar10_like", "--num_res_blocks 3", "--num_res_blocks 3 (the tensors have 2)"),
    ("cifar10_like", "--learn_sigma False", "--learn_sigma False (the tensors have 6 output channels"),
    ("cifar10_like", "--num_channels 64", "--num_channels 64 (the tensors have 32)"),
    ("cifar10_like", "--attention_resolutions 16,8", "--attention_resolutions 16,8 (the tensors have attention at 8"),
    ("cifar10_like", "--use_scale_shift_norm False", "--use_scale_shift_norm False (the tensors have it on)"),
    ("cifar10_like", "--num_heads 3", "--num_heads 3 (it does not divide"),
    ("class_cond", "--class_cond False", "--class_cond False (the tensors have a class embedding of 10 classes)"),
    ("class_cond", "--in_channels 3", "--in_channels 3 (the tensors have 1)"),
    ("class_cond", "--channel_mult 1,2,2", "--channel_mult 1,2,2 (the tensors have 1,2,3)"),
])
def test_flags_that_contradict_the_tensors_are_refused(name, extra, match):
    _refused(match, model_and_state, DATA / name / "model.pt", f"{fixture(name)[3]} {extra}")


def test_every_disagreement_is_named_in_the_one_sentence():
    message = _refused("--num_res_blocks 3", model_and_state, DATA / "cifar10_like" / "model.pt",
                       f"{fixture('cifar10_like')[3]} --num_res_blocks 3 --learn_sigma False --num_channels 64")
    assert "--learn_sigma False" in message and "--num_channels 64" in message
    # without --channel_mult the official derivation from image_size is named
    _refused("--channel_mult 1,2,2,2 (derived from --image_size 32)", model_and_state,
             DATA / "cifar10_like" / "model.pt", "--image_size 32 --num_channels 32 --learn_sigma True")


def test_files_that_are_not_an_official_unet_are_refused(tmp_path):
    _, _, state, line = fixture("cifar10_like")

    def saved(obj, name="x.pt"):
        torch.save(obj, tmp_path / name)
        return tmp_path / name

    _refused("does not exist", model_and_state, tmp_path / "missing.pt", line)
    _refused("Lightning checkpoint", model_and_state, saved({"state_dict": state, "epoch": 1}), line)
    _refused("no tensor input_blocks.0.0.weight", model_and_state, saved({"a": torch.randn(3)}), line)
    _refused("holds a list", model_and_state, saved([torch.randn(3)]), line)
    _refused("weights-only", model_and_state, saved(UNetConfig()), line)  # pickled code
    (tmp_path / "text.pt").write_text("not a checkpoint")
    _refused("weights-only", model_and_state, tmp_path / "text.pt", line)
    broken = {k: v for k, v in state.items() if k != "output_blocks.2.1.qkv.weight"}
    _refused("it lacks output_blocks.2.1.qkv.weight", model_and_state, saved(broken), line)
    # the super-resolution model: its input is the image and an upsampled low-resolution one
    sr = {**state, "input_blocks.0.0.weight": torch.randn(32, 6, 3, 3)}
    _refused("super-resolution", model_and_state, saved(sr), line.replace("--in_channels 3", "--in_channels 6"))


# ------------------------------------------------------------------ the UNet's new settings

def test_use_scale_shift_norm_false_is_diffusers_default_time_embedding_path():
    unet = build_unet(UNetConfig([32, 64], 1, [8], use_scale_shift_norm=False), 16, 3, 3)
    resnets = [m for b in [*unet.down_blocks, unet.mid_block, *unet.up_blocks] for m in b.resnets]
    assert resnets and all(r.time_embedding_norm == "default" for r in resnets)
    assert all(r.time_emb_proj.out_features == r.conv1.out_channels for r in resnets)  # e added: C rows, not 2C
    assert unet.mid_block.attentions[0].group_norm is not None
    on = build_unet(UNetConfig([32, 64], 1, [8]), 16, 3, 3)
    assert all(r.time_emb_proj.out_features == 2 * r.conv1.out_channels
               for b in [*on.down_blocks, on.mid_block, *on.up_blocks] for r in b.resnets)


def test_num_heads_upsample_sets_the_up_paths_heads():
    unet = build_unet(UNetConfig([32, 64], 1, [8, 16], num_heads=2, num_heads_upsample=4), 16, 3, 3)
    # module order: down (32, 64), up (64 x 2, 32 x 2), middle (64)
    assert attention_heads(unet) == [(32, 2), (64, 2), (64, 4), (64, 4), (32, 4), (32, 4), (64, 2)]
    assert unet.config.attention_head_dim is None  # other channels per head: export refuses it
    same = build_unet(UNetConfig([64, 64], 1, [8, 16], num_heads=2, num_heads_upsample=2), 16, 3, 3)
    assert same.config.attention_head_dim == 32 and {h for _, h in attention_heads(same)} == {2}
    _refused("model.unet.num_heads_upsample=3 does not divide the 32 channels", build_unet,
             UNetConfig([32, 64], 1, [8, 16], num_heads_upsample=3), 16, 3, 3)


def test_scale_shift_off_and_other_up_heads_convert_both_ways_and_compute_the_official_function(tmp_path):
    torch.manual_seed(0)
    hparams = {"unet": {"block_out_channels": [32, 64], "layers_per_block": 1, "attention_resolutions": [8],
                        "attention_head_dim": None, "dropout": 0.0, "num_heads": 2, "mid_attention_norm": True,
                        "use_scale_shift_norm": False, "num_heads_upsample": 4},
               "image_size": 16, "in_channels": 3, "num_classes": 5, "class_cond": True, "timesteps": 50,
               "noise_schedule": "linear", "model_var_type": "fixed_large", "loss_type": "simple",
               "rescale_timesteps": True}
    unet = template_unet(hparams)
    with torch.no_grad():
        for p in unet.parameters():  # every tensor non-zero, the zero-initialised ones too
            p.normal_(0, 0.2)
    structure = template_structure(hparams)
    official = diffusers_to_official(unet.state_dict(), structure, (2, 4))
    assert structure_of(official) == structure and not structure["use_scale_shift_norm"]
    back = official_to_diffusers(official, structure, (2, 4))
    assert set(back) == set(unet.state_dict())
    assert all(torch.equal(back[k], v) for k, v in unet.state_dict().items())

    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([0.0, 20.0, 980.0]), torch.tensor([0, 4, 2])
    with torch.no_grad():
        expected = official_forward(official, structure, (2, 4), x, t, y)
        assert max_rel(unet(x, t, class_labels=y).sample, expected) <= 1e-5
        assert max_rel(official_forward(official, structure, (2, 2), x, t, y), expected) > 1e-3  # the up heads matter

    # and back in through the file and flags the official scripts would use
    described = official_flags_of(hparams)
    path = tmp_path / "model.pt"
    torch.save(official, path)
    imported, state, _ = model_and_state(path, f"{described.flags_line} --channel_mult 1,2")
    assert imported == hparams
    assert all(torch.equal(state[k], v) for k, v in unet.state_dict().items())


# ------------------------------------------------------------------------- the other way

@pytest.mark.parametrize("name", FIXTURES)
def test_official_flags_of_gives_back_the_fixtures_flags_and_unet_arguments(name):
    flags, _, _, line = fixture(name)
    hparams = model_and_state(DATA / name / "model.pt", line)[0]
    described = official_flags_of(hparams)
    assert described.flags == {k: flags["official_flags"][k] for k in MODEL_FLAGS}
    assert described.unet_kwargs == flags["UNetModel"]
    assert described.flags_line == flags["flags_line"]
    assert described.not_from_flags  # 16 pixels: the official scripts derive no channel_mult
    if name == "class_cond":
        assert any("in_channels 1" in r for r in described.not_from_flags)
        assert any("num_classes 10" in r for r in described.not_from_flags)
    check_against_flags(structure_of(fixture(name)[2]), parse_flags(line))


def test_official_flags_of_a_paper_model_needs_only_flags():
    hparams = {"unet": UNetConfig(), "image_size": 32, "in_channels": 3, "num_classes": 0, "class_cond": False,
               "timesteps": 4000, "noise_schedule": "cosine", "model_var_type": "learned_range", "loss_type": "hybrid"}
    described = official_flags_of(hparams)
    assert described.not_from_flags == []
    assert described.flags_line.startswith("--image_size 32 --num_channels 128 --num_res_blocks 3 --num_heads 4 ")
    assert described.flags["attention_resolutions"] == "16,8" and described.flags["learn_sigma"]
    assert described.flags["rescale_timesteps"] is False  # saved without it: the UNet saw t as it is
    assert described.unet_kwargs["attention_resolutions"] == [2, 4]
    assert "no level has attention" in official_flags_of({**hparams, "unet": UNetConfig(attention_resolutions=[])}
                                                         ).not_from_flags[0]
    with_heads = official_flags_of({**hparams, "unet": UNetConfig([128, 256, 256, 256], attention_head_dim=64)})
    assert with_heads.flags["num_heads"] == 4 and with_heads.flags["num_heads_upsample"] == -1
    _refused("model.unet.attention_head_dim=32", official_flags_of,
             {**hparams, "unet": UNetConfig([128, 256, 384, 512], attention_head_dim=32), "image_size": 64})
