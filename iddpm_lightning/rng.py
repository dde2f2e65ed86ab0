"""Random streams keyed by where they are used, so that a run is the same however it is cut.

Every random draw of training (t, ε, dropout, the data order and flips) comes from a
generator seeded by a tuple such as (seed, rank, batch number): ranks differ (a global
seed alone would give every GPU the same t and ε), and a run resumed at any step draws
exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*key: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (computed on the host: no sync)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1)


def seeded_generator(device: torch.device | str, *key: int) -> torch.Generator:
    """A generator on ``device`` seeded from a tuple of integers, e.g. (seed, rank, step)."""
    return torch.Generator(device=device).manual_seed(derive_seed(*key))
