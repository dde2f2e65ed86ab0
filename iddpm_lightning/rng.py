"""Random streams keyed by where they are used, so that a run is the same however it is cut.

Every random draw of training (t, ε, dropout, the data order and flips) comes from a
generator seeded by a tuple such as (seed, rank, batch number): ranks differ (a global
seed alone would give every GPU the same t and ε), and a run resumed at any step draws
exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from .errors import ConfigError

MAX_SEED = 2**32 - 1  # numpy's seeds, which seed_everything also sets


def derive_seed(*key: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (computed on the host: no sync)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1)


def seeded_generator(device: torch.device | str, *key: int) -> torch.Generator:
    """A generator on ``device`` seeded from a tuple of integers, e.g. (seed, rank, step)."""
    return torch.Generator(device=device).manual_seed(derive_seed(*key))


@contextmanager
def global_rng_seeded(device: torch.device, *key: int) -> Iterator[None]:
    """Inside: torch's global generators (CPU, and ``device``'s if it is a GPU) seeded from
    ``key``; after: their previous states back. For what draws from the global generator and
    takes no generator argument, such as the dropout layers of a UNet's forward pass."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        seed = derive_seed(*key)
        torch.manual_seed(seed)
        yield


def stream_seed(seed_everything) -> int:
    """``model.seed`` and ``data.seed`` from ``seed_everything``: true draws one at random (the CLI
    writes it back, so the saved config holds it); an invalid value is refused by ``check_seed``."""
    if seed_everything is True:
        # One random seed for both links and every rank: drawn once and passed on the way Lightning
        # passes its own (PL_GLOBAL_SEED, which the ranks DDP launches inherit, and seed_everything reads).
        if "PL_GLOBAL_SEED" not in os.environ:
            os.environ["PL_GLOBAL_SEED"] = str(int(np.random.SeedSequence().generate_state(1)[0]))
        return int(os.environ["PL_GLOBAL_SEED"])
    valid = isinstance(seed_everything, int) and not isinstance(seed_everything, bool) and seed_everything >= 0
    return int(seed_everything) if valid and seed_everything <= MAX_SEED else 0


def check_seed(seed) -> None:
    if seed is False or seed is None:
        raise ConfigError("seed_everything=false leaves the run without a seed, but every random stream of training "
                          "is keyed by it; set an integer (e.g. 0), or true for a random one")
    if not isinstance(seed, bool) and not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed_everything={seed} must be in [0, {MAX_SEED}] (numpy's seeds), or true for "
                          f"a random seed; set a non-negative seed")
