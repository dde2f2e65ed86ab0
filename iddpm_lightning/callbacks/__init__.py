"""Callbacks: importance sampling of t, bits/dim and FID during validation, sample grids,
and the writer behind `predict`."""

from .fid import FID
from .importance import ImportanceSampler
from .nll import BitsPerDim
from .samples import SampleGrid
from .writer import SampleWriter

__all__ = ["BitsPerDim", "FID", "ImportanceSampler", "SampleGrid", "SampleWriter"]
