"""Bits/dim on a fixed subset of validation images, every N validations: a cheap,
unbiased stratified estimate of the full bound L_T + Σ_t L_t, with its standard error."""

from __future__ import annotations

import math
import warnings

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ..errors import ConfigError
from ..rng import seeded_generator
from ..settings import NonNegativeInt, PositiveInt, check_args

# The values are reduced across ranks before they are logged (sync_dist=False on purpose),
# so Lightning's DDP advice to log them with sync_dist=True does not apply to them.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/bpd(_se)?'")


class BitsPerDim(Callback):
    """Logs ``val/bpd`` and ``val/bpd_se`` every ``every_n_val_epochs`` validations (not
    during the sanity check or ``fast_dev_run``), using the module's eval (EMA) weights.

    The images are the first ``num_images`` of the validation loader, in its batches (it
    is not shuffled, so they are the same every time). Under DDP each rank takes the first
    ⌈num_images / world_size⌉ of its own shard: with Lightning's unshuffled
    DistributedSampler these are together the first world_size·⌈num_images / world_size⌉
    images of the set. For each image,
    ``GaussianDiffusion.stratified_bpd`` cuts [0, T) into ``num_strata`` strata of sizes
    s_k, draws two t per stratum and returns

        b̂ = L_T + Σ_k (s_k L_{t_a} + s_k L_{t_b}) / 2,   v̂ = Σ_k (s_k L_{t_a} − s_k L_{t_b})² / 4,

    an unbiased estimate of the exact bound and of its Monte-Carlo variance (2K model
    calls per image instead of T). Over the N images of all ranks:

        val/bpd = Σ b̂ / N,   val/bpd_se = √(Σ v̂) / N.

    The SE is the Monte-Carlo error (over t and ε) around THESE images' bound
    E_ε[L_T + Σ_t L_t], which ``exact: true`` estimates with one ε per t; it is not the
    sampling error of choosing N images. The
    generator is keyed by (seed, rank, global_step): every validation draws new t and ε,
    and a rerun draws the same.

    Args:
        num_images: Validation images evaluated, over all devices.
        num_strata: Strata K of [0, T); 2K model calls per image. At most T (checked in
            ``setup``, before training; unused when ``exact``).
        every_n_val_epochs: Evaluate every this many validation runs.
        exact: Run the exact loop ``calc_bpd_loop`` (T model calls per image) instead, and
            log only ``val/bpd`` (no ``val/bpd_se``: the loop's own noise is not estimated).
        seed: Seed of the t and ε draws (a non-negative integer).
    """

    def __init__(
        self,
        num_images: PositiveInt = 256,
        num_strata: PositiveInt = 20,
        every_n_val_epochs: PositiveInt = 1,
        exact: bool = False,
        seed: NonNegativeInt = 0,
    ):
        check_args("BitsPerDim ", BitsPerDim.__init__, locals())
        self.num_images = num_images
        self.num_strata = num_strata
        self.every_n_val_epochs = every_n_val_epochs
        self.exact = exact
        self.seed = seed
        self._val_epochs = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        T = pl_module.diffusion.num_timesteps
        if not self.exact and self.num_strata > T:
            raise ConfigError(
                f"BitsPerDim num_strata={self.num_strata} exceeds the model's {T} timesteps; "
                f"set num_strata to at most {T}."
            )

    def state_dict(self) -> dict:
        return {"val_epochs": self._val_epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        self._val_epochs = int(state_dict.get("val_epochs", 0))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        self._val_epochs += 1
        if self._val_epochs % self.every_n_val_epochs != 0:
            return
        # ONE collective for the three sums: [Σ b̂, Σ v̂, N] over every rank.
        est_sum, var_sum, count = trainer.strategy.reduce(self.evaluate(trainer, pl_module), reduce_op="sum").tolist()
        if count == 0:
            return
        pl_module.log("val/bpd", est_sum / count, sync_dist=False)
        if not self.exact:
            pl_module.log("val/bpd_se", math.sqrt(var_sum) / count, sync_dist=False)

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> torch.Tensor:
        """[Σ b̂, Σ v̂, number of images] (float64) over this rank's share of the subset."""
        device, diffusion, unet = pl_module.device, pl_module.diffusion, pl_module.eval_unet
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        loader = trainer.val_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        if loader is None:
            return sums
        per_rank = math.ceil(self.num_images / trainer.world_size)
        g = seeded_generator(device, self.seed, trainer.global_rank, trainer.global_step)
        count = 0
        was_training = unet.training
        unet.eval()
        try:
            for x_start, labels in loader:
                if count >= per_rank:
                    break
                x_start = x_start[: per_rank - count].to(device)
                model = pl_module.model_fn(unet, labels[: len(x_start)].to(device))
                max_batch = pl_module.bpd_batch_size
                if self.exact:
                    out = diffusion.calc_bpd_loop(model, x_start, generator=g, max_batch=max_batch)
                else:
                    out = diffusion.stratified_bpd(model, x_start, self.num_strata, generator=g, max_batch=max_batch)
                    sums[1] += out["variance"].double().sum()
                sums[0] += out["total_bpd"].double().sum()
                count += len(x_start)
        finally:
            unet.train(was_training)
        sums[2] = count
        return sums
