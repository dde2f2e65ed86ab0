"""The paper's CIFAR-10 model on one GPU, unattended, in minutes: training, memory, exact
bits/dim and sampling, each beside the plain fp32 PyTorch path (the paper's setting).

On synthetic data (random 8-bit images: speed does not depend on them), in one process:

* training at batch 128 (``configs/cifar10_hybrid.yaml``): a hand-written fp32 loop (uniform
  t, ``training_losses``, AdamW, EMA), then ``Trainer.fit`` of the module in float32,
  bf16-mixed, bf16-mixed + channels_last, and + compile (its first step, the compilation,
  reported apart). Step time (median after ``--warmup`` steps), images/s, model FLOP
  utilisation against the chip's dense bf16 peak (``PEAK_BF16_TFLOPS`` by device name, or
  ``--peak-tflops``; FLOPs of the UNet's forward + backward counted by
  ``torch.utils.flop_counter``), peak GPU memory;
* the same with ``gradient_checkpointing``, and at batch 64 too, so that the line
  peak(b) = fixed + b · per_image gives the largest batch on 80 and 141 GiB;
* exact bits/dim (``calc_bpd_loop``, float32 as ``test`` evaluates it): image·timesteps per
  second at 1 and 64 images with ``bpd_batch_size`` 256 and 1024, beside one call per
  timestep, timed over a subset of the T = 4000 timesteps (``GaussianDiffusion.spaced``:
  the same calls at the same sizes), and the hours the full test set would take;
* 100-step respaced ancestral sampling (``IDDPM.sample``), images/s, float32 and bf16;
* the paper's released CIFAR-10 model (its layout and flags, random weights) through ``import``,
  and the hours its evaluation takes here: exact and stratified test bits/dim, 50,000 samples.

Writes ``--out`` (JSON, rewritten after every section, so a stopped run keeps what it
measured) and a Markdown table beside it. ``--tiny`` runs every section with a small UNet and
batch on a CPU in seconds (what the test suite runs, so that this script cannot rot).

    bash benchmarks/gpu.sh                 # = python benchmarks/gpu.py
    python benchmarks/gpu.py --tiny --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from common import RESULTS, build_model, describe, images, machine, timed
from iddpm_lightning.diffusion import Sampler
from memory import fit_line
from train_step import fit_steps, plain_round, step_flops

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name(),
# most specific first (the spec sheets' sparse figures are twice these).
PEAK_BF16_TFLOPS = (
    ("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
    ("H800", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L4", 121.0),
    ("RTX 4090", 165.2),
)
GPU_GIB = (80, 141)
TINY_UNET = {"block_out_channels": [32, 32], "layers_per_block": 1, "attention_resolutions": [16],
             "attention_head_dim": 8, "dropout": 0.3, "mid_attention_norm": True}


def peak_bf16_tflops(device_name: str | None) -> float | None:
    """The chip's dense bf16 peak from its name, None if not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if device_name and key in device_name:
            return tflops
    return None


