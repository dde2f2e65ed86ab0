"""``predict``'s output: the samples in the paper's format.

Writes ``{out_dir}/samples_{N}x{H}x{W}x{C}.npz`` (``arr_0``: uint8 NHWC, ``arr_1``: labels
when class-conditional: the format improved-diffusion's and guided-diffusion's evaluators
read) and ``{out_dir}/samples.png`` (a grid of the first 64), and prints where. What to draw
is ``predict``'s data (``iddpm_lightning.sampling.Sampling``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torchvision.utils import make_grid, save_image


class SampleWriter(BasePredictionWriter):
    """Collects ``predict_step``'s ``{index, image, label}`` and writes them in index order.
    Under DDP every rank keeps its share; rank 0 merges them.

    Args:
        out_dir: Output folder; null: ``{run_dir}/predict``.
    """

    def __init__(self, out_dir: str | None = None):
        super().__init__(write_interval="batch")
        self.out_dir = out_dir
        self._parts: list[dict] = []

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
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
        print(f"Wrote {N} samples to {path} and a grid to {out_dir / 'samples.png'}")
