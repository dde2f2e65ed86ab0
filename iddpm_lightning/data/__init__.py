"""Data modules, one file each, over one public base (``base.py``: what a new dataset provides).

Every module yields batches ``(x, y)``: ``x`` float32 ``[N, C, H, W]`` in [-1, 1] (an 8-bit value
``u`` becomes ``u / 127.5 - 1``) and ``y`` int64 class labels (all 0 when the data has none). The
training loader's order and flips are drawn by ``EpochOrder`` from (seed, epoch) alone, and the
loader is torchdata's ``StatefulDataLoader``, whose position Lightning saves in every checkpoint:
a run resumed at any step, in any epoch and with any ``num_workers``, continues with exactly the
batches the uninterrupted run would have drawn (``order.py``).
"""

from .base import ImageDataModule, Reference, U8Images, to_model_range, to_uint8
from .cifar10 import CIFAR10DataModule
from .digits import DigitsDataModule
from .image_folder import ImageFolderDataModule, resize_center_crop
from .order import EpochOrder, ResumableLoader

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "EpochOrder", "ImageDataModule", "ImageFolderDataModule",
           "Reference", "ResumableLoader", "U8Images", "resize_center_crop", "to_model_range", "to_uint8"]
