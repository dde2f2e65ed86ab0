"""Test-only callbacks that inject faults into a real CLI run (importable with PYTHONPATH=repo)."""

from __future__ import annotations

from lightning.pytorch import Callback


class NaNOnRank(Callback):
    """Turn the images of micro-batch number ``batch`` (1-based, counted over the run) into NaN
    on rank ``rank`` only, so that only that rank's loss is not finite."""

    def __init__(self, rank: int = 1, batch: int = 3) -> None:
        self.rank, self.batch = rank, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.fit_loop.epoch_loop.total_batch_idx + 1 == self.batch:
            batch[0].fill_(float("nan"))
