"""GaussianDiffusion against independent numpy routes.

The reference formulas below are written directly from the definitions (product of
Gaussians for the posterior, the paper's learned-range interpolation, the tanh CDF),
not from the library, and are evaluated in float64 numpy.
"""

import math

import numpy as np
import pytest
import torch

from iddpm_lightning.diffusion import GaussianDiffusion, Sampler, get_named_beta_schedule, space_timesteps

F64 = torch.float64
LN2 = math.log(2.0)


# ============================================================ reference routes


def np_(x):
    return x.detach().cpu().to(F64).numpy()


def ref_tables(betas):
    """abar_t, abar_{t-1} (abar_{-1} = 1) and the posterior variance, from first principles."""
    betas = np.asarray(betas, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    # precision of q(x_{t-1}|x_t,x_0) = alpha_t/beta_t + 1/(1 - abar_{t-1})  (t >= 1)
    with np.errstate(divide="ignore"):
        post_var = 1.0 / ((1.0 - betas) / betas + 1.0 / (1.0 - abar_prev))
    post_var[0] = 0.0  # x_{-1} := x_0 is known exactly given x_0
    return abar, abar_prev, post_var


def ref_posterior(betas, x0, xt, t):
    """Mean/variance of q(x_{t-1}|x_t,x_0) as a product of two Gaussians in x_{t-1}.

    q(x_t|x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t)  ->  precision alpha_t/beta_t, centre x_t/sqrt(alpha_t)
    q(x_{t-1}|x_0) = N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1})
    At t = 0 the result is x_0 with variance 0.
    """
    betas = np.asarray(betas, dtype=np.float64)
    abar, abar_prev, _ = ref_tables(betas)
    mean = np.empty_like(xt)
    var = np.empty_like(xt)
    for i, ti in enumerate(t):
        if ti == 0:
            mean[i] = x0[i]
            var[i] = 0.0
            continue
        alpha = 1.0 - betas[ti]
        p1, c1 = alpha / betas[ti], xt[i] / math.sqrt(alpha)
        p2, c2 = 1.0 / (1.0 - abar_prev[ti]), math.sqrt(abar_prev[ti]) * x0[i]
        var[i] = 1.0 / (p1 + p2)
        mean[i] = var[i] * (p1 * c1 + p2 * c2)
    return mean, var


def ref_p_mean_logvar(betas, xt, t, out, channels, var_type, clip):
    """Reverse-process mean, log variance and x0-prediction from a raw model output."""
    betas = np.asarray(betas, dtype=np.float64)
    abar, _, post_var = ref_tables(betas)
    log_post_clipped = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    a = abar[t][:, None, None, None]
    eps = out[:, :channels]
    x0_hat = (xt - np.sqrt(1.0 - a) * eps) / np.sqrt(a)
    if clip:
        x0_hat = np.clip(x0_hat, -1.0, 1.0)
    mean, _ = ref_posterior(betas, x0_hat, xt, t)
    shape = (len(t),) + (1,) * (xt.ndim - 1)
    if var_type == "learned_range":
        frac = (out[:, channels:] + 1.0) / 2.0
        logvar = frac * np.log(betas[t]).reshape(shape) + (1 - frac) * log_post_clipped[t].reshape(shape)
    elif var_type == "fixed_large":
        large = np.concatenate([[post_var[1]], betas[1:]])
        logvar = np.broadcast_to(np.log(large[t]).reshape(shape), xt.shape)
    else:  # fixed_small
        logvar = np.broadcast_to(log_post_clipped[t].reshape(shape), xt.shape)
    return mean, np.array(logvar), x0_hat


def ref_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def tanh_cdf(x):
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def ref_disc_ll(x, mu, log_scale):
    inv = np.exp(-log_scale)
    upper = tanh_cdf(inv * (x - mu + 1 / 255))
    lower = tanh_cdf(inv * (x - mu - 1 / 255))
    mid = np.log(np.maximum(upper - lower, 1e-12))
    return np.where(
        x < -0.999,
        np.log(np.maximum(upper, 1e-12)),
        np.where(x > 0.999, np.log(np.maximum(1 - lower, 1e-12)), mid),
    )


def mean_flat(a):
    return a.reshape(a.shape[0], -1).mean(axis=1)


def ref_vb_bits(betas, x0, xt, t, out, channels, var_type, clip):
    """L_t in bits/dim: KL(q || p_theta) for t >= 1, -log p(x_0 | x_1) discretized at t = 0."""
    mean_p, logvar_p, _ = ref_p_mean_logvar(betas, xt, t, out, channels, var_type, clip)
    mean_q, var_q = ref_posterior(betas, x0, xt, t)
    vb = np.empty(len(t))
    for i, ti in enumerate(t):
        if ti == 0:
            nll = -ref_disc_ll(x0[i], mean_p[i], 0.5 * logvar_p[i])
            vb[i] = nll.mean() / LN2
        else:
            vb[i] = ref_kl(mean_q[i], np.log(var_q[i]), mean_p[i], logvar_p[i]).mean() / LN2
    return vb


# ================================================================= models


class ToyModel:
    """Deterministic stand-in for a UNet.

    Per-pixel channel mixing with fixed random weights plus a bias that depends on t,
    squashed by tanh (so v stays in [-1, 1]). Optionally records every call.
    """

    def __init__(self, channels, learned, seed=0, record=False):
        g = torch.Generator().manual_seed(seed)
        self.channels = channels
        self.learned = learned
        out_c = 2 * channels if learned else channels
        self.w = torch.randn(out_c, channels, generator=g, dtype=F64)
        self.b = 0.3 * torch.randn(out_c, generator=g, dtype=F64)
        self.freq = torch.rand(out_c, generator=g, dtype=F64)
        self.record = record
        self.calls = []

    def __call__(self, x, t):
        assert t.dtype == torch.long
        assert t.shape == (x.shape[0],)
        dt = x.dtype
        bias = self.b.to(dt) + torch.sin(t.to(dt)[:, None] * self.freq.to(dt))
        h = torch.einsum("oc,bchw->bohw", self.w.to(dt), x) + bias[:, :, None, None]
        out = torch.tanh(h)
        C = self.channels
        if self.learned:
            out = torch.cat([1.5 * out[:, :C], out[:, C:]], dim=1)
        else:
            out = 1.5 * out
        if self.record:
            self.calls.append(dict(x=x.detach().clone(), t=t.detach().clone(), out=out.detach().clone()))
        return out


class PerfectModel:
    """Knows x_0: returns the exact noise for every x_t, and v = -1 (posterior variance).

    Uses the ORIGINAL process's abar indexed by the t it receives, so a respaced
    diffusion that passes the wrong indices gets a wrong epsilon.
    """

    def __init__(self, x0, abar_original, learned=True):
        self.x0 = x0
        self.abar = torch.as_tensor(np.asarray(abar_original), dtype=F64)
        self.learned = learned
        self.ts = []

    def __call__(self, x, t):
        assert t.dtype == torch.long
        self.ts.append(t.clone())
        a = self.abar[t].to(x.dtype).view(-1, 1, 1, 1)
        x0 = self.x0.to(x.dtype).repeat(len(x) // len(self.x0), 1, 1, 1)  # k timesteps of the B images, t-major
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if self.learned:
            return torch.cat([eps, -torch.ones_like(eps)], dim=1)
        return eps


class SpyModel:
    """Records the t it receives, returns zeros (plus v = 0 if learned)."""

    def __init__(self, channels, learned):
        self.channels = channels
        self.learned = learned
        self.ts = []

    def __call__(self, x, t):
        assert t.dtype == torch.long
        self.ts.append(t.clone())
        c = 2 * self.channels if self.learned else self.channels
        return torch.zeros(x.shape[0], c, *x.shape[2:], dtype=x.dtype)


def grid_image(shape, seed):
    """Image with values on the 256-level grid in [-1, 1], including both ends."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 256, shape, generator=g)
    k.view(-1)[0] = 0
    k.view(-1)[-1] = 255
    return -1.0 + 2.0 * k.to(F64) / 255.0


T_SMALL = 20


@pytest.fixture(scope="module")
def betas20():
    return get_named_beta_schedule("cosine", T_SMALL)


# ========================================================== construction


def test_buffers_are_float64_and_tables_match(betas20):
    d = GaussianDiffusion(betas20, model_var_type="learned_range", loss_type="hybrid")
    assert isinstance(d, torch.nn.Module)
    assert d.num_timesteps == T_SMALL
    abar, abar_prev, post_var = ref_tables(betas20)
    for name in [
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    ]:
        buf = getattr(d, name)
        assert isinstance(buf, torch.Tensor), name
        assert buf.dtype == F64, name
        assert buf.shape == (T_SMALL,), name
    np.testing.assert_allclose(np_(d.betas), betas20, rtol=0, atol=0)
    np.testing.assert_allclose(np_(d.alphas_cumprod), abar, rtol=1e-12)
    np.testing.assert_allclose(np_(d.alphas_cumprod_prev), abar_prev, rtol=1e-12)
    np.testing.assert_allclose(np_(d.posterior_variance[1:]), post_var[1:], rtol=1e-10)
    assert abs(d.posterior_variance[0].item()) < 1e-15
    np.testing.assert_allclose(
        np_(d.posterior_log_variance_clipped), np.log(np.r_[post_var[1], post_var[1:]]), rtol=1e-10
    )
    assert d.timestep_map.dtype == torch.long
    assert d.timestep_map.tolist() == list(range(T_SMALL))


@pytest.mark.parametrize("kw", [dict(model_var_type="learned"), dict(loss_type="kl"), dict(loss_type="mse")])
def test_bad_names_raise(betas20, kw):
    args = dict(model_var_type="learned_range", loss_type="hybrid")
    args.update(kw)
    with pytest.raises(ValueError):
        GaussianDiffusion(betas20, **args)


# ============================================================== forward q


def test_q_sample_closed_form(betas20):
    d = GaussianDiffusion(betas20, model_var_type="fixed_small", loss_type="simple")
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 2, 4, 4, generator=g, dtype=F64) * 2 - 1
    noise = torch.randn(4, 2, 4, 4, generator=g, dtype=F64)
    t = torch.tensor([0, 5, 13, 19])
    xt = d.q_sample(x0, t, noise=noise)
    abar, _, _ = ref_tables(betas20)
    a = abar[t.numpy()][:, None, None, None]
    np.testing.assert_allclose(np_(xt), np.sqrt(a) * np_(x0) + np.sqrt(1 - a) * np_(noise), rtol=1e-12, atol=1e-14)


def test_q_sample_statistics_without_noise(betas20):
    d = GaussianDiffusion(betas20, model_var_type="fixed_small", loss_type="simple")
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 2, 2), 0.6, dtype=F64)
    t = torch.full((20000,), 9, dtype=torch.long)
    xt = d.q_sample(x0, t)
    a = ref_tables(betas20)[0][9]
    n = xt.numel()
    assert xt.mean().item() == pytest.approx(math.sqrt(a) * 0.6, abs=5 * math.sqrt((1 - a) / n))
    assert xt.var().item() == pytest.approx(1 - a, rel=5 * math.sqrt(2 / n))


def test_q_posterior_is_product_of_gaussians(betas20):
    d = GaussianDiffusion(betas20, model_var_type="learned_range", loss_type="hybrid")
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(5, 2, 3, 3, generator=g, dtype=F64) * 2 - 1
    xt = torch.randn(5, 2, 3, 3, generator=g, dtype=F64)
    t = torch.tensor([1, 2, 7, 18, 19])
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    assert mean.shape == var.shape == logvar.shape == x0.shape
    ref_m, ref_v = ref_posterior(betas20, np_(x0), np_(xt), t.numpy())
    np.testing.assert_allclose(np_(mean), ref_m, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np_(var), ref_v, rtol=1e-10)
    np.testing.assert_allclose(np_(logvar), np.log(ref_v), rtol=1e-10)


def test_q_posterior_at_t0_and_clipped_log_variance(betas20):
    d = GaussianDiffusion(betas20, model_var_type="learned_range", loss_type="hybrid")
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 1, 4, 4, generator=g, dtype=F64) * 2 - 1
    xt = torch.randn(2, 1, 4, 4, generator=g, dtype=F64)
    t = torch.tensor([0, 1])
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    # at t = 0 the posterior collapses onto x_0
    np.testing.assert_allclose(np_(mean[0]), np_(x0[0]), rtol=0, atol=1e-12)
    assert torch.all(var[0].abs() < 1e-15)
    # its log variance is clipped to that of t = 1, computed independently
    _, ref_v1 = ref_posterior(betas20, np_(x0[1:]), np_(xt[1:]), [1])
    np.testing.assert_allclose(np_(logvar[0]), np.log(ref_v1[0]), rtol=1e-10)
    np.testing.assert_allclose(np_(logvar[0]), np_(logvar[1]), rtol=1e-12)
    assert logvar[0, 0, 0, 0].item() == pytest.approx(math.log(d.posterior_variance[1].item()), rel=1e-12)


# ============================================================== reverse p


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned_range"])
def test_p_mean_variance_matches_reference(betas20, var_type, clip):
    d = GaussianDiffusion(betas20, model_var_type=var_type, loss_type="hybrid" if var_type == "learned_range" else "simple")
    model = ToyModel(2, learned=var_type == "learned_range", seed=7)
    g = torch.Generator().manual_seed(8)
    xt = torch.randn(5, 2, 4, 4, generator=g, dtype=F64) * 1.3
    t = torch.tensor([0, 1, 4, 11, 19])
    out = d.p_mean_variance(model, xt, t, clip_denoised=clip)
    raw = np_(model(xt, t))
    ref_mean, ref_logvar, ref_x0 = ref_p_mean_logvar(betas20, np_(xt), t.numpy(), raw, 2, var_type, clip)
    for k in ("mean", "variance", "log_variance", "pred_xstart"):
        assert out[k].shape == xt.shape, k
    np.testing.assert_allclose(np_(out["pred_xstart"]), ref_x0, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np_(out["mean"]), ref_mean, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(np_(out["log_variance"]), ref_logvar, rtol=1e-10, atol=1e-12)
    if var_type == "learned_range":
        np.testing.assert_allclose(np_(out["variance"]), np.exp(ref_logvar), rtol=1e-10)
    if clip:
        assert out["pred_xstart"].abs().max().item() <= 1.0
    else:
        assert out["pred_xstart"].abs().max().item() > 1.0  # the toy model does leave [-1, 1]


def test_fixed_large_variance_is_beta_with_t0_replaced(betas20):
    d = GaussianDiffusion(betas20, model_var_type="fixed_large", loss_type="simple")
    t = torch.arange(T_SMALL)
    xt = torch.zeros(T_SMALL, 1, 2, 2, dtype=F64)
    out = d.p_mean_variance(SpyModel(1, False), xt, t)
    var = np_(out["variance"])[:, 0, 0, 0]
    _, _, post_var = ref_tables(betas20)
    np.testing.assert_allclose(var[1:], betas20[1:], rtol=1e-12)
    assert var[0] == pytest.approx(post_var[1], rel=1e-10)
    np.testing.assert_allclose(np_(out["log_variance"])[:, 0, 0, 0], np.log(var), rtol=1e-12)


def test_fixed_small_variance_is_posterior_variance(betas20):
    d = GaussianDiffusion(betas20, model_var_type="fixed_small", loss_type="simple")
    t = torch.arange(T_SMALL)
    xt = torch.zeros(T_SMALL, 1, 2, 2, dtype=F64)
    out = d.p_mean_variance(SpyModel(1, False), xt, t)
    var = np_(out["variance"])[:, 0, 0, 0]
    logvar = np_(out["log_variance"])[:, 0, 0, 0]
    _, _, post_var = ref_tables(betas20)
    np.testing.assert_allclose(var[1:], post_var[1:], rtol=1e-10)
    np.testing.assert_allclose(var, np_(d.posterior_variance), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(logvar[1:], np.log(post_var[1:]), rtol=1e-10)
    assert logvar[0] == pytest.approx(math.log(post_var[1]), rel=1e-10)  # clipped at t = 0


@pytest.mark.parametrize("v,frac", [(-1.0, 0.0), (1.0, 1.0), (0.0, 0.5), (0.4, 0.7), (1.5, 1.25), (-2.0, -0.5)])
def test_learned_range_interpolation_unclamped(betas20, v, frac):
    d = GaussianDiffusion(betas20, model_var_type="learned_range", loss_type="hybrid")
    t = torch.arange(T_SMALL)
    xt = torch.zeros(T_SMALL, 1, 2, 2, dtype=F64)

    def model(x, tt):
        return torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)

    logvar = np_(d.p_mean_variance(model, xt, t)["log_variance"])[:, 0, 0, 0]
    _, _, post_var = ref_tables(betas20)
    log_post_clipped = np.log(np.r_[post_var[1], post_var[1:]])
    expected = frac * np.log(betas20) + (1 - frac) * log_post_clipped
    np.testing.assert_allclose(logvar, expected, rtol=1e-10, atol=1e-12)


# ======================================================== training losses


def _setup_losses(T, loss_type, var_type, seed=11, B=6, C=2):
    betas = get_named_beta_schedule("cosine", T)
    d = GaussianDiffusion(betas, model_var_type=var_type, loss_type=loss_type)
    g = torch.Generator().manual_seed(seed)
    x0 = grid_image((B, C, 4, 4), seed)
    noise = torch.randn(B, C, 4, 4, generator=g, dtype=F64)
    t = torch.tensor([0, 1, T // 3, T // 2, T - 2, T - 1][:B])
    return betas, d, x0, noise, t


@pytest.mark.parametrize("T", [50, 2000])
def test_hybrid_loss_value(T):
    betas, d, x0, noise, t = _setup_losses(T, "hybrid", "learned_range")
    model = ToyModel(2, learned=True, seed=12)
    terms = d.training_losses(model, x0, t, noise=noise)
    for k in ("loss", "mse", "vb"):
        assert terms[k].shape == (6,), k
    xt = np_(d.q_sample(x0, t, noise=noise))
    raw = np_(model(torch.as_tensor(xt), t))
    ref_mse = mean_flat((np_(noise) - raw[:, :2]) ** 2)
    ref_vb = ref_vb_bits(betas, np_(x0), xt, t.numpy(), raw, 2, "learned_range", clip=False)
    np.testing.assert_allclose(np_(terms["mse"]), ref_mse, rtol=1e-10)
    np.testing.assert_allclose(np_(terms["vb"]), ref_vb, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(np_(terms["loss"]), ref_mse + (T / 1000.0) * ref_vb, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(
        np_(terms["loss"]), np_(terms["mse"] + (T / 1000.0) * terms["vb"]), rtol=1e-12, atol=1e-14
    )


def test_vlb_loss_value():
    T = 50
    betas, d, x0, noise, t = _setup_losses(T, "vlb", "learned_range", seed=13)
    model = ToyModel(2, learned=True, seed=14)
    terms = d.training_losses(model, x0, t, noise=noise)
    xt = np_(d.q_sample(x0, t, noise=noise))
    raw = np_(model(torch.as_tensor(xt), t))
    ref_vb = ref_vb_bits(betas, np_(x0), xt, t.numpy(), raw, 2, "learned_range", clip=False)
    np.testing.assert_allclose(np_(terms["vb"]), ref_vb, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(np_(terms["loss"]), T * ref_vb, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(np_(terms["loss"]), np_(T * terms["vb"]), rtol=1e-12)
    np.testing.assert_allclose(np_(terms["mse"]), mean_flat((np_(noise) - raw[:, :2]) ** 2), rtol=1e-10)


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_simple_loss_is_mse(var_type):
    T = 50
    betas, d, x0, noise, t = _setup_losses(T, "simple", var_type, seed=15)
    model = ToyModel(2, learned=False, seed=16)
    terms = d.training_losses(model, x0, t, noise=noise)
    for k in ("loss", "mse", "vb"):
        assert terms[k].shape == (6,), k
    xt = d.q_sample(x0, t, noise=noise)
    ref_mse = mean_flat((np_(noise) - np_(model(xt, t))) ** 2)
    np.testing.assert_allclose(np_(terms["mse"]), ref_mse, rtol=1e-10)
    np.testing.assert_allclose(np_(terms["loss"]), ref_mse, rtol=1e-10)


def test_vb_at_t0_is_negative_discretized_log_likelihood_in_bits():
    # a second, explicit version of the t = 0 term with a hand-built model output
    T = 50
    betas = get_named_beta_schedule("cosine", T)
    d = GaussianDiffusion(betas, model_var_type="learned_range", loss_type="vlb")
    B, C = 3, 1
    x0 = grid_image((B, C, 4, 4), 21)
    g = torch.Generator().manual_seed(22)
    noise = torch.randn(B, C, 4, 4, generator=g, dtype=F64)
    eps_hat = noise + 0.3 * torch.randn(B, C, 4, 4, generator=g, dtype=F64)
    v = torch.rand(B, C, 4, 4, generator=g, dtype=F64) * 2 - 1
    out = torch.cat([eps_hat, v], dim=1)
    t = torch.zeros(B, dtype=torch.long)
    terms = d.training_losses(lambda x, tt: out, x0, t, noise=noise)

    abar0 = 1.0 - betas[0]
    xt = math.sqrt(abar0) * np_(x0) + math.sqrt(1 - abar0) * np_(noise)
    mu = (xt - math.sqrt(1 - abar0) * np_(eps_hat)) / math.sqrt(abar0)  # posterior mean at t=0 is x0_hat
    post_var1 = betas[1] * (1 - abar0) / (1 - abar0 * (1 - betas[1]))
    frac = (np_(v) + 1) / 2
    log_var = frac * math.log(betas[0]) + (1 - frac) * math.log(post_var1)
    nll_bits = -ref_disc_ll(np_(x0), mu, 0.5 * log_var).reshape(B, -1).mean(1) / LN2
    np.testing.assert_allclose(np_(terms["vb"]), nll_bits, rtol=1e-9)
    assert np.all(nll_bits > 0)


def test_vb_at_t_ge_1_is_mean_kl_in_bits():
    T = 50
    betas = get_named_beta_schedule("cosine", T)
    d = GaussianDiffusion(betas, model_var_type="learned_range", loss_type="vlb")
    B, C = 3, 2
    x0 = grid_image((B, C, 4, 4), 23)
    g = torch.Generator().manual_seed(24)
    noise = torch.randn(B, C, 4, 4, generator=g, dtype=F64)
    eps_hat = noise + 0.2 * torch.randn(B, C, 4, 4, generator=g, dtype=F64)
    v = torch.tanh(torch.randn(B, C, 4, 4, generator=g, dtype=F64))
    t = torch.tensor([1, 17, 40])
    terms = d.training_losses(lambda x, tt: torch.cat([eps_hat, v], 1), x0, t, noise=noise)

    abar = np.cumprod(1 - betas)
    vals = []
    for i, ti in enumerate(t.tolist()):
        a, a_prev, b = abar[ti], abar[ti - 1], betas[ti]
        xt = math.sqrt(a) * np_(x0[i]) + math.sqrt(1 - a) * np_(noise[i])
        x0_hat = (xt - math.sqrt(1 - a) * np_(eps_hat[i])) / math.sqrt(a)
        tilde_beta = (1 - a_prev) / (1 - a) * b
        tilde_mu = lambda z: math.sqrt(a_prev) * b / (1 - a) * z + math.sqrt(1 - b) * (1 - a_prev) / (1 - a) * xt  # noqa: E731
        frac = (np_(v[i]) + 1) / 2
        lv = frac * math.log(b) + (1 - frac) * math.log(tilde_beta)
        kl = ref_kl(tilde_mu(np_(x0[i])), math.log(tilde_beta), tilde_mu(x0_hat), lv)
        vals.append(kl.mean() / LN2)
    np.testing.assert_allclose(np_(terms["vb"]), np.array(vals), rtol=1e-9)


def _grads(d, out_value, x0, t, noise, key):
    leaf = out_value.clone().requires_grad_(True)
    terms = d.training_losses(lambda x, tt: leaf, x0, t, noise=noise)
    terms[key].sum().backward()
    return leaf.grad.clone()


def test_hybrid_gradients_split_between_mean_and_variance():
    T = 50
    betas, d, x0, noise, t = _setup_losses(T, "hybrid", "learned_range", seed=31, B=5, C=2)
    g = torch.Generator().manual_seed(32)
    out = torch.cat(
        [noise + 0.3 * torch.randn(5, 2, 4, 4, generator=g, dtype=F64), torch.tanh(torch.randn(5, 2, 4, 4, generator=g, dtype=F64))],
        dim=1,
    )
    g_loss = _grads(d, out, x0, t, noise, "loss")
    g_mse = _grads(d, out, x0, t, noise, "mse")
    g_vb = _grads(d, out, x0, t, noise, "vb")
    eps_half, v_half = slice(0, 2), slice(2, 4)
    # eps half: exactly the mse gradient, which is 2 (eps_hat - eps) / (C H W)
    torch.testing.assert_close(g_loss[:, eps_half], g_mse[:, eps_half], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g_mse[:, eps_half], 2 * (out[:, eps_half] - noise) / (2 * 4 * 4), rtol=1e-12, atol=1e-15)
    # vb sees a detached eps, mse does not see v
    assert torch.all(g_vb[:, eps_half] == 0)
    assert torch.all(g_mse[:, v_half] == 0)
    # v half: only from vb, scaled by T/1000
    assert g_vb[:, v_half].abs().max().item() > 1e-6
    torch.testing.assert_close(g_loss[:, v_half], (T / 1000.0) * g_vb[:, v_half], rtol=1e-10, atol=1e-15)


def test_vlb_gradients_reach_the_mean():
    T = 50
    betas, d, x0, noise, t = _setup_losses(T, "vlb", "learned_range", seed=33, B=5, C=2)
    g = torch.Generator().manual_seed(34)
    out = torch.cat(
        [noise + 0.3 * torch.randn(5, 2, 4, 4, generator=g, dtype=F64), torch.tanh(torch.randn(5, 2, 4, 4, generator=g, dtype=F64))],
        dim=1,
    )
    g_loss = _grads(d, out, x0, t, noise, "loss")
    g_vb = _grads(d, out, x0, t, noise, "vb")
    assert g_loss[:, :2].abs().max().item() > 1e-6  # the mean learns from L_vlb
    assert g_loss[:, 2:].abs().max().item() > 1e-6
    torch.testing.assert_close(g_loss, T * g_vb, rtol=1e-10, atol=1e-15)


# ========================================================= bits per dim


def test_perfect_model_bpd():
    T = 20
    betas = get_named_beta_schedule("cosine", T)
    d = GaussianDiffusion(betas, model_var_type="learned_range", loss_type="hybrid")
    B, C = 2, 1
    x0 = grid_image((1, C, 4, 4), 41).expand(B, C, 4, 4).contiguous()  # single-image dataset
    abar = np.cumprod(1 - betas)
    model = PerfectModel(x0, abar)
    out = d.calc_bpd_loop(model, x0, clip_denoised=True, generator=torch.Generator().manual_seed(0))
    assert out["vb"].shape == (B, T) and out["mse"].shape == (B, T) and out["xstart_mse"].shape == (B, T)
    assert out["total_bpd"].shape == (B,) and out["prior_bpd"].shape == (B,)
    # the model received every original timestep once, for each image (t-major rows)
    assert sorted(torch.cat(model.ts).view(-1, B)[:, 0].tolist()) == list(range(T))

    assert out["vb"][:, 1:].abs().max().item() < 1e-6  # every KL vanishes
    assert out["mse"].abs().max().item() < 1e-10
    assert out["xstart_mse"].abs().max().item() < 1e-10

    # prior: KL(N(sqrt(abar_{T-1}) x0, 1 - abar_{T-1}) || N(0, 1)), mean over dims, in bits
    a = abar[-1]
    prior = 0.5 * (-math.log(1 - a) + (1 - a) + a * np_(x0) ** 2 - 1)
    np.testing.assert_allclose(np_(out["prior_bpd"]), mean_flat(prior) / LN2, rtol=1e-9)

    # t = 0: discretized NLL of x0 under N(x0, posterior_variance[1]) in bits
    post_var1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
    nll0 = -ref_disc_ll(np_(x0), np_(x0), 0.5 * math.log(post_var1))
    np.testing.assert_allclose(np_(out["vb"][:, 0]), mean_flat(nll0) / LN2, rtol=1e-9)

    np.testing.assert_allclose(
        np_(out["total_bpd"]), np_(out["vb"][:, 0] + out["prior_bpd"]), rtol=0, atol=2e-6
    )
    np.testing.assert_allclose(np_(out["total_bpd"]), np_(out["vb"].sum(1) + out["prior_bpd"]), rtol=1e-12)


def test_perfect_model_bpd_respaced():
    # a respaced process is a diffusion process too: the ideal model (which needs the
    # ORIGINAL index to compute its epsilon) still makes every KL vanish
    T = 40
    betas = get_named_beta_schedule("cosine", T)
    base = GaussianDiffusion(betas, model_var_type="learned_range", loss_type="hybrid")
    d = base.respace("8")
    kept = space_timesteps(T, "8")
    x0 = grid_image((2, 1, 4, 4), 42)
    model = PerfectModel(x0, np.cumprod(1 - betas))
    out = d.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(1))
    assert out["vb"].shape == (2, 8)
    assert sorted(torch.cat(model.ts).view(-1, 2)[:, 0].tolist()) == kept
    assert out["vb"][:, 1:].abs().max().item() < 1e-6
    a = np.cumprod(1 - betas)[kept[-1]]
    prior = 0.5 * (-math.log(1 - a) + (1 - a) + a * np_(x0) ** 2 - 1)
    np.testing.assert_allclose(np_(out["prior_bpd"]), mean_flat(prior) / LN2, rtol=1e-9)


@pytest.mark.parametrize("clip", [True, False])
def test_calc_bpd_loop_columns_recomputed_from_recorded_calls(clip):
    # A recording model reveals each x_t the loop used; from x_t the noise follows,
    # and every column (vb, mse of the implied eps, xstart_mse) is recomputed here.
    T = 12
    betas = get_named_beta_schedule("cosine", T)
    d = GaussianDiffusion(betas, model_var_type="learned_range", loss_type="hybrid")
    B, C = 3, 2
    x0 = grid_image((B, C, 4, 4), 43)
    model = ToyModel(C, learned=True, seed=44, record=True)
    # one timestep per call, so each call is one column (batching is checked in test_batched_bpd.py)
    out = d.calc_bpd_loop(model, x0, clip_denoised=clip, generator=torch.Generator().manual_seed(2), max_batch=B)
    assert len(model.calls) == T
    abar = np.cumprod(1 - betas)
    noises = {}
    for call in model.calls:
        tt = call["t"].numpy()
        assert np.all(tt == tt[0])
        ti = int(tt[0])
        xt, raw = np_(call["x"]), np_(call["out"])
        a = abar[ti]
        noise = (xt - math.sqrt(a) * np_(x0)) / math.sqrt(1 - a)
        noises[ti] = noise
        _, _, x0_hat = ref_p_mean_logvar(betas, xt, tt, raw, C, "learned_range", clip)
        eps_implied = (xt - math.sqrt(a) * x0_hat) / math.sqrt(1 - a)
        np.testing.assert_allclose(np_(out["mse"][:, ti]), mean_flat((eps_implied - noise) ** 2), rtol=1e-8)
        np.testing.assert_allclose(np_(out["xstart_mse"][:, ti]), mean_flat((x0_hat - np_(x0)) ** 2), rtol=1e-8)
        ref_vb = ref_vb_bits(betas, np_(x0), xt, tt, raw, C, "learned_range", clip)
        np.testing.assert_allclose(np_(out["vb"][:, ti]), ref_vb, rtol=1e-8, atol=1e-12)
    assert sorted(noises) == list(range(T))
    # fresh noise for every t
    assert np.abs(noises[3] - noises[4]).max() > 1e-3
    np.testing.assert_allclose(np_(out["total_bpd"]), np_(out["vb"].sum(1) + out["prior_bpd"]), rtol=1e-12)


def test_training_vb_is_unbiased_estimate_of_bpd_loop():
    # E_t[T * vb_t] from training_losses (t uniform, here stratified: every t equally
    # often) must match the sum over t of calc_bpd_loop's vb, both averaged over noise
    T = 20
    betas = get_named_beta_schedule("cosine", T)
    d = GaussianDiffusion(betas, model_var_type="learned_range", loss_type="vlb")
    model = ToyModel(1, learned=True, seed=51)
    x_img = grid_image((1, 1, 4, 4), 52)
    K = 600
    torch.manual_seed(53)

    t = torch.arange(T).repeat_interleave(K)
    x_rep = x_img.expand(T * K, 1, 4, 4).contiguous()
    terms = d.training_losses(model, x_rep, t)
    vb_train = np_(terms["vb"]).reshape(T, K)  # row = timestep
    mse_train = np_(terms["mse"]).reshape(T, K)
    np.testing.assert_allclose(np_(terms["loss"]), T * np_(terms["vb"]), rtol=1e-12)

    bpd = d.calc_bpd_loop(model, x_img.expand(K, 1, 4, 4).contiguous(), clip_denoised=False,
                          generator=torch.Generator().manual_seed(54))
    vb_loop = np_(bpd["vb"])  # [K, T]
    mse_loop = np_(bpd["mse"])

    # column t of the loop is timestep t: compare per timestep
    for ti in range(T):
        for a, b in ((vb_train[ti], vb_loop[:, ti]), (mse_train[ti], mse_loop[:, ti])):
            se = math.sqrt(a.var(ddof=1) / K + b.var(ddof=1) / K)
            assert abs(a.mean() - b.mean()) <= 5 * se + 1e-12, ti

    # total: mean over uniform t of T * vb  vs  vb.sum(1)
    est_train = T * vb_train.mean()
    se_train = T * math.sqrt(np.sum(vb_train.var(axis=1, ddof=1) / K) / T**2)
    est_loop = vb_loop.sum(1).mean()
    se_loop = vb_loop.sum(1).std(ddof=1) / math.sqrt(K)
    assert abs(est_train - est_loop) <= 4 * math.sqrt(se_train**2 + se_loop**2)
    assert est_loop > 0


# ============================================================= respacing


@pytest.mark.parametrize("spec", ["10", "3,4", "ddim5", "50"])
def test_respaced_tables(spec):
    T = 50
    betas = get_named_beta_schedule("cosine", T)
    base = GaussianDiffusion(betas, model_var_type="learned_range", loss_type="hybrid")
    d = base.respace(spec)
    kept = space_timesteps(T, spec)
    assert isinstance(d, GaussianDiffusion)
    assert d.num_timesteps == len(kept)
    assert d.timestep_map.dtype == torch.long
    assert d.timestep_map.tolist() == kept
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(np_(d.alphas_cumprod), abar[kept], rtol=1e-12)
    abar_k = abar[kept]
    new_betas = 1 - abar_k / np.r_[1.0, abar_k[:-1]]
    np.testing.assert_allclose(np_(d.betas), new_betas, rtol=1e-10)
    assert d.betas.dtype == F64
    # base untouched
    np.testing.assert_allclose(np_(base.alphas_cumprod), abar, rtol=1e-12)
    assert base.num_timesteps == T


def test_respace_everything_is_identity():
    betas = get_named_beta_schedule("cosine", 30)
    base = GaussianDiffusion(betas, model_var_type="learned_range", loss_type="hybrid")
    d = base.respace("30")
    np.testing.assert_allclose(np_(d.betas), betas, rtol=1e-10)
    np.testing.assert_allclose(np_(d.posterior_variance), np_(base.posterior_variance), rtol=1e-9, atol=1e-15)


def test_a_reverse_process_that_skips_its_first_steps_starts_from_noise_below_t_prime():
    """``respace`` over the kept steps below t' = 0.75 T (the paper's Fig. 3): ᾱ of the kept steps,
    the first model call at the last kept step, and a respacing of T equal to respacing by its kept steps."""
    T = 40
    betas = get_named_beta_schedule("linear", T)
    base = GaussianDiffusion(betas, model_var_type="learned_range", loss_type="hybrid")
    kept = space_timesteps(30, "10")  # 10 steps spaced over [0, 30)
    d = base.respace(list(reversed(kept)))  # any order
    assert d.timestep_map.tolist() == kept and kept[-1] < 30
    np.testing.assert_allclose(np_(d.alphas_cumprod), np.cumprod(1 - betas)[kept], rtol=1e-12)
    spy = SpyModel(1, learned=True)
    Sampler("ddpm", None).sample(d, spy, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert [tt.tolist() for tt in spy.ts] == [[k, k] for k in reversed(kept)]
    np.testing.assert_array_equal(np_(base.respace("ddim5").betas), np_(base.respace(space_timesteps(T, "ddim5")).betas))
    with pytest.raises(ValueError, match="the kept steps must be steps of 0..39"):
        base.respace([3, 40])


def test_respaced_models_receive_original_indices_ancestral():
    T = 50
    betas = get_named_beta_schedule("cosine", T)
    d = GaussianDiffusion(betas, model_var_type="learned_range", loss_type="hybrid").respace("10,15")
    kept = space_timesteps(T, "10,15")
    spy = SpyModel(1, learned=True)
    x = Sampler("ddpm", None).sample(d, spy, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 4, 4)
    seen = [tt.tolist() for tt in spy.ts]
    assert seen == [[k, k] for k in reversed(kept)]


def test_respaced_models_receive_original_indices_ddim():
    T = 50
    d = GaussianDiffusion(get_named_beta_schedule("cosine", T), model_var_type="fixed_large", loss_type="simple").respace("ddim5")
    spy = SpyModel(1, learned=False)
    Sampler("ddim", None).sample(d, spy, (3, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert [tt.tolist() for tt in spy.ts] == [[k] * 3 for k in (40, 30, 20, 10, 0)]


def test_respaced_models_receive_original_indices_training_losses():
    T = 50
    d = GaussianDiffusion(get_named_beta_schedule("cosine", T), model_var_type="learned_range", loss_type="hybrid").respace("7")
    kept = space_timesteps(T, "7")
    spy = SpyModel(1, learned=True)
    t = torch.tensor([0, 3, 6, 2])
    x0 = grid_image((4, 1, 4, 4), 61)
    d.training_losses(spy, x0, t)
    assert len(spy.ts) >= 1
    for tt in spy.ts:
        assert tt.tolist() == [kept[i] for i in t.tolist()]


# ============================================================== sampling


def test_ddim_eta0_deterministic_given_xT():
    T = 20
    d = GaussianDiffusion(get_named_beta_schedule("cosine", T), model_var_type="learned_range", loss_type="hybrid")
    model = ToyModel(1, learned=True, seed=71)
    xT = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(72), dtype=F64)
    ddim0, ddim1 = Sampler("ddim", None, eta=0.0), Sampler("ddim", None, eta=1.0)
    a = ddim0.sample(d, model, noise=xT.clone(), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(999)
    b = ddim0.sample(d, model, noise=xT.clone(), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, xT)
    # with eta = 1 the generator matters
    c = ddim1.sample(d, model, noise=xT.clone(), generator=torch.Generator().manual_seed(1))
    e = ddim1.sample(d, model, noise=xT.clone(), generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(c, e)


def test_ancestral_sampling_generator_reproducibility():
    T = 20
    d = GaussianDiffusion(get_named_beta_schedule("cosine", T), model_var_type="learned_range", loss_type="hybrid")
    model = ToyModel(1, learned=True, seed=73)
    shape = (3, 1, 4, 4)
    ddpm = Sampler("ddpm", None)
    a = ddpm.sample(d, model, shape, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(1234)  # the global RNG must not matter
    b = ddpm.sample(d, model, shape, generator=torch.Generator().manual_seed(5))
    c = ddpm.sample(d, model, shape, generator=torch.Generator().manual_seed(6))
    assert a.shape == shape
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # same x_T, different generator: the per-step noise differs
    xT = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    e = ddpm.sample(d, model, noise=xT.clone(), generator=torch.Generator().manual_seed(8))
    f = ddpm.sample(d, model, noise=xT.clone(), generator=torch.Generator().manual_seed(9))
    assert not torch.allclose(e, f)


@pytest.mark.parametrize("respace", [None, "5", "ddim4"])
def test_samplers_recover_x0_with_perfect_model(respace):
    # with the ideal epsilon every x0-prediction is x_0; DDIM (eta=0) lands on it and
    # the ancestral sampler's last step (t = 0, no noise) returns the posterior mean = x_0
    T = 20
    betas = get_named_beta_schedule("cosine", T)
    d = GaussianDiffusion(betas, model_var_type="learned_range", loss_type="hybrid")
    if respace:
        d = d.respace(respace)
    x0 = grid_image((2, 1, 4, 4), 81)
    abar = np.cumprod(1 - betas)
    xT = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(82), dtype=F64)
    ddim = Sampler("ddim", None, eta=0.0).sample(d, PerfectModel(x0, abar), noise=xT.clone())
    anc = Sampler("ddpm", None).sample(d, PerfectModel(x0, abar), noise=xT.clone(), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ddim, x0, rtol=0, atol=1e-8)
    torch.testing.assert_close(anc, x0, rtol=0, atol=1e-8)


@pytest.mark.parametrize("clip", [True, False])
def test_ddim_two_step_closed_form(clip):
    # hand-made schedule (abar stays well above 0, so x0_hat is mostly inside [-1, 1]),
    # respaced to its two ends: step T-1 -> step 0 -> x_0, following DDIM (eta = 0)
    # x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps(x0_hat), with eps re-derived
    # from the (clipped) x0_hat, and the last step returning x0_hat itself
    T = 10
    betas = np.linspace(0.01, 0.2, T)
    d = GaussianDiffusion(betas, model_var_type="fixed_large", loss_type="simple").respace("2")
    assert d.timestep_map.tolist() == [0, T - 1]
    model = ToyModel(1, learned=False, seed=91)
    xT = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(92), dtype=F64) * 0.6
    got = Sampler("ddim", None, eta=0.0, clip=clip).sample(d, model, noise=xT.clone())
    abar = np.cumprod(1 - betas)
    aT, a0 = abar[T - 1], abar[0]
    x = np_(xT)
    eps = np_(model(torch.as_tensor(x), torch.full((2,), T - 1)))
    x0_hat = (x - math.sqrt(1 - aT) * eps) / math.sqrt(aT)
    inside = np.abs(x0_hat) < 1
    assert 0.2 < inside.mean() < 1.0  # both clipped and unclipped pixels
    if clip:
        x0_hat = np.clip(x0_hat, -1, 1)
    eps_implied = (x - math.sqrt(aT) * x0_hat) / math.sqrt(1 - aT)
    x = math.sqrt(a0) * x0_hat + math.sqrt(1 - a0) * eps_implied
    eps = np_(model(torch.as_tensor(x), torch.zeros(2, dtype=torch.long)))
    x0_hat = (x - math.sqrt(1 - a0) * eps) / math.sqrt(a0)
    if clip:
        x0_hat = np.clip(x0_hat, -1, 1)
    np.testing.assert_allclose(np_(got), x0_hat, rtol=1e-9, atol=1e-12)


# ================================================================= dtypes


def test_float32_in_float32_out():
    T = 12
    d = GaussianDiffusion(get_named_beta_schedule("cosine", T), model_var_type="learned_range", loss_type="hybrid")
    for name, buf in d.named_buffers():
        if buf.is_floating_point():
            assert buf.dtype == F64, name
    g = torch.Generator().manual_seed(0)
    x0 = grid_image((2, 1, 4, 4), 99).float()
    noise = torch.randn(2, 1, 4, 4, generator=g)
    t = torch.tensor([0, 7])
    model = ToyModel(1, learned=True, seed=100)
    xt = d.q_sample(x0, t, noise=noise)
    assert xt.dtype == torch.float32
    for v in d.q_posterior_mean_variance(x0, xt, t):
        assert v.dtype == torch.float32
    for k, v in d.p_mean_variance(model, xt, t).items():
        assert v.dtype == torch.float32, k
    for k, v in d.training_losses(model, x0, t, noise=noise).items():
        assert v.dtype == torch.float32, k
    for k, v in d.calc_bpd_loop(model, x0, generator=g).items():
        assert v.dtype == torch.float32, k
    assert Sampler("ddpm", None).sample(d, model, noise=noise.clone(), generator=g).dtype == torch.float32
    assert Sampler("ddim", None).sample(d, model, noise=noise.clone()).dtype == torch.float32
    # and float32 results agree with the float64 route to float32 precision
    terms32 = d.training_losses(model, x0, t, noise=noise)
    terms64 = d.training_losses(model, x0.double(), t, noise=noise.double())
    np.testing.assert_allclose(np_(terms32["loss"]), np_(terms64["loss"]), rtol=1e-4)
