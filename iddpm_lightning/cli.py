"""``python -m iddpm_lightning {fit,validate,test,predict} --config FILE``, and
``python -m iddpm_lightning export --ckpt_path C --out DIR`` (a diffusers pipeline, export.py).

One run directory (``run_dir``) holds everything a run writes: TensorBoard logs, the
config, ``checkpoints/`` (with ``last.ckpt``) and test outputs. It is fixed rather than
auto-versioned, so ``fit --ckpt_path last`` finds the run it continues.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from .callbacks.writer import SampleWriter
from .checkpointing import DurableCheckpointIO, GracefulStop, read_checkpoint, unreadable_checkpoint
from .errors import ConfigError, NonFiniteLossError, StopRequested
from .module import IDDPM, RUNTIME, check_compatible, check_precision, plain


class ConciseParser(LightningArgumentParser):
    """A bad value is one line naming the setting (``data.batch_size: Not of type PositiveInt:
    0 does not conform to restriction v>0``), not jsonargparse's usage text and union tree."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse trying a branch of a union: not the user's error yet
            return super().error(message, ex)
        print(f"error: {concise_parse_error(message)}", file=sys.stderr)
        sys.exit(2)


def concise_parse_error(message: str) -> str:
    """The setting (the nested ``Parser key`` names joined with dots, and the class it belongs
    to) and the first line of the reason, from a jsonargparse error message."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    keys, owner, last = [], None, None
    for i, line in enumerate(lines):
        if owner is not None and line.startswith("- "):
            lines = lines[:i]  # the next branch of a union: the first one, the most specific, has the reason
            break
        if m := re.match(r'Parser key "([^"]+)":\s*(.*)$', line):
            keys.append(m.group(1))
            lines[i], last = m.group(2), i
        elif m := re.match(r"- Problem with given class_path '([^']+)':", line):
            owner = m.group(1).rsplit(".", 1)[-1]
            lines[i], last = "", i
    if last is None:
        return lines[0] if lines else message
    noise = ("Does not validate against", "Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>")
    reason = next((line.lstrip("- ") for line in lines[last:] if line and not line.startswith(noise)), "invalid value")
    where = f" (of {owner})" if owner else ""
    return f"{'.'.join(keys)}{where}: {reason}; see --help for the valid values"


# Ranges of trainer settings that Lightning takes as plain ints or floats and would only
# trip over later (accumulate_grad_batches=0 divides by zero after the first batch).
TRAINER_MINIMA = {"accumulate_grad_batches": 1, "num_nodes": 1, "log_every_n_steps": 1,
                  "check_val_every_n_epoch": 1, "gradient_clip_val": 0, "min_steps": -1, "max_epochs": -1}


def check_trainer_settings(trainer: dict) -> None:
    for key, minimum in TRAINER_MINIMA.items():
        value = trainer.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < minimum:
            raise ConfigError(f"trainer.{key}={value} must be at least {minimum}; set it to {minimum} or more")
    interval = trainer.get("val_check_interval")
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval <= 0:
        raise ConfigError(f"trainer.val_check_interval={interval} must be positive (a number of batches, or a "
                          f"fraction of an epoch in (0, 1])")


class IDDPMCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        super().__init__(
            IDDPM,
            LightningDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_class=ConciseParser,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir", type=str, default="runs/default",
            help="Directory of this run: logs, config, checkpoints/ and test outputs.",
        )
        parser.link_arguments("run_dir", "trainer.default_root_dir")
        # The UNet's shape follows the data, so the two cannot disagree silently.
        parser.link_arguments("data.image_size", "model.image_size", apply_on="instantiate")
        parser.link_arguments("data.channels", "model.in_channels", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(SampleWriter, "sampling")
        # Periodic checkpoints named step=N.ckpt, all kept (save_top_k=-1), beside last.ckpt.
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 1000,
                             "checkpoint.filename": "{step}", "checkpoint.save_top_k": -1})

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        config = self.config.get(self.config.get("subcommand")) or self.config
        seed = config.get("seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= 2**32 - 1:
            raise ConfigError(f"seed_everything={seed} must be in [0, {2**32 - 1}] (numpy's seeds), or true for "
                              f"a random seed; set a non-negative seed")

    # --------------------------------------------------- run dir and checkpoints

    def _run_dir(self) -> Path:
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        return Path(config.run_dir)

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before anything is built: ``last`` becomes the run's
        last.ckpt (so the model is rebuilt from its hyperparameters, as for a path); a
        missing, corrupt or unsafe file is one clear error; test and predict need one."""
        self._ckpt_hparams = {}
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        if cfg.get("ckpt_path") is None and sub in ("test", "predict"):
            raise ConfigError(
                f"{sub} needs a trained model: pass --ckpt_path (e.g. {cfg.run_dir}/checkpoints/last.ckpt); "
                f"an untrained model has no {'bits/dim' if sub == 'test' else 'samples'} worth reporting"
            )
        if cfg.get("ckpt_path") == "last":
            latest = latest_checkpoint(Path(cfg.run_dir) / "checkpoints")
            if latest is not None:
                cfg.ckpt_path = str(latest)
                rank_zero_info(f"Resuming from {latest}")
        path = cfg.get("ckpt_path")
        if path and path not in ("last", "best", "hpc", "registry"):
            checkpoint = read_checkpoint(path, mmap=True)
            hparams = checkpoint.get("hyper_parameters", {})
            seed = checkpoint.get("seed")
            if sub == "fit" and seed is not None and cfg.get("seed_everything") != seed:
                # Every random stream is keyed by the seed: another one would resume on other data orders and noise.
                print(f"warning: --ckpt_path continues the run with the checkpoint's seed_everything={seed}; the "
                      f"configured {cfg.get('seed_everything')!r} is NOT used", file=sys.stderr)
                cfg.seed_everything = seed
            for key in ("_instantiator", *RUNTIME):
                hparams.pop(key, None)
            if hparams:
                self._ckpt_hparams = dict(hparams)
                _warn_unused_model_settings(cfg.get("model"), hparams)
                try:
                    self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
                except (SystemExit, Exception) as e:
                    raise unreadable_checkpoint(path, e) from None

    def after_instantiate_classes(self) -> None:
        # The data links in_channels, image_size and num_classes into the model: a checkpoint
        # trained on other data is refused here, before anything is written.
        check_compatible(self._ckpt_hparams, self.model.hparams)
        check_precision(self.trainer.precision)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_trainer_settings(config.get("trainer") or {})
        run_dir = self._run_dir()
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"run_dir={run_dir} is a file, not a folder; give a folder for the run's outputs "
                              f"(it is created if missing)")
        existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
        if not os.access(existing, os.W_OK):
            raise ConfigError(f"run_dir={run_dir} cannot be written ({existing} is read-only); give a writable folder")
        if self.subcommand != "fit":
            return
        cfg = self.config.fit
        last = self._run_dir() / "checkpoints" / "last.ckpt"
        if cfg.ckpt_path is None and last.exists():
            raise ConfigError(
                f"run_dir {self._run_dir()} already holds a run ({last}); resume it with "
                f"--ckpt_path last, or start a new run with another --run_dir"
            )

    def instantiate_trainer(self, **kwargs):
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        callbacks = [*callbacks, GracefulStop()]
        if trainer_cfg.get("logger") in (None, True):
            # Fixed name and version: logs and checkpoints/ live directly in run_dir.
            kwargs["logger"] = TensorBoardLogger(save_dir=str(self._run_dir()), name="", version="")
        if kwargs.get("logger", trainer_cfg.get("logger")) not in (None, False):
            if not any(isinstance(c, LearningRateMonitor) for c in callbacks):
                callbacks.append(LearningRateMonitor(logging_interval="step"))
        kwargs["callbacks"] = callbacks
        trainer = super().instantiate_trainer(**kwargs)
        # Whatever CheckpointIO the plugins chose, every save goes through a durable atomic write
        # (inside a wrapping IO such as AsyncCheckpointIO, whose thread does the writing).
        io = trainer.strategy.checkpoint_io
        if isinstance(io, _WrappingCheckpointIO):  # its setter ignores a second base IO: set the field
            io._checkpoint_io = DurableCheckpointIO(io.checkpoint_io)
        else:
            trainer.strategy.checkpoint_io = DurableCheckpointIO(io)
        return trainer

    def before_predict(self) -> None:
        # predict draws samples: its "data" are the sample indices the module's
        # predict_dataloader yields, not the data module's images.
        self.datamodule = None

    def before_fit(self) -> None:
        t, dm = self.trainer, self.datamodule
        rank_zero_info(f"Run directory: {self._run_dir().resolve()}  (tensorboard --logdir {self._run_dir()})")
        rank_zero_info(f"Global batch: {dm.batch_size * t.world_size * t.accumulate_grad_batches} images per "
                       f"optimizer step = data.batch_size {dm.batch_size} x {t.num_devices} device(s) x "
                       f"{t.num_nodes} node(s) x accumulate_grad_batches {t.accumulate_grad_batches}")

    def after_fit(self) -> None:
        ckpt = self.trainer.checkpoint_callback
        if ckpt is not None and self.trainer.is_global_zero:
            print(f"Run directory: {self._run_dir().resolve()}")
            print(f"Last checkpoint: {ckpt.last_model_path or '(none written)'}")


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


