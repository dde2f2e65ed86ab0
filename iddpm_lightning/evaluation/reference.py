"""The reference statistics samples are scored against: one streaming pass of a feature extractor
over a split, shared by the processes of a run, and its cache on disk.

- μ and Σ of the WHOLE split are accumulated batch by batch in float64 (``StreamingMoments``):
  no feature matrix is kept, so the pass's memory does not grow with the split (ImageNet's
  1.28M training images would hold 10.5 GB of Inception features, and two float64 copies more).
- KID and precision/recall need features themselves: those of a fixed subset of
  ``subset_size`` images are kept (``subset_indices``: the first of a seed-0 permutation), as
  guided-diffusion's evaluator keeps reference batches of 10k-50k images. The default 50,000
  is the whole CIFAR-10 training split.
- Under DDP rank r reads the images r, r + world, ...; one all_gather collects every rank's
  moments and kept rows, rank 0 merges them. A failure on any rank is raised on every rank
  with the same sentence (``Ranks``), so that none is left waiting in a collective.
- The cache: ``{folder}/fid_ref_{owner}_{split}_{hash}.pt``, the hash of a JSON key naming the
  data, the extractor, the kept subset and the cache layout; written atomically and durably.

Used by the ``FID`` callback, ``evaluate`` and the experiments alike.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..checkpointing import IgnoreStopSignals
from ..data import to_uint8
from ..errors import ConfigError
from .metrics import ReferenceStats

CACHE_VERSION = 3  # 3: μ, Σ of the whole split, features of a subset (2 kept every image's features)
REFERENCE_SUBSET = 50_000  # reference images whose features are kept for KID and precision/recall


class StreamingMoments:
    """Mean [D] and covariance [D, D] of feature rows seen batch by batch, in float64, without
    keeping the rows: each batch's own mean and centred cross-products are merged into the
    running ones (Chan, Golub & LeVeque's pairwise update),

        n = n_a + n_b,  δ = μ_b − μ_a,  μ = μ_a + δ n_b / n,  M = M_a + M_b + δ δᵀ n_a n_b / n,

    and Σ = M / (n − 1), the unbiased covariance ``mean_cov`` computes from all rows at once."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, rows: torch.Tensor) -> None:
        """Add rows [b, D]."""
        if len(rows):
            x = rows.double()
            mean = x.mean(dim=0)  # (D,)
            centred = x - mean  # (b, D)
            self._merge(len(x), mean, centred.T @ centred)

    def merge(self, other: "StreamingMoments") -> None:
        if other.n:
            self._merge(other.n, other.mean.to(self.mean.device), other.m2.to(self.m2.device))

    def _merge(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        n = self.n + n_b
        delta = mean_b - self.mean  # (D,)
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + torch.outer(delta, delta) * (self.n * n_b / n)
        self.n = n

    def covariance(self) -> torch.Tensor:
        return self.m2 / (self.n - 1)

    def packed(self) -> torch.Tensor:
        """[n, μ, M] flattened into one float64 row [1 + D + D²], to gather across ranks."""
        return torch.cat([self.mean.new_tensor([self.n]), self.mean, self.m2.flatten()])

    @classmethod
    def unpacked(cls, row: torch.Tensor, dim: int) -> "StreamingMoments":
        moments = cls(dim, row.device)
        moments.n, moments.mean, moments.m2 = int(row[0]), row[1 : 1 + dim].clone(), row[1 + dim :].view(dim, dim).clone()
        return moments


def subset_indices(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """The indices [min(n, size)] of the images whose features are kept: the first ``size`` of a
    fixed-seed permutation of range(n), sorted (all of them when ``size >= n``)."""
    if size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


@dataclass
class Ranks:
    """The processes that share a pass: this one's rank, how many, and the strategy's collectives
    (``all_gather``: tensor -> [world, ...]; ``broadcast``: (object, src) -> object). One process
    needs none."""

    rank: int = 0
    world: int = 1
    all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    broadcast: Callable[[Any, int], Any] | None = None

    def agree(self, error: str | None, device: torch.device | str = "cpu") -> None:
        """Raise ``error`` (this rank's or the first failed rank's) as a ConfigError on every rank, or
        return on every rank: one small all_gather."""
        if self.world == 1:
            if error is not None:
                raise ConfigError(error)
            return
        flags = self.all_gather(torch.tensor([float(error is not None)], device=device)).flatten()  # (world,)
        self.raise_first(flags, error)

    def raise_first(self, flags: torch.Tensor, error: str | None) -> None:
        """If any rank failed (``flags`` [world]), raise the first failed rank's message on all."""
        failed = flags.nonzero().flatten().tolist()
        if failed:
            raise ConfigError(self.broadcast(error, failed[0]))

    def gather_rows(self, local: torch.Tensor, n: int, error: str | None = None) -> torch.Tensor:
        """All ranks' rows [n, W] in the order of their items, rank r holding the items r,
        r + world, ... of ``n``: ONE all_gather of the rows padded to equal length, with a header
        row that carries this rank's failure flag; a failure on any rank is raised on all."""
        if self.world == 1:
            if error is not None:
                raise ConfigError(error)
            return local
        length = len(range(0, n, self.world))  # rank 0 has the most rows
        packed = torch.zeros(length + 1, local.shape[1], device=local.device, dtype=local.dtype)
        packed[0, 0] = error is not None
        packed[1 : 1 + len(local)] = local
        gathered = self.all_gather(packed)  # (world, length + 1, W)
        self.raise_first(gathered[:, 0, 0], error)
        out = torch.empty(n, local.shape[1], device=local.device, dtype=local.dtype)
        for r in range(self.world):
            out[r :: self.world] = gathered[r, 1 : 1 + len(range(r, n, self.world))]
        return out


def one_line(err: BaseException) -> str:
    """``Type: message`` of an error on one line, whatever its text."""
    return " ".join(f"{type(err).__name__}: {err}".split())


def extract(extractor, images: torch.Tensor) -> torch.Tensor:
    """(features | logits) [N, D + K] float32 of uint8 images [N, C, H, W]."""
    features, logits = extractor(images)
    return features.float() if logits is None else torch.cat([features.float(), logits.float()], dim=1)


@torch.no_grad()
def compute_reference(dataset: Dataset, extractor, key: str, batch_size: int, device: torch.device | str,
                      subset_size: int = REFERENCE_SUBSET, num_workers: int = 0, ranks: Ranks = Ranks(),
                      unreadable: Callable[[BaseException], str] | None = None) -> ReferenceStats | None:
    """The statistics of ``dataset`` (items ``(x in [-1, 1] [C, H, W], label)``, never flipped) under
    ``extractor``: μ and Σ of every image, streamed, and the features of ``subset_indices`` kept.
    Rank r reads the items r, r + world, ...; rank 0 returns the merged statistics, the others
    None. An unreadable item on any rank is one ConfigError on every rank: ``unreadable(error)``'s
    sentence, which names the setting to fix."""
    n, D = len(dataset), extractor.num_features
    keep = torch.zeros(n, dtype=torch.bool)
    keep[subset_indices(n, subset_size)] = True
    mine = range(ranks.rank, n, ranks.world)
    moments, kept, error = StreamingMoments(D, device), [], None
    try:
        loader = DataLoader(dataset if ranks.world == 1 else Subset(dataset, mine), batch_size=batch_size,
                            num_workers=num_workers, worker_init_fn=IgnoreStopSignals())
        start = 0
        for x, _ in loader:
            features = extract(extractor, to_uint8(x.to(device)))[:, :D]  # (b, D)
            moments.update(features)
            index = torch.as_tensor(mine[start : start + len(x)])  # (b,) this batch's indices in the split
            chosen = keep[index]
            kept.append(torch.cat([index[chosen, None].to(features), features[chosen.to(features.device)]], dim=1))
            start += len(x)
    except Exception as err:
        error = unreadable(err) if unreadable else f"the reference images cannot be read ({one_line(err)})"
    rows = torch.cat(kept) if kept else torch.zeros(0, 1 + D, device=device)  # (kept here, index | features)
    if ranks.world == 1:
        if error is not None:
            raise ConfigError(error)
    else:
        rows, moments = _gather_pass(ranks, rows, moments, keep, error)
        if ranks.rank != 0:
            return None
    features = rows[rows[:, 0].argsort(), 1:]  # (kept, D) in index order
    return ReferenceStats(moments.mean.cpu(), moments.covariance().cpu(), moments.n, features.cpu(), key)


def _gather_pass(ranks: Ranks, rows: torch.Tensor, moments: StreamingMoments, keep: torch.Tensor,
                 error: str | None) -> tuple[torch.Tensor, StreamingMoments]:
    """Every rank's moments (with a failure flag in front) and kept rows (padded to the longest
    share, which each rank knows from ``keep``): one all_gather each; the moments merged in rank order."""
    D = moments.mean.shape[0]
    packed = torch.cat([moments.mean.new_tensor([float(error is not None)]), moments.packed()])
    gathered = ranks.all_gather(packed)  # (world, 2 + D + D²)
    ranks.raise_first(gathered[:, 0], error)
    merged = StreamingMoments(D, rows.device)
    for r in range(ranks.world):
        merged.merge(StreamingMoments.unpacked(gathered[r, 1:], D))
    counts = [int(keep[r :: ranks.world].sum()) for r in range(ranks.world)]
    padded = torch.zeros(max(counts), rows.shape[1], device=rows.device, dtype=rows.dtype)
    padded[: len(rows)] = rows
    everything = ranks.all_gather(padded)  # (world, max kept, 1 + D)
    return torch.cat([everything[r, : counts[r]] for r in range(ranks.world)]), merged


def reference_statistics(dataset: Dataset, extractor, key: str, path: Path, batch_size: int,
                         device: torch.device | str, subset_size: int = REFERENCE_SUBSET, num_workers: int = 0,
                         ranks: Ranks = Ranks(), unreadable: Callable[[BaseException], str] | None = None,
                         unwritable: Callable[[OSError], str] | None = None, log: Callable[[str], None] = print,
                         warn: Callable[[str], None] = lambda message: print(f"warning: {message}")
                         ) -> tuple[ReferenceStats | None, Path | None, bool]:
    """The reference statistics of ``dataset``: rank 0 looks the cache file ``path`` up BEFORE any image
    is read; if it holds ``key``'s statistics they are loaded, else every rank shares the pass
    (``compute_reference``) and rank 0 writes the file. Returns (the statistics on rank 0, None on
    the others; the cache file, or None if it could not be written; whether it was loaded). A cache
    folder that cannot be written is the ConfigError ``unwritable(error)`` on every rank (an explicit
    folder), or a warning (``unwritable`` None: the statistics are then computed but not kept)."""
    status, stats = ("compute", None), None
    if ranks.rank == 0:
        stats = load_cached(path, key, extractor.num_features, log, warn)
        if stats is not None:
            status = ("loaded", None)
        else:
            try:
                check_writable(path.parent)
            except OSError as err:
                if unwritable is not None:
                    status = ("error", unwritable(err))
                else:
                    warn(f"cannot write the reference statistics cache in {path.parent} ({err}); they are computed "
                         f"now and not kept: set a writable cache folder to reuse them")
                    path = None
    if ranks.world > 1:
        status = ranks.broadcast(status, 0)
    if status[0] == "error":
        raise ConfigError(status[1])
    if status[0] == "loaded":
        return stats, path, True
    log(f"computing reference statistics of {len(dataset)} images over {ranks.world} process(es) (once"
        f"{f'; cached in {path}' if path else ''})")
    stats = compute_reference(dataset, extractor, key, batch_size, device, subset_size, num_workers, ranks, unreadable)
    if ranks.rank == 0 and path is not None:
        try:
            stats.save(path)  # atomic: an interrupted run leaves no half-written cache
        except Exception as err:  # a full disk is a RuntimeError from torch.save
            warn(f"could not write the reference statistics cache {path} ({err}); they are not kept")
            path = None
    return stats, path, False


def load_cached(path: Path, key: str, num_features: int, log: Callable[[str], None] = print,
                warn: Callable[[str], None] = print) -> ReferenceStats | None:
    """The statistics in ``path`` if it holds ``key``'s (of ``num_features``); a stale or broken file is
    passed over with a note."""
    if not Path(path).is_file():
        return None
    try:
        stats = ReferenceStats.load(path, key)
        if stats.mu.shape != (num_features,):
            raise ValueError(f"mu has shape {tuple(stats.mu.shape)}, not ({num_features},)")
    except Exception as err:
        warn(f"ignoring the reference statistics cache {path} ({err}); recomputing it")
        return None
    log(f"reference statistics loaded from {path}")
    return stats


def reference_key(data_key: dict, extractor_name: str, kept: int) -> str:
    """The JSON key of reference statistics: the data's key, the extractor, how many images'
    features are kept, and the cache layout."""
    return json.dumps({**data_key, "extractor": extractor_name, "features_kept": kept,
                       "cache_version": CACHE_VERSION}, sort_keys=True)


def reference_file(folder: Path, owner: str, split: str, key: str) -> Path:
    """``{folder}/fid_ref_{owner}_{split}_{hash of key}.pt``."""
    return Path(folder) / f"fid_ref_{owner}_{split}_{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write and delete a test file in it (an OSError if it cannot)."""
    probe = Path(folder) / f".fid_write_test_{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(probe, "wb") as f:
        f.write(b"ok")
    probe.unlink()
