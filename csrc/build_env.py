"""Build-environment helpers shared by setup.py and lkconv/backends/cuda.py (JIT build).

Pure Python, no torch import at module level.  Finds a usable CUDA toolkit root (``CUDA_HOME``) even
when ``nvcc`` on PATH is a wrapper script (then torch's guess from nvcc's location is wrong and
linking fails with ``cannot find -lcudart``): ``nvcc --dryrun`` prints the real root as ``TOP=``.
Also finds the pip ``nvidia`` headers folder (``site-packages/nvidia/cu*/include``) that holds
``cusparse.h``/``cublas_v2.h`` which torch's CUDA headers include.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile

SOURCES = ["dwconv_ops.cpp", "dwconv_forward.cu", "dwconv_forward_fp32.cu", "dwconv_grad_weight.cu",
           "dwconv_small_plane.cu", "dwconv_small_plane_gw_rows.cu", "dwconv_toeplitz_tf32.cu"]
# machine code for sm80 and sm90, plus sm90 PTX so newer GPUs (sm100, sm120) JIT-compile the kernels
# instead of failing at the first launch with "no kernel image is available"
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def cmake_architectures(arch_list: str = DEFAULT_ARCH_LIST) -> str:
    """A TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX") as CMAKE_CUDA_ARCHITECTURES ("80-real;90"): "-real" is
    machine code only; a bare number is machine code plus PTX, which is what "+PTX" asks for."""
    out = []
    for item in arch_list.replace(" ", ";").split(";"):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item[:-4] if ptx else item
        out.append(num.replace(".", "") + ("" if ptx else "-real"))
    return ";".join(out)


def csrc_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def source_paths():
    return [os.path.join(csrc_dir(), s) for s in SOURCES]


def _toolkit_ok(root: str) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The CUDA toolkit root, or None.  Honours $CUDA_HOME / $CUDA_PATH when they point at a toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        v = os.environ.get(var)
        if v and _toolkit_ok(v):
            return os.path.realpath(v)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for cand in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
            if _toolkit_ok(cand) and os.path.isfile(os.path.join(cand, "bin", "nvcc")):
                return os.path.realpath(cand)
        return None
    try:
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "probe.cu")
            with open(src, "w") as f:
                f.write("__global__ void k(){}\n")
            out = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(d, "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if m and _toolkit_ok(m.group(1)):
            return os.path.realpath(m.group(1))
    except (OSError, subprocess.SubprocessError):
        pass
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return root if _toolkit_ok(root) else None


def nvidia_pip_includes():
    """include folders of the pip ``nvidia`` CUDA packages (cusparse.h, cublas_v2.h, ...)."""
    try:
        import nvidia  # namespace package shipped with CUDA builds of torch
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if glob.glob(os.path.join(inc, "cusparse*.h")) or glob.glob(os.path.join(inc, "cublas*.h")):
                dirs.append(inc)
    return dirs


def nvcc_flags():
    """nvcc flags of every build (setup.py, the JIT build in lkconv/backends/cuda.py, CMakeLists.txt)."""
    return ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]


def cxx_flags():
    return ["-O3"]