def _warn_unused_model_settings(configured, saved: dict) -> None:
    """Name every model setting of the config or command line that ``--ckpt_path`` overrides
    with the checkpoint's value (all but the runtime ones), so that none is dropped silently."""
    linked = ("image_size", "in_channels", "num_classes")  # follow the data; check_compatible checks them
    configured = dict(configured or {})
    differ = [f"model.{k}={configured[k]!r} (the checkpoint's: {v!r})" for k, v in saved.items()
              if k in configured and k not in linked and plain(configured[k]) != plain(v)]
    if differ:
        print(f"warning: --ckpt_path rebuilds the model from the checkpoint's settings, so these configured values "
              f"are NOT used: {', '.join(differ)}; only {', '.join('model.' + k for k in RUNTIME)} come from the "
              f"config and command line", file=sys.stderr)


def _config_error(e: BaseException) -> ConfigError | None:
    """The ConfigError behind ``e``: jsonargparse wraps errors raised while it builds classes."""
    while e is not None and not isinstance(e, ConfigError):
        e = e.__cause__ or e.__context__
    return e


def main(args=None) -> None:
    argv = sys.argv[1:] if args is None else args
    try:
        if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["export"]:
            from .export import main as export_main

            return export_main(list(argv[1:]))
        IDDPMCLI(args=args)
    except (ConfigError, ValueError) as e:
        error = _config_error(e)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except MisconfigurationException as e:  # Lightning's own checks of trainer.* and checkpoint.* settings
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except StopRequested as e:
        print(f"stopped by {e.signal} at an optimizer-step boundary; last.ckpt holds that step: resume with "
              f"--ckpt_path last", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM if e.signal == "SIGTERM" else 0)
    except SIGTERMException:  # before training started: no step to save
        print("stopped by SIGTERM before the first training step; nothing was saved", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
