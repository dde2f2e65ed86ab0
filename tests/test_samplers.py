"""The samplers against a model whose answer is known in closed form.

For data x_0 ~ N(m, s² I), x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε is Gaussian, and the exact
ε-prediction is E[ε | x_t] = √(1 − ᾱ_t) (x_t − √ᾱ_t m) / (ᾱ_t s² + 1 − ᾱ_t). With s = 1 the
exact reverse variance Var[x_{t'} | x_t] is 1 − ᾱ_t / ᾱ_{t'}, the β of any (respaced) step,
which the learned-range output v = 1 gives: ancestral sampling of this "model" is exact, at all T
steps and respaced. DDIM over all T steps and DPM-Solver++ at 25 steps integrate the ODE
closely enough. Each sampler's samples must match m and s² within 4 standard errors, and a
model of the wrong data must fail the same check.
"""

from __future__ import annotations

import math

import pytest
import torch

from iddpm_lightning.diffusion import GaussianDiffusion, get_named_beta_schedule
from iddpm_lightning.diffusion.dpm_solver import COSINE_LAMBDA_MIN
from iddpm_lightning.errors import ConfigError
from iddpm_lightning.module import IDDPM
from tests.conftest import TINY_UNET, as_trained

M, S = 0.5, 1.0  # the data: N(0.5, 1) in every pixel
SHAPE = (2000, 1, 4, 4)  # 32,000 independent values: standard errors 0.0056 (mean) and 0.0079 (variance)
DIFFUSION = GaussianDiffusion(get_named_beta_schedule("cosine", 1000), "learned_range", "hybrid")


def gaussian_model(m: float, s: float):
    """The exact ε (and v = 1: variance β) of data N(m, s²), at original timesteps t [B]."""

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = DIFFUSION.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        eps = torch.sqrt(1 - ab) * (x_t - torch.sqrt(ab) * m) / (ab * s * s + 1 - ab)
        return torch.cat([eps, torch.ones_like(eps)], dim=1)  # (B, 2C, H, W)

    return model


SAMPLERS = {
    "ddpm, 1000 steps": lambda model, g: DIFFUSION.p_sample_loop(model, SHAPE, clip_denoised=False, generator=g),
    "ddpm, 50 respaced steps": lambda model, g: DIFFUSION.respace(50).p_sample_loop(
        model, SHAPE, clip_denoised=False, generator=g),
    "ddim, 1000 steps": lambda model, g: DIFFUSION.ddim_sample_loop(model, SHAPE, clip_denoised=False, generator=g),
    "dpm_solver, 25 steps": lambda model, g: DIFFUSION.dpm_solver_sample_loop(
        model, SHAPE, 25, order=2, lambda_min=COSINE_LAMBDA_MIN, clip_denoised=False, generator=g),
}


def standard_errors_off(x: torch.Tensor, m: float, s: float) -> tuple[float, float]:
    """(mean − m, variance − s²) of the samples, in standard errors of N(m, s²) samples."""
    n = x.numel()
    return float((x.mean() - m) / (s / math.sqrt(n))), float((x.var() - s * s) / (s * s * math.sqrt(2 / n)))


@pytest.mark.parametrize("name", SAMPLERS)
def test_samples_of_the_exact_model_have_the_data_mean_and_variance(name):
    x = SAMPLERS[name](gaussian_model(M, S), torch.Generator().manual_seed(0))
    z_mean, z_var = standard_errors_off(x, M, S)
    assert abs(z_mean) < 4 and abs(z_var) < 4, (z_mean, z_var)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("wrong", [(M, 0.8), (0.4, S)], ids=["variance", "mean"])
def test_a_model_of_other_data_fails_the_same_check(name, wrong):
    x = SAMPLERS[name](gaussian_model(*wrong), torch.Generator().manual_seed(0))
    z_mean, z_var = standard_errors_off(x, M, S)
    assert max(abs(z_mean), abs(z_var)) > 8, (z_mean, z_var)


def test_dpm_solver_is_deterministic_given_the_noise_and_uses_epsilon_only():
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    model = gaussian_model(M, S)
    a = DIFFUSION.dpm_solver_sample_loop(model, (8, 1, 4, 4), 10, generator=g())
    b = DIFFUSION.dpm_solver_sample_loop(model, (8, 1, 4, 4), 10, generator=g())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    other_v = lambda x, t: torch.cat([model(x, t)[:, :1], -torch.ones_like(x)], dim=1)  # noqa: E731
    torch.testing.assert_close(DIFFUSION.dpm_solver_sample_loop(other_v, (8, 1, 4, 4), 10, generator=g()), a)
    assert a.abs().max() <= 1 + 1e-6  # x̂_0 clipped to [-1, 1] by default, as ancestral and DDIM sampling clip


def test_dpm_solver_refuses_a_respaced_diffusion_and_steps_that_would_repeat():
    with pytest.raises(ValueError, match="unrespaced"):
        DIFFUSION.respace(50).dpm_solver_sample_loop(gaussian_model(M, S), (2, 1, 4, 4), 10)
    with pytest.raises(ValueError, match="1000 DPM-Solver steps repeat timesteps"):
        DIFFUSION.dpm_solver_sample_loop(gaussian_model(M, S), (2, 1, 4, 4), 1000)


def test_the_module_samples_with_dpm_solver_as_the_core_does_and_refuses_respacings():
    torch.manual_seed(0)
    module = as_trained(IDDPM(unet=TINY_UNET, image_size=8, in_channels=1, timesteps=50))
    x = module.sample(3, 7, "dpm_solver", generator=torch.Generator().manual_seed(2), solver_order=3)
    expected = module.diffusion.dpm_solver_sample_loop(
        module.model_fn(module.eval_unet), (3, 1, 8, 8), 7, order=3, lambda_min=COSINE_LAMBDA_MIN,
        generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    assert module.sample(3, "7", "dpm_solver", generator=torch.Generator().manual_seed(2), solver_order=3).equal(x)
    for steps in (None, "ddim5", "10,15", 51):
        with pytest.raises(ConfigError, match=r"sample_steps=.* sampler dpm_solver.* from 1 to T=50"):
            module.sample(2, steps, "dpm_solver")
    # Near T, diffusers' rounded steps repeat (a step of size 0 would give NaN images): refused, naming the most.
    with pytest.raises(ConfigError, match=r"sample_steps=50 for sampler dpm_solver: 50 DPM-Solver steps repeat "
                                          r"timesteps of this T=50 schedule: at most \d+"):
        module.sample(2, 50, "dpm_solver")
    with pytest.raises(ConfigError, match="solver_order=4"):
        module.sample(2, 7, "dpm_solver", solver_order=4)
