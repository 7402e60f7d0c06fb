#!/usr/bin/env bash
# The prepared command for a lent GPU machine, sized for a 15-minute device budget: one call of the
# device tool with timeout_s=600 runs this, and what it writes under $OUT comes back.  It is the
# --device-out option of the one GPU-suite entry point (benchmarks/gpu_suite.py; docs/benchmarks.md).
#
#   bash benchmarks/device_check.sh [--skip-bench ...]     # on the GPU machine, from the repo root
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python}" benchmarks/gpu_suite.py --device-out "${OUT:-/tmp/lkconv-device-out}" "$@"
