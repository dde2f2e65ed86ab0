"""Callbacks: sample grids."""

from .samples import SampleGrid

__all__ = ["SampleGrid"]
