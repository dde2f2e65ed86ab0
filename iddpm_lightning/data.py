"""LightningDataModules: scikit-learn digits (embedded), CIFAR-10 and an image folder.

Every module yields batches ``(x, y)``: ``x`` is float32 ``[N, C, H, W]`` in [-1, 1]
(an 8-bit value ``u`` becomes ``u / 127.5 - 1``) and ``y`` holds int64 class labels
(all 0 when the data has none). The training loader shuffles and drops the last partial
batch; validation and test loaders do neither. ``image_size``, ``channels`` and
``num_classes`` (0 when unlabeled) are set in ``__init__`` so the CLI can link them
into the model before ``setup`` runs. Cheap checks (paths, empty folders) run in
``__init__``; reading and validating the data runs in ``setup``.
"""

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import download_and_extract_archive

from iddpm_lightning.errors import ConfigError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # matched case-insensitively


def to_model_range(u8: Tensor, flip: bool = False) -> Tensor:
    """Map uint8 images ``[..., C, H, W]`` to float32 in [-1, 1], optionally mirrored left-right."""
    x = u8.float() / 127.5 - 1.0
    return x.flip(-1) if flip else x


def _coin() -> bool:
    """A fair coin from torch's RNG (seeded per DataLoader worker by torch)."""
    return bool(torch.rand(()) < 0.5)


