"""The official flags (improved-diffusion's README and ``script_util.py``) both ways: read and checked
against the tensors, turned into this template's settings, and written for a template model."""

from __future__ import annotations

import difflib
import re
import shlex
from typing import Any, NamedTuple

from ..errors import ConfigError
from ..settings import RESPACING_PATTERN
from .layout import attention_widths, csv, unet_settings, template_structure

# improved-diffusion's script_util.model_and_diffusion_defaults() (commit 1bc7bbbdc414).
OFFICIAL_DEFAULTS: dict[str, Any] = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    attention_resolutions="16,8",
    dropout=0.0,
    learn_sigma=False,
    sigma_small=False,
    class_cond=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=True,
    rescale_learned_sigmas=True,
    use_checkpoint=False,
    use_scale_shift_norm=True,
)
# The flags of its training, sampling and likelihood scripts (image_train/sample/nll.py), with
# their defaults: accepted, and returned apart, since they do not describe the model.
SCRIPT_FLAGS: dict[str, Any] = dict(
    data_dir="", schedule_sampler="uniform", lr=1e-4, weight_decay=0.0, lr_anneal_steps=0, batch_size=1,
    microbatch=-1, ema_rate="0.9999", log_interval=10, save_interval=10000, resume_checkpoint="", use_fp16=False,
    fp16_scale_growth=1e-3, clip_denoised=True, num_samples=10000, use_ddim=False, model_path="",
)
# Not official flags: the official scripts derive channel_mult from image_size and fix 3 channels.
IMPORTER_FLAGS: dict[str, Any] = dict(channel_mult=None, in_channels=3)
# script_util's channel_mult per image_size; NUM_CLASSES of a class_cond model.
CHANNEL_MULT = {32: [1, 2, 2, 2], 64: [1, 2, 3, 4], 256: [1, 1, 2, 2, 4, 4]}
NUM_CLASSES = 1000
# The flags a model determines, in the order the README and flags_line write them.
MODEL_FLAGS = ("image_size", "num_channels", "num_res_blocks", "num_heads", "num_heads_upsample",
               "attention_resolutions", "dropout", "learn_sigma", "sigma_small", "class_cond", "diffusion_steps",
               "noise_schedule", "use_kl", "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas",
               "use_scale_shift_norm")
# The released models (improved-diffusion's README, "Models and Hyperparameters"): their file name
# and MODEL_FLAGS + DIFFUSION_FLAGS as written there (the LSUN 2400K line's repeated flag included).
RELEASED_FLAGS: dict[str, str] = {
    "imagenet64_uncond_100M_1500K": "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True "
                                    "--diffusion_steps 4000 --noise_schedule cosine",
    "cifar10_uncond_50M_500K": "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
                               "--diffusion_steps 4000 --noise_schedule cosine",
    "imagenet64_cond_270M_250K": "--image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True --class_cond "
                                 "True --diffusion_steps 4000 --noise_schedule cosine --rescale_learned_sigmas False "
                                 "--rescale_timesteps False",
    "upsample_cond_500K": "--num_channels 192 --num_res_blocks 2 --learn_sigma True --class_cond True --diffusion_steps "
                          "4000 --noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False",
    "lsun_uncond_100M_1200K_bs128": "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma "
                                    "True --use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps "
                                    "1000 --noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False",
    "lsun_uncond_100M_2400K_bs64": "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma "
                                   "True --use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps 1000 "
                                   "--noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False "
                                   "--use_scale_shift_norm False",
    "imagenet64_uncond_vlb_100M_1500K": "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True "
                                        "--diffusion_steps 4000 --noise_schedule cosine --use_kl True",
    "cifar10_uncond_vlb_50M_500K": "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout "
                                   "0.3 --diffusion_steps 4000 --noise_schedule cosine --use_kl True",
}
_TRUE, _FALSE = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")  # script_util.str2bool


# ------------------------------------------------------------------------------------ flags

