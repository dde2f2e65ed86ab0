"""``python -m iddpm_lightning evaluate``: score a samples file against a reference, as papers do.

    python -m iddpm_lightning evaluate --samples runs/digits/predict/samples_1000x8x8x1.npz \\
        --reference configs/digits.yaml

The samples are ``predict``'s npz (``arr_0``: uint8 N x H x W x C) or a folder of PNGs. The
reference is one of:

- a config (``.yaml``): its data module's ``--split`` (``train`` by default, the paper's protocol);
- an npz of images (``arr_0``, uint8 NHWC) or a folder of PNGs;
- a statistics file, an npz with ``mu`` and ``sigma`` (EDM's ``fid-refs``, pytorch-fid's and
  guided-diffusion's files store them so): the Fréchet distance only, since KID and
  precision/recall need the reference's features.

It prints a table and writes ``{samples}_{features}_{reference}.json`` next to the samples (or
``--out``), with the sample count, the reference and the feature extractor named. Reference
features are cached (``fid_ref_*.pt``, the same files the ``FID`` callback writes), keyed by the
data, the split, its size and the extractor, and written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import yaml

from ..errors import ConfigError
from ..data import to_model_range
from .features import INCEPTION_FILE, InceptionFeatures, default_cache_dir, digit_features
from .metrics import MIN_SAMPLES, ReferenceStats, metric_names, sample_quality
from .reference import REFERENCE_SUBSET, one_line, reference_file, reference_key, reference_statistics

DEFAULT_INCEPTION = f"data/{INCEPTION_FILE}"
IMAGE_SUFFIXES = (".png",)
UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile)  # what np.load raises for a broken file
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr")  # PIL modes of 8 bits per channel
NOTES = {"digits": "digits-classifier features: a digits metric, NOT comparable with Inception FID",
         "inception": "torch-fidelity's Inception-v3 (the TF1 reference FID network), 2048 pool features"}


# ----------------------------------------------------------------------------- reading


def read_images(path: Path, what: str) -> np.ndarray:
    """uint8 images [N, H, W, C] from an npz (``arr_0``) or a folder of PNGs; ``what`` names the
    setting in errors."""
    if not path.exists():
        raise ConfigError(f"{what}={str(path)!r} does not exist; give predict's samples npz (arr_0: uint8 "
                          f"N x H x W x C) or a folder of PNG images")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"{what}={str(path)!r} is a folder without PNG images; give a folder of PNGs or an npz")
        from PIL import Image

        arrays = []
        for f in files:
            try:
                with Image.open(f) as im:
                    if im.mode not in EIGHT_BIT_MODES:
                        raise ConfigError(f"{what}={str(path)!r}: {f.name} is a {im.mode} image, not 8 bits per channel; "
                                          f"evaluate reads 8-bit greyscale or RGB PNGs (convert it, e.g. scaling 16-bit by 1/257)")
                    a = np.asarray(im.convert("L" if im.mode in ("L", "1", "LA") else "RGB"))
            except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
                raise ConfigError(f"{what}={str(path)!r}: {f.name} cannot be read as an image ({err}); remove or "
                                  f"replace it") from None
            arrays.append(a[..., None] if a.ndim == 2 else a)
        if len({a.shape for a in arrays}) > 1:
            raise ConfigError(f"{what}={str(path)!r} holds PNGs of different sizes ({sorted({a.shape for a in arrays})[:3]}); "
                              f"all images must share one size")
        return np.stack(arrays)
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):  # an .npy of images
            images = data
        else:
            with data as npz:
                if "arr_0" not in npz:
                    raise ConfigError(f"{what}={str(path)!r} has no arr_0 (it holds {', '.join(npz.files) or 'nothing'}); "
                                      f"give predict's samples npz, whose arr_0 holds uint8 N x H x W x C images")
                images = npz["arr_0"]
    except UNREADABLE as err:
        raise ConfigError(f"{what}={str(path)!r} cannot be read as an npz ({' '.join(str(err).split())}); give "
                          f"predict's samples npz or a folder of PNGs") from None
    return check_images(images, what, path)


def check_images(images: np.ndarray, what: str, path: Path) -> np.ndarray:
    """Refuse anything but uint8 N x H x W x C with C = 1 or 3."""
    if images.dtype != np.uint8:
        raise ConfigError(f"{what}={str(path)!r} holds {images.dtype} images; it must hold uint8 images (0..255, "
                          f"as predict writes them): round and convert with ((x + 1) * 127.5).round().astype('uint8')")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ConfigError(f"{what}={str(path)!r} holds an array of shape {images.shape}; it must be N x H x W x C "
                          f"with C = 1 or 3 channels (channels last, as predict writes them)")
    return images


def is_statistics(path: Path) -> bool:
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as npz:
            return "mu" in npz and "sigma" in npz
    except UNREADABLE:
        return False  # read_images names the problem


# ----------------------------------------------------------------------------- references


def data_module_of(config: Path):
    """The data module (set up) and the run directory of a config's ``data`` section."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    try:
        raw = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--reference={str(config)!r} cannot be read as YAML ({' '.join(str(err).split())[:200]}); "
                          f"give a config such as configs/digits.yaml") from None
    if not isinstance(raw, dict) or "data" not in raw:
        raise ConfigError(f"--reference={str(config)!r} has no data section; give a config such as configs/digits.yaml")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    try:
        dm = parser.instantiate_classes(parser.parse_object({"data": raw["data"]})).data
    except Exception as err:
        raise ConfigError(f"--reference={str(config)!r}: its data section is invalid ({' '.join(str(err).split())[:300]})"
                          ) from None
    if not callable(getattr(dm, "reference", None)):
        raise ConfigError(f"--reference={str(config)!r}: its data module {type(dm).__name__} has no reference(split); "
                          f"use one of iddpm_lightning.data's data modules, or give the reference images as an npz")
    dm.setup("validate")
    return dm, Path(raw.get("run_dir", "runs/default"))


