"""Beta schedules and timestep respacing, checked against closed forms.

Every expected number here is either a constant worked out by hand / with an
independent numpy formula, or the paper's definition written out directly.
"""

import math

import numpy as np
import pytest

from iddpm_lightning.diffusion import get_named_beta_schedule, space_timesteps

S = 0.008  # cosine schedule offset of the paper


def cosine_alpha_bar(T: int) -> np.ndarray:
    """abar(t) = f(t)/f(0) for t = 0..T, f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2)."""
    t = np.arange(T + 1, dtype=np.float64)
    f = np.cos(((t / T + S) / (1 + S)) * math.pi / 2) ** 2
    return f / f[0]


# --------------------------------------------------------------------- cosine


def test_cosine_T4000_first_beta_and_dtype():
    betas = get_named_beta_schedule("cosine", 4000)
    assert isinstance(betas, np.ndarray)
    assert betas.dtype == np.float64
    assert betas.shape == (4000,)
    assert betas[0] == pytest.approx(9.865819e-06, rel=1e-6)


def test_cosine_T1000_first_beta():
    betas = get_named_beta_schedule("cosine", 1000)
    assert betas.shape == (1000,)
    assert betas.dtype == np.float64
    assert betas[0] == pytest.approx(4.128422e-05, rel=1e-6)


@pytest.mark.parametrize("T", [1000, 4000])
def test_cosine_only_last_beta_is_clipped(T):
    betas = get_named_beta_schedule("cosine", T)
    assert betas[-1] == pytest.approx(0.999, abs=1e-15)
    # every other beta is strictly below the clip and positive
    assert np.all(betas[:-1] < 0.999)
    assert np.all(betas > 0)
    # the unclipped last beta would be 1 - abar(T)/abar(T-1), i.e. essentially 1
    abar = cosine_alpha_bar(T)
    assert 1 - abar[T] / abar[T - 1] > 0.999
    # cosine betas increase monotonically
    assert np.all(np.diff(betas) > 0)


def test_cosine_T4000_final_alpha_bar():
    betas = get_named_beta_schedule("cosine", 4000)
    abar = np.cumprod(1.0 - betas)
    # abar(T-1) * (1 - 0.999) = 1.5179804688e-07 * 1e-3
    assert abar[-1] == pytest.approx(1.52e-10, rel=1e-2)
    assert abar[-1] == pytest.approx(1.5179804688e-10, rel=1e-6)
    assert 1e-10 < abar[-1] < 1e-9


@pytest.mark.parametrize("T", [10, 1000, 4000])
def test_cosine_cumprod_matches_independent_alpha_bar(T):
    betas = get_named_beta_schedule("cosine", T)
    abar = cosine_alpha_bar(T)
    cum = np.cumprod(1.0 - betas)
    # index t of the schedule is the step from abar(t) to abar(t+1); only the last
    # step is clipped, so all earlier cumulative products equal abar(t+1)
    np.testing.assert_allclose(cum[:-1], abar[1:T], rtol=1e-10, atol=0)
    np.testing.assert_allclose(betas[:-1], 1.0 - abar[1:T] / abar[0 : T - 1], rtol=1e-10, atol=0)


# --------------------------------------------------------------------- linear


def test_linear_T4000():
    betas = get_named_beta_schedule("linear", 4000)
    assert betas.dtype == np.float64
    assert betas.shape == (4000,)
    assert betas[0] == pytest.approx(2.5e-5, rel=1e-12)
    assert betas[-1] == pytest.approx(5e-3, rel=1e-12)
    np.testing.assert_allclose(betas, np.linspace(2.5e-5, 5e-3, 4000), rtol=1e-12)


def test_linear_T1000():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64
    np.testing.assert_allclose(betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-12)


# ----------------------------------------------------------------- bad input


def test_unknown_schedule_name_raises_and_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        get_named_beta_schedule("quadratic", 100)
    msg = str(exc.value)
    assert "cosine" in msg and "linear" in msg


@pytest.mark.parametrize("T", [0, -5])
@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_non_positive_T_raises(name, T):
    with pytest.raises(ValueError):
        get_named_beta_schedule(name, T)


# ------------------------------------------------------------------ respacing


@pytest.mark.parametrize("T", [1000, 4000])
def test_space_timesteps_single_section_is_rounded_linspace(T):
    steps = space_timesteps(T, "50")
    assert isinstance(steps, list)
    assert all(isinstance(s, int) for s in steps)
    expected = np.linspace(0, T - 1, 50).round().astype(int).tolist()
    assert steps == expected
    assert steps[0] == 0 and steps[-1] == T - 1


def test_space_timesteps_full_count_keeps_everything():
    assert space_timesteps(1000, "1000") == list(range(1000))
    assert space_timesteps(20, "20") == list(range(20))


def test_space_timesteps_ddim_stride():
    assert space_timesteps(4000, "ddim50") == list(range(0, 4000, 80))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim100") == list(range(0, 1000, 10))


def test_space_timesteps_sections():
    T, counts = 1000, [10, 15, 25]
    steps = space_timesteps(T, "10,15,25")
    assert len(steps) == 50
    assert steps == sorted(steps)
    # paper's code: even split of T into len(counts) sections, the first T % n of
    # them one step longer -> sizes 334, 333, 333 starting at 0, 334, 667
    sizes = [334, 333, 333]
    starts = [0, 334, 667]
    expected = []
    for start, size, count in zip(starts, sizes, counts):
        stride = (size - 1) / (count - 1)
        expected += [start + int(round(j * stride)) for j in range(count)]
    assert steps == expected
    # spot values: the first section is exactly every 37th step up to 333
    assert steps[:10] == list(range(0, 334, 37))
    assert steps[10] == 334 and steps[24] == 666 and steps[25] == 667 and steps[-1] == 999


@pytest.mark.parametrize(
    "T,spec",
    [
        (1000, "2000"),
        (1000, "1001"),
        (1000, "ddim3000"),
        (10, "ddim7"),  # no stride gives exactly 7 steps out of 10
        (1000, "400,400,400"),  # each section only has 333/334 steps
    ],
)
def test_space_timesteps_impossible_counts_raise(T, spec):
    with pytest.raises(ValueError):
        space_timesteps(T, spec)
