"""Checkpoints that survive kills: atomic writes, a clean stop on SIGTERM/SIGINT, and a
clear error for a checkpoint that cannot be used.

- ``AtomicCheckpointIO`` writes ``X.tmp`` and renames it over ``X``: a kill during a save
  leaves the previous ``last.ckpt`` whole.
- ``GracefulStop`` turns SIGTERM (a cluster's pre-emption; Lightning notes it) and the
  first Ctrl-C into: finish the current step, save ``last.ckpt``, stop. A second Ctrl-C
  interrupts at once. It also saves ``last.ckpt`` when training ends.
- ``read_checkpoint`` loads with ``weights_only=True`` (no code in a checkpoint runs) and
  turns an unreadable file into one sentence.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .errors import ConfigError


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``path.tmp``, then ``os.replace`` it onto ``path`` (atomic on POSIX)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)


class GracefulStop(Callback):
    """On SIGTERM or a first SIGINT, save ``last.ckpt`` after the current step and stop.

    Lightning raises its ``SIGTERMException`` after the step; the CLI reports it. Under DDP
    the ranks agree on stopping with one small all-reduce per step.
    """

    def __init__(self) -> None:
        self._sigint = False
        self._previous_handler = None
        self._saved_step: int | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sigint = False
        try:
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous_handler = None

    def _on_sigint(self, signum, frame) -> None:
        if self._sigint:
            raise KeyboardInterrupt
        self._sigint = True
        print("\nCtrl-C: stopping after this step and saving last.ckpt (press again to abort at once)", flush=True)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        stop = self._sigint or trainer.received_sigterm
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self._save(trainer, "SIGTERM" if trainer.received_sigterm else "Ctrl-C")
            trainer.should_stop = True

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning raises SIGTERMException only between batches (also during validation),
        # so the weights are those of a finished step.
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self._save(trainer, "SIGTERM")

    def _save(self, trainer: Trainer, why: str) -> None:
        if self._saved_step == trainer.global_step:
            return
        self._save_last(trainer)
        if trainer.is_global_zero:
            print(f"{why}: saved step {trainer.global_step} to {self.last_checkpoint_path(trainer)}; "
                  f"resume with --ckpt_path last", flush=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A run that ends between two periodic checkpoints still leaves its final state."""
        ckpt = trainer.checkpoint_callback
        if ckpt is None or trainer.fast_dev_run or self._saved_step == trainer.global_step:
            return
        if getattr(ckpt, "_last_global_step_saved", None) == trainer.global_step:
            return  # ModelCheckpoint saved this very step already
        self._save_last(trainer)

    def _save_last(self, trainer: Trainer) -> None:
        path = self.last_checkpoint_path(trainer)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None:
            # Claim the file as ModelCheckpoint's own "last" (set before saving, since it is part
            # of the saved state): otherwise its next "last" save, at the end of this run or
            # after a resume, sees a foreign last.ckpt and writes last-v1.ckpt instead.
            ckpt.last_model_path = str(path)
        trainer.save_checkpoint(path)
        self._saved_step = trainer.global_step

    @staticmethod
    def last_checkpoint_path(trainer: Trainer) -> str:
        """``<checkpoint dir>/last.ckpt``, spelled as ModelCheckpoint spells its paths."""
        ckpt = trainer.checkpoint_callback
        directory = ckpt.dirpath if ckpt is not None and ckpt.dirpath else os.path.join(trainer.default_root_dir,
                                                                                           "checkpoints")
        return os.path.join(directory, "last.ckpt")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint at ``path``, loaded without running any code it may contain."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"ckpt_path {path} does not exist; give the path of a .ckpt file, or 'last'") from None
    except Exception as e:  # truncated zip, not a checkpoint, or objects weights_only refuses
        raise unreadable_checkpoint(path, e) from None


def unreadable_checkpoint(path: str | Path, e: BaseException) -> ConfigError:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return ConfigError(
        f"ckpt_path {path} cannot be loaded as a checkpoint (corrupt, truncated, or holding objects other than "
        f"tensors and plain data, which are refused so that no code in it runs: {reason}); use another checkpoint"
    )
