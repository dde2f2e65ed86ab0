"""IDDPM: a thin LightningModule over a diffusers UNet and ``GaussianDiffusion``.

Training draws ``(t, weights)`` from ``self.timestep_sampler`` (uniform unless a callback,
such as the importance sampler, installs another one), computes the per-sample terms of
``GaussianDiffusion.training_losses`` and minimises mean(weights · loss). An exponential
moving average of the UNet (``ema_unet``) is kept in the module, so it is checkpointed with
it; validation, test and sampling use it unless ``eval_with_ema`` is false.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, restricted_number_type
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric

from .diffusion import GaussianDiffusion, get_named_beta_schedule
from .diffusion.resample import UniformSampler
from .errors import ConfigError, NonFiniteLossError
from .rng import derive_seed, seeded_generator
from .unet import build_unet

__all__ = ["IDDPM", "derive_seed", "seeded_generator"]

# [0, 1): a dropout of 1 zeroes every activation, an EMA decay of 1 never moves.
UnitIntervalOpenRight = restricted_number_type("UnitIntervalOpenRight", float, [(">=", 0), ("<", 1)])

# Precisions that convert the whole module, weights and EMA included, to a 16-bit dtype:
# an EMA step of (1 - 0.9999)·(θ - ema) is below bfloat16's resolution, so the average
# would never move, and AdamW's small updates round away the same way.
HALF_TRUE_PRECISIONS = ("bf16-true", "16-true")


def plain(value):
    """``value`` with jsonargparse's constrained types (``PositiveInt(3)`` is an int subclass)
    turned into plain ints, floats and strings, which ``torch.load(weights_only=True)`` accepts;
    dicts are converted in place, tensors left alone."""
    if isinstance(value, dict):
        for k, v in value.items():
            value[k] = plain(v)
        return value
    if isinstance(value, (list, tuple)):
        return (list if isinstance(value, list) else tuple)(plain(v) for v in value)
    if type(value) in (bool, int, float, str):
        return value
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value


def check_precision(precision: str) -> None:
    """Refuse a ``trainer.precision`` that would train the weights themselves in 16 bits."""
    if str(precision) in HALF_TRUE_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision} converts the weights and their EMA to 16 bits, where the EMA "
            f"(decay 0.9999) and AdamW's small steps round to no change; use trainer.precision=bf16-mixed "
            f"(float32 weights, the UNet in bfloat16) or 32-true"
        )


STRUCTURE = ("in_channels", "image_size", "class_cond", "num_classes", "timesteps", "noise_schedule",
             "model_var_type", "block_out_channels", "layers_per_block", "attention_resolutions")


# How to run a model, not what it is: with --ckpt_path these come from the config and
# command line, not from the checkpoint's hyperparameters.
RUNTIME = ("eval_with_ema", "bpd_batch_size", "channels_last", "compile")


def check_compatible(saved: dict, hparams: dict) -> None:
    """Raise a ConfigError naming every structural setting in which a checkpoint's
    hyperparameters ``saved`` differ from the model's ``hparams``."""
    differ = [f"{k}={saved[k]!r} (here {hparams[k]!r})" for k in STRUCTURE
              if k in saved and k in hparams and saved[k] != hparams[k]
              and (k != "num_classes" or hparams.get("class_cond"))]
    if differ:
        raise ConfigError(
            f"the checkpoint was trained with {', '.join(differ)}; in_channels, image_size and num_classes "
            f"follow the data, so use the data (and config) the checkpoint was trained with"
        )


