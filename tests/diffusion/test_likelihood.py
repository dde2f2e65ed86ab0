"""normal_kl, the tanh normal CDF and the discretized Gaussian log-likelihood.

Expected values come from hand-worked constants, the written-out tanh formula and
numerical integration in numpy (an independent second route).
"""

import math

import numpy as np
import pytest
import torch

from iddpm_lightning.diffusion.likelihood import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)

F64 = torch.float64


def t64(x):
    return torch.as_tensor(x, dtype=F64)


def tanh_cdf(x):
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def erf_cdf(x):
    return np.array([0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in np.ravel(x)])


# ------------------------------------------------------- discretized Gaussian


@pytest.mark.parametrize(
    "x,mu,sigma,expected",
    [
        (0.0, 0.0, 1 / 255, -0.382163),  # centre bin: log(A(1) - A(-1))
        (1.0, 1.0, 1 / 255, -0.172935),  # top bin is open above 0.999: log(1 - A(-1))
        (-1.0, -1.0, 1 / 255, -0.172935),  # bottom bin, open below -0.999: log(A(1))
        (0.0, 0.5, 0.01, -27.631021),  # 50 sigma away: probability floored at 1e-12
    ],
)
def test_discretized_log_likelihood_reference_values(x, mu, sigma, expected):
    out = discretized_gaussian_log_likelihood(
        t64([x]), means=t64([mu]), log_scales=t64([math.log(sigma)])
    )
    assert out.shape == (1,)
    assert out.item() == pytest.approx(expected, abs=1e-6)


def test_discretized_floor_is_log_1e_minus_12():
    out = discretized_gaussian_log_likelihood(
        t64([0.0, 1.0, -1.0]), means=t64([0.5, -0.5, 0.5]), log_scales=t64([math.log(0.01)] * 3)
    )
    np.testing.assert_allclose(out.numpy(), math.log(1e-12), rtol=1e-12)


def test_discretized_matches_written_out_formula_on_a_grid():
    # interior bins: log(A((x-mu+1/255)/s) - A((x-mu-1/255)/s)); edge bins open-ended
    gen = torch.Generator().manual_seed(0)
    k = torch.randint(0, 256, (2, 3, 4, 4), generator=gen)
    k[0, 0, 0, :2] = 0  # make sure both open-ended edge bins are exercised
    k[1, 2, 3, 2:] = 255
    x = -1.0 + 2.0 * k.to(F64) / 255.0
    log_s = torch.log(torch.rand(2, 3, 4, 4, generator=gen, dtype=F64) * 0.2 + 0.003)
    # most means within a few sigma of x, one channel anywhere (deep tails, floors)
    mu = x + 3 * torch.exp(log_s) * torch.randn(2, 3, 4, 4, generator=gen, dtype=F64)
    mu[:, 0] = (torch.rand(2, 4, 4, generator=gen, dtype=F64) * 2 - 1) * 1.05
    got = discretized_gaussian_log_likelihood(x, means=mu, log_scales=log_s)
    assert got.shape == x.shape
    assert got.dtype == F64

    xn, mn, sn = x.numpy(), mu.numpy(), np.exp(log_s.numpy())
    upper = tanh_cdf((xn - mn + 1 / 255) / sn)
    lower = tanh_cdf((xn - mn - 1 / 255) / sn)
    interior = np.log(np.maximum(upper - lower, 1e-12))
    expected = np.where(
        xn < -0.999,
        np.log(np.maximum(upper, 1e-12)),
        np.where(xn > 0.999, np.log(np.maximum(1 - lower, 1e-12)), interior),
    )
    # a bin probability p is a difference of two CDF values near 0 or 1, so float64
    # round-off gives an error of ~1e-16/p in log p: scale the tolerance with it
    tol = 1e-12 + 1e-15 / np.maximum(np.exp(expected), 1e-12)
    assert np.all(np.abs(got.numpy() - expected) <= np.minimum(tol, 1e-4))
    well_conditioned = expected > -10
    assert well_conditioned.sum() > 40
    np.testing.assert_allclose(got.numpy()[well_conditioned], expected[well_conditioned], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "mu,sigma",
    [(0.0, 1 / 255), (0.0, 0.3), (0.37, 0.05), (-0.9, 0.5), (1.0, 0.02), (0.2, 3.0), (-1.3, 0.4)],
)
def test_discretized_probabilities_over_256_bins_sum_to_one(mu, sigma):
    x = -1.0 + 2.0 * torch.arange(256, dtype=F64) / 255.0
    ll = discretized_gaussian_log_likelihood(
        x, means=torch.full_like(x, mu), log_scales=torch.full_like(x, math.log(sigma))
    )
    total = torch.exp(ll).sum().item()
    # bins telescope to 1; the 1e-12 floors can add at most 256e-12
    assert total == pytest.approx(1.0, abs=1e-6)
    assert torch.all(ll <= 1e-12)


