"""The ``triton`` backend: row-Toeplitz implicit-GEMM kernels written in Triton (see
:mod:`lkconv.backends.triton.kernels` and ``docs/triton_backend.md``).

Importing this module never imports triton: :meth:`TritonBackend.unavailable_reason` probes for it
and the launchers (:mod:`.ops`, :mod:`.kernels`) are imported on the first call of a pass.

Runs on CUDA tensors, or on CPU tensors when Triton's interpreter is on (``TRITON_INTERPRET=1`` set
before triton is imported; slow, meant for tests).  fp16 / bf16 / fp32; fp64 is declined.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..base import Backend, channel_multiplier_declined
from ..limits import int32_geometry_reason

__all__ = ["TritonBackend"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_I32 = 2**31 - 1


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_selftest() -> Optional[str]:
    """Run one tiny kernel with a data-dependent loop bound in Triton's interpreter; the reason it
    cannot be used, or None.  Triton 3.6's interpreter turns a loop bound into an int with
    ``int(array)``, which NumPy >= 2.4 refuses for 1-element 1-D arrays (fixed in later Triton
    releases with ``.squeeze()``): every lkconv kernel would then fail with an obscure TypeError."""
    try:
        import numpy as np
        import triton
        import triton.language as tl

        @triton.jit
        def _count(o_ptr, a, b):
            n = tl.maximum(a - b, 0)
            acc = 0
            for _ in range(0, n):
                acc += 1
            tl.store(o_ptr, acc)

        out = torch.zeros(1, dtype=torch.int32)
        _count[(1,)](out, 5, 2)
        if int(out.item()) != 3:
            return f"Triton {triton.__version__}'s interpreter miscounted a loop (got {int(out.item())}, expected 3)"
        return None
    except Exception as e:
        try:
            versions = f"triton {triton.__version__} + numpy {np.__version__}"
        except Exception:
            versions = "this triton/numpy"
        hint = ""
        if "0-dimensional" in str(e):
            hint = ("; Triton's interpreter calls int() on 1-element arrays, which numpy >= 2.4 refuses: "
                    "pip install 'numpy<2.4', or a newer triton")
        return f"Triton's interpreter (TRITON_INTERPRET=1) cannot run kernels with {versions} ({type(e).__name__}: {e}){hint}"


class TritonBackend(Backend):
    name = "triton"
    description = (
        "Triton row-Toeplitz implicit GEMM (tl.dot: tensor cores for fp16/bf16, TF32/IEEE for fp32); "
        "CUDA, or CPU under TRITON_INTERPRET=1"
    )

    def __init__(self):
        self._triton_missing: Optional[str] = None
        self._probed = False
        #: None until the kernels are imported, then whether they were built for the interpreter
        self._interpreted: Optional[bool] = None
        self._ops = None

    # -- availability ---------------------------------------------------------------------------
    def _probe(self) -> None:
        if self._probed:
            return
        try:
            import triton  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            self._triton_missing = f"triton cannot be imported ({type(e).__name__}: {e}); pip install triton"
        else:
            if _env_interpret():
                self._triton_missing = _interpreter_selftest()
        self._probed = True

    def unavailable_reason(self) -> Optional[str]:
        try:
            self._probe()
            if self._triton_missing:
                return self._triton_missing
            if self._interpreted is not None:  # kernels already built: their mode decides
                if self._interpreted or torch.cuda.is_available():
                    return None
            elif _env_interpret() or torch.cuda.is_available():
                return None
            return (
                "needs a CUDA GPU (none visible); to run the Triton kernels on CPU tensors (slowly, for "
                "testing) set TRITON_INTERPRET=1 before triton is imported"
            )
        except Exception as e:  # never raise from here
            return f"triton backend probe failed ({type(e).__name__}: {e})"

    # -- support ----------------------------------------------------------------------------------
    def check(self, req):
        dev = req.device.type
        interp = self._interpreted if self._interpreted is not None else _env_interpret()
        if dev == "cpu":
            if not interp:
                return (
                    "CPU tensors run only under Triton's interpreter (TRITON_INTERPRET=1 before triton is "
                    "imported); move the tensors to a CUDA device"
                )
        elif dev != "cuda":
            return f"device type {dev!r} not supported (CUDA, or CPU under TRITON_INTERPRET=1)"
        elif interp:
            return "TRITON_INTERPRET=1: the Triton kernels run in the CPU interpreter in this process (CPU tensors only)"
        if req.dtype not in _DTYPES:
            return f"dtype {req.dtype} not supported (float16, bfloat16, float32; use backend 'torch' or 'cpu' for float64)"
        if req.weight_dtype is not None and req.weight_dtype != req.dtype:
            return f"weight dtype {req.weight_dtype} differs from input dtype {req.dtype}"
        why = channel_multiplier_declined(req)
        if why:
            return why
        N, C, H, W = req.input_shape
        KH, KW = req.weight_shape[2], req.weight_shape[3]
        if C * KH * KW > _I32:
            return "C*KH*KW exceeds 2**31 (filter offsets are int32)"
        why = int32_geometry_reason(req.input_shape, (KH, KW), req.params)
        if why is not None:
            return why
        # one program per (plane, 16x16 tile) at worst: the 1-D grid must stay below 2**31; the
        # forward's grid covers the output plane, grad_input's the input plane (either may be larger)
        ho, wo = req.params.out_size(H, W, KH, KW)
        tiles = max(((H + 15) // 16) * ((W + 15) // 16), ((ho + 15) // 16) * ((wo + 15) // 16))
        if N * C * max(tiles, 1) > _I32:
            return "too many (plane, tile) programs for a 1-D grid (N*C*tiles >= 2**31)"
        return None

    # -- passes -----------------------------------------------------------------------------------
    def _get_ops(self):
        if self._ops is None:
            from . import ops

            self._interpreted = bool(ops.INTERPRETED)
            self._ops = ops
        return self._ops

    def forward(self, x, weight, bias, params):
        return self._get_ops().forward(x, weight, bias, params)

    def grad_input(self, grad_out, weight, input_shape, params):
        return self._get_ops().grad_input(grad_out, weight, input_shape, params)

    def grad_weight(self, grad_out, x, weight_shape, params):
        return self._get_ops().grad_weight(grad_out, x, weight_shape, params)
