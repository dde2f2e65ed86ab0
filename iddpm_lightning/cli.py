"""``python -m iddpm_lightning {fit,validate,test,predict} --config FILE``.

One run directory (``run_dir``) holds everything a run writes: TensorBoard logs, the
config, ``checkpoints/`` (with ``last.ckpt``) and test outputs. It is fixed rather than
auto-versioned, so ``fit --ckpt_path last`` finds the run it continues.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from .errors import ConfigError
from .module import IDDPM


class IDDPMCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        super().__init__(
            IDDPM,
            LightningDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
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
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 1000})

    # -------------------------------------------------------------- run dir

    def _run_dir(self) -> Path:
        return Path(self.config[self.subcommand].run_dir)

    def before_instantiate_classes(self) -> None:
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
        if trainer_cfg.get("logger") in (None, True):
            # Fixed name and version: logs and checkpoints/ live directly in run_dir.
            kwargs["logger"] = TensorBoardLogger(save_dir=str(self._run_dir()), name="", version="")
        if kwargs.get("logger", trainer_cfg.get("logger")) not in (None, False):
            callbacks = trainer_cfg.get("callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            if not any(isinstance(c, LearningRateMonitor) for c in callbacks):
                kwargs["callbacks"] = [*callbacks, LearningRateMonitor(logging_interval="step")]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        print(f"Run directory: {self._run_dir().resolve()}  (tensorboard --logdir {self._run_dir()})")

    def after_fit(self) -> None:
        ckpt = self.trainer.checkpoint_callback
        if ckpt is not None and self.trainer.is_global_zero:
            print(f"Run directory: {self._run_dir().resolve()}")
            print(f"Last checkpoint: {ckpt.last_model_path or '(none written)'}")


def main(args=None) -> None:
    try:
        IDDPMCLI(args=args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
