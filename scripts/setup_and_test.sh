#!/usr/bin/env bash
# Set up lkconv on a fresh machine and run the whole test suite.  README's test command; .ci/run calls it.
#
#   1. torch 2.14.1 (a CUDA build: its headers let csrc/ compile even on a machine without a GPU)
#   2. lkconv, editable, with the test extras (pure-Python install; fast)
#   3. the CUDA extension lkconv._C, built in place with nvcc when a toolkit is present (.ci/build_cuda.sh:
#      compile + link for sm80 and sm90, then load and check the ops are registered), and the CPU module
#      lkconv._cpu_fast (csrc/cpu_fastpath.cpp, ~45 s; without nvcc it is built alone)
#   4. python -m pytest (GPU tests skip cleanly without a GPU; Triton kernels run under TRITON_INTERPRET=1)
#
# Environment: LKCONV_SKIP_CUDA_BUILD=1 skips step 3; PYTEST_ARGS adds pytest arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

# not -q: on a fresh machine these download ~5 GB (torch's CUDA build) and take minutes; pip's
# progress shows that something is happening
step "install torch 2.14.1 (fresh machine: ~5 GB download, several minutes; already installed: seconds)"
python -m pip install "torch==2.14.1"
step "install lkconv with test extras (onnx, onnxruntime, hypothesis, matplotlib; ~1 minute)"
python -m pip install -e ".[test]"
# timm is a test-only client (tests/test_clients_timm.py); pinned so pip keeps the torch above
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" timm

if [ "${LKCONV_SKIP_CUDA_BUILD:-0}" != "1" ] && command -v nvcc >/dev/null 2>&1; then
    step "build and check the CUDA extension"
    bash .ci/build_cuda.sh
else
    echo "(no nvcc on PATH or LKCONV_SKIP_CUDA_BUILD=1: the CUDA extension is not built; the cuda backend reports why)"
    step "build the CPU module lkconv._cpu_fast"
    LKCONV_BUILD_CUDA=0 LKCONV_BUILD_CPU=1 python setup.py -q build_ext --inplace
fi

step "python -m lkconv info"
python -m lkconv info
step "pytest (14-28 minutes on a 2-core machine)"
# shellcheck disable=SC2086
python -m pytest -q -ra --durations=15 ${PYTEST_ARGS:-}
