"""The one case table of the backends' tests and the one input builder.

Every backend's test file (test_backend_cpu.py, test_backend_cuda.py, test_backend_triton.py, and
test_functional.py for torch/reference/auto) takes
its cases from here: a :class:`Case` names the geometry (input shape, kernel, stride, padding,
dilation), whether there is a bias and the input layout; :func:`make_inputs` builds ``(x, w, b)``
for it in a dtype, on a device, in a layout.  The tables below are the curated sets each backend
runs (sizes differ: the Triton interpreter needs tiny shapes, the GPU wants realistic ones), all in
this one format.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import os

import pytest
import torch

LAYOUTS = ("nchw", "channels_last", "sliced")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cuda_backend_skip_reason() -> Optional[str]:
    """Why the cuda backend's GPU tests cannot run here (None: they can)."""
    import lkconv

    if not torch.cuda.is_available():
        return "needs a CUDA GPU (none visible)"
    why = lkconv.backend_status().get("cuda")
    return f"cuda backend unavailable: {why}" if why else None


_CUDA_SKIP = cuda_backend_skip_reason()
#: the marker of every test that runs the compiled CUDA kernels
requires_cuda_backend = pytest.mark.skipif(_CUDA_SKIP is not None, reason=_CUDA_SKIP or "")


def load_emulation():
    """csrc/kernel_emulation.py (checkout-only: the host transcriptions of the CUDA kernels), loaded
    once by path."""
    import importlib.util
    import sys

    name = "lkconv_kernel_emulation"
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "kernel_emulation.py")
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@dataclass(frozen=True)
class Case:
    id: str
    shape: Tuple[int, int, int, int]  # (N, C, H, W)
    k: Tuple[int, int]  # (KH, KW)
    stride: Union[int, Tuple[int, int]] = 1
    padding: Union[int, str, tuple] = 0
    dilation: Union[int, Tuple[int, int]] = 1
    bias: bool = False
    layout: str = "nchw"  # one of LAYOUTS

    @property
    def conv_args(self):
        """(stride, padding, dilation), as lkconv.depthwise_conv2d / compare_all_passes take them."""
        return self.stride, self.padding, self.dilation


def _table(*cases: Case) -> Dict[str, Case]:
    table = {c.id: c for c in cases}
    assert len(table) == len(cases), "duplicate case id"
    return table


