"""The prepared GPU benchmark runs end to end (``--tiny``, on the CPU), so that it cannot rot
before the first person runs it on a GPU, and reads a chip's bf16 peak from its name."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu  # noqa: E402
from gpu import peak_bf16_tflops  # noqa: E402


def test_the_bf16_peak_is_read_from_the_device_name_most_specific_first():
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.4
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("NVIDIA L40S") == 362.1 and peak_bf16_tflops("NVIDIA L4") == 121.0
    assert peak_bf16_tflops("Tesla T4") is None and peak_bf16_tflops(None) is None


@pytest.mark.slow
def test_gpu_benchmark_tiny_runs_every_section_and_writes_its_json_and_table(tmp_path):
    out = tmp_path / "gpu.json"
    run = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), "--tiny", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["tiny"] and r["device"] == "CPU" and r["batch_size"] == 4
    rows = r["training"]["rows"]
    # compile is left out of --tiny: inductor takes minutes on a CPU even for the small UNet
    assert list(rows) == ["plain fp32 loop", "fp32", "bf16-mixed", "bf16-mixed + channels_last"]
    for row in rows.values():
        assert 0 < row["step_s"] < 60 and math.isclose(row["images_per_s"], 4 / row["step_s"])
        assert row["achieved_tflops"] > 0 and row["mfu_vs_bf16_peak"] is None  # no peak for a CPU
        assert row["timed_steps"] == 2
    assert math.isclose(rows["plain fp32 loop"]["speed_vs_plain"], 1.0)
    assert math.isclose(rows["fp32"]["achieved_tflops"] * rows["fp32"]["step_s"], r["training"]["step_tflop"])
    assert set(r["memory"]) == {"fp32", "fp32 + gradient_checkpointing", "bf16-mixed + channels_last",
                                "bf16-mixed + channels_last + gradient_checkpointing"}
    bpd = r["bits_per_dim"]
    assert {(row["images"], row["max_batch"]) for row in bpd.values()} == {(1, 1), (1, 4), (1, 16), (2, 2), (2, 4), (2, 16)}
    assert all(row["image_timesteps_per_s"] > 0 for row in bpd.values())
    assert {row["steps"] for row in r["sampling"].values()} == {5}
    table = out.with_suffix(".md").read_text()
    assert table == gpu.table(r)
    for name in [*rows, *r["memory"], *bpd, *r["sampling"]]:
        assert f"| {name} |" in table
    # a GPU run's compile row, and its MFU and memory, as the table shows them
    rows["+ compile"] = {**rows["fp32"], "first_step_s": 95.0, "compile_s": 94.5, "mfu_vs_bf16_peak": 0.25,
                         "peak_gpu_memory_gib": 12.5}
    assert "| 95.0 s (compilation 94 s) |" in gpu.table(r) and "| 25.0 % | 12.50 GiB |" in gpu.table(r)


def test_the_memory_line_goes_through_the_two_largest_batches():
    from memory import fit_line

    rows = [{"batch": 128, "peak_rss_gib": 12.6}, {"batch": 16, "peak_rss_gib": 3.59}, {"batch": 32, "peak_rss_gib": 5.23}]
    fixed, per_image = fit_line(rows)
    assert math.isclose(per_image, (12.6 - 5.23) / 96) and math.isclose(fixed + 128 * per_image, 12.6)
