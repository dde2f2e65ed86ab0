"""IDDPM: a thin LightningModule over a diffusers UNet and ``GaussianDiffusion``.

A training step draws ``(t, weights)`` from the module's ``timestep_distribution`` (uniform until a
callback such as ``ImportanceSampling`` gives it p_t) and minimises mean(weights · loss) of
``GaussianDiffusion.training_losses``; after the optimizer step the exponential moving average of
the UNet (``ema_unet``, so part of every checkpoint) follows. Validation, test and sampling use the
EMA weights unless ``eval_with_ema`` is false. Around the steps: callbacks; how images are drawn:
``diffusion.samplers``.
"""

from __future__ import annotations

import copy

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric

from .compat import RUNTIME, CheckpointCompat, legacy_unet, plain
from .data import to_uint8
from .diffusion import BPD_MAX_BATCH, GaussianDiffusion, Sampler, TimestepDistribution, UniformTimesteps
from .diffusion.schedules import get_named_beta_schedule
from .errors import ConfigError
from .rng import global_rng_seeded, seeded_generator
from .sampling import SampleBatch
from .settings import (LossType, NoiseSchedule, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                       UnitIntervalOpenRight, VarianceType, check_args, check_precision)
from .unet import UNetConfig, build_unet

__all__ = ["IDDPM"]

# Keys of the seeded streams: a training step's dropout is (seed, rank, batch, 1), validation's and
# test's batch numbers are offset, apart from training's and from each other.
_DROPOUT, _VAL, _TEST = 1, 10**9, 2 * 10**9


