"""Stratified bits/dim (``GaussianDiffusion.stratified_bpd``) and the ``BitsPerDim``
validation callback.

The estimator is checked against the exact loop ``calc_bpd_loop`` three ways: with an
oracle model whose L_t is a deterministic function of t (so the estimate's mean AND
variance have closed forms), with a noisy analytic model (mean of many estimates vs mean of
many exact runs; reported SE vs the spread of repeated estimates), and through a real
Trainer with a tiny UNet (the logged value equals a direct computation with the same
generator)."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from iddpm_lightning.callbacks import BitsPerDim
from iddpm_lightning.diffusion.gaussian import log_strata
from iddpm_lightning.diffusion import GaussianDiffusion, get_named_beta_schedule
from iddpm_lightning.errors import ConfigError
from iddpm_lightning.module import IDDPM
from iddpm_lightning.rng import seeded_generator

from .conftest import TINY_UNET

F64 = torch.float64



def diffusion(T: int) -> GaussianDiffusion:
    return GaussianDiffusion(get_named_beta_schedule("cosine", T), model_var_type="learned_range", loss_type="hybrid")


def grid_images(n: int, size: int = 4, seed: int = 0, dtype=F64) -> torch.Tensor:
    """[n, 1, size, size] on the 256-level grid in [-1, 1], both ends included."""
    k = torch.randint(0, 256, (n, 1, size, size), generator=torch.Generator().manual_seed(seed))
    k.view(-1)[0], k.view(-1)[-1] = 0, 255
    return (k.to(dtype) / 127.5 - 1.0)


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class SpyModel:
    """Records the t of every call; outputs ε = 0, v = 0."""

    def __init__(self):
        self.ts = []

    def __call__(self, x, t):
        self.ts.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)


class OracleModel:
    """Knows x_0, so returns the exact ε (x̂_0 = x_0, μ_θ = μ̃_t) and v = 0 (a variance
    halfway between β̃_t and β_t in log space). Then L_t (t ≥ 1) is the variance-only KL and
    L_0 the decoder NLL of x_0 under N(x_0, ·): a deterministic function of (image, t), the
    same for every ε."""

    def __init__(self, x0: torch.Tensor, d: GaussianDiffusion):
        self.x0, self.abar = x0, d.alphas_cumprod

    def __call__(self, x, t):
        a = self.abar[t].to(x.dtype).view(-1, 1, 1, 1)
        x0 = self.x0.repeat(len(x) // len(self.x0), 1, 1, 1)  # k timesteps of the B images, t-major
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)


class ToyModel:
    """A fixed, imperfect, smooth model: per-pixel channel mixing of x_t plus a t-dependent
    bias, squashed by tanh. Its L_t depend on ε, so both estimators are noisy."""

    def __init__(self, seed: int = 0):
        gen = g(seed)
        self.w = torch.randn(2, 1, generator=gen, dtype=F64)
        self.b = 0.3 * torch.randn(2, generator=gen, dtype=F64)
        self.freq = torch.rand(2, generator=gen, dtype=F64)

    def __call__(self, x, t):
        h = torch.einsum("oc,bchw->bohw", self.w, x) + (self.b + torch.sin(t.to(F64)[:, None] * self.freq))[..., None, None]
        out = torch.tanh(h)
        return torch.cat([1.5 * out[:, :1], out[:, 1:]], dim=1)


# ======================================================== the estimator itself


def strata(T, K):
    bounds = log_strata(T, K)
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def test_log_strata_cover_every_step_once_with_t0_first():
    for T, K in [(1000, 20), (4000, 50), (10, 10), (7, 1), (100, 99)]:
        bounds = log_strata(T, K)
        assert len(bounds) == K + 1 and bounds[0] == 0 and bounds[-1] == T
        assert all(a < b for a, b in zip(bounds[:-1], bounds[1:]))
    assert log_strata(1000, 20)[:5] == [0, 1, 2, 3, 4]  # the first steps alone: L_0 is the largest term


def test_strata_partition_and_two_independent_draws():
    T, K, B = 10, 4, 400  # geometric bounds 0, 2, 3, 6, 10
    d, model = diffusion(T), SpyModel()
    out = d.stratified_bpd(model, grid_images(B, seed=1), K, generator=g(0))
    assert set(out) == {"total_bpd", "variance", "prior_bpd"} and out["total_bpd"].shape == (B,)
    strata = [[0, 1], [2], [3, 4, 5], [6, 7, 8, 9]]
    assert log_strata(T, K) == [0, 2, 3, 6, 10]
    assert len(model.ts) == 2 * K  # one model call per (stratum, draw), whole batch
    for k, stratum in enumerate(strata):
        ta, tb = model.ts[2 * k], model.ts[2 * k + 1]
        for t in (ta, tb):
            assert t.dtype == torch.long and t.shape == (B,)
            assert sorted(set(t.tolist())) == stratum  # within the stratum, every t drawn
        assert len(stratum) == 1 or (ta != tb).any()  # the two draws are independent, not copies
    # reproducible from the generator
    again = d.stratified_bpd(SpyModel(), grid_images(B, seed=1), K, generator=g(0))
    assert torch.equal(out["total_bpd"], again["total_bpd"]) and torch.equal(out["variance"], again["variance"])


def test_num_strata_outside_1_to_T_raises():
    d, x = diffusion(10), grid_images(2)
    for K in (0, 11):
        with pytest.raises(ValueError, match="num_strata"):
            d.stratified_bpd(SpyModel(), x, K)


def test_oracle_with_one_step_per_stratum_is_exact_and_has_zero_variance():
    # K = T: each stratum is one t, and an oracle's L_t does not depend on ε, so the two
    # draws agree: the estimate IS the exact loop's value, and the variance estimate is 0.
    T, B = 20, 5
    d = diffusion(T)
    x = grid_images(B, seed=2)
    exact = d.calc_bpd_loop(OracleModel(x, d), x, generator=g(0))
    est = d.stratified_bpd(OracleModel(x, d), x, T, generator=g(1))
    assert exact["vb"][:, 1:].abs().max() > 1e-3  # a non-trivial bound (v = 0 is not β̃)
    torch.testing.assert_close(est["total_bpd"], exact["total_bpd"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(est["prior_bpd"], exact["prior_bpd"], rtol=0, atol=0)
    assert est["variance"].abs().max() < 1e-18


def test_oracle_mean_and_variance_match_closed_forms():
    # With L_t = ℓ(t) deterministic, the estimate's mean is L_T + Σ_t ℓ(t) and its variance
    # Σ_k s_k² Var_{t ∈ S_k}[ℓ(t)] / 2 exactly (t uniform in S_k, two draws averaged).
    T, K, B, R = 20, 6, 3, 3000  # geometric strata
    d = diffusion(T)
    x = grid_images(B, seed=3)
    ell = d.calc_bpd_loop(OracleModel(x, d), x, generator=g(0))
    mean_true = ell["total_bpd"]  # [B]
    var_true = sum(len(s) ** 2 * ell["vb"][:, s].var(dim=1, unbiased=False) / 2
                   for s in strata(T, K))  # [B]
    xr = x.repeat(R, 1, 1, 1)
    out = d.stratified_bpd(OracleModel(xr, d), xr, K, generator=g(1))
    est, var = out["total_bpd"].view(R, B), out["variance"].view(R, B)
    se = (var_true / R).sqrt()
    assert ((est.mean(0) - mean_true).abs() <= 4 * se).all()
    # the reported variance is unbiased for the true one ...
    assert ((var.mean(0) - var_true).abs() <= 4 * var.std(0) / math.sqrt(R)).all()
    # ... and the spread of repeated estimates is that variance
    torch.testing.assert_close(est.var(0), var_true, rtol=0.1, atol=0)


@pytest.mark.parametrize("K", [5, 20])  # 20 = T: one t per stratum, X_a and X_b differ only in ε
def test_noisy_model_mean_matches_exact_loop_and_se_matches_spread(K):
    T, B, R, E = 20, 4, 2000, 300
    d, model = diffusion(T), ToyModel(seed=4)
    x = grid_images(B, seed=5)
    # the exact loop has noise of its own (a fresh ε per t): average E independent runs
    exact = d.calc_bpd_loop(model, x.repeat(E, 1, 1, 1), generator=g(0))["total_bpd"].view(E, B)
    out = d.stratified_bpd(model, x.repeat(R, 1, 1, 1), K, generator=g(1))
    est, var = out["total_bpd"].view(R, B), out["variance"].view(R, B)

    # (a) unbiased: the grand means agree within 4 combined standard errors
    batch_mean = est.mean(1)  # [R], what the callback reports for a 4-image subset
    combined_se = math.sqrt(batch_mean.var() / R + exact.mean(1).var() / E)
    assert abs(batch_mean.mean() - exact.mean()) <= 4 * combined_se
    # and per image too (the estimator is unbiased image by image)
    per_image_se = (est.var(0) / R + exact.var(0) / E).sqrt()
    assert ((est.mean(0) - exact.mean(0)).abs() <= 4 * per_image_se).all()

    # (b) the reported SE of the batch mean, √(Σ_i v̂_i) / B, matches the spread of repeats
    reported_se = (var.sum(1) / B**2).mean().sqrt()
    assert abs(reported_se / batch_mean.std() - 1) < 0.1


# ======================================================== the callback


TINY = dict(image_size=8, in_channels=1, unet=TINY_UNET, timesteps=20)


class RecordingBitsPerDim(BitsPerDim):
    """Records the global step of each evaluation and the logged values."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps, self.logged = [], []

    def on_validation_epoch_end(self, trainer, pl_module):
        super().on_validation_epoch_end(trainer, pl_module)
        if self._val_epochs % self.every_n_val_epochs == 0 and not trainer.sanity_checking:
            self.steps.append(trainer.global_step)
            self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/bpd")})


