"""One hybrid training step: the project's Lightning path vs a plain PyTorch loop.

Both train the same UNet (same initial weights) on the same data at the same batch size:

* iddpm_lightning: ``Trainer.fit`` of the ``IDDPM`` module with the ``ImportanceSampling``
  callback, the EMA, keyed generators, the non-finite check, TensorBoard logging every
  ``log_every_n_steps`` and the learning-rate monitor (no progress bar, no validation or
  checkpoint inside the timed window).
* plain loop: a hand-written loop over a ``DataLoader``: uniform t, ``training_losses``,
  backward, AdamW step and the same EMA update (``torch._foreach_lerp_``).

A step's time is the interval between the ends of consecutive steps (data loading,
logging and callbacks included); the first ``--skip`` steps of each round are dropped.
Rounds alternate between the two. Also reports peak memory (RSS; GPU allocated) and, on
a GPU, model FLOP utilisation against the chip's bf16 dense peak (``--peak-tflops``).

    python benchmarks/train_step.py [--config configs/digits.yaml] [--rounds 5] [--steps 25]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from common import build_model, images, peak_rss_gb, report, sync
from iddpm_lightning.callbacks import ImportanceSampling, NonFiniteGuard
from iddpm_lightning.data import DigitsDataModule


class StepClock(Callback):
    """Times the start of the first training step and the end of every step."""

    def __init__(self):
        self.start: float | None = None
        self.ends: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None:
            sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync(pl_module.device)
        self.ends.append(time.perf_counter())

    def step_times(self) -> list[float]:
        """Seconds of every step but the first (end to end: loading, logging and callbacks included)."""
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def fit_steps(model, loader, steps: int, precision: str = "32-true", accelerator: str = "cpu") -> StepClock:
    """``steps`` steps of ``Trainer.fit`` and nothing else (no validation, checkpoint, logger or
    progress bar); the clock of those steps."""
    clock = StepClock()
    with tempfile.TemporaryDirectory() as root:
        Trainer(max_steps=steps, accelerator=accelerator, devices=1, precision=precision, callbacks=[clock],
                logger=False, default_root_dir=root, limit_val_batches=0, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False).fit(model, loader)
    return clock


def lightning_round(model, loader, steps: int, precision: str, accelerator: str, log_dir: str) -> list[float]:
    clock = StepClock()
    trainer = Trainer(max_steps=steps, accelerator=accelerator, devices=1, precision=precision,
                      callbacks=[ImportanceSampling(), NonFiniteGuard(), clock],  # the guard: as the CLI adds it
                      logger=TensorBoardLogger(log_dir, name="", version=""),
                      log_every_n_steps=10, limit_val_batches=0, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=loader)
    return clock.step_times()


def plain_round(model, loader, steps: int, precision: str, device: torch.device) -> list[float]:
    """The loop a researcher would write by hand around the same UNet and diffusion."""
    unet, ema, diffusion = model.unet.to(device).train(), model.ema_unet.to(device), model.diffusion.to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=model.hparams.lr, weight_decay=model.hparams.weight_decay)
    ema_params, params = list(ema.parameters()), list(unet.parameters())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    ends, step = [], 0
    while step < steps:
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
            with autocast:
                loss = diffusion.training_losses(lambda x_t, t_: unet(x_t, t_).sample, x, t)["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - model.hparams.ema_decay)
            sync(device)
            ends.append(time.perf_counter())
            step += 1
            if step == steps:
                break
    return [b - a for a, b in zip(ends, ends[1:])]


def floor_round(model, loader, steps: int, precision: str, device: torch.device) -> list[float]:
    """Only the UNet's forward and backward and the AdamW step, on the same batches: the
    floor under any training loop (what the diffusion loss, sampling t, the EMA and the
    framework add shows as the gap to it)."""
    unet = model.unet.to(device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=model.hparams.lr)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    t = torch.zeros(loader.batch_size, dtype=torch.long, device=device)
    ends = []
    while len(ends) < steps:
        for x, _ in loader:
            with autocast:
                loss = unet(x.to(device, non_blocking=True), t).sample.float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync(device)
            ends.append(time.perf_counter())
            if len(ends) == steps:
                break
    return [b - a for a, b in zip(ends, ends[1:])]


def step_flops(model, x: torch.Tensor) -> int:
    """FLOPs of one forward + backward of the UNet at this batch (convolutions, matmuls)."""
    unet = model.unet
    t = torch.randint(0, model.diffusion.num_timesteps, (x.shape[0],), device=x.device)
    with FlopCounterMode(display=False) as counter:
        unet(x, t).sample.square().mean().backward()
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25, help="steps per round")
    parser.add_argument("--skip", type=int, default=5, help="steps dropped at the start of each round")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200: 989)")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = "gpu" if device.type == "cuda" else "cpu"

    model = build_model(args.config)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    if (model.hparams.image_size, model.hparams.in_channels) == (8, 1):
        dm = DigitsDataModule(batch_size=args.batch_size)
        dm.setup("fit")
        dataset, data = dm.train_set, "digits (train split)"
    else:
        n = 4 * args.batch_size
        dataset, data = TensorDataset(images(model, n, torch.device("cpu")), torch.zeros(n, dtype=torch.long)), "random 8-bit images"
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        pin_memory=device.type == "cuda")
    flops = step_flops(model.to(device), images(model, args.batch_size, device).float())

    times = {"plain loop": [], "iddpm_lightning": [], "UNet fwd+bwd+AdamW only": []}
    with tempfile.TemporaryDirectory() as log_dir:
        for r in range(args.rounds):
            for name in list(times) if r % 2 == 0 else list(times)[::-1]:  # neither always first
                model.load_state_dict(initial)  # every round starts from the same weights
                if name == "plain loop":
                    dts = plain_round(model, loader, args.steps, args.precision, device)
                elif name == "iddpm_lightning":
                    dts = lightning_round(model, loader, args.steps, args.precision, accelerator, log_dir)
                else:
                    dts = floor_round(model, loader, args.steps, args.precision, device)
                times[name].append(statistics.mean(dts[args.skip:]))

    hp = model.hparams
    med = {k: statistics.median(v) for k, v in times.items()}
    extra = {
        "ratio_lightning_over_plain": med["iddpm_lightning"] / med["plain loop"],
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "step_gflops": flops / 1e9,
        "achieved_tflops": {k: flops / m / 1e12 for k, m in med.items()},
    }
    if device.type == "cuda":
        extra["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        extra["mfu_vs_bf16_peak"] = {k: flops / m / 1e12 / args.peak_tflops for k, m in med.items()}
    config = {"config": args.config, "batch_size": args.batch_size, "precision": args.precision,
              "image": [hp.in_channels, hp.image_size, hp.image_size], "data": data, "rounds": args.rounds,
              "steps_per_round": args.steps, "skipped": args.skip, "device": str(device),
              "parameters": sum(p.numel() for p in model.unet.parameters())}
    print(f"{config['parameters'] / 1e6:.1f}M-parameter UNet, batch {args.batch_size} of "
          f"{hp.in_channels}x{hp.image_size}x{hp.image_size} ({data}), {args.precision}, {device}; "
          f"seconds per step, mean of steps {args.skip + 1}..{args.steps - 1} of each round, median of rounds")
    name = "train_step" + ("" if args.config.endswith("digits.yaml") else "_" + args.config.rsplit("/", 1)[-1][:-5])
    report(name, config, times, "plain loop", extra, args.out)


if __name__ == "__main__":
    main()
