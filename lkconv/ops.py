"""The op contract: the ``lkconv::`` torch.library ops, their fake kernels and autograd.

Three ops, so that the backward is itself made of ops (compile- and export-safe):

* ``lkconv::dwconv2d(x, weight, bias?, stride, padding, dilation, backend) -> out``
* ``lkconv::dwconv2d_grad_input(grad_out, weight, input_size, stride, padding, dilation, backend)``
* ``lkconv::dwconv2d_grad_weight(grad_out, x, weight_size, stride, padding, dilation, backend)``

``padding`` is always the explicit 4-list (top, bottom, left, right); ``backend`` is a concrete
backend name, resolved by :mod:`lkconv.functional` before the op is called (never "auto"), so a
compiled graph always runs the same kernel.  The bias gradient is a plain ``sum`` in the backward.

Memory format: forward output follows ``x`` (channels_last in -> channels_last out, as
``F.conv2d``); grad_input follows ``grad_out``; grad_weight is contiguous.  The rule lives in
:func:`lkconv.backends.base.output_memory_format` (``memory_format_of`` here) and is applied to
every backend's result, so fake and real strides agree.  Every op gets its backend from
:func:`lkconv.backends.require`.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import backends as _backends
from .params import ConvParams

__all__ = ["dwconv2d", "dwconv2d_grad_input", "dwconv2d_grad_weight", "memory_format_of"]


#: the output-format rule (channels_last in -> channels_last out); its one home is backends/base.py
memory_format_of = _backends.output_memory_format


def _params(stride, padding, dilation) -> ConvParams:
    return ConvParams(tuple(stride), tuple(padding), tuple(dilation))


def _require(name: str, pass_: str, data: Tensor, other: Optional[Tensor], weight_dtype,
             input_shape, weight_shape, p: ConvParams):
    """The backend for one pass of a direct op call (through :func:`lkconv.backends.require`)."""
    if other is not None and other.device != data.device:
        raise ValueError(f"lkconv: the tensors of {pass_} are on different devices "
                         f"({data.device} and {other.device})")
    req = _backends.Request(pass_, data.device, data.dtype, weight_dtype, tuple(input_shape), tuple(weight_shape), p)
    return _backends.require(name, req)


def _out_shape(x_shape, w_shape, p: ConvParams):
    N, C, H, W = x_shape
    ho, wo = p.out_size(H, W, w_shape[2], w_shape[3])
    return (N, w_shape[0], ho, wo)  # m*C output channels (channel multiplier m)


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("lkconv::dwconv2d", mutates_args=())
def dwconv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    backend: str,
) -> Tensor:
    p = _params(stride, padding, dilation)
    inst = _require(backend, "forward", x, weight, weight.dtype, x.shape, weight.shape, p)
    out = inst.forward(x, weight, bias, p)
    return out.contiguous(memory_format=memory_format_of(x))


@dwconv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, backend):
    shape = _out_shape(x.shape, weight.shape, _params(stride, padding, dilation))
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


# ------------------------------------------------------------------------------------------------
# grad_input
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("lkconv::dwconv2d_grad_input", mutates_args=())
def dwconv2d_grad_input(
    grad_out: Tensor,
    weight: Tensor,
    input_size: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    backend: str,
) -> Tensor:
    p = _params(stride, padding, dilation)
    inst = _require(backend, "grad_input", grad_out, weight, weight.dtype, input_size, weight.shape, p)
    gx = inst.grad_input(grad_out, weight, tuple(input_size), p)
    return gx.contiguous(memory_format=memory_format_of(grad_out))


@dwconv2d_grad_input.register_fake
def _(grad_out, weight, input_size, stride, padding, dilation, backend):
    return torch.empty(tuple(input_size), dtype=grad_out.dtype, device=grad_out.device, memory_format=memory_format_of(grad_out))


# ------------------------------------------------------------------------------------------------
# grad_weight
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("lkconv::dwconv2d_grad_weight", mutates_args=())
def dwconv2d_grad_weight(
    grad_out: Tensor,
    x: Tensor,
    weight_size: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    backend: str,
) -> Tensor:
    p = _params(stride, padding, dilation)
    inst = _require(backend, "grad_weight", x, grad_out, None, x.shape, weight_size, p)
    gw = inst.grad_weight(grad_out, x, tuple(weight_size), p)
    return gw.contiguous()


@dwconv2d_grad_weight.register_fake
def _(grad_out, x, weight_size, stride, padding, dilation, backend):
    return x.new_empty(tuple(weight_size))


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv_args = (list(stride), list(padding), list(dilation), backend)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    stride, padding, dilation, backend = ctx.conv_args
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = dwconv2d_grad_input(grad, weight, list(x.shape), stride, padding, dilation, backend)
    if ctx.needs_input_grad[1]:
        gw = dwconv2d_grad_weight(grad, x, list(weight.shape), stride, padding, dilation, backend)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = grad.sum(dim=(0, 2, 3))
    return gx, gw, gb, None, None, None, None


dwconv2d.register_autograd(_backward, setup_context=_setup_context)


# Double (and higher) backward.  With A_w the depthwise conv x -> conv(x, w), both gradient ops are
# bilinear:  grad_input(go, w) = A_w^T go  and  <grad_weight(go, x), v> = <go, conv(x, v)>.  So their
# vector-Jacobian products are the three ops again, on the same backend:
#   grad_input:   d/d go = conv(g, w)              d/d w = grad_weight(go, x=g)
#   grad_weight:  d/d go = conv(x, g)              d/d x = grad_input(go, w=g)
# where g is the incoming gradient (shaped like the op's output).  Autograd composes these to any order.
def _gi_setup_context(ctx, inputs, output):
    grad_out, weight, input_size, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(grad_out, weight)
    ctx.conv_args = (list(stride), list(padding), list(dilation), backend)


def _gi_backward(ctx, g):
    grad_out, weight = ctx.saved_tensors
    stride, padding, dilation, backend = ctx.conv_args
    d_go = d_w = None
    if ctx.needs_input_grad[0]:
        d_go = dwconv2d(g, weight, None, stride, padding, dilation, backend)
    if ctx.needs_input_grad[1]:
        d_w = dwconv2d_grad_weight(grad_out, g, list(weight.shape), stride, padding, dilation, backend)
    return d_go, d_w, None, None, None, None, None


dwconv2d_grad_input.register_autograd(_gi_backward, setup_context=_gi_setup_context)


def _gw_setup_context(ctx, inputs, output):
    grad_out, x, weight_size, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(grad_out, x)
    ctx.conv_args = (list(stride), list(padding), list(dilation), backend)


def _gw_backward(ctx, g):
    grad_out, x = ctx.saved_tensors
    stride, padding, dilation, backend = ctx.conv_args
    d_go = d_x = None
    if ctx.needs_input_grad[0]:
        d_go = dwconv2d(x, g, None, stride, padding, dilation, backend)
    if ctx.needs_input_grad[1]:
        d_x = dwconv2d_grad_input(grad_out, g, list(x.shape), stride, padding, dilation, backend)
    return d_go, d_x, None, None, None, None, None


dwconv2d_grad_weight.register_autograd(_gw_backward, setup_context=_gw_setup_context)