def loaders(n_val=20, batch_size=8):
    x = grid_images(32 + n_val, size=8, seed=6, dtype=torch.float32)
    y = torch.zeros(len(x), dtype=torch.long)
    train = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x[32:], y[32:]), batch_size=batch_size)
    return train, val


def fit(callback, max_steps):
    torch.manual_seed(0)
    model = IDDPM(**TINY)
    train, val = loaders()
    trainer = Trainer(max_steps=max_steps, val_check_interval=2, check_val_every_n_epoch=None,
                      limit_val_batches=1, num_sanity_val_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(model, train, val)
    return trainer, model, val


@pytest.mark.parametrize("exact", [False, True])
def test_callback_logs_the_direct_computation_every_n_validations(exact):
    # Validations at steps 2 and 4 (the sanity check is skipped); every 2nd: step 4 only,
    # the last, so the module's eval weights after fit are those it evaluated.
    # 12 images: one full batch of 8 and 4 of the next (beyond limit_val_batches=1).
    cb = RecordingBitsPerDim(num_images=12, num_strata=5, every_n_val_epochs=2, exact=exact, seed=7)
    trainer, model, val = fit(cb, max_steps=4)
    assert cb.steps == [4] and cb._val_epochs == 2
    logged = cb.logged[0]
    assert set(logged) == ({"val/bpd"} if exact else {"val/bpd", "val/bpd_se"})
    assert float(trainer.callback_metrics["val/bpd"]) == logged["val/bpd"]

    # the same computation by hand: same images, batches, weights and generator key
    gen = seeded_generator(torch.device("cpu"), 7, 0, 4)
    x = torch.cat([b[0] for b in val])[:12]
    fn = model.model_fn(model.eval_unet.eval(), torch.zeros(12, dtype=torch.long))
    bpd_fn = model.diffusion.calc_bpd_loop if exact else (
        lambda f, xs, generator: model.diffusion.stratified_bpd(f, xs, 5, generator=generator))
    parts = [bpd_fn(fn, x[:8], generator=gen), bpd_fn(fn, x[8:], generator=gen)]
    bpd = torch.cat([p["total_bpd"] for p in parts]).double().mean().item()
    assert math.isfinite(logged["val/bpd"]) and logged["val/bpd"] > 0
    assert logged["val/bpd"] == pytest.approx(bpd, rel=1e-6)
    if not exact:
        se = math.sqrt(torch.cat([p["variance"] for p in parts]).double().sum().item()) / 12
        assert logged["val/bpd_se"] == pytest.approx(se, rel=1e-6) and se > 0


def test_num_strata_above_T_fails_at_setup_before_training():
    cb = BitsPerDim(num_strata=21)
    model = IDDPM(**TINY)
    before = [p.clone() for p in model.unet.parameters()]
    with pytest.raises(ConfigError, match="num_strata=21.*20 timesteps"):
        fit_trainer = Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                              enable_model_summary=False, callbacks=[cb])
        fit_trainer.fit(model, *loaders())
    assert all(torch.equal(a, b) for a, b in zip(before, model.unet.parameters()))


def test_bad_settings_are_config_errors():
    for kw in ({"num_images": 0}, {"num_strata": 0}, {"every_n_val_epochs": 0}):
        with pytest.raises(ConfigError, match=next(iter(kw))):
            BitsPerDim(**kw)
