"""Timestep distributions: which t each training example gets, and its loss weight.

A distribution draws ``(t, weights)`` with E[weights · L_t] = (1/T) Σ_t L_t, so that the
weighted loss stays an unbiased estimate of the uniform-t objective.
"""

from __future__ import annotations

import torch


class UniformTimesteps:
    """t ~ U{0, ..., T-1}, every weight 1."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def draw(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [B] long, weights [B] float32) on ``device``."""
        t = torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)
        return t, torch.ones(batch_size, device=device)


class TimestepDistribution(UniformTimesteps):
    """The training step's distribution of t: uniform (exactly ``UniformTimesteps``) until it is given
    a distribution p_t with ``set_probs``, then t ~ p_t with weight 1 / (T p_t).

    The module owns it and only asks it for ``(t, weights)``; a callback that learns p_t
    (``ImportanceSampling``) hands each new distribution to it, and ``set_probs(None)`` returns to
    uniform. It holds no state worth saving: whoever computes p_t checkpoints what p_t comes from.
    """

    def __init__(self, num_timesteps: int):
        super().__init__(num_timesteps)
        self.probs: torch.Tensor | None = None  # [T] float64, or None for uniform

    def set_probs(self, probs: torch.Tensor | None) -> None:
        if probs is not None and probs.shape != (self.num_timesteps,):
            raise ValueError(f"p_t has shape {tuple(probs.shape)}, not ({self.num_timesteps},)")
        self.probs = probs

    def draw(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [B] long, weights [B] float32) on ``device``."""
        if self.probs is None:
            return super().draw(batch_size, device, generator)
        return draw_timesteps(self.probs.to(device), batch_size, generator)


def draw_timesteps(p: torch.Tensor, batch_size: int, generator: torch.Generator | None = None):
    """t ~ p (p [T] float64) with weights 1 / (T p_t): (t [B] long, weights [B] float32)."""
    t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
    weights = 1.0 / (len(p) * p[t])
    return t, weights.float()


class LossSecondMoment:
    """The loss-second-moment distribution of t for L_vlb (the paper's importance sampling, eq. 18, §3.3).

    p_t ∝ √E[L_t²], estimated from the newest ``history_per_term`` (H) losses of each
    timestep, mixed with ``uniform_prob`` of the uniform distribution; uniform until every
    timestep has H losses. A draw of t gets weight 1 / (T p_t), so that
    E_t~p[w_t L_t] = (1/T) Σ_t L_t: the objective stays unbiased.

    The losses of timestep t live in a ring buffer (row t of ``_ring``, [T + 1, H] float64;
    row T is scratch) whose next slot is ``_written[t] % H``; ``_sumsq`` [T] holds Σ L² of
    each row. An update touches only the rows it writes, with a fixed number of tensor
    operations and no host synchronisation, so the state can live on the GPU.
    ``loss_history`` [T, H] (oldest first, newest last) and ``loss_counts`` [T] are the
    paper's view of the same state, used for checkpoints.
    """

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.num_timesteps = num_timesteps
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self.load(torch.zeros(num_timesteps, history_per_term, dtype=torch.float64),
                  torch.zeros(num_timesteps, dtype=torch.long))

    def to(self, device: torch.device | str) -> "LossSecondMoment":
        self._ring, self._written, self._sumsq = (x.to(device) for x in (self._ring, self._written, self._sumsq))
        return self

    @property
    def loss_counts(self) -> torch.Tensor:
        """Losses held per timestep, [T] long, at most H."""
        return self._written.clamp(max=self.history_per_term)

    @property
    def loss_history(self) -> torch.Tensor:
        """The held losses, [T, H] float64, oldest first and newest last (zeros if not yet held)."""
        H = self.history_per_term
        oldest = torch.where(self._written >= H, self._written % H, 0)  # (T,)
        index = (oldest[:, None] + torch.arange(H, device=oldest.device)) % H  # (T, H)
        return self._ring[: self.num_timesteps].gather(1, index)

    def load(self, loss_history: torch.Tensor, loss_counts: torch.Tensor) -> None:
        """Set the state from the paper's view (oldest first, ``loss_counts`` filled)."""
        T, H = self.num_timesteps, self.history_per_term
        device = loss_history.device
        self._ring = torch.cat([loss_history.to(torch.float64), torch.zeros(1, H, dtype=torch.float64, device=device)])
        self._written = loss_counts.to(device=device, dtype=torch.long).clone()
        self._sumsq = self._ring[:T].square().sum(dim=1)

    def warmed_up(self) -> torch.Tensor:
        """A 0-dim bool tensor: every timestep holds H losses."""
        return (self._written >= self.history_per_term).all()

    def probs(self) -> torch.Tensor:
        """p_t, [T] float64: (1 − u) √E[L_t²] / Σ_s √E[L_s²] + u / T once warmed up, else 1/T."""
        T = self.num_timesteps
        rms = (self._sumsq / self.history_per_term).sqrt()  # (T,)
        total = rms.sum()
        p = rms / total * (1 - self.uniform_prob) + self.uniform_prob / T
        use = self.warmed_up() & (total > 0)
        return torch.where(use, p, torch.full_like(p, 1.0 / T))

    def draw(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [B] long, weights [B] float32 = 1 / (T p_t)) on ``device``."""
        return draw_timesteps(self.to(device).probs(), batch_size, generator)

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Append ``losses`` [N] at ``timesteps`` [N] to the histories, in order.

        Equal to the paper's per-element loop (for each pair, in order, append to the
        history of t and keep its newest H), vectorized: a loss that is the k-th of the n
        new losses of t goes to ring slot (written_t + k) mod H, unless k < n − H (a newer
        loss of the same update overwrites it: it goes to the scratch row instead).
        """
        T, H = self.num_timesteps, self.history_per_term
        device = self._ring.device
        t, order = torch.sort(timesteps.to(device=device, dtype=torch.long), stable=True)  # group by t, in order
        losses = losses.to(device=device, dtype=torch.float64)[order]
        # New losses per timestep; index_add_ rather than bincount, which syncs on a GPU.
        n_new = torch.zeros(T, dtype=torch.long, device=device).index_add_(0, t, torch.ones_like(t))  # (T,)
        first, n_t, written_t = torch.stack([torch.cumsum(n_new, 0) - n_new, n_new, self._written], 1)[t].unbind(1)
        rank = torch.arange(len(t), device=device) - first  # k: place among the new losses of its t
        row = torch.where(rank >= n_t - H, t, T)  # overwritten within this update -> scratch row
        self._ring[row, (written_t + rank) % H] = losses
        self._written += n_new
        self._sumsq[t] = self._ring[t].square().sum(dim=1)  # only the rows written; (N, H) -> (N,)
