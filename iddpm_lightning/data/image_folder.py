"""A folder of images (e.g. ImageNet 64x64 as PNGs), resized and centre-cropped as the paper's code does."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..settings import NonNegativeInt, PositiveInt, check_args
from .base import ImageDataModule, split_indices, to_model_range
from .order import Key, unpack

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # matched case-insensitively


def resize_center_crop(image: Image.Image, image_size: int) -> np.ndarray:
    """Resize and centre-crop exactly as openai/improved-diffusion's image_datasets.py; uint8 HWC.

    BOX-halve while the short side is at least 2 * image_size, BICUBIC-scale the short
    side to image_size (sizes rounded), then cut the centre image_size x image_size square.
    """
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def _find_images(root: str, setting: str) -> list[Path]:
    """All png/jpg/jpeg files under ``root`` (recursive, case-insensitive, sorted); ConfigError if none."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{setting}={root!r} is not an existing folder; point {setting} at a folder of images.")
    files = sorted(
        Path(d) / f
        for d, _, names in os.walk(folder, followlinks=True)
        for f in names
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise ConfigError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}, any case) found under {setting}={root!r}; "
            f"point {setting} at a folder that holds such images."
        )
    return files


def _check_readable(files: Sequence[Path], setting: str) -> None:
    """Open every file's header with PIL (cheap: pixels are not decoded); ConfigError on the first bad one."""
    bad = []
    for f in files:
        try:
            with Image.open(f):
                pass
        except Exception:  # PIL raises several types for corrupt files
            bad.append(f)
    if bad:
        raise ConfigError(
            f"{len(bad)} of {len(files)} image files under {setting} cannot be read by PIL, the first is {bad[0]}; "
            "delete or replace the corrupt files."
        )


