"""Timestep samplers: which t each training example gets, and its loss weight.

A sampler returns ``(t, weights)`` with E[weights · L_t] = (1/T) Σ_t L_t, so that the
weighted loss stays an unbiased estimate of the uniform-t objective.
"""

from __future__ import annotations

import torch


class UniformSampler:
    """t ~ U{0, ..., T-1}, every weight 1."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def sample(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [B] long, weights [B] float32) on ``device``."""
        t = torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)
        return t, torch.ones(batch_size, device=device)

