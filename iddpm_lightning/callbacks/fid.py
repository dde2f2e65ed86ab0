"""FID of the model's samples against the data, every N validation epochs, logged as ``val/fid``.

(Over 300 lines because the reference statistics must be right under DDP and on disk: the
pass shared over the ranks, the one-collective failure agreement and the atomic cache are
what the length is; the metric itself is torchmetrics'.)

The Fréchet distance and the Inception network are torchmetrics' ``FrechetInceptionDistance``
(on torch-fidelity's InceptionV3, read from a local weights file); this callback only feeds it:
the reference images once (then cached on disk), and fresh samples from the eval (EMA) weights
each time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics.image.fid import FrechetInceptionDistance

from ..checkpointing import replace_durably
from ..data import Reference
from ..errors import ConfigError
from ..rng import seeded_generator
from ..settings import (AtLeastTwoInt, ClosedUnitInterval, NonNegativeInt, PositiveInt, Sampler, SampleSteps,
                        check_args)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
_SAMPLE_STREAM = 7  # the last key of the sample generator, apart from the other seeded streams


def to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] ``[N, C, H, W]`` -> uint8 [0, 255] (rounded, the inverse of ``u / 127.5 - 1``)
    with 3 channels (greyscale repeated), as the metric's feature extractor expects."""
    u8 = ((x.float() + 1) * 127.5).round().clamp_(0, 255).to(torch.uint8)
    return u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8


