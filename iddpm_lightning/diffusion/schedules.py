"""Noise schedules β_1..β_T and the respacing of timesteps.

Indices are 0-based throughout the package: index t here is the paper's step t + 1,
so ``betas[0]`` is β_1 and ``alphas_cumprod[T - 1]`` is ᾱ_T.
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("cosine", "linear")


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """β_t for t = 0..T-1, float64, shape [T].

    - ``"cosine"`` (paper eq. 17): ᾱ(t) = f(t) / f(0), f(t) = cos²(((t/T + s) / (1 + s)) · π/2),
      s = 0.008, and β_t = 1 − ᾱ(t + 1) / ᾱ(t) clipped at 0.999 (the paper's §3.2: this
      stops the singularity at t = T; only the last β is clipped).
    - ``"linear"`` (Ho et al. 2020): β from 1e-4 to 0.02, both scaled by 1000 / T so
      that any T gives a similar ᾱ curve (the paper's code does the same).
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"the number of timesteps must be an integer >= 1, got {num_timesteps!r}")
    if name == "cosine":
        return betas_for_alpha_bar(
            num_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    raise ValueError(f"unknown beta schedule {name!r}; valid names are {', '.join(SCHEDULES)}")


def betas_for_alpha_bar(num_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """β_t = min(1 − ᾱ((t+1)/T) / ᾱ(t/T), max_beta) for a continuous ᾱ on [0, 1], float64 [T].

    ᾱ need not be normalised (f(0) cancels in the ratio).
    """
    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """The original step indices kept by a respaced process, ascending.

    - ``"50"`` (or ``50``): 50 steps spread evenly over [0, T-1], ends included.
    - ``"10,15,25"``: [0, T) is cut into 3 equal sections (the first ``T % 3`` one step
      longer) and 10, 15 and 25 evenly spread steps are kept in them.
    - ``"ddim50"``: a uniform integer stride starting at 0, ``range(0, T, stride)``,
      with exactly 50 elements (as DDIM does).

    Follows the paper's code step for step (the fractional stride accumulates in floating
    point and is rounded half to even), so both keep the same steps.
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        desired = _parse_count(section_counts[len("ddim"):], section_counts)
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(
            f"respacing {section_counts!r} cannot be met: no integer stride gives exactly "
            f"{desired} steps out of {num_timesteps}; pick another count or use '{desired}'"
        )
    if isinstance(section_counts, int):
        counts = [section_counts]
    elif isinstance(section_counts, str):
        counts = [_parse_count(c, section_counts) for c in section_counts.split(",")]
    else:
        counts = [int(c) for c in section_counts]

    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(
                f"respacing {section_counts!r} cannot be met: section {i} has {size} of the "
                f"{num_timesteps} steps and cannot keep {count}; use between 1 and {size}"
            )
        stride = 1 if count == 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return kept


def _parse_count(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"respacing {spec!r} is not understood; write a count like '100', sections like "
            f"'10,15,25', or a DDIM stride like 'ddim50'"
        ) from None
