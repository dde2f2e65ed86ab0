"""Checkpoint compatibility: what a checkpoint's hyperparameters must hold, and whether a model
can take its weights.

A checkpoint is read with ``torch.load(weights_only=True)``, so it may hold only tensors and
plain data (``plain``). Its ``hyper_parameters`` are the model's structural settings (the
UNet's ``unet`` dict, the diffusion's, the data's image shape); how a model is run
(``compile``, ``channels_last``, ``gradient_checkpointing``, ``bpd_batch_size``, ``eval_with_ema``,
``test_strata``) is not saved, so it always comes from the config and command line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .errors import ConfigError

# What a model is: a checkpoint with other values cannot load into it (dropout and the
# attention heads can change, e.g. to fine-tune: the weights keep their shapes).
STRUCTURE = ("in_channels", "image_size", "class_cond", "num_classes", "timesteps", "noise_schedule",
             "model_var_type", "rescale_timesteps", "unet.block_out_channels", "unet.layers_per_block",
             "unet.attention_resolutions", "unet.mid_attention_norm", "unet.use_scale_shift_norm")

# How to run a model, not what it is: not saved with the hyperparameters, so a checkpoint
# never overrides them (``--ckpt_path`` takes them from the config and command line).
RUNTIME = ("eval_with_ema", "bpd_batch_size", "test_strata", "channels_last", "compile", "gradient_checkpointing")

# The flat UNet keys of checkpoints written before UNetConfig (iddpm_lightning 0.1).
_FLAT_UNET_KEYS = ("block_out_channels", "layers_per_block", "attention_resolutions", "attention_head_dim", "dropout")


def plain(value):
    """``value`` with dataclasses as dicts and jsonargparse's constrained types (``PositiveInt(3)``
    is an int subclass) as plain ints, floats and strings, which ``torch.load(weights_only=True)``
    accepts; dicts are converted in place, tensors left alone."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        for k, v in value.items():
            value[k] = plain(v)
        return value
    if isinstance(value, (list, tuple)):
        return (list if isinstance(value, list) else tuple)(plain(v) for v in value)
    if type(value) in (bool, int, float, str):
        return value
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value


def legacy_unet(unet: dict) -> dict:
    """A checkpoint's ``unet`` settings with the value each setting added since had for the
    checkpoints written before it: their UNets were built without the middle block's
    attention norm."""
    return {"mid_attention_norm": False, **unet}


def legacy(hparams: dict) -> dict:
    """A checkpoint's hyperparameters with the value each model setting added since had before it
    existed: the UNet's (``legacy_unet``), and t passed to the UNet unscaled (``rescale_timesteps``)."""
    hparams = {"rescale_timesteps": False, **hparams}
    if isinstance(hparams.get("unet"), dict):
        hparams["unet"] = legacy_unet(hparams["unet"])
    return hparams


class CheckpointCompat:
    """The LightningModule's checkpoint hooks: checkpoints hold plain types only, a checkpoint of
    another model is refused before its weights meet a size mismatch, and an older checkpoint is
    rebuilt as it was trained (``legacy``: jsonargparse would give a missing setting today's default)."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        plain(checkpoint)  # callback states and data module settings too

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_compatible(checkpoint.get("hyper_parameters", {}), self.hparams)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        if isinstance(checkpoint_path, (str, Path)):
            import torch

            saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
            old = legacy(saved.get("hyper_parameters", {}))
            kwargs = {**{k: old[k] for k in ("unet", "rescale_timesteps") if k in old}, **kwargs}
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)


def check_compatible(saved: dict, hparams: dict) -> None:
    """Raise a ConfigError naming every structural setting in which a checkpoint's
    hyperparameters ``saved`` differ from the model's ``hparams``."""
    if not saved:  # no checkpoint, or one without hyperparameters: nothing to compare
        return
    saved, hparams = flat(plain(legacy(dict(saved)))), flat(plain(dict(hparams)))
    differ = [f"{k}={saved[k]!r} (here {hparams[k]!r})" for k in STRUCTURE
              if k in saved and k in hparams and saved[k] != hparams[k]
              and (k != "num_classes" or hparams.get("class_cond"))]
    if differ:
        raise ConfigError(
            f"the checkpoint was trained with {', '.join(differ)}; in_channels, image_size and num_classes "
            f"follow the data, so use the data (and config) the checkpoint was trained with"
        )


def flat(settings: dict, prefix: str = "") -> dict:
    """``{"unet": {"dropout": 0.1}}`` as ``{"unet.dropout": 0.1}``."""
    out = {}
    for k, v in settings.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def require_current_layout(path, hparams: dict) -> None:
    """Refuse, with the way out, a checkpoint whose hyperparameters have the 0.1 layout."""
    if any(k in hparams for k in _FLAT_UNET_KEYS):
        raise ConfigError(
            f"ckpt_path {path} was written by iddpm_lightning 0.1 (flat model.* UNet settings); convert it once with "
            f"python -c \"from iddpm_lightning.compat import upgrade_checkpoint; upgrade_checkpoint('{path}')\""
        )


def upgrade_hparams(hparams: dict, seed: int | None = None) -> dict:
    """0.1 hyperparameters in today's layout: the UNet keys under ``unet``, the run-time keys
    dropped, the checkpoint's seed (saved beside them then) as ``seed``."""
    hparams = dict(hparams)
    unet = {k: hparams.pop(k) for k in _FLAT_UNET_KEYS if k in hparams}
    if unet:
        hparams["unet"] = unet
    for key in RUNTIME:
        hparams.pop(key, None)
    if seed is not None:
        hparams.setdefault("seed", seed)
    return hparams


def upgrade_checkpoint(path) -> None:
    """Rewrite a 0.1 checkpoint file in place with today's hyperparameter layout (weights untouched)."""
    import torch

    from .checkpointing import read_checkpoint, write_durably

    checkpoint = read_checkpoint(path)
    checkpoint["hyper_parameters"] = upgrade_hparams(checkpoint.get("hyper_parameters", {}), checkpoint.pop("seed", None))
    write_durably(path, lambda tmp: torch.save(checkpoint, tmp))
