#!/usr/bin/env bash
# CI step: prove the CUDA extension compiles and links (both archs), then that it loads and registers
# its ops.  Builds lkconv._C in place (python setup.py build_ext --inplace), so it also serves an
# editable install.  Exits non-zero on any failure.
#
#   env: TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"), MAX_JOBS (default: number of CPUs), CUDA_HOME (found
#        from `nvcc --dryrun` when unset; see csrc/build_env.py)
set -euo pipefail
cd "$(dirname "$0")/.."

export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

python - <<'PY'
import torch
assert torch.version.cuda, f"build_cuda.sh needs a CUDA build of torch, got {torch.__version__}"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
PY
command -v nvcc >/dev/null || { echo "build_cuda.sh: nvcc not on PATH" >&2; exit 1; }

start=$(date +%s)
LKCONV_BUILD_CUDA=1 LKCONV_BUILD_CPU=1 python setup.py -q build_ext --inplace
echo "build_cuda.sh: lkconv._C and lkconv._cpu_fast built in $(( $(date +%s) - start )) s (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"

python - <<'PY'
import sys, torch
import lkconv._C  # registers torch.ops.lkconv_cuda.*
print("lkconv._C:", lkconv._C.__file__)
import lkconv._cpu_fast  # the CPU module, built with it (csrc/cpu_fastpath.cpp)
print("lkconv._cpu_fast:", lkconv._cpu_fast.__file__)
ok = True
for name in ("forward", "grad_input", "grad_weight"):
    try:
        print("  ", getattr(torch.ops.lkconv_cuda, name).default._schema)
    except Exception as e:
        print(f"  lkconv_cuda::{name} missing: {e}", file=sys.stderr)
        ok = False
try:  # the CUDA-only registration must reject CPU tensors with a clear error, not crash
    torch.ops.lkconv_cuda.forward(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3), None, [1, 1], [1, 1, 1, 1], [1, 1])
    print("lkconv_cuda::forward accepted CPU tensors", file=sys.stderr)
    ok = False
except NotImplementedError:
    pass
from lkconv.backends.cuda import load_extension
why = load_extension(jit=False)
if why is not None:
    print("load_extension:", why, file=sys.stderr)
    ok = False
sys.exit(0 if ok else 1)
PY
echo "build_cuda.sh: OK"
