"""The ``cpu`` backend: direct convolution for small kernels, FFT for large ones.

* :mod:`.fft` -- the FFT path (``torch.fft.rfft2`` / ``irfft2``; exact, no wrap-around; the
  derivation is in its docstring);
* :mod:`.direct` -- the direct path: PyTorch's own convolution (oneDNN) through the ``torch``
  backend's passes, with fp16/bf16 upcast and oneDNN's padding rule;
* this module -- the choice between them and :class:`CPUBackend`.

**Non-finite inputs and overflow**: an FFT would smear a NaN/Inf over its whole plane, while
``F.conv2d`` keeps it local, and finite inputs can overflow inside the transform; each pass takes the
FFT only when one cheap bound of every intermediate (:func:`.fft.fft_in_range`) stays in range, else
the direct path.  The FFT's rounding error is relative to the plane's largest values, not local;
:func:`local_accuracy` makes the registered instance take the direct path.

**Dead padding**: the direct path crops the taps, input rows and padding that only ever meet
zeros before materialising any padding (:mod:`.direct`).

**Choice**: FFT when the kernel has at least a measured number of taps per output pixel, i.e.
``KH*KW >= threshold * sh*sw`` (per pass; :data:`FFT_MIN_TAPS_PER_PASS`, or
:data:`FFT_MIN_TAPS_PER_PASS_SINGLE_THREAD` when torch runs single-threaded) (the FFT path computes
all stride-1 outputs; the direct one only the strided ones).  The constants were measured by
``benchmarks/cpu_threshold.py``.

Forcing a path (tests, benchmarks): ``CPUBackend(path="fft" | "direct")``, or for the registered
instance the module-level :data:`FORCE_PATH` / the :func:`force_path` context manager.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from ..base import Backend
from ...params import ConvParams
from .direct import (DIRECT_ATEN_GW_MAX_TAPS, DIRECT_MAX_CONV_PAD, direct_forward, direct_grad_input,
                     direct_grad_weight)
from .fft import _axis, fft_forward, fft_grad_input, fft_grad_weight, fft_in_range, fft_length, next_fast_len

__all__ = [
    "CPUBackend",
    "FFT_MIN_TAPS",
    "FFT_MIN_TAPS_PER_PASS",
    "FFT_MIN_TAPS_PER_PASS_SINGLE_THREAD",
    "FORCE_PATH",
    "force_path",
    "local_accuracy",
    "fft_in_range",
    "choose_path",
    "next_fast_len",
    "fft_length",
    "fft_forward",
    "fft_grad_input",
    "fft_grad_weight",
    "direct_forward",
    "direct_grad_input",
    "direct_grad_weight",
    "DIRECT_MAX_CONV_PAD",
    "DIRECT_ATEN_GW_MAX_TAPS",
]

#: FFT when KH*KW >= threshold * stride_h*stride_w.  Measured by benchmarks/cpu_threshold.py on the
#: 2-core dev box (N=8, C=128, 56x56, fp32, "same", 1 thread, process CPU time because the box is
#: shared; 64 MiB FFT chunks, the multi-threaded default; docs/cpu_backend.md has the tables):
#: against lkconv's direct path the FFT wins the forward and grad_input from K=21 (441 taps) and
#: grad_weight from K=27 (729 taps).
FFT_MIN_TAPS = 441

#: the threshold per pass (each pass switches where the FFT starts to win for it)
FFT_MIN_TAPS_PER_PASS = {"forward": FFT_MIN_TAPS, "grad_input": FFT_MIN_TAPS, "grad_weight": 729}

#: the same when torch runs single-threaded, where the FFT uses 1 MiB chunks and is ~2x faster
#: (measured the same way: FFT ahead or tied in all three passes from K=15, 225 taps; behind in the
#: forward at K=11)
FFT_MIN_TAPS_PER_PASS_SINGLE_THREAD = {"forward": 225, "grad_input": 225, "grad_weight": 225}

#: None (choose by FFT_MIN_TAPS), "fft" or "direct": overrides the choice of every CPUBackend that
#: was constructed without an explicit ``path``.
FORCE_PATH: Optional[str] = None

_PATHS = ("fft", "direct")


@contextlib.contextmanager
def force_path(path: Optional[str]):
    """``with force_path("fft"): ...`` — make the registered ``cpu`` backend use one path."""
    global FORCE_PATH
    if path is not None and path not in _PATHS:
        raise ValueError(f"lkconv: path must be one of {_PATHS} or None, got {path!r}")
    prev = FORCE_PATH
    FORCE_PATH = path
    try:
        yield
    finally:
        FORCE_PATH = prev


def choose_path(kh: int, kw: int, stride: Tuple[int, int], pass_: str = "forward",
                threads: Optional[int] = None) -> str:
    """The measured rule: "fft" for large kernels (per strided output pixel), else "direct".
    ``threads``: torch's intra-op thread count (default: the current one)."""
    if threads is None:
        threads = torch.get_num_threads()
    table = FFT_MIN_TAPS_PER_PASS_SINGLE_THREAD if threads == 1 else FFT_MIN_TAPS_PER_PASS
    return "fft" if kh * kw >= table[pass_] * stride[0] * stride[1] else "direct"