class _ImageFiles(Dataset):
    """Image files, each converted to RGB (or greyscale: ``channels`` 1), resized and centre-cropped;
    ``dataset[(i, True)]`` is mirrored."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], image_size: int, channels: int = 3) -> None:
        self.files, self.labels = list(files), list(labels)
        self.image_size, self.channels = image_size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: Key) -> tuple[Tensor, int]:
        i, flip = unpack(key)
        with Image.open(self.files[i]) as im:
            arr = resize_center_crop(im.convert("RGB" if self.channels == 3 else "L"), self.image_size)
        u8 = torch.from_numpy(np.ascontiguousarray(arr.reshape(*arr.shape[:2], -1))).permute(2, 0, 1)  # (C, H, W)
        return to_model_range(u8, flip), self.labels[i]


class ImageFolderDataModule(ImageDataModule):
    """A folder of png/jpg/jpeg images (searched recursively, extensions in any case).

    Each image is converted to RGB (or greyscale, ``channels: 1``), then resized and centre-cropped
    to ``image_size`` as the paper's improved-diffusion code does. With ``class_cond`` the label of an image is the
    index of its first-level sub-folder under the root (names sorted). Validation is always
    a fixed-seed subset of ``val_size`` images held out of ``root`` (the training images),
    so that choosing a checkpoint by ``val/*`` never looks at the test images. Test is
    ``test_root`` (e.g. ImageNet's validation set, on which the paper reports bits/dim), or
    ``test_size`` more images held out of ``root``; with neither, ``test`` is refused.
    """

    def __init__(
        self,
        root: str,
        image_size: PositiveInt = 64,
        class_cond: bool = False,
        test_root: Optional[str] = None,
        val_size: PositiveInt = 1000,
        test_size: NonNegativeInt = 0,
        random_flip: bool = False,
        split_seed: NonNegativeInt = 0,
        channels: Literal[1, 3] = 3,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            root: Folder of training images (class sub-folders when class_cond).
            image_size: Side of the square images the model sees, in pixels.
            class_cond: Label images by their first-level sub-folder of root (sorted names -> 0, 1, ...).
            test_root: Folder of test images; if unset, test_size images are held out of root.
            val_size: Validation images held out of root (not trained on).
            test_size: Test images held out of root (used only without test_root).
            random_flip: Mirror training images left-right with probability 1/2.
            split_seed: Seed of the held-out validation/test subsets.
            channels: 3 (RGB) or 1 (greyscale) channels per image.
            **kwargs: Loader settings: batch_size (per device), num_workers, pin_memory, persistent_workers.
        """
        super().__init__(**kwargs)
        check_args("data.", ImageFolderDataModule.__init__, {
            "image_size": image_size, "class_cond": class_cond, "val_size": val_size, "test_size": test_size,
            "random_flip": random_flip, "split_seed": split_seed, "channels": channels})
        self.root, self.test_root = root, test_root
        self.class_cond, self.random_flip, self.split_seed = class_cond, random_flip, split_seed
        self.val_size = val_size
        self.test_size = 0 if test_root else test_size
        self.image_size, self.channels = image_size, channels

        train_files = _find_images(root, "data.root")
        self.classes = sorted({_class_of(f, root) for f in train_files} - {None}) if class_cond else []
        self.num_classes = len(self.classes)
        # (setting, files, labels) per source folder; a test entry only when test_root is given
        self.sources = {"root": ("data.root", train_files, self._labels(train_files, root, "data.root"))}
        if test_root is not None:
            files = _find_images(test_root, "data.test_root")
            self.sources["test_root"] = ("data.test_root", files, self._labels(files, test_root, "data.test_root"))
        if self.val_size + self.test_size >= len(train_files):
            raise ConfigError(
                f"holding out data.val_size + data.test_size = {self.val_size + self.test_size} images leaves none "
                f"of the {len(train_files)} under data.root for training; lower data.val_size/data.test_size "
                "or give data.test_root."
            )

    def identity(self) -> dict[str, Any]:
        resolve = lambda p: None if p is None else str(Path(p).expanduser().resolve())  # noqa: E731
        return {"root": resolve(self.root), "test_root": resolve(self.test_root), "image_size": self.image_size,
                "class_cond": self.class_cond, "split_seed": self.split_seed, "val_size": self.val_size,
                "test_size": self.test_size, **({"channels": 1} if self.channels == 1 else {})}

    def _labels(self, files: list[Path], folder: str, setting: str) -> list[int]:
        if not self.class_cond:
            return [0] * len(files)
        index = {c: i for i, c in enumerate(self.classes)}
        tops = [_class_of(f, folder) for f in files]
        stray = next((f for f, t in zip(files, tops) if t not in index), None)
        if stray is not None:
            raise ConfigError(
                f"data.class_cond=true needs every image under {setting} inside a class sub-folder of data.root "
                f"({', '.join(self.classes) or 'none found'}), but {stray} is not; move such images into class "
                "folders or set data.class_cond=false."
            )
        return [index[t] for t in tops]

    def _dataset(self, name: str, idx: Optional[Tensor] = None) -> _ImageFiles:
        _, files, labels = self.sources[name]
        if idx is not None:
            files, labels = [files[i] for i in idx.tolist()], [labels[i] for i in idx.tolist()]
        return _ImageFiles(files, labels, self.image_size, self.channels)

    def _load_splits(self) -> tuple[Dataset, Dataset, Optional[Dataset]]:
        for setting, files, _ in self.sources.values():
            _check_readable(files, setting)
        test, val, train = split_indices(len(self.sources["root"][1]), [self.test_size, self.val_size], self.split_seed)
        if "test_root" in self.sources:
            test_set = self._dataset("test_root")
        else:
            test_set = self._dataset("root", test) if self.test_size > 0 else None
        return self._dataset("root", train), self._dataset("root", val), test_set

    def setup(self, stage: Optional[str] = None) -> None:
        super().setup(stage)
        if stage == "test" and self.test_set is None:
            raise ConfigError(
                "test needs a test split, but data.test_root is not set and data.test_size=0; set data.test_root "
                "to a folder of test images, or data.test_size to hold that many images out of data.root."
            )


def _class_of(file: Path, root: str) -> Optional[str]:
    """The first-level sub-folder of ``root`` that holds ``file`` (None for files directly in root)."""
    parts = file.relative_to(Path(root).expanduser()).parts
    return parts[0] if len(parts) > 1 else None
