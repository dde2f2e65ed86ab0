"""What ``predict`` draws: a tiny DataModule whose batches say which samples to draw and how.

    python -m iddpm_lightning predict --config configs/digits.yaml --ckpt_path C \\
        --sampling.num_samples=1000 --sampling.sample_steps=50

The data flow is one way: these settings -> ``SampleBatch`` batches (the sample indices
0..N-1 with the sampler's settings) -> ``IDDPM.predict_step`` (images) -> ``SampleWriter``
(the npz and a grid, in ``out_dir``). Under DDP, Lightning gives every rank its share of the
indices; noise is keyed by (seed, first index of the batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from .settings import ClosedUnitInterval, NonNegativeInt, PositiveInt, Sampler, SampleSteps, SolverOrder, check_args


@dataclass
class SampleBatch:
    """The samples ``index`` [b] (long) to draw with one sampler setting."""

    index: torch.Tensor
    sample_steps: SampleSteps
    sampler: Sampler
    eta: float
    seed: int
    solver_order: int = 2

    def __len__(self) -> int:
        return len(self.index)


class Sampling(LightningDataModule):
    """The ``predict`` settings: how many samples, how to draw them, where to write them.

    Args:
        num_samples: Images to draw (the paper's FIDs use 50,000).
        sample_steps: Respaced steps: a count (50, 100), sections ("10,15,25"), a DDIM
            stride ("ddim50"), or null for all T; for ``dpm_solver`` a count (10-25).
        sampler: ``ddpm`` (ancestral, with the learned variance), ``ddim`` or ``dpm_solver``
            (DPM-Solver++ through diffusers, for 10-25 steps).
        eta: DDIM's η in [0, 1] (0: deterministic given the noise; 1: DDPM-like noise).
        solver_order: DPM-Solver++'s order (``dpm_solver`` only; 2 is diffusers' default).
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
        solver_order: SolverOrder = 2,
    ):
        super().__init__()
        check_args("sampling.", Sampling.__init__, {k: v for k, v in locals().items() if k != "self"})
        self.num_samples, self.sample_steps, self.sampler, self.eta = num_samples, sample_steps, sampler, eta
        self.batch_size, self.seed, self.out_dir, self.solver_order = batch_size, seed, out_dir, solver_order

    def predict_dataloader(self) -> DataLoader:
        collate = partial(_collate, sample_steps=self.sample_steps, sampler=self.sampler, eta=self.eta, seed=self.seed,
                          solver_order=self.solver_order)
        return DataLoader(torch.arange(self.num_samples), batch_size=self.batch_size, collate_fn=collate)


def _collate(indices: list[torch.Tensor], **settings) -> SampleBatch:
    return SampleBatch(torch.stack(indices), **settings)
