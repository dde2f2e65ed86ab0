"""The gradient's global 2-norm at every optimizer step, for measuring how noisy an objective is."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback


class GradNorm(Callback):
    """Logs ``train/grad_norm`` = ‖∇_θ loss‖₂ over all trained parameters, once per optimizer
    step: after gradient accumulation, after DDP's all-reduce and after the AMP unscale
    (Lightning calls ``on_before_optimizer_step`` there), before any clipping."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # (,)
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
