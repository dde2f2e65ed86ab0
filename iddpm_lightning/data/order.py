"""Exact resume of the training data: which images each step sees is drawn from (seed, epoch)
alone, and the position within the epoch is part of every checkpoint.

``EpochOrder`` draws each epoch's order and random flips in the main process (so
loader workers draw nothing), and ``ResumableLoader`` (torchdata's ``StatefulDataLoader``,
whose state Lightning saves) restores a run through the sampler alone, with any
``num_workers``. ``ImageDataModule`` (base.py) builds them for every training loader.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator, Optional, Union

import torch
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from ..errors import ConfigError
from ..rng import derive_seed

# torchdata 0.11 calls a torch API that torch 2.14 deprecates, once per loader: noise only.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

# A dataset key: an index, or (index, flip) from a sampler that draws random flips.
Key = Union[int, tuple[int, bool]]


def unpack(key: Key) -> tuple[int, bool]:
    return key if isinstance(key, tuple) else (key, False)



class EpochOrder(DistributedSampler):
    """This rank's share of a fresh permutation every epoch, drawn from (seed, epoch) alone, and
    optionally a fair coin per image for a left-right flip (the keys are then ``(index, flip)``).

    Everything random about the training data lives here, in the main process, so worker
    processes draw nothing and ``num_workers`` changes no batch. Like torch's
    DistributedSampler (which it is, so Lightning keeps it under DDP) it gives each of the
    ``num_replicas`` ranks ⌊N / num_replicas⌋ images of the permutation, rank r taking
    positions r, r + num_replicas, ...; of these it yields whole batches of ``batch_size``
    only (the loader's drop_last), so that the epoch ends exactly at its last batch.

    Its state (``state_dict``: epoch and images already yielded) is saved by
    ``StatefulDataLoader`` with the loader's position. A finished epoch is saved as the
    start of the next one: on a restart Lightning re-creates the iterator from the saved
    state before it calls ``set_epoch``, and with workers the first indices are drawn then.
    ``__iter__`` is a generator, so nothing is drawn before the first index is asked for.
    """

    def __init__(self, dataset: Dataset, seed: int, batch_size: int = 1, num_replicas: int = 1, rank: int = 0,
                 random_flip: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.num_samples -= self.num_samples % batch_size  # whole batches only
        self.random_flip = random_flip
        self.yielded = 0
        self._resume_at = 0

    def order(self, epoch: int) -> list[Key]:
        """This rank's keys of ``epoch``, in order."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        perm = torch.randperm(len(self.dataset), generator=g)  # (N,)
        flips = torch.rand(len(self.dataset), generator=g) < 0.5  # (N,), one coin per position
        mine = slice(self.rank, self.num_replicas * self.num_samples, self.num_replicas)
        if not self.random_flip:
            return perm[mine].tolist()
        return list(zip(perm[mine].tolist(), flips[mine].tolist()))

    def __iter__(self) -> Iterator[Key]:
        start, self._resume_at = self._resume_at, 0
        keys = self.order(self.epoch)
        self.yielded = start
        for key in keys[start:]:
            self.yielded += 1
            yield key

    def state_dict(self) -> dict[str, int]:
        if self.yielded >= self.num_samples:
            return {"epoch": self.epoch + 1, "yielded": 0}
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.yielded, self._resume_at = int(state["epoch"]), int(state["yielded"]), int(state["yielded"])


def _find_sampler_state(state: Any) -> Optional[dict]:
    """The EpochOrder state ({epoch, yielded}) inside a StatefulDataLoader state, whose
    layout depends on the number of workers that saved it."""
    if isinstance(state, dict):
        if "sampler_state" in state and isinstance(state["sampler_state"], dict) and "epoch" in state["sampler_state"]:
            return state["sampler_state"]
        for value in state.values():
            found = _find_sampler_state(value)
            if found is not None:
                return found
    return None


class ResumableLoader(StatefulDataLoader):
    """torchdata's StatefulDataLoader, which Lightning checkpoints, restored through its sampler
    alone: the datasets are deterministic, so the sampler's (epoch, position) is the whole state,
    and a run saved with one ``num_workers`` resumes exactly with another (torchdata's own
    restore requires the same worker count)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sampler_state = _find_sampler_state(state_dict)
        if sampler_state is None:
            raise ConfigError("the checkpoint's training-loader state holds no sampler position; resume from a "
                              "checkpoint written by this version of iddpm_lightning")
        super().load_state_dict({})  # a fresh iterator, which draws from the restored sampler
        self.sampler.load_state_dict(sampler_state)
