#!/usr/bin/env bash
# GPU acceptance command: bash tests/gpu_acceptance.sh OUTDIR [--steps a,b]
# Builds the extensions, runs `pytest -m cuda`, trains ViTAE-Tiny with --impl kernel and --impl ref (bf16) and
# compares their loss curves, evaluates on cuda (one process and torchrun + nccl), benchmarks the kernels at the
# target shapes; logs + JSON in OUTDIR, one summary table at the end. Steps and checks: tests/gpu_acceptance.py.
# Without a visible CUDA GPU it exits 2 with one line.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -lt 1 ]; then
    echo "usage: bash tests/gpu_acceptance.sh OUTDIR (a folder for logs and JSON)" >&2
    exit 2
fi
exec python tests/gpu_acceptance.py "$@"
