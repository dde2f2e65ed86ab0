"""What ``predict`` draws: a tiny DataModule whose batches say which samples to draw and how.

    python -m iddpm_lightning predict --config configs/digits.yaml --ckpt_path C \\
        --sampling.num_samples=1000 --sampling.sampler.steps=50

The data flow is one way: these settings -> ``SampleBatch`` batches (the sample indices
0..N-1, the sampler, the seed) -> ``IDDPM.predict_step`` (images) -> ``SampleWriter`` (the npz
and a grid, in ``out_dir``). Under DDP, Lightning gives every rank its share of the indices;
noise is keyed by (seed, first index of the batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from .diffusion import Sampler
from .settings import NonNegativeInt, PositiveInt, check_args


@dataclass
class SampleBatch:
    """The samples ``index`` [b] (long) to draw with ``sampler`` and noise keyed by ``seed``."""

    index: torch.Tensor
    sampler: Sampler
    seed: int

    def __len__(self) -> int:
        return len(self.index)


class Sampling(LightningDataModule):
    """The ``predict`` settings: how many samples, how to draw them, where to write them.

    Args:
        num_samples: Images to draw (the paper's FIDs use 50,000).
        sampler: How to draw them (``diffusion.samplers``: the sampler, its steps, η, order).
        batch_size: Images sampled at once per device.
        seed: Seed of the noise (a non-negative integer).
        out_dir: Output folder; null: ``{run_dir}/predict``.
    """

    def __init__(
        self,
        num_samples: PositiveInt = 64,
        sampler: Sampler = Sampler(),
        batch_size: PositiveInt = 64,
        seed: NonNegativeInt = 0,
        out_dir: str | None = None,
    ):
        super().__init__()
        check_args("sampling.", Sampling.__init__, {k: v for k, v in locals().items() if k != "self"})
        self.num_samples, self.sampler, self.batch_size, self.seed, self.out_dir = (
            num_samples, sampler, batch_size, seed, out_dir)

    def predict_dataloader(self) -> DataLoader:
        collate = partial(_collate, sampler=self.sampler, seed=self.seed)
        return DataLoader(torch.arange(self.num_samples), batch_size=self.batch_size, collate_fn=collate)


def _collate(indices: list[torch.Tensor], sampler: Sampler, seed: int) -> SampleBatch:
    return SampleBatch(torch.stack(indices), sampler, seed)
