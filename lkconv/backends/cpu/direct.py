"""The direct path of the ``cpu`` backend: PyTorch's own convolution (oneDNN for fp32) through the
``torch`` backend's passes (:mod:`lkconv.backends.torch_native`), where it is fast:

* forward: ``F.conv2d``, with an explicit ``F.pad`` when the padding is asymmetric or larger than
  :data:`DIRECT_MAX_CONV_PAD` (oneDNN's padding cliff);
* grad_input: ``aten.convolution_backward``;
* grad_weight: for more than :data:`DIRECT_ATEN_GW_MAX_TAPS` taps, a *forward* depthwise
  convolution of the padded input with grad_out as the kernel (:func:`direct_grad_weight`), 4-20x
  faster than aten's own weight gradient; aten's below.

fp16/bf16 are computed in fp32 and cast once at the end.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ...params import ConvParams
from ..base import output_memory_format
from ..torch_native import torch_forward, torch_grad_input, torch_grad_weight
from .fft import _compute_dtype, _out_like

__all__ = ["DIRECT_MAX_CONV_PAD", "DIRECT_ATEN_GW_MAX_TAPS", "direct_forward", "direct_grad_input",
           "direct_grad_weight", "LAYOUTS", "layout_of", "to_layout", "layout_forward", "layout_grad_input",
           "layout_grad_weight"]

# Padding that only ever meets zeros is never materialised: every pass first crops the taps, input
# rows and padding that cannot meet a real input pixel (_crop), so padding/dilation 2**16 on a 5x6
# plane costs nothing (F.conv2d's own CPU path would run it; an explicit F.pad would not).

#: oneDNN's depthwise forward falls off a cliff (~10x slower) when the convolution's own padding is
#: >= 7 (measured: K=13 "same" (pad 6) 31 ms, K=15 (pad 7) 581 ms, K=16 pre-padded 58 ms at N=8,
#: C=128, 56x56, 1 thread), so larger paddings are applied by an explicit F.pad first.
DIRECT_MAX_CONV_PAD = 6

#: up to this many taps aten's own weight gradient is faster than the conv-with-grad_out-as-kernel
#: formulation (measured: K=3 6.2 vs 7.2 ms; K=5 146 vs 30 ms, 1 thread CPU time)
DIRECT_ATEN_GW_MAX_TAPS = 9


def _live_axis(size: int, p0: int, k: int, dil: int, out: int, stride: int):
    """Crop of one axis to the taps that can meet a real input pixel.

    Tap ``a`` reads input rows ``i*stride + a*dil - p0`` for ``i < out``; it can only meet the input
    when that range overlaps ``[0, size)``, which holds for a contiguous range of taps
    ``[a_lo, a_hi]``.  Returns None when no tap meets the input, else ``(taps, rows, pad_lo,
    pad_hi)``: the kept taps, the input rows still read, and the padding still needed around them
    (at most ``(out-1)*stride`` per side), which give the same ``out`` outputs."""
    a_lo = max(0, -(((out - 1) * stride - p0) // dil))  # ceil((p0 - (out-1)*stride) / dil)
    a_hi = min(k - 1, (size - 1 + p0) // dil)
    if a_lo > a_hi:
        return None
    q0 = p0 - a_lo * dil  # the padding in front of the first kept tap (negative: skip input rows)
    need = (out - 1) * stride + (a_hi - a_lo) * dil + 1  # padded length the kept taps read
    u0, u1 = max(0, -q0), min(size, need - q0)
    return slice(a_lo, a_hi + 1), slice(u0, u1), max(0, q0), max(0, need - q0 - size)


@functools.lru_cache(maxsize=1024)
def _crop(in_hw, k_hw, out_hw, p: ConvParams):
    """The geometry of :func:`_live_axis` on both axes: None when nothing changes, "empty" when no
    tap meets the input, else ``(tap_rows, tap_cols, in_rows, in_cols, params)``.  Cached (pure
    integer geometry of hashable arguments; every pass of every call asks it)."""
    rows = _live_axis(in_hw[0], p.padding[0], k_hw[0], p.dilation[0], out_hw[0], p.stride[0])
    cols = _live_axis(in_hw[1], p.padding[2], k_hw[1], p.dilation[1], out_hw[1], p.stride[1])
    if rows is None or cols is None:
        return "empty"
    (tr, ir, pt, pb), (tc, ic, pl, pr) = rows, cols
    same = (tr == slice(0, k_hw[0]) and tc == slice(0, k_hw[1]) and ir == slice(0, in_hw[0])
            and ic == slice(0, in_hw[1]) and (pt, pb, pl, pr) == tuple(p.padding))
    if same:
        return None
    return tr, tc, ir, ic, ConvParams(p.stride, (pt, pb, pl, pr), p.dilation)


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def direct_forward(x, weight, bias, p: ConvParams, max_conv_pad: Optional[int] = DIRECT_MAX_CONV_PAD) -> torch.Tensor:
    """``F.conv2d(groups=C)`` on the live part of the input; padding above ``max_conv_pad`` (None:
    no limit, PyTorch's own padding) is applied by an explicit ``F.pad`` first."""
    out_hw = p.out_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3])
    c = _crop(tuple(x.shape[2:]), tuple(weight.shape[2:]), out_hw, p)
    if c == "empty":  # no tap meets the input: the output is the bias
        out = _out_like((x.shape[0], weight.shape[0]) + tuple(out_hw), x, x.dtype)
        return out.zero_() if bias is None else out.copy_(bias.view(1, -1, 1, 1).expand_as(out))
    if c is not None:
        tr, tc, ir, ic, pc = c
        return direct_forward(x[:, :, ir, ic], weight[:, :, tr, tc], bias, pc, max_conv_pad)
    cdt = _compute_dtype(x.dtype)
    bc = None if bias is None else _to(bias, cdt)
    out = torch_forward(_to(x, cdt), _to(weight, cdt), bc, p, max_conv_pad=max_conv_pad)
    return _to(out, x.dtype)


