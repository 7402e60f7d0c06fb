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

**Choice**: per pass, per layout of the pass's data tensor (NCHW / channels_last) and per kernel
size, one measured table, :data:`PATH_TABLE` (derived from the run :data:`PATH_TABLE_RUN` of
``benchmarks/cpu_threshold.py``), picks among the FFT, the direct path and PyTorch's own kernels in
NCHW or channels_last (``nchw`` / ``cl``, converting an input of the other format and the result
back where that round trip pays), by taps per strided output pixel ``KH*KW / (sh*sw)`` (the FFT
computes all stride-1 outputs; the other paths only the strided ones).

Forcing a path (tests, benchmarks): ``CPUBackend(path="fft" | "direct" | "nchw" | "cl")``, or for the registered
instance the module-level :data:`FORCE_PATH` / the :func:`force_path` context manager.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from ..base import Backend
from ...params import ConvParams
from .direct import (DIRECT_ATEN_GW_MAX_TAPS, DIRECT_MAX_CONV_PAD, LAYOUTS, direct_forward, direct_grad_input,
                     direct_grad_weight, layout_forward, layout_grad_input, layout_grad_weight, layout_of)
from .fft import _axis, fft_forward, fft_grad_input, fft_grad_weight, fft_in_range, fft_length, next_fast_len

__all__ = [
    "CPUBackend",
    "PATHS",
    "PATH_TABLE",
    "PATH_TABLE_RUN",
    "thread_class",
    "table_path",
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
    "layout_forward",
    "layout_grad_input",
    "layout_grad_weight",
    "layout_of",
    "DIRECT_MAX_CONV_PAD",
    "DIRECT_ATEN_GW_MAX_TAPS",
]

#: the paths of the cpu backend: "fft" (lkconv's FFT), "direct" (lkconv's direct path in the
#: input's own memory format: oneDNN with explicit pre-padding above the padding cliff, lkconv's
#: weight gradient), "nchw" / "cl" (PyTorch's own kernels as they are, run in NCHW / channels_last:
#: an input in the other format is converted there and the result back, the round trip included in
#: the measurements)
PATHS = ("fft", "direct", "nchw", "cl")

#: where the rows of :data:`PATH_TABLE` come from, per thread class: a committed run of
#: ``benchmarks/cpu_threshold.py`` (``python benchmarks/cpu_threshold.py --derive <run>/results.json``
#: prints exactly those rows; tests/test_cpu_routing.py checks they agree), or a note.  ``auto``
#: with these rows was checked (every cell >= 0.95x the faster PyTorch layout) on the later runs
#: cpu-threshold-...-20261202-004205 (2 threads) and -005151 (1 thread); docs/cpu_backend.md
PATH_TABLE_RUN = {
    "single": "benchmarks/results/cpu-threshold-intel-r--xeon-r--processor---2-80ghz-20261201-221015",
    "multi": "benchmarks/results/cpu-threshold-intel-r--xeon-r--processor---2-80ghz-20261201-215333",
}

#: THE table of the cpu backend's choice: (thread class, pass, input layout) -> ((min taps, path),
#: ...) in increasing ``min taps``; a call takes the path of the last entry with ``min taps <=
#: KH*KW / (sh*sw)`` (taps per strided output pixel: the FFT computes every stride-1 output, the
#: other paths only the strided ones).  Thread class: "single" when torch.get_num_threads() == 1,
#: else "multi"; input layout: "cl" when the pass's data tensor (x; grad_out for grad_input) is
#: channels_last, else "nchw".  The source of each class's rows: :data:`PATH_TABLE_RUN`.
PATH_TABLE = {
    # derived from PATH_TABLE_RUN["multi"] (python benchmarks/cpu_threshold.py --derive ...)
    ("multi", "forward", "nchw"): ((0, "nchw"), (361, "direct"), (625, "fft")),
    ("multi", "forward", "cl"): ((0, "cl"), (169, "nchw"), (361, "cl"), (961, "fft")),
    ("multi", "grad_input", "nchw"): ((0, "nchw"), (361, "direct"), (625, "fft")),
    ("multi", "grad_input", "cl"): ((0, "cl"), (625, "fft")),
    ("multi", "grad_weight", "nchw"): ((0, "nchw"), (25, "direct"), (361, "fft")),
    ("multi", "grad_weight", "cl"): ((0, "cl"), (25, "direct"), (169, "fft")),
    # derived from PATH_TABLE_RUN["single"] (python benchmarks/cpu_threshold.py --derive ...)
    ("single", "forward", "nchw"): ((0, "nchw"), (361, "direct"), (625, "fft")),
    ("single", "forward", "cl"): ((0, "cl"), (169, "nchw"), (361, "cl")),
    ("single", "grad_input", "nchw"): ((0, "nchw"), (25, "direct"), (49, "nchw"), (625, "fft")),
    ("single", "grad_input", "cl"): ((0, "cl"), (961, "fft")),
    ("single", "grad_weight", "nchw"): ((0, "nchw"), (25, "direct"), (361, "fft")),
    ("single", "grad_weight", "cl"): ((0, "cl"), (25, "direct"), (625, "fft")),
}