class Bench:
    """The run's settings, its device, and the results written after every section."""

    def __init__(self, args):
        self.args, self.tiny = args, args.tiny
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.name = torch.cuda.get_device_name() if self.device.type == "cuda" else "CPU"
        self.peak = args.peak_tflops or peak_bf16_tflops(self.name if self.device.type == "cuda" else None)
        self.batch = 4 if self.tiny else args.batch_size
        self.out = Path(args.out)
        self.started = time.perf_counter()
        self.results = {"benchmark": "gpu", "device": self.name, "peak_bf16_tflops": self.peak,
                        "tiny": self.tiny, "config": args.config, "batch_size": self.batch,
                        "machine": machine(), "sections_s": {}}

    def model(self, **options):
        tiny = {"unet": TINY_UNET} if self.tiny else {}
        return build_model(self.args.config, **tiny, **options)

    def save(self, section: str, value, label: str | None = None) -> None:
        self.results[section] = value
        self.results["sections_s"][label or section] = time.perf_counter() - self.started
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=2) + "\n")
        self.out.with_suffix(".md").write_text(table(self.results))
        print(f"[{time.perf_counter() - self.started:6.0f} s] {section} done", flush=True)

    def free(self) -> None:
        """Drop what the last measurement left, and start counting peak memory again."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None


def loader_for(bench: Bench, model, batch: int) -> DataLoader:
    x = images(model, 4 * batch, torch.device("cpu"))
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=batch, shuffle=True,
                      drop_last=True, pin_memory=bench.device.type == "cuda")


def train(bench: Bench, precision: str | None, batch: int, **options) -> dict:
    """Steps of ``Trainer.fit`` (or of the plain loop if ``precision`` is None) at ``batch``."""
    bench.free()
    steps = bench.args.warmup + bench.args.steps
    model = bench.model(**options)
    loader = loader_for(bench, model, batch)
    if precision is None:
        first_start = time.perf_counter()
        dts = plain_round(model, loader, steps, "32-true", bench.device)
        first = None  # the plain loop times steps from the end of the first
    else:
        clock = fit_steps(model, loader, steps, precision, "gpu" if bench.device.type == "cuda" else "cpu")
        dts = clock.step_times()
        first, first_start = clock.ends[0] - clock.start, clock.start
    step = statistics.median(dts[bench.args.warmup - 1:])
    row = {"precision": precision or "32-true (plain loop)", **options, "batch": batch, "step_s": step,
           "images_per_s": batch / step, "first_step_s": first, "peak_gpu_memory_gib": bench.peak_memory_gib(),
           "timed_steps": len(dts[bench.args.warmup - 1:]), "wall_s": time.perf_counter() - first_start}
    del model, loader
    return row


def training(bench: Bench) -> None:
    model = bench.model().to(bench.device)
    flops = step_flops(model, images(model, bench.batch, bench.device))
    del model
    variants = {
        "plain fp32 loop": (None, {}),
        "fp32": ("32-true", {}),
        "bf16-mixed": ("bf16-mixed", {}),
        "bf16-mixed + channels_last": ("bf16-mixed", {"channels_last": True}),
    }
    rows = {}
    for name, (precision, options) in variants.items():
        rows[name] = train(bench, precision, bench.batch, **options)
        print(f"  {name}: {rows[name]['step_s'] * 1e3:.1f} ms/step", flush=True)
    bench.save("training", {"step_tflop": flops / 1e12, "rows": with_utilisation(bench, rows, flops)})


def compiled(bench: Bench) -> None:
    """The fastest eager setting + ``compile: true``: last, since its compilation takes minutes."""
    t = bench.results["training"]
    name = "bf16-mixed + channels_last + compile"
    row = train(bench, "bf16-mixed", bench.batch, channels_last=True, compile=True)
    row["compile_s"] = row["first_step_s"] - row["step_s"]
    print(f"  {name}: {row['step_s'] * 1e3:.1f} ms/step, compilation {row['compile_s']:.0f} s", flush=True)
    rows = {**t["rows"], name: row}
    bench.save("training", {**t, "rows": with_utilisation(bench, rows, t["step_tflop"] * 1e12)}, label="compile")


def with_utilisation(bench: Bench, rows: dict, flops: float) -> dict:
    """Each row with its speed against the plain loop, achieved TFLOP/s and MFU."""
    base = rows["plain fp32 loop"]["step_s"]
    for row in rows.values():
        row["speed_vs_plain"] = base / row["step_s"]
        row["achieved_tflops"] = flops / row["step_s"] / 1e12
        row["mfu_vs_bf16_peak"] = row["achieved_tflops"] / bench.peak if bench.peak else None
    return rows


def memory(bench: Bench) -> None:
    """Peak GPU memory with and without activation checkpointing, at batch 128 and 64."""
    half = max(1, bench.batch // 2)
    rows = {}
    for name, (precision, options) in {"fp32": ("32-true", {}),
                                       "bf16-mixed + channels_last": ("bf16-mixed", {"channels_last": True})}.items():
        for checkpointing in (False, True):
            key = name + (" + gradient_checkpointing" if checkpointing else "")
            opts = {**options, "gradient_checkpointing": checkpointing}
            full, small = (train(bench, precision, b, **opts) for b in (bench.batch, half))
            row = {"step_s": full["step_s"], "images_per_s": full["images_per_s"],
                   "peak_gpu_memory_gib": full["peak_gpu_memory_gib"], f"peak_gpu_memory_gib_at_{half}":
                   small["peak_gpu_memory_gib"]}
            if full["peak_gpu_memory_gib"] is not None:
                fixed, per_image = fit_line([full, small], key="peak_gpu_memory_gib")
                row |= {"per_image_gib": per_image, "fixed_gib": fixed,
                        **{f"largest_batch_{gib}_gib": int((gib - fixed) / per_image) for gib in GPU_GIB}}
            rows[key] = row
            print(f"  {key}: peak {row['peak_gpu_memory_gib']} GiB, {full['step_s'] * 1e3:.1f} ms/step", flush=True)
    bench.save("memory", rows)


@torch.no_grad()
def bits_per_dim(bench: Bench) -> None:
    """Image·timesteps per second of the exact loop, in float32 as ``test`` evaluates it."""
    bench.free()
    model = bench.model().to(bench.device).eval()
    fn, T = model.model_fn(model.eval_unet), model.diffusion.num_timesteps
    cases = ([(1, 4), (1, 16), (2, 4), (2, 16)] if bench.tiny else [(1, 256), (1, 1024), (64, 256), (64, 1024)])
    rows = {}
    for images_n in sorted({b for b, _ in cases}):
        x = images(model, images_n, bench.device)
        for max_batch in [images_n] + [m for b, m in cases if b == images_n]:
            k = max(1, max_batch // images_n)  # timesteps per call
            n_t = min(T, max(4 * k, 8 if bench.tiny else 64))  # at least 4 full calls
            diffusion = model.diffusion.respace(range(0, T, T // n_t)[:n_t])
            g = torch.Generator(bench.device).manual_seed(0)
            bench.free()
            with torch.autocast(bench.device.type, enabled=False):
                diffusion.calc_bpd_loop(fn, x, generator=g, max_batch=max_batch)  # warm-up
                seconds, _ = timed(lambda: diffusion.calc_bpd_loop(fn, x, generator=g, max_batch=max_batch), bench.device)
            rate = images_n * n_t / seconds
            name = f"{images_n} image{'s' if images_n > 1 else ''}, " + (
                "one call per timestep" if max_batch == images_n else f"bpd_batch_size {max_batch}")
            rows[name] = {"images": images_n, "max_batch": max_batch, "timesteps_timed": n_t, "seconds": seconds,
                          "image_timesteps_per_s": rate, "cifar10_test_set_hours": 10_000 * T / rate / 3600,
                          "peak_gpu_memory_gib": bench.peak_memory_gib()}
            print(f"  {name}: {rate:.0f} image·timesteps/s", flush=True)
    bench.save("bits_per_dim", rows)


@torch.no_grad()
def sampling(bench: Bench) -> None:
    """Images/s of respaced ancestral sampling: ``IDDPM.sample`` (float32, as predict and the callbacks
    draw), and the same sampler on the UNet under bf16 autocast through the library (what a bf16
    option would buy)."""
    bench.free()
    model = bench.model().to(bench.device).eval()
    n, steps = (4, 5) if bench.tiny else (256, 100)
    shape = (n, model.hparams.in_channels, model.hparams.image_size, model.hparams.image_size)
    routes = {
        "fp32": lambda sampler, g: model.sample(sampler, n, generator=g),
        "bf16 autocast": lambda sampler, g: sampler.sample(model.diffusion, model.model_fn(model.eval_unet), shape,
                                                           generator=g, device=bench.device),
    }
    rows = {}
    for name, route in routes.items():
        bench.free()
        with torch.autocast(bench.device.type, torch.bfloat16, enabled=name != "fp32"):
            route(Sampler(steps=2), torch.Generator(bench.device).manual_seed(0))  # warm-up
            seconds, _ = timed(lambda: route(Sampler(steps=steps), torch.Generator(bench.device).manual_seed(0)),
                               bench.device)
        rows[name] = {"images": n, "steps": steps, "seconds": seconds, "images_per_s": n / seconds,
                      "peak_gpu_memory_gib": bench.peak_memory_gib()}
        print(f"  {steps}-step sampling, {name}: {n / seconds:.2f} images/s", flush=True)
    bench.save("sampling", rows)


@torch.no_grad()
def imported(bench: Bench) -> None:
    """The paper's released CIFAR-10 model through ``import`` (random weights in its layout: speed does
    not depend on them), then what its evaluation costs: exact bits/dim (T calls an image), the
    stratified estimate (100 calls), and sampling 50,000 images at 100 and at T respaced steps."""
    import tempfile

    from iddpm_lightning.diffusion import Sampler
    from iddpm_lightning.module import IDDPM
    from iddpm_lightning.official import (RELEASED_FLAGS, diffusers_to_official, import_checkpoint,
                                          official_flags_of, template_structure)

    bench.free()
    source = bench.model(rescale_timesteps=True)
    flags = official_flags_of(source.hparams)
    line = RELEASED_FLAGS["cifar10_uncond_50M_500K"] if not bench.tiny else (
        f"{flags.flags_line} --channel_mult {','.join(map(str, flags.unet_kwargs['channel_mult']))} "
        f"--in_channels {flags.unet_kwargs['in_channels']}")
    heads = (flags.flags["num_heads"], flags.flags["num_heads"])
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(diffusers_to_official(source.unet.state_dict(), template_structure(source.hparams), heads),
                   f"{tmp}/model.pt")
        start = time.perf_counter()
        import_checkpoint(f"{tmp}/model.pt", line, f"{tmp}/imported.ckpt")
        import_s = time.perf_counter() - start
        model = IDDPM.load_from_checkpoint(f"{tmp}/imported.ckpt", map_location="cpu").to(bench.device).eval()
    T, fn = model.diffusion.num_timesteps, model.model_fn(model.eval_unet)
    n_images, max_batch = (2, 16) if bench.tiny else (64, 1024)
    x = images(model, n_images, bench.device)
    n_t = min(T, 8 if bench.tiny else 64)
    diffusion = model.diffusion.respace(range(0, T, T // n_t)[:n_t])  # the same calls, over n_t timesteps
    g = torch.Generator(bench.device).manual_seed(0)
    with torch.autocast(bench.device.type, enabled=False):
        diffusion.calc_bpd_loop(fn, x, generator=g, max_batch=max_batch)  # warm-up
        seconds, _ = timed(lambda: diffusion.calc_bpd_loop(fn, x, generator=g, max_batch=max_batch), bench.device)
    calls_per_s = n_images * n_t / seconds  # model inputs (an image at a timestep) per second
    steps, n = (3, 4) if bench.tiny else (100, 256)
    model.sample(Sampler(steps=2), n, generator=torch.Generator(bench.device).manual_seed(0))  # warm-up
    sample_s, _ = timed(lambda: model.sample(Sampler(steps=steps), n, generator=torch.Generator(bench.device)
                                             .manual_seed(0)), bench.device)
    per_image_step = sample_s / (n * steps)
    bench.save("imported", {
        "flags": line, "import_s": import_s, "timesteps": T, "image_timesteps_per_s": calls_per_s,
        "bpd_exact_test_set_hours": 10_000 * T / calls_per_s / 3600,
        "bpd_stratified_50_strata_test_set_hours": 10_000 * 100 / calls_per_s / 3600,
        "sampling_image_steps_per_s": 1 / per_image_step,
        "fid_50k_100_steps_hours": 50_000 * 100 * per_image_step / 3600,
        "fid_50k_all_steps_hours": 50_000 * T * per_image_step / 3600,
        "peak_gpu_memory_gib": bench.peak_memory_gib()})


def fmt(value, spec: str = ".3g", unit: str = "") -> str:
    """``value`` formatted with its unit, or "-" where there is none (no GPU, no known peak)."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec) + unit


