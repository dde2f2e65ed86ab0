"""The base of every data module: what a dataset must provide, and what the base gives it.

A new dataset is a subclass of ``ImageDataModule`` that provides

- in ``__init__``: ``image_size``, ``channels`` and ``num_classes`` (0 when unlabeled), so that the
  CLI can link them into the model before ``setup`` runs, and cheap checks of its settings (paths,
  sizes) that fail with one ``ConfigError`` sentence naming the setting;
- ``_load_splits()``: the (train, val, test) datasets (test may be None), each yielding
  ``(x, y)``: ``x`` float32 [C, H, W] in [-1, 1] (``to_model_range`` of uint8 pixels) and ``y`` an
  int64 label (0 when unlabeled); a training dataset that mirrors takes the keys ``(index, flip)``
  that ``EpochOrder`` draws when ``random_flip`` is true;
- ``identity()``: the settings that define the data (not how it is loaded), for cache keys;
- ``stats_root`` (optional): a folder, shared by runs, for statistics of the data (FID's reference).

The base gives it: the loaders (the training one resumable at any step with any
``num_workers``, ``EpochOrder`` drawing each epoch's order and flips from (seed, epoch); workers
that ignore the stop signals), the batch-size check, an unrepeated test split under DDP, and
``reference(split)`` for reference statistics. ``U8Images`` holds in-memory uint8 images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..checkpointing import IgnoreStopSignals
from ..errors import ConfigError
from ..settings import NonNegativeInt, PositiveInt, check_args
from .order import EpochOrder, Key, ResumableLoader, unpack


def to_model_range(u8: Tensor, flip: bool = False) -> Tensor:
    """Map uint8 images ``[..., C, H, W]`` to float32 in [-1, 1], optionally mirrored left-right."""
    x = u8.float() / 127.5 - 1.0
    return x.flip(-1) if flip else x


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] -> uint8 [0, 255], rounded and clamped: the inverse of ``to_model_range``."""
    return ((x.float() + 1) * 127.5).round().clamp_(0, 255).to(torch.uint8)


def split_indices(n: int, held_out: Sequence[int], seed: int) -> list[Tensor]:
    """Cut a fixed-seed permutation of ``range(n)`` into the ``held_out`` sizes, then the rest (each sorted)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    bounds = np.cumsum([0, *held_out]).tolist()
    parts = [perm[a:b] for a, b in zip(bounds[:-1], bounds[1:])] + [perm[bounds[-1] :]]
    return [p.sort().values for p in parts]


class U8Images(Dataset):
    """In-memory uint8 images ``[N, C, H, W]`` with int64 labels ``[N]``; ``dataset[(i, True)]`` is mirrored."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: Key) -> tuple[Tensor, Tensor]:
        i, flip = unpack(key)
        return to_model_range(self.images[i], flip), self.labels[i]


@dataclass
class Reference:
    """A split as statistics of the data (FID's reference) are computed from it."""

    dataset: Dataset  # (x, y) pairs, never flipped
    key: dict  # what the statistics depend on: the data module, its data settings, the split
    root: Optional[str]  # the folder its statistics are cached in by default (None: the run directory)


class ImageDataModule(LightningDataModule):
    """Loader settings shared by all data modules; subclasses implement ``_load_splits`` and
    ``identity``."""

    image_size: int
    channels: int
    num_classes: int
    random_flip: bool = False  # training images only; drawn by the sampler
    stats_root: Optional[str] = None  # where statistics of the data are cached by default (None: the run dir)

    def __init__(
        self,
        batch_size: PositiveInt = 128,
        num_workers: NonNegativeInt = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: NonNegativeInt = 0,
    ) -> None:
        """
        Args:
            batch_size: Images per batch PER DEVICE; the global batch is
                batch_size x devices x num_nodes x accumulate_grad_batches (fit prints it).
            num_workers: DataLoader worker processes per device (0 loads in the main process).
                Changes no batch: the order and flips are drawn in the main process.
            pin_memory: Copy batches into page-locked memory (faster host-to-GPU transfer).
            persistent_workers: Keep workers alive between epochs; only effective when num_workers > 0.
            seed: Seed of the training order and flips; the CLI sets it from seed_everything.
        """
        super().__init__()
        check_args("data.", ImageDataModule.__init__, {k: v for k, v in locals().items() if k != "self"})
        self.seed = seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    def _load_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        """Return the (train, val, test) datasets."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """The settings that define the data (not how it is loaded), for cache keys."""
        raise NotImplementedError

    def reference(self, split: str) -> Reference:
        """The ``train``, ``val`` or ``test`` split (after ``setup``) and what statistics of it depend on:
        the data module's class, ``identity()``, the split, its length and image shape, and the
        file list of a dataset of files."""
        dataset = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
        if dataset is None and self.train_set is not None:
            raise ConfigError(f"{type(self).__name__} has no {split} split; use the train or val split")
        if dataset is None:
            raise RuntimeError("call setup() before asking for a reference split")
        key = {"datamodule": f"{type(self).__module__}.{type(self).__qualname__}", **self.identity(), "split": split,
               "length": len(dataset), "image_shape": [self.channels, self.image_size, self.image_size]}
        if getattr(dataset, "files", None) is not None:  # a dataset of files: which files
            key["files_sha256"] = hashlib.sha256("\n".join(map(str, dataset.files)).encode()).hexdigest()
        return Reference(dataset, key, self.stats_root)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self._load_splits()
        if stage in (None, "fit"):
            n = len(self.train_set)
            world = self.trainer.world_size if self.trainer is not None else 1
            if self.batch_size > n // world:
                raise ConfigError(
                    f"data.batch_size={self.batch_size} (per device) exceeds the {n} training images "
                    f"({n // world} per device on {world} device(s)), so drop_last would leave no training batch; "
                    f"set data.batch_size to at most {n // world}."
                )

    def _loader(self, dataset: Optional[Dataset], train: bool, **kwargs) -> DataLoader:
        """A loader of ``dataset`` with this module's settings; its workers ignore the stop signals
        (a scheduler's SIGTERM to the process group), and a given ``worker_init_fn`` still runs."""
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return (ResumableLoader if train else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            worker_init_fn=IgnoreStopSignals(kwargs.pop("worker_init_fn", None)),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        """This rank's share, shuffled by epoch from the run's seed. A ``StatefulDataLoader``:
        Lightning saves its position (and the sampler's epoch) in every checkpoint and restores
        it on resume, so the run continues with the next batch the uninterrupted run would draw."""
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        sampler = EpochOrder(self.train_set, self.seed, self.batch_size, num_replicas=world, rank=rank,
                                      random_flip=self.random_flip)
        return self._loader(self.train_set, train=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        # Lightning's default DistributedSampler pads the ranks' shares with repeated images,
        # which would bias the test bits/dim; this sampler gives each image to one rank once.
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(
                self.test_set, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
            )
        return self._loader(self.test_set, train=False, sampler=sampler)
