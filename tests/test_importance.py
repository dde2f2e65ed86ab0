"""Importance sampling of t (the paper's §3.3, eq. 18): the loss-second-moment distribution and the
Lightning callback that wraps it. Every number is checked against a direct computation
written here (numpy, or the paper's per-element loop). CPU, a few seconds."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

from iddpm_lightning.callbacks import ImportanceSampling
from iddpm_lightning.diffusion import LossSecondMoment, TimestepDistribution, UniformTimesteps
from iddpm_lightning.errors import ConfigError
from iddpm_lightning.module import IDDPM

from .conftest import TINY_UNET

TINY = dict(image_size=8, in_channels=1, unet=TINY_UNET, timesteps=20, loss_type="vlb")


# ------------------------------------------------------------------ references



def reference_update(history: np.ndarray, counts: np.ndarray, timesteps, losses) -> None:
    """The paper's loop (improved-diffusion's LossSecondMomentResampler.update_with_all_losses),
    in place: per (t, loss) in order, shift a full history left and put the loss last, else
    fill the next free slot."""
    H = history.shape[1]
    for t, loss in zip(np.asarray(timesteps, dtype=np.int64).tolist(), np.asarray(losses, dtype=np.float64).tolist()):
        if counts[t] == H:
            history[t, :-1] = history[t, 1:]
            history[t, -1] = loss
        else:
            history[t, counts[t]] = loss
            counts[t] += 1


def reference_probs(history: np.ndarray, counts: np.ndarray, uniform_prob: float) -> np.ndarray:
    """p_t = √mean(h_t²), normalised, mixed with uniform; uniform until every t is full."""
    T, H = history.shape
    if not (counts == H).all():
        return np.full(T, 1.0 / T)
    p = np.sqrt(np.mean(history**2, axis=1))
    p = p / p.sum()
    return p * (1 - uniform_prob) + uniform_prob / T


def warmed_distribution(rms: np.ndarray, H: int = 4, uniform_prob: float = 0.0, seed: int = 0):
    """A distribution whose every history is full, with losses of magnitude ~ ``rms`` per t."""
    T = len(rms)
    rng = np.random.default_rng(seed)
    r = LossSecondMoment(T, H, uniform_prob)
    hist, counts = np.zeros((T, H)), np.zeros(T, dtype=np.int64)
    t = np.repeat(np.arange(T), H)
    rng.shuffle(t)
    losses = rms[t] * rng.uniform(0.5, 1.5, size=len(t))
    r.update(torch.from_numpy(t), torch.from_numpy(losses))
    reference_update(hist, counts, t, losses)
    assert bool(r.warmed_up())
    return r, hist, counts


# ------------------------------------------------- the loss-second-moment distribution


def test_known_sequence_history_probs_and_weights():
    T, H = 3, 2
    r = LossSecondMoment(T, H, uniform_prob=0.1)
    r.update(torch.tensor([0, 1, 0, 2, 0]), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    # t=0 got 1, 3, 5: the newest two, in order; t=1 and t=2 have one loss each.
    assert r.loss_history.tolist() == [[3.0, 5.0], [2.0, 0.0], [4.0, 0.0]]
    assert r.loss_counts.tolist() == [2, 1, 1]
    assert not bool(r.warmed_up())
    assert torch.equal(r.probs(), torch.full((T,), 1.0 / T, dtype=torch.float64))

    r.update(torch.tensor([1, 2, 2]), torch.tensor([6.0, 7.0, 8.0]))
    history = np.array([[3.0, 5.0], [2.0, 6.0], [7.0, 8.0]])
    assert r.loss_history.tolist() == history.tolist()
    assert r.loss_counts.tolist() == [2, 2, 2]
    assert bool(r.warmed_up())

    # Direct: p_t = √mean(h_t²) = √17, √20, √56.5, normalised, then mixed with u = 0.1.
    u = 0.1
    rms = np.sqrt((history**2).mean(axis=1))
    np.testing.assert_allclose(rms, np.sqrt([17.0, 20.0, 56.5]))
    p = rms / rms.sum() * (1 - u) + u / T
    np.testing.assert_allclose(r.probs().numpy(), p, rtol=1e-12)
    assert math.isclose(r.probs().sum().item(), 1.0, rel_tol=1e-12)

    t, w = r.draw(1000, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and w.dtype == torch.float32 and t.shape == w.shape == (1000,)
    expected_w = 1.0 / (T * p[t.numpy()])
    np.testing.assert_allclose(w.numpy(), expected_w, rtol=1e-6)
    assert set(t.tolist()) == {0, 1, 2}


def test_probs_uniform_until_every_timestep_is_full():
    T, H = 5, 3
    r = LossSecondMoment(T, H, uniform_prob=0.0)
    # Every t but the last full, with very different magnitudes; the last has H - 1 losses.
    t = torch.tensor([0, 1, 2, 3] * H + [4] * (H - 1))
    losses = torch.tensor([1e-3, 1.0, 10.0, 1e3] * H + [5.0] * (H - 1))
    r.update(t, losses)
    assert r.loss_counts.tolist() == [H, H, H, H, H - 1]
    assert not bool(r.warmed_up())
    uniform = torch.full((T,), 1.0 / T, dtype=torch.float64)
    assert torch.equal(r.probs(), uniform)  # exactly 1/T, not approximately
    _, w = r.draw(64, "cpu", torch.Generator().manual_seed(1))
    assert torch.equal(w, torch.ones(64))

    r.update(torch.tensor([4]), torch.tensor([5.0]))  # the last slot: now warmed up
    assert bool(r.warmed_up())
    p = r.probs()
    assert not torch.allclose(p, uniform)
    hist = r.loss_history.numpy()
    np.testing.assert_allclose(p.numpy(), reference_probs(hist, r.loss_counts.numpy(), 0.0), rtol=1e-12)


@pytest.mark.parametrize("u", [0.0, 0.5, 1.0])
def test_uniform_prob_mixing(u):
    rms = np.array([1e-3, 1e-2, 1.0, 100.0])
    T = len(rms)
    r, hist, counts = warmed_distribution(rms, H=3, uniform_prob=u)
    np.testing.assert_array_equal(r.loss_history.numpy(), hist)
    p = r.probs().numpy()
    q = np.sqrt((hist**2).mean(axis=1))
    q = q / q.sum()
    np.testing.assert_allclose(p, q * (1 - u) + u / T, rtol=1e-12, atol=0)
    if u == 0.0:
        np.testing.assert_allclose(p, q, rtol=1e-12)
        assert p.max() / p.min() > 1e4  # the magnitudes really matter
    if u == 0.5:
        assert np.all(p >= 0.5 / T)
    if u == 1.0:
        np.testing.assert_allclose(p, np.full(T, 1.0 / T), rtol=0, atol=1e-15)
    t, w = r.draw(500, "cpu", torch.Generator().manual_seed(2))
    np.testing.assert_allclose(w.numpy(), 1.0 / (T * p[t.numpy()]), rtol=1e-6)


def test_update_matches_the_papers_loop_on_random_sequences():
    rng = np.random.default_rng(1234)
    shapes = [(1, 1), (1, 3), (4, 1), (5, 2), (7, 10), (20, 10), (3, 4)]
    for case in range(120):
        T, H = shapes[case % len(shapes)]
        r = LossSecondMoment(T, H)
        hist, counts = np.zeros((T, H)), np.zeros(T, dtype=np.int64)
        for _ in range(rng.integers(1, 12)):
            n = int(rng.choice([0, 1, 2, rng.integers(0, 3 * T * H + 2)]))  # empty batches too
            if rng.random() < 0.3:  # lots of repeats of a few t within one batch
                t = rng.choice(rng.integers(0, T, size=2), size=n)
            else:
                t = rng.integers(0, T, size=n)
            losses = rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 4, size=n)
            r.update(torch.from_numpy(t), torch.from_numpy(losses))
            reference_update(hist, counts, t, losses)
            np.testing.assert_array_equal(r.loss_history.numpy(), hist, err_msg=f"T={T} H={H} case {case}")
            np.testing.assert_array_equal(r.loss_counts.numpy(), counts, err_msg=f"T={T} H={H} case {case}")
        assert r.loss_history.dtype == torch.float64 and r.loss_counts.dtype == torch.long


def test_update_keeps_newest_in_arrival_order_with_many_repeats():
    r = LossSecondMoment(2, 3)
    r.update(torch.tensor([1, 1]), torch.tensor([10.0, 11.0]))
    r.update(torch.tensor([1, 0, 1, 1, 1, 1]), torch.tensor([12.0, 0.5, 13.0, 14.0, 15.0, 16.0]))
    assert r.loss_history.tolist() == [[0.5, 0.0, 0.0], [14.0, 15.0, 16.0]]
    assert r.loss_counts.tolist() == [1, 3]
    r.update(torch.tensor([], dtype=torch.long), torch.tensor([]))  # an empty batch changes nothing
    assert r.loss_history.tolist() == [[0.5, 0.0, 0.0], [14.0, 15.0, 16.0]]
    assert r.loss_counts.tolist() == [1, 3]


def test_weights_make_the_estimate_unbiased_and_frequencies_follow_p():
    T = 10
    rms = 10.0 ** np.linspace(-3, 1, T)  # four orders of magnitude across t
    r, hist, counts = warmed_distribution(rms, H=5, uniform_prob=0.01, seed=3)
    p = reference_probs(hist, counts, 0.01)
    np.testing.assert_allclose(r.probs().numpy(), p, rtol=1e-12)
    assert p.max() / p.min() > 50

    N = 200_000
    t, w = r.draw(N, "cpu", torch.Generator().manual_seed(7))
    t, w = t.numpy(), w.numpy().astype(np.float64)
    for f in (rms * np.linspace(1, 2, T),  # roughly proportional to p: low variance
              np.linspace(-1.0, 3.0, T),  # unrelated to p: high variance
              np.ones(T)):  # E[w] = 1
        x = w * f[t]
        se = x.std(ddof=1) / math.sqrt(N)
        assert abs(x.mean() - f.mean()) < 4 * se, (x.mean(), f.mean(), se)
        assert se < 0.05 * abs(f).mean()  # enough draws for the check to mean something

    # Frequencies: chi-square with T - 1 dof (mean 9, sd ~4.2), and each t within 5 sigma.
    observed = np.bincount(t, minlength=T)
    expected = N * p
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 40, chi2
    assert np.all(np.abs(observed - expected) < 5 * np.sqrt(expected * (1 - p)) + 1)


def test_draws_are_reproducible_from_the_generator():
    r, _, _ = warmed_distribution(10.0 ** np.linspace(-2, 1, 50), H=2, uniform_prob=0.001)
    for distribution in (r, UniformTimesteps(50)):
        t1, w1 = distribution.draw(256, "cpu", torch.Generator().manual_seed(11))
        t2, w2 = distribution.draw(256, "cpu", torch.Generator().manual_seed(11))
        t3, _ = distribution.draw(256, "cpu", torch.Generator().manual_seed(12))
        assert torch.equal(t1, t2) and torch.equal(w1, w2)
        assert not torch.equal(t1, t3)


# ---------------------------------------------------------------- the callback


class Recorder(Callback):
    """Copies what each training step returned, as the importance callback receives it."""

    def __init__(self):
        self.timesteps: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []
        self.probs_before: list[torch.Tensor] = []
        self.module_probs: list[torch.Tensor] = []  # the distribution the module's distribution held

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        imp = next(cb for cb in trainer.callbacks if isinstance(cb, ImportanceSampling))
        self.probs_before.append(imp.history.probs().clone())
        self.module_probs.append(pl_module.timestep_distribution.probs.clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.timesteps.append(outputs["timesteps"].detach().clone())
        self.losses.append(outputs["losses"].detach().clone())


def images(n: int) -> TensorDataset:
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return TensorDataset(x, torch.zeros(n, dtype=torch.long))


def fit(callback: ImportanceSampling, n: int = 48, batch_size: int = 8, max_steps: int = 6, **trainer_kw):
    torch.manual_seed(0)
    model = IDDPM(**TINY)
    recorder = Recorder()
    trainer = Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=[recorder, callback],
                      **trainer_kw)
    loader = DataLoader(images(n), batch_size=batch_size, drop_last=False, num_workers=0)
    trainer.fit(model, loader)  # with one intra-op thread (the module's fixture)
    return model, trainer, recorder


def rebuild(recorder: Recorder, T: int, H: int, history=None, counts=None):
    hist = np.zeros((T, H)) if history is None else history.copy()
    cnt = np.zeros(T, dtype=np.int64) if counts is None else counts.copy()
    for t, losses in zip(recorder.timesteps, recorder.losses):
        reference_update(hist, cnt, t.numpy(), losses.double().numpy())
    return hist, cnt


def metric(trainer: Trainer, name: str) -> float:
    metrics = {**trainer.logged_metrics, **trainer.callback_metrics}
    assert name in metrics, sorted(metrics)
    return float(metrics[name])


def test_callback_history_follows_the_training_steps():
    cb = ImportanceSampling(history_per_term=10, uniform_prob=0.001)
    model, trainer, rec = fit(cb)
    T, H = 20, 10
    assert trainer.global_step == 6 and len(rec.timesteps) == 6
    # before every step the module's distribution held the callback's current p_t
    assert len(rec.module_probs) == 6 and all(torch.equal(m, c) for m, c in zip(rec.module_probs, rec.probs_before))
    assert all(len(t) == 8 for t in rec.timesteps)
    assert all(torch.isfinite(l).all() and (l >= 0).all() for l in rec.losses)

    hist, counts = rebuild(rec, T, H)
    np.testing.assert_array_equal(cb.history.loss_history.numpy(), hist)
    np.testing.assert_array_equal(cb.history.loss_counts.numpy(), counts)
    assert counts.sum() == 48  # 48 draws over 20 timesteps: no t reached H = 10, nothing fell out
    assert not bool(cb.history.warmed_up())

    # Logged after the last update: computed from the final history.
    assert metric(trainer, "importance/warmed_up_fraction") == pytest.approx((counts == H).mean())
    p = reference_probs(hist, counts, 0.001)  # uniform: not warmed up
    entropy = -(p * np.log(p)).sum()
    assert metric(trainer, "importance/effective_timesteps") == pytest.approx(np.exp(entropy), rel=1e-5)
    assert metric(trainer, "importance/effective_timesteps") == pytest.approx(T, rel=1e-5)
    assert metric(trainer, "importance/max_weight") == pytest.approx(1.0 / (T * p.min()), rel=1e-5)


def test_the_module_draws_t_from_the_callbacks_distribution():
    # Warm the callback up front (through its checkpoint state) with losses at t = 3 and 7 only,
    # so p is ~0 elsewhere: every t the module draws must then be 3 or 7.
    T, H, u = 20, 2, 1e-9
    history = np.zeros((T, H))
    history[3], history[7] = [1.0, 2.0], [0.5, 0.25]
    counts = np.full(T, H, dtype=np.int64)
    cb = ImportanceSampling(history_per_term=H, uniform_prob=u)
    cb.load_state_dict({"num_timesteps": T, "history_per_term": H,
                        "loss_history": torch.from_numpy(history), "loss_counts": torch.from_numpy(counts)})
    model, trainer, rec = fit(cb, max_steps=4)
    drawn = torch.cat(rec.timesteps)
    assert set(drawn.tolist()) <= {3, 7} and set(drawn.tolist()) == {3, 7}
    np.testing.assert_allclose(rec.probs_before[0].numpy(), reference_probs(history, counts, u), rtol=1e-12)

    hist, cnt = rebuild(rec, T, H, history, counts)
    np.testing.assert_array_equal(cb.history.loss_history.numpy(), hist)
    np.testing.assert_array_equal(cb.history.loss_counts.numpy(), cnt)
    p = reference_probs(hist, cnt, u)
    np.testing.assert_allclose(cb.history.probs().numpy(), p, rtol=1e-12)
    assert metric(trainer, "importance/warmed_up_fraction") == 1.0
    assert metric(trainer, "importance/effective_timesteps") == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-4)
    assert metric(trainer, "importance/max_weight") == pytest.approx(1.0 / (T * p.min()), rel=1e-4)


def test_shorter_last_batch():
    cb = ImportanceSampling(history_per_term=10)
    model, trainer, rec = fit(cb, n=20, batch_size=8, max_steps=-1, max_epochs=1)
    assert [len(t) for t in rec.timesteps] == [8, 8, 4]
    hist, counts = rebuild(rec, 20, 10)
    np.testing.assert_array_equal(cb.history.loss_history.numpy(), hist)
    np.testing.assert_array_equal(cb.history.loss_counts.numpy(), counts)
    assert counts.sum() == 20  # the 4 padded rows (t = -1) were not added


# --------------------------------------------------------------- checkpoints


def bare_trainer() -> Trainer:
    return Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def setup_callback(cb: ImportanceSampling, T: int = 20) -> IDDPM:
    model = IDDPM(**{**TINY, "timesteps": T})
    cb.setup(bare_trainer(), model, "fit")
    assert torch.equal(model.timestep_distribution.probs, cb.history.probs())
    return model


def test_state_dict_round_trip():
    cb = ImportanceSampling(history_per_term=4)
    assert cb.state_dict() == {}  # nothing to save before setup
    setup_callback(cb)
    rng = np.random.default_rng(0)
    t = rng.integers(0, 20, size=70)
    cb.history.update(torch.from_numpy(t), torch.from_numpy(rng.exponential(size=70)))
    assert 0 < (cb.history.loss_counts == 4).sum() < 20  # a mixture of full and partial histories

    state = cb.state_dict()
    assert all(isinstance(v, (int, torch.Tensor)) for v in state.values()), state
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    fresh = ImportanceSampling(history_per_term=4)
    fresh.load_state_dict(loaded)  # before setup: kept until setup builds the history
    assert fresh.history is None
    setup_callback(fresh)
    assert torch.equal(fresh.history.loss_history, cb.history.loss_history)
    assert torch.equal(fresh.history.loss_counts, cb.history.loss_counts)
    assert fresh.history.loss_history.dtype == torch.float64 and fresh.history.loss_counts.dtype == torch.long
    assert torch.equal(fresh.history.probs(), cb.history.probs())

    after = ImportanceSampling(history_per_term=4)  # loaded after setup: restored at once
    setup_callback(after)
    after.load_state_dict(loaded)
    assert torch.equal(after.history.loss_history, cb.history.loss_history)
    assert torch.equal(after.history.loss_counts, cb.history.loss_counts)


def test_state_with_another_shape_is_a_config_error():
    other = LossSecondMoment(7, 4)
    state = {"num_timesteps": 7, "history_per_term": 4,
             "loss_history": other.loss_history, "loss_counts": other.loss_counts}

    cb = ImportanceSampling(history_per_term=4)
    cb.load_state_dict(state)
    with pytest.raises(ConfigError, match=r"T = 7.*T = 20"):
        setup_callback(cb, T=20)

    cb = ImportanceSampling(history_per_term=4)
    setup_callback(cb, T=20)
    with pytest.raises(ConfigError, match=r"T = 7.*T = 20"):
        cb.load_state_dict(state)

    cb = ImportanceSampling(history_per_term=3)  # same T, another history length
    setup_callback(cb, T=7)
    with pytest.raises(ConfigError, match=r"4 losses per timestep.*and 3"):
        cb.load_state_dict(state)


def test_the_modules_distribution_is_uniform_until_given_p_and_then_draws_as_the_loss_second_moment():
    distribution, uniform = TimestepDistribution(50), UniformTimesteps(50)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    for a, b in zip(distribution.draw(64, "cpu", g()), uniform.draw(64, "cpu", g())):
        assert torch.equal(a, b)  # exactly the uniform draw: no importance callback, no change
    r, _, _ = warmed_distribution(10.0 ** np.linspace(-2, 1, 50), H=2, uniform_prob=0.001)
    distribution.set_probs(r.probs())
    for a, b in zip(distribution.draw(64, "cpu", g()), r.draw(64, "cpu", g())):
        assert torch.equal(a, b)
    distribution.set_probs(None)
    assert torch.equal(distribution.draw(8, "cpu", g())[0], uniform.draw(8, "cpu", g())[0])
    with pytest.raises(ValueError, match=r"shape \(49,\)"):
        distribution.set_probs(torch.full((49,), 1 / 49))
