"""Importance-sampled L_vlb (§3.3): a Callback that keeps the loss history of every
timestep, identical on every rank, and samples t from it.

Per step the module draws ``(t, weights)`` from its own ``timesteps`` distribution; after the
step this callback gathers every rank's ``timesteps`` and unweighted ``losses`` (the step's
outputs) with ONE ``all_gather``, appends them, in rank order, to the history, and hands the
new p_t to the module's distribution (``set_probs``). Every rank applies the same update to the
same data, so all ranks hold the same distribution.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from ..diffusion.timesteps import LossSecondMoment
from ..errors import ConfigError
from ..settings import ClosedUnitInterval, NonNegativeInt, PositiveInt, check_args


class ImportanceSampling(Callback):
    """Sample t with p_t ∝ √E[L_t²] (the paper's eq. 18) and weight each loss by 1/(T p_t).

    Made for ``loss_type: vlb``, whose terms differ by orders of magnitude across t. It also
    runs with ``hybrid`` (the paper found it no help there: the L_simple part dominates).

    Args:
        history_per_term: Losses kept per timestep for the estimate of E[L_t²].
        uniform_prob: Share of the uniform distribution mixed into p_t, in [0, 1].
        plot_every_n_steps: Also plot p_t to TensorBoard every this many steps (0: only
            after each validation).
    """

    def __init__(
        self,
        history_per_term: PositiveInt = 10,
        uniform_prob: ClosedUnitInterval = 0.001,
        plot_every_n_steps: NonNegativeInt = 0,
    ):
        check_args("ImportanceSampling ", ImportanceSampling.__init__, locals())
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self.plot_every_n_steps = plot_every_n_steps
        self.history: LossSecondMoment | None = None
        self._pending_state: dict | None = None

    # -------------------------------------------------------- the distribution

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.history is None:
            T = pl_module.diffusion.num_timesteps
            self.history = LossSecondMoment(T, self.history_per_term, self.uniform_prob)
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None
        pl_module.timestep_distribution.set_probs(self.history.probs())  # uniform until every t has its history

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The history lives where the losses are (restored from a checkpoint on the CPU): updates need no sync.
        self.history.to(pl_module.device)
        pl_module.timestep_distribution.set_probs(self.history.probs())

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pl_module.timestep_distribution.set_probs(None)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int):
        t, losses = outputs["timesteps"], outputs["losses"]
        capacity = self._capacity(trainer, len(t))
        # One row per example, padded to the loader's batch size with t = -1 so that ranks
        # with a shorter batch gather the same shape: (capacity, 2) float64 [t, loss].
        local = torch.full((capacity, 2), -1.0, dtype=torch.float64, device=t.device)
        local[: len(t), 0] = t.to(torch.float64)
        local[: len(t), 1] = losses.to(torch.float64)
        gathered = trainer.strategy.all_gather(local).reshape(-1, 2)  # (world · capacity, 2), rank-major
        valid = gathered[:, 0] >= 0
        self.history.update(gathered[valid, 0].long(), gathered[valid, 1])
        pl_module.timestep_distribution.set_probs(self.history.probs())
        self._log(pl_module)
        if self.plot_every_n_steps and trainer.global_step % self.plot_every_n_steps == 0:
            self._plot(trainer)

    @staticmethod
    def _capacity(trainer: Trainer, batch_size: int) -> int:
        """Largest per-rank batch: the train loader's batch_size (the same on every rank)."""
        loader = trainer.train_dataloader
        capacity = getattr(loader, "batch_size", None)
        if capacity is None or batch_size > capacity:
            raise ConfigError(
                "ImportanceSampling needs a training DataLoader with a fixed batch_size (it pads every "
                "rank's batch to it before the all_gather); build the loader with batch_size=..."
            )
        return capacity

    # ------------------------------------------------------------------ logging

    def _log(self, pl_module: LightningModule) -> None:
        r = self.history
        p = r.probs()
        entropy = -(p * p.log()).sum()
        pl_module.log_dict({
            "importance/warmed_up_fraction": (r.loss_counts == r.history_per_term).double().mean(),
            "importance/effective_timesteps": entropy.exp(),  # T when uniform
            "importance/max_weight": 1.0 / (r.num_timesteps * p.min()),
        }, on_step=True, on_epoch=False)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.history is not None and not trainer.sanity_checking:
            self._plot(trainer)

    @rank_zero_only
    def _plot(self, trainer: Trainer) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        p = self.history.probs().cpu().numpy()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(p)
        ax.set(yscale="log", xlabel="timestep t", ylabel="$p_t$",
               title=f"importance sampling, step {trainer.global_step}")
        fig.tight_layout()
        for logger in loggers:
            logger.experiment.add_figure("importance/p_t", fig, trainer.global_step)
        plt.close(fig)

    # ------------------------------------------------------------- checkpoints

    @property
    def state_key(self) -> str:
        return "ImportanceSampler"  # its name before the rename: older checkpoints resume with their history

    def state_dict(self) -> dict:
        r = self.history
        if r is None:
            return {}
        return {"num_timesteps": r.num_timesteps, "history_per_term": r.history_per_term,
                "loss_history": r.loss_history.cpu(), "loss_counts": r.loss_counts.cpu()}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self.history is None:  # loaded before setup: restore there
            self._pending_state = state_dict
        else:
            self._restore(state_dict)

    def _restore(self, state: dict) -> None:
        r = self.history
        if state["num_timesteps"] != r.num_timesteps or state["history_per_term"] != r.history_per_term:
            raise ConfigError(
                f"the checkpoint's ImportanceSampling history has T = {state['num_timesteps']} and "
                f"{state['history_per_term']} losses per timestep, but this run has T = {r.num_timesteps} and "
                f"{r.history_per_term}; resume with the settings the checkpoint was trained with"
            )
        r.load(state["loss_history"], state["loss_counts"])

