"""CIFAR-10 in torchvision's layout, read from disk (downloaded only if asked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import download_and_extract_archive

from ..errors import ConfigError
from ..settings import NonNegativeInt, PositiveInt, check_args
from .base import ImageDataModule, U8Images, split_indices


class _CIFAR10NoMD5(CIFAR10):
    """torchvision's CIFAR-10 reader with the md5 checks turned off (the files only have to exist).

    The reading code (pickled batches, the official format) is torchvision's; skipping the
    checksums lets tests use tiny generated batches and spares hashing 180 MB every run.
    """

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 from torchvision's layout: ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``.

    Train is the official 50,000-image training set, all of it as in the paper (random
    horizontal flips optional, off as in the paper's improved-diffusion code). Validation is
    a fixed-seed subset of ``val_size`` of those TRAINING images, so that choosing a
    checkpoint by ``val/*`` never looks at the test set (val/bpd is then a training-set
    number, a little below the test bits/dim). Test is the full official 10,000-image test
    set, on which the paper reports bits/dim. 32x32 RGB, 10 classes; held in memory as uint8.
    """

    def __init__(
        self,
        root: str,
        download: bool = False,
        random_flip: bool = False,
        val_size: PositiveInt = 1000,
        split_seed: NonNegativeInt = 0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            root: Folder that contains ``cifar-10-batches-py``.
            download: Download the dataset into root if it is missing (needs network access).
            random_flip: Mirror training images left-right with probability 1/2.
            val_size: Validation images drawn (fixed seed) from the official TRAINING set.
            split_seed: Seed of the validation subset.
            **kwargs: Loader settings: batch_size (per device), num_workers, pin_memory, persistent_workers.
        """
        super().__init__(**kwargs)
        check_args("data.", CIFAR10DataModule.__init__, {"download": download, "random_flip": random_flip,
                                                         "val_size": val_size, "split_seed": split_seed})
        self.root, self.download, self.random_flip = root, download, random_flip
        self.stats_root = root  # next to the dataset, which several runs share
        self.val_size, self.split_seed = val_size, split_seed
        self.image_size, self.channels, self.num_classes = 32, 3, 10
        if not download:
            self._require_files()

    def identity(self) -> dict[str, Any]:
        return {"root": str(Path(self.root).expanduser().resolve()), "split_seed": self.split_seed,
                "val_size": self.val_size}

    def _missing_file(self) -> Optional[Path]:
        folder = Path(self.root).expanduser() / CIFAR10.base_folder
        names = [n for n, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
        return next((folder / n for n in names if not (folder / n).is_file()), None)

    def _require_files(self) -> None:
        missing = self._missing_file()
        if missing is not None:
            raise ConfigError(
                f"CIFAR-10 not found: {missing} does not exist; set data.root to the folder that holds "
                f"{CIFAR10.base_folder} (fetch it elsewhere with torchvision.datasets.CIFAR10(root, download=True) "
                "and copy it over), or set data.download=true on a machine with network access."
            )

    def prepare_data(self) -> None:
        if self.download and self._missing_file() is not None:
            try:
                download_and_extract_archive(CIFAR10.url, str(Path(self.root).expanduser()),
                                             filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
            except OSError as err:  # URLError is an OSError
                raise ConfigError(
                    f"data.download=true could not fetch CIFAR-10 into data.root={self.root!r} ({err}); "
                    "download it on a machine with network access and set data.download=false."
                ) from err

    def _read(self, train: bool) -> tuple[Tensor, Tensor]:
        try:
            ds = _CIFAR10NoMD5(str(Path(self.root).expanduser()), train=train)
        except Exception as err:  # truncated or foreign pickle files
            raise ConfigError(
                f"CIFAR-10 under data.root={self.root!r} cannot be read ({err!r}); re-download it."
            ) from err
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW, uint8
        return images, torch.tensor(ds.targets, dtype=torch.long)

    def _load_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        self._require_files()
        train_x, train_y = self._read(train=True)
        test_x, test_y = self._read(train=False)
        if self.val_size > len(train_x):
            raise ConfigError(
                f"data.val_size={self.val_size} exceeds the {len(train_x)} CIFAR-10 training images; "
                f"set data.val_size to at most {len(train_x)}."
            )
        self.val_indices, _ = split_indices(len(train_x), [self.val_size], self.split_seed)  # into the training set
        return (
            U8Images(train_x, train_y),
            U8Images(train_x[self.val_indices], train_y[self.val_indices]),
            U8Images(test_x, test_y),
        )
