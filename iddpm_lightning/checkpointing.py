"""Checkpoints that survive kills: durable atomic writes, a clean stop on SIGTERM/SIGINT at
an optimizer-step boundary, and a clear error for a checkpoint that cannot be used.

- ``DurableCheckpointIO`` wraps whatever CheckpointIO the trainer has (plugins included):
  it writes ``X.tmp``, fsyncs it, renames it onto ``X`` and fsyncs the folder, so neither a
  kill during a save nor a node crash right after one leaves an empty or partial file.
- ``GracefulStop`` turns SIGTERM (a cluster's pre-emption), SIGUSR1 (SLURM's warning before the
  time limit: ``#SBATCH --signal=USR1@120``) and the first Ctrl-C into: finish the current
  optimizer step (every micro-batch of an accumulation window), save ``last.ckpt``, stop, the
  same on every rank; after SIGUSR1 under SLURM it also requeues the job. A second Ctrl-C
  aborts at once. It also saves ``last.ckpt`` when training ends between two periodic checkpoints.
- ``IgnoreStopSignals``: the DataLoader workers' ``worker_init_fn``. Schedulers signal the whole
  process group, workers included; a worker that died of it would take the run down before the
  step boundary, so workers ignore the stop signals and the main process decides.
- ``read_checkpoint`` loads with ``weights_only=True`` (no code in a checkpoint runs) and
  turns an unreadable file into one sentence; ``latest_checkpoint`` finds the newest save by
  write order (every save is stamped with its wall-clock time), whatever its name.

``GracefulStop`` reads three Lightning internals, named where used, because no public API
says them: whether this batch is the epoch's last, and which step ``ModelCheckpoint`` saved
last (``_last_global_step_saved``, ``_last_checkpoint_saved``). Checked on Lightning 2.6.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

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


def write_durably(path: str | Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` into a temporary file beside ``path`` (its folder created), then
    ``replace_durably`` it onto ``path``; the temporary file never outlives a failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# The signals that ask a run to stop at the next optimizer step: a scheduler's pre-emption or time
# limit (SIGTERM), SLURM's configurable warning before it (SIGUSR1, which also requeues), Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
SAVED_AT = "saved_at_ns"  # the wall-clock time of a save, stamped into every checkpoint: its write order


class IgnoreStopSignals:
    """A DataLoader ``worker_init_fn``: the worker ignores ``STOP_SIGNALS``, then runs ``inner``
    (a user's own init function, if any).

    SLURM and most schedulers signal the whole process group, loader workers included; torch's
    workers install a SIGTERM handler that kills them, and the main process then raises
    "DataLoader worker ... is killed by signal" before it reaches the step boundary where it
    would save. Ignoring the signals leaves the decision to the main process, which stops the
    workers itself when it exits. A class rather than a closure, so spawned workers can unpickle it."""

    def __init__(self, inner: Callable[[int], None] | None = None) -> None:
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


class DurableCheckpointIO(CheckpointIO):
    """Saves through ``inner`` (the trainer's CheckpointIO) to ``path.tmp``, then fsync,
    ``os.replace`` onto ``path`` (atomic on POSIX) and fsync of the folder. Remote paths
    (``s3://``...) are left to ``inner``. Every checkpoint is stamped with the time of its save
    (``saved_at_ns``), which ``latest_checkpoint`` orders saves by."""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        checkpoint[SAVED_AT] = time.time_ns()
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
    """On SIGTERM, SIGUSR1 or a first Ctrl-C: save ``last.ckpt`` after the current optimizer step, then stop.

    Lightning's own SIGTERM handling raises after any batch, in the middle of a gradient
    accumulation window too (the saved state would then lack the accumulated gradients), and
    its SLURM auto-requeue saves an ``hpc_ckpt`` from inside the signal handler, mid-step, where
    ``--ckpt_path last`` does not look (the CLI turns it off). While training runs this callback
    replaces both: a signal is only noted, and acted on in ``on_train_batch_end`` of a batch that
    completed an optimizer step. Under DDP the ranks agree with one small all-reduce per
    optimizer step, so a signal that reached one rank stops all of them at the same step. It
    then raises ``StopRequested``, which the CLI turns into exit status 128 + the signal's number
    (143 for SIGTERM) or 0 (Ctrl-C). After SIGUSR1 inside a SLURM job, rank 0 first requeues the
    job (``scontrol requeue``), whose rerun continues from ``last.ckpt`` with ``--ckpt_path last``.
    A signal that arrives during validation takes effect after it, at the next step boundary.

    The handlers are installed by ``arm`` (the CLI calls it before ``fit`` starts, and ``setup``
    does for a Trainer built in Python), so that no signal between the start and the first step
    takes the default action; DataLoader workers ignore the signals (``IgnoreStopSignals``).
    """

    def __init__(self) -> None:
        self.signal: str | None = None  # the signal received, if any
        self._stepped = False
        self._saved_step: int | None = None
        self._pid = os.getpid()
        self._armed = False
        self._originals: dict[int, Any] = {}  # the handlers before the first arm, which disarm restores

    def arm(self) -> None:
        """Install the handlers (again after Lightning registered its own, just before training)."""
        if not self._armed:
            self._originals = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        self._pid, self._armed = os.getpid(), True
        for signum in STOP_SIGNALS:
            try:
                signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: leave the signals alone
                return

    def disarm(self) -> None:
        """Restore the handlers of before ``arm``. Lightning's teardown re-installs the handlers it
        found when it registered its own (ours), so this runs again after it: in ``teardown`` and,
        for runs that end with an exception, in the CLI."""
        for signum, handler in self._originals.items():
            try:
                signal.signal(signum, handler)
            except ValueError:
                return
        self._armed = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.arm()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A SIGTERM that Lightning's handler noted (between its registration and now) is ours to act on.
        if trainer.received_sigterm:
            self.signal = self.signal or "SIGTERM"
            trainer._signal_connector.received_sigterm = False  # else Lightning raises after the next batch
        self.arm()

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked process that inherited the handler (a worker): not ours
            return
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
            requeued = why == "SIGUSR1" and trainer.is_global_zero and requeue_slurm_job()
            if trainer.is_global_zero:
                then = "the SLURM job is requeued and continues from it" if requeued else "resume with --ckpt_path last"
                print(f"{why}: saved step {trainer.global_step} to {self.last_checkpoint_path(trainer)}; {then}",
                      flush=True)
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
        self.disarm()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.disarm()


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job (an array task as ``ARRAYJOB_TASK``), as Lightning's own
    auto-requeue does; whether it was requeued. Outside a SLURM job there is nothing to requeue."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        print(f"warning: could not requeue SLURM job {job} ({err}); resubmit it with --ckpt_path last", flush=True)
        return False
    if done.returncode != 0:
        print(f"warning: scontrol requeue {job} failed ({done.stderr.strip()[:200]}); resubmit the job with "
              f"--ckpt_path last", flush=True)
    return done.returncode == 0


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
    """The newest whole save in ``folder``, by write order: every ``*.ckpt`` (``last.ckpt``,
    ``step=N.ckpt``, ModelCheckpoint's version-suffixed ``step=N-v1.ckpt``, any ``filename``),
    ordered by the save time stamped into it (``saved_at_ns``; a file without one, written by an
    older version, by its modification time). Not by step: after a rollback (a resume from an
    earlier ``step=N.ckpt``) the abandoned branch's later steps stay in the folder, and the run
    continues from what it saved last. A kill between the two files of one save (the step file,
    then last.ckpt) leaves the step file newest. Unreadable files are passed over (say so); only
    each file's metadata is read (memory-mapped)."""
    stamped, unreadable = [], []
    for path in sorted(folder.glob("*.ckpt")):
        try:
            saved_at = read_checkpoint(path, mmap=True).get(SAVED_AT)
        except ConfigError as err:
            unreadable.append((path, err))
            continue
        stamped.append((saved_at if isinstance(saved_at, int) else path.stat().st_mtime_ns, path))
    if unreadable and not stamped:
        raise unreadable[0][1]
    for path, _ in unreadable:
        rank_zero_info(f"{path} cannot be read; resuming from the newest readable checkpoint instead")
    return max(stamped)[1] if stamped else None
