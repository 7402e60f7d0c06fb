#!/usr/bin/env bash
# The prepared command for a lent GPU machine (issue 9), sized for a 15-minute device budget: one call
# of the device tool with timeout_s=600 runs this, and what it writes under $OUT comes back.
#
#   bash benchmarks/device_check.sh            # on the GPU machine, from the repo root
#
# Runs benchmarks/gpu_suite.sh (build the CUDA extension, lkconv info/verify, pytest -m gpu, the
# RepLKNet-31B benchmark and the reduced K sweep) with a time budget (LKCONV_DEVICE_BUDGET_S, default
# 500 s, so a 600 s call ends with time to pack the results), then packs the whole results folder into
# $OUT/suite.tgz and copies summary.md next to it: the device tool brings back at most 8 files, so
# the many logs, CSVs and plots travel as one archive.  Unpack into benchmarks/results/<gpu>-<date>/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/lkconv-device-out}"
mkdir -p "$out"
res="/tmp/lkconv-gpu-$(date -u +%Y%m%d-%H%M%S)"
export PYTHONUNBUFFERED=1
bash benchmarks/gpu_suite.sh "$res" --budget-s "${LKCONV_DEVICE_BUDGET_S:-500}" "$@" 2>&1 | tee "$out/suite.log"
rc=${PIPESTATUS[0]}
tar czf "$out/suite.tgz" -C "$res" . && cp "$res/summary.md" "$out/summary.md" 2>/dev/null
echo "device_check.sh: gpu_suite.sh exit $rc; results packed into $out/suite.tgz"
[ -f "$res/summary.md" ] && cat "$res/summary.md"
exit "$rc"
