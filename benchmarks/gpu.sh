#!/usr/bin/env bash
# The prepared GPU benchmark (benchmarks/gpu.py): one NVIDIA GPU, unattended, a few minutes;
# writes benchmarks/results/gpu.json and gpu.md. `--tiny` checks it on a CPU in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
fi
exec python benchmarks/gpu.py "$@"