def _split(n: int, held_out: Sequence[int], seed: int) -> list[Tensor]:
    """Cut a fixed-seed permutation of ``range(n)`` into the ``held_out`` sizes, then the rest (each sorted)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    bounds = np.cumsum([0, *held_out]).tolist()
    parts = [perm[a:b] for a, b in zip(bounds[:-1], bounds[1:])] + [perm[bounds[-1] :]]
    return [p.sort().values for p in parts]


class _U8Images(Dataset):
    """In-memory uint8 images ``[N, C, H, W]`` with int64 labels ``[N]``; optional random h-flip."""

    def __init__(self, images: Tensor, labels: Tensor, random_flip: bool = False) -> None:
        self.images, self.labels, self.random_flip = images, labels.long(), random_flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return to_model_range(self.images[i], self.random_flip and _coin()), self.labels[i]


class EpochShuffleSampler(Sampler[int]):
    """A random order of ``range(num_items)`` drawn from (seed, epoch) alone, so the order of
    any epoch can be drawn again after a resume (Lightning calls ``set_epoch``)."""

    def __init__(self, num_items: int, seed: int) -> None:
        self.num_items, self.seed, self.epoch = num_items, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self):
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        return iter(torch.randperm(self.num_items, generator=torch.Generator().manual_seed(seed)).tolist())


class ResumableDataLoader(DataLoader):
    """A DataLoader that, resumed in the middle of an epoch, skips the batches of that epoch
    the run already trained on (Lightning restores its progress but restarts the loader).
    The skipped batches are read once more, not trained on. ``skip_batches`` is an init
    argument so that it survives Lightning re-creating the loader with a distributed sampler."""

    def __init__(self, *args: Any, skip_batches: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_batches = skip_batches

    def __iter__(self):
        iterator = super().__iter__()
        for _ in range(self.skip_batches):
            next(iterator)
        self.skip_batches = 0
        return iterator


class _BaseDataModule(LightningDataModule):
    """Loader settings shared by all data modules; subclasses implement ``_load_splits``."""

    image_size: int
    channels: int
    num_classes: int

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        """
        Args:
            batch_size: Images per batch PER DEVICE; the global batch is batch_size x devices x num_nodes.
            num_workers: DataLoader worker processes per device (0 loads in the main process).
            pin_memory: Copy batches into page-locked memory (faster host-to-GPU transfer).
            persistent_workers: Keep workers alive between epochs; only effective when num_workers > 0.
        """
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be at least 1; set a positive per-device batch size.")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers} must be 0 or more; set it to 0 to load in the main process.")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    def _load_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        """Return the (train, val, test) datasets."""
        raise NotImplementedError

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

    def _loader(self, dataset: Optional[Dataset], train: bool, sampler: Optional[Sampler] = None, **kwargs) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return (ResumableDataLoader if train else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by epoch from the run's seed; resumed mid-epoch, it continues where the
        checkpoint stopped instead of replaying the epoch's first batches."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        batches = len(self.train_set) // self.batch_size
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready if self.trainer is not None else 0
        return self._loader(self.train_set, train=True, sampler=EpochShuffleSampler(len(self.train_set), seed),
                            skip_batches=done if 0 < done < batches else 0)

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


def _check_held_out(name: str, size: int, minimum: int) -> None:
    if size < minimum:
        raise ConfigError(f"data.{name}={size} must be at least {minimum}; set data.{name} to {minimum} or more.")


# ----------------------------------------------------------------------------- digits

DIGITS_COUNT = 1797  # images in sklearn.datasets.load_digits()


class DigitsDataModule(_BaseDataModule):
    """scikit-learn's bundled digits: 1,797 greyscale 8x8 images of 0-9 with values 0..16.

    A value ``v`` becomes the 8-bit grey ``round(v * 255 / 16)`` and then [-1, 1]. A
    fixed-seed permutation holds out ``test_size`` test and ``val_size`` validation
    images; the rest train. No download, no flips, everything in memory.
    """

    def __init__(self, val_size: int = 150, test_size: int = 150, split_seed: int = 0, **kwargs: Any) -> None:
        """
        Args:
            val_size: Validation images held out of the 1,797.
            test_size: Test images held out of the 1,797 (disjoint from validation).
            split_seed: Seed of the fixed train/val/test permutation.
            **kwargs: Loader settings: batch_size (per device), num_workers, pin_memory, persistent_workers.
        """
        super().__init__(**kwargs)
        _check_held_out("val_size", val_size, 1)
        _check_held_out("test_size", test_size, 1)
        if val_size + test_size >= DIGITS_COUNT:
            raise ConfigError(
                f"data.val_size + data.test_size = {val_size + test_size} leaves no training images of the "
                f"{DIGITS_COUNT} digits; lower data.val_size or data.test_size."
            )
        self.val_size, self.test_size, self.split_seed = val_size, test_size, split_seed
        self.image_size, self.channels, self.num_classes = 8, 1, 10

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

    Train is the official 50,000-image training set (random horizontal flips optional, off
    as in the paper's improved-diffusion code); validation is a fixed-seed subset of
    ``val_size`` images of the official test set; test is the full official 10,000-image
    test set. 32x32 RGB, 10 classes; held in memory as uint8.
    """

    def __init__(
        self,
        root: str,
        download: bool = False,
        random_flip: bool = False,
        val_size: int = 1000,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            root: Folder that contains ``cifar-10-batches-py``.
            download: Download the dataset into root if it is missing (needs network access).
            random_flip: Mirror training images left-right with probability 1/2.
            val_size: Validation images drawn (fixed seed) from the official test set.
            split_seed: Seed of the validation subset.
            **kwargs: Loader settings: batch_size (per device), num_workers, pin_memory, persistent_workers.
        """
        super().__init__(**kwargs)
        _check_held_out("val_size", val_size, 1)
        self.root, self.download, self.random_flip = root, download, random_flip
        self.val_size, self.split_seed = val_size, split_seed
        self.image_size, self.channels, self.num_classes = 32, 3, 10
        if not download:
            self._require_files()

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
        if self.val_size > len(test_x):
            raise ConfigError(
                f"data.val_size={self.val_size} exceeds the {len(test_x)} CIFAR-10 test images; "
                f"set data.val_size to at most {len(test_x)}."
            )
        val, _ = _split(len(test_x), [self.val_size], self.split_seed)
        return (
            _U8Images(train_x, train_y, self.random_flip),
            _U8Images(test_x[val], test_y[val]),
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
    """Image files, each converted to RGB, resized and centre-cropped; optional random h-flip."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], image_size: int, random_flip: bool) -> None:
        self.files, self.labels = list(files), list(labels)
        self.image_size, self.random_flip = image_size, random_flip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        with Image.open(self.files[i]) as im:
            arr = resize_center_crop(im.convert("RGB"), self.image_size)
        u8 = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
        return to_model_range(u8, self.random_flip and _coin()), self.labels[i]


class ImageFolderDataModule(_BaseDataModule):
    """A folder of png/jpg/jpeg images (searched recursively, extensions in any case), as RGB.

    Each image is converted to RGB, then resized and centre-cropped to ``image_size`` as the
    paper's improved-diffusion code does. With ``class_cond`` the label of an image is the
    index of its first-level sub-folder under the root (names sorted). Validation and test
    come from ``val_root``/``test_root`` when given; otherwise fixed-seed subsets of
    ``val_size``/``test_size`` images are held out of ``root``; with ``test_size=0`` and no
    ``test_root`` the test set IS the validation set.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 64,
        class_cond: bool = False,
        val_root: Optional[str] = None,
        test_root: Optional[str] = None,
        val_size: int = 1000,
        test_size: int = 0,
        random_flip: bool = False,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            root: Folder of training images (class sub-folders when class_cond).
            image_size: Side of the square images the model sees, in pixels.
            class_cond: Label images by their first-level sub-folder of root (sorted names -> 0, 1, ...).
            val_root: Folder of validation images; if unset, val_size images are held out of root.
            test_root: Folder of test images; if unset, test_size images are held out of root.
            val_size: Validation images held out of root (used only without val_root).
            test_size: Test images held out of root (used only without test_root); 0 makes test reuse the validation set.
            random_flip: Mirror training images left-right with probability 1/2.
            split_seed: Seed of the held-out validation/test subsets.
            **kwargs: Loader settings: batch_size (per device), num_workers, pin_memory, persistent_workers.
        """
        super().__init__(**kwargs)
        if image_size < 1:
            raise ConfigError(f"data.image_size={image_size} must be at least 1; set a positive size in pixels.")
        _check_held_out("val_size", val_size, 1 if val_root is None else 0)
        _check_held_out("test_size", test_size, 0)
        self.class_cond, self.random_flip, self.split_seed = class_cond, random_flip, split_seed
        self.val_size = 0 if val_root else val_size
        self.test_size = 0 if test_root else test_size
        self.image_size, self.channels = image_size, 3

        train_files = _find_images(root, "data.root")
        self.classes = sorted({_class_of(f, root) for f in train_files} - {None}) if class_cond else []
        self.num_classes = len(self.classes)
        # (setting, files, labels) per source folder; val/test entries only when their root is given
        self.sources = {"root": ("data.root", train_files, self._labels(train_files, root, "data.root"))}
        for name, folder in (("val_root", val_root), ("test_root", test_root)):
            if folder is not None:
                files = _find_images(folder, f"data.{name}")
                self.sources[name] = (f"data.{name}", files, self._labels(files, folder, f"data.{name}"))
        if self.val_size + self.test_size >= len(train_files):
            raise ConfigError(
                f"holding out data.val_size + data.test_size = {self.val_size + self.test_size} images leaves none "
                f"of the {len(train_files)} under data.root for training; lower data.val_size/data.test_size "
                "or give data.val_root/data.test_root."
            )

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

    def _dataset(self, name: str, idx: Optional[Tensor] = None, flip: bool = False) -> _ImageFiles:
        _, files, labels = self.sources[name]
        if idx is not None:
            files, labels = [files[i] for i in idx.tolist()], [labels[i] for i in idx.tolist()]
        return _ImageFiles(files, labels, self.image_size, flip)

    def _load_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        for setting, files, _ in self.sources.values():
            _check_readable(files, setting)
        test, val, train = _split(len(self.sources["root"][1]), [self.test_size, self.val_size], self.split_seed)
        train_set = self._dataset("root", train, self.random_flip)
        val_set = self._dataset("val_root") if "val_root" in self.sources else self._dataset("root", val)
        if "test_root" in self.sources:
            test_set = self._dataset("test_root")
        else:
            test_set = self._dataset("root", test) if self.test_size > 0 else val_set
        return train_set, val_set, test_set


def _class_of(file: Path, root: str) -> Optional[str]:
    """The first-level sub-folder of ``root`` that holds ``file`` (None for files directly in root)."""
    parts = file.relative_to(Path(root).expanduser()).parts
    return parts[0] if len(parts) > 1 else None