def direct_grad_input(grad_out, weight, input_shape: Sequence[int], p: ConvParams) -> torch.Tensor:
    N, C, H, W = input_shape
    if N == 0 or C == 0:
        return _out_like((N, C, H, W), grad_out, grad_out.dtype).zero_()
    c = _crop((H, W), tuple(weight.shape[2:]), tuple(grad_out.shape[2:]), p)
    if c is not None:  # input pixels no kept tap reads get a zero gradient
        gx = _out_like((N, C, H, W), grad_out, grad_out.dtype).zero_()
        if c != "empty":
            tr, tc, ir, ic, pc = c
            sub = (N, C, ir.stop - ir.start, ic.stop - ic.start)
            gx[:, :, ir, ic] = direct_grad_input(grad_out, weight[:, :, tr, tc], sub, pc)
        return gx
    cdt = _compute_dtype(grad_out.dtype)
    gx = torch_grad_input(_to(grad_out, cdt), _to(weight, cdt), input_shape, p)
    return _to(gx, grad_out.dtype)


def direct_grad_weight(grad_out, x, weight_shape: Sequence[int], p: ConvParams,
                       aten_max_taps: Optional[int] = DIRECT_ATEN_GW_MAX_TAPS) -> torch.Tensor:
    """grad_weight as a *forward* depthwise convolution in which grad_out is the kernel:

        gw[c, a, b] = sum_n sum_{i,j} xpad[n, c, a*dil_h + i*sh, b*dil_w + j*sw] * g[n, c, i, j]

    i.e. a valid convolution of xpad (one group per (n, c)) with the (Ho, Wo) kernel g, kernel
    dilation = stride, output stride = dilation, cropped to (KH, KW) and summed over n.  oneDNN
    runs this 4-15x faster than aten.convolution_backward's weight gradient (measured, see
    docs/cpu_backend.md).  Up to ``aten_max_taps`` taps (None: always) aten's own weight gradient
    is used instead."""
    C, _, KH, KW = weight_shape
    N = x.shape[0]
    cdt = _compute_dtype(x.dtype)
    if N == 0 or C == 0:
        return torch.zeros(tuple(weight_shape), dtype=x.dtype, device=x.device)
    c = _crop(tuple(x.shape[2:]), (KH, KW), tuple(grad_out.shape[2:]), p)
    if c is not None:  # taps that never meet the input get a zero gradient
        gw = torch.zeros(tuple(weight_shape), dtype=x.dtype, device=x.device)
        if c != "empty":
            tr, tc, ir, ic, pc = c
            sub = (C, 1, tr.stop - tr.start, tc.stop - tc.start)
            gw[:, :, tr, tc] = direct_grad_weight(grad_out, x[:, :, ir, ic], sub, pc, aten_max_taps)
        return gw
    if aten_max_taps is None or KH * KW <= aten_max_taps:
        return _to(torch_grad_weight(_to(grad_out, cdt), _to(x, cdt), weight_shape, p), x.dtype)
    t, b, l, r = p.padding
    Ho, Wo = grad_out.shape[2], grad_out.shape[3]
    xp = F.pad(x.to(cdt), (l, r, t, b)).contiguous()
    Hp, Wp = xp.shape[2], xp.shape[3]
    g = grad_out.to(cdt).contiguous().view(N * C, 1, Ho, Wo)
    gw = F.conv2d(xp.view(1, N * C, Hp, Wp), g, None, p.dilation, 0, p.stride, groups=N * C)
    gw = gw.view(N, C, gw.shape[2], gw.shape[3])[:, :, :KH, :KW].sum(0)
    return gw.to(x.dtype).view(C, 1, KH, KW)


# ------------------------------------------------------------------------------------------------
# PyTorch's own kernels in a chosen memory format (the "nchw" / "cl" paths of the cpu backend)
# ------------------------------------------------------------------------------------------------
#: the memory formats the cpu backend can run PyTorch's kernels in
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


def layout_of(t: torch.Tensor) -> str:
    """"cl" when ``t`` is channels_last (and not also NCHW-contiguous), else "nchw" (strided views
    included): the layout class of the routing table."""
    return "cl" if output_memory_format(t) == torch.channels_last else "nchw"


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` in ``layout`` ("nchw" / "cl"); no copy when it already is."""
    fmt = LAYOUTS[layout]
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def layout_forward(x, weight, bias, p: ConvParams, layout: str) -> torch.Tensor:
    """PyTorch's forward (oneDNN for fp32) with ``x`` in ``layout``, PyTorch's own padding (no
    explicit pre-padding); dead padding cropped and fp16/bf16 upcast as on the direct path.  The
    op converts the result to ``x``'s format."""
    return direct_forward(to_layout(x, layout), weight, bias, p, max_conv_pad=None)


def layout_grad_input(grad_out, weight, input_shape: Sequence[int], p: ConvParams, layout: str) -> torch.Tensor:
    """``aten.convolution_backward``'s input gradient with ``grad_out`` in ``layout``."""
    return direct_grad_input(to_layout(grad_out, layout), weight, input_shape, p)


def layout_grad_weight(grad_out, x, weight_shape: Sequence[int], p: ConvParams, layout: str) -> torch.Tensor:
    """``aten.convolution_backward``'s weight gradient with ``grad_out`` and ``x`` in ``layout``."""
    return direct_grad_weight(to_layout(grad_out, layout), to_layout(x, layout), weight_shape, p, aten_max_taps=None)
