"""The ``test`` report: the bits/dim and its breakdown (exact), or its standard error (stratified),
written to ``{run_dir}/test/``. The CLI adds this callback to every ``test``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

_SUMS = ("total_bpd", "prior_bpd", "decoder_bpd", "kl_bpd", "variance")


class BpdReport(Callback):
    """Sums ``test_step``'s output over every image of every rank (float64) and writes, on rank 0:

    - exact (``calc_bpd_loop``): ``test/bpd.json``: ``bpd`` = mean of L_T + Σ_t L_t, and its parts
      ``prior_bpd`` (L_T), ``decoder_bpd`` (L_0) and ``kl_bpd`` (Σ_{t≥1} L_t), with ``num_images``;
      ``test/vb_curve.npz`` (``vb``, ``mse``: the per-timestep means [T], ``num_images``) and
      ``test/vb_curve.png`` (mean L_t against t, as the paper's Fig. 2);
    - stratified (``model.test_strata``): ``test/bpd.json``: ``bpd``, ``prior_bpd`` and ``bpd_se`` =
      √(Σ variance) / N, the Monte-Carlo standard error of the mean (as ``BitsPerDim``'s).
    """

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        T = pl_module.diffusion.num_timesteps
        self._sums = torch.zeros(len(_SUMS) + 1, dtype=torch.float64, device=pl_module.device)  # ..., count
        self._vb = torch.zeros(T, dtype=torch.float64, device=pl_module.device)
        self._mse = torch.zeros(T, dtype=torch.float64, device=pl_module.device)
        self._stratified = bool(getattr(pl_module, "test_strata", None))

    def on_test_batch_end(self, trainer, pl_module, outputs: dict, batch, batch_idx: int, dataloader_idx: int = 0):
        total = outputs["total_bpd"].double()  # (B,)
        vb = outputs["vb"].double() if "vb" in outputs else total.new_zeros(len(total), len(self._vb))  # (B, T)
        variance = outputs["variance"].double() if "variance" in outputs else torch.zeros_like(total)
        parts = [total, outputs["prior_bpd"].double(), vb[:, 0], vb[:, 1:].sum(dim=1), variance]
        self._sums += torch.stack([*(p.sum() for p in parts), total.new_tensor(len(total))])
        self._vb += vb.sum(dim=0)
        if "mse" in outputs:
            self._mse += outputs["mse"].double().sum(dim=0)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # ONE collective: every sum over the ranks (each test image lives on one rank).
        T = len(self._vb)
        total = trainer.strategy.reduce(torch.cat([self._sums, self._vb, self._mse]), reduce_op="sum")
        sums, vb, mse = total[: len(_SUMS) + 1], total[len(_SUMS) + 1 : -T], total[-T:]
        count = int(sums[-1])
        if not trainer.is_global_zero or count == 0:
            return
        mean = {name.replace("total_", ""): float(s / count) for name, s in zip(_SUMS, sums)}
        # default_root_dir is the run directory; trainer.log_dir would broadcast, and this is rank 0 only.
        out_dir = Path(trainer.default_root_dir) / "test"
        out_dir.mkdir(parents=True, exist_ok=True)
        if self._stratified:
            summary = {"bpd": mean["bpd"], "bpd_se": math.sqrt(float(sums[4])) / count, "prior_bpd": mean["prior_bpd"],
                       "num_images": count, "estimate": f"stratified, {pl_module.test_strata} strata "
                                                        f"({2 * pl_module.test_strata} model calls an image)"}
            (out_dir / "bpd.json").write_text(json.dumps(summary, indent=2) + "\n")
            print(f"Test bits/dim {summary['bpd']:.4f} ± {summary['bpd_se']:.4f} (stratified) over {count} images: "
                  f"{out_dir / 'bpd.json'}")
        else:
            summary = {k: mean[k] for k in ("bpd", "prior_bpd", "decoder_bpd", "kl_bpd")} | {"num_images": count}
            self.write(out_dir, summary, (vb / count).cpu().numpy(), (mse / count).cpu().numpy())

    @staticmethod
    def write(out_dir: Path, summary: dict, vb: np.ndarray, mse: np.ndarray) -> None:
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
