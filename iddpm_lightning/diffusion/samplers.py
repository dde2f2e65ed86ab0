"""Image samplers: every one a function of one signature, one table from name to sampler, and one
settings object (``Sampler``) that everything which draws images takes whole.

    sampler(diffusion, model, x_T, settings, generator=None, progress=False) -> x_0      [B, C, H, W]

``x_T`` is the initial noise (give your own to reproduce a figure or to compare two samplers on
one draw); ``generator`` feeds the noise a stochastic sampler adds on the way. ``model(x_t, t)``
is called with ORIGINAL timesteps (``GaussianDiffusion`` maps a respaced diffusion's own).
Each sampler also says which timesteps a step setting visits (``steps``), which refuses what it
cannot meet before any sampling time is spent. To add a sampler: write its two functions here
and add a row to ``SAMPLERS``; predict, the callbacks and the experiments need no change.

| name | what | ``steps`` |
|---|---|---|
| ``ddpm`` | ancestral sampling with the model's (learned) variance (Ho et al. 2020; the paper's §4) | None (all T) or a respacing: ``100``, ``"10,15,25"``, ``"ddim50"`` |
| ``ddim`` | DDIM (Song et al. 2021, eq. 12) with ``eta`` | as ``ddpm`` |
| ``dpm_solver`` | DPM-Solver++ of ``order`` (Lu et al. 2022) through diffusers, ε only | a count, 10-25 |
| ``heun`` | EDM's deterministic 2nd-order Heun on the probability-flow ODE (Karras et al. 2022, Alg. 1) | a count N: 2N − 1 model calls |

Every sampler clips x̂_0 to [−1, 1], as the paper's sampling does (``clip``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..settings import ClosedUnitInterval, SampleSteps, check_args
from .dpm_solver import COSINE_LAMBDA_MIN, dpm_solver_sample_loop, dpm_solver_timesteps
from .gaussian import GaussianDiffusion, Model
from .schedules import space_timesteps

SolverOrder = Literal[1, 2, 3]  # DPM-Solver++'s order (diffusers supports 1 to 3)


# ----------------------------------------------------------------------------- the samplers


def _respaced(diffusion: GaussianDiffusion, steps) -> GaussianDiffusion:
    return diffusion if steps is None else diffusion.respace(steps)


def _respacing(diffusion: GaussianDiffusion, steps) -> list[int]:
    """``ddpm``'s and ``ddim``'s steps: all T, or the respacing ``steps`` (see ``space_timesteps``)."""
    T = diffusion.num_timesteps
    return list(range(T)) if steps is None else space_timesteps(T, steps)


def ancestral(diffusion: GaussianDiffusion, model: Model, x: torch.Tensor, settings: "Sampler",
              generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """x_{t-1} = μ_θ(x_t) + exp(½ log Σ_θ) z over the respaced chain (``GaussianDiffusion.p_sample``):
    with a learned variance, the respaced chain's own Σ_θ (eq. 15 with its β and β̃)."""
    diffusion = _respaced(diffusion, settings.steps)
    return _reverse(diffusion, x, progress,
                    lambda x, t: diffusion.p_sample(model, x, t, settings.clip, generator=generator))


