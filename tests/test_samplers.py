"""The samplers against a model whose answer is known in closed form, and the settings that pick one.

For data x_0 ~ N(m, s² I), x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε is Gaussian, and the exact
ε-prediction is E[ε | x_t] = √(1 − ᾱ_t) (x_t − √ᾱ_t m) / (ᾱ_t s² + 1 − ᾱ_t). With s = 1 the
exact reverse variance Var[x_{t'} | x_t] is 1 − ᾱ_t / ᾱ_{t'}, the β of any (respaced) step,
which the learned-range output v = 1 gives: ancestral sampling of this "model" is exact, at all T
steps and respaced. DDIM over all T steps, DPM-Solver++ at 25 steps and Heun at 35 integrate the
ODE closely enough. Each sampler's samples must match m and s² within 4 standard errors, and a
model of the wrong data must fail the same check.
"""

from __future__ import annotations

import math
import typing

import pytest
import torch

from iddpm_lightning.diffusion import SAMPLERS, GaussianDiffusion, Sampler, get_named_beta_schedule
from iddpm_lightning.diffusion.dpm_solver import COSINE_LAMBDA_MIN, dpm_solver_sample_loop
from iddpm_lightning.diffusion.samplers import SamplerName, ancestral, ddim, dpm_solver, heun, lambda_min
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


VARIANTS = {  # the samplers of the closed-form check, on data outside [-1, 1] (so unclipped)
    "ddpm, 1000 steps": Sampler("ddpm", None, clip=False),
    "ddpm, 50 respaced steps": Sampler("ddpm", 50, clip=False),
    "ddim, 1000 steps": Sampler("ddim", None, clip=False),
    "dpm_solver, 25 steps": Sampler("dpm_solver", 25, order=2, clip=False),
    "heun, 35 steps": Sampler("heun", 35, clip=False),  # ρ = 7 spends few steps near σ = s, where this data turns
}


def draw(name: str, model, g: torch.Generator) -> torch.Tensor:
    return VARIANTS[name].sample(DIFFUSION, model, SHAPE, generator=g)


def standard_errors_off(x: torch.Tensor, m: float, s: float) -> tuple[float, float]:
    """(mean − m, variance − s²) of the samples, in standard errors of N(m, s²) samples."""
    n = x.numel()
    return float((x.mean() - m) / (s / math.sqrt(n))), float((x.var() - s * s) / (s * s * math.sqrt(2 / n)))


@pytest.mark.parametrize("name", VARIANTS)
def test_samples_of_the_exact_model_have_the_data_mean_and_variance(name):
    x = draw(name, gaussian_model(M, S), torch.Generator().manual_seed(0))
    z_mean, z_var = standard_errors_off(x, M, S)
    assert abs(z_mean) < 4 and abs(z_var) < 4, (z_mean, z_var)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("wrong", [(M, 0.8), (0.4, S)], ids=["variance", "mean"])
def test_a_model_of_other_data_fails_the_same_check(name, wrong):
    x = draw(name, gaussian_model(*wrong), torch.Generator().manual_seed(0))
    z_mean, z_var = standard_errors_off(x, M, S)
    assert max(abs(z_mean), abs(z_var)) > 8, (z_mean, z_var)


def test_dpm_solver_is_deterministic_given_the_noise_and_uses_epsilon_only():
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    model, solver = gaussian_model(M, S), Sampler("dpm_solver", 10)
    a = solver.sample(DIFFUSION, model, (8, 1, 4, 4), generator=g())
    b = solver.sample(DIFFUSION, model, (8, 1, 4, 4), generator=g())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    other_v = lambda x, t: torch.cat([model(x, t)[:, :1], -torch.ones_like(x)], dim=1)  # noqa: E731
    torch.testing.assert_close(solver.sample(DIFFUSION, other_v, (8, 1, 4, 4), generator=g()), a)
    assert a.abs().max() <= 1 + 1e-6  # x̂_0 clipped to [-1, 1] by default, as ancestral and DDIM sampling clip


def test_dpm_solver_refuses_a_respaced_diffusion_and_steps_that_would_repeat():
    with pytest.raises(ConfigError, match="unrespaced"):
        Sampler("dpm_solver", 10).sample(DIFFUSION.respace(50), gaussian_model(M, S), (2, 1, 4, 4))
    with pytest.raises(ConfigError, match="1000 DPM-Solver steps repeat timesteps"):
        Sampler("dpm_solver", 1000).sample(DIFFUSION, gaussian_model(M, S), (2, 1, 4, 4))


