"""``predict``: draw samples with few respaced steps and write them in the paper's format.

    python -m iddpm_lightning predict --config configs/digits.yaml --ckpt_path C \
        --sampling.num_samples=1000 --sampling.sample_steps=50

writes ``{out_dir}/samples_{N}x{H}x{W}x{C}.npz`` (``arr_0``: uint8 NHWC, ``arr_1``: labels
when class-conditional: the format improved-diffusion's and guided-diffusion's evaluators
read) and ``{out_dir}/samples.png`` (a grid of the first 64), and prints where.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torchvision.utils import make_grid, save_image

from ._settings import (SAMPLERS, ClosedUnitInterval, NonNegativeInt, PositiveInt, Sampler, SampleSteps,
                        require_choice, require_int, require_sample_steps, require_unit_interval)


class SampleWriter(BasePredictionWriter):
    """The settings and the output of ``predict``.

    Installs itself as the module's ``sampling`` settings (the module never imports it):
    the module's ``predict_dataloader`` yields the sample indices 0..N-1 in batches and its
    ``predict_step`` samples them with noise keyed by (seed, first index of the batch), so
    the same seed gives the same images on the same number of devices. Under DDP every
    rank keeps its share; rank 0 merges them in index order.

    Args:
        num_samples: Images to draw (the paper's FIDs use 50,000).
        sample_steps: Respaced steps: a count (50, 100), sections ("10,15,25"), a DDIM
            stride ("ddim50"), or null for all T.
        sampler: ``ddpm`` (ancestral, with the learned variance) or ``ddim``.
        eta: DDIM's η in [0, 1] (0: deterministic given the noise; 1: DDPM-like noise).
        batch_size: Images sampled at once per device.
        seed: Seed of the noise (a non-negative integer).
        out_dir: Output folder; null: ``{run_dir}/predict``.
    """

    def __init__(
        self,
        num_samples: PositiveInt = 64,
        sample_steps: SampleSteps = 100,
        sampler: Sampler = "ddpm",
        eta: ClosedUnitInterval = 0.0,
        batch_size: PositiveInt = 64,
        seed: NonNegativeInt = 0,
        out_dir: str | None = None,
    ):
        super().__init__(write_interval="batch")
        # Named as the CLI's ``sampling`` group, where a user sets them.
        require_int("sampling.num_samples", num_samples, 1)
        require_sample_steps("sampling.sample_steps", sample_steps)
        require_choice("sampling.sampler", sampler, SAMPLERS)
        require_unit_interval("sampling.eta", eta)
        require_int("sampling.batch_size", batch_size, 1)
        require_int("sampling.seed", seed, 0)
        self.num_samples, self.sample_steps, self.sampler, self.eta = num_samples, sample_steps, sampler, eta
        self.batch_size, self.seed, self.out_dir = batch_size, seed, out_dir
        self._parts: list[dict] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "predict":
            if self.sample_steps is not None:
                pl_module.respaced(self.sample_steps)  # an impossible respacing fails before sampling
            pl_module.sampling = self
            self._parts = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self._parts.append({k: v.cpu() for k, v in prediction.items()})

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out_dir = Path(self.out_dir or Path(trainer.default_root_dir) / "predict")
        local = {k: torch.cat([p[k] for p in self._parts]) for k in ("index", "image", "label")}
        if trainer.world_size > 1:
            part = out_dir / "parts" / f"rank{trainer.global_rank}.pt"
            part.parent.mkdir(parents=True, exist_ok=True)
            torch.save(local, part)
            trainer.strategy.barrier()
            if not trainer.is_global_zero:
                return
            parts = [torch.load(out_dir / "parts" / f"rank{r}.pt", weights_only=True) for r in range(trainer.world_size)]
            local = {k: torch.cat([p[k] for p in parts]) for k in local}
        order = torch.argsort(local["index"])
        images = local["image"][order].numpy()  # (N, H, W, C) uint8
        labels = local["label"][order].numpy()
        N, H, W, C = images.shape
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"samples_{N}x{H}x{W}x{C}.npz"
        arrays = {"arr_0": images, "arr_1": labels} if pl_module.hparams.class_cond else {"arr_0": images}
        np.savez(path, **arrays)
        grid = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 255  # (n, C, H, W)
        scale = max(1, 32 // H)
        grid = torch.nn.functional.interpolate(grid, scale_factor=scale, mode="nearest") if scale > 1 else grid
        save_image(make_grid(grid, nrow=int(math.sqrt(len(grid))), padding=scale, pad_value=1.0), out_dir / "samples.png")
        print(f"Wrote {N} samples ({self.sample_steps or 'all'} {self.sampler} steps) to {path} and a grid to "
              f"{out_dir / 'samples.png'}")