class IDDPM(CheckpointCompat, LightningModule):
    """Improved DDPM (Nichol & Dhariwal 2021) on a diffusers ``UNet2DModel``.

    Args:
        unet: The UNet's structure (widths, blocks, attention, dropout).
        image_size, in_channels, num_classes: The data's shape (linked from the data module). The
            UNet outputs 2C channels (ε and v) for a learned variance, C otherwise.
        class_cond: Condition the UNet on class labels (a learned class embedding).
        timesteps: Diffusion steps T.
        noise_schedule: The β schedule (§3.2): ``cosine`` or ``linear``.
        model_var_type: The reverse variance: ``learned_range`` (§3.1) or a fixed one.
        loss_type: ``hybrid`` (L_simple + λ L_vlb), ``vlb`` or ``simple``.
        rescale_timesteps: The UNet sees t·1000/T (a float) instead of t, as the paper's released
            models do (improved-diffusion's ``rescale_timesteps``); part of what the model is.
        lr, weight_decay: AdamW's (the paper: 1e-4 and 0).
        warmup_steps: Linear learning-rate warm-up over this many optimizer steps (0: none).
        ema_decay: Decay of the exponential moving average of the weights.
        ema_warmup: Use min(ema_decay, (1 + n) / (10 + n)) after n updates, so that a short
            run's average is not dominated by the random initial weights.
        seed: Keys every random stream of training, validation and test (t, ε, dropout); the
            CLI sets it from ``seed_everything``.
        eval_with_ema: Run-time: validate, test and sample with the EMA weights (else the raw ones).
        bpd_batch_size: Run-time: model inputs per forward pass when evaluating bits/dim: k =
            ``bpd_batch_size // B`` timesteps of the same B images share a call (no number changes).
        test_strata: Run-time: ``test`` estimates bits/dim with the unbiased stratified estimate of
            2·K model calls per image (K strata) and its standard error, instead of the exact T calls.
        channels_last: Run-time: run the UNets in channels-last memory format.
        compile: Run-time: ``torch.compile`` the UNets. With dropout, compiled training draws other
            masks than eager (inductor's streams): keep it unchanged across a resume.
        gradient_checkpointing: Run-time: recompute the trained UNet's residual blocks in the
            backward pass (diffusers'): less activation memory, the same loss and gradients.
    """

    def __init__(
        self,
        unet: UNetConfig = UNetConfig(),
        image_size: PositiveInt = 32,
        in_channels: PositiveInt = 3,
        num_classes: NonNegativeInt = 0,
        class_cond: bool = False,
        timesteps: PositiveInt = 4000,
        noise_schedule: NoiseSchedule = "cosine",
        model_var_type: VarianceType = "learned_range",
        loss_type: LossType = "hybrid",
        rescale_timesteps: bool = False,
        lr: PositiveFloat = 1e-4,
        weight_decay: NonNegativeFloat = 0.0,
        warmup_steps: NonNegativeInt = 0,
        ema_decay: UnitIntervalOpenRight = 0.9999,
        ema_warmup: bool = False,
        seed: NonNegativeInt = 0,
        eval_with_ema: bool = True,
        bpd_batch_size: PositiveInt = BPD_MAX_BATCH,
        test_strata: PositiveInt | None = None,
        channels_last: bool = False,
        compile: bool = False,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        unet = UNetConfig(**legacy_unet(unet)) if isinstance(unet, dict) else unet  # a checkpoint's hparams hold a dict
        self.save_hyperparameters(ignore=RUNTIME)
        plain(self.hparams)  # checkpoints hold plain types
        try:
            self.diffusion = GaussianDiffusion(get_named_beta_schedule(noise_schedule, timesteps), model_var_type,
                                               loss_type)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        check_args("model.", IDDPM.__init__, {k: v for k, v in locals().items() if k not in ("self", "unet")})
        if loss_type == "simple" and model_var_type == "learned_range":
            raise ConfigError(
                "model.loss_type 'simple' trains no variance, so a learned_range variance would stay "
                "untrained; use loss_type 'hybrid' or 'vlb', or model_var_type 'fixed_small'/'fixed_large'"
            )
        if class_cond and num_classes < 1:
            raise ConfigError("model.class_cond is true but the data has no class labels; set class_cond: false")
        self.eval_with_ema, self.bpd_batch_size, self.channels_last = eval_with_ema, bpd_batch_size, channels_last
        self.test_strata = test_strata

        out_channels = 2 * in_channels if model_var_type == "learned_range" else in_channels
        self.unet = build_unet(unet, image_size, in_channels, out_channels, num_classes if class_cond else None)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        if gradient_checkpointing:  # only the trained UNet: the EMA never runs with gradients
            self.unet.enable_gradient_checkpointing()
        if compile:  # in place (Module.compile): the state dict keeps its keys, checkpoints stay interchangeable
            self.unet.compile()
            self.ema_unet.compile()
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.timestep_distribution = TimestepDistribution(timesteps)  # a callback may give it p_t; none replaces it

        self.val_loss, self.val_mse, self.val_vb = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_vb_quartiles = torch.nn.ModuleList(MeanMetric() for _ in range(4))
        self.test_bpd, self.test_prior_bpd = MeanMetric(), MeanMetric()
        self.test_decoder_bpd, self.test_kl_bpd = MeanMetric(), MeanMetric()

    # ------------------------------------------------------------------ models

    @property
    def eval_unet(self):
        return self.ema_unet if self.eval_with_ema else self.unet

    def model_fn(self, unet, labels: torch.Tensor | None = None):
        """The ``model(x_t, t)`` callable GaussianDiffusion expects, for a UNet and the B labels
        of a batch. Given k·B inputs (timesteps batched over the same images, t-major) it repeats
        the labels k times."""
        labels = labels if self.hparams.class_cond else None
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        scale = 1000.0 / self.hparams.timesteps if self.hparams.rescale_timesteps else None

        def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            y = labels if labels is None or len(labels) == len(x_t) else labels.repeat(len(x_t) // len(labels))
            t = t if scale is None else t.float() * scale  # the official _scale_timesteps, to the float32 bit
            return unet(x_t.contiguous(memory_format=memory_format), t, class_labels=y).sample

        return model

    # ----------------------------------------------------------- train and val

    def setup(self, stage: str) -> None:
        check_precision(self.trainer.precision)

    def _step(self, unet, batch, distribution, generator: torch.Generator):
        """Draw t from ``distribution`` and ε from ``generator``; the terms of L_hybrid/L_vlb/L_simple
        for the batch: (t [B], weights [B], {loss, mse, vb} each [B])."""
        x_start, labels = batch  # (B, C, H, W) in [-1, 1], (B,)
        t, weights = distribution.draw(x_start.shape[0], self.device, generator=generator)
        noise = torch.randn(x_start.shape, generator=generator, device=self.device, dtype=x_start.dtype)
        terms = self.diffusion.training_losses(self.model_fn(unet, labels), x_start, t, noise=noise)
        return t, weights, terms

    def training_step(self, batch, batch_idx: int):
        # Everything random in this step is keyed by (seed, rank, batch number over the epochs): t,
        # ε and dropout. Ranks differ; a resumed run draws exactly what the uninterrupted one would.
        epoch = self.current_epoch
        number = batch_idx + (epoch * self.trainer.num_training_batches if epoch else 0)  # every epoch is whole
        key = (self.hparams.seed, self.global_rank, number)
        with global_rng_seeded(self.device, *key, _DROPOUT):  # dropout draws from the global generator
            t, weights, terms = self._step(self.unet, batch, self.timestep_distribution,
                                           seeded_generator(self.device, *key))
        loss = (terms["loss"] * weights).mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/mse", terms["mse"].mean())
        self.log("train/vb", terms["vb"].mean())
        return {"loss": loss, "timesteps": t, "losses": terms["loss"].detach()}

    def validation_step(self, batch, batch_idx: int):
        """The training terms on held-out images with the eval weights, at uniform t and ε drawn
        from a generator keyed by the batch, so every validation sees the same t and ε."""
        g = seeded_generator(self.device, self.hparams.seed, self.global_rank, _VAL + batch_idx)
        t, _, terms = self._step(self.eval_unet, batch, UniformTimesteps(self.diffusion.num_timesteps), g)
        for metric, name in ((self.val_loss, "loss"), (self.val_mse, "mse"), (self.val_vb, "vb")):
            metric.update(terms[name])
        quartile = t * 4 // self.diffusion.num_timesteps  # (B,) in 0..3
        for q, metric in enumerate(self.val_vb_quartiles):
            metric.update(terms["vb"], weight=(quartile == q).to(terms["vb"].dtype))
        self.log_dict({"val/loss": self.val_loss, "val/mse": self.val_mse, "val/vb": self.val_vb,
                       **{f"val/vb_q{q}": m for q, m in enumerate(self.val_vb_quartiles)}},
                      on_step=False, on_epoch=True, batch_size=len(t))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.warmup_steps <= 0:
            return opt
        warmup = self.hparams.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --------------------------------------------------------------------- EMA

    def on_train_start(self):
        self._ema_n = int(self.ema_updates)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """The optimizer step, then the EMA update: once per step that really changed the weights,
        so not per accumulated micro-batch (Lightning calls this once per step), and not after a
        step the fp16 grad scaler skipped (it lowers its scale exactly then)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None else None
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if scaler is None or scaler.get_scale() >= scale:
            self.update_ema()

    @torch.no_grad()
    def update_ema(self):
        """ema ← ema + (1 − decay)(θ − ema), decay = min(ema_decay, (1+n)/(10+n)) with warm-up."""
        n = self._ema_n
        decay = min(self.hparams.ema_decay, (1 + n) / (10 + n)) if self.hparams.ema_warmup else self.hparams.ema_decay
        torch._foreach_lerp_(list(self.ema_unet.parameters()), list(self.unet.parameters()), 1.0 - decay)
        self._ema_n = n + 1
        self.ema_updates.fill_(n + 1)

    # -------------------------------------------------------------------- test

    def test_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Bits/dim with the eval weights: exact (``calc_bpd_loop``, T calls an image; total_bpd,
        prior_bpd [B], vb, mse [B, T]) or, with ``test_strata``, ``stratified_bpd`` (total_bpd, variance,
        prior_bpd [B]); returned for the test report."""
        x_start, labels = batch
        g = seeded_generator(self.device, self.hparams.seed, self.global_rank, _TEST + batch_idx)
        progress = self.trainer.is_global_zero and self.trainer.progress_bar_callback is not None
        model, x_start = self.model_fn(self.eval_unet, labels), x_start.float()
        # In float32 whatever trainer.precision: a likelihood must not depend on the precision a run used.
        with torch.autocast(self.device.type, enabled=False):
            if self.test_strata:  # 2K calls an image; no per-timestep terms
                out = self.diffusion.stratified_bpd(model, x_start, self.test_strata, generator=g,
                                                    max_batch=self.bpd_batch_size)
            else:
                out = self.diffusion.calc_bpd_loop(model, x_start, generator=g, progress=progress,
                                                   max_batch=self.bpd_batch_size)
        metrics = {"test/bpd": (self.test_bpd, out["total_bpd"]),
                   "test/prior_bpd": (self.test_prior_bpd, out["prior_bpd"])}
        if "vb" in out:
            metrics |= {"test/decoder_bpd": (self.test_decoder_bpd, out["vb"][:, 0]),
                        "test/kl_bpd": (self.test_kl_bpd, out["vb"][:, 1:].sum(dim=1))}
        for metric, value in metrics.values():
            metric.update(value)
        self.log_dict({name: metric for name, (metric, _) in metrics.items()}, on_step=False, on_epoch=True,
                      batch_size=x_start.shape[0])
        return out

    # ---------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample(self, sampler: Sampler = Sampler(), num_samples: int | None = None, noise: torch.Tensor | None = None,
               labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
               progress: bool = False) -> torch.Tensor:
        """Images [N, C, H, W] in [-1, 1] drawn by ``sampler`` with the eval weights, from ``noise``
        (x_T [N, C, H, W]) or from N(0, I) noise for ``num_samples`` images drawn from ``generator``.
        ``labels`` [N] (class-conditional models): by default ``class_labels(arange(N))``. In float32
        whatever ``trainer.precision`` (predict runs under its autocast): a sample, like bits/dim,
        must not depend on the precision a run used."""
        hp = self.hparams
        n = len(noise) if noise is not None else num_samples
        labels = self.class_labels(torch.arange(n, device=self.device)) if labels is None else labels
        unet = self.eval_unet
        was_training = unet.training
        unet.eval()
        try:
            with torch.autocast(self.device.type, enabled=False):
                return sampler.sample(self.diffusion, self.model_fn(unet, labels),
                                      (n, hp.in_channels, hp.image_size, hp.image_size), noise=noise,
                                      generator=generator, progress=progress, device=self.device)
        finally:
            unet.train(was_training)

    def class_labels(self, indices: torch.Tensor) -> torch.Tensor | None:
        """Each sample's class by its index over the whole draw [N], ``index % num_classes``: a draw of N,
        cut into batches and ranks however, holds every class ⌊N/K⌋ or ⌈N/K⌉ times; None if unconditional."""
        return indices % self.hparams.num_classes if self.hparams.class_cond else None

    def predict_step(self, batch: SampleBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Samples for ``batch.index`` [b] as uint8 images [b, H, W, C] (rounded to the 256 levels),
        drawn with noise keyed by (seed, first index): the same seed gives the same images on the
        same number of devices."""
        g = seeded_generator(self.device, batch.seed, int(batch.index[0]))
        labels = self.class_labels(batch.index)
        x = self.sample(batch.sampler, len(batch.index), labels=labels, generator=g,
                        progress=self.trainer.is_global_zero and self.trainer.progress_bar_callback is not None)
        return {"index": batch.index, "image": to_uint8(x).permute(0, 2, 3, 1),  # (b, H, W, C)
                "label": labels if labels is not None else torch.zeros_like(batch.index)}
