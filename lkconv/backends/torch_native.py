"""The ``torch`` backend: PyTorch's own convolution (cuDNN / MKLDNN / native), for comparison and as
the last resort of ``auto``.  Asymmetric padding ("same" with an even kernel) is done with an
explicit ``F.pad`` first, as ``F.conv2d(padding="same")`` itself does."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Backend


def _split_pad(p):
    """(explicit pad for F.pad or None, symmetric padding for the conv)"""
    t, b, l, r = p.padding
    if t == b and l == r:
        return None, (t, l)
    return (l, r, t, b), (0, 0)


class TorchBackend(Backend):
    name = "torch"
    description = "PyTorch's own F.conv2d(groups=C) (cuDNN / oneDNN / native); baseline and fallback"

    def forward(self, x, weight, bias, p):
        pre, pad = _split_pad(p)
        if pre is not None:
            x = F.pad(x, pre)
        return F.conv2d(x, weight, bias, p.stride, pad, p.dilation, groups=x.shape[1])

    def grad_input(self, grad_out, weight, input_shape, p):
        N, C, H, W = input_shape
        pre, pad = _split_pad(p)
        if pre is not None:
            l, r, t, b = pre
            shape = (N, C, H + t + b, W + l + r)
        else:
            shape = (N, C, H, W)
        dummy = grad_out.new_empty(1).expand(shape)
        gx = torch.ops.aten.convolution_backward(
            grad_out, dummy, weight, None, list(p.stride), list(pad), list(p.dilation),
            False, [0, 0], C, [True, False, False],
        )[0]
        if pre is not None:
            gx = gx[:, :, t : t + H, l : l + W]
        return gx

    def grad_weight(self, grad_out, x, weight_shape, p):
        pre, pad = _split_pad(p)
        if pre is not None:
            x = F.pad(x, pre)
        dummy = x.new_empty(1).expand(tuple(weight_shape))
        return torch.ops.aten.convolution_backward(
            grad_out, x, dummy, None, list(p.stride), list(pad), list(p.dilation),
            False, [0, 0], x.shape[1], [False, True, False],
        )[1]
