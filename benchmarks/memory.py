"""Activation checkpointing: peak memory and step time of training, with and without
``model.gradient_checkpointing``, and the largest batch per device each config fits.

Every measurement is a fresh process (peak RSS is per process): it builds the config's
IDDPM with random weights, runs ``--steps`` steps of ``Trainer.fit`` (the module's own
training step: hybrid loss, backward, AdamW, EMA) on random images at one batch size, and
reports its peak RSS and the median time of the steps after the first.

Memory is about linear in the batch: peak(b) = fixed + b · per_image, the line through the
two largest batches measured (the paper's 128 for CIFAR-10); a smaller one checks it. From
the line, the largest batch per device:

* CPU RAM (``--cpu-gib``, 24 here): (capacity − fixed) / per_image, ``fixed`` as measured
  (Python, torch, Lightning, the weights, AdamW's state, the EMA).
* GPU memory (80 and 141 GiB): (capacity − 20 bytes/parameter) / per_image, the per-image
  cost measured here in float32 and 20 bytes per parameter for the weights, gradients,
  AdamW's two moments and the EMA. Computed, not measured: it leaves out the CUDA context
  (~0.5 GiB) and the allocator's slack, and bf16-mixed keeps fewer bytes per image
  (``benchmarks/gpu.py`` measures peak GPU memory on the device itself).

    python benchmarks/memory.py [--configs configs/digits.yaml ...] [--batches 16 32 128] [--rows-from memory.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from common import RESULTS, build_model, describe, images, machine, peak_rss_gb
from train_step import fit_steps

GIB = 2**30
GPU_GIB = (80, 141)  # H100 / A100 80 GB and H200
STATE_BYTES_PER_PARAMETER = 4 * 5  # float32 weights, gradients, AdamW's exp_avg and exp_avg_sq, the EMA


def measure_one(config: str, batch: int, checkpointing: bool, steps: int) -> dict:
    """In this process: ``steps`` training steps at ``batch``; peak RSS and step times."""
    model = build_model(config, gradient_checkpointing=checkpointing)
    x = images(model, batch, torch.device("cpu"))
    built = peak_rss_gb()
    clock = fit_steps(model, DataLoader(TensorDataset(x, torch.zeros(batch)), batch_size=batch), steps)
    dts = clock.step_times()
    return {"batch": batch, "gradient_checkpointing": checkpointing, "steps": steps,
            "peak_rss_gib": peak_rss_gb(), "rss_after_build_gib": built,
            "step_s": statistics.median(dts) if dts else None, "step_times_s": dts,
            "parameters": sum(p.numel() for p in model.unet.parameters())}


def measure(config: str, batch: int, checkpointing: bool, steps: int) -> dict:
    """``measure_one`` in a fresh process."""
    cmd = [sys.executable, __file__, "--one", config, str(batch), str(int(checkpointing)), str(steps)]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["wall_s"] = time.perf_counter() - start
    print(f"  {Path(config).stem:<18} batch {batch:>4} checkpointing {checkpointing!s:<5}: "
          f"peak RSS {row['peak_rss_gib']:.2f} GiB, step {row['step_s'] or float('nan'):.3f} s", flush=True)
    return row


def fit_line(rows: list[dict], key: str = "peak_rss_gib") -> tuple[float, float]:
    """(fixed GiB, GiB per image) of the peak memory ``key`` through the two largest batches: the
    line is used to extrapolate upwards, and small batches carry more of the allocator's fixed slack."""
    a, b = sorted(rows, key=lambda r: r["batch"])[-2:]
    per_image = (b[key] - a[key]) / (b["batch"] - a["batch"])
    return a[key] - per_image * a["batch"], per_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # cifar10_vlb.yaml trains the same UNet as cifar10_hybrid.yaml (only the loss differs)
    parser.add_argument("--configs", nargs="+",
                        default=["configs/digits.yaml", "configs/cifar10_hybrid.yaml", "configs/imagenet64_hybrid.yaml"])
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="the batches measured; the line goes through the two largest, the others check it "
                             "(default: 64 128 256 for digits, 16 32 128 for CIFAR-10, 4 8 for ImageNet 64, whose "
                             "step at 128 takes many minutes on a CPU)")
    parser.add_argument("--rows-from", help="a JSON this script wrote: derive the tables from its measurements "
                                            "instead of measuring again")
    parser.add_argument("--steps", type=int, default=3, help="training steps per measurement")
    parser.add_argument("--cpu-gib", type=float, default=24.0)
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "memory.json"))
    args = parser.parse_args()
    if args.one:
        config, batch, checkpointing, steps = args.one
        print(json.dumps(measure_one(config, int(batch), bool(int(checkpointing)), int(steps))))
        return

    print(f"memory: {describe(machine())}")
    results, measured = {}, json.loads(Path(args.rows_from).read_text())["results"] if args.rows_from else None
    for config in args.configs:
        batches = args.batches or ([64, 128, 256] if "digits" in config else [4, 8] if "imagenet64" in config
                                   else [16, 32, 128])
        per_setting = {}
        for checkpointing in (False, True):
            setting = "checkpointing" if checkpointing else "plain"
            rows = (measured[config][setting]["rows"] if measured else
                    [measure(config, b, checkpointing, args.steps) for b in batches])
            fixed, per_image = fit_line(rows)
            params = rows[0]["parameters"]
            state_gib = STATE_BYTES_PER_PARAMETER * params / GIB
            largest = {"cpu_ram_from_measured_line": int((args.cpu_gib - fixed) / per_image)}
            for gib in GPU_GIB:
                largest[f"gpu_{gib}_gib_computed"] = int((gib - state_gib) / per_image)
            checked = {}
            for row in sorted(rows, key=lambda r: r["batch"])[:-2]:
                predicted = fixed + per_image * row["batch"]
                checked = {"batch": row["batch"], "measured_gib": row["peak_rss_gib"], "predicted_gib": predicted,
                           "relative_error": (predicted - row["peak_rss_gib"]) / row["peak_rss_gib"]}
            per_setting[setting] = {
                "rows": rows, "fixed_gib": fixed, "per_image_gib": per_image, "state_gib": state_gib,
                "largest_batch": largest, "line_check": checked}
        plain, saving = per_setting["plain"], per_setting["checkpointing"]
        results[config] = {
            **per_setting,
            "per_image_saving": 1 - saving["per_image_gib"] / plain["per_image_gib"],
            "peak_saving": {str(a["batch"]): 1 - a["peak_rss_gib"] / b["peak_rss_gib"]
                            for a, b in zip(saving["rows"], plain["rows"])},
            "step_time_ratio": {str(a["batch"]): a["step_s"] / b["step_s"]
                                for a, b in zip(saving["rows"], plain["rows"]) if a["step_s"] and b["step_s"]},
        }

    print(f"\n{'config':<20}{'checkpointing':>14}{'GiB/image':>11}{'fixed GiB':>10}{'check':>24}"
          f"{'largest batch: ' + str(int(args.cpu_gib)) + ' GiB CPU':>28}{'80 GiB GPU':>12}{'141 GiB GPU':>13}")
    for config, r in results.items():
        for name in ("plain", "checkpointing"):
            s = r[name]
            c = s["line_check"]
            check = f"{c['measured_gib']:.2f} vs {c['predicted_gib']:.2f} @ {c['batch']}" if c else "-"
            lb = s["largest_batch"]
            print(f"{Path(config).stem:<20}{name:>14}{s['per_image_gib']:>11.4f}{s['fixed_gib']:>10.2f}{check:>24}"
                  f"{lb['cpu_ram_from_measured_line']:>28}{lb['gpu_80_gib_computed']:>12}{lb['gpu_141_gib_computed']:>13}")
        ratios = ", ".join(f"{v:.2f}x at {b}" for b, v in r["step_time_ratio"].items())
        peaks = ", ".join(f"{v:.0%} at {b}" for b, v in r["peak_saving"].items())
        print(f"  with checkpointing: {r['per_image_saving']:.0%} less memory per image, peak RSS lower by {peaks}; "
              f"step time {ratios}")
    out = {"benchmark": "memory", "machine": machine(), "config": vars(args), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
