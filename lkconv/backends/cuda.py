"""The ``cuda`` backend: the compiled implicit-GEMM extension (csrc/, ``torch.ops.lkconv_cuda.*``).

Kernels (see docs/cuda_backend.md):

* fp16/bf16, stride 1, dilation 1 (sm80+): row-Toeplitz implicit GEMM on tensor cores (raw ldmatrix +
  mma.sync m16n8k16 for K <= 64, nvcuda::wmma m16n16k16 above; fp32 accumulate);
* fp32, stride 1, dilation 1: register-blocked direct convolution on CUDA cores (IEEE fp32); when
  PyTorch allows TF32 for convolutions (:func:`lkconv.precision.conv_tf32_enabled`, the rule the Triton
  backend follows too) forward and grad_input run on TF32 tensor cores instead (the row-Toeplitz kernel,
  the small-plane GEMM; ``algo=2``, see :func:`pass_algo`); grad_weight stays IEEE;
* everything else (stride > 1, dilation, shared memory too small, ...): a simple generic kernel per
  pass, fp32 accumulation;
* grad_input with stride 1 is the forward with the flipped kernel; grad_weight is a split reduction
  with fp32 partials and an ordered (always deterministic) final sum: x and grad_out rows staged in
  shared memory and reused by every tap, on tensor cores (fp16/bf16, mma.sync m16n8k16) or register-
  blocked FFMA (fp32) for stride 1, dilation 1, K <= 64; a generic split kernel otherwise.

Loading, lazily (never at ``import lkconv``): the ops are already registered -> use them; else
``import lkconv._C`` (built by ``pip install --no-build-isolation -e .`` / ``python setup.py
build_ext --inplace`` with a CUDA toolkit and a CUDA build of torch); else, when ``LKCONV_JIT=1``,
JIT-build csrc/ with ``torch.utils.cpp_extension.load`` (ninja).  ``LKCONV_CUDA_ALGO=generic`` forces
the generic kernels of all three passes (debugging the fast ones).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch

from .base import Backend, channel_multiplier_declined
from .limits import int32_geometry_reason

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
#: the mirror of csrc/dwconv_limits.h (the C++ kernels' size limits; tests/test_backend_cuda.py checks
#: the two agree).  check() declines what the kernels cannot index.
CUDA_LIMITS = {
    "kMaxKernelSide": 65535,
    "kMaxKernelTaps": 2**31 - 1,
    "kMaxGeometry": 2**30,
    "kMaxFastKernelSide": 1024,
    "kMaxGridX": 2**31 - 1,
    "kMaxGridYZ": 65535,
    "kMaxGridStrideBlocks": 2**20,
}
_MAX_KERNEL = CUDA_LIMITS["kMaxKernelSide"]
_MAX_PARAM = CUDA_LIMITS["kMaxGeometry"]
_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`) "
    "where a CUDA toolkit (nvcc) and a CUDA build of torch are present, or set LKCONV_JIT=1 to JIT-build "
    "csrc/ with ninja on first use"
)


def _csrc_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")


def ops_registered() -> bool:
    """True when torch.ops.lkconv_cuda.{forward, grad_input, grad_weight} exist in this process."""
    try:
        ns = torch.ops.lkconv_cuda
        return all(hasattr(ns, n) for n in ("forward", "grad_input", "grad_weight"))
    except Exception:
        return False


def load_extension(jit: Optional[bool] = None, verbose: bool = False) -> Optional[str]:
    """Make the ``lkconv_cuda`` ops available.  None on success, else why not (never raises).
    ``jit``: allow the ninja JIT build (default: ``LKCONV_JIT=1``)."""
    if ops_registered():
        return None
    try:
        importlib.import_module("lkconv._C")
        if ops_registered():
            return None
        import_err = "lkconv._C imported but registered no lkconv_cuda ops"
    except Exception as e:  # ImportError, or an ABI mismatch (OSError / undefined symbol)
        import_err = f"{type(e).__name__}: {e}"
    if jit is None:
        jit = os.environ.get("LKCONV_JIT", "0").strip().lower() in ("1", "true", "yes", "on")
    if not jit:
        return f"the extension lkconv._C is not built ({import_err}); {_BUILD_HINT}"
    try:
        _jit_build(verbose)
    except Exception as e:
        return f"lkconv._C is not built ({import_err}) and the LKCONV_JIT=1 build failed: {type(e).__name__}: {e}"
    return None if ops_registered() else "the JIT-built extension registered no lkconv_cuda ops"


def _jit_build(verbose: bool) -> None:
    csrc = _csrc_dir()
    env_py = os.path.join(csrc, "build_env.py")
    if not os.path.isfile(env_py):
        raise RuntimeError(f"csrc/ sources not found at {csrc} (JIT needs a source checkout)")
    spec = importlib.util.spec_from_file_location("lkconv_build_env", env_py)
    env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(env)
    if not torch.version.cuda:
        raise RuntimeError(f"torch {torch.__version__} is not a CUDA build")
    cuda_home = env.find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)")
    from torch.utils import cpp_extension

    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # JIT: only this machine's device
    cpp_extension.load(
        name="lkconv_cuda_jit",
        sources=env.source_paths(),
        extra_include_paths=[csrc] + env.nvidia_pip_includes(),
        extra_cflags=env.cxx_flags(),
        extra_cuda_cflags=env.nvcc_flags(),
        is_python_module=False,
        verbose=verbose,
    )


def pass_algo(base_algo: int, dtype: torch.dtype, pass_: str) -> int:
    """The ``algo`` argument of the ``lkconv_cuda`` op for one pass: ``base_algo`` 1 (generic kernels) as is;
    else 2 (fp32 forward / grad_input may use the TF32 tensor-core kernel) when the pass is fp32 forward or
    grad_input and PyTorch allows TF32 for convolutions (:func:`lkconv.precision.conv_tf32_enabled`, legacy
    ``torch.backends.cudnn.allow_tf32`` or ``torch.backends.cudnn.conv.fp32_precision``), else 0 (IEEE)."""
    if base_algo == 1:
        return 1
    if dtype == torch.float32 and pass_ in ("forward", "grad_input") and _tf32_allowed():
        return 2
    return 0


@torch.compiler.assume_constant_result
def _tf32_allowed() -> bool:
    from ..precision import conv_tf32_enabled

    return conv_tf32_enabled()


class CUDABackend(Backend):
    name = "cuda"
    description = ("compiled CUDA extension (csrc/): tensor-core row-Toeplitz implicit GEMM for fp16/bf16, "
                   "register-blocked fp32, deterministic grad_weight")

    def __init__(self):
        self._why: Optional[str] = None
        self._probed = False
        self.algo = 1 if os.environ.get("LKCONV_CUDA_ALGO", "").strip().lower() == "generic" else 0

    # -- availability -----------------------------------------------------------------------------
    def unavailable_reason(self) -> Optional[str]:
        if self._probed:
            return self._why
        try:
            self._why = self._probe()
        except Exception as e:  # never raise from here
            self._why = f"probe failed: {type(e).__name__}: {e}"
        self._probed = True
        return self._why

    def _probe(self) -> Optional[str]:
        if not torch.version.cuda:
            return f"torch {torch.__version__} is not a CUDA build; install a CUDA build of torch"
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return (f"compute capability {major}.{minor} < 8.0; the kernels are built for sm80+ "
                    "(TORCH_CUDA_ARCH_LIST, default '8.0;9.0+PTX')")
        return load_extension()

    # -- support ----------------------------------------------------------------------------------
    def check(self, req):
        if req.device.type != "cuda":
            return f"needs CUDA tensors, got device {req.device.type}"
        if req.dtype not in _SUPPORTED:
            return f"dtype {req.dtype} not supported (float16, bfloat16, float32)"
        if req.pass_ == "forward" and req.weight_dtype != req.dtype:
            return f"weight dtype {req.weight_dtype} differs from input dtype {req.dtype}"
        if len(req.input_shape) != 4 or len(req.weight_shape) != 4:
            return "needs 4-D input and weight"
        why = channel_multiplier_declined(req)
        if why:
            return why
        if req.weight_shape[2] > _MAX_KERNEL or req.weight_shape[3] > _MAX_KERNEL:
            return f"kernel size {tuple(req.weight_shape[2:])} exceeds {_MAX_KERNEL}"
        params = req.params
        if max(params.stride) > _MAX_PARAM or max(params.dilation) > _MAX_PARAM or max(params.padding) > _MAX_PARAM:
            return f"stride/padding/dilation beyond {_MAX_PARAM}"
        return int32_geometry_reason(req.input_shape, (req.weight_shape[2], req.weight_shape[3]), params, tile=1024)

    # -- the three passes -------------------------------------------------------------------------
    def forward(self, x, weight, bias, p):
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return torch.ops.lkconv_cuda.forward(x, weight, bias, list(p.stride), list(p.padding), list(p.dilation),
                                             pass_algo(self.algo, x.dtype, "forward"))

    def grad_input(self, grad_out, weight, input_shape, p):
        if weight.dtype != grad_out.dtype:
            weight = weight.to(grad_out.dtype)
        return torch.ops.lkconv_cuda.grad_input(
            grad_out, weight, list(input_shape), list(p.stride), list(p.padding), list(p.dilation),
            pass_algo(self.algo, grad_out.dtype, "grad_input")
        )

    def grad_weight(self, grad_out, x, weight_shape, p):
        if grad_out.dtype != x.dtype:
            grad_out = grad_out.to(x.dtype)
        return torch.ops.lkconv_cuda.grad_weight(
            grad_out, x, list(weight_shape), list(p.stride), list(p.padding), list(p.dilation), self.algo
        )