class ReferenceSource:
    """What the samples are compared with: a ``dataset`` of images in [-1, 1] (a config's split, an npz,
    a folder of PNGs) or ready ``stats``, a cache key and folder, a description, and the data module
    (a config's) for the digits classifier. A config's images are decoded only if its statistics
    are not in the cache, and then streamed."""

    def __init__(self, arg: str, split: str, cache_dir: str | None):
        path = Path(arg)
        self.path, self.split, self.dm, self.dataset, self.stats = path, split, None, None, None
        if not path.exists():
            raise ConfigError(f"--reference={arg!r} does not exist; give a config (configs/digits.yaml), an npz of "
                              f"images or of statistics (mu, sigma), or a folder of PNGs")
        if path.suffix in (".yaml", ".yml"):
            self.dm, run_dir = data_module_of(path)
            if split not in ("train", "val", "test"):
                raise ConfigError(f"--split={split!r} is not a split; use train, val or test")
            ref = self.dm.reference(split)
            self.dataset, self.data_key = ref.dataset, ref.key
            self.image_shape = tuple(ref.key["image_shape"][1:]) + tuple(ref.key["image_shape"][:1])  # (H, W, C)
            self.owner = type(self.dm).__name__
            folder = Path(ref.root or run_dir) / "fid_stats"
            self.description = f"{self.owner}'s {split} split of {path}"
            self.tag = split
        elif is_statistics(path):
            try:
                with np.load(path, allow_pickle=False) as npz:
                    mu, sigma = npz["mu"], npz["sigma"]
            except UNREADABLE as err:
                raise ConfigError(f"--reference={arg!r} cannot be read as a statistics npz ({err}); give mu and sigma "
                                  f"as float arrays") from None
            if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
                raise ConfigError(f"--reference={arg!r} holds mu of dtype {mu.dtype} and sigma of dtype {sigma.dtype}; "
                                  f"a statistics file needs float arrays")
            if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                raise ConfigError(f"--reference={arg!r} holds mu of shape {mu.shape} and sigma of shape {sigma.shape}; "
                                  f"a statistics file needs mu [D] and sigma [D, D]")
            self.stats = ReferenceStats(torch.from_numpy(mu).double(), torch.from_numpy(sigma).double(), 0, None,
                                        json.dumps({"statistics": str(path.resolve())}))
            self.description, self.tag, folder, self.image_shape = f"statistics file {path} (mu, sigma)", path.stem, None, None
        else:
            images = read_images(path, "--reference")
            digest = hashlib.sha256(images.tobytes()).hexdigest()[:16]
            self.data_key = {"images": path.name, "sha256": digest, "length": len(images),
                             "image_shape": list(images.shape[1:])}
            self.dataset = ImageArray(images)
            self.image_shape = tuple(images.shape[1:])
            self.owner = "images"
            folder = (path.parent if path.is_file() else path) / "fid_stats"
            self.description = f"{len(images)} images of {path}"
            self.tag = path.stem
        if self.dataset is not None and len(self.dataset) < MIN_SAMPLES:
            raise ConfigError(f"--reference={arg!r} has {len(self.dataset)} image(s), fewer than the {MIN_SAMPLES} the "
                              f"metrics need (a covariance, and each image's 3 nearest others); give more images")
        self.folder = Path(cache_dir) if cache_dir is not None else folder


