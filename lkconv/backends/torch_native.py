"""The ``torch`` backend: PyTorch's own convolution (cuDNN / MKLDNN / native), for comparison and as
the last resort of ``auto``.  Asymmetric padding ("same" with an even kernel) is done with an
explicit ``F.pad`` first, as ``F.conv2d(padding="same")`` itself does.

The three module-level functions are the passes; the ``cpu`` backend's direct path calls them too
(with fp16/bf16 upcast and its oneDNN padding rule, :mod:`lkconv.backends.cpu.direct`)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import Backend, output_memory_format, split_pad


def torch_forward(x, weight, bias, p, max_conv_pad: Optional[int] = None):
    """``F.conv2d(groups=C)``; padding larger than ``max_conv_pad`` (None: no limit) is applied by an
    explicit ``F.pad`` first."""
    pre, pad = split_pad(p)
    if pre is None and max_conv_pad is not None and max(pad) > max_conv_pad:
        pre, pad = (pad[1], pad[1], pad[0], pad[0]), (0, 0)
    if pre is not None:
        x = F.pad(x, pre)
    return F.conv2d(x, weight, bias, p.stride, pad, p.dilation, groups=x.shape[1])


def torch_grad_input(grad_out, weight, input_shape, p):
    """``aten.convolution_backward``'s input gradient (on the padded plane, cropped, when the
    padding is asymmetric)."""
    N, C, H, W = input_shape
    pre, pad = split_pad(p)
    if pre is not None:
        l, r, t, b = pre
        shape = (N, C, H + t + b, W + l + r)
    else:
        shape = (N, C, H, W)
    # aten reads only the input's shape and (on CPU) its memory format, which picks oneDNN's layout;
    # an expanded 1-element dummy reads as NCHW, so a channels_last grad_out was converted and
    # computed in NCHW, 2-4x slower (measured).  On CPU: grad_out itself when it has the input's
    # shape (stride 1, "same": no allocation; its values are never read for the input gradient),
    # else, for a channels_last grad_out, an uninitialised channels_last buffer; elsewhere (and for
    # NCHW) the 1-element dummy.
    fmt = output_memory_format(grad_out)
    if grad_out.device.type == "cpu" and tuple(grad_out.shape) == tuple(shape):
        dummy = grad_out
    elif grad_out.device.type == "cpu" and fmt == torch.channels_last:
        dummy = torch.empty(shape, dtype=grad_out.dtype, device=grad_out.device, memory_format=fmt)
    else:
        dummy = grad_out.new_empty(1).expand(shape)
    gx = torch.ops.aten.convolution_backward(
        grad_out, dummy, weight, None, list(p.stride), list(pad), list(p.dilation),
        False, [0, 0], C, [True, False, False],
    )[0]
    if pre is not None:
        gx = gx[:, :, t : t + H, l : l + W]
    return gx


def torch_grad_weight(grad_out, x, weight_shape, p):
    """``aten.convolution_backward``'s weight gradient."""
    pre, pad = split_pad(p)
    if pre is not None:
        x = F.pad(x, pre)
    dummy = x.new_empty(1).expand(tuple(weight_shape))  # aten reads only its shape
    return torch.ops.aten.convolution_backward(
        grad_out, x, dummy, None, list(p.stride), list(pad), list(p.dilation),
        False, [0, 0], x.shape[1], [False, True, False],
    )[1]


class TorchBackend(Backend):
    name = "torch"
    description = "PyTorch's own F.conv2d(groups=C) (cuDNN / oneDNN / native); baseline and fallback"

    def forward(self, x, weight, bias, p):
        return torch_forward(x, weight, bias, p)

    def grad_input(self, grad_out, weight, input_shape, p):
        return torch_grad_input(grad_out, weight, input_shape, p)

    def grad_weight(self, grad_out, x, weight_shape, p):
        return torch_grad_weight(grad_out, x, weight_shape, p)
