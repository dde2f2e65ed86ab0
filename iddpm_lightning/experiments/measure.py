"""What the experiments measure on a trained run: sample quality of a sampler at a budget, test
bits/dim, and the learning curves the fit logged. Every number is cached in the run's
``measurements.json`` under a key naming what was measured, with the version of the code that
measured it, so a rerun only measures what is missing or was measured by other code (and a
killed one loses at most the measurement in progress). A measurement at step N reads only a
checkpoint that holds step N.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..checkpointing import read_checkpoint, write_durably
from ..data import DigitsDataModule, to_uint8
from ..diffusion import GaussianDiffusion, Sampler, space_timesteps
from ..evaluation.features import digit_features
from ..evaluation.metrics import ReferenceStats, sample_quality
from ..module import IDDPM


class Digits:
    """The digits splits every measurement reads: the classifier whose features score samples,
    the training split's statistics (the reference, as the paper's FID) and the test images."""

    def __init__(self, cache_dir: Path | None):
        dm = DigitsDataModule()
        dm.setup()
        self.features = digit_features(dm, cache_dir)
        train = next(iter(DataLoader(dm.reference("train").dataset, batch_size=10_000)))[0]  # (N, 1, 8, 8)
        self.reference = ReferenceStats.from_features(self.features(to_uint8(train))[0])
        self.test = next(iter(DataLoader(dm.reference("test").dataset, batch_size=10_000)))[0]  # (150, 1, 8, 8)

    def quality(self, images: torch.Tensor) -> dict[str, float]:
        """Digit-feature FD, KID, precision, recall, confidence and class entropy of uint8 images."""
        features, logits = self.features(images)
        return sample_quality(features, logits, self.reference, self.features.prefix, classifier=True)


class Checkpoint:
    """A trained checkpoint, sampled and scored with its EMA weights."""

    def __init__(self, path: Path):
        self.module = IDDPM.load_from_checkpoint(path, map_location="cpu").eval()
        self.model = self.module.model_fn(self.module.ema_unet.eval())
        self.diffusion = self.module.diffusion
        self.shape = (self.module.hparams.in_channels, self.module.hparams.image_size, self.module.hparams.image_size)

    @torch.inference_mode()
    def draw(self, sampler: Sampler, num: int, seed: int, batch: int, variance: str | None = None,
             skip: float = 0.0) -> torch.Tensor:
        """``num`` uint8 samples [N, C, H, W] drawn by ``sampler`` from ``seed``'s noise (the same noise
        for every model). ``variance`` samples with another fixed Σ than the model's own (``fixed_large``
        for an L_simple model: the network is the same). ``skip``: the share of the reverse process
        skipped: ``sampler.steps`` steps spaced over [0, (1 − skip)·T), started from N(0, I) there
        (the paper's Fig. 3)."""
        T = self.diffusion.num_timesteps
        diffusion = self.diffusion
        if variance is not None and variance != diffusion.model_var_type:
            diffusion = GaussianDiffusion(diffusion.betas, variance, diffusion.loss_type)
        if skip:
            diffusion = diffusion.respace(space_timesteps(round((1 - skip) * T), sampler.steps))
            sampler = replace(sampler, steps=None)  # every kept step
        generator = torch.Generator().manual_seed(seed)
        out = [to_uint8(sampler.sample(diffusion, self.model, (min(batch, num - start), *self.shape),
                                       generator=generator)) for start in range(0, num, batch)]
        return torch.cat(out)

    @torch.inference_mode()
    def test_bpd(self, images: torch.Tensor, num_strata: int, seed: int) -> dict[str, float]:
        """Bits/dim of test ``images`` [N, C, H, W] in [-1, 1]: the mean of the unbiased stratified
        estimate (``stratified_bpd``, 2 x ``num_strata`` model calls per image) and the Monte-Carlo
        standard error of that mean given the images, √(Σ_i Var_i) / N."""
        out = self.diffusion.stratified_bpd(self.model, images, num_strata, generator=torch.Generator().manual_seed(seed),
                                            max_batch=self.module.bpd_batch_size)
        n = len(images)
        return {"bpd": float(out["total_bpd"].mean()), "mc_se": float(out["variance"].sum().sqrt() / n)}


class Measurements:
    """The run's measurements, read from and written to ``measurements.json`` (atomically)."""

    def __init__(self, folder: Path):
        self.path = folder / "measurements.json"
        self.values = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, key: str, measure, code: str, reuse: bool = False):
        """The cached value of ``key`` if this ``code`` measured it (any code's with ``reuse``), or
        ``measure()``'s (with its wall seconds and ``code``), saved."""
        cached = self.values.get(key)
        if cached is None or (cached.get("code") != code and not reuse):
            start = time.perf_counter()
            value = measure()
            self.values[key] = {**value, "wall_s": round(time.perf_counter() - start, 2), "code": code}
            write_durably(self.path, lambda tmp: tmp.write_text(json.dumps(self.values, indent=1, sort_keys=True)))
        return self.values[key]


def checkpoint_path(folder: Path, step: int) -> Path:
    """The run's checkpoint of ``step``: ``step={step}.ckpt``, or ``last.ckpt`` if it holds that step
    (read from each file, not trusted from its name); an error if neither does."""
    for path in (folder / "checkpoints" / f"step={step}.ckpt", folder / "checkpoints" / "last.ckpt"):
        if path.is_file() and read_checkpoint(path, mmap=True).get("global_step") == step:
            return path
    raise RuntimeError(f"{folder} holds no checkpoint of step {step} (a run stopped before it?); rerun the "
                       f"command to train it")


def curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the fit logged to TensorBoard, as (step, value) pairs in step order; a step
    logged twice (a resumed run repeats the steps after its last checkpoint) keeps the later value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for events in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: sorted(values.items()) for tag, values in series.items()}


def window_noise(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation and coefficient of variation of a window of values, and the
    standard deviation of successive differences / √2 (the noise with a slow trend removed)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return {"mean": float(v.mean()) if len(v) else math.nan, "std": math.nan, "cv": math.nan, "diff_std": math.nan}
    std = float(v.std(ddof=1))
    return {"mean": float(v.mean()), "std": std, "cv": std / abs(float(v.mean())),
            "diff_std": float(np.diff(v).std(ddof=1) / math.sqrt(2)) if len(v) > 2 else math.nan}