#: None (choose by PATH_TABLE) or one of PATHS: overrides the choice of every CPUBackend that was
#: constructed without an explicit ``path``.
FORCE_PATH: Optional[str] = None

_PATHS = PATHS


def _check_path(path, what: str) -> None:
    if path is not None and path not in _PATHS:
        raise ValueError(f"lkconv: {what} must be one of {_PATHS} or None, got {path!r}")


@contextlib.contextmanager
def force_path(path: Optional[str]):
    """``with force_path("fft"): ...`` — make the registered ``cpu`` backend use one path."""
    global FORCE_PATH
    _check_path(path, "path")
    prev = FORCE_PATH
    FORCE_PATH = path
    try:
        yield
    finally:
        FORCE_PATH = prev


def thread_class(threads: Optional[int] = None) -> str:
    """"single" when torch runs one intra-op thread, else "multi" (the key of :data:`PATH_TABLE`)."""
    if threads is None:
        threads = torch.get_num_threads()
    return "single" if threads == 1 else "multi"


#: the largest kernel the committed runs measure (31x31): beyond it the table is not extrapolated, the
#: FFT is taken (its cost does not grow with the taps, every other path's does)
MEASURED_MAX_TAPS = 31 * 31


def table_path(pass_: str, layout: str, taps: float, threads: Optional[int] = None) -> str:
    """The path :data:`PATH_TABLE` gives for ``taps`` taps per strided output pixel (the FFT beyond
    :data:`MEASURED_MAX_TAPS`)."""
    if taps > MEASURED_MAX_TAPS:
        return "fft"
    path = None
    for min_taps, p in PATH_TABLE[(thread_class(threads), pass_, layout)]:
        if taps >= min_taps:
            path = p
    return path


