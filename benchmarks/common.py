"""What every benchmark here shares: the machine's description, timing alternated
between methods, peak memory, and the table + JSON each script writes."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU, accelerator and library versions of this run."""
    info = {
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    return info


def describe(info: dict) -> str:
    gpu = f", GPU {info['gpu']}" if info["gpu"] else ", no GPU"
    return (f"{info['cpu_count']} CPUs ({info['torch_threads']} torch threads){gpu}, torch {info['torch']}, "
            f"{info['platform']}, load {info['load_avg_1min']:.2f}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(methods: dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each method once per round, ``rounds`` times after ``warmup`` rounds, in an order
    reversed every other round; each call returns the seconds it measured. Alternating
    spreads a machine's slow moments over all methods instead of penalising whichever ran then."""
    for _ in range(warmup):
        for run in methods.values():
            run()
    times = {name: [] for name in methods}
    order = list(methods)
    for r in range(rounds):
        # A B, B A, A B, ...: neither method always runs first (caches, clocks, allocator)
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(methods[name]())
    return times


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def report(name: str, config: dict, times: dict[str, list[float]], baseline: str, extra: dict,
           out: str | None, unit: str = "s", per: float = 1.0) -> dict:
    """Print a table of medians and ratios against ``baseline`` (its median divided by each
    method's: > 1 is faster than the baseline) and write it with the raw times as JSON."""
    info = machine()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name}: {describe(info)}")
    print(f"{'method':<28}{'median':>12}{'min':>12}{'max':>12}{'speed':>10}   (speed: {baseline}'s median / the method's)")
    for k, v in times.items():
        print(f"{k:<28}{med[k] * per:>11.4g}{unit}{min(v) * per:>11.4g}{unit}{max(v) * per:>11.4g}{unit}"
              f"{med[baseline] / med[k]:>9.3f}x")
    for k, v in extra.items():
        print(f"{k}: {v}")
    result = {"benchmark": name, "config": config, "machine": info, "seconds": times, "median_seconds": med,
              "speed_vs_" + baseline: {k: med[baseline] / m for k, m in med.items()}, **extra}
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


def build_model(config: str, **overrides):
    """The IDDPM of a config file's ``model`` section, at the image size and channels of
    its data (8x8x1 for digits, 32x32x3 for CIFAR-10, 64x64x3 for ImageNet 64), with
    random weights: speed does not depend on what the weights have learned."""
    import yaml

    from iddpm_lightning.module import IDDPM

    cfg = yaml.safe_load(Path(config).read_text())
    data = cfg["data"]["class_path"].rsplit(".", 1)[-1]
    size, channels = {"DigitsDataModule": (8, 1), "CIFAR10DataModule": (32, 3)}.get(
        data, (cfg["data"]["init_args"].get("image_size", 64), 3))
    torch.manual_seed(0)
    return IDDPM(image_size=size, in_channels=channels, **{**cfg["model"], **overrides})


def images(model, n: int, device: torch.device) -> torch.Tensor:
    """n images for the model: digits' real test images for 8x8x1 (repeated beyond the 297 of
    the split), else random 8-bit images (the datasets are not on this machine); [n, C, H, W]
    in [-1, 1]."""
    hp = model.hparams
    if (hp.image_size, hp.in_channels) == (8, 1):
        from iddpm_lightning.data import DigitsDataModule

        dm = DigitsDataModule(batch_size=n)
        dm.setup("test")
        x = next(iter(dm.test_dataloader()))[0]
        return x.repeat(-(-n // len(x)), 1, 1, 1)[:n].to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, hp.in_channels, hp.image_size, hp.image_size), generator=g)
    return (x.float() / 127.5 - 1).to(device)
