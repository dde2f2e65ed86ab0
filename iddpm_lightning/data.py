"""LightningDataModules: scikit-learn digits (embedded), CIFAR-10 and an image folder.

(Over 300 lines because it holds the three data modules and their shared base, each with
the checks that make a bad path or size one sentence before training; the exact-resume
sampler and loader live in loaders.py.)

Every module yields batches ``(x, y)``: ``x`` is float32 ``[N, C, H, W]`` in [-1, 1]
(an 8-bit value ``u`` becomes ``u / 127.5 - 1``) and ``y`` holds int64 class labels
(all 0 when the data has none). The training loader shuffles and drops the last partial
batch; validation and test loaders do neither. The training order and its random flips are
drawn by ``EpochShuffleSampler`` from (``seed``, epoch) alone, and the loader is torchdata's
``StatefulDataLoader``, whose position Lightning saves in every checkpoint: a run resumed
at any step, in any epoch and with any ``num_workers``, continues with exactly the batches
the uninterrupted run would have drawn. ``image_size``, ``channels`` and
``num_classes`` (0 when unlabeled) are set in ``__init__`` so the CLI can link them
into the model before ``setup`` runs. Cheap checks (paths, empty folders) run in
``__init__``; reading and validating the data runs in ``setup``. ``reference(split)`` gives a
split and what it depends on, for statistics cached on disk (FID's reference).
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import download_and_extract_archive

from iddpm_lightning.checkpointing import IgnoreStopSignals
from iddpm_lightning.errors import ConfigError
from iddpm_lightning.loaders import EpochShuffleSampler, Key, ResumableLoader, unpack
from iddpm_lightning.settings import NonNegativeInt, PositiveInt, check_args

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # matched case-insensitively



def to_model_range(u8: Tensor, flip: bool = False) -> Tensor:
    """Map uint8 images ``[..., C, H, W]`` to float32 in [-1, 1], optionally mirrored left-right."""
    x = u8.float() / 127.5 - 1.0
    return x.flip(-1) if flip else x


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] -> uint8 [0, 255], rounded and clamped: the inverse of ``to_model_range``."""
    return ((x.float() + 1) * 127.5).round().clamp_(0, 255).to(torch.uint8)


def _split(n: int, held_out: Sequence[int], seed: int) -> list[Tensor]:
    """Cut a fixed-seed permutation of ``range(n)`` into the ``held_out`` sizes, then the rest (each sorted)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    bounds = np.cumsum([0, *held_out]).tolist()
    parts = [perm[a:b] for a, b in zip(bounds[:-1], bounds[1:])] + [perm[bounds[-1] :]]
    return [p.sort().values for p in parts]


class _U8Images(Dataset):
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


class _BaseDataModule(LightningDataModule):
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
        check_args("data.", _BaseDataModule.__init__, {k: v for k, v in locals().items() if k != "self"})
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
        if isinstance(dataset, _ImageFiles):
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
        sampler = EpochShuffleSampler(self.train_set, self.seed, self.batch_size, num_replicas=world, rank=rank,
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


# ----------------------------------------------------------------------------- digits

DIGITS_COUNT = 1797  # images in sklearn.datasets.load_digits()


class DigitsDataModule(_BaseDataModule):
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
        test, val, train = _split(len(images), [self.test_size, self.val_size], self.split_seed)
        return tuple(_U8Images(images[i], labels[i]) for i in (train, val, test))


# ----------------------------------------------------------------------------- CIFAR-10


class _CIFAR10NoMD5(CIFAR10):
    """torchvision's CIFAR-10 reader with the md5 checks turned off (the files only have to exist).

    The reading code (pickled batches, the official format) is torchvision's; skipping the
    checksums lets tests use tiny generated batches and spares hashing 180 MB every run.
    """

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class CIFAR10DataModule(_BaseDataModule):
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
        self.val_indices, _ = _split(len(train_x), [self.val_size], self.split_seed)  # into the training set
        return (
            _U8Images(train_x, train_y),
            _U8Images(train_x[self.val_indices], train_y[self.val_indices]),
            _U8Images(test_x, test_y),
        )


# ----------------------------------------------------------------------------- image folder


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
    """Image files, each converted to RGB, resized and centre-cropped; ``dataset[(i, True)]`` is mirrored."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], image_size: int) -> None:
        self.files, self.labels = list(files), list(labels)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: Key) -> tuple[Tensor, int]:
        i, flip = unpack(key)
        with Image.open(self.files[i]) as im:
            arr = resize_center_crop(im.convert("RGB"), self.image_size)
        u8 = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)  # (3, H, W)
        return to_model_range(u8, flip), self.labels[i]


class ImageFolderDataModule(_BaseDataModule):
    """A folder of png/jpg/jpeg images (searched recursively, extensions in any case), as RGB.

    Each image is converted to RGB, then resized and centre-cropped to ``image_size`` as the
    paper's improved-diffusion code does. With ``class_cond`` the label of an image is the
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
            **kwargs: Loader settings: batch_size (per device), num_workers, pin_memory, persistent_workers.
        """
        super().__init__(**kwargs)
        check_args("data.", ImageFolderDataModule.__init__, {
            "image_size": image_size, "class_cond": class_cond, "val_size": val_size, "test_size": test_size,
            "random_flip": random_flip, "split_seed": split_seed})
        self.root, self.test_root = root, test_root
        self.class_cond, self.random_flip, self.split_seed = class_cond, random_flip, split_seed
        self.val_size = val_size
        self.test_size = 0 if test_root else test_size
        self.image_size, self.channels = image_size, 3

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
                "test_size": self.test_size}

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
        return _ImageFiles(files, labels, self.image_size)

    def _load_splits(self) -> tuple[Dataset, Dataset, Optional[Dataset]]:
        for setting, files, _ in self.sources.values():
            _check_readable(files, setting)
        test, val, train = _split(len(self.sources["root"][1]), [self.test_size, self.val_size], self.split_seed)
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
