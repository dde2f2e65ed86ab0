"""The paper's released checkpoints (openai/improved-diffusion) through this template, and back.

    python -m iddpm_lightning import MODEL.pt --flags "<MODEL_FLAGS> <DIFFUSION_FLAGS>" --out imported.ckpt
    python -m iddpm_lightning import cifar10_uncond_50M_500K.pt --out imported.ckpt   # a released file: its flags built in
    python -m iddpm_lightning export --ckpt_path RUN/checkpoints/last.ckpt --format official --out DIR

improved-diffusion saves a plain ``state_dict`` of its ``UNetModel`` (``model*.pt``, ``ema_*.pt``,
the released files) and describes the model by the flags of its README, over
``model_and_diffusion_defaults()``. ``import`` reads both, checks that they agree (``flags.py``),
maps the tensors onto diffusers' ``UNet2DModel`` as ``unet.build_unet`` builds it (``layout.py``:
the one non-trivial tensor is the attention's q/k/v, split per head), and writes a checkpoint of
this project that ``test``, ``predict``, ``evaluate``, ``export`` and ``fit`` (fine-tuning) take
with ``--ckpt_path``. Released files may hold raw or EMA weights (the official repository never
said): both the model and its EMA get them. The official model sees t·1000/T
(``rescale_timesteps``), which the imported model keeps (``model.rescale_timesteps``).
``export --format official`` writes a checkpoint of this project as an official ``model.pt`` and
the flags that build it (``flags.json``, the format of ``tests/data/improved_diffusion``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import time
from pathlib import Path
from typing import Any

import torch

from ..checkpointing import SAVED_AT, read_checkpoint, write_durably
from ..errors import ConfigError
from .flags import (CHANNEL_MULT, MODEL_FLAGS, OFFICIAL_DEFAULTS, RELEASED_FLAGS, OfficialModel, check_against_flags,
                    heads_of, import_notes, official_flags_of, parse_flags, template_settings)
from .layout import (_EXPECTED, diffusers_to_official, official_shapes, official_to_diffusers, structure_of,
                     template_structure)

__all__ = ["CHANNEL_MULT", "MODEL_FLAGS", "OFFICIAL_DEFAULTS", "OfficialModel", "RELEASED_FLAGS",
           "check_against_flags", "convert", "diffusers_to_official", "export_official", "import_checkpoint",
           "import_notes", "model_and_state", "official_flags_of", "official_shapes", "official_to_diffusers",
           "parse_flags", "structure_of", "template_settings", "template_structure"]



def model_and_state(path: str | Path, flags_line: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """(IDDPM hyper-parameters, diffusers state_dict, notes) of an official checkpoint file and its
    README flags: parsed, read, inferred, checked against each other, converted."""
    parse_flags(flags_line)  # bad flags are refused before the file is read
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; give the path of an improved-diffusion .pt file "
                          f"(e.g. a released one, downloaded beforehand)")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
        raise ConfigError(f"checkpoint {path} cannot be read as a weights-only PyTorch file ({reason}); expected "
                          f"{_EXPECTED}") from None
    return convert(state_dict, flags_line)


def convert(state_dict: Any, flags_line: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """``model_and_state`` of a ``state_dict`` already loaded."""
    flags = parse_flags(flags_line)
    structure = structure_of(state_dict)
    check_against_flags(structure, flags)
    return (template_settings(flags, structure), official_to_diffusers(state_dict, structure, heads_of(flags)),
            import_notes(flags))


def import_checkpoint(path: str | Path, flags_line: str, out: str | Path, overwrite: bool = False
                      ) -> tuple[Path, dict[str, Any], list[str]]:
    """Write the official checkpoint ``path`` (described by ``flags_line``) as a checkpoint of this
    project at ``out``: its hyper-parameters, the weights as both the model's and its EMA's (step 0),
    and where they came from. Everything is checked before anything is written, and the file is
    written atomically, so a refused import leaves nothing. Returns (out, hparams, notes)."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the path of the .ckpt file to write")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} already exists; choose another path, or pass --overwrite to replace it")
    hparams, unet, notes = model_and_state(path, flags_line)
    from ..module import IDDPM

    model = IDDPM(**hparams)  # builds the UNet: a structure this template cannot build is refused here
    state_dict = {**{f"unet.{k}": v for k, v in unet.items()}, **{f"ema_unet.{k}": v for k, v in unet.items()},
                  "ema_updates": torch.zeros((), dtype=torch.long)}
    model.load_state_dict(state_dict)  # strict: every tensor has its place
    import lightning

    checkpoint = {  # the model's structure only: the config gives how to train it (lr, EMA, seed) when fine-tuning
        "state_dict": state_dict, "hyper_parameters": hparams, "epoch": 0, "global_step": 0,
        "pytorch-lightning_version": lightning.__version__, SAVED_AT: time.time_ns(),
        "imported_from": {"file": str(Path(path).resolve()), "sha256": _sha256(Path(path)), "flags": flags_line,
                          "notes": notes},
    }
    write_durably(out, lambda tmp: torch.save(checkpoint, tmp))
    return out, hparams, notes


