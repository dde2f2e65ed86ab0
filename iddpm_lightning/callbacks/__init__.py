"""Callbacks: importance sampling of t, sample grids."""

from .importance import ImportanceSampler
from .samples import SampleGrid

__all__ = ["ImportanceSampler", "SampleGrid"]
