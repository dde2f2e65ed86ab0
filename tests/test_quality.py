"""Sample-quality metrics on features with known answers, and the digits feature extractor."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from iddpm_lightning.callbacks import FID
from iddpm_lightning.data import DigitsDataModule, to_model_range
from iddpm_lightning.evaluation.features import DigitClassifier, DigitFeatures, digit_features, train_digit_classifier
from iddpm_lightning.evaluation.metrics import (ReferenceStats, class_confidence_entropy, frechet_distance,
                                                inception_score, precision_recall, sample_quality)

from .test_fid import StubModel


def gaussian_features(n: int = 600, d: int = 8, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    """n draws (``seed``) of one correlated Gaussian in d dimensions, moved by ``shift``; (n, d)."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(1234))
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix * 0.5 + 1.0 + shift


# ------------------------------------------------------------------------- metrics


def test_a_set_against_itself_has_zero_distance_and_full_precision_and_recall():
    x = gaussian_features()
    out = sample_quality(x, None, ReferenceStats.from_features(x), "fid", classifier=False)
    assert abs(out["fid"]) < 1e-8
    assert out["precision"] == 1.0 and out["recall"] == 1.0  # every point lies in its own k-NN ball


def test_kid_is_zero_within_its_noise_for_two_draws_of_one_distribution_and_not_for_a_shifted_one():
    reference = ReferenceStats.from_features(gaussian_features(seed=0))
    same = sample_quality(gaussian_features(seed=1), None, reference, "fid", False)["kid"]
    shifted = sample_quality(gaussian_features(seed=1, shift=0.5), None, reference, "fid", False)["kid"]
    assert abs(same) < 0.1 * shifted, (same, shifted)


def test_frechet_distance_of_a_shifted_and_scaled_copy_is_the_closed_form():
    """For Y = c X + δ: Σ_Y = c² Σ_X, so FD = ‖(c − 1) μ_X + δ‖² + (1 − c)² tr Σ_X exactly."""
    x = gaussian_features()
    reference = ReferenceStats.from_features(x)
    delta = torch.linspace(-1, 1, x.shape[1])
    for c in (1.0, 0.7):
        y = ReferenceStats.from_features(c * x + delta)
        expected = float(((c - 1) * reference.mu + delta.double()).square().sum() + (1 - c) ** 2 * reference.sigma.trace())
        assert frechet_distance(y.mu, y.sigma, reference.mu, reference.sigma) == pytest.approx(expected, rel=1e-6)
    # Two Gaussians given by their parameters: ‖μ1 − μ2‖² + Σ_i (σ1_i − σ2_i)² for diagonal covariances.
    s1, s2 = torch.tensor([1.0, 4.0, 9.0]).double(), torch.tensor([4.0, 1.0, 1.0]).double()
    fd = frechet_distance(torch.zeros(3), torch.diag(s1), torch.ones(3), torch.diag(s2))
    assert fd == pytest.approx(3 + ((s1.sqrt() - s2.sqrt()) ** 2).sum().item(), rel=1e-9)


def test_frechet_distance_agrees_with_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    a, b = gaussian_features(seed=1), gaussian_features(seed=2, shift=0.3) * 1.3
    ra, rb = ReferenceStats.from_features(a), ReferenceStats.from_features(b)
    expected = float(_compute_fid(ra.mu, ra.sigma, rb.mu, rb.sigma))
    assert frechet_distance(ra.mu, ra.sigma, rb.mu, rb.sigma) == pytest.approx(expected, rel=1e-6)


def test_precision_and_recall_on_points_whose_k_nn_balls_are_known():
    """Reference 0, 1, 2, 3, 4 on a line: with k = 3 their ball radii (distance to the 3rd nearest
    other point) are 3, 2, 2, 2, 3. Samples 2.5, 10, 11, 12, 13: radii 9.5, 3, 2, 2, 3. Only 2.5
    lies in a reference ball (precision 1/5); the ball of 2.5 holds every reference point
    (recall 1): one outlying sample inflates recall, as Kynkäänniemi et al. note."""
    line = lambda *v: torch.tensor([[float(a), 0.0] for a in v])  # noqa: E731
    precision, recall = precision_recall(line(2.5, 10, 11, 12, 13), line(0, 1, 2, 3, 4))
    assert (precision, recall) == (pytest.approx(0.2), pytest.approx(1.0))
    precision, recall = precision_recall(line(10, 11, 12, 13, 14), line(0, 1, 2, 3, 4))
    assert (precision, recall) == (0.0, 0.0)
    precision, recall = precision_recall(line(0.5, 1.5, 2.5, 3.5, 20), line(0, 1, 2, 3, 4))
    assert precision == pytest.approx(0.8)  # 20 is outside every reference ball


def test_confidence_entropy_and_inception_score_closed_forms():
    # Two confident classes, half each: entropy 1 bit; confidence softmax([4, 0, 0]) = e^4 / (e^4 + 2).
    logits = torch.tensor([[4.0, 0, 0], [0, 4.0, 0]]).repeat(50, 1)
    confidence, entropy = class_confidence_entropy(logits)
    assert confidence == pytest.approx(math.exp(4) / (math.exp(4) + 2)) and entropy == pytest.approx(1.0)
    assert class_confidence_entropy(torch.eye(10).repeat(3, 1) * 50)[1] == pytest.approx(math.log2(10))
    # IS: exp(KL(p(y|x) ‖ p(y))): 1 for identical predictions, K for K certain, balanced classes.
    assert inception_score(torch.zeros(100, 5))[0] == pytest.approx(1.0)
    assert inception_score(torch.eye(5).repeat(1000, 1) * 100)[0] == pytest.approx(5.0, rel=0.01)  # 10 splits


