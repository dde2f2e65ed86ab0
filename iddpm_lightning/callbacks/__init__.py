"""Callbacks: importance sampling of t, bits/dim and FID during validation, sample grids,
the non-finite guard of every fit, the test report, the writer behind `predict` and the
gradient norm."""

from .fid import FID
from .gradnorm import GradNorm
from .guard import NonFiniteGuard
from .importance import ImportanceSampler
from .nll import BitsPerDim
from .report import BpdReport
from .samples import SampleGrid
from .writer import SampleWriter

__all__ = ["BitsPerDim", "BpdReport", "FID", "GradNorm", "ImportanceSampler", "NonFiniteGuard", "SampleGrid", "SampleWriter"]
