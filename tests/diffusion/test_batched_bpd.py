"""Batched likelihood evaluation: ``max_batch`` puts several timesteps of the same images
into one model call. It must change no number (the same ε in the same order as a plain
one-call-per-t loop written here) and lay the k·B inputs out t-major."""

import pytest
import torch

from iddpm_lightning.diffusion import BPD_MAX_BATCH, GaussianDiffusion, Sampler, get_named_beta_schedule
from iddpm_lightning.diffusion.gaussian import log_strata

from .test_gaussian import ToyModel, grid_image

F64 = torch.float64


def plain_bpd_loop(d: GaussianDiffusion, model, x0, generator):
    """The straightforward loop: t = T-1..0, a fresh ε per t, one model call per t."""
    B, T = x0.shape[0], d.num_timesteps
    vb = torch.zeros(B, T, dtype=x0.dtype)
    for t in range(T - 1, -1, -1):
        t_b = torch.full((B,), t, dtype=torch.long)
        x_t = d.q_sample(x0, t_b, torch.randn(x0.shape, generator=generator, dtype=x0.dtype))
        vb[:, t], _ = d.vb_terms_bpd(model(x_t, t_b), x0, x_t, t_b, clip_denoised=True)
    return vb


def test_batched_timesteps_give_the_plain_loops_numbers_with_fewer_calls():
    T, B, C = 12, 3, 2
    d = GaussianDiffusion(get_named_beta_schedule("cosine", T))
    x0 = grid_image((B, C, 4, 4), 61)
    reference = plain_bpd_loop(d, ToyModel(C, learned=True, seed=62), x0, torch.Generator().manual_seed(5))
    outs = {}
    for k in (1, 5, 12, 40):  # 5 does not divide T: chunks of 5, 5, 2
        model = ToyModel(C, learned=True, seed=62, record=True)
        outs[k] = d.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(5), max_batch=k * B)
        k_eff = min(k, T)
        assert len(model.calls) == -(-T // k_eff)
        first = model.calls[0]["t"]
        # t-major: rows j*B .. (j+1)*B - 1 are the B images at the j-th timestep, T-1 first
        assert first.tolist() == [t for t in range(T - 1, T - 1 - min(k_eff, T), -1) for _ in range(B)]
        torch.testing.assert_close(outs[k]["vb"], reference, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(outs[k]["total_bpd"], reference.sum(1) + d.prior_bpd(x0), rtol=1e-12, atol=0)
    for key in ("mse", "xstart_mse"):
        for k in (5, 12, 40):
            torch.testing.assert_close(outs[k][key], outs[1][key], rtol=1e-12, atol=1e-14)


def test_the_default_call_batches_256_inputs_and_gives_the_one_call_per_timestep_numbers():
    # calc_bpd_loop(model, x) as the README shows it: one image, T = 600 → ⌈600 / 256⌉ = 3 calls
    T, C = 600, 1
    d = GaussianDiffusion(get_named_beta_schedule("cosine", T))
    x0 = grid_image((1, C, 4, 4), 69)
    assert x0.dtype == F64
    reference = plain_bpd_loop(d, ToyModel(C, learned=True, seed=70), x0, torch.Generator().manual_seed(8))
    outs = {}
    for name, kwargs in (("default", {}), ("one per t", {"max_batch": 1})):
        model = ToyModel(C, learned=True, seed=70, record=True)
        outs[name] = d.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(8), **kwargs)
        outs[name]["calls"] = [len(c["t"]) for c in model.calls]
    assert outs["default"]["calls"] == [BPD_MAX_BATCH, BPD_MAX_BATCH, T - 2 * BPD_MAX_BATCH] and BPD_MAX_BATCH == 256
    assert outs["one per t"]["calls"] == [1] * T
    for out in outs.values():
        torch.testing.assert_close(out["vb"], reference, rtol=1e-12, atol=1e-14)
    for key in ("total_bpd", "mse", "xstart_mse"):
        torch.testing.assert_close(outs["default"][key], outs["one per t"][key], rtol=1e-12, atol=1e-14)


def test_max_batch_below_one_is_refused():
    d = GaussianDiffusion(get_named_beta_schedule("cosine", 4))
    with pytest.raises(ValueError, match="max_batch must be a number of model inputs >= 1, got 0"):
        d.calc_bpd_loop(ToyModel(1, learned=True, seed=0), grid_image((1, 1, 4, 4), 0), max_batch=0)


def test_batched_inputs_are_the_images_repeated_per_timestep():
    T, B, C = 6, 2, 1
    d = GaussianDiffusion(get_named_beta_schedule("cosine", T))
    x0 = grid_image((B, C, 4, 4), 63)
    model = ToyModel(C, learned=True, seed=64, record=True)
    d.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(0), max_batch=3 * B)
    abar = d.alphas_cumprod
    for call in model.calls:
        x_t, t = call["x"], call["t"]
        # remove the signal √ᾱ_t x_0 of image (row mod B): the rest is noise of variance 1 − ᾱ_t,
        # which it would not be if a row had another image's signal
        eps = (x_t - abar[t].sqrt().view(-1, 1, 1, 1) * x0.repeat(len(t) // B, 1, 1, 1)) / (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        assert eps.abs().max() < 6
        wrong = (x_t - abar[t].sqrt().view(-1, 1, 1, 1) * x0.flip(0).repeat(len(t) // B, 1, 1, 1))
        assert (wrong - eps * (1 - abar[t]).sqrt().view(-1, 1, 1, 1)).abs().max() > 1e-3


def plain_stratified(d: GaussianDiffusion, model, x0, K, generator):
    """The estimator written out: per stratum two draws (t then ε), one model call each."""
    bounds = log_strata(d.num_timesteps, K)
    total, variance = d.prior_bpd(x0), torch.zeros(x0.shape[0], dtype=x0.dtype)
    for start, end in zip(bounds[:-1], bounds[1:]):
        x = []
        for _ in range(2):
            t = start + torch.randint(0, end - start, (x0.shape[0],), generator=generator)
            x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=generator, dtype=x0.dtype))
            x.append((end - start) * d.vb_terms_bpd(model(x_t, t), x0, x_t, t, clip_denoised=True)[0])
        total, variance = total + (x[0] + x[1]) / 2, variance + (x[0] - x[1]) ** 2 / 4
    return total, variance


def test_batched_stratified_estimate_draws_the_same_t_and_noise():
    T, B, C, K = 50, 4, 1, 7
    d = GaussianDiffusion(get_named_beta_schedule("cosine", T))
    x0 = grid_image((B, C, 4, 4), 65)
    total, variance = plain_stratified(d, ToyModel(C, learned=True, seed=66), x0, K, torch.Generator().manual_seed(3))
    assert variance.min() > 0
    for max_batch, calls in ((B, 2 * K), (6 * B, -(-2 * K // 6)), (None, 1)):  # None: the default, 256 inputs
        recording = ToyModel(C, learned=True, seed=66, record=True)
        kwargs = {} if max_batch is None else {"max_batch": max_batch}
        out = d.stratified_bpd(recording, x0, K, generator=torch.Generator().manual_seed(3), **kwargs)
        assert len(recording.calls) == calls
        torch.testing.assert_close(out["total_bpd"], total, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out["variance"], variance, rtol=1e-12, atol=1e-14)


def test_samples_and_likelihoods_are_ordinary_tensors():
    # the loops run under inference_mode, but what they return takes in-place ops and autograd
    T = 6
    d = GaussianDiffusion(get_named_beta_schedule("cosine", T))
    model = ToyModel(1, learned=True, seed=67)
    x = Sampler("ddpm", None).sample(d, model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    bpd = d.calc_bpd_loop(model, grid_image((2, 1, 4, 4), 68), max_batch=4)
    for tensor in (x, Sampler("ddim", None).sample(d, model, (2, 1, 4, 4)), bpd["vb"],
                   Sampler("dpm_solver", 3).sample(d, model, (2, 1, 4, 4)),
                   d.stratified_bpd(model, grid_image((2, 1, 4, 4), 68), 3)["total_bpd"]):
        assert not tensor.is_inference()
        tensor.mul_(1.0)
    w = torch.ones((), dtype=x.dtype, requires_grad=True)
    (x * w).sum().backward()
    torch.testing.assert_close(w.grad, x.sum())
