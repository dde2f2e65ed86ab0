"""Peak memory of a reference pass over N images (``evaluate``'s, the FID callback's):

    python tests/scripts/reference_memory.py N SUBSET OUT.json

writes an npz of N random 8x8 RGB images, computes their reference statistics with 2048 features
per image (a fixed random projection, as wide as Inception's) keeping SUBSET images' features, and
writes the growth of the peak RSS during the pass (MiB) to OUT.json. tests/test_reference.py runs it
for a split and one 10x larger.
"""

import ctypes
import json
import resource
import sys
from pathlib import Path


def fixed_mmap_threshold(nbytes: int = 128 * 1024) -> None:
    """Every block of ``nbytes`` or more is mmapped and returned to the system when freed. By default
    glibc raises this threshold (up to 32 MiB) each time such a block is freed, after which the pass's
    freed temporaries (a 2048 x 2048 float64 product is 32 MiB) stay in the heap, fragmented: the peak
    RSS then varied by 60 MiB between two runs over the same images, more than the growth measured."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except OSError:  # not glibc: its allocator, as it is
        pass


fixed_mmap_threshold()  # before numpy and torch allocate anything

import numpy as np  # noqa: E402
import torch  # noqa: E402

from iddpm_lightning.evaluation.evaluate import ReferenceSource, reference_stats  # noqa: E402
from iddpm_lightning.evaluation.features import wrap  # noqa: E402


class Projection(torch.nn.Module):
    num_features = 2048

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(3 * 64, self.num_features, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return x.flatten(1).float() @ self.w


def main(n: int, subset: int, out: Path) -> None:
    torch.set_num_threads(1)
    folder = out.parent
    images = np.random.default_rng(0).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    np.savez(folder / "reference.npz", arr_0=images)
    source = ReferenceSource(str(folder / "reference.npz"), "train", str(folder / "cache"))
    del images
    extractor = wrap(Projection())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    stats, _, _ = reference_stats(source, extractor, 500, torch.device("cpu"), subset)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write_text(json.dumps({"n": n, "subset": subset, "growth_mib": peak - before, "num": stats.num,
                               "kept": len(stats.features)}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
