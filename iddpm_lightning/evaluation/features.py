"""Feature extractors for sample quality: Inception-v3 (read from disk) and a digits classifier.

An extractor is an ``nn.Module`` that maps uint8 images [N, C, H, W] to ``(features [N, D],
logits [N, K] or None)``, with the attributes ``num_features`` (D), ``num_logits`` (K, or 0), ``name`` (what the numbers
were computed with: in every output and cache key), ``prefix`` (the metric names: ``fid``/``kid``
for Inception, ``fd_digits``/``kid_digits`` for the digits classifier) and ``classifier``
(whether its logits are over the data's own classes, so that confidence and class entropy mean
something). Any ``nn.Module`` with ``num_features`` that returns features alone also works
(``wrap``), as in the tests.

``DigitFeatures`` is the offline metric of the digits default: a small CNN trained in seconds on
the digits training split, deterministic from its seed (one CPU thread) and cached. Its
numbers are digits metrics: they rank models on digits and are NOT comparable with Inception FID.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpointing import write_durably
from ..data import to_uint8
from ..errors import ConfigError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def default_cache_dir() -> Path:
    """Where the digits classifier is cached when no folder is given: it depends only on the
    digits split, so every run and ``evaluate`` on this machine share it."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "iddpm_lightning"


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] with greyscale (C = 1) repeated to 3 channels, as RGB networks read it."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class InceptionFeatures(nn.Module):
    """torch-fidelity's TF1-compatible Inception-v3 (``inception-v3-compat``, the network of the
    reference FID code): the 2048 pool features for FID, KID and precision/recall, and the 1008
    unbiased logits for the Inception Score. Greyscale is repeated to 3 channels; every image is
    resized to 299x299 inside the network (bilinear, as TensorFlow 1 did)."""

    prefix, classifier, num_features, num_logits = "fid", False, 2048, 1008

    def __init__(self, weights: str | os.PathLike | None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = None if weights is None else Path(weights).expanduser()
        if path is None or not path.is_file():
            where = "inception_weights is not set" if path is None else \
                f"it is not at inception_weights={str(weights)!r} ({path.resolve()})"
            raise ConfigError(
                f"Inception features need torch-fidelity's weights file {INCEPTION_FILE}, but {where}; download it "
                f"from {INCEPTION_URL} and set inception_weights to its path"
            )
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=str(path))
        except Exception as err:  # a truncated or foreign file
            raise ConfigError(f"inception_weights={str(weights)!r} cannot be loaded as {INCEPTION_FILE} ({err!r}); "
                              f"download it again from {INCEPTION_URL}") from err
        self.name = f"inception-v3-compat:2048:{path.name}"
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.net(to_rgb(images))  # uint8 (N, 3, H, W) in
        return features, logits  # (N, 2048), (N, 1008)


class _Wrapped(nn.Module):
    """A features-only extractor (``num_features``, uint8 [N, 3, H, W] -> [N, D]) in the common form;
    greyscale is repeated to 3 channels for it."""

    prefix, classifier, num_logits = "fid", False, 0

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.num_features = module.num_features
        self.name = f"{type(module).__module__}.{type(module).__qualname__}:{module.num_features}"

    def forward(self, images: torch.Tensor):
        return self.module(to_rgb(images)), None


def wrap(extractor: nn.Module, owner: str = "feature_extractor") -> nn.Module:
    """``extractor`` in the common form; it needs a positive int ``num_features``."""
    num_features = getattr(extractor, "num_features", None)
    if not isinstance(num_features, int) or num_features < 1:
        raise ConfigError(f"{owner} {type(extractor).__name__} needs a positive int attribute num_features (the "
                          f"length of its feature vectors), got {num_features!r}")
    extractor = extractor if hasattr(extractor, "prefix") and hasattr(extractor, "name") else _Wrapped(extractor)
    return extractor.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- digits


