"""Where the time goes on a CPU: the training step's FLOP/s against the machine's peak, and
what ``compile: true`` buys.

* Peak, two ways. Theoretical: cores × clock × FP32 FLOPs per cycle per core, the last from
  the vector units (``flops_per_cycle``: 2 FMA pipes × 8 float32 lanes × 2 FLOPs per FMA = 32
  on AVX2 cores such as AMD Zen 2-4 and Intel client cores; 64 with two AVX-512 FMA units),
  and the clock from ``/proc/cpuinfo`` (``--ghz`` to give another, e.g. the boost clock).
  Attainable: the best of ``torch.mm`` on two 4096 × 4096 float32 matrices (2·4096³ FLOPs).
* The step: ``Trainer.fit`` of the module (hybrid loss, backward, AdamW, EMA) on random images,
  median over the steps after the first; its FLOPs are the UNet's forward + backward counted
  by ``torch.utils.flop_counter`` (convolutions and matmuls; the elementwise work is not
  counted, so the achieved FLOP/s is a lower bound of the work done).
* compile: the same steps with ``compile: true``; its first step holds the compilation.

    python benchmarks/cpu_utilisation.py [--configs configs/digits.yaml configs/cifar10_hybrid.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from common import RESULTS, build_model, describe, images, machine
from train_step import fit_steps, step_flops


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo."""
    fields = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def flops_per_cycle(flags: set[str]) -> tuple[int, str]:
    """FP32 FLOPs per cycle per core, assuming two FMA pipes of the widest vector unit."""
    if "avx512f" in flags:
        return 64, "AVX-512 with FMA: 2 pipes x 16 float32 lanes x 2 FLOPs (1 pipe on some Intel parts: 32)"
    if "avx2" in flags and "fma" in flags:
        return 32, "AVX2 with FMA: 2 pipes x 8 float32 lanes x 2 FLOPs"
    return 8, "SSE: 2 pipes x 4 float32 lanes, no FMA"


def peak(ghz: float | None) -> dict:
    info = cpuinfo()
    flags = set(info.get("flags", "").split())
    per_cycle, why = flops_per_cycle(flags)
    cores = torch.get_num_threads()
    ghz = ghz or float(info.get("cpu MHz", "nan")) / 1000
    theoretical = cores * ghz * per_cycle
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return {"model_name": info.get("model name"), "cpu_family": info.get("cpu family"), "model": info.get("model"),
            "cores_used": cores, "ghz": ghz, "flops_per_cycle": per_cycle, "flops_per_cycle_why": why,
            "theoretical_gflops": theoretical, "sgemm_gflops": 2 * 4096**3 / best / 1e9}


def steps(config: str, batch: int, n: int, **options) -> dict:
    """``n`` steps of ``Trainer.fit`` at ``batch``: median step after the first, and the first."""
    model = build_model(config, **options)
    x = images(model, batch, torch.device("cpu"))
    clock = fit_steps(model, DataLoader(TensorDataset(x, torch.zeros(batch)), batch_size=batch), n)
    dts = clock.step_times()
    return {"step_s": statistics.median(dts), "first_step_s": clock.ends[0] - clock.start, "steps_timed": len(dts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["configs/digits.yaml", "configs/cifar10_hybrid.yaml"])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[128, 32],
                        help="per config (CIFAR-10 at 32: a step at 128 takes a minute here; FLOPs per image are the same)")
    parser.add_argument("--steps", type=int, nargs="+", default=[12, 4], help="per config")
    parser.add_argument("--compile-steps", type=int, nargs="+", default=[12, 0], help="per config; 0: no compile run")
    parser.add_argument("--ghz", type=float, help="the clock for the theoretical peak (default: /proc/cpuinfo's)")
    parser.add_argument("--out", default=str(RESULTS / "cpu_utilisation.json"))
    args = parser.parse_args()
    info = machine()
    print(f"cpu utilisation: {describe(info)}")
    hardware = peak(args.ghz)
    print(f"peak: {hardware['theoretical_gflops']:.0f} GFLOP/s theoretical ({hardware['cores_used']} cores x "
          f"{hardware['ghz']:.3f} GHz x {hardware['flops_per_cycle']} FLOPs/cycle: {hardware['flops_per_cycle_why']}), "
          f"{hardware['sgemm_gflops']:.0f} GFLOP/s measured (4096^3 sgemm)", flush=True)
    results = {}
    for config, batch, n, n_compile in zip(args.configs, args.batch_size, args.steps, args.compile_steps):
        model = build_model(config)
        flops = step_flops(model, images(model, batch, torch.device("cpu")))
        del model
        row = {"batch": batch, "step_gflop": flops / 1e9, "eager": steps(config, batch, n)}
        if n_compile:
            row["compiled"] = steps(config, batch, n_compile, compile=True)
            row["compile_s"] = row["compiled"]["first_step_s"] - row["compiled"]["step_s"]
            row["compile_speedup"] = row["eager"]["step_s"] / row["compiled"]["step_s"]
        for kind in ("eager", "compiled"):
            if kind in row:
                gflops = flops / row[kind]["step_s"] / 1e9
                row[kind] |= {"achieved_gflops": gflops, "of_theoretical": gflops / hardware["theoretical_gflops"],
                              "of_sgemm": gflops / hardware["sgemm_gflops"]}
        results[config] = row
        e = row["eager"]
        print(f"{Path(config).stem}, batch {batch}: {flops / 1e9:.0f} GFLOP per step, {e['step_s']:.3f} s/step, "
              f"{e['achieved_gflops']:.1f} GFLOP/s = {e['of_theoretical']:.0%} of the theoretical peak, "
              f"{e['of_sgemm']:.0%} of sgemm", flush=True)
        if "compiled" in row:
            c = row["compiled"]
            print(f"  compile: true: {c['step_s']:.3f} s/step ({row['compile_speedup']:.2f}x eager), "
                  f"{c['achieved_gflops']:.1f} GFLOP/s, compilation {row['compile_s']:.0f} s", flush=True)
    out = {"benchmark": "cpu_utilisation", "machine": info, "affinity": len(os.sched_getaffinity(0)),
           "peak": hardware, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
