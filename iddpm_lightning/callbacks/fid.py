"""Sample quality during training: FID (or the digits metrics), KID, precision/recall and the
Inception Score (or class confidence) of the model's samples, every N validation epochs. The
features, reference statistics and metrics are ``evaluation/``'s, the code ``evaluate`` runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..data import Reference, to_uint8
from ..diffusion import Sampler
from ..errors import ConfigError
from ..evaluation.features import DigitFeatures, InceptionFeatures, default_cache_dir, digit_features, wrap
from ..evaluation.metrics import MIN_SAMPLES, ReferenceStats, metric_names, sample_quality
from ..evaluation.reference import (REFERENCE_SUBSET, Ranks, extract, one_line, reference_file, reference_key,
                                    reference_statistics)
from ..rng import seeded_generator
from ..settings import Features, MetricSampleCount, NonNegativeInt, PositiveInt, check_args

_SAMPLE_STREAM = 7  # the last key of the sample generator, apart from the other seeded streams


class FID(Callback):
    """Logs the sample-quality metrics of ``num_samples`` samples against the reference split at
    the end of every ``every_n_val_epochs``-th validation run (skipped in the sanity check and
    under ``fast_dev_run``; ``validate`` computes them every time):

    - ``features: inception``: ``val/fid``, ``val/kid``, ``val/precision``, ``val/recall``, ``val/is``;
    - ``features: digits`` (8x8 digits, offline): ``val/fd_digits``, ``val/kid_digits``,
      ``val/precision``, ``val/recall``, ``val/confidence``, ``val/class_entropy``. Digits metrics,
      not comparable with Inception FID (``evaluation/features.py``).

    Samples come from ``pl_module.sample`` (the eval, i.e. EMA, weights) with FIXED noise (the same
    seed every time), so that changes follow the model and not the noise; each is rounded to uint8.
    A class-conditional model draws sample i of the ``num_samples`` (over all ranks) with class
    i mod K, so every class is scored equally often. The paper reports FID on 50,000 samples
    against the training set; fewer bias it upwards, so compare numbers only at equal
    ``num_samples`` (``evaluate`` for the paper's protocol).

    The reference statistics are loaded or computed in ``setup`` (``fit`` and ``validate``), before
    the first training step, so that a missing reference split, an unwritable ``cache_dir`` or a
    slow first pass shows at the start of a run (``evaluation/reference.py``: the cache is looked up
    before any image is read; μ and Σ of the whole split are streamed; a fixed ``reference_subset``
    keeps its features for KID and precision/recall; the pass is shared by the ranks). They are
    cached as ``{cache_dir}/fid_ref_{DataModule}_{split}_{hash}.pt``, keyed by the data module and
    its data settings, the split and its size, the image shape, the file list of a dataset of
    files, the feature extractor and the kept subset, so later runs (and ``evaluate``) load them.
    Under DDP rank r draws its share of the samples with its own fixed-seed generator; one
    all_gather collects their features, rank 0 computes the metrics and broadcasts them, and every
    rank logs the same values.

    Args:
        num_samples: Samples per evaluation, over all devices (the paper uses 50000); at least 4.
        every_n_val_epochs: Compute the metrics at every n-th validation run of ``fit``.
        sampler: How the samples are drawn (``diffusion.samplers``).
        batch_size: Images per sampling and feature-extraction batch, per device.
        reference_split: ``train`` (the paper's protocol) or ``val``: the data module's split
            whose statistics the samples are compared with.
        features: ``inception`` (FID; needs ``inception_weights``) or ``digits`` (the digits
            classifier, trained on the data module's training split in about 4 s and cached in
            ``cache_dir``, else in ``~/.cache/iddpm_lightning``).
        inception_weights: Local path of torch-fidelity's Inception weights
            (``weights-inception-2015-12-05-6726825d.pth``, from ``INCEPTION_URL``); nothing is downloaded.
        feature_extractor: Replaces the features (tests, other feature spaces): an ``nn.Module``
            with an int attribute ``num_features`` that maps uint8 ``[N, 3, H, W]`` images to
            ``[N, num_features]`` features (logged as ``val/fid``). Its cache key is its class and ``num_features``.
        cache_dir: Folder of the cached reference statistics, which must be writable; null:
            ``fid_stats/`` in the data module's ``root`` if it has one, else in the run directory
            (when that folder is not writable the statistics are computed every run, with a warning).
        seed: Seed of the fixed sampling noise (a non-negative integer).
        reference_subset: Reference images whose features are kept for KID and precision/recall (a
            fixed subset; the Fréchet distance always uses μ and Σ of the whole split, streamed).
            50,000 is CIFAR-10's whole training split; on ImageNet a fixed 50k of its 1.28M, as
            guided-diffusion's reference batches.
    """

    def __init__(
        self,
        num_samples: MetricSampleCount = 10000,
        every_n_val_epochs: PositiveInt = 1,
        sampler: Sampler = Sampler(),
        batch_size: PositiveInt = 250,
        reference_split: Literal["train", "val"] = "train",
        features: Features = "inception",
        inception_weights: str | None = None,
        feature_extractor: torch.nn.Module | None = None,
        cache_dir: str | None = None,
        seed: NonNegativeInt = 0,
        reference_subset: MetricSampleCount = REFERENCE_SUBSET,
    ):
        check_args("FID ", FID.__init__, locals())
        self._given = feature_extractor is not None  # a given extractor is never replaced
        self.num_samples, self.every_n_val_epochs, self.sampler = num_samples, every_n_val_epochs, sampler
        self.batch_size, self.reference_split, self.features = batch_size, reference_split, features
        self.inception_weights, self.cache_dir, self.seed = inception_weights, cache_dir, seed
        self.reference_subset = reference_subset
        if feature_extractor is not None:
            self.extractor = wrap(feature_extractor, "FID feature_extractor")
        elif features == "inception":
            try:
                self.extractor = InceptionFeatures(inception_weights)
            except ConfigError as err:
                raise ConfigError(f"FID {err}") from None
        else:
            self.extractor = None  # the digits classifier is trained on the data module's training split in setup
        self.reference: ReferenceStats | None = None
        self._val_epochs = 0
        self._reference_of = None  # the data module whose reference the callback holds

    # ----------------------------------------------------------------- state

    @property
    def state_key(self) -> str:
        # The key of before the digits features and the Sampler settings existed, so older checkpoints resume.
        extra = {} if self.features == "inception" else {"features": self.features}
        return self._generate_state_key(reference_split=self.reference_split, sample_steps=self.sampler.steps,
                                        sampler=self.sampler.name, **extra)

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
        if hasattr(pl_module, "diffusion"):
            self.sampler.timesteps(pl_module.diffusion)  # bad steps fail now, not after training
        dm = trainer.datamodule
        if not callable(getattr(dm, "reference", None)):
            raise ConfigError(
                f"FID reference_split={self.reference_split!r} needs a data module that gives its reference images "
                f"(reference(split)), but {'the trainer has no data module' if dm is None else type(dm).__name__ + ' has none'}; "
                f"pass one of iddpm_lightning.data's data modules as the data (datamodule=...)"
            )
        if self._reference_of is not dm:  # other data than last time: recompute (or load)
            self.reference, self._reference_of = None, None
            device = trainer.strategy.root_device  # where the module will be; it may not be there yet
            with torch.inference_mode(False), torch.no_grad():
                if self.features == "digits" and not self._given:
                    self.extractor = self._shared_digit_features(trainer, dm)
                self.extractor.to(device)
                self._load_or_compute_reference(trainer, device)
            self._reference_of = dm

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        if trainer.state.fn == TrainerFn.FITTING:
            self._val_epochs += 1
            if self._val_epochs % self.every_n_val_epochs:
                return
        # Validation runs under inference mode; the samples and features stay ordinary tensors.
        with torch.inference_mode(False), torch.no_grad():
            values = self.compute_metrics(trainer, pl_module)
        for name, value in values.items():
            if value is not None and not name.endswith("_std"):
                # Equal on every rank already; sync_dist only silences Lightning's warning.
                pl_module.log(f"val/{name}", value, prog_bar=name == self.main_metric, sync_dist=True)

    @property
    def main_metric(self) -> str:
        return metric_names(self.extractor.prefix if self.extractor is not None else "fd_digits")[0]

    # -------------------------------------------------------------- the work

    def compute_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float | None]:
        """The metrics of all ranks' samples against the reference (equal on every rank)."""
        if self._reference_of is not trainer.datamodule:  # setup loads or computes it
            raise RuntimeError("FID.compute_metrics needs the reference statistics that FID.setup loads")
        self.extractor.to(pl_module.device)
        rank, world = trainer.global_rank, trainer.world_size
        mine = torch.arange(rank, self.num_samples, world, device=pl_module.device)  # this rank's sample indices
        generator = seeded_generator(pl_module.device, self.seed, rank, _SAMPLE_STREAM)
        rows = []
        for batch in mine.split(self.batch_size):
            # classes by the index over all ranks' samples: balanced over every class, whatever the batches
            x = pl_module.sample(self.sampler, len(batch), labels=pl_module.class_labels(batch), generator=generator)
            rows.append(extract(self.extractor, to_uint8(x)))
        D, K = self.extractor.num_features, self.extractor.num_logits
        local = torch.cat(rows) if rows else torch.zeros(0, D + K, device=pl_module.device)
        everything = self._ranks(trainer).gather_rows(local, self.num_samples)  # (num_samples, D + K)
        outcome = None
        if trainer.is_global_zero:
            try:
                outcome = ("ok", sample_quality(everything[:, :D], everything[:, D:] if K else None, self.reference,
                                                self.extractor.prefix, self.extractor.classifier))
            except Exception as err:  # raised on every rank below, not on rank 0 alone (the others would wait)
                outcome = ("error", f"FID: the metrics failed on rank 0 ({type(err).__name__}: {err})")
        status, values = trainer.strategy.broadcast(outcome, src=0)
        if status == "error":
            raise RuntimeError(values)
        return values

    # -------------------------------------------------------- the reference

    @staticmethod
    def _ranks(trainer: Trainer) -> Ranks:
        return Ranks(trainer.global_rank, trainer.world_size, trainer.strategy.all_gather,
                     lambda obj, src: trainer.strategy.broadcast(obj, src=src))

    def _shared_digit_features(self, trainer: Trainer, dm) -> DigitFeatures:
        """The digits classifier, with rank 0's weights on every rank (ranks on other machines could
        train slightly different ones; every feature must come from one network)."""
        error, extractor = None, None
        try:
            extractor = digit_features(dm, self.cache_dir or default_cache_dir())
        except ConfigError as err:
            error = str(err)
        self._ranks(trainer).agree(error, trainer.strategy.root_device)
        if trainer.world_size > 1:
            state, name = trainer.strategy.broadcast((extractor.net.state_dict(), extractor.name), src=0)
            extractor.net.load_state_dict(state)
            extractor.name = name
        return extractor

    def reference_cache_file(self, trainer: Trainer) -> Path:
        """Where the reference statistics of this data, split and feature extractor are cached."""
        return self._cache_file(trainer, trainer.datamodule.reference(self.reference_split))

    def _cache_file(self, trainer: Trainer, reference: Reference) -> Path:
        folder = Path(self.cache_dir).expanduser() if self.cache_dir is not None else \
            Path(reference.root or trainer.default_root_dir).expanduser() / "fid_stats"
        return reference_file(folder, type(trainer.datamodule).__name__, self.reference_split,
                              self._cache_key(reference))

    def _cache_key(self, reference: Reference) -> str:
        return reference_key(reference.key, self.extractor.name, min(len(reference.dataset), self.reference_subset))

    def _load_or_compute_reference(self, trainer: Trainer, device: torch.device) -> None:
        """Hold the reference on rank 0 (None elsewhere), from the cache or from one pass over the
        reference split shared by all ranks; every failure is a ConfigError raised on every rank at
        once (a rank that raised alone would leave the others waiting in a collective)."""
        where = f"{type(trainer.datamodule).__name__}'s {self.reference_split} split"
        ranks, error = self._ranks(trainer), None
        try:
            reference = trainer.datamodule.reference(self.reference_split)
            n = len(reference.dataset)
            if n == 0:
                error = (f"FID reference_split={self.reference_split!r} is empty ({where} has no images); point the "
                         f"data settings (data.root, data.val_size) at data with images, or set reference_split to "
                         f"the other split")
            elif n < MIN_SAMPLES:
                error = (f"FID reference_split={self.reference_split!r} has {n} image(s) ({where}), fewer than the "
                         f"{MIN_SAMPLES} the metrics need (a covariance, and each image's 3 nearest others); raise "
                         f"data.val_size or set reference_split to train")
        except Exception as err:
            error = self._unreadable(where, err)
        ranks.agree(error, trainer.strategy.root_device)
        unwritable = None if self.cache_dir is None else lambda err: (
            f"FID cache_dir={self.cache_dir!r} is not a writable folder ({err}); set the FID callback's cache_dir "
            f"to a folder this run can write, or to null")
        self.reference, _, _ = reference_statistics(
            reference.dataset, self.extractor, self._cache_key(reference), self._cache_file(trainer, reference),
            self.batch_size, device, self.reference_subset, getattr(trainer.datamodule, "num_workers", 0), ranks,
            unreadable=lambda err: self._unreadable(where, err), unwritable=unwritable,
            log=lambda message: rank_zero_info(f"FID: {message}"), warn=lambda message: rank_zero_warn(f"FID: {message}"))

    def _unreadable(self, where: str, err: BaseException) -> str:
        return (f"FID reference_split={self.reference_split!r} cannot be read from {where} ({one_line(err)}); check the "
                f"data settings (data.root and the files under it), or set reference_split to a readable split")
