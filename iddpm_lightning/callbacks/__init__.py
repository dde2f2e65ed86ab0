"""Callbacks, one file each: importance sampling of t, bits/dim and sample quality during
validation, sample grids, the non-finite guard of every fit, the test report, the writer behind
`predict` and the gradient norm. They are thin: the mathematics is ``diffusion/``'s, the metrics
and reference statistics ``evaluation/``'s."""

from .bits_per_dim import BitsPerDim
from .bpd_report import BpdReport
from .fid import FID
from .grad_norm import GradNorm
from .importance_sampling import ImportanceSampling
from .non_finite_guard import NonFiniteGuard
from .sample_grid import SampleGrid
from .sample_writer import SampleWriter

__all__ = ["BitsPerDim", "BpdReport", "FID", "GradNorm", "ImportanceSampling", "NonFiniteGuard", "SampleGrid",
           "SampleWriter"]