class ImageArray(torch.utils.data.Dataset):
    """uint8 images [N, H, W, C] as a dataset of (x in [-1, 1] [C, H, W], 0), as data modules give them."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return to_model_range(torch.from_numpy(self.images[i]).permute(2, 0, 1)), 0


# ----------------------------------------------------------------------------- features


def extractor_for(kind: str, reference: ReferenceSource, inception_weights: str, cache_folder: Path | None):
    if kind == "inception":
        return InceptionFeatures(inception_weights)
    from ..data import DigitsDataModule

    dm = reference.dm
    if dm is None or not isinstance(dm, DigitsDataModule):
        dm = DigitsDataModule()  # the default split: the classifier of configs/digits.yaml
        dm.setup("validate")
    return digit_features(dm, cache_folder)


@torch.no_grad()
def features_of(extractor, images: np.ndarray, batch_size: int, device: torch.device):
    """(features [N, D], logits [N, K] or None) of uint8 NHWC images, float32 on the CPU."""
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).to(device)  # (b, C, H, W) uint8
        f, lo = extractor(x)
        feats.append(f.float().cpu())
        if lo is not None:
            logits.append(lo.float().cpu())
    return torch.cat(feats), (torch.cat(logits) if logits else None)


def reference_stats(reference: ReferenceSource, extractor, batch_size: int, device: torch.device,
                    subset: int = REFERENCE_SUBSET):
    """(ReferenceStats, cache file or None, whether it was read from the cache): the cache is looked
    up before any reference image is decoded; on a miss the images stream through the extractor."""
    if reference.stats is not None:
        if len(reference.stats.mu) != extractor.num_features:
            raise ConfigError(f"--reference={str(reference.path)!r} holds statistics of {len(reference.stats.mu)} "
                              f"features, but {extractor.name} gives {extractor.num_features}; use a statistics "
                              f"file of the same feature extractor (--features)")
        return reference.stats, None, False
    key = reference_key(reference.data_key, extractor.name, min(len(reference.dataset), subset))
    where = f"--reference={str(reference.path)!r}"
    return reference_statistics(reference.dataset, extractor, key,
                                reference_file(reference.folder, reference.owner, reference.tag, key), batch_size,
                                device, subset, getattr(reference.dm, "num_workers", 0),
                                unreadable=lambda err: f"{where} cannot be read ({one_line(err)}); check its files",
                                log=lambda message: None)


# ----------------------------------------------------------------------------- the command


def evaluate(samples: str, reference: str, split: str = "train", features: str = "auto",
             inception_weights: str = DEFAULT_INCEPTION, cache_dir: str | None = None, batch_size: int = 250,
             device: str | None = None, out: str | None = None, reference_subset: int = REFERENCE_SUBSET) -> dict:
    """Score ``samples`` against ``reference`` (see the module docstring); returns what the JSON holds."""
    if batch_size < 1:
        raise ConfigError(f"--batch_size={batch_size} must be at least 1; set it to a positive number of images")
    if reference_subset < MIN_SAMPLES:
        raise ConfigError(f"--reference_subset={reference_subset} must be at least {MIN_SAMPLES} (precision/recall "
                          f"compare each image with its 3 nearest others); the default is {REFERENCE_SUBSET}")
    if out and Path(out).is_dir():
        raise ConfigError(f"--out={out!r} is a folder; give the path of the JSON file to write")
    started = time.perf_counter()
    samples_path = Path(samples)
    images = read_images(samples_path, "--samples")
    if len(images) < MIN_SAMPLES:
        raise ConfigError(f"--samples={samples!r} holds {len(images)} image(s), fewer than the {MIN_SAMPLES} the metrics "
                          f"need (precision/recall compare each sample with its 3 nearest other samples); draw more "
                          f"with predict --sampling.num_samples (the paper uses 50000)")
    ref = ReferenceSource(reference, split, cache_dir)
    if ref.image_shape is not None and ref.image_shape != images.shape[1:]:
        raise ConfigError(f"--samples={samples!r} holds {'x'.join(map(str, images.shape[1:]))} (H x W x C) images but "
                          f"the reference {'x'.join(map(str, ref.image_shape))}; compare samples with data of their "
                          f"own size and channels")
    kind = features if features != "auto" else ("digits" if images.shape[1:] == (8, 8, 1) else "inception")
    if kind == "digits" and images.shape[1:] != (8, 8, 1):
        raise ConfigError(f"--features=digits reads 8x8 greyscale digits, but the samples are "
                          f"{'x'.join(map(str, images.shape[1:]))}; use --features=inception")
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ConfigError(f"--device={device!r} is not a device; use cpu or cuda (cuda:1 for the second GPU)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device={device} but this machine has {torch.cuda.device_count()} CUDA device(s); use "
                          f"--device cpu or an existing cuda:N")
    extractor = extractor_for(kind, ref, inception_weights, Path(cache_dir) if cache_dir else default_cache_dir()).to(dev)
    stats, cache, cached = reference_stats(ref, extractor, batch_size, dev, reference_subset)
    t0 = time.perf_counter()
    feats, logits = features_of(extractor, images, batch_size, dev)
    metrics = sample_quality(feats, logits, stats, extractor.prefix, extractor.classifier)
    result = {
        "samples": str(samples_path), "num_samples": len(images), "image_shape": list(images.shape[1:]),
        "reference": {"description": ref.description, "path": str(ref.path), "split": split if ref.dm else None,
                      "num_images": stats.num or None, "features_kept": 0 if stats.features is None else len(stats.features),
                      "cache": str(cache) if cache else None, "cache_hit": cached},
        "features": extractor.name, "feature_space": kind, "note": NOTES[kind],
        "metrics": metrics,
        "seconds": {"samples_features_and_metrics": round(time.perf_counter() - t0, 3),
                    "total": round(time.perf_counter() - started, 3)},
    }
    out_path = Path(out) if out else samples_path.with_name(f"{samples_path.stem}_{kind}_{ref.tag}.json")
    if samples_path.is_dir() and not out:
        out_path = samples_path / f"metrics_{kind}_{ref.tag}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out_path)  # a killed run leaves the old JSON or the new one, never half of one
    print(table(result))
    print(f"Wrote {out_path}")
    result["json"] = str(out_path)
    return result


def table(result: dict) -> str:
    ref = result["reference"]
    lines = [f"samples:   {result['num_samples']} images ({'x'.join(map(str, result['image_shape']))}) from "
             f"{result['samples']}",
             f"reference: {ref['description']}" + (f", {ref['num_images']} images" if ref["num_images"] else ""),
             f"           statistics {'read from' if ref['cache_hit'] else 'cached in'} {ref['cache']}"
             if ref["cache"] else "           statistics not cached",
             f"features:  {result['features']} ({result['note']})", "",
             f"{'metric':<16}{'value':>12}"]
    fd, kid = metric_names("fd_digits" if result["feature_space"] == "digits" else "fid")
    for name, value in result["metrics"].items():
        if name.endswith("_std"):
            continue
        std = result["metrics"].get(f"{name}_std")
        shown = "n/a (the reference has no features)" if value is None else f"{value:12.5g}"
        if std is not None:
            shown += f" ± {std:.3g}"
        unit = " bits (uniform over 10: 3.32)" if name == "class_entropy" else ""
        lines.append(f"{name:<16}{shown}{unit}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m iddpm_lightning evaluate",
        description="Score samples (predict's npz, or a folder of PNGs) against a reference: FID or the digits "
                    "Fréchet distance, KID, precision/recall (k=3), and the Inception Score or class confidence.",
    )
    parser.add_argument("--samples", required=True, help="predict's npz (arr_0: uint8 N x H x W x C) or a PNG folder")
    parser.add_argument("--reference", required=True,
                        help="a config (its data's --split), an npz of images, an npz of statistics (mu, sigma), "
                             "or a folder of PNGs")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"),
                        help="the config's split to compare with (default train, as the paper)")
    parser.add_argument("--features", default="auto", choices=("auto", "inception", "digits"),
                        help="feature space; auto: digits for 8x8 greyscale samples, else inception")
    parser.add_argument("--inception_weights", default=DEFAULT_INCEPTION,
                        help=f"local path of torch-fidelity's {INCEPTION_FILE} (nothing is downloaded)")
    parser.add_argument("--cache_dir", default=None,
                        help="folder of cached reference statistics and of the digits classifier (default: "
                             "fid_stats/ next to the data, or in the config's run_dir, or next to the reference "
                             "file; the classifier in ~/.cache/iddpm_lightning)")
    parser.add_argument("--batch_size", type=int, default=250, help="images per feature-extraction batch")
    parser.add_argument("--reference_subset", type=int, default=REFERENCE_SUBSET,
                        help="reference images whose features are kept for KID and precision/recall (a fixed "
                             "subset; FID uses the whole reference, streamed)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default=None, help="the JSON to write (default: next to the samples)")
    args = parser.parse_args(argv)
    evaluate(**vars(args))