class FID(Callback):
    """Logs ``val/fid``, the FID of ``num_samples`` samples against the reference split, at the end
    of every ``every_n_val_epochs``-th validation run (skipped in the sanity check and under
    ``fast_dev_run``; ``validate`` computes it every time).

    Samples come from ``pl_module.sample`` (the eval, i.e. EMA, weights) with a respaced chain of
    ``sample_steps`` steps and FIXED noise (the same seed every time), so that changes of the FID
    follow the model and not the noise. Each sample is rounded to uint8 and greyscale is repeated to
    3 channels. The paper reports FID on 50,000 samples against the training set; the default of
    10,000 is cheaper and biased upwards (FID falls as the sample count grows), so compare numbers
    only at equal ``num_samples``, and use 50000 to compare with the paper.

    The reference statistics (the metric's ``real_features_*`` sums) are loaded or computed in
    ``setup`` (``fit`` and ``validate``), before the first training step, so that a missing or
    unreadable reference split, an unwritable ``cache_dir`` or a slow first pass shows at the start
    of a run and not at its first FID validation. They come from the data module's
    ``reference(split)`` (images never flipped: random flips are the training loader's) and are
    saved to ``{cache_dir}/fid_ref_{DataModule}_{split}_{hash}.pt`` (plain tensors and the key as a
    JSON string, written atomically and fsynced, read back with ``weights_only=True``); the hash
    covers the reference's key (the data module class, its data settings, the split and its size,
    the image shape, the file list of a dataset of files) and the feature extractor, so later runs on the
    same data load the file instead (rank 0 reads it; no image is read). The metric keeps them across
    ``reset()`` (``reset_real_features=False``).

    Under DDP the reference pass is shared: rank r extracts the features of the images r, r + world,
    r + 2·world, ... of the split, the three sums are added over the ranks in one collective, and
    only rank 0 keeps the result (the other ranks keep zeros), so that the sums torchmetrics adds
    across ranks in ``compute()`` are the reference (the same as one process computes, up to float64
    rounding) and all ranks' samples. Rank r also generates its share of the samples (``num_samples``
    in all, split as evenly as possible) with its own fixed-seed generator. Every rank logs the same
    synced value.

    Args:
        num_samples: Samples per evaluation, over all devices (the paper uses 50000); at least 2.
        every_n_val_epochs: Compute FID at every n-th validation run of ``fit``.
        sample_steps: Respaced sampling steps (e.g. 100, "10,15,25", "ddim50"); null: all T.
        sampler: ``ddpm`` (ancestral) or ``ddim``.
        eta: DDIM's η in [0, 1] (``ddim`` only; 0 is deterministic).
        batch_size: Images per sampling and feature-extraction batch, per device.
        reference_split: ``train`` (the paper's protocol) or ``val``: the data module's split
            whose statistics the samples are compared with.
        inception_weights: Local path of torch-fidelity's Inception weights
            (``weights-inception-2015-12-05-6726825d.pth``, from ``INCEPTION_URL``); required
            unless ``feature_extractor`` is given. Nothing is downloaded.
        feature_extractor: Replaces Inception (tests, other feature spaces): an ``nn.Module`` with
            an int attribute ``num_features`` that maps uint8 ``[N, 3, H, W]`` images to
            ``[N, num_features]`` features. Its cache key is its class and ``num_features``.
        cache_dir: Folder of the cached reference statistics, which must be writable; null:
            ``fid_stats/`` in the data module's ``root`` if it has one, else in the run directory
            (when that folder is not writable the statistics are computed every run, with a warning).
        seed: Seed of the fixed sampling noise (a non-negative integer).
    """

    def __init__(
        self,
        num_samples: AtLeastTwoInt = 10000,
        every_n_val_epochs: PositiveInt = 1,
        sample_steps: SampleSteps = 100,
        sampler: Sampler = "ddpm",
        eta: ClosedUnitInterval = 0.0,
        batch_size: PositiveInt = 250,
        reference_split: Literal["train", "val"] = "train",
        inception_weights: str | None = None,
        feature_extractor: torch.nn.Module | None = None,
        cache_dir: str | None = None,
        seed: NonNegativeInt = 0,
    ):
        check_args("FID ", FID.__init__, locals())
        self.num_samples, self.every_n_val_epochs = num_samples, every_n_val_epochs
        self.sample_steps, self.sampler, self.eta = sample_steps, sampler, eta
        self.batch_size, self.reference_split = batch_size, reference_split
        self.inception_weights, self.cache_dir, self.seed = inception_weights, cache_dir, seed

        if feature_extractor is not None:
            num_features = getattr(feature_extractor, "num_features", None)
            if not isinstance(num_features, int) or num_features < 1:
                raise ConfigError(
                    f"FID feature_extractor {type(feature_extractor).__name__} needs a positive int attribute "
                    f"num_features (the length of its feature vectors), got {num_features!r}"
                )
            feature_extractor.eval().requires_grad_(False)
            self.extractor_id = f"{type(feature_extractor).__module__}.{type(feature_extractor).__qualname__}" \
                                f":{num_features}"
            self.metric = FrechetInceptionDistance(feature=feature_extractor, reset_real_features=False)
        else:
            self.metric = self._inception_metric(inception_weights)
            self.extractor_id = f"inception-v3-compat:2048:{Path(inception_weights).name}"
        self._val_epochs = 0
        self._reference_of = None  # the data module whose reference statistics the metric holds
        self._writable = False  # whether the cache folder took a test file (rank 0)

    @staticmethod
    def _inception_metric(path: str | None) -> FrechetInceptionDistance:
        """torchmetrics' FID on torch-fidelity's Inception, read from ``path`` (which torch-fidelity
        ``torch.load``s; only a None path would make it download)."""
        if path is None or not Path(path).expanduser().is_file():
            where = "inception_weights is not set" if path is None else \
                f"it is not at inception_weights={path!r} ({Path(path).expanduser().resolve()})"
            raise ConfigError(
                f"FID needs torch-fidelity's Inception weights file {INCEPTION_FILE}, but {where}; download "
                f"it from {INCEPTION_URL} and set the FID callback's inception_weights to its path"
            )
        try:
            # antialias=False: torch-fidelity's TF1-compatible resize to 299, as in the reference FID code.
            return FrechetInceptionDistance(feature=2048, reset_real_features=False, antialias=False,
                                            feature_extractor_weights_path=str(Path(path).expanduser()))
        except Exception as err:  # a truncated or foreign file
            raise ConfigError(
                f"FID inception_weights={path!r} cannot be loaded as {INCEPTION_FILE} ({err!r}); "
                f"download it again from {INCEPTION_URL}"
            ) from err

    # ----------------------------------------------------------------- state

    @property
    def state_key(self) -> str:
        return self._generate_state_key(reference_split=self.reference_split, sample_steps=self.sample_steps,
                                        sampler=self.sampler)

    def state_dict(self) -> dict[str, Any]:
        return {"val_epochs": self._val_epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._val_epochs = int(state_dict.get("val_epochs", 0))

    # ----------------------------------------------------------------- hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the settings against the model and the data, and load or compute the reference
        statistics now, before the first training step (Lightning has set up the data module)."""
        if stage not in (TrainerFn.FITTING, TrainerFn.VALIDATING):
            return
        if self.sample_steps is not None and hasattr(pl_module, "respaced"):
            pl_module.respaced(self.sample_steps)  # a respacing T can't meet fails now, not after training
        dm = trainer.datamodule
        if not callable(getattr(dm, "reference", None)):
            raise ConfigError(
                f"FID reference_split={self.reference_split!r} needs a data module that gives its reference images "
                f"(reference(split)), but {'the trainer has no data module' if dm is None else type(dm).__name__ + ' has none'}; "
                f"pass one of iddpm_lightning.data's data modules as the data (datamodule=...)"
            )
        if self._reference_of is not None and self._reference_of is not dm:
            self._drop_reference()  # other data than last time: recompute (or load) its statistics
        if self._reference_of is None:
            device = trainer.strategy.root_device  # where the module will be; it may not be there yet
            self.metric.to(device)
            with torch.inference_mode(False), torch.no_grad():
                self._load_or_compute_reference(trainer, device)
            self._reference_of = dm

    def _drop_reference(self) -> None:
        self.metric.reset_real_features = True
        self.metric.reset()
        self.metric.reset_real_features = False
        self._reference_of = None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        if trainer.state.fn == TrainerFn.FITTING:
            self._val_epochs += 1
            if self._val_epochs % self.every_n_val_epochs:
                return
        # Validation runs under inference mode; the metric's states must stay ordinary tensors.
        with torch.inference_mode(False), torch.no_grad():
            value = self.compute_fid(trainer, pl_module)
        # The value is already synced (equal on every rank); sync_dist only silences Lightning's warning.
        pl_module.log("val/fid", value, prog_bar=True, sync_dist=True)

    # -------------------------------------------------------------- the work

    def compute_fid(self, trainer: Trainer, pl_module: LightningModule) -> torch.Tensor:
        """FID of this rank's share of the samples (all ranks' after the sync) against the reference."""
        self.metric.to(pl_module.device)
        if self._reference_of is not trainer.datamodule:  # setup loads or computes it
            raise RuntimeError("FID.compute_fid needs the reference statistics that FID.setup loads")
        rank, world = trainer.global_rank, trainer.world_size
        n_local = len(range(rank, self.num_samples, world))
        generator = seeded_generator(pl_module.device, self.seed, rank, _SAMPLE_STREAM)
        for start in range(0, n_local, self.batch_size):
            n = min(self.batch_size, n_local - start)
            x = pl_module.sample(n, self.sample_steps, self.sampler, eta=self.eta, generator=generator)
            self.metric.update(to_uint8_rgb(x), real=False)
        value = self.metric.compute()  # sums the states over ranks
        self.metric.reset()  # drops the samples' features, keeps the reference (reset_real_features=False)
        return value

    def _reference(self, trainer: Trainer) -> Reference:
        return trainer.datamodule.reference(self.reference_split)

    def reference_cache_file(self, trainer: Trainer) -> Path:
        """Where the reference statistics of this data, split and feature extractor are cached."""
        return self._cache_file(trainer, self._reference(trainer))

    def _cache_key(self, reference: Reference) -> str:
        """What the statistics depend on, as the JSON the cache file holds: the data's key and the extractor."""
        return json.dumps({**reference.key, "extractor": self.extractor_id}, sort_keys=True)

    def _cache_file(self, trainer: Trainer, reference: Reference) -> Path:
        digest = hashlib.sha256(self._cache_key(reference).encode()).hexdigest()[:12]
        if self.cache_dir is not None:
            folder = Path(self.cache_dir).expanduser()
        else:
            folder = Path(reference.root or trainer.default_root_dir).expanduser() / "fid_stats"
        return folder / f"fid_ref_{type(trainer.datamodule).__name__}_{self.reference_split}_{digest}.pt"

    # -------------------------------------------------------- the reference

    def _load_or_compute_reference(self, trainer: Trainer, device: torch.device) -> None:
        """Fill the metric's real_features_* on rank 0 (zeros elsewhere) from the cache, or from one
        pass over the reference split shared by all ranks; every failure is a ConfigError raised on
        every rank at once (a rank that raised alone would leave the others waiting in a collective)."""
        where = f"{type(trainer.datamodule).__name__}'s {self.reference_split} split"
        error = None
        try:
            reference = self._reference(trainer)
            dataset, n = reference.dataset, len(reference.dataset)
            if n == 0:
                error = (f"FID reference_split={self.reference_split!r} is empty ({where} has no images); point the "
                         f"data settings (data.root, data.val_size) at data with images, or set reference_split to "
                         f"the other split")
            else:
                path = self._cache_file(trainer, reference)
                key = self._cache_key(reference)
        except Exception as err:
            error = self._unreadable(where, err)
        self._agree(trainer, error)

        # Rank 0 decides: load the cache, or compute (and can the result be written?).
        status = ("compute", None)
        if trainer.is_global_zero:
            try:
                status = ("loaded", None) if self._load_cache(path, key, device) else ("compute", None)
                if status[0] == "compute":
                    self._writable = self._check_writable(path.parent)
            except ConfigError as err:
                status = ("error", str(err))
        status = trainer.strategy.broadcast(status, src=0)
        if status[0] == "error":
            raise ConfigError(status[1])
        if status[0] == "loaded":
            return  # rank 0 holds the statistics, the other ranks zeros; no image was read

        rank, world = trainer.global_rank, trainer.world_size
        rank_zero_info(f"FID: computing reference statistics of {n} {self.reference_split} images over {world} "
                       f"process(es) (once; cached in {path})")
        error = None
        try:
            shard = dataset if world == 1 else Subset(dataset, range(rank, n, world))
            self._update_real(shard, device, getattr(trainer.datamodule, "num_workers", 0))
        except Exception as err:
            error = self._unreadable(where, err)
        if world > 1:
            # ONE collective: this rank's failure flag and sums, added over the ranks.
            flags = torch.zeros(world, dtype=torch.float64, device=device)
            flags[rank] = error is not None
            packed = torch.cat([flags, *(getattr(self.metric, k).double().flatten() for k in _REAL_STATES)])
            packed = trainer.strategy.reduce(packed, reduce_op="sum")
            self._raise_first(trainer, packed[:world], error)
            offset = world
            for k in _REAL_STATES:
                state = getattr(self.metric, k)
                total = packed[offset : offset + state.numel()].view_as(state)
                offset += state.numel()
                # torchmetrics adds the states over the ranks again in compute(): rank 0 alone keeps them.
                setattr(self.metric, k, total.to(state.dtype) if trainer.is_global_zero else torch.zeros_like(state))
        elif error is not None:
            self._drop_reference()
            raise ConfigError(error)
        if trainer.is_global_zero and self._writable:
            self._write_cache(path, key)

    def _unreadable(self, where: str, err: BaseException) -> str:
        detail = " ".join(f"{type(err).__name__}: {err}".split())  # one line, whatever the error's text
        return (f"FID reference_split={self.reference_split!r} cannot be read from {where} ({detail}); check the "
                f"data settings (data.root and the files under it), or set reference_split to a readable split")

    def _agree(self, trainer: Trainer, error: str | None) -> None:
        """Raise ``error`` (of this or any other rank) on every rank, or return on every rank."""
        if trainer.world_size == 1:
            if error is not None:
                raise ConfigError(error)
            return
        flags = torch.zeros(trainer.world_size, dtype=torch.float64, device=trainer.strategy.root_device)
        flags[trainer.global_rank] = error is not None
        self._raise_first(trainer, trainer.strategy.reduce(flags, reduce_op="sum"), error)

    def _raise_first(self, trainer: Trainer, flags: torch.Tensor, error: str | None) -> None:
        """If any rank failed (all-reduced ``flags``), raise the first failed rank's message on all."""
        failed = flags.nonzero().flatten().tolist()
        if failed:
            self._drop_reference()
            raise ConfigError(trainer.strategy.broadcast(error, src=failed[0]))

    def _load_cache(self, path: Path, key: str, device: torch.device) -> bool:
        """Load the cached statistics into the metric if ``path`` holds them for ``key``."""
        if not path.is_file():
            return False
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") != key:
                raise ValueError("the file was written for other data or another feature extractor")
            for name in _REAL_STATES:
                state = getattr(self.metric, name)
                if saved[name].shape != state.shape:
                    raise ValueError(f"{name} has shape {tuple(saved[name].shape)}, not {tuple(state.shape)}")
            for name in _REAL_STATES:
                state = getattr(self.metric, name)
                setattr(self.metric, name, saved[name].to(device=device, dtype=state.dtype))
        except Exception as err:
            rank_zero_warn(f"FID: ignoring the reference statistics cache {path} ({err}); recomputing it")
            return False
        rank_zero_info(f"FID: reference statistics loaded from {path}")
        return True

    def _check_writable(self, folder: Path) -> bool:
        """Whether the cache can be written to ``folder``, tried before the pass: an explicit cache_dir
        that is not writable is an error, the default folder (next to the data) only a warning."""
        probe = folder / f".fid_write_test_{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"ok")
            probe.unlink()
            return True
        except OSError as err:
            if self.cache_dir is not None:
                raise ConfigError(
                    f"FID cache_dir={self.cache_dir!r} is not a writable folder ({err}); set the FID callback's "
                    f"cache_dir to a folder this run can write, or to null"
                ) from None
            rank_zero_warn(f"FID: cannot write the reference statistics cache in {folder} ({err}); they are "
                           "computed now and not reused: set the FID callback's cache_dir to a writable folder")
            return False

    def _write_cache(self, path: Path, key: str) -> None:
        """Write the statistics atomically: a temp file, fsynced, renamed, and the folder fsynced."""
        states = {name: getattr(self.metric, name).detach().cpu() for name in _REAL_STATES}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            torch.save({**states, "key": key}, tmp)
            replace_durably(tmp, path)  # an interrupted run leaves no half-written cache
        except Exception as err:  # a full disk is a RuntimeError from torch.save: warn, as on rank 0 alone
            tmp.unlink(missing_ok=True)
            rank_zero_warn(f"FID: could not write the reference statistics cache {path} ({err}); "
                           "set the FID callback's cache_dir to a writable folder to reuse them")

    def _update_real(self, dataset: Dataset, device: torch.device, num_workers: int) -> None:
        """Feed every image of ``dataset`` to the metric as real (datasets never flip: an int index
        is the stored image)."""
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=num_workers)
        for x, _ in loader:
            self.metric.update(to_uint8_rgb(x.to(device)), real=True)