# ------------------------------------------------------------------------------------------------
def local_accuracy():
    """``with local_accuracy(): ...`` — the registered ``cpu`` backend (so ``auto`` on CPU tensors)
    takes the direct path, whose error is local like ``F.conv2d``'s, instead of the FFT, whose error
    is relative to the largest values of the plane (see docs/cpu_backend.md).  The same as
    ``force_path("direct")``."""
    return force_path("direct")


class CPUBackend(Backend):
    name = "cpu"
    description = (
        "CPU: FFT (rfft2, exact, no wrap-around) for large kernels, oneDNN direct for small ones; "
        "switch point measured; fp32/fp64 (+fp16/bf16 via fp32)"
    )

    def __init__(self, path: Optional[str] = None):
        if path is not None and path not in _PATHS:
            raise ValueError(f"lkconv: CPUBackend path must be one of {_PATHS} or None, got {path!r}")
        self.path = path

    def check(self, req):
        if req.device.type != "cpu":
            return f"the cpu backend runs on CPU tensors only (got a tensor on {req.device.type})"
        if req.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            return f"the cpu backend supports float32/float64/float16/bfloat16, not {req.dtype}"
        return None

    def _path(self, weight_shape, p: ConvParams, pass_: str = "forward") -> str:
        if self.path is not None:
            return self.path
        if FORCE_PATH is not None:
            return FORCE_PATH
        return choose_path(weight_shape[2], weight_shape[3], p.stride, pass_)

    # An FFT spreads a NaN/Inf over its whole plane (torch's convolution keeps it local) and finite
    # inputs can overflow inside it: the FFT is taken only when fft_in_range bounds every
    # intermediate (one pass over the data; Inf/NaN make the bound non-finite), so NaN/Inf propagate
    # exactly as in F.conv2d and no finite input turns into Inf/NaN.
    # Channel multiplier m > 1 (weight (m*C, 1, KH, KW)): the direct forward and grad_input are
    # native (oneDNN takes groups=C with m*C outputs); the FFT paths and grad_weight run on the
    # channel-expanded input x.repeat_interleave(m, 1) (output channel c*m + j reads input c), an
    # extra (N, m*C, H, W) buffer; the FFT grad_input sums its (N, m*C, H, W) result over j.
    def forward(self, x, weight, bias, params):
        if self._path(weight.shape, params, "forward") == "fft":
            m = weight.shape[0] // x.shape[1]
            xe = x if m == 1 else x.repeat_interleave(m, 1)
            k_hw, out_hw = tuple(weight.shape[2:]), params.out_size(x.shape[2], x.shape[3], *weight.shape[2:])
            if fft_in_range(xe, weight, tuple(x.shape[2:]), k_hw, out_hw, params, "forward"):
                return fft_forward(xe, weight, bias, params)
        return direct_forward(x, weight, bias, params)

    def grad_input(self, grad_out, weight, input_shape, params):
        if (self._path(weight.shape, params, "grad_input") == "fft"
                and fft_in_range(grad_out, weight, tuple(input_shape[2:]), tuple(weight.shape[2:]),
                                 tuple(grad_out.shape[2:]), params, "grad_input")):
            m = weight.shape[0] // input_shape[1]
            if m == 1:
                return fft_grad_input(grad_out, weight, input_shape, params)
            N, C, H, W = input_shape
            gx = fft_grad_input(grad_out, weight, (N, C * m, H, W), params)
            return gx.view(N, C, m, H, W).sum(2)  # lkconv.ops normalises the memory format
        return direct_grad_input(grad_out, weight, input_shape, params)

    def grad_weight(self, grad_out, x, weight_shape, params):
        m = weight_shape[0] // x.shape[1]
        if m > 1:
            x = x.repeat_interleave(m, 1)
        if (self._path(weight_shape, params, "grad_weight") == "fft"
                and fft_in_range(grad_out, x, tuple(x.shape[2:]), tuple(weight_shape[2:]),
                                 tuple(grad_out.shape[2:]), params, "grad_weight")):
            return fft_grad_weight(grad_out, x, weight_shape, params)
        return direct_grad_weight(grad_out, x, weight_shape, params)
