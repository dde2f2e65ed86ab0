"""A grid of samples from FIXED noise, every N steps: the same seed each time, so the
grids show the model's progress rather than the noise's."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from ..diffusion import Sampler
from ..settings import NonNegativeInt, PositiveInt, check_args


class SampleGrid(Callback):
    """Logs ``num_samples`` images to TensorBoard (``samples``) and saves them as
    ``{run_dir}/samples/step_{global_step}.png`` every ``every_n_steps`` optimizer steps
    and when training ends. Uses the module's eval (EMA) weights.

    Args:
        every_n_steps: Optimizer steps between grids.
        num_samples: Images in the grid (a class-conditional model draws image i with class i mod K).
        sampler: How the grid is drawn (``diffusion.samplers``).
        seed: Seed of the fixed noise (a non-negative integer).
    """

    def __init__(self, every_n_steps: PositiveInt = 500, num_samples: PositiveInt = 64, sampler: Sampler = Sampler(),
                 seed: NonNegativeInt = 0):
        check_args("SampleGrid ", SampleGrid.__init__, locals())
        self.every_n_steps, self.num_samples, self.sampler, self.seed = every_n_steps, num_samples, sampler, seed
        self._last_step = -1

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.sampler.timesteps(pl_module.diffusion)  # bad steps fail now, not after training

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int):
        if trainer.fast_dev_run:
            return
        step = trainer.global_step
        if step != self._last_step and step % self.every_n_steps == 0 and step > 0:
            self._last_step = step
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule):
        if not trainer.fast_dev_run and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.log_grid(trainer, pl_module)

    @rank_zero_only
    def log_grid(self, trainer: Trainer, pl_module: LightningModule) -> Path:
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        x = pl_module.sample(self.sampler, self.num_samples, generator=generator)
        # Small images (8x8 digits) are enlarged, pixel for pixel, to be visible.
        scale = max(1, 32 // x.shape[-1])
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest") if scale > 1 else x
        grid = make_grid((x + 1) / 2, nrow=int(self.num_samples**0.5), padding=scale, pad_value=1.0)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid.clamp(0, 1), trainer.global_step)
        # default_root_dir, not trainer.log_dir: that one broadcasts, and this runs on rank 0 only.
        path = Path(trainer.default_root_dir) / "samples" / f"step_{trainer.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        return path
