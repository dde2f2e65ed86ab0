"""The gradient's global 2-norm at every optimizer step, for measuring how noisy an objective is."""

from __future__ import annotations

from lightning.pytorch import Callback
from lightning.pytorch.utilities import grad_norm


class GradNorm(Callback):
    """Logs ``train/grad_norm`` = ‖∇_θ loss‖₂ over all trained parameters (Lightning's ``grad_norm``),
    once per optimizer step: after gradient accumulation, after DDP's all-reduce and after the AMP
    unscale (Lightning calls ``on_before_optimizer_step`` there), before any clipping."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        norms = grad_norm(pl_module, norm_type=2)
        if norms:
            pl_module.log("train/grad_norm", norms["grad_2.0_norm_total"], on_step=True, on_epoch=False)
