"""Sample-quality metrics of sample features against reference statistics.

The metrics are torch-fidelity's, computed from features (so that one extractor pass serves
them all, and a cached reference serves every later run):

- Fréchet distance (FID with Inception, ``fd_digits`` with the digits classifier; Heusel et al.
  2017): ‖μ_s − μ_r‖² + tr(Σ_s + Σ_r − 2 (Σ_s Σ_r)^½), from the means and covariances;
- KID (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel, averaged over
  100 random subsets of min(1000, N, M) samples (and its standard deviation over the subsets);
- improved precision and recall (Kynkäänniemi et al. 2019): the fraction of samples inside the
  k-NN balls (k = 3) of the reference features, and of reference features inside the samples';
- Inception Score (Salimans et al. 2016) from Inception's logits, over min(10, N) splits.

Written here, because neither library has them: for a classifier of the data's own classes
(the digits one) the mean confidence E_x max_y p(y|x) and the entropy of the predicted-class
histogram in bits (log2 10 = 3.32 for balanced classes; mode collapse lowers it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpointing import write_durably

K_NEIGHBOURS = 3  # precision/recall's k (Kynkäänniemi et al. 2019)
MIN_SAMPLES = K_NEIGHBOURS + 1  # each sample's k-th neighbour must be another sample
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults, as in Bińkowski et al.


@dataclass
class ReferenceStats:
    """The statistics samples are compared with: μ [D] and Σ [D, D] (float64) of ``num``
    reference features, and the features themselves [M, D] (float32) for KID and
    precision/recall, or None for a statistics file (μ, Σ only). ``key`` says what they were
    computed from and with (JSON)."""

    mu: torch.Tensor
    sigma: torch.Tensor
    num: int
    features: torch.Tensor | None = None
    key: str = "{}"

    @classmethod
    def from_features(cls, features: torch.Tensor, key: str = "{}") -> "ReferenceStats":
        features = features.detach().float().cpu()  # (M, D)
        mu, sigma = mean_cov(features)
        return cls(mu, sigma, len(features), features, key)

    def save(self, path: str | Path) -> None:
        """Write atomically and durably (temp file, fsync, rename, fsync the folder)."""
        write_durably(path, lambda tmp: torch.save({"key": self.key, "mu": self.mu, "sigma": self.sigma,
                                                    "num": self.num, "features": self.features}, tmp))

    @classmethod
    def load(cls, path: str | Path, key: str | None = None) -> "ReferenceStats":
        """Read a file ``save`` wrote (``weights_only``); a different ``key`` is a ValueError."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if key is not None and saved.get("key") != key:
            raise ValueError("the file was written for other data or another feature extractor")
        return cls(saved["mu"].double(), saved["sigma"].double(), int(saved["num"]), saved["features"], saved["key"])


def mean_cov(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """μ [D] and the unbiased covariance Σ [D, D] of ``features`` [N, D], in float64."""
    x = features.double()
    mu = x.mean(dim=0)
    centred = x - mu
    return mu, centred.T @ centred / (len(x) - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) (torch-fidelity's formula, via the eigenvalues of Σ1 Σ2)."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    stats = [{"mu": np.asarray(m.cpu(), np.float64), "sigma": np.asarray(s.cpu(), np.float64)}
             for m, s in ((mu1, sigma1), (mu2, sigma2))]
    return fid_statistics_to_metric(stats[0], stats[1], verbose=False)["frechet_inception_distance"]


def precision_recall(samples: torch.Tensor, reference: torch.Tensor, k: int = K_NEIGHBOURS) -> tuple[float, float]:
    """Improved precision and recall of sample features [N, D] against reference features [M, D]."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    out = prc_features_to_metric(samples.float(), reference.float(), prc_neighborhood=k, save_cpu_ram=True,
                                 verbose=False)
    return out["precision"], out["recall"]


def kid(samples: torch.Tensor, reference: torch.Tensor, seed: int = 2020) -> tuple[float, float]:
    """KID's mean and standard deviation over ``KID_SUBSETS`` subsets of min(1000, N, M) samples."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = min(KID_SUBSET_SIZE, len(samples), len(reference))
    out = kid_features_to_metric(samples.float().cpu(), reference.float().cpu(), kid_subsets=KID_SUBSETS,
                                 kid_subset_size=size, rng_seed=seed, verbose=False)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


def inception_score(logits: torch.Tensor) -> tuple[float, float]:
    """exp E_x KL(p(y|x) ‖ p(y)), mean and standard deviation over min(10, N) splits."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    out = isc_features_to_metric(logits.cpu(), splits=min(10, len(logits)))
    return out["inception_score_mean"], out["inception_score_std"]


def class_confidence_entropy(logits: torch.Tensor) -> tuple[float, float]:
    """(E_x max_y softmax(logits)_y, the entropy in bits of the histogram of argmax_y) for logits [N, K]."""
    p = logits.double().softmax(dim=1)  # (N, K)
    counts = torch.bincount(p.argmax(dim=1), minlength=p.shape[1]).double()
    h = counts[counts > 0] / len(p)
    return float(p.max(dim=1).values.mean()), float(-(h * h.log2()).sum())


def metric_names(prefix: str) -> tuple[str, str]:
    """The names of the Fréchet distance and of KID for an extractor's prefix (fid or fd_digits)."""
    return prefix, prefix.replace("fid", "kid").replace("fd_", "kid_")


def sample_quality(features: torch.Tensor, logits: torch.Tensor | None, reference: ReferenceStats, prefix: str,
                   classifier: bool) -> dict[str, float | None]:
    """Every metric of sample ``features`` [N, D] (and ``logits`` [N, K]) against ``reference``:
    the Fréchet distance and, when the reference has its features, KID and precision/recall; the
    Inception Score from Inception's logits, or a classifier's confidence and class entropy.
    A metric the inputs cannot give is None."""
    if len(features) < MIN_SAMPLES:
        raise ValueError(f"{len(features)} samples are too few: precision/recall compare each sample with its "
                         f"{K_NEIGHBOURS} nearest other samples, so the metrics need at least {MIN_SAMPLES}")
    fd_name, kid_name = metric_names(prefix)
    mu, sigma = mean_cov(features)
    out: dict[str, float | None] = {fd_name: frechet_distance(mu, sigma, reference.mu, reference.sigma)}
    ref = reference.features
    usable = ref is not None and len(ref) >= MIN_SAMPLES
    out[kid_name], out[f"{kid_name}_std"] = kid(features, ref) if usable else (None, None)
    out["precision"], out["recall"] = precision_recall(features, ref.to(features.device)) if usable else (None, None)
    if logits is not None and classifier:
        out["confidence"], out["class_entropy"] = class_confidence_entropy(logits)
    elif logits is not None:
        out["is"], out["is_std"] = inception_score(logits)
    return {k: (None if v is None else float(v)) for k, v in out.items()}
