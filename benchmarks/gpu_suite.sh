#!/usr/bin/env bash
# The one command for a GPU box with no network (see docs/benchmarks.md):
#
#   benchmarks/gpu_suite.sh OUTDIR [--budget-s 570] [--skip-build] [--skip-tests] [--all-tests]
#
# builds the CUDA extension in place (pip install --no-build-isolation -e .), runs
# `python -m lkconv info` and `verify`, the GPU tests (pytest -m gpu; --all-tests: everything), the
# RepLKNet-31B benchmark (fp32 TF32 on/off, fp16, bf16; forward, grad_input, grad_weight, all) and a
# reduced kernel-size sweep, and writes logs, CSV, markdown, plots, env and summary.md into OUTDIR --
# within 10 minutes on an H100 (time-budgeted; cases beyond the budget are reported as skipped).
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 OUTDIR [--budget-s S] [--skip-build] [--skip-tests] [--skip-bench] [--all-tests]" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
exec "$PY" -m lkconv suite "$@"