def test_the_module_samples_with_dpm_solver_as_the_core_does_and_refuses_respacings():
    torch.manual_seed(0)
    module = as_trained(IDDPM(unet=TINY_UNET, image_size=8, in_channels=1, timesteps=50))
    x = module.sample(Sampler("dpm_solver", 7, order=3), 3, generator=torch.Generator().manual_seed(2))
    expected = dpm_solver_sample_loop(module.model_fn(module.eval_unet), module.diffusion.betas, (3, 1, 8, 8), 7,
                                      order=3, lambda_min=COSINE_LAMBDA_MIN, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    assert module.sample(Sampler("dpm_solver", "7", order=3), 3, generator=torch.Generator().manual_seed(2)).equal(x)
    for steps in (None, "ddim5", "10,15", 51):
        with pytest.raises(ConfigError, match=r"sampler\.steps=.* sampler dpm_solver.* from 1 to T=50"):
            module.sample(Sampler("dpm_solver", steps), 2)
    # Near T, diffusers' rounded steps repeat (a step of size 0 would give NaN images): refused, naming the most.
    with pytest.raises(ConfigError, match=r"sampler\.steps=50 for sampler dpm_solver: 50 DPM-Solver steps repeat "
                                          r"timesteps of this T=50 schedule: at most \d+"):
        module.sample(Sampler("dpm_solver", 50), 2)
    with pytest.raises(ConfigError, match=r"sampler\.order=4"):
        module.sample(Sampler("dpm_solver", 7, order=4), 2)


# ------------------------------------------------------------------ the table and the settings


def test_the_table_names_every_sampler_and_its_loop():
    assert list(SAMPLERS) == ["ddpm", "ddim", "dpm_solver", "heun"] == list(typing.get_args(SamplerName))
    assert [row.loop for row in SAMPLERS.values()] == [ancestral, ddim, dpm_solver, heun]
    assert Sampler() == Sampler("ddpm", 100, 0.0, 2, True)  # the defaults: the paper's 100 respaced ancestral steps
    d = GaussianDiffusion(get_named_beta_schedule("cosine", 50))
    # the steps each visits: a respacing of T for ddpm and ddim, the solver's own for dpm_solver
    assert Sampler("ddpm", None).timesteps(d) == list(range(50))
    assert Sampler("ddim", "ddim7").timesteps(d) == list(range(0, 50, 8))
    assert Sampler("ddpm", 10).timesteps(d) == Sampler("ddim", 10).timesteps(d) == d.respace(10).timestep_map.tolist()
    solver = Sampler("dpm_solver", 7).timesteps(d)
    assert len(solver) == len(set(solver)) == 7 and solver == sorted(solver, reverse=True) and solver[0] < 50


@pytest.mark.parametrize("settings, message", [
    (dict(name="euler"), r"^sampler\.name='euler' is not one of 'ddpm', 'ddim', 'dpm_solver'"),
    (dict(eta=1.5), r"^sampler\.eta=1\.5 must be a number in \[0, 1\]"),
    (dict(eta=-0.1), r"^sampler\.eta=-0\.1 must be a number in \[0, 1\]"),
    (dict(order=4), r"^sampler\.order=4 is not one of 1, 2, 3"),
    (dict(steps="x"), r"^sampler\.steps='x' is not a respacing"),
    (dict(clip="no"), r"^sampler\.clip='no' must be true or false"),
])
def test_bad_settings_are_a_config_error_naming_the_setting(settings, message):
    with pytest.raises(ConfigError, match=message):
        Sampler(**settings)


def test_steps_a_diffusion_cannot_take_are_refused_before_any_model_call():
    d = GaussianDiffusion(get_named_beta_schedule("cosine", 50))
    calls = []
    model = lambda x, t: calls.append(t) or torch.zeros(len(x), 2, 4, 4)  # noqa: E731
    with pytest.raises(ConfigError, match=r"^sampler\.steps=2000: .*cannot keep 2000"):
        Sampler("ddpm", 2000).sample(d, model, (2, 1, 4, 4))
    with pytest.raises(ConfigError, match=r"^sampler\.steps='ddim7'"):
        Sampler("ddim", "ddim7").sample(GaussianDiffusion(get_named_beta_schedule("cosine", 10)), model, (2, 1, 4, 4))
    with pytest.raises(ConfigError, match="^sampler dpm_solver spaces its own steps over the whole schedule"):
        Sampler("dpm_solver", 7).timesteps(d.respace(25))
    assert calls == []


def test_lambda_min_clips_the_cosine_schedule_only():
    assert lambda_min(DIFFUSION) == COSINE_LAMBDA_MIN == -5.1
    assert lambda_min(GaussianDiffusion(get_named_beta_schedule("linear", 1000))) == -math.inf


# ------------------------------------------------------------------ the noise x_T


SMALL = GaussianDiffusion(get_named_beta_schedule("cosine", 40), "learned_range", "hybrid")
EVERY = [Sampler("ddpm", 8), Sampler("ddim", 8, eta=0.0), Sampler("ddim", 8, eta=1.0), Sampler("dpm_solver", 8),
         Sampler("heun", 8)]
IDS = ["ddpm", "ddim eta=0", "ddim eta=1", "dpm_solver", "heun"]


def toy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """An imperfect model that depends on x_t and t (ε and v), so the samples depend on every step."""
    s = torch.sin(t.float())[:, None, None, None]
    return torch.cat([torch.tanh(1.3 * x + 0.2 * s), 0.5 * torch.tanh(x - s)], dim=1)


@pytest.mark.parametrize("sampler", EVERY, ids=IDS)
def test_every_sampler_starts_from_the_given_noise(sampler):
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(9))
    a = sampler.sample(SMALL, toy, noise=x_T, generator=torch.Generator().manual_seed(1))
    b = sampler.sample(SMALL, toy, noise=x_T, generator=torch.Generator().manual_seed(1))
    assert a.shape == x_T.shape and torch.equal(a, b)
    other = sampler.sample(SMALL, toy, noise=torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(10)),
                           generator=torch.Generator().manual_seed(1))
    assert (other - a).abs().max() > 1e-3  # the noise matters
    # the generator feeds only the noise a stochastic sampler adds on the way
    reseeded = sampler.sample(SMALL, toy, noise=x_T, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(1234)  # nor does the global generator matter
    no_generator = sampler.sample(SMALL, toy, noise=x_T)
    if sampler.name in ("dpm_solver", "heun") or (sampler.name == "ddim" and sampler.eta == 0):
        assert torch.equal(reseeded, a) and torch.equal(no_generator, a)  # deterministic given x_T
    else:
        assert (reseeded - a).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", EVERY, ids=IDS)
def test_noise_given_is_noise_drawn_from_the_generator(sampler):
    """Two routes to one sample: x_T drawn by ``sample`` from the generator, or drawn here from the
    same generator and given as ``noise`` (the generator then feeds the rest)."""
    drawn = sampler.sample(SMALL, toy, (3, 1, 4, 4), generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    x_T = torch.randn(3, 1, 4, 4, generator=g)
    torch.testing.assert_close(sampler.sample(SMALL, toy, noise=x_T, generator=g), drawn, rtol=0, atol=0)
    # and the sampler functions, of one signature, are what ``sample`` runs
    g = torch.Generator().manual_seed(4)
    x_T = torch.randn(3, 1, 4, 4, generator=g)
    torch.testing.assert_close(SAMPLERS[sampler.name].loop(SMALL, toy, x_T, sampler, generator=g), drawn,
                               rtol=0, atol=0)


# ------------------------------------------------------------------ EDM's Heun sampler


def test_heun_is_second_order_on_the_exact_probability_flow_of_gaussian_data():
    """For data N(m, s²) the probability-flow ODE keeps (x_t − √ᾱ_t m) / √(ᾱ_t s² + 1 − ᾱ_t) constant,
    so from x at Heun's first step it ends exactly at m + s·that. Halving Heun's step size divides
    its error by about 4 (second order: measured 5.5 and 4.6 for 8 -> 16 -> 32 steps), DDIM's by
    about 2 (first order)."""
    x = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    model = gaussian_model(M, S)

    def error(sampler: Sampler) -> float:
        ab = float(DIFFUSION.alphas_cumprod[max(sampler.timesteps(DIFFUSION))])  # ᾱ where x is given
        exact = M + S * (x - math.sqrt(ab) * M) / math.sqrt(ab * S * S + 1 - ab)
        return float((sampler.sample(DIFFUSION, model, noise=x) - exact).abs().max())

    heun_errors = [error(Sampler("heun", n, clip=False)) for n in (8, 16, 32)]
    assert heun_errors[0] / heun_errors[1] > 3.5 and heun_errors[1] / heun_errors[2] > 3.5, heun_errors
    ddim_errors = [error(Sampler("ddim", f"ddim{n}", clip=False)) for n in (16, 32)]
    assert 1.5 < ddim_errors[0] / ddim_errors[1] < 2.5, ddim_errors


def test_heun_visits_edm_steps_from_the_lambda_clip_down_and_refuses_steps_that_would_repeat():
    """2N − 1 model calls for N steps, at the steps nearest EDM's ρ = 7 spacing in σ, from the first
    step inside DPM-Solver's λ clip (t = 995 of the cosine T = 1000) down to t = 0."""
    calls = []
    model = lambda x, t: calls.append(int(t[0])) or gaussian_model(M, S)(x, t)  # noqa: E731
    steps = Sampler("heun", 10).timesteps(DIFFUSION)
    Sampler("heun", 10).sample(DIFFUSION, model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2 * 10 - 1 and calls[0] == steps[0] == 995 and steps[-1] == 0
    assert steps == sorted(set(steps), reverse=True)  # distinct, descending
    log_sigma = torch.log(DIFFUSION.sqrt_recipm1_alphas_cumprod[steps])  # (10,)
    ramp = torch.linspace(0, 1, 10, dtype=torch.float64)
    edm = 7 * torch.log(log_sigma[0].div(7).exp() + ramp * (log_sigma[-1].div(7).exp() - log_sigma[0].div(7).exp()))
    gaps = (DIFFUSION.sqrt_recipm1_alphas_cumprod.log()[1:] - DIFFUSION.sqrt_recipm1_alphas_cumprod.log()[:-1])
    assert ((log_sigma - edm).abs() <= gaps.abs().max()).all()  # each within one step of its EDM target
    with pytest.raises(ConfigError, match=r"^sampler\.steps=40 for sampler heun: 40 steps would repeat timesteps .*"
                                          r"at most \d+"):
        Sampler("heun", 40).timesteps(DIFFUSION)
