"""scikit-learn's bundled digits: the default config's data, in memory, no download."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..settings import NonNegativeInt, PositiveInt, check_args
from .base import ImageDataModule, U8Images, split_indices

DIGITS_COUNT = 1797  # images in sklearn.datasets.load_digits()


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled digits: 1,797 greyscale 8x8 images of 0-9 with values 0..16.

    A value ``v`` becomes the 8-bit grey ``round(v * 255 / 16)`` and then [-1, 1]. A
    fixed-seed permutation holds out ``test_size`` test and ``val_size`` validation
    images; the rest train. No download, no flips, everything in memory.
    """

    def __init__(self, val_size: PositiveInt = 150, test_size: PositiveInt = 150, split_seed: NonNegativeInt = 0,
                 **kwargs: Any) -> None:
        """
        Args:
            val_size: Validation images held out of the 1,797.
            test_size: Test images held out of the 1,797 (disjoint from validation).
            split_seed: Seed of the fixed train/val/test permutation.
            **kwargs: Loader settings: batch_size (per device), num_workers, pin_memory, persistent_workers.
        """
        super().__init__(**kwargs)
        check_args("data.", DigitsDataModule.__init__, {"val_size": val_size, "test_size": test_size,
                                                        "split_seed": split_seed})
        if val_size + test_size >= DIGITS_COUNT:
            raise ConfigError(
                f"data.val_size + data.test_size = {val_size + test_size} leaves no training images of the "
                f"{DIGITS_COUNT} digits; lower data.val_size or data.test_size."
            )
        self.val_size, self.test_size, self.split_seed = val_size, test_size, split_seed
        self.image_size, self.channels, self.num_classes = 8, 1, 10

    def identity(self) -> dict[str, Any]:
        return {"split_seed": self.split_seed, "val_size": self.val_size, "test_size": self.test_size}

    def _load_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(np.rint(digits.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
        labels = torch.from_numpy(digits.target).long()
        test, val, train = split_indices(len(images), [self.test_size, self.val_size], self.split_seed)
        return tuple(U8Images(images[i], labels[i]) for i in (train, val, test))
