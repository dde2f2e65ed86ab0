"""A 2-process DDP (gloo, CPU) run of ``ImportanceSampling``; rank 1's last batch is short.

    python tests/scripts/ddp_importance.py OUT_DIR

Each rank saves what its module returned every step and the callback's final state to
OUT_DIR/rank{r}.pt; tests/test_importance_ddp.py compares them.
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from iddpm_lightning.callbacks import ImportanceSampling
from iddpm_lightning.module import IDDPM
from iddpm_lightning.unet import UNetConfig

TINY_UNET = UNetConfig([32], 1, [], 8)

STEPS, BATCH = 6, 8


class PerRankData(LightningDataModule):
    """Rank 0: STEPS full batches; rank 1: the same, but its last batch holds 5 images."""

    def train_dataloader(self):
        rank = self.trainer.global_rank
        n = STEPS * BATCH - (3 if rank == 1 else 0)
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
        return DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=BATCH)


class Recorder(Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((outputs["timesteps"].cpu(), outputs["losses"].cpu()))


def main(out_dir: Path) -> None:
    model = IDDPM(image_size=8, in_channels=1, unet=TINY_UNET, timesteps=12, loss_type="vlb")
    callback, recorder = ImportanceSampling(history_per_term=3), Recorder()
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS, use_distributed_sampler=False,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=[recorder, callback])
    trainer.fit(model, datamodule=PerRankData())
    r = callback.history
    torch.save({"steps": recorder.steps, "loss_history": r.loss_history.cpu(), "loss_counts": r.loss_counts.cpu(),
                "probs": r.probs().cpu()}, out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