def export_official(ckpt_path: str | Path, out_dir: str | Path, use_ema: bool = True, overwrite: bool = False) -> Path:
    """Write a checkpoint of this project as the official code's files: ``{out_dir}/model.pt`` (the EMA
    UNet's weights, or the raw ones, in UNetModel's layout) and ``{out_dir}/flags.json``
    (``official_flags``, ``flags_line`` and ``UNetModel``'s arguments, and ``not_from_flags``: why
    the official scripts cannot build it from the flags alone, if so)."""
    ckpt = read_checkpoint(ckpt_path)
    hparams = dict(ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
    hparams.pop("_instantiator", None)
    if not hparams or not isinstance(ckpt.get("state_dict"), dict):
        raise ConfigError(f"ckpt_path {ckpt_path} holds no IDDPM hyper_parameters and state_dict; give a checkpoint "
                          f"written by 'python -m iddpm_lightning fit' or 'import'")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out_dir} exists and is not empty; choose a new folder, or pass --overwrite")
    official = official_flags_of(hparams)
    prefix = "ema_unet." if use_ema else "unet."
    unet = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    state_dict = diffusers_to_official(unet, template_structure(hparams), heads_of(official.flags))
    write_durably(out_dir / "model.pt", lambda tmp: torch.save(state_dict, tmp))
    flags = json.dumps(_flags_json(official, ckpt_path, use_ema), indent=1) + "\n"
    write_durably(out_dir / "flags.json", lambda tmp: tmp.write_text(flags))
    return out_dir


def _flags_json(official: OfficialModel, ckpt_path, use_ema: bool) -> dict:
    return {"official_flags": official.flags, "flags_line": official.flags_line, "UNetModel": official.unet_kwargs,
            "not_from_flags": official.not_from_flags,
            "source": {"checkpoint": str(Path(ckpt_path).resolve()), "weights": "EMA" if use_ema else "raw"}}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_main(argv: list[str] | None = None) -> None:
    """``python -m iddpm_lightning import MODEL.pt --flags "..." --out imported.ckpt [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="python -m iddpm_lightning import",
        description="Import a checkpoint of openai/improved-diffusion (a released model.pt or ema_*.pt) as a "
                    "checkpoint of this project, for test, predict, evaluate, export and fit.")
    parser.add_argument("checkpoint", help="the official .pt file (a plain UNetModel state_dict)")
    parser.add_argument("--flags",
                        help='the flags as the official README writes them, e.g. "--image_size 32 --num_channels '
                             '128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 --diffusion_steps 4000 '
                             '--noise_schedule cosine"; unset flags take model_and_diffusion_defaults(). Not needed '
                             'for a released file under its own name (' + ", ".join(RELEASED_FLAGS) + ')')
    parser.add_argument("--out", required=True, help="the .ckpt file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    flags = args.flags
    if flags is None:
        name = Path(args.checkpoint).name.removesuffix(".pt")
        if name not in RELEASED_FLAGS:
            raise ConfigError(f"--flags is missing and {Path(args.checkpoint).name} is not a released model's file name; "
                              f"give --flags with the MODEL_FLAGS and DIFFUSION_FLAGS the model was trained with")
        flags = RELEASED_FLAGS[name]
        print(f"The flags of the released {name} (improved-diffusion's README): {flags}")
    out, hparams, notes = import_checkpoint(args.checkpoint, flags, args.out, args.overwrite)
    unet = hparams["unet"]
    classes = f", {hparams['num_classes']} classes" if hparams["class_cond"] else ""
    print(f"Imported {args.checkpoint} as {out}: {unet['block_out_channels']} channels, {unet['layers_per_block']} "
          f"blocks per level, attention at {unet['attention_resolutions']}, T = {hparams['timesteps']} "
          f"({hparams['noise_schedule']}), {hparams['model_var_type']}, rescale_timesteps={hparams['rescale_timesteps']}"
          f"{classes}")
    for note in notes:
        print(f"note: {note}")
    print(f"Use it with --ckpt_path {out} (test, predict, export), or as the start of fit (fine-tuning).")
