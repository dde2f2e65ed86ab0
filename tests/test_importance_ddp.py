"""Importance sampling of t (``ImportanceSampling``) under real DDP (2 CPU processes, gloo) and across a resume."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from iddpm_lightning.callbacks import ImportanceSampling
from iddpm_lightning.module import IDDPM

from .conftest import TINY_UNET, REPO



def reference_history(T: int, H: int, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's per-element update: append, keep the newest H."""
    hist = [[] for _ in range(T)]
    for t, loss in pairs:
        hist[t] = (hist[t] + [loss])[-H:]
    history = torch.zeros(T, H, dtype=torch.float64)
    for t, h in enumerate(hist):
        history[t, : len(h)] = torch.tensor(h, dtype=torch.float64)
    return history, torch.tensor([len(h) for h in hist])


@pytest.mark.slow
def test_ddp_ranks_hold_identical_history_equal_to_rank_ordered_single_process(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "ddp_importance.py"), str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert [len(t) for t, _ in r1["steps"]] == [8, 8, 8, 8, 8, 5]  # rank 1's last batch is short
    assert torch.equal(r0["loss_history"], r1["loss_history"])
    assert torch.equal(r0["loss_counts"], r1["loss_counts"])
    assert torch.equal(r0["probs"], r1["probs"])
    # A single process fed the concatenated losses in rank order, step by step, agrees.
    pairs = []
    for (t0, l0), (t1, l1) in zip(r0["steps"], r1["steps"]):
        pairs += list(zip(torch.cat([t0, t1]).tolist(), torch.cat([l0, l1]).double().tolist()))
    history, counts = reference_history(12, 3, pairs)
    assert torch.equal(r0["loss_counts"], counts)
    assert torch.equal(r0["loss_history"], history)
    # The ranks drew different timesteps (per-rank randomness).
    assert not torch.equal(r0["steps"][0][0], r1["steps"][0][0])


def _fit(tmp_path, steps, ckpt_path=None):
    torch.manual_seed(0)
    model = IDDPM(image_size=8, in_channels=1, unet=TINY_UNET, timesteps=12, loss_type="vlb")
    callback = ImportanceSampling(history_per_term=2)
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loader = DataLoader(TensorDataset(x, torch.zeros(64, dtype=torch.long)), batch_size=8)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=[callback, ckpt], default_root_dir=tmp_path)
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return callback.history


def test_history_survives_a_checkpoint_round_trip(tmp_path):
    stopped = _fit(tmp_path / "a", steps=3)
    saved = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)
    state = saved["callbacks"]["ImportanceSampler"]  # its key before the rename: older checkpoints resume
    assert torch.equal(state["loss_history"], stopped.loss_history)
    # Resuming with no steps left restores exactly the history of the stopped run.
    restored = _fit(tmp_path / "b", steps=3, ckpt_path=tmp_path / "a" / "last.ckpt")
    assert torch.equal(restored.loss_history, stopped.loss_history)
    assert torch.equal(restored.loss_counts, stopped.loss_counts)