class IDDPM(LightningModule):
    """Improved DDPM (Nichol & Dhariwal 2021) on a diffusers ``UNet2DModel``.

    Args:
        image_size: Height and width of the images (linked from the data module).
        in_channels: Image channels C (linked from the data module). The UNet outputs 2C
            channels (ε and v) for a learned variance, C otherwise.
        num_classes: Number of classes (linked from the data module); used only if
            ``class_cond``.
        class_cond: Condition the UNet on class labels (a learned class embedding).
        block_out_channels: Channels of each UNet resolution level, e.g. [128, 256, 256, 256]
            for the paper's CIFAR-10 model (128 channels, multipliers 1, 2, 2, 2).
        layers_per_block: Residual blocks per resolution level.
        attention_resolutions: Resolutions (in pixels) whose blocks get self-attention.
        attention_head_dim: Channels per attention head.
        dropout: Dropout in the residual blocks (the paper uses 0.3 on CIFAR-10).
        timesteps: Diffusion steps T.
        noise_schedule: ``cosine`` or ``linear``.
        model_var_type: ``learned_range``, ``fixed_small`` or ``fixed_large``.
        loss_type: ``hybrid`` (L_simple + λ L_vlb), ``vlb`` or ``simple``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (the paper uses 0).
        warmup_steps: Linear learning-rate warm-up over this many optimizer steps (0: none).
        ema_decay: Decay of the exponential moving average of the weights.
        ema_warmup: Use min(ema_decay, (1 + n) / (10 + n)) after n updates, so that a short
            run's average is not dominated by the random initial weights.
        eval_with_ema: Validate, test and sample with the EMA weights (else the raw ones).
        bpd_batch_size: Model inputs per forward pass when evaluating bits/dim (``test``
            and the ``BitsPerDim`` callback): k = ``bpd_batch_size // B`` timesteps of the
            same B images share one call, so a call sees max(B, bpd_batch_size) inputs at
            most (a batch larger than it is not split). It changes no number (beyond float
            rounding), only speed and memory; on one image per batch it is what keeps the
            hardware busy.
        channels_last: Run the UNets in channels-last memory format (faster convolutions on
            GPUs with tensor cores, and often on CPUs with oneDNN).
        compile: ``torch.compile`` the UNets (the first steps pay the compilation). With
            dropout, compiled training draws other dropout masks than eager (inductor's own
            random streams), so keep it unchanged across a resume for an exact resume.
    """

    def __init__(
        self,
        image_size: PositiveInt = 32,
        in_channels: PositiveInt = 3,
        num_classes: NonNegativeInt = 0,
        class_cond: bool = False,
        block_out_channels: list[PositiveInt] = [128, 256, 256, 256],
        layers_per_block: PositiveInt = 3,
        attention_resolutions: list[PositiveInt] = [16, 8],
        attention_head_dim: PositiveInt = 64,
        dropout: UnitIntervalOpenRight = 0.0,
        timesteps: PositiveInt = 4000,
        noise_schedule: Literal["cosine", "linear"] = "cosine",
        model_var_type: Literal["learned_range", "fixed_small", "fixed_large"] = "learned_range",
        loss_type: Literal["hybrid", "vlb", "simple"] = "hybrid",
        lr: PositiveFloat = 1e-4,
        weight_decay: NonNegativeFloat = 0.0,
        warmup_steps: NonNegativeInt = 0,
        ema_decay: UnitIntervalOpenRight = 0.9999,
        ema_warmup: bool = False,
        eval_with_ema: bool = True,
        bpd_batch_size: PositiveInt = 256,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.hparams.update({k: plain(v) for k, v in self.hparams.items()})  # checkpoints hold plain types
        try:
            betas = get_named_beta_schedule(noise_schedule, timesteps)
            self.diffusion = GaussianDiffusion(betas, model_var_type, loss_type)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        if loss_type == "simple" and model_var_type == "learned_range":
            raise ConfigError(
                "model.loss_type 'simple' trains no variance, so a learned_range variance would stay "
                "untrained; use loss_type 'hybrid' or 'vlb', or model_var_type 'fixed_small'/'fixed_large'"
            )
        if class_cond and num_classes < 1:
            raise ConfigError("model.class_cond is true but the data has no class labels; set class_cond: false")
        for name, value in (("ema_decay", ema_decay), ("dropout", dropout)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {value}")
        if not lr > 0:
            raise ConfigError(f"model.lr must be positive, got {lr}")
        if bpd_batch_size < 1:
            raise ConfigError(f"model.bpd_batch_size={bpd_batch_size} must be at least 1, e.g. 256")
        out_channels = 2 * in_channels if model_var_type == "learned_range" else in_channels
        self.unet = build_unet(
            image_size, in_channels, out_channels, block_out_channels, layers_per_block,
            attention_resolutions, attention_head_dim, dropout, num_classes if class_cond else None,
        )
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        if compile:
            # In place (Module.compile): the state dict keeps its keys, so checkpoints of
            # compiled and eager runs are interchangeable.
            self.unet.compile()
            self.ema_unet.compile()
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self._micro, self._first_bad = 0, None  # micro-batches of this step, the first with a non-finite loss
        self.timestep_sampler = UniformSampler(timesteps)

        self.val_loss, self.val_mse, self.val_vb = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_vb_quartiles = torch.nn.ModuleList(MeanMetric() for _ in range(4))
        self.test_bpd, self.test_prior_bpd = MeanMetric(), MeanMetric()
        self.test_decoder_bpd, self.test_kl_bpd = MeanMetric(), MeanMetric()

    # ------------------------------------------------------------------ models

    @property
    def eval_unet(self):
        return self.ema_unet if self.hparams.eval_with_ema else self.unet

    def model_fn(self, unet, labels: torch.Tensor | None = None):
        """The ``model(x_t, t)`` callable GaussianDiffusion expects, for a UNet and the B
        labels of a batch. Given k·B inputs (timesteps batched over the same images, t-major)
        it repeats the labels k times."""
        labels = labels if self.hparams.class_cond else None
        memory_format = torch.channels_last if self.hparams.channels_last else torch.contiguous_format

        def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            y = labels if labels is None or len(labels) == len(x_t) else labels.repeat(len(x_t) // len(labels))
            return unet(x_t.contiguous(memory_format=memory_format), t, class_labels=y).sample

        return model

    def _seed(self) -> int:
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    # ------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Every value in a checkpoint (callback states, data module settings) in plain types,
        and the seed that keys every random stream, so that a resume continues with it."""
        plain(checkpoint)
        checkpoint["seed"] = self._seed()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another model before its weights meet a size mismatch."""
        check_compatible(checkpoint.get("hyper_parameters", {}), self.hparams)

    # ---------------------------------------------------------------- training

    def setup(self, stage: str) -> None:
        check_precision(self.trainer.precision)

    def training_step(self, batch, batch_idx: int):
        x_start, labels = batch  # (B, C, H, W) in [-1, 1], (B,)
        # Everything random in this step is keyed by (seed, rank, batch number): t, ε, and
        # (through the global generator) dropout. Ranks differ; a resumed run repeats exactly.
        key = (self._seed(), self.global_rank, self.trainer.fit_loop.epoch_loop.total_batch_idx)
        g = seeded_generator(self.device, *key)
        torch.manual_seed(derive_seed(*key, 1))  # dropout
        t, weights = self.timestep_sampler.sample(x_start.shape[0], self.device, generator=g)
        noise = torch.randn(x_start.shape, generator=g, device=self.device, dtype=x_start.dtype)
        terms = self.diffusion.training_losses(self.model_fn(self.unet, labels), x_start, t, noise=noise)
        loss = (terms["loss"] * weights).mean()
        self._note_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/mse", terms["mse"].mean())
        self.log("train/vb", terms["vb"].mean())
        return {"loss": loss, "timesteps": t, "losses": terms["loss"].detach()}

    # ------------------------------------------------------- non-finite guard

    def _note_finite(self, loss: torch.Tensor) -> None:
        """Remember (on the device: no sync) the first micro-batch of this optimizer step whose
        loss is not finite; with gradient accumulation a step has several."""
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach())
        self._first_bad = torch.where(bad & (self._first_bad < 0), self._micro, self._first_bad)
        self._micro += 1

    def on_before_optimizer_step(self, optimizer):
        """Refuse to apply a step in which any micro-batch's loss, on any rank, or the (all-
        reduced) gradient is not finite: the weights, the EMA and every checkpoint stay those
        of the last good step. The decision is made on values gathered from every rank (one
        small all_gather and one host sync per optimizer step), so that all ranks stop
        together with the same message, and none applies a step the others refused."""
        micro, first_bad = self._micro, self._first_bad
        self._micro, self._first_bad = 0, None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        grads = [p.grad for p in self.unet.parameters() if p.grad is not None]
        # fp16's GradScaler skips steps with inf gradients itself: only the loss is checked then.
        bad_grad = (scaler is None and bool(grads)) and ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        local = torch.stack([first_bad, torch.as_tensor(bad_grad, dtype=torch.long, device=first_bad.device)])
        flags = self.trainer.strategy.all_gather(local).reshape(-1, 2).tolist()  # [[first_bad, bad_grad]] per rank
        bad_loss = [(rank, m) for rank, (m, _) in enumerate(flags) if m >= 0]
        if not bad_loss and not any(g for _, g in flags):
            return
        where = "; ".join(f"rank {rank}, micro-batch {m + 1} of {micro}" for rank, m in bad_loss)
        step = self.global_step
        what = f"the training loss is not finite in optimizer step {step + 1} ({where})" if bad_loss else \
            f"the gradients are not finite in optimizer step {step + 1}"
        raise NonFiniteLossError(
            f"{what}; no rank applied it, so the weights and the last checkpoint are those of step {step}. "
            f"Likely causes: a learning rate too high (model.lr), exploding gradients (set "
            f"trainer.gradient_clip_val), or fp16 overflow (use bf16-mixed or 32-true)"
        )

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
        """The optimizer step, then the EMA update: once per step that really changed the
        weights, so not per accumulated micro-batch (Lightning calls this once per step),
        and not after a step the fp16 grad scaler skipped (it lowers its scale exactly then)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None else None
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if scaler is None or scaler.get_scale() >= scale:
            self.update_ema()

    @torch.no_grad()
    def update_ema(self):
        """ema ← ema + (1 − decay)(θ − ema), decay = min(ema_decay, (1+n)/(10+n)) with warm-up."""
        n = self._ema_n
        decay = self.hparams.ema_decay
        if self.hparams.ema_warmup:
            decay = min(decay, (1 + n) / (10 + n))
        ema = list(self.ema_unet.parameters())
        torch._foreach_lerp_(ema, list(self.unet.parameters()), 1.0 - decay)
        self._ema_n = n + 1
        self.ema_updates.fill_(n + 1)

    # -------------------------------------------------------------- validation

    def validation_step(self, batch, batch_idx: int):
        """The training terms on held-out images with the eval weights, at t drawn from a
        generator keyed by the batch so every validation sees the same t and ε."""
        x_start, labels = batch
        g = seeded_generator(self.device, self._seed(), self.global_rank, 10**9 + batch_idx)
        t = torch.randint(0, self.diffusion.num_timesteps, (x_start.shape[0],), device=self.device, generator=g)
        noise = torch.randn(x_start.shape, generator=g, device=self.device, dtype=x_start.dtype)
        terms = self.diffusion.training_losses(self.model_fn(self.eval_unet, labels), x_start, t, noise=noise)
        self.val_loss.update(terms["loss"])
        self.val_mse.update(terms["mse"])
        self.val_vb.update(terms["vb"])
        quartile = t * 4 // self.diffusion.num_timesteps  # (B,) in 0..3
        for q, metric in enumerate(self.val_vb_quartiles):
            in_q = quartile == q
            metric.update(terms["vb"], weight=in_q.to(terms["vb"].dtype))
        self.log_dict({"val/loss": self.val_loss, "val/mse": self.val_mse, "val/vb": self.val_vb},
                      prog_bar=False, on_step=False, on_epoch=True, batch_size=x_start.shape[0])
        self.log_dict({f"val/vb_q{q}": m for q, m in enumerate(self.val_vb_quartiles)},
                      on_step=False, on_epoch=True, batch_size=x_start.shape[0])

    # ---------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        sample_steps: str | int | None = None,
        sampler: str = "ddpm",
        eta: float = 0.0,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Images [N, C, H, W] in [-1, 1] from the eval weights.

        ``sample_steps``: None for all T steps, or a respacing (``100``, ``"10,15,25"``,
        ``"ddim50"``); ``sampler``: ``ddpm`` (ancestral, learned variance) or ``ddim`` (``eta``).
        """
        if sampler not in ("ddpm", "ddim"):
            raise ConfigError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        diffusion = self.diffusion if sample_steps is None else self.respaced(sample_steps)
        hp = self.hparams
        if hp.class_cond and labels is None:
            labels = torch.arange(num_samples, device=self.device) % hp.num_classes
        shape = (num_samples, hp.in_channels, hp.image_size, hp.image_size)
        unet = self.eval_unet
        was_training = unet.training
        unet.eval()
        try:
            model = self.model_fn(unet, labels)
            if sampler == "ddim":
                return diffusion.ddim_sample_loop(model, shape, eta=eta, generator=generator,
                                                  progress=progress, device=self.device)
            return diffusion.p_sample_loop(model, shape, generator=generator, progress=progress, device=self.device)
        finally:
            unet.train(was_training)

    def predict_dataloader(self):
        """The sample indices 0..N-1 in batches; ``self.sampling`` (installed by the
        ``predict`` settings callback) says how many and how to sample them."""
        s = self.sampling
        return torch.utils.data.DataLoader(torch.arange(s.num_samples), batch_size=s.batch_size)

    def predict_step(self, indices: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        """Samples for ``indices`` [b]: uint8 images [b, H, W, C] rounded to the 256 levels."""
        s = self.sampling
        g = seeded_generator(self.device, s.seed, int(indices[0]))
        labels = indices % self.hparams.num_classes if self.hparams.class_cond else None
        x = self.sample(len(indices), s.sample_steps, s.sampler, s.eta, labels=labels, generator=g,
                        progress=self.trainer.is_global_zero and self.trainer.progress_bar_callback is not None)
        images = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # (b, H, W, C)
        return {"index": indices, "image": images,
                "label": labels if labels is not None else torch.zeros_like(indices)}

    def respaced(self, sample_steps: str | int) -> GaussianDiffusion:
        """The diffusion respaced to ``sample_steps`` (cached: respacing T = 4000 costs a few ms)."""
        cache = self.__dict__.setdefault("_respaced", {})
        key = str(sample_steps)
        if key not in cache:
            try:
                cache[key] = self.diffusion.respace(sample_steps)
            except ValueError as e:
                raise ConfigError(f"sample_steps: {e}") from None
        return cache[key].to(self.device)

    # -------------------------------------------------------------------- test

    def on_test_epoch_start(self):
        T = self.diffusion.num_timesteps
        self._vb_sum = torch.zeros(T, dtype=torch.float64, device=self.device)
        self._mse_sum = torch.zeros(T, dtype=torch.float64, device=self.device)
        self._count = torch.zeros((), dtype=torch.float64, device=self.device)

    def test_step(self, batch, batch_idx: int):
        """Exact bits/dim: ``calc_bpd_loop`` over all T steps with the eval weights."""
        x_start, labels = batch
        g = seeded_generator(self.device, self._seed(), self.global_rank, 2 * 10**9 + batch_idx)
        progress = self.trainer.is_global_zero and self.trainer.progress_bar_callback is not None
        # Bits/dim are evaluated in float32 whatever trainer.precision: a reported likelihood
        # must not depend on the precision a run happened to train in.
        with torch.autocast(self.device.type, enabled=False):
            out = self.diffusion.calc_bpd_loop(self.model_fn(self.eval_unet, labels), x_start.float(), generator=g,
                                               progress=progress, max_batch=self.hparams.bpd_batch_size)
        B = x_start.shape[0]
        self.test_bpd.update(out["total_bpd"])
        self.test_prior_bpd.update(out["prior_bpd"])
        self.test_decoder_bpd.update(out["vb"][:, 0])
        self.test_kl_bpd.update(out["vb"][:, 1:].sum(dim=1))
        self._vb_sum += out["vb"].sum(dim=0).double()
        self._mse_sum += out["mse"].sum(dim=0).double()
        self._count += B
        self.log_dict({"test/bpd": self.test_bpd, "test/prior_bpd": self.test_prior_bpd,
                       "test/decoder_bpd": self.test_decoder_bpd, "test/kl_bpd": self.test_kl_bpd},
                      on_step=False, on_epoch=True, batch_size=B)

    def on_test_epoch_end(self):
        vb_sum = self.trainer.strategy.reduce(self._vb_sum, reduce_op="sum")
        mse_sum = self.trainer.strategy.reduce(self._mse_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._count, reduce_op="sum")
        summary = {name: float(metric.compute()) for name, metric in [
            ("bpd", self.test_bpd), ("prior_bpd", self.test_prior_bpd),
            ("decoder_bpd", self.test_decoder_bpd), ("kl_bpd", self.test_kl_bpd)]}
        if self.trainer.is_global_zero and count > 0:
            summary["num_images"] = int(count)
            self.save_test_results(summary, (vb_sum / count).cpu().numpy(), (mse_sum / count).cpu().numpy())

    def save_test_results(self, summary: dict, vb: np.ndarray, mse: np.ndarray):
        """Write ``test/bpd.json`` (the breakdown) and the per-timestep mean L_t (bits/dim)
        as ``test/vb_curve.{npz,png}`` in the run directory."""
        # default_root_dir is the run directory; trainer.log_dir would broadcast, and this runs on rank 0 only.
        out_dir = Path(self.trainer.default_root_dir) / "test"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bpd.json").write_text(json.dumps(summary, indent=2) + "\n")
        count = summary["num_images"]
        np.savez(out_dir / "vb_curve.npz", vb=vb, mse=mse, num_images=count)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(np.arange(len(vb)), vb)
        ax.set(yscale="log", xlabel="timestep t", ylabel="mean $L_t$ (bits/dim)",
               title=f"VLB terms, {count} test images, total {vb.sum():.4f} bits/dim + prior")
        fig.tight_layout()
        fig.savefig(out_dir / "vb_curve.png", dpi=120)
        plt.close(fig)
        print(f"Test bits/dim {summary['bpd']:.4f} over {count} images: breakdown in {out_dir / 'bpd.json'}, "
              f"per-timestep curve in {out_dir / 'vb_curve.png'} and vb_curve.npz")