def _value(name: str, text: str, kind: type) -> Any:
    """``text`` as a value of ``kind`` (booleans as script_util's str2bool reads them)."""
    try:
        if kind is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError(text)
            return text.lower() in _TRUE
        if kind is list:
            return [int(m) for m in text.split(",")]
        return kind(text)
    except ValueError:
        what = {bool: "True or False", int: "an integer", float: "a number",
                list: "comma-separated integers like 1,2,2,2"}[kind]
        raise ConfigError(f"--{name} {text!r} is not a valid value; write {what}") from None


def parse_flags(line: str) -> dict[str, Any]:
    """improved-diffusion's flags as its README writes them (``--image_size 32 --learn_sigma True``,
    or ``--flag=value``; a repeated flag: the last wins), over ``OFFICIAL_DEFAULTS``.

    Returns every model/diffusion flag, ``channel_mult`` (given, or derived from image_size as the
    official scripts do) and ``in_channels``, plus ``script``: the training/sampling script flags
    that were given (not used; ``lr`` and ``schedule_sampler`` matter for fine-tuning) and
    ``given``: the names given. Bad input raises one ConfigError sentence.
    """
    model = {**OFFICIAL_DEFAULTS, **IMPORTER_FLAGS}
    script: dict[str, Any] = {}
    try:
        tokens = shlex.split(line)
    except ValueError as e:
        raise ConfigError(f"the flags {line!r} cannot be split into words ({e}); close the quotes") from None
    given: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ConfigError(f"{token!r} in the flags is not a --flag or a flag's value; write flags as --name value")
        name, has_value, text = token[2:].partition("=")
        if not has_value:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ConfigError(f"--{name} has no value; write --{name} VALUE (booleans as True or False)")
            text, i = tokens[i + 1], i + 1
        i += 1
        if name in ("large_size", "small_size"):
            raise ConfigError(
                f"--{name} is a flag of the official super-resolution model (SuperResModel, conditioned on a "
                f"low-resolution image), which this template cannot run; import an image_train.py model instead"
            )
        if name in model:
            model[name] = _value(name, text, list if name == "channel_mult" else type(model[name]))
        elif name in SCRIPT_FLAGS:
            script[name] = _value(name, text, type(SCRIPT_FLAGS[name]))
        else:
            close = difflib.get_close_matches(name, [*model, *SCRIPT_FLAGS], n=1)
            raise ConfigError(
                f"unknown flag --{name}{f' (did you mean --{close[0]}?)' if close else ''}; valid flags are "
                f"improved-diffusion's model_and_diffusion_defaults() in script_util.py, the flags of its "
                f"image_train.py, image_sample.py and image_nll.py, and this importer's --channel_mult and --in_channels"
            )
        given.append(name)
    _check_values(model)
    if model["channel_mult"] is None:
        model["channel_mult"] = CHANNEL_MULT.get(model["image_size"])
        if model["channel_mult"] is None:
            raise ConfigError(
                f"--image_size {model['image_size']} has no channel_mult the official scripts derive (only image "
                f"sizes 32, 64 and 256 have one); pass the model's multipliers too, e.g. --channel_mult 1,2,2,2"
            )
    return {**model, "script": script, "given": list(dict.fromkeys(given))}