def choose_path(kh: int, kw: int, stride: Tuple[int, int], pass_: str = "forward",
                threads: Optional[int] = None, layout: str = "nchw") -> str:
    """The measured rule (:data:`PATH_TABLE`) for a (kh, kw) kernel at ``stride``.  ``threads``:
    torch's intra-op thread count (default: the current one); ``layout``: "nchw" or "cl", the
    memory format of the pass's data tensor."""
    return table_path(pass_, layout, kh * kw / (stride[0] * stride[1]), threads)


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
        "CPU: FFT (rfft2, exact, no wrap-around) for large kernels, oneDNN direct (NCHW or channels_last) "
        "for small ones; per-pass choice measured; fp32/fp64 (+fp16/bf16 via fp32)"
    )

    def __init__(self, path: Optional[str] = None):
        _check_path(path, "CPUBackend path")
        self.path = path

    def check(self, req):
        if req.device.type != "cpu":
            return f"the cpu backend runs on CPU tensors only (got a tensor on {req.device.type})"
        if req.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            return f"the cpu backend supports float32/float64/float16/bfloat16, not {req.dtype}"
        return None

    def delegates_to_torch(self, x: torch.Tensor, weight_shape, p: ConvParams, passes) -> bool:
        """True when every pass in ``passes`` would run PyTorch's own kernels on ``x``'s layout with
        nothing of lkconv's around them: then ``F.conv2d`` itself (and PyTorch's autograd) computes
        the same numbers without the op's overhead, which at small kernels is most of the gap to
        PyTorch (docs/cpu_backend.md, "auto at small kernels").  fp32/fp64 only (lkconv computes
        fp16/bf16 in fp32, F.conv2d does not), symmetric padding (for the direct path: up to
        DIRECT_MAX_CONV_PAD, beyond it that path pre-pads), the table's choice only (no forced path)."""
        if self.path is not None or FORCE_PATH is not None or x.dtype not in (torch.float32, torch.float64):
            return False
        t, b, l, r = p.padding
        if t != b or l != r:
            return False
        own = layout_of(x)
        taps = weight_shape[2] * weight_shape[3]
        for pass_ in passes:
            path = choose_path(weight_shape[2], weight_shape[3], p.stride, pass_, layout=own)
            if path == own:
                continue  # PyTorch's own kernels as they are, in x's layout
            if path == "direct" and max(t, l) <= DIRECT_MAX_CONV_PAD and (
                    pass_ != "grad_weight" or taps <= DIRECT_ATEN_GW_MAX_TAPS):
                continue  # the direct path is PyTorch's own kernel here (no pre-padding, aten's weight gradient)
            return False
        return True

    def _path(self, data, weight_shape, p: ConvParams, pass_: str) -> str:
        if self.path is not None:
            return self.path
        if FORCE_PATH is not None:
            return FORCE_PATH
        return choose_path(weight_shape[2], weight_shape[3], p.stride, pass_, layout=layout_of(data))

    # An FFT spreads a NaN/Inf over its whole plane (torch's convolution keeps it local) and finite
    # inputs can overflow inside it: the FFT is taken only when fft_in_range bounds every
    # intermediate (one pass over the data; Inf/NaN make the bound non-finite), else the direct
    # path, so NaN/Inf propagate exactly as in F.conv2d and no finite input turns into Inf/NaN.
    # Channel multiplier m > 1 (weight (m*C, 1, KH, KW)): the direct, nchw and cl forward and
    # grad_input are native (oneDNN takes groups=C with m*C outputs); the FFT paths and grad_weight
    # run on the channel-expanded input x.repeat_interleave(m, 1) (output channel c*m + j reads
    # input c), an extra (N, m*C, H, W) buffer; the FFT grad_input sums its (N, m*C, H, W) result
    # over j.
    def forward(self, x, weight, bias, params):
        path = self._path(x, weight.shape, params, "forward")
        if path == "fft":
            m = weight.shape[0] // x.shape[1]
            xe = x if m == 1 else x.repeat_interleave(m, 1)
            k_hw, out_hw = tuple(weight.shape[2:]), params.out_size(x.shape[2], x.shape[3], *weight.shape[2:])
            if fft_in_range(xe, weight, tuple(x.shape[2:]), k_hw, out_hw, params, "forward"):
                return fft_forward(xe, weight, bias, params)
        elif path in LAYOUTS:
            return layout_forward(x, weight, bias, params, path)
        return direct_forward(x, weight, bias, params)

    def grad_input(self, grad_out, weight, input_shape, params):
        path = self._path(grad_out, weight.shape, params, "grad_input")
        if path in LAYOUTS:
            return layout_grad_input(grad_out, weight, input_shape, params, path)
        if (path == "fft"
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
        path = self._path(x, weight_shape, params, "grad_weight")
        m = weight_shape[0] // x.shape[1]
        if m > 1:
            x = x.repeat_interleave(m, 1)
        if path in LAYOUTS:
            return layout_grad_weight(grad_out, x, weight_shape, params, path)
        if (path == "fft"
                and fft_in_range(grad_out, x, tuple(x.shape[2:]), tuple(weight_shape[2:]),
                                 tuple(grad_out.shape[2:]), params, "grad_weight")):
            return fft_grad_weight(grad_out, x, weight_shape, params)
        return direct_grad_weight(grad_out, x, weight_shape, params)
