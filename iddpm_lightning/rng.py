"""Random streams keyed by where they are used, so that a run is the same however it is cut.

Every random draw of training (t, ε, dropout, the data order and flips) comes from a
generator seeded by a tuple such as (seed, rank, batch number): ranks differ (a global
seed alone would give every GPU the same t and ε), and a run resumed at any step draws
exactly what the uninterrupted run would have. The seed is an explicit setting
(``model.seed``, ``data.seed``), which the CLI links from ``seed_everything``.
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
        torch.manual_seed(derive_seed(*key))
        yield


def stream_seed(seed_everything) -> int:
    """``model.seed`` and ``data.seed`` from ``seed_everything``: an integer as it is; false keys
    the streams with 0 (Lightning then seeds nothing else); true is resolved by the CLI
    (``random_seed``), which writes the drawn seed back into all three. An integer out of range
    is refused by ``check_seed``."""
    return int(seed_everything) if _is_seed(seed_everything) else 0


def random_seed() -> int:
    """``seed_everything: true``: a seed drawn at random, the same on every rank. Lightning's DDP
    launcher hands rank 0's seed to the ranks it starts in PL_GLOBAL_SEED; under an external
    launcher (torchrun, srun, mpirun, jsrun) every process would draw its own, so that is refused."""
    launcher = multi_process_launcher()
    if launcher is not None:
        if "PL_GLOBAL_SEED" not in os.environ:
            raise ConfigError(f"seed_everything=true would draw another seed in every process of this {launcher} "
                              f"launch; set seed_everything to an integer")
        return int(os.environ["PL_GLOBAL_SEED"])
    return int(np.random.SeedSequence().generate_state(1)[0])


# Each launcher Lightning reads (its cluster environments), by the variables it sets in every process.
_LAUNCHERS = (
    ("srun", "SLURM_NTASKS"),                # SLURMEnvironment (also SLURM_PROCID, SLURM_LOCALID; no LOCAL_RANK)
    ("torchrun", "WORLD_SIZE"),              # TorchElasticEnvironment, and Lightning's own DDP children
    ("mpirun (Open MPI)", "OMPI_COMM_WORLD_SIZE"),  # MPIEnvironment
    ("mpirun (MPICH, Intel MPI)", "PMI_SIZE"),
    ("jsrun (LSF)", "JSM_NAMESPACE_SIZE"),   # LSFEnvironment
)


def multi_process_launcher() -> str | None:
    """The launcher that started this process as one of several (named with its variable), or
    None for a single process."""
    for name, variable in _LAUNCHERS:
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 1:
            return f"{name} ({variable}={value})"
    if os.environ.get("LOCAL_RANK") is not None:  # a rank started by some other launcher
        return f"multi-process (LOCAL_RANK={os.environ['LOCAL_RANK']})"
    return None


def _is_seed(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SEED


def check_seed(seed) -> None:
    if isinstance(seed, int) and not isinstance(seed, bool) and not _is_seed(seed):
        raise ConfigError(f"seed_everything={seed} must be in [0, {MAX_SEED}] (numpy's seeds), or true for "
                          f"a random seed; set a non-negative seed")
