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

from typing import Sequence

import torch
import torch.nn.functional as F

from ...params import ConvParams
from ..torch_native import torch_forward, torch_grad_input, torch_grad_weight
from .fft import _compute_dtype, _out_like

__all__ = ["DIRECT_MAX_CONV_PAD", "DIRECT_ATEN_GW_MAX_TAPS", "direct_forward", "direct_grad_input",
           "direct_grad_weight"]

#: oneDNN's depthwise forward falls off a cliff (~10x slower) when the convolution's own padding is
#: >= 7 (measured: K=13 "same" (pad 6) 31 ms, K=15 (pad 7) 581 ms, K=16 pre-padded 58 ms at N=8,
#: C=128, 56x56, 1 thread), so larger paddings are applied by an explicit F.pad first.
DIRECT_MAX_CONV_PAD = 6

#: up to this many taps aten's own weight gradient is faster than the conv-with-grad_out-as-kernel
#: formulation (measured: K=3 6.2 vs 7.2 ms; K=5 146 vs 30 ms, 1 thread CPU time)
DIRECT_ATEN_GW_MAX_TAPS = 9


def direct_forward(x, weight, bias, p: ConvParams) -> torch.Tensor:
    cdt = _compute_dtype(x.dtype)
    bc = None if bias is None else bias.to(cdt)
    out = torch_forward(x.to(cdt), weight.to(cdt), bc, p, max_conv_pad=DIRECT_MAX_CONV_PAD)
    return out.to(x.dtype)


def direct_grad_input(grad_out, weight, input_shape: Sequence[int], p: ConvParams) -> torch.Tensor:
    N, C, H, W = input_shape
    if N == 0 or C == 0:
        return _out_like((N, C, H, W), grad_out, grad_out.dtype).zero_()
    cdt = _compute_dtype(grad_out.dtype)
    gx = torch_grad_input(grad_out.to(cdt), weight.to(cdt), input_shape, p)
    return gx.to(grad_out.dtype)


def direct_grad_weight(grad_out, x, weight_shape: Sequence[int], p: ConvParams) -> torch.Tensor:
    """grad_weight as a *forward* depthwise convolution in which grad_out is the kernel:

        gw[c, a, b] = sum_n sum_{i,j} xpad[n, c, a*dil_h + i*sh, b*dil_w + j*sw] * g[n, c, i, j]

    i.e. a valid convolution of xpad (one group per (n, c)) with the (Ho, Wo) kernel g, kernel
    dilation = stride, output stride = dilation, cropped to (KH, KW) and summed over n.  oneDNN
    runs this 4-15x faster than aten.convolution_backward's weight gradient (measured, see
    docs/cpu_backend.md)."""
    C, _, KH, KW = weight_shape
    N = x.shape[0]
    cdt = _compute_dtype(x.dtype)
    if N == 0 or C == 0:
        return torch.zeros(tuple(weight_shape), dtype=x.dtype, device=x.device)
    if KH * KW <= DIRECT_ATEN_GW_MAX_TAPS:
        return torch_grad_weight(grad_out.to(cdt), x.to(cdt), weight_shape, p).to(x.dtype)
    t, b, l, r = p.padding
    Ho, Wo = grad_out.shape[2], grad_out.shape[3]
    xp = F.pad(x.to(cdt), (l, r, t, b)).contiguous()
    Hp, Wp = xp.shape[2], xp.shape[3]
    g = grad_out.to(cdt).contiguous().view(N * C, 1, Ho, Wo)
    gw = F.conv2d(xp.view(1, N * C, Hp, Wp), g, None, p.dilation, 0, p.stride, groups=N * C)
    gw = gw.view(N, C, gw.shape[2], gw.shape[3])[:, :, :KH, :KW].sum(0)
    return gw.to(x.dtype).view(C, 1, KH, KW)
