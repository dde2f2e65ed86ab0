"""The digits run before and after the paper-faithful UNet (zero-initialised branches, a norm
before the middle attention, 4 heads): two checkpoints of ``fit --config configs/digits.yaml``
(same seed, same 1,200 steps), each scored the same way with the same noise:

- exact test bits/dim: ``calc_bpd_loop`` over all T = 1000 steps for the 150 test digits;
- the digit-feature metrics of 500 samples, ancestral 100 steps and DPM-Solver++ 20 steps;
- and, from each run's TensorBoard log, its val/bpd and val/fd_digits during training.

Writes ``benchmarks/results/paper_unet.json`` and prints a Markdown table (the README's).

    python benchmarks/paper_unet.py --before runs/digits/checkpoints/last.ckpt \\
        --after runs/digits_paper_unet/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from iddpm_lightning.evaluation.features import default_cache_dir
from iddpm_lightning.experiments.measure import Checkpoint, Digits, curves

SAMPLERS = [("ancestral, 100 steps", "ddpm", 100), ("DPM-Solver++, 20 steps", "dpm_solver", 20)]
METRICS = ("fd_digits", "precision", "recall", "confidence")


def score(path: Path, digits: Digits, num_samples: int) -> dict:
    ckpt = Checkpoint(path)
    unet = ckpt.module.hparams.unet
    out = {"checkpoint": str(path), "mid_attention_norm": unet.get("mid_attention_norm", False),
           "parameters": sum(p.numel() for p in ckpt.module.unet.parameters())}
    logged = curves(path.parent.parent)  # the run's TensorBoard scalars
    out["val_bpd_by_step"] = {step: round(v, 4) for step, v in logged.get("val/bpd", [])}
    out["val_fd_digits_by_step"] = {step: round(v, 3) for step, v in logged.get("val/fd_digits", [])}
    start = time.perf_counter()
    with torch.inference_mode():
        bpd = ckpt.diffusion.calc_bpd_loop(ckpt.model, digits.test, generator=torch.Generator().manual_seed(0),
                                           max_batch=256)
    out["test_bpd"] = {"total": float(bpd["total_bpd"].mean()), "decoder": float(bpd["vb"][:, 0].mean()),
                       "wall_s": round(time.perf_counter() - start, 1)}
    for label, sampler, steps in SAMPLERS:
        quality = digits.quality(ckpt.draw(sampler, steps, num_samples, seed=0, batch=500))
        out[label] = {m: quality[m] for m in METRICS}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/paper_unet.json"))
    args = parser.parse_args()
    digits = Digits(default_cache_dir())
    result = {name: score(path, digits, args.num_samples) for name, path in (("before", args.before),
                                                                               ("after", args.after))}
    args.out.write_text(json.dumps(result, indent=1))
    header = ["UNet", "test bits/dim (exact)", *(f"{label}: FD / precision / recall / confidence"
                                                 for label, _, _ in SAMPLERS)]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, r in result.items():
        cells = [f"{r['test_bpd']['total']:.4f}",
                 *(" / ".join(f"{r[label][m]:.3f}" for m in METRICS) for label, _, _ in SAMPLERS)]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
