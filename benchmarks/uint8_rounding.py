"""Rounding or truncating samples to 8 bits: how much the digits metrics move.

    python benchmarks/uint8_rounding.py --ckpt_path runs/digits/checkpoints/last.ckpt

Draws ``--num_samples`` images as ``predict`` does (seed 0, one batch, the config's default sampler:
100 respaced ancestral steps) and scores two 8-bit versions of the SAME samples against the digits
training split: rounded, ``round((x + 1) * 127.5)`` (this project's ``to_uint8``, the inverse of
``u / 127.5 - 1``), and truncated, ``int((x + 1) * 127.5)`` (the paper's ``image_sample.py``), which
moves every pixel down by half a level on average. Writes ``benchmarks/results/uint8_rounding.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from iddpm_lightning.data import DigitsDataModule, to_uint8
from iddpm_lightning.diffusion import Sampler
from iddpm_lightning.evaluation.features import default_cache_dir, digit_features
from iddpm_lightning.evaluation.metrics import ReferenceStats, sample_quality
from iddpm_lightning.module import IDDPM
from iddpm_lightning.rng import seeded_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", default="runs/digits/checkpoints/last.ckpt")
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--out", default="benchmarks/results/uint8_rounding.json")
    args = parser.parse_args()
    dm = DigitsDataModule()
    dm.setup("validate")
    features = digit_features(dm, default_cache_dir())
    train = torch.utils.data.DataLoader(dm.reference("train").dataset, batch_size=10_000)
    reference = ReferenceStats.from_features(features(to_uint8(next(iter(train))[0]))[0])
    model = IDDPM.load_from_checkpoint(args.ckpt_path, map_location="cpu").eval()
    x = model.sample(Sampler(), args.num_samples, generator=seeded_generator(torch.device("cpu"), 0, 0))  # predict's
    versions = {"rounded": to_uint8(x),
                "truncated": ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)}  # .to(uint8) truncates
    result = {"checkpoint": args.ckpt_path, "num_samples": args.num_samples, "sampler": "ddpm, 100 respaced steps",
              "machine": platform.processor() or platform.machine(),
              "pixels_that_differ": float((versions["rounded"] != versions["truncated"]).float().mean()),
              "metrics": {}}
    for name, u8 in versions.items():
        f, logits = features(u8)
        result["metrics"][name] = sample_quality(f, logits, reference, features.prefix, classifier=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, metrics in result["metrics"].items():
        print(f"{name:>9}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if v is not None))
    print(f"pixels that differ: {result['pixels_that_differ']:.1%}")


if __name__ == "__main__":
    main()
