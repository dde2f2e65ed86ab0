"""The reference statistics' streaming pass (evaluation/reference.py): μ and Σ of the whole split
equal the in-memory ones, only a fixed subset's features are kept, and the pass's memory does not
grow with the split."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from iddpm_lightning.evaluation.metrics import ReferenceStats, mean_cov
from iddpm_lightning.evaluation.reference import StreamingMoments, compute_reference, subset_indices
from iddpm_lightning.evaluation.features import wrap

from .conftest import REPO


def rows(n: int = 1000, d: int = 24, seed: int = 0) -> torch.Tensor:
    """Correlated features far from the origin (where a naive Σ x xᵀ − n μ μᵀ would lose digits)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + 50.0).float()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_streamed_mean_and_covariance_equal_the_in_memory_ones_to_1e_10():
    x = rows()
    moments = StreamingMoments(x.shape[1])
    for batch in x.split(97):  # uneven batches, the last one short
        moments.update(batch)
    mu, sigma = mean_cov(x)
    assert moments.n == len(x)
    assert relative(moments.mean, mu) < 1e-10 and relative(moments.covariance(), sigma) < 1e-10
    halves = StreamingMoments(x.shape[1]), StreamingMoments(x.shape[1])  # two ranks' shares, merged
    halves[0].update(x[0::2])
    halves[1].update(x[1::2])
    halves[0].merge(StreamingMoments.unpacked(halves[1].packed(), x.shape[1]))
    assert relative(halves[0].mean, mu) < 1e-10 and relative(halves[0].covariance(), sigma) < 1e-10


class Identity(torch.nn.Module):
    """The pixels as features: [N, 3, 2, 2] uint8 -> [N, 12]."""

    num_features = 12

    def forward(self, x):
        return x.flatten(1).float()


def test_the_pass_streams_the_whole_split_and_keeps_a_fixed_subset_of_features():
    u8 = torch.randint(0, 256, (300, 3, 2, 2), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    dataset = torch.utils.data.TensorDataset(u8.float() / 127.5 - 1, torch.zeros(300))
    stats = compute_reference(dataset, wrap(Identity()), "{}", batch_size=64, device="cpu", subset_size=40)
    every = ReferenceStats.from_features(u8.flatten(1).float())
    assert stats.num == 300
    assert relative(stats.mu, every.mu) < 1e-10 and relative(stats.sigma, every.sigma) < 1e-10
    kept = subset_indices(300, 40)
    assert len(kept) == 40 and torch.equal(kept, kept.sort().values) and torch.equal(kept, subset_indices(300, 40))
    assert torch.equal(stats.features, u8.flatten(1).float()[kept])  # the subset's features, in index order
    assert torch.equal(subset_indices(30, 40), torch.arange(30))  # a split smaller than the subset: all of it


@pytest.mark.slow
def test_peak_memory_of_the_reference_pass_does_not_grow_with_the_split(tmp_path):
    """A split 10x larger (2,000 -> 20,000 images, 2048 features each: 15 -> 156 MiB as a float32
    matrix, twice that again as float64 for the covariance) costs the pass no more memory beyond
    the kept subset (1,000 images' features: 8 MiB)."""
    growth = {}
    for n in (2000, 20000):
        folder = tmp_path / str(n)
        folder.mkdir()
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "reference_memory.py"), str(n), "1000",
                        str(folder / "out.json")], check=True, env=env, timeout=300)
        result = json.loads((folder / "out.json").read_text())
        assert result["num"] == n and result["kept"] == 1000
        growth[n] = result["growth_mib"]
    assert growth[20000] - growth[2000] < 20, growth
