"""``python -m iddpm_lightning {fit,validate,test,predict} --config FILE``,
``python -m iddpm_lightning evaluate --samples NPZ --reference CONFIG`` (sample quality,
evaluation/evaluate.py), ``python -m iddpm_lightning export --ckpt_path C --out DIR`` (a diffusers
pipeline or the official layout, export.py) and ``python -m iddpm_lightning import MODEL.pt --flags
"..." --out C`` (a checkpoint of the paper's code, official/).

One run directory (``run_dir``) holds everything a run writes: TensorBoard logs, the
config, ``checkpoints/`` (with ``last.ckpt``) and test outputs. It is fixed rather than
auto-versioned, so ``fit --ckpt_path last`` finds the run it continues.
"""

from __future__ import annotations

import importlib
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

from .callbacks import BpdReport, NonFiniteGuard, SampleWriter
from .checkpointing import DurableCheckpointIO, GracefulStop, latest_checkpoint, read_checkpoint
from .compat import RUNTIME, check_compatible, flat, plain, require_current_layout
from .errors import ConfigError, NonFiniteLossError, StopRequested
from .rng import check_seed, random_seed, stream_seed
from .module import IDDPM
from .sampling import Sampling
from .settings import check_precision


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
    """LightningCLI with a fixed run directory, the data's shape and the seed linked into the
    model, and what the stock CLI lacks around ``--ckpt_path`` (see ``parse_arguments``)."""

    def __init__(self, args=None, run: bool = True):
        self.graceful_stop = GracefulStop()
        try:
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
        finally:
            if run:  # whatever ended the run (Lightning's teardown re-installs the handlers it found: ours)
                self.graceful_stop.disarm()

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
        # One seed keys every random stream: the model's (t, ε, dropout) and the data order's.
        parser.link_arguments("seed_everything", "model.seed", compute_fn=stream_seed)
        parser.link_arguments("seed_everything", "data.init_args.seed", compute_fn=stream_seed)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_class_arguments(Sampling, "sampling")  # predict's data
        # Periodic checkpoints named step=N.ckpt, all kept (save_top_k=-1), beside last.ckpt.
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 1000,
                             "checkpoint.filename": "{step}", "checkpoint.save_top_k": -1})

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, then check what the stock ``--ckpt_path`` handling (which rebuilds the model from
        the checkpoint's hyperparameters next) does not: ``last`` is this run's newest checkpoint; a
        missing, corrupt or unsafe file is one clear error; test and predict need one; ``fit``
        continues with the checkpoint's seed, or, from a checkpoint of weights alone (``import``'s,
        a ``save_weights_only`` one), starts a new run from them; every configured model value the
        checkpoint overrides is named."""
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        check_seed(cfg.get("seed_everything"))
        if cfg.get("seed_everything") is True:  # a random seed, drawn once for every stream and rank
            cfg.seed_everything = cfg.model.seed = cfg.data.init_args.seed = random_seed()
        self._ckpt_hparams, self._start_from = {}, None
        if not sub:
            return
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
        if not path or path in ("last", "best", "hpc", "registry"):
            return
        checkpoint = read_checkpoint(path, mmap=True)
        hparams = dict(checkpoint.get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        require_current_layout(path, hparams)
        if sub == "fit" and "optimizer_states" not in checkpoint:  # weights alone: a new run starts from them
            last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
            if last.exists():
                raise ConfigError(f"run_dir {cfg.run_dir} already holds a run ({last}); resume it with --ckpt_path "
                                  f"last, or start from the weights of {path} with another --run_dir")
            rank_zero_info(f"Starting a new run from the weights (and EMA) of {path}: a fresh optimizer, step 0")
            self._start_from = path
        seed = hparams.get("seed")
        if sub == "fit" and seed is not None and cfg.seed_everything != seed and self._start_from is None:
            # Every random stream is keyed by the seed: another one would resume on other data orders and noise.
            print(f"warning: --ckpt_path continues the run with the checkpoint's seed_everything={seed}; the "
                  f"configured {cfg.seed_everything!r} is NOT used", file=sys.stderr)
            cfg.seed_everything = seed
        unet = hparams.get("unet")
        if isinstance(unet, dict) and "mid_attention_norm" not in unet and cfg.get("model") is not None:
            # the stock handling next merges the checkpoint's settings: one it lacks keeps the config's value
            rank_zero_info(f"{path} was written before model.unet.mid_attention_norm existed: its UNet is built "
                           f"without the middle block's attention norm, as it was trained")
            cfg.model.unet.mid_attention_norm = False
        if hparams and "rescale_timesteps" not in hparams and cfg.get("model") is not None:
            cfg.model.rescale_timesteps = False  # written before the setting existed: its UNet saw t as it is
        self._ckpt_hparams = hparams
        _warn_unused_model_settings(cfg.get("model"), hparams)

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
        last = run_dir / "checkpoints" / "last.ckpt"
        if self.subcommand == "fit" and config.ckpt_path is None and last.exists():
            raise ConfigError(
                f"run_dir {run_dir} already holds a run ({last}); resume it with "
                f"--ckpt_path last, or start a new run with another --run_dir"
            )

    def after_instantiate_classes(self) -> None:
        # The data links in_channels, image_size and num_classes into the model: a checkpoint
        # trained on other data is refused here, before anything is written.
        check_compatible(self._ckpt_hparams, self.model.hparams)
        if self._start_from is not None:  # the weights and EMA of the file; the optimizer and loops start anew
            self.model.load_state_dict(read_checkpoint(self._start_from)["state_dict"])
        check_precision(self.trainer.precision)
        if self.subcommand == "predict":  # steps the sampler cannot take fail before anything is written
            self._get(self.config_init, "sampling").sampler.timesteps(self.model.diffusion)

    def instantiate_trainer(self, **kwargs):
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        # Always on: the step-boundary stop on SIGTERM, the NaN guard (fit) and the test report.
        callbacks = [*callbacks, self.graceful_stop, NonFiniteGuard(), BpdReport()]
        if self.subcommand == "predict":
            callbacks.append(SampleWriter(self._get(self.config_init, "sampling").out_dir))
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

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if self._start_from is not None:
            kwargs["ckpt_path"] = None  # the weights are loaded: nothing to resume
        return kwargs

    def _run_dir(self) -> Path:
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        return Path(config.run_dir)

    def before_fit(self) -> None:
        # Before anything starts loader workers (the sanity check's, the train loader's) or the FID
        # callback's reference pass: a stop signal from here on is a clean stop, not the default kill.
        self.graceful_stop.arm()
        t, dm = self.trainer, self.datamodule
        rank_zero_info(f"Run directory: {self._run_dir().resolve()}  (tensorboard --logdir {self._run_dir()})")
        rank_zero_info(f"Global batch: {dm.batch_size * t.world_size * t.accumulate_grad_batches} images per "
                       f"optimizer step = data.batch_size {dm.batch_size} x {t.num_devices} device(s) x "
                       f"{t.num_nodes} node(s) x accumulate_grad_batches {t.accumulate_grad_batches}")

    def before_predict(self) -> None:
        # predict's data are the samples to draw (sampling.*), not the data module's images.
        self.datamodule = self._get(self.config_init, "sampling")

    def after_fit(self) -> None:
        ckpt = self.trainer.checkpoint_callback
        if ckpt is not None and self.trainer.is_global_zero:
            print(f"Run directory: {self._run_dir().resolve()}")
            print(f"Last checkpoint: {ckpt.last_model_path or '(none written)'}")


def _warn_unused_model_settings(configured, saved: dict) -> None:
    """Name every model setting of the config or command line that ``--ckpt_path`` overrides
    with the checkpoint's value (all but the runtime ones), so that none is dropped silently."""
    # the data's shape (check_compatible checks it) and the seed (fit says so) are not the config's to set
    linked = ("image_size", "in_channels", "num_classes", "seed")
    configured = flat(configured.as_dict() if configured is not None else {})
    differ = [f"model.{k}={configured[k]!r} (the checkpoint's: {v!r})" for k, v in flat(saved).items()
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


# The commands that are not the LightningCLI's: their module and entry point, imported when used.
OTHER_COMMANDS = {"export": (".export", "main"), "import": (".official", "import_main"),
                  "evaluate": (".evaluation.evaluate", "main")}


def main(args=None) -> None:
    argv = sys.argv[1:] if args is None else args
    try:
        command = argv[0] if isinstance(argv, (list, tuple)) and argv else None
        if command in OTHER_COMMANDS:
            module, entry = OTHER_COMMANDS[command]
            return getattr(importlib.import_module(module, __package__), entry)(list(argv[1:]))
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
        sys.exit(0 if e.signal == "SIGINT" else 128 + signal.Signals[e.signal])
    except SIGTERMException:  # before training started: no step to save
        print("stopped by SIGTERM before the first training step; nothing was saved", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