def test_discretized_float32_in_float32_out():
    x = torch.tensor([-1.0, 0.0, 1.0])
    out = discretized_gaussian_log_likelihood(x, means=torch.zeros(3), log_scales=torch.full((3,), -2.0))
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


# ------------------------------------------------------------- approx cdf


def test_approx_cdf_is_the_tanh_form():
    x = np.linspace(-7, 7, 2001)
    got = approx_standard_normal_cdf(t64(x)).numpy()
    np.testing.assert_allclose(got, tanh_cdf(x), rtol=0, atol=1e-14)
    assert approx_standard_normal_cdf(t64(0.0)).item() == pytest.approx(0.5, abs=1e-15)


def test_approx_cdf_close_to_but_not_equal_erf_cdf():
    x = np.linspace(-6, 6, 1201)
    got = approx_standard_normal_cdf(t64(x)).numpy()
    diff = np.abs(got - erf_cdf(x))
    assert diff.max() < 2e-4  # the tanh approximation is good to ~1.8e-4
    assert diff.max() > 1e-5  # ... but it is not the exact (erf) CDF
    # at x = 1 the two differ by -1.5276e-4
    v = approx_standard_normal_cdf(t64(1.0)).item()
    assert v == pytest.approx(0.8411919906, abs=1e-9)
    assert v - 0.5 * (1 + math.erf(1 / math.sqrt(2))) == pytest.approx(-1.52755e-4, rel=1e-3)


# --------------------------------------------------------------- normal_kl


def test_normal_kl_of_gaussian_with_itself_is_zero():
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(3, 2, 4, 4, generator=gen, dtype=F64)
    lv = torch.randn(3, 2, 4, 4, generator=gen, dtype=F64)
    kl = normal_kl(m, lv, m, lv)
    assert kl.shape == m.shape
    assert torch.abs(kl).max().item() < 1e-14


@pytest.mark.parametrize(
    "m1,v1,m2,v2,expected",
    [
        # KL(N(0,1) || N(1,4)) = ln 2 + (1 + 1)/(2*4) - 1/2
        (0.0, 1.0, 1.0, 4.0, math.log(2) + 0.25 - 0.5),
        # KL(N(0,1) || N(0,1)) = 0
        (0.0, 1.0, 0.0, 1.0, 0.0),
        # KL(N(2,1) || N(0,1)) = 2^2 / 2
        (2.0, 1.0, 0.0, 1.0, 2.0),
        # KL(N(0,4) || N(0,1)) = (4 - 1 - ln 4) / 2
        (0.0, 4.0, 0.0, 1.0, (3 - math.log(4)) / 2),
    ],
)
def test_normal_kl_scalar_closed_form(m1, v1, m2, v2, expected):
    kl = normal_kl(t64(m1), t64(math.log(v1)), t64(m2), t64(math.log(v2)))
    assert kl.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("m1,s1,m2,s2", [(0.3, 0.7, -0.2, 1.3), (1.0, 0.2, 0.9, 0.25), (-0.5, 2.0, 0.5, 1.0)])
def test_normal_kl_matches_numerical_integration(m1, s1, m2, s2):
    # second route: KL = integral p(x) (log p(x) - log q(x)) dx by the trapezoid rule
    x = np.linspace(min(m1, m2) - 12 * max(s1, s2), max(m1, m2) + 12 * max(s1, s2), 400001)
    logp = -0.5 * np.log(2 * np.pi * s1**2) - (x - m1) ** 2 / (2 * s1**2)
    logq = -0.5 * np.log(2 * np.pi * s2**2) - (x - m2) ** 2 / (2 * s2**2)
    y = np.exp(logp) * (logp - logq)
    numeric = float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)
    kl = normal_kl(t64(m1), t64(2 * math.log(s1)), t64(m2), t64(2 * math.log(s2))).item()
    assert kl == pytest.approx(numeric, rel=1e-7, abs=1e-10)
    assert kl > 0


def test_normal_kl_broadcasts_against_standard_normal():
    # the prior term compares a [B,C,H,W] Gaussian with N(0, 1)
    m = torch.linspace(-1, 1, 2 * 1 * 2 * 2, dtype=F64).view(2, 1, 2, 2)
    lv = torch.full_like(m, math.log(0.3))
    kl = normal_kl(m, lv, torch.zeros((), dtype=F64), torch.zeros((), dtype=F64))
    expected = 0.5 * (-math.log(0.3) + 0.3 + m.numpy() ** 2 - 1)
    assert kl.shape == m.shape
    np.testing.assert_allclose(kl.numpy(), expected, rtol=1e-12)
