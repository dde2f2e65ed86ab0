"""Sample quality and wall time of each sampler for a trained digits checkpoint, through the CLI.

For every sampler setting: ``predict`` draws N samples (EMA weights, seed 0), then ``evaluate``
scores them against the config's training split with the digits features. Recorded: the wall
time of ``predict`` (the command, start-up included), and the sampling alone: ``IDDPM.sample``
of the same N images in one batch, timed in this process (for the 1000-step chain, whose
sampling dominates its command, the command's time minus a 1-sample command's). Writes
``benchmarks/results/sample_quality.json`` and prints a Markdown table (the README's).

    python benchmarks/sample_quality.py --ckpt_path runs/digits/checkpoints/last.ckpt [--num_samples 500]
    python benchmarks/sample_quality.py --timing_only   # redo the in-process timings of an existing JSON
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = [  # (label, sampler name, steps)
    ("ancestral, 25 steps", "ddpm", 25),
    ("ancestral, 50 steps", "ddpm", 50),
    ("ancestral, 100 steps", "ddpm", 100),
    ("ancestral, 1000 steps", "ddpm", None),
    ("DDIM, 25 steps", "ddim", 25),
    ("DDIM, 50 steps", "ddim", 50),
    ("DPM-Solver++ (2nd order), 10 steps", "dpm_solver", 10),
    ("DPM-Solver++ (2nd order), 20 steps", "dpm_solver", 20),
    ("Heun (EDM), 10 steps: 19 model calls", "heun", 10),
    ("Heun (EDM), 20 steps: 39 model calls", "heun", 20),
]
METRICS = ("fd_digits", "kid_digits", "precision", "recall", "confidence", "class_entropy")


def cli(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "iddpm_lightning", *args], check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", default="runs/digits/checkpoints/last.ckpt")
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--out", default="benchmarks/results/sample_quality.json")
    parser.add_argument("--timing_only", action="store_true")
    parser.add_argument("--rows", nargs="*", help="measure only the rows with these labels (the others stay as in --out)")
    args = parser.parse_args()
    if args.timing_only:
        record = json.loads(Path(args.out).read_text())
        time_in_process(record, args.ckpt_path)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        return table(record)
    work = Path(tempfile.mkdtemp(prefix="sample_quality_"))
    base = ["predict", "--config", args.config, "--ckpt_path", args.ckpt_path, "--trainer.enable_progress_bar=false"]

    def predict(sampler: str, steps, n: int, out: Path) -> float:
        return cli(*base, f"--sampling.num_samples={n}", f"--sampling.sampler.name={sampler}",
                   f"--sampling.sampler.steps={'null' if steps is None else steps}", f"--sampling.batch_size={n}",
                   f"--sampling.out_dir={out}")

    startup = predict("ddpm", 1, 1, work / "startup")  # a command that samples one image in one step
    previous = {r["label"]: r for r in json.loads(Path(args.out).read_text())["rows"]} if args.rows else {}
    rows = []
    for label, sampler, steps in SETTINGS:
        if args.rows and label not in args.rows:
            rows.append(previous[label])
            continue
        out = work / f"{sampler}_{steps}"
        seconds = predict(sampler, steps, args.num_samples, out)
        (samples,) = out.glob("samples_*.npz")
        cli("evaluate", "--samples", str(samples), "--reference", args.config)
        result = json.loads(next(out.glob("samples_*_digits_train.json")).read_text())
        rows.append({"label": label, "sampler": sampler, "steps": steps, "predict_s": round(seconds, 1),
                     "sampling_s": round(seconds - startup, 1), **{k: result["metrics"][k] for k in METRICS},
                     "features": result["features"], "num_samples": result["num_samples"]})
        print(f"{label}: {rows[-1]}", flush=True)
    real = work / "real"
    real.mkdir()
    from iddpm_lightning.data import DigitsDataModule
    import numpy as np

    dm = DigitsDataModule()
    dm.setup("validate")
    np.savez(real / "test_150x8x8x1.npz", arr_0=dm.test_set.images.permute(0, 2, 3, 1).numpy())
    cli("evaluate", "--samples", str(real / "test_150x8x8x1.npz"), "--reference", args.config)
    held_out = json.loads(next(real.glob("*_digits_train.json")).read_text())["metrics"]
    record = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "checkpoint": args.ckpt_path, "num_samples": args.num_samples, "startup_s": round(startup, 1),
              "held_out_digits_150": held_out, "rows": rows}
    time_in_process(record, args.ckpt_path, args.rows)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    table(record)


def time_in_process(record: dict, ckpt_path: str, labels: list[str] | None = None) -> None:
    """``sampling_s``: IDDPM.sample of the rows' N images in one batch, timed here (the full chain:
    its command's time minus the start-up command's); only the rows ``labels`` if given."""
    from iddpm_lightning.diffusion import Sampler
    from iddpm_lightning.module import IDDPM
    from iddpm_lightning.rng import seeded_generator

    model = IDDPM.load_from_checkpoint(ckpt_path, map_location="cpu")
    for r in record["rows"]:
        if labels and r["label"] not in labels:
            continue
        if r["steps"] is None:
            r["sampling_s"] = round(r["predict_s"] - record["startup_s"], 1)
            continue
        g = seeded_generator(torch.device("cpu"), 0, 0)
        start = time.perf_counter()
        model.sample(Sampler(r["sampler"], r["steps"]), record["num_samples"], generator=g)
        r["sampling_s"] = round(time.perf_counter() - start, 1)
        print(f"{r['label']}: {r['sampling_s']} s in process", flush=True)


def table(record: dict) -> None:
    held_out, rows = record["held_out_digits_150"], record["rows"]
    print("| sampler | predict s (sampling alone) | FD (digits) | KID (digits) | precision | recall | confidence | "
          "class entropy (bits) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| held-out test digits (150) | | {held_out['fd_digits']:.2f} | {held_out['kid_digits']:.2f} | "
          f"{held_out['precision']:.3f} | {held_out['recall']:.3f} | {held_out['confidence']:.3f} | "
          f"{held_out['class_entropy']:.3f} |")
    for r in rows:
        print(f"| {r['label']} | {r['predict_s']} ({r['sampling_s']}) | {r['fd_digits']:.2f} | {r['kid_digits']:.2f} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} | {r['confidence']:.3f} | {r['class_entropy']:.3f} |")


if __name__ == "__main__":
    main()
