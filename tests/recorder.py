"""A test-only callback: appends, for every training batch, its batch number and the pixel
values of its images to ``{run_dir}/batches.jsonl`` (a resumed run appends to the same file)."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import Callback


class RecordBatches(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        x, _ = batch
        u8 = ((x.float() + 1) * 127.5).round().to(int).flatten(1).tolist()  # (B, C·H·W) 8-bit values
        row = {"batch": trainer.fit_loop.epoch_loop.total_batch_idx + 1, "epoch": trainer.current_epoch,
               "step": trainer.global_step, "images": u8}
        with open(Path(trainer.default_root_dir) / "batches.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def read_batches(run_dir) -> dict[int, dict]:
    """The last record of every batch number (a batch trained before a kill and again after
    the resume appears twice; the resumed one counts)."""
    rows = [json.loads(line) for line in open(Path(run_dir) / "batches.jsonl")]
    return {r["batch"]: r for r in rows}
