"""Stop before a NaN or inf is applied: a non-finite loss or gradient never reaches the weights,
their EMA or a checkpoint. The CLI adds this callback to every ``fit``."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ..errors import NonFiniteLossError


class NonFiniteGuard(Callback):
    """Refuse to apply an optimizer step in which any micro-batch's loss, on any rank, or the
    (all-reduced) gradient is not finite, raising ``NonFiniteLossError`` on every rank with the
    same sentence; the weights, the EMA and every checkpoint stay those of the last good step.

    Each micro-batch's loss is noted on the device (no sync) in ``on_before_backward``; the
    decision, in ``on_before_optimizer_step``, costs one small ``all_gather`` and one host sync
    per optimizer step. Under fp16's GradScaler only the loss is checked: the scaler skips steps
    with inf gradients itself.
    """

    def __init__(self) -> None:
        self._micro, self._first_bad = 0, None  # micro-batches of this step, the first non-finite one

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach())
        self._first_bad = torch.where(bad & (self._first_bad < 0), self._micro, self._first_bad)
        self._micro += 1

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        micro, first_bad = self._micro, self._first_bad
        self._micro, self._first_bad = 0, None
        if first_bad is None:  # no backward this step (nothing to check)
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        bad_grad = (scaler is None and bool(grads)) and ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        local = torch.stack([first_bad, torch.as_tensor(bad_grad, dtype=torch.long, device=first_bad.device)])
        flags = trainer.strategy.all_gather(local).reshape(-1, 2).tolist()  # [[first_bad, bad_grad]] per rank
        bad_loss = [(rank, m) for rank, (m, _) in enumerate(flags) if m >= 0]
        if not bad_loss and not any(g for _, g in flags):
            return
        where = "; ".join(f"rank {rank}, micro-batch {m + 1} of {micro}" for rank, m in bad_loss)
        step = trainer.global_step
        what = f"the training loss is not finite in optimizer step {step + 1} ({where})" if bad_loss else \
            f"the gradients are not finite in optimizer step {step + 1}"
        raise NonFiniteLossError(
            f"{what}; no rank applied it, so the weights and the last checkpoint are those of step {step}. "
            f"Likely causes: a learning rate too high (model.lr), exploding gradients (set "
            f"trainer.gradient_clip_val), or fp16 overflow (use bf16-mixed or 32-true)"
        )