def make_inputs(case: Case, dtype: torch.dtype = torch.float32, device="cpu", layout: Optional[str] = None,
                bias: Optional[bool] = None, seed: Optional[int] = None, weight_scale: bool = False):
    """``(x, w, b)`` for ``case`` in ``dtype`` on ``device``.

    ``layout`` (default: the case's): "nchw"; "channels_last"; "sliced" -- a view of a bigger buffer,
    non-contiguous in channels, rows and columns.  ``bias`` overrides the case's.  ``seed``: draw from
    a private generator (reproducible regardless of the global RNG); None uses the global RNG (the
    tests seed it per test).  Values are drawn in fp64 on the CPU and cast, so every dtype and device
    sees the same numbers.  ``weight_scale``: divide w by sqrt(KH*KW) (outputs of order 1 at large K).
    """
    layout = case.layout if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    bias = case.bias if bias is None else bias
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    N, C, H, W = case.shape
    KH, KW = case.k

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if layout == "sliced":
        x = randn(N, 2 * C, H + 3, W + 5).to(dtype).to(device)[:, ::2, 1 : 1 + H, 2 : 2 + W]
        assert x.numel() == 0 or not x.is_contiguous()
    else:
        x = randn(N, C, H, W).to(dtype).to(device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    w = randn(C, 1, KH, KW)
    if weight_scale:
        w = w / (KH * KW) ** 0.5
    w = w.to(dtype).to(device)
    b = randn(C).to(dtype).to(device) if bias else None
    return x, w, b


#: the cpu backend's curated cases (tests/test_backend_cpu.py; both paths, every pass)
CPU_CASES = _table(
    Case('k1', (2, 5, 6, 7), (1, 1), bias=True),
    Case('k3', (2, 3, 9, 8), (3, 3), padding=1),
    Case('k7-same', (1, 4, 11, 13), (7, 7), padding='same', bias=True),
    Case('k13-same', (2, 3, 17, 15), (13, 13), padding='same'),
    Case('k31-same', (1, 3, 20, 22), (31, 31), padding='same', bias=True),
    Case('k4-even-same', (2, 2, 9, 10), (4, 4), padding='same', bias=True),
    Case('k8-even-same', (1, 3, 12, 11), (8, 8), padding='same'),
    Case('rect-3x11', (1, 3, 12, 15), (3, 11), padding=(1, 5), bias=True),
    Case('rect-31x5', (1, 2, 33, 9), (31, 5), padding=(15, 2)),
    Case('k13-gt-H', (1, 2, 6, 7), (13, 13), padding=6, bias=True),
    Case('k31-gt-H', (2, 3, 10, 12), (31, 31), padding=15),
    Case('odd-HW-c5', (1, 5, 13, 11), (7, 5), padding=(3, 2), bias=True),
    Case('batch0', (0, 3, 8, 8), (7, 7), padding=3, bias=True),
    Case('batch1-c5', (1, 5, 9, 9), (13, 13), padding='same'),
    Case('stride2', (2, 3, 13, 12), (5, 5), stride=2, padding=2, bias=True),
    Case('stride2-k31', (1, 2, 35, 33), (31, 31), stride=2, padding=15),
    Case('stride-2x3', (1, 3, 13, 14), (3, 4), stride=(2, 3), padding=(1, 0), bias=True),
    Case('dil2', (1, 2, 15, 15), (3, 5), padding=3, dilation=2),
    Case('dil-2x1', (1, 2, 19, 15), (7, 5), padding=(6, 2), dilation=(2, 1), bias=True),
    Case('dil3-same-even', (1, 2, 10, 11), (4, 2), padding='same', dilation=3, bias=True),
    Case('valid', (2, 2, 9, 9), (5, 5), padding='valid'),
    Case('valid-k13', (1, 2, 16, 20), (13, 13), padding='valid', bias=True),
    Case('asym-4tuple', (2, 3, 10, 9), (5, 6), padding=(0, 4, 3, 1), bias=True),
    Case('asym-stride2-dil2', (1, 2, 14, 13), (7, 3), stride=2, padding=(5, 1, 0, 3), dilation=2),
    Case('pad-beyond-kernel', (1, 2, 5, 5), (3, 3), padding=(9, 0, 1, 8), bias=True),
)

#: the cuda backend's cases (tests/test_backend_cuda.py; every dtype and layout on a GPU, with bias)
CUDA_CASES = _table(
    Case('k1', (2, 3, 9, 10), (1, 1), bias=True),
    Case('k3', (2, 5, 12, 13), (3, 3), padding=1, bias=True),
    Case('k7', (2, 4, 17, 19), (7, 7), padding=3, bias=True),
    Case('k13', (2, 3, 20, 24), (13, 13), padding=6, bias=True),
    Case('k31', (1, 3, 40, 70), (31, 31), padding=15, bias=True),
    Case('k63', (1, 2, 70, 80), (63, 63), padding=31, bias=True),
    Case('k31_valid', (1, 2, 40, 45), (31, 31), bias=True),
    Case('even_k8_same', (2, 3, 15, 17), (8, 8), padding='same', bias=True),
    Case('rect_5x11', (2, 3, 16, 21), (5, 11), padding=(2, 5), bias=True),
    Case('rect_31x3', (1, 3, 40, 20), (31, 3), padding=(15, 1), bias=True),
    Case('k_gt_h_31_on_7', (2, 5, 7, 7), (31, 31), padding=15, bias=True),
    Case('k_gt_h_13_on_5x9', (1, 3, 5, 9), (13, 13), padding=6, bias=True),
    Case('stride2_k7', (2, 3, 17, 18), (7, 7), stride=2, padding=3, bias=True),
    Case('stride2_k13_rect', (1, 3, 20, 23), (13, 5), stride=(2, 1), padding=(6, 2), bias=True),
    Case('dilation2_k7', (2, 3, 20, 21), (7, 7), padding=6, dilation=2, bias=True),
    Case('dilation_stride', (1, 3, 23, 22), (5, 5), stride=2, padding=4, dilation=(2, 3), bias=True),
    Case('asym_pad', (2, 3, 14, 15), (7, 7), padding=(1, 5, 6, 0), bias=True),
    Case('big_pad', (1, 2, 6, 6), (3, 5), padding=(4, 4, 5, 5), bias=True),
    Case('c_odd_100', (1, 100, 9, 9), (5, 5), padding=2, bias=True),
    Case('tall_130', (1, 2, 130, 20), (9, 9), padding=4, bias=True),
    Case('wide_150', (1, 2, 10, 150), (9, 9), padding=4, bias=True),
    Case('k31_56', (2, 4, 56, 56), (31, 31), padding=15, bias=True),
    Case('big_tile_multi', (1, 3, 150, 140), (31, 31), padding=15, bias=True),
    Case('batch0', (0, 3, 8, 8), (5, 5), padding=2, bias=True),
    Case('batch1', (1, 3, 8, 8), (5, 5), padding=2, bias=True),
    # RepLKNet-31B's later stages (16x16 tile; staging vectors 8 B / 4 B / scalar in fp16/bf16 NCHW)
    Case('k29_28', (2, 3, 28, 28), (29, 29), padding=14, bias=True),
    Case('k27_14', (2, 3, 14, 14), (27, 27), padding=13, bias=True),
    Case('k13_7', (2, 3, 7, 7), (13, 13), padding=6, bias=True),
    # SLaK-style 51 x 5 / 5 x 51 (raw mma.sync kernel, K > 32)
    Case('slak_5x51', (2, 3, 28, 30), (5, 51), padding=(2, 25), bias=True),
    Case('slak_51x5_56', (1, 2, 56, 56), (51, 5), padding=(25, 2), bias=True),
    # K > 64: the wmma tensor-core kernel (fp16/bf16) stays the fast path there
    Case('k71_wmma', (1, 2, 80, 90), (71, 71), padding=35, bias=True),
)

#: tiny shapes for the Triton interpreter (tiles are 16x16: 17..20 gives partial tiles)
TRITON_CPU_CASES = _table(
    Case('k1', (1, 2, 5, 6), (1, 1)),
    Case('k3-bias', (2, 3, 9, 8), (3, 3), padding=1, bias=True),
    Case('k7-partial-tiles', (1, 2, 19, 17), (7, 7), padding=3),
    Case('k13-same', (1, 2, 14, 15), (13, 13), padding='same'),
    Case('k31-gt-H', (1, 2, 9, 11), (31, 31), padding=15),
    Case('k31-partial', (1, 1, 20, 18), (31, 31), padding=15, bias=True),
    Case('k63', (1, 1, 8, 9), (63, 63), padding=31),
    Case('even-k4-same', (2, 3, 9, 10), (4, 4), padding='same', bias=True),
    Case('even-rect-6x8-same', (1, 2, 11, 12), (6, 8), padding='same'),
    Case('rect-3x11', (1, 3, 10, 16), (3, 11), padding=(1, 5)),
    Case('rect-31x5', (1, 2, 12, 10), (31, 5), padding=(15, 2)),
    Case('asym-4tuple', (1, 2, 8, 9), (5, 3), padding=(0, 3, 2, 1)),
    Case('pad-gt-kernel', (1, 2, 6, 7), (3, 3), padding=(5, 4, 6, 2)),
    Case('valid', (1, 2, 9, 9), (5, 5), padding='valid'),
    Case('stride2', (2, 3, 13, 12), (5, 5), stride=2, padding=2),
    Case('stride2-partial', (1, 2, 18, 17), (7, 9), stride=2, padding=(3, 4)),
    Case('stride-1x3', (1, 2, 11, 19), (3, 5), stride=(1, 3), padding=(1, 2)),
    Case('dil2', (1, 3, 15, 14), (3, 3), padding=2, dilation=2),
    Case('dil-2x3-same', (1, 2, 17, 16), (5, 4), padding='same', dilation=(2, 3)),
    Case('stride2-dil2', (1, 2, 15, 16), (3, 3), stride=2, padding=2, dilation=2, bias=True),
    Case('channels_last', (2, 5, 9, 9), (7, 7), padding=3, layout='channels_last'),
    Case('channels_last-k31', (1, 3, 10, 12), (31, 31), padding=15, layout='channels_last'),
    Case('channels_last-stride2', (1, 3, 11, 10), (5, 5), stride=2, padding=2, layout='channels_last'),
    Case('noncontig-slice', (2, 4, 10, 10), (5, 5), padding=2, bias=True, layout='sliced'),
    Case('batch0', (0, 3, 8, 8), (3, 3), padding=1),
    Case('batch1-C1', (1, 1, 7, 7), (7, 7), padding=3),
    # small planes of several images: the aligned forward packs whole planes of one channel into a
    # tile (under the interpreter's BM = 16: output planes of <= 8 rows, N >= 2); N = 3 leaves a
    # partial group, K > H
    Case('packed-7x7-k13', (3, 2, 7, 7), (13, 13), padding=6, bias=True),
    Case('packed-5x6-k31-cl', (4, 3, 5, 6), (31, 31), padding=15, layout='channels_last'),
    Case('packed-stride2', (3, 2, 13, 11), (5, 3), stride=2, padding=(2, 1)),
)

#: realistic shapes for the Triton kernels on a GPU (RepLKNet-31B-like layers, batch 2)
TRITON_CUDA_CASES = _table(
    Case('c32-56-k31', (2, 32, 56, 56), (31, 31), padding=15, bias=True),
    Case('c32-56-k31-cl', (2, 32, 56, 56), (31, 31), padding=15, layout='channels_last'),
    Case('c96-28-k29', (2, 96, 28, 28), (29, 29), padding=14),
    Case('c128-14-k27-cl', (2, 128, 14, 14), (27, 27), padding=13, layout='channels_last'),
    Case('c256-7-k13', (2, 256, 7, 7), (13, 13), padding=6, bias=True),
    Case('c32-56-k31-slice', (2, 32, 56, 56), (31, 31), padding=15, layout='sliced'),
    Case('c32-56-k7-s2', (2, 32, 56, 56), (7, 7), stride=2, padding=3),
    Case('c32-30-k5-dil3-same', (2, 32, 30, 30), (5, 5), padding='same', dilation=3),
    Case('c32-33-even-k8-same', (2, 32, 33, 35), (8, 8), padding='same'),
)

#: the curated feature list for the generic backends (torch, reference, auto; tests/test_functional.py)
GENERIC_CASES = _table(
    Case('k3', (2, 3, 9, 8), (3, 3), padding=1),
    Case('k7-bias', (2, 5, 11, 10), (7, 7), padding=3, bias=True),
    Case('k13-same', (1, 3, 14, 15), (13, 13), padding='same'),
    Case('k31-gt-H', (1, 2, 9, 11), (31, 31), padding=15),
    Case('even-k4-same', (2, 3, 9, 10), (4, 4), padding='same', bias=True),
    Case('rect-3x11', (1, 3, 10, 16), (3, 11), padding=(1, 5)),
    Case('asym-4tuple', (1, 2, 8, 9), (5, 3), padding=(0, 3, 2, 1)),
    Case('stride2', (2, 3, 13, 12), (5, 5), stride=2, padding=2),
    Case('dil2', (1, 3, 15, 14), (3, 3), padding=2, dilation=2),
    Case('valid', (1, 2, 9, 9), (5, 5), padding='valid'),
    Case('batch0', (0, 3, 8, 8), (3, 3), padding=1),
    Case('batch1-C1', (1, 1, 7, 7), (7, 7), padding=3),
    Case('channels_last', (2, 5, 9, 9), (7, 7), padding=3, layout='channels_last'),
    Case('noncontig-slice', (2, 4, 10, 10), (5, 5), padding=2, layout='sliced'),
)


# --------------------------------------------------------------------------------------------------
# PyTorch's fp32 precision flags (tests that set them restore them: conftest's restore_precision_flags)
# --------------------------------------------------------------------------------------------------
PRECISION_FLAGS = [(torch.backends.cudnn.conv, "fp32_precision"), (torch.backends.cudnn.rnn, "fp32_precision"),
                   (torch.backends.cudnn, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision")]


def legacy_tf32_flags():
    """(cudnn.allow_tf32, cuda.matmul.allow_tf32), or None where the legacy getters raise (PyTorch
    makes them raise once the new fp32_precision API was used, until the legacy setters are)."""
    try:
        return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:
        return None
