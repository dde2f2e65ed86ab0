"""Export a trained checkpoint as a diffusers ``DDPMPipeline`` folder, or in the paper's own layout.

``python -m iddpm_lightning export --ckpt_path runs/x/checkpoints/last.ckpt --out exported/x``
writes ``model_index.json``, ``unet/`` (the EMA UNet, or the raw one with ``--raw_weights``)
and ``scheduler/`` (a ``DDPMScheduler`` configured like the training), loadable with
``DDPMPipeline.from_pretrained``. See ``export_to_diffusers`` for what matches and what differs.
``--format official`` writes ``model.pt`` and ``flags.json`` for improved-diffusion's own scripts
(``official.export_official``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .checkpointing import read_checkpoint
from .compat import upgrade_hparams
from .diffusion import get_named_beta_schedule
from .errors import ConfigError

# Our model_var_type -> diffusers' variance_type. All three give the same ancestral step
# (see export_to_diffusers); "fixed_small_log" is diffusers' name for σ = exp(½ log β̃_t).
VARIANCE_TYPES = {"learned_range": "learned_range", "fixed_small": "fixed_small_log", "fixed_large": "fixed_large"}


def ddpm_scheduler_config(timesteps: int, noise_schedule: str, model_var_type: str) -> dict:
    """The ``DDPMScheduler`` keyword arguments that reproduce our sampler for a model trained
    with these settings (see ``export_to_diffusers``)."""
    betas = get_named_beta_schedule(noise_schedule, timesteps)  # float64 [T]
    config = {
        "num_train_timesteps": timesteps,
        "variance_type": VARIANCE_TYPES[model_var_type],
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "prediction_type": "epsilon",
        # num_inference_steps=k keeps the steps of our sampler.steps=k (diffusers' default
        # "leading" would start at T - T//k instead of T - 1).
        "timestep_spacing": "linspace",
    }
    if noise_schedule == "cosine":
        # diffusers computes the same formula in float64 and casts to float32: equal to ours cast.
        config["beta_schedule"] = "squaredcos_cap_v2"
    else:
        # Our linear schedule is scaled by 1000/T; diffusers' "linear" is not, so give the
        # exact betas (beta_start/beta_end are written for the reader; trained_betas wins).
        scale = 1000 / timesteps
        config.update(beta_schedule="linear", beta_start=1e-4 * scale, beta_end=0.02 * scale,
                      trained_betas=[float(b) for b in np.asarray(betas)])
    return config


def export_to_diffusers(ckpt_path: str | Path, out_dir: str | Path, use_ema: bool = True,
                        overwrite: bool = False) -> Path:
    """Write the model of checkpoint ``ckpt_path`` as a diffusers ``DDPMPipeline`` to ``out_dir``.

    The UNet is ``ema_unet`` (``use_ema``, the weights validation and sampling use by
    default) or the raw ``unet``; the checkpoint is read with ``weights_only`` (no code in
    it runs). ``out_dir`` must not exist or be empty unless ``overwrite``; only the
    pipeline's own entries (``model_index.json``, ``unet/``, ``scheduler/``) are replaced,
    and they are written to a temporary folder first, so a failed export leaves ``out_dir``
    as it was.

    What matches: the UNet's weights (bit for bit) and its timestep input (the original
    index 0..T-1, as in training); the β schedule (cosine as ``squaredcos_cap_v2``, whose
    float32 betas equal ours cast to float32; linear as ``trained_betas``, our 1000/T-scaled
    betas); ε-prediction with x̂_0 clipped to [−1, 1]; the posterior mean; the variance
    (``learned_range``: exp(frac·log β_t + (1 − frac)·log β̃_t), frac = (v + 1)/2;
    ``fixed_small`` as ``fixed_small_log``: σ = √β̃_t; ``fixed_large``: σ = √β_t); no noise
    at the last step; and, with the same generator, the same noise draws (x_T and each z
    are ``torch.randn`` of the image's shape). ``timestep_spacing="linspace"`` makes
    ``num_inference_steps=k`` keep the steps of our ``sampler.steps=k``, with the respaced
    β derived from ᾱ at the kept steps as ours are. Measured at T = 100: one step agrees to
    1.3e-5 (x̂_0 to 1.2e-6), a whole 100-step chain to 2.6e-6.

    What differs: diffusers keeps its schedule in float32 (ours is float64; ᾱ differs by
    up to ~4e-7); its β̃_0 log is log(1e-20) rather than our clipped log β̃_1, and its
    ``fixed_large`` at t = 0 is β_0 rather than β̃_1 — neither adds noise at t = 0, so
    samples are unaffected (only likelihoods would be); ``linspace`` rounds a step that
    falls exactly on a half-integer the other way from our respacing for some counts
    (e.g. T = 100, k = 15 keeps 50 where we keep 49): for exact steps call
    ``scheduler.set_timesteps(timesteps=...)`` in your own loop, which is also the only way
    to our section (``"10,15,25"``) and ``ddimN`` respacings (the pipeline itself takes a
    count). diffusers cannot train with our hybrid or VLB losses; the export is for
    sampling. A class-conditional model is refused: ``DDPMPipeline`` samples
    unconditionally.
    """
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler

    from .module import IDDPM
    from .unet import attention_heads

    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path {ckpt_path} does not exist; give the path of a .ckpt file, "
                          f"e.g. RUN_DIR/checkpoints/last.ckpt")
    ckpt = read_checkpoint(ckpt_path)
    hparams = dict(ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
    state_dict = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not hparams or not isinstance(state_dict, dict):
        raise ConfigError(
            f"ckpt_path {ckpt_path} holds no IDDPM hyper_parameters and state_dict; give a checkpoint written by "
            f"'python -m iddpm_lightning fit' (e.g. RUN_DIR/checkpoints/last.ckpt)"
        )
    hparams.pop("_instantiator", None)
    hparams = upgrade_hparams(hparams)  # a checkpoint of iddpm_lightning 0.1 too
    if hparams.get("rescale_timesteps") and hparams["timesteps"] != 1000:
        raise ConfigError(
            f"ckpt_path {ckpt_path} is a model whose UNet sees t·1000/T (model.rescale_timesteps, T = "
            f"{hparams['timesteps']}), which diffusers' UNet2DModel cannot express (it embeds the timestep as it is); "
            f"sample it with predict, or export it with --format official for the paper's own scripts"
        )
    if hparams.get("class_cond"):
        raise ConfigError(
            f"ckpt_path {ckpt_path} is a class-conditional model (model.class_cond: true), which diffusers' "
            f"DDPMPipeline cannot sample since it passes no class labels; export an unconditional model"
        )

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out {out_dir} is a file; give a folder to write the pipeline to")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(
            f"out {out_dir} already exists and is not empty; choose a new folder, or pass --overwrite to replace "
            f"its model_index.json, unet/ and scheduler/"
        )

    try:
        model = IDDPM(**hparams)
        model.load_state_dict(state_dict)
    except ConfigError:
        raise
    except (TypeError, RuntimeError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(
            f"ckpt_path {ckpt_path} does not hold an IDDPM model this version can rebuild ({reason}); "
            f"use a checkpoint written by 'python -m iddpm_lightning fit'"
        ) from None
    unet = (model.ema_unet if use_ema else model.unet).eval().requires_grad_(False)
    if unet.config.attention_head_dim is None:
        widths = sorted({width for width, _ in attention_heads(unet)})
        raise ConfigError(
            f"this UNet's attention layers are {widths} channels wide with {model.hparams.unet['num_heads']} heads each, "
            f"i.e. other channels per head in each, which a diffusers UNet2DModel config cannot hold (one "
            f"attention_head_dim for every layer); only models with the same channels per head everywhere export"
        )
    scheduler = DDPMScheduler(**ddpm_scheduler_config(model.hparams.timesteps, model.hparams.noise_schedule,
                                                      model.hparams.model_var_type))
    pipeline = DDPMPipeline(unet=unet, scheduler=scheduler)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        with torch.no_grad():
            pipeline.save_pretrained(tmp)
        if out_dir.is_dir():  # empty, or overwrite: replace only what the pipeline writes
            for item in tmp.iterdir():
                target = out_dir / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(item, target)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """``python -m iddpm_lightning export --ckpt_path C --out DIR [--raw_weights] [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="python -m iddpm_lightning export",
        description="Export a trained checkpoint as a diffusers DDPMPipeline folder (unconditional models only).",
    )
    parser.add_argument("--ckpt_path", required=True, help="the .ckpt file, e.g. RUN_DIR/checkpoints/last.ckpt")
    parser.add_argument("--out", required=True, help="folder to write model_index.json, unet/ and scheduler/ to")
    parser.add_argument("--raw_weights", action="store_true",
                        help="export the trained weights instead of their exponential moving average (EMA)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the pipeline files in an existing, non-empty --out folder")
    parser.add_argument("--format", choices=("diffusers", "official"), default="diffusers",
                        help="diffusers: a DDPMPipeline folder; official: model.pt and flags.json for openai/"
                             "improved-diffusion's image_sample.py and image_nll.py")
    args = parser.parse_args(argv)
    weights = "raw" if args.raw_weights else "EMA"
    if args.format == "official":
        from .official import export_official

        out = export_official(args.ckpt_path, args.out, use_ema=not args.raw_weights, overwrite=args.overwrite)
        flags = json.loads((out / "flags.json").read_text())
        print(f"Wrote the {weights} UNet in improved-diffusion's layout to {out / 'model.pt'} and its flags to "
              f"{out / 'flags.json'}. Run it with the official scripts:")
        print(f"    python scripts/image_sample.py --model_path {out / 'model.pt'} {flags['flags_line']}")
        for reason in flags["not_from_flags"]:
            print(f"note: the official scripts cannot build it from the flags alone: {reason}; build "
                  f"UNetModel(**flags.json['UNetModel']) instead")
        return
    out = export_to_diffusers(args.ckpt_path, args.out, use_ema=not args.raw_weights, overwrite=args.overwrite)
    print(f"Wrote a diffusers DDPMPipeline ({weights} weights) to {out.resolve()}. Load it with:")
    print("    from diffusers import DDPMPipeline")
    print(f"    pipe = DDPMPipeline.from_pretrained({str(out.resolve())!r})")
    print("    images = pipe(batch_size=16, num_inference_steps=100).images  # PIL images")