def _check_values(flags: dict[str, Any]) -> None:
    """Refuse values no official model has, and ``predict_xstart``, naming the flag."""
    for name in ("image_size", "num_channels", "num_res_blocks", "num_heads", "diffusion_steps", "in_channels"):
        if flags[name] < 1:
            raise ConfigError(f"--{name} {flags[name]} is not valid; use a positive integer")
    if flags["num_heads_upsample"] < 1 and flags["num_heads_upsample"] != -1:
        raise ConfigError(f"--num_heads_upsample {flags['num_heads_upsample']} is not valid; use -1 (= num_heads) "
                          f"or a positive integer")
    if not 0 <= flags["dropout"] < 1:
        raise ConfigError(f"--dropout {flags['dropout']} is not valid; use a value in [0, 1)")
    if flags["noise_schedule"] not in ("linear", "cosine"):
        raise ConfigError(f"--noise_schedule {flags['noise_schedule']} is not valid; use linear or cosine")
    if flags["channel_mult"] is not None and not all(m >= 1 for m in flags["channel_mult"]):
        raise ConfigError(f"--channel_mult {flags['channel_mult']} is not valid; use positive integers like 1,2,2,2")
    resolutions = flags["attention_resolutions"].split(",") if flags["attention_resolutions"] else []
    if not all(r.strip().isdigit() and int(r) >= 1 and flags["image_size"] % int(r) == 0 for r in resolutions):
        raise ConfigError(
            f"--attention_resolutions {flags['attention_resolutions']!r} is not valid; use comma-separated "
            f"resolutions in pixels that divide --image_size {flags['image_size']}, like 16,8"
        )
    if flags["timestep_respacing"] and not re.match(RESPACING_PATTERN, flags["timestep_respacing"]):
        raise ConfigError(f"--timestep_respacing {flags['timestep_respacing']!r} is not valid; use a count like 250, "
                          f"section counts like 10,15,25 or a DDIM stride like ddim250")
    if flags["predict_xstart"]:
        raise ConfigError(
            "--predict_xstart True is a model that predicts x_0, but this template's models predict ε (the noise); "
            "only checkpoints trained with --predict_xstart False can be imported"
        )


def heads_of(flags: dict[str, Any]) -> tuple[int, int]:
    """(heads of the down path and middle block, heads of the up path): ``num_heads``, and
    ``num_heads_upsample`` unless it is -1 (the official "same as num_heads")."""
    upsample = flags["num_heads_upsample"]
    return flags["num_heads"], flags["num_heads"] if upsample == -1 else upsample