def table(r: dict) -> str:
    """The results as Markdown: one table per section."""
    lines = [f"Device: **{r['device']}** (dense bf16 peak {fmt(r['peak_bf16_tflops'])} TFLOP/s), "
             f"{'TINY (a small UNet at batch 4, to test the script) ' if r['tiny'] else ''}"
             f"config {r['config']}, batch {r['batch_size']}, torch {r['machine']['torch']}.", ""]
    if "training" in r:
        t = r["training"]
        lines += [f"Training step ({fmt(t['step_tflop'])} TFLOP per forward + backward):", "",
                  "| | step | images/s | vs plain fp32 | TFLOP/s | MFU (bf16 peak) | peak memory | first step |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, row in t["rows"].items():
            first = fmt(row["first_step_s"], ".1f", " s")
            if "compile_s" in row:
                first += f" (compilation {row['compile_s']:.0f} s)"
            lines.append(f"| {name} | {row['step_s'] * 1e3:.1f} ms | {row['images_per_s']:.0f} | "
                         f"{row['speed_vs_plain']:.2f}x | {fmt(row['achieved_tflops'])} | "
                         f"{fmt(row['mfu_vs_bf16_peak'] and 100 * row['mfu_vs_bf16_peak'], '.1f', ' %')} | "
                         f"{fmt(row['peak_gpu_memory_gib'], '.2f', ' GiB')} | {first} |")
        lines.append("")
    if "memory" in r:
        lines += ["Activation checkpointing (peak GPU memory; largest batch from the line through two batches):", "",
                  "| | step | images/s | peak memory | per image | largest batch 80 GiB | 141 GiB |",
                  "|---|---|---|---|---|---|---|"]
        for name, row in r["memory"].items():
            lines.append(f"| {name} | {row['step_s'] * 1e3:.1f} ms | {row['images_per_s']:.0f} | "
                         f"{fmt(row['peak_gpu_memory_gib'], '.2f', ' GiB')} | {fmt(row.get('per_image_gib'), '.4f', ' GiB')} | "
                         f"{fmt(row.get('largest_batch_80_gib'), 'd')} | {fmt(row.get('largest_batch_141_gib'), 'd')} |")
        lines.append("")
    if "bits_per_dim" in r:
        lines += ["Exact bits/dim, float32 (image·timesteps per second; the CIFAR-10 test set is 10,000 × T):", "",
                  "| | image·timesteps/s | CIFAR-10 test set |", "|---|---|---|"]
        for name, row in r["bits_per_dim"].items():
            lines.append(f"| {name} | {row['image_timesteps_per_s']:.0f} | {row['cifar10_test_set_hours']:.1f} h |")
        lines.append("")
    if "sampling" in r:
        lines += ["Respaced ancestral sampling:", "", "| | steps | batch | images/s |", "|---|---|---|---|"]
        for name, row in r["sampling"].items():
            lines.append(f"| {name} | {row['steps']} | {row['images']} | {row['images_per_s']:.2f} |")
        lines.append("")
    if "imported" in r:
        i = r["imported"]
        lines += [f"The released CIFAR-10 model through `import` (T = {i['timesteps']}, float32; imported in "
                  f"{i['import_s']:.1f} s):", "", "| | rate | hours on this device |", "|---|---|---|",
                  f"| exact bits/dim, 10,000 test images × T calls | {i['image_timesteps_per_s']:.0f} image·timesteps/s "
                  f"| {i['bpd_exact_test_set_hours']:.2f} |",
                  f"| stratified bits/dim, 50 strata (100 calls an image) | | {i['bpd_stratified_50_strata_test_set_hours']:.3f} |",
                  f"| 50,000 samples, 100 respaced steps | {i['sampling_image_steps_per_s']:.0f} image·steps/s "
                  f"| {i['fid_50k_100_steps_hours']:.2f} |",
                  f"| 50,000 samples, all T steps | | {i['fid_50k_all_steps_hours']:.1f} |", ""]
    lines.append("Sections finished at (s from the start): "
                 + ", ".join(f"{k} {v:.0f}" for k, v in r["sections_s"].items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small UNet at batch 4: every section in seconds, on a CPU")
    parser.add_argument("--config", default="configs/cifar10_hybrid.yaml")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5, help="training steps before the timed ones")
    parser.add_argument("--steps", type=int, default=15, help="timed training steps per variant")
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak, if not detected from its name")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time the compile: true variant (default: yes, but not with --tiny, where inductor's "
                             "compilation of even the small UNet takes minutes on a CPU)")
    parser.add_argument("--out", help="the JSON (default: benchmarks/results/gpu.json; gpu_tiny.json with --tiny, "
                                      "so that a check never overwrites a GPU's numbers)")
    args = parser.parse_args()
    if args.tiny:
        args.warmup, args.steps = 1, 2
    if args.compile is None:
        args.compile = not args.tiny
    args.out = args.out or str(RESULTS / ("gpu_tiny.json" if args.tiny else "gpu.json"))
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py found no CUDA device: the full run is for one NVIDIA GPU (hours on a CPU); "
                 "add --tiny to check the script on a CPU in seconds")
    bench = Bench(args)
    print(f"gpu benchmark: {bench.name}, {describe(bench.results['machine'])}", flush=True)
    if bench.peak is None:
        print(f"  the bf16 peak of {bench.name!r} is not in PEAK_BF16_TFLOPS: give --peak-tflops for the MFU", flush=True)
    sections = [training, memory, bits_per_dim, sampling, imported] + ([compiled] if args.compile else [])
    for section in sections:
        section(bench)
    print(table(bench.results))
    print(f"wrote {bench.out} and {bench.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
