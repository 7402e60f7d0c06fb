#!/usr/bin/env bash
# Build here, before a call of the lent GPU machine, what that machine would otherwise build on its
# own (metered) clock: lkconv's CUDA extension for the box (CPython 3.12, torch 2.11.0+cu130, sm_90)
# and the benchmark peer installed from its wheel.  Everything lands in .gpu-prebuilt/ (git-ignored):
#
#   .gpu-prebuilt/lkconv/_C.cpython-312-x86_64-linux-gnu.so   lkconv._C for the box
#   .gpu-prebuilt/lkconv/_cpu_fast.cpython-312-*.so             lkconv._cpu_fast (the CPU module), if built
#   .gpu-prebuilt/peers/                                        the implicit-GEMM peer (pip --target)
#   .gpu-prebuilt/BUILD_INFO.json                               commit, csrc digest, torch, arch list
#
# benchmarks/gpu_suite.py uses the prebuilt extension instead of compiling when BUILD_INFO.json's csrc
# digest matches the checkout and its torch version matches the running one (else it builds, as
# before), and puts peers/ on PYTHONPATH.  Then the one device call is
#
#   run(command="LKCONV_POISON_OUTPUTS=1 bash benchmarks/device_check.sh", carry=[".gpu-prebuilt"],
#       timeout_s=600)
#
#   bash scripts/build_for_gpu_box.sh [PEER_WHEEL]     default PEER_WHEEL: ../shared/peers/*.whl
#   env: GPU_BOX_PYTHON (a CPython 3.12; default: pyenv's newest 3.12), GPU_BOX_TORCH (2.11.0),
#        GPU_BOX_ARCH (9.0), MAX_JOBS (nproc)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$root/.gpu-prebuilt
venv=$root/.venv-gpubox
torch_ver=${GPU_BOX_TORCH:-2.11.0}
arch=${GPU_BOX_ARCH:-9.0}

py312=${GPU_BOX_PYTHON:-}
if [ -z "$py312" ]; then
    for cand in "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3 /usr/bin/python3.12; do
        [ -x "$cand" ] && py312=$cand
    done
fi
[ -n "$py312" ] && [ -x "$py312" ] || { echo "build_for_gpu_box.sh: no CPython 3.12 found (set GPU_BOX_PYTHON)" >&2; exit 1; }
"$py312" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
    || { echo "build_for_gpu_box.sh: $py312 is not CPython 3.12" >&2; exit 1; }
command -v nvcc >/dev/null || { echo "build_for_gpu_box.sh: nvcc not on PATH" >&2; exit 1; }

start=$(date +%s)
[ -x "$venv/bin/python" ] || "$py312" -m venv "$venv"
py=$venv/bin/python
# --isolated: PyPI's CUDA build of torch, not this machine's constraint/local CPU wheels
"$py" -m pip --isolated install -q "torch==$torch_ver" numpy setuptools wheel ninja
got=$("$py" -c 'import torch; print(torch.__version__)')
case "$got" in "$torch_ver"|"$torch_ver"+*) ;; *) echo "asked for torch $torch_ver, got $got" >&2; exit 1 ;; esac

# build in a copy of the tracked tree, so the checkout's own lkconv/_C*.so stays as it is
src=$out.src
rm -rf "$src" && mkdir -p "$src"
git ls-files -z | xargs -0 cp --parents -t "$src"
(cd "$src" && PATH="$venv/bin:$PATH" TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    LKCONV_BUILD_CUDA=1 "$py" setup.py -q build_ext --inplace)
so=$(ls "$src"/lkconv/_C.cpython-312-*.so)

rm -rf "$out" && mkdir -p "$out/lkconv" "$out/peers"
cp "$so" "$out/lkconv/"
# the CPU module (csrc/cpu_fastpath.cpp), built by the same setup.py call where it could be
cp "$src"/lkconv/_cpu_fast.cpython-312-*.so "$out/lkconv/" 2>/dev/null || echo "build_for_gpu_box.sh: no lkconv._cpu_fast built (the box uses the Python store)" >&2
wheel=${1:-$(ls "$root"/../shared/peers/*.whl 2>/dev/null | head -1)}
if [ -n "$wheel" ] && [ -f "$wheel" ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$out/peers" "$wheel"
    peer=$(basename "$wheel")
else
    echo "build_for_gpu_box.sh: no peer wheel given or found; the benchmark runs without the peer" >&2
    peer=""
fi
rm -rf "$src"

"$py" - "$out" "$got" "$arch" "$peer" <<'PY'
import json, os, subprocess, sys, datetime
out, torch_ver, arch, peer = sys.argv[1:5]
import importlib.util
spec = importlib.util.spec_from_file_location("gpu_suite", os.path.join("benchmarks", "gpu_suite.py"))
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
csrc_digest = suite.csrc_digest
commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
info = dict(commit=commit, csrc_digest=csrc_digest(os.getcwd()), torch=torch_ver, python="3.12",
            arch_list=arch, peer_wheel=peer, built_utc=datetime.datetime.utcnow().isoformat(timespec="seconds"))
json.dump(info, open(os.path.join(out, "BUILD_INFO.json"), "w"), indent=2)
print(json.dumps(info, indent=2))
PY
du -sh "$out"
echo "build_for_gpu_box.sh: done in $(( $(date +%s) - start )) s -> $out (carry it: carry=[\".gpu-prebuilt\"])"
