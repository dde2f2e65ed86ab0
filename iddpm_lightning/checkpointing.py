"""Checkpoints that survive kills: durable atomic writes, a clean stop on SIGTERM/SIGINT at
an optimizer-step boundary, and a clear error for a checkpoint that cannot be used.

- ``DurableCheckpointIO`` wraps whatever CheckpointIO the trainer has (plugins included):
  it writes ``X.tmp``, fsyncs it, renames it onto ``X`` and fsyncs the folder, so neither a
  kill during a save nor a node crash right after one leaves an empty or partial file.
- ``GracefulStop`` turns SIGTERM (a cluster's pre-emption) and the first Ctrl-C into:
  finish the current optimizer step (every micro-batch of an accumulation window), save
  ``last.ckpt``, stop, the same on every rank. A second Ctrl-C aborts at once. It also
  saves ``last.ckpt`` when training ends between two periodic checkpoints.
- ``read_checkpoint`` loads with ``weights_only=True`` (no code in a checkpoint runs) and
  turns an unreadable file into one sentence; ``latest_checkpoint`` finds the newest one.

``GracefulStop`` reads three Lightning internals, named where used, because no public API
says them: whether this batch is the epoch's last, and which step ``ModelCheckpoint`` saved
last (``_last_global_step_saved``, ``_last_checkpoint_saved``). Checked on Lightning 2.6.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from .errors import ConfigError, StopRequested


def _fsync(path: str | Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Make the finished file ``tmp`` the file ``path``: fsync it, rename it onto ``path``
    (atomic on POSIX) and fsync the folder, so that a crash leaves the old or the new file."""
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent, directory=True)


class DurableCheckpointIO(CheckpointIO):
    """Saves through ``inner`` (the trainer's CheckpointIO) to ``path.tmp``, then fsync,
    ``os.replace`` onto ``path`` (atomic on POSIX) and fsync of the folder. Remote paths
    (``s3://``...) are left to ``inner``."""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return self.inner.save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            self.inner.save_checkpoint(checkpoint, tmp, storage_options)
            replace_durably(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


class GracefulStop(Callback):
    """On SIGTERM or a first Ctrl-C: save ``last.ckpt`` after the current optimizer step, then stop.

    Lightning's own SIGTERM handling raises after any batch, in the middle of a gradient
    accumulation window too (the saved state would then lack the accumulated gradients).
    While training runs this callback replaces it: a signal is only noted, and acted on in
    ``on_train_batch_end`` of a batch that completed an optimizer step. Under DDP the
    ranks agree with one small all-reduce per optimizer step, so a signal that reached one
    rank stops all of them at the same step. It then raises ``StopRequested``, which the CLI
    turns into exit status 143 (SIGTERM) or 0 (Ctrl-C). A signal that arrives during
    validation takes effect after it, at the next step boundary.
    """

    def __init__(self) -> None:
        self.signal: str | None = None  # the signal received, if any
        self._stepped = False
        self._previous_handlers: dict[int, Any] = {}
        self._saved_step: int | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.signal = "SIGTERM" if trainer.received_sigterm else None
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: leave the signals alone
                pass

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == "SIGINT":
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            again = " (press Ctrl-C again to abort at once)" if signum == signal.SIGINT else ""
            # os.write, not print: a handler that prints while the step prints raises "reentrant call"
            os.write(2, f"\n{self.signal}: stopping after this optimizer step and saving last.ckpt{again}\n".encode())

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        self._stepped = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self._stepped:  # in the middle of an accumulation window
            return
        self._stepped = False
        stop = self.signal is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            why = self.signal or "SIGTERM"  # a rank that received nothing follows the others
            self._save_last(trainer)
            if trainer.is_global_zero:
                print(f"{why}: saved step {trainer.global_step} to {self.last_checkpoint_path(trainer)}; "
                      f"resume with --ckpt_path last", flush=True)
            raise StopRequested(why)
        if self._final_step(trainer):
            self._save_last(trainer)

    @staticmethod
    def _final_step(trainer: Trainer) -> bool:
        """Whether this step ends training (max_steps, or the last batch of max_epochs)."""
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            return True
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        return (max_epochs != -1 and trainer.current_epoch + 1 >= max_epochs
                and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A run that ends between two periodic checkpoints still leaves its final state: saved
        in the final step's ``on_train_batch_end``, where ModelCheckpoint saves too (a save in
        ``on_train_end`` would mark the epoch finished, and a resume would skip its rest);
        here only if training stopped otherwise (e.g. early stopping). ModelCheckpoint's own
        end-of-fit save writes last.ckpt only if it saved nothing during the run."""
        self._restore_handlers()
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
            # and as saved, so that its on_train_end does not overwrite it with a later state
            ckpt._last_checkpoint_saved = str(path)
        trainer.save_checkpoint(path, weights_only=False)  # the whole state, to resume from
        self._saved_step = trainer.global_step

    @staticmethod
    def last_checkpoint_path(trainer: Trainer) -> str:
        """``<checkpoint dir>/last.ckpt``, spelled as ModelCheckpoint spells its paths."""
        ckpt = trainer.checkpoint_callback
        directory = ckpt.dirpath if ckpt is not None and ckpt.dirpath else os.path.join(trainer.default_root_dir,
                                                                                           "checkpoints")
        return os.path.join(directory, "last.ckpt")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        """Give the signals back before Lightning's teardown restores its own originals."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """The checkpoint at ``path``, loaded without running any code it may contain (``mmap``:
    tensors stay on disk until used)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint of the highest step in ``folder``: ``last.ckpt``, or a periodic
    ``step=N.ckpt`` that is newer (a kill between the two writes of one save leaves the step
    file ahead). last.ckpt's step is read memory-mapped, without loading its tensors."""
    last = folder / "last.ckpt"
    steps = {int(p.stem.split("=", 1)[1]): p for p in folder.glob("step=*.ckpt") if p.stem.split("=", 1)[1].isdigit()}
    last_step = -1
    if last.is_file():
        try:
            last_step = read_checkpoint(last, mmap=True).get("global_step", -1)
        except ConfigError:
            if not steps:
                raise
            rank_zero_info(f"{last} cannot be read; resuming from the newest periodic checkpoint instead")
            last = folder / "missing"
    best = max(steps, default=-1)
    if best > last_step:
        return steps[best]
    return last if last.is_file() else None
