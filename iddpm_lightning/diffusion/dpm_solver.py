"""DPM-Solver++ (Lu et al. 2022) on our model, through diffusers' ``DPMSolverMultistepScheduler``.

The solver is diffusers'; this file only configures it like our diffusion and runs its loop:

- the schedule is our β_t, given as ``trained_betas`` (diffusers keeps them in float32);
- ε-prediction; a learned-range model's second half of the channels (v, the variance) is
  dropped here (diffusers' own ``variance_type="learned_range"`` keeps the first 3 channels,
  whatever the image's): the solver integrates the probability-flow ODE, which needs only ε;
- x̂_0 is clipped to [−1, 1] as our ancestral and DDIM samplers clip it (diffusers'
  ``thresholding`` with ``sample_max_value=1``: the dynamic threshold clamped to 1 is the
  static clip);
- for the cosine schedule, diffusers' λ_t = ½ log(ᾱ_t / (1 − ᾱ_t)) is clipped at −5.1 as it
  recommends: the chain starts where ᾱ_t ≈ 4e-5 (t = 995 of 1000) rather than at the capped
  β_T = 0.999, where λ is extreme;
- ``lower_order_final`` (diffusers' default): the last steps drop to first order, which keeps
  chains of fewer than 15 steps stable.

It is meant for 10-25 steps (the paper of DPM-Solver++ reports converged samples at 15-20
steps for pixel models); at 100 and more, the ancestral sampler with the learned variance
is as good and exact in the limit.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

# λ_min for the cosine schedule (diffusers' documented value for squaredcos_cap_v2).
COSINE_LAMBDA_MIN = -5.1


def dpm_solver_scheduler(betas: torch.Tensor, order: int = 2, lambda_min: float = -float("inf"),
                         clip_denoised: bool = True):
    """diffusers' ``DPMSolverMultistepScheduler`` (DPM-Solver++ of ``order``) for our β [T],
    starting where λ_t ≥ ``lambda_min``."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=len(betas),
        trained_betas=betas.double().cpu().tolist(),
        solver_order=order,
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        thresholding=clip_denoised,
        sample_max_value=1.0,
        lambda_min_clipped=lambda_min,
    )


def dpm_solver_timesteps(betas: torch.Tensor, steps: int, lambda_min: float = -float("inf")) -> torch.Tensor:
    """The original timesteps [steps] the solver visits; a ValueError if ``steps`` is too many for the
    schedule (diffusers rounds a linspace, so near T steps repeat and a step of size 0 divides by 0)."""
    timesteps = _timesteps(betas, steps, lambda_min)
    _require_distinct(timesteps, betas, lambda_min)
    return timesteps


def _timesteps(betas: torch.Tensor, steps: int, lambda_min: float) -> torch.Tensor:
    scheduler = dpm_solver_scheduler(betas, 2, lambda_min)
    scheduler.set_timesteps(steps, device="cpu")
    return scheduler.timesteps


def _require_distinct(timesteps: torch.Tensor, betas: torch.Tensor, lambda_min: float) -> None:
    steps = len(timesteps)
    if len(torch.unique(timesteps)) != steps:
        most = next(n for n in range(steps - 1, 0, -1) if len(torch.unique(_timesteps(betas, n, lambda_min))) == n)
        raise ValueError(f"{steps} DPM-Solver steps repeat timesteps of this T={len(betas)} schedule: at most {most}")


@torch.no_grad()
def dpm_solver_sample_loop(
    model,
    betas: torch.Tensor,
    shape: tuple[int, ...],
    steps: int,
    order: int = 2,
    lambda_min: float = -float("inf"),
    clip_denoised: bool = True,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """x_0 [*shape] from x_T ~ N(0, I) (or ``noise``) in ``steps`` DPM-Solver++ steps.

    ``model(x_t, t)`` takes ORIGINAL timesteps t in 0..T-1 [B] and returns ε [B, C, H, W]
    (or [B, 2C, H, W] with the variance, which is ignored). Deterministic given x_T. Give
    ``lambda_min=COSINE_LAMBDA_MIN`` for the cosine schedule.
    """
    scheduler = dpm_solver_scheduler(betas, order, lambda_min, clip_denoised)
    device = device if device is not None else betas.device
    scheduler.set_timesteps(steps, device=device)
    _require_distinct(scheduler.timesteps.cpu(), betas, lambda_min)  # refuses a count whose steps would repeat
    x = noise.to(device) if noise is not None else torch.randn(*shape, generator=generator, device=device)
    x = x * scheduler.init_noise_sigma  # (B, C, H, W)
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
        t_batch = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
        eps = model(x, t_batch)[:, : x.shape[1]].to(x.dtype)  # (B, C, H, W): ε, without v
        x = scheduler.step(eps, t, x).prev_sample
    return x