def test_a_statistics_only_reference_gives_the_distance_and_no_kid_or_precision():
    x = gaussian_features()
    full = ReferenceStats.from_features(x)
    stats_only = ReferenceStats(full.mu, full.sigma, 0, None)
    y = gaussian_features(seed=3, shift=0.2)
    a = sample_quality(y, None, full, "fid", False)
    b = sample_quality(y, None, stats_only, "fid", False)
    assert b["fid"] == a["fid"] and b["kid"] is b["precision"] is b["recall"] is None


def test_too_few_samples_for_the_k_nearest_neighbours_are_refused():
    x = gaussian_features()
    with pytest.raises(ValueError, match="at least 4"):
        sample_quality(x[:3], None, ReferenceStats.from_features(x), "fid", False)


# ------------------------------------------------------------------ digits features


@pytest.fixture(scope="module")
def digits_setup(tmp_path_factory):
    dm = DigitsDataModule()
    dm.setup("validate")
    cache = tmp_path_factory.mktemp("digits_cache")
    return dm, digit_features(dm, cache), cache


def read(extractor: DigitFeatures, reference: ReferenceStats, images_u8: torch.Tensor) -> dict:
    feats, logits = extractor(images_u8)
    return sample_quality(feats, logits, reference, extractor.prefix, extractor.classifier)


def test_the_digits_extractor_ranks_real_digits_above_noise_blur_and_one_repeated_class(digits_setup):
    dm, extractor, _ = digits_setup
    train_u8 = dm.train_set.images
    reference = ReferenceStats.from_features(extractor(train_u8)[0])
    held_out, labels = dm.test_set.images, dm.test_set.labels  # (150, 1, 8, 8), never trained on
    g = torch.Generator().manual_seed(0)
    cases = {
        "real": held_out,
        "noise": torch.randint(0, 256, held_out.shape, generator=g, dtype=torch.uint8),
        "blurred": F.avg_pool2d(held_out.float(), 3, 1, 1, count_include_pad=False).round().to(torch.uint8),
        "one class": held_out[labels == 3].repeat(20, 1, 1, 1)[: len(held_out)],
    }
    out = {name: read(extractor, reference, x) for name, x in cases.items()}
    real = out["real"]
    assert real["confidence"] > 0.8 and real["class_entropy"] > 0.95 * math.log2(10)
    assert real["precision"] > 0.8 and real["recall"] > 0.5
    for name in ("noise", "blurred", "one class"):
        assert out[name]["fd_digits"] > 10 * real["fd_digits"], (name, out[name], real)
    assert out["noise"]["confidence"] < real["confidence"] - 0.3
    assert out["blurred"]["confidence"] < real["confidence"] - 0.3
    assert out["one class"]["class_entropy"] < 0.5  # mode collapse: one class is 0 bits
    assert out["one class"]["recall"] < real["recall"] - 0.3
    accuracy = (extractor(held_out)[1].argmax(1) == labels).float().mean()
    assert accuracy > 0.95


def test_the_digits_classifier_is_deterministic_and_cached(digits_setup):
    dm, extractor, cache = digits_setup
    (saved,) = cache.glob("digits_classifier_*.pt")
    stamp = saved.stat().st_mtime_ns
    again = digit_features(dm, cache)  # read from the cache: the file is not rewritten
    assert saved.stat().st_mtime_ns == stamp and again.name == extractor.name
    retrained = train_digit_classifier(dm.train_set.images, dm.train_set.labels)
    for (k, a), b in zip(extractor.net.state_dict().items(), retrained.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert isinstance(extractor.net, DigitClassifier)


def test_the_fid_callback_logs_the_digits_metrics_that_evaluate_prints(digits_setup, tmp_path):
    """Two routes to one set of numbers: the callback during validation, and ``evaluate`` on the
    same images (npz) against the config's training split, sharing the reference cache."""
    import numpy as np

    from iddpm_lightning.evaluation.evaluate import evaluate

    dm, _, cache = digits_setup
    images = dm.val_set.images  # (150, 1, 8, 8) uint8
    fid = FID(num_samples=150, batch_size=64, features="digits", cache_dir=str(cache))
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=1, default_root_dir=tmp_path, callbacks=[fid])
    trainer.validate(StubModel(replay=images), datamodule=dm)
    logged = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items()}
    assert set(logged) == {"fd_digits", "kid_digits", "precision", "recall", "confidence", "class_entropy"}

    samples = tmp_path / "samples_150x8x8x1.npz"
    np.savez(samples, arr_0=images.permute(0, 2, 3, 1).numpy())
    config = tmp_path / "digits.yaml"
    config.write_text("data:\n  class_path: iddpm_lightning.data.DigitsDataModule\n")
    result = evaluate(str(samples), str(config), cache_dir=str(cache))
    assert result["reference"]["cache_hit"]  # the callback's cache file
    assert result["num_samples"] == 150 and result["features"] == fid.extractor.name
    for name, value in logged.items():
        assert result["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_to_model_range_round_trip_for_the_replayed_images(digits_setup):
    """The stub replays images through to_model_range; the callback rounds them back exactly."""
    from iddpm_lightning.data import to_uint8

    dm, _, _ = digits_setup
    assert torch.equal(to_uint8(to_model_range(dm.val_set.images)), dm.val_set.images)