class DigitClassifier(nn.Module):
    """8x8 greyscale digit -> (64 features, 10 logits): two 3x3 convolutions (32, 64 channels),
    a 2x2 max-pool, a linear layer to the 64 features (taken before their ReLU, so no feature is
    dead), and the linear classifier on their ReLU. 73k parameters."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images[:, :1].float() / 127.5 - 1  # (N, 1, 8, 8) in [-1, 1]; RGB input: its first channel
        x = F.relu(self.conv1(x))  # (N, 32, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, 64, 4, 4)
        features = self.fc(x.flatten(1))  # (N, 64)
        return features, self.out(F.relu(features))  # (N, 64), (N, 10)


# How the classifier is trained; part of its cache key. Label smoothing keeps its confidence
# informative (measured on a first design: without it uniform noise read 0.76 confident, with it
# 0.28; held-out digits 0.99 and 0.88. This design with it: noise 0.37, held-out digits 0.87).
DIGIT_TRAINING = {"version": 1, "seed": 0, "epochs": 15, "batch_size": 64, "lr": 1e-3, "label_smoothing": 0.1}


def train_digit_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int = DIGIT_TRAINING["seed"]
                           ) -> DigitClassifier:
    """Train ``DigitClassifier`` on uint8 ``images`` [N, 1, 8, 8] and ``labels`` [N] (Adam, the
    settings of ``DIGIT_TRAINING``) on one CPU thread, so that a seed gives the same weights
    on any machine; about 4 s."""
    cfg = DIGIT_TRAINING
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            net = DigitClassifier()
            opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
            order = torch.Generator().manual_seed(seed)
            images, labels = images.cpu(), labels.cpu()
            for _ in range(cfg["epochs"]):
                perm = torch.randperm(len(images), generator=order)
                for i in range(0, len(images), cfg["batch_size"]):
                    idx = perm[i : i + cfg["batch_size"]]
                    _, logits = net(images[idx])
                    loss = F.cross_entropy(logits, labels[idx], label_smoothing=cfg["label_smoothing"])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        finally:
            torch.set_num_threads(threads)
    return net.eval().requires_grad_(False)


class DigitFeatures(nn.Module):
    """The digits classifier as a feature extractor (``fd_digits``, ``kid_digits``, precision,
    recall, confidence, class entropy). Build it with ``DigitFeatures.load_or_train``."""

    prefix, classifier, num_features, num_logits = "fd_digits", True, 64, 10

    def __init__(self, net: DigitClassifier, name: str):
        super().__init__()
        self.net, self.name = net, name
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[-2:] != (8, 8):
            raise ConfigError(f"the digits features read 8x8 images, got {tuple(images.shape[-2:])}; use "
                              f"features=inception for other images")
        return self.net(images)

    @classmethod
    def load_or_train(cls, images: torch.Tensor, labels: torch.Tensor, data_key: dict, cache_dir: str | Path | None
                      ) -> "DigitFeatures":
        """The classifier trained on uint8 ``images`` [N, 1, 8, 8] and ``labels`` [N] (the digits
        training split, described by ``data_key``): read from ``cache_dir`` if it holds it, else
        trained and written there atomically (``cache_dir`` None: trained, not cached)."""
        key = json.dumps({"classifier": "DigitClassifier", **DIGIT_TRAINING, "data": data_key}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        path = None if cache_dir is None else Path(cache_dir).expanduser() / f"digits_classifier_{digest}.pt"
        net = None
        if path is not None and path.is_file():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved.get("key") == key:
                    net = DigitClassifier()
                    net.load_state_dict(saved["state_dict"])
            except Exception:  # an unreadable cache is retrained and rewritten
                net = None
        if net is None:
            net = train_digit_classifier(images, labels)
            if path is not None:
                try:
                    write_durably(path, lambda tmp: torch.save({"key": key, "state_dict": net.state_dict()}, tmp))
                except (OSError, RuntimeError):  # a full disk is a RuntimeError from torch.save
                    pass  # not cached: the next run trains it again (4 s)
        # The name (in every output and reference cache key) follows the weights themselves, so
        # statistics of another training of the classifier (another machine's kernels) never mix.
        weights = hashlib.sha256(b"".join(t.numpy().tobytes() for t in net.state_dict().values())).hexdigest()[:12]
        return cls(net, f"digits-cnn-v{DIGIT_TRAINING['version']}:64:{digest}:{weights}")


def digit_features(dm, cache_dir: Path | None) -> DigitFeatures:
    """The digits classifier of data module ``dm`` (trained on its training split, cached in ``cache_dir``)."""
    shape = (getattr(dm, "channels", None), getattr(dm, "image_size", None), getattr(dm, "num_classes", None))
    if shape != (1, 8, 10):
        raise ConfigError(
            f"features='digits' reads 8x8 greyscale digits of 10 classes, but {type(dm).__name__} has "
            f"{shape[0]} channel(s) of {shape[1]}x{shape[1]} pixels and {shape[2]} classes; use features: inception"
        )
    train = dm.reference("train")
    images, labels = next(iter(torch.utils.data.DataLoader(train.dataset, batch_size=len(train.dataset))))
    return DigitFeatures.load_or_train(to_uint8(images), labels, train.key, cache_dir)  # (N, 1, 8, 8) uint8 in