def ddim(diffusion: GaussianDiffusion, model: Model, x: torch.Tensor, settings: "Sampler",
         generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """DDIM over the respaced chain (``GaussianDiffusion.ddim_sample``, η = ``settings.eta``)."""
    diffusion = _respaced(diffusion, settings.steps)
    return _reverse(diffusion, x, progress,
                    lambda x, t: diffusion.ddim_sample(model, x, t, settings.clip, settings.eta, generator=generator))


def _reverse(diffusion: GaussianDiffusion, x: torch.Tensor, progress: bool, step) -> torch.Tensor:
    with torch.inference_mode():
        for i in tqdm(range(diffusion.num_timesteps - 1, -1, -1), desc="sampling", disable=not progress, leave=False):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            x = step(x, t)["sample"]
    return x.clone()  # an ordinary tensor, not an inference one


def lambda_min(diffusion: GaussianDiffusion) -> float:
    """Where the ODE solvers start: λ_t = ½ log(ᾱ_t / (1 − ᾱ_t)) ≥ −5.1 (diffusers' recommended clip)
    when the schedule's last β sits at the 0.999 cap (the cosine schedule: ᾱ_T ≈ 0 and λ_T
    extreme; the chain then starts at t = 995 of 1000), else no clip."""
    return COSINE_LAMBDA_MIN if float(diffusion.betas[-1]) >= 0.999 else -math.inf


def _count(diffusion: GaussianDiffusion, settings: "Sampler") -> int:
    """A solver's step count: a whole number of steps from 1 to T (no respacing)."""
    T, steps = diffusion.num_timesteps, settings.steps
    count = str(steps).strip() if steps is not None else ""
    if not count.isdigit() or not 1 <= int(count) <= T:
        raise ConfigError(f"sampler.steps={steps!r} is not a number of steps for sampler {settings.name}, which spaces "
                          f"its own steps; set steps to a count from 1 to T={T} (it is meant for 10-25)")
    return int(count)


def _solver_steps(diffusion: GaussianDiffusion, settings: "Sampler") -> list[int]:
    if not torch.equal(diffusion.timestep_map.cpu(), torch.arange(diffusion.num_timesteps)):
        raise ConfigError(f"sampler {settings.name} spaces its own steps over the whole schedule: give it the "
                          f"diffusion unrespaced")
    count = _count(diffusion, settings)
    try:
        return dpm_solver_timesteps(diffusion.betas, count, lambda_min(diffusion)).tolist()
    except ValueError as e:
        raise ConfigError(f"sampler.steps={settings.steps!r} for sampler {settings.name}: {e}; set steps to fewer "
                          f"(it is meant for 10-25)") from None


def dpm_solver(diffusion: GaussianDiffusion, model: Model, x: torch.Tensor, settings: "Sampler",
               generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """DPM-Solver++ of ``settings.order`` in ``settings.steps`` steps (``dpm_solver.py``): deterministic
    given x_T; a learned variance is not used."""
    _solver_steps(diffusion, settings)
    return dpm_solver_sample_loop(model, diffusion.betas, tuple(x.shape), _count(diffusion, settings), settings.order,
                                  lambda_min(diffusion), settings.clip, noise=x, progress=progress, device=x.device)


EDM_RHO = 7.0  # Karras et al. 2022, eq. 5: the steps are spaced uniformly in σ^(1/ρ)


def _heun_steps(diffusion: GaussianDiffusion, settings: "Sampler") -> list[int]:
    """N steps t_0 > t_1 > ... > t_{N-1} of this diffusion with σ_t = √(1/ᾱ_t − 1) nearest (in log σ)
    to EDM's σ_i = (σ_max^(1/ρ) + i/(N−1) (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, from σ_max (the last t,
    or where λ_t = −log σ_t reaches ``lambda_min``) down to σ_min = σ_0. Refused if two would coincide."""
    n = _count(diffusion, settings)
    sigmas = diffusion.sqrt_recipm1_alphas_cumprod.double().cpu().numpy()  # (T,) increasing in t
    top = int(np.clip(np.searchsorted(sigmas, math.exp(-lambda_min(diffusion)), side="right") - 1, 0, len(sigmas) - 1))
    steps = _edm_steps(np.log(sigmas[: top + 1]), n)
    if len(set(steps)) < n:
        most = max(m for m in range(1, n) if len(set(_edm_steps(np.log(sigmas[: top + 1]), m))) == m)
        raise ConfigError(f"sampler.steps={settings.steps!r} for sampler {settings.name}: {n} steps would repeat "
                          f"timesteps of this T={diffusion.num_timesteps} schedule; set steps to at most {most}")
    return steps


def _edm_steps(log_sigmas: np.ndarray, n: int) -> list[int]:
    """The n indices whose log σ is nearest to EDM's spacing from the last σ down to the first."""
    ramp = np.linspace(0, 1, n) if n > 1 else np.zeros(1)
    high, low = np.exp(log_sigmas[-1] / EDM_RHO), np.exp(log_sigmas[0] / EDM_RHO)  # σ_max^(1/ρ), σ_min^(1/ρ)
    targets = EDM_RHO * np.log(high + ramp * (low - high))  # (n,) log σ_i
    return [int(np.abs(log_sigmas - target).argmin()) for target in targets]


def heun(diffusion: GaussianDiffusion, model: Model, x: torch.Tensor, settings: "Sampler",
         generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """EDM's deterministic sampler (Karras et al. 2022, Alg. 1, S_churn = 0) on the probability-flow ODE
    of this variance-preserving diffusion, written in EDM's variables x̃ = x / √ᾱ and σ = √(1/ᾱ − 1):

        dx̃/dσ = (x̃ − D(x̃; σ)) / σ,   D = x̂_0 = x̃ − σ ε_θ(√ᾱ x̃, t)   (clipped to [−1, 1]).

    Over ``_heun_steps``' σ_0 > ... > σ_{N−1} and σ_N = 0, each step is Euler's, corrected with the
    trapezoid rule (Heun) except the last, into σ = 0, where x̃ is x̂_0: 2N − 1 model calls.
    Deterministic given x_T, which is taken as x at the first step. Second order: halving the
    step size divides its error by about 4 (``tests/test_samplers.py``)."""
    steps = _heun_steps(diffusion, settings)
    t = lambda i: torch.full((x.shape[0],), steps[i], device=x.device, dtype=torch.long)  # noqa: E731
    sigma = [float(diffusion.sqrt_recipm1_alphas_cumprod[s]) for s in steps] + [0.0]

    def slope(x_tilde: torch.Tensor, i: int) -> torch.Tensor:  # (x̃ − D) / σ at step i
        scale = 1 / math.sqrt(1 + sigma[i] ** 2)  # √ᾱ
        out = diffusion.p_mean_variance(model, x_tilde * scale, t(i), settings.clip)  # x̂_0 from ε_θ
        return (x_tilde - out["pred_xstart"]) / sigma[i]

    with torch.inference_mode():
        x_tilde = x * math.sqrt(1 + sigma[0] ** 2)  # (B, C, H, W): x̃ at σ_0
        for i in tqdm(range(len(steps)), desc="sampling", disable=not progress, leave=False):
            d = slope(x_tilde, i)
            euler = x_tilde + (sigma[i + 1] - sigma[i]) * d
            if sigma[i + 1] == 0:
                x_tilde = euler
            else:
                x_tilde = x_tilde + (sigma[i + 1] - sigma[i]) * (d + slope(euler, i + 1)) / 2
    return x_tilde.clone()


@dataclass(frozen=True)
class SamplerDef:
    """A row of ``SAMPLERS``: the sampling loop and the timesteps a step setting visits (which refuses,
    with a ConfigError, what it cannot meet)."""

    loop: Callable[..., torch.Tensor]
    steps: Callable[[GaussianDiffusion, "Sampler"], list[int]]


SAMPLERS: dict[str, SamplerDef] = {
    "ddpm": SamplerDef(ancestral, lambda diffusion, s: _respacing(diffusion, s.steps)),
    "ddim": SamplerDef(ddim, lambda diffusion, s: _respacing(diffusion, s.steps)),
    "dpm_solver": SamplerDef(dpm_solver, _solver_steps),
    "heun": SamplerDef(heun, _heun_steps),
}
SamplerName = Literal[tuple(SAMPLERS)]  # the names --help lists


# ----------------------------------------------------------------------------- the settings


@dataclass
class Sampler:
    """How to draw images: the settings every sampler takes whole (``SAMPLERS`` for the names).

    Args:
        name: The sampler.
        steps: ``ddpm``/``ddim``: null for all T steps, or a respacing: a count (50, 100), section
            counts ("10,15,25") or a DDIM stride ("ddim50"); the solvers: a count (10-25).
        eta: DDIM's η in [0, 1] (0: deterministic given the noise; 1: DDPM-like noise).
        order: DPM-Solver++'s order.
        clip: Clip every x̂_0 to [−1, 1], the images' range (false for data outside it).
    """

    name: SamplerName = "ddpm"
    steps: SampleSteps = 100
    eta: ClosedUnitInterval = 0.0
    order: SolverOrder = 2
    clip: bool = True

    def __post_init__(self) -> None:
        check_args("sampler.", Sampler, vars(self))

    def timesteps(self, diffusion: GaussianDiffusion) -> list[int]:
        """The steps of ``diffusion`` these settings visit; a ConfigError (one sentence) if they cannot
        be met, so a caller can refuse them before any training or sampling time is spent."""
        try:
            return SAMPLERS[self.name].steps(diffusion, self)
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"sampler.steps={self.steps!r}: {e}") from None

    def sample(self, diffusion: GaussianDiffusion, model: Model, shape: tuple[int, ...] | None = None,
               noise: torch.Tensor | None = None, generator: torch.Generator | None = None, progress: bool = False,
               device: torch.device | str | None = None) -> torch.Tensor:
        """x_0 [*shape] from ``noise`` (x_T), or from x_T ~ N(0, I) of ``shape`` drawn from ``generator``,
        which then also feeds the sampler's own noise."""
        self.timesteps(diffusion)
        device = device if device is not None else diffusion.betas.device
        x = noise.to(device) if noise is not None else torch.randn(*shape, generator=generator, device=device)
        return SAMPLERS[self.name].loop(diffusion, model, x, self, generator=generator, progress=progress)