def _attention_ds(flags: dict[str, Any]) -> list[int]:
    """The flags' attention resolutions as downsampling factors, image_size // resolution."""
    text = flags["attention_resolutions"]
    return sorted({flags["image_size"] // int(r) for r in text.split(",")} if text else set())


def check_against_flags(structure: dict[str, Any], flags: dict[str, Any]) -> None:
    """Raise one ConfigError naming every flag that disagrees with the tensors (and the value
    the tensors show), or that names the super-resolution model."""
    s = structure
    image_channels = s["out_channels"] // 2 if flags["learn_sigma"] else s["out_channels"]
    if s["in_channels"] in (2 * image_channels, 2 * s["out_channels"]):
        raise ConfigError(
            f"the checkpoint's input has {s['in_channels']} channels, twice its output image's: that is the official "
            f"super-resolution model (the image and an upsampled low-resolution one), which this template cannot "
            f"run; import an image_train.py model instead"
        )
    wrong = []
    if flags["num_channels"] != s["model_channels"]:
        wrong.append(f"--num_channels {flags['num_channels']} (the tensors have {s['model_channels']})")
    if flags["channel_mult"] != s["channel_mult"]:
        derived = "" if "channel_mult" in flags["given"] else f" (derived from --image_size {flags['image_size']})"
        wrong.append(f"--channel_mult {csv(flags['channel_mult'])}{derived} (the tensors have {csv(s['channel_mult'])})")
    if flags["num_res_blocks"] != s["num_res_blocks"]:
        wrong.append(f"--num_res_blocks {flags['num_res_blocks']} (the tensors have {s['num_res_blocks']})")
    # resolutions at no level are ignored, as the official UNetModel ignores them
    if [d for d in _attention_ds(flags) if d < 2 ** len(s["channel_mult"])] != s["attention_resolutions"]:
        pixels = csv(flags["image_size"] // d for d in s["attention_resolutions"])
        wrong.append(f"--attention_resolutions {flags['attention_resolutions'] or 'none'} (the tensors have attention "
                     f"at {pixels} pixels for --image_size {flags['image_size']})")
    if flags["in_channels"] != s["in_channels"]:
        wrong.append(f"--in_channels {flags['in_channels']} (the tensors have {s['in_channels']})")
    if s["out_channels"] != (2 if flags["learn_sigma"] else 1) * s["in_channels"]:
        wrong.append(f"--learn_sigma {flags['learn_sigma']} (the tensors have {s['out_channels']} output channels for "
                     f"{s['in_channels']} input channels)")
    if flags["class_cond"] != (s["num_classes"] is not None):
        has = f"a class embedding of {s['num_classes']} classes" if s["num_classes"] else "no class embedding"
        wrong.append(f"--class_cond {flags['class_cond']} (the tensors have {has})")
    if flags["use_scale_shift_norm"] != s["use_scale_shift_norm"]:
        wrong.append(f"--use_scale_shift_norm {flags['use_scale_shift_norm']} (the tensors have it "
                     f"{'on' if s['use_scale_shift_norm'] else 'off'})")
    attended, middle = attention_widths(s)
    heads = {"num_heads": (flags["num_heads"], attended | {middle})}
    if flags["num_heads_upsample"] != -1:
        heads["num_heads_upsample"] = (flags["num_heads_upsample"], attended)
    for name, (n, widths) in heads.items():
        if any(w % n for w in widths):
            wrong.append(f"--{name} {n} (it does not divide the attention layers' {csv(sorted(widths))} channels)")
    if wrong:
        raise ConfigError(f"the flags disagree with the checkpoint's tensors: {'; '.join(wrong)}; pass the flags the "
                          f"checkpoint was trained with")


def template_settings(flags: dict[str, Any], structure: dict[str, Any]) -> dict[str, Any]:
    """The IDDPM hyper-parameters (``IDDPM.__init__``'s keys, plus ``rescale_timesteps``) of an
    official model. The UNet's structure comes from the tensors, the diffusion from the flags."""
    mc, mult = structure["model_channels"], structure["channel_mult"]
    upsample = flags["num_heads_upsample"]
    settings = {
        "unet": {
            "block_out_channels": [m * mc for m in mult],
            "layers_per_block": structure["num_res_blocks"],
            "attention_resolutions": [flags["image_size"] // d for d in structure["attention_resolutions"]],
            "attention_head_dim": None,
            "dropout": flags["dropout"],
            "num_heads": flags["num_heads"],
            "mid_attention_norm": True,
            "use_scale_shift_norm": structure["use_scale_shift_norm"],
            "num_heads_upsample": None if upsample in (-1, flags["num_heads"]) else upsample,
        },
        "image_size": flags["image_size"],
        "in_channels": structure["in_channels"],
        "num_classes": structure["num_classes"] or 0,
        "class_cond": structure["num_classes"] is not None,
        "timesteps": flags["diffusion_steps"],
        "noise_schedule": flags["noise_schedule"],
        "model_var_type": "learned_range" if flags["learn_sigma"] else "fixed_small" if flags["sigma_small"]
        else "fixed_large",
        "loss_type": "vlb" if flags["use_kl"] else "hybrid" if flags["learn_sigma"] else "simple",
        "rescale_timesteps": flags["rescale_timesteps"],
    }
    if "lr" in flags["script"]:
        settings["lr"] = flags["script"]["lr"]
    return settings


def import_notes(flags: dict[str, Any]) -> list[str]:
    """Where the imported model will train or sample otherwise than the official code, and which
    given flags were not used."""
    notes = []
    T = flags["diffusion_steps"]
    if flags["learn_sigma"] and not flags["use_kl"] and not flags["rescale_learned_sigmas"] and T != 1000:
        notes.append(f"--rescale_learned_sigmas False: the official training weighted the vb term by 1, this template "
                     f"by T/1000 = {T / 1000:g} (the paper's λ = 0.001); only fine-tuning is affected, sampling is the same")
    if flags["timestep_respacing"]:
        notes.append(f"--timestep_respacing {flags['timestep_respacing']} is a sampling choice, not part of the "
                     f"model: give it to this template's sampling steps instead")
    unused = [n for n in flags["script"] if n not in ("lr", "schedule_sampler")]
    if unused:
        notes.append(f"ignored (training/sampling script flags): {', '.join('--' + n for n in unused)}")
    if flags["script"].get("schedule_sampler", "uniform") != "uniform":
        notes.append(f"--schedule_sampler {flags['script']['schedule_sampler']}: fine-tune with this template's "
                     f"importance-sampling callback to sample t the same way")
    return notes


class OfficialModel(NamedTuple):
    """A template model described for the official code: its flags (``MODEL_FLAGS``), the same as a
    command line, ``UNetModel``'s keyword arguments, and why the official scripts cannot build it
    from the flags alone (empty if they can; else build ``UNetModel(**unet_kwargs)`` directly)."""

    flags: dict[str, Any]
    flags_line: str
    unet_kwargs: dict[str, Any]
    not_from_flags: list[str]


def official_flags_of(hparams: dict[str, Any]) -> OfficialModel:
    """The official flags and ``UNetModel`` arguments of a template model (its ``hparams``, as
    ``IDDPM`` saves them), so that improved-diffusion's image_sample.py / image_nll.py run it on
    ``diffusers_to_official`` of its weights. A model saved without ``rescale_timesteps`` saw t
    unscaled: --rescale_timesteps False."""
    structure = template_structure(hparams)
    unet = unet_settings(hparams)
    attended, middle = attention_widths(structure)
    all_widths = attended | {middle}
    if unet["attention_head_dim"] is not None:
        heads = {w // unet["attention_head_dim"] for w in all_widths}
        if len(heads) != 1:
            raise ConfigError(
                f"model.unet.attention_head_dim={unet['attention_head_dim']} gives the attention layers of "
                f"{sorted(all_widths)} channels different head counts, which the official UNetModel (one num_heads) "
                f"cannot build; only models with one head count convert"
            )
        num_heads, upsample = heads.pop(), -1
    else:
        num_heads = unet["num_heads"]
        upsample = unet["num_heads_upsample"] or -1
        upsample = -1 if upsample == num_heads else upsample
    image_size, var = hparams["image_size"], hparams["model_var_type"]
    flags = {
        "image_size": image_size,
        "num_channels": structure["model_channels"],
        "num_res_blocks": structure["num_res_blocks"],
        "num_heads": num_heads,
        "num_heads_upsample": upsample,
        "attention_resolutions": ",".join(str(image_size // d) for d in structure["attention_resolutions"]),
        "dropout": unet["dropout"],
        "learn_sigma": var == "learned_range",
        "sigma_small": var == "fixed_small",
        "class_cond": bool(hparams["class_cond"]),
        "diffusion_steps": hparams["timesteps"],
        "noise_schedule": hparams["noise_schedule"],
        "use_kl": hparams["loss_type"] == "vlb",
        "predict_xstart": False,
        "rescale_timesteps": bool(hparams.get("rescale_timesteps", False)),
        "rescale_learned_sigmas": True,
        "use_scale_shift_norm": structure["use_scale_shift_norm"],
    }
    unet_kwargs = {**{k: structure[k] for k in ("in_channels", "model_channels", "out_channels", "num_res_blocks",
                                                "attention_resolutions")},
                   "dropout": unet["dropout"], "channel_mult": structure["channel_mult"],
                   "num_classes": structure["num_classes"], "num_heads": num_heads, "num_heads_upsample": upsample,
                   "use_scale_shift_norm": structure["use_scale_shift_norm"]}
    blockers = []
    if CHANNEL_MULT.get(image_size) != structure["channel_mult"]:
        blockers.append(f"channel_mult {structure['channel_mult']} is not the one the official scripts derive for "
                        f"image_size {image_size} ({CHANNEL_MULT.get(image_size, 'none')})")
    if not structure["attention_resolutions"]:
        blockers.append("no level has attention: the official scripts read --attention_resolutions as at least one "
                        "resolution")
    if structure["in_channels"] != 3:
        blockers.append(f"in_channels {structure['in_channels']}: the official scripts build 3")
    if structure["num_classes"] not in (None, NUM_CLASSES):
        blockers.append(f"num_classes {structure['num_classes']}: the official scripts build {NUM_CLASSES}")
    line = " ".join(f"--{k} {_flag_text(v)}" for k, v in flags.items())
    return OfficialModel(flags, line, unet_kwargs, blockers)


def _flag_text(value: Any) -> str:
    """A flag's value as the official README writes it (True/False, numbers, text)."""
    return str(value) if value != "" else "''"
