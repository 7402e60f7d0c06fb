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
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import backends as _backends
from .params import ConvParams

__all__ = ["dwconv2d", "dwconv2d_grad_input", "dwconv2d_grad_weight", "memory_format_of", "EAGER_FAST_PATH",
           "eager_fast_path_ok", "eager_conv", "delegation_key", "remember_delegation", "clear_delegation_cache",
           "delegation_store", "remembered_delegations"]


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
    return _forward_impl(x, weight, bias, stride, padding, dilation, backend)


def _forward_impl(x, weight, bias, stride, padding, dilation, backend: str) -> Tensor:
    """The body of ``lkconv::dwconv2d`` (also run directly by the eager fast path)."""
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
    return _grad_input_impl(grad_out, weight, input_size, stride, padding, dilation, backend)


def _grad_input_impl(grad_out, weight, input_size, stride, padding, dilation, backend: str) -> Tensor:
    """The body of ``lkconv::dwconv2d_grad_input`` (also run directly by the eager fast path)."""
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
    return _grad_weight_impl(grad_out, x, weight_size, stride, padding, dilation, backend)


def _grad_weight_impl(grad_out, x, weight_size, stride, padding, dilation, backend: str) -> Tensor:
    """The body of ``lkconv::dwconv2d_grad_weight`` (also run directly by the eager fast path)."""
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
def _grad_op_setup_context(ctx, inputs, output):
    """Both gradient ops: (grad_out, weight | x, size, stride, padding, dilation, backend)."""
    grad_out, other, _size, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(grad_out, other)
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


dwconv2d_grad_input.register_autograd(_gi_backward, setup_context=_grad_op_setup_context)


def _gw_backward(ctx, g):
    grad_out, x = ctx.saved_tensors
    stride, padding, dilation, backend = ctx.conv_args
    d_go = d_x = None
    if ctx.needs_input_grad[0]:
        d_go = dwconv2d(x, g, None, stride, padding, dilation, backend)
    if ctx.needs_input_grad[1]:
        d_x = dwconv2d_grad_input(grad_out, g, list(x.shape), stride, padding, dilation, backend)
    return d_go, d_x, None, None, None, None, None


dwconv2d_grad_weight.register_autograd(_gw_backward, setup_context=_grad_op_setup_context)


# ------------------------------------------------------------------------------------------------
# forward-mode AD and torch.func
# ------------------------------------------------------------------------------------------------
# torch.library's register_autograd covers reverse mode only: under forward AD the op has no tangent
# rule, and torch.func's transforms refuse the autograd.Function that custom_op builds internally.
# Where either is in play, lkconv.depthwise_conv2d calls the op through this autograd.Function
# instead.  The op is bilinear in (x, weight) plus the bias, so its JVP is made of the same op:
#     d out = conv(dx, w) + conv(x, dw) + db
# and its backward is the usual pair of gradient ops.  Elsewhere (eager reverse mode, torch.compile,
# export, jit.trace) the op is called directly, so graphs keep one lkconv::dwconv2d node.
class _ConvArgs:
    """stride, padding, dilation, backend as ONE opaque (non-pytree) argument: torch.func's
    generated vmap rules flatten list arguments into leaves, which breaks nested transforms
    (``hessian``)."""

    __slots__ = ("stride", "padding", "dilation", "backend")

    def __init__(self, stride, padding, dilation, backend):
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)
        self.backend = backend

    def __iter__(self):  # a, b, c, d = cargs  /  op(..., *cargs)
        return iter((self.stride, self.padding, self.dilation, self.backend))


class DepthwiseConv2dFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, cargs):
        return dwconv2d(x, weight, bias, *cargs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, cargs = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.cargs = cargs
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        a = ctx.cargs
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _call_grad_input(grad, weight, list(x.shape), a)
        if ctx.needs_input_grad[1]:
            gw = _call_grad_weight(grad, x, list(weight.shape), a)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(dim=(0, 2, 3))
        return gx, gw, gb, None

    @staticmethod
    def jvp(ctx, dx, dw, db, _):
        x, weight = ctx.saved_tensors
        a = ctx.cargs
        out = _sum_or_none(
            None if dx is None else _call_conv(dx, weight, None, a),
            None if dw is None else _call_conv(x, dw, None, a),
        )
        if db is not None:
            t = db.view(1, -1, 1, 1)
            shape = _out_shape(x.shape, weight.shape, _params(a.stride, a.padding, a.dilation))
            out = t.expand(shape) if out is None else out + t
        return out


class _GradOpFunction(torch.autograd.Function):
    """What both gradient-op wrappers share: inputs (grad_out, weight | x, size, cargs)."""

    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, other, size, cargs = inputs
        ctx.save_for_backward(grad_out, other)
        ctx.save_for_forward(grad_out, other)
        ctx.size = list(size)
        ctx.cargs = cargs


class _GradInputFunction(_GradOpFunction):
    """grad_input(grad_out, weight): bilinear, so its JVP and VJP are the three ops again (see the
    double-backward note above)."""

    @staticmethod
    def forward(grad_out, weight, input_size, cargs):
        return dwconv2d_grad_input(grad_out, weight, list(input_size), *cargs)

    @staticmethod
    def backward(ctx, g):
        grad_out, weight = ctx.saved_tensors
        a = ctx.cargs
        d_go = _call_conv(g, weight, None, a) if ctx.needs_input_grad[0] else None
        d_w = _call_grad_weight(grad_out, g, list(weight.shape), a) if ctx.needs_input_grad[1] else None
        return d_go, d_w, None, None

    @staticmethod
    def jvp(ctx, d_go, d_w, *_):
        grad_out, weight = ctx.saved_tensors
        a = ctx.cargs
        return _sum_or_none(
            None if d_go is None else _call_grad_input(d_go, weight, ctx.size, a),
            None if d_w is None else _call_grad_input(grad_out, d_w, ctx.size, a),
        )


class _GradWeightFunction(_GradOpFunction):
    """grad_weight(grad_out, x): bilinear, like grad_input."""

    @staticmethod
    def forward(grad_out, x, weight_size, cargs):
        return dwconv2d_grad_weight(grad_out, x, list(weight_size), *cargs)

    @staticmethod
    def backward(ctx, g):
        grad_out, x = ctx.saved_tensors
        a = ctx.cargs
        d_go = _call_conv(x, g, None, a) if ctx.needs_input_grad[0] else None
        d_x = _call_grad_input(grad_out, g, list(x.shape), a) if ctx.needs_input_grad[1] else None
        return d_go, d_x, None, None

    @staticmethod
    def jvp(ctx, d_go, d_x, *_):
        grad_out, x = ctx.saved_tensors
        a = ctx.cargs
        return _sum_or_none(
            None if d_go is None else _call_grad_weight(d_go, x, ctx.size, a),
            None if d_x is None else _call_grad_weight(grad_out, d_x, ctx.size, a),
        )


def _sum_or_none(a, b):
    if a is None:
        return b
    return a if b is None else a + b


class _Sizes:
    """A size list as an opaque argument (see _ConvArgs)."""

    __slots__ = ("v",)

    def __init__(self, v):
        self.v = list(v)

    def __iter__(self):
        return iter(self.v)


def _call_conv(x, weight, bias, a: _ConvArgs):
    if needs_function_wrapper():
        return DepthwiseConv2dFunction.apply(x, weight, bias, a)
    return dwconv2d(x, weight, bias, *a)


def _call_grad_input(grad_out, weight, input_size, a: _ConvArgs):
    if needs_function_wrapper():
        return _GradInputFunction.apply(grad_out, weight, _Sizes(input_size), a)
    return dwconv2d_grad_input(grad_out, weight, list(input_size), *a)


def _call_grad_weight(grad_out, x, weight_size, a: _ConvArgs):
    if needs_function_wrapper():
        return _GradWeightFunction.apply(grad_out, x, _Sizes(weight_size), a)
    return dwconv2d_grad_weight(grad_out, x, list(weight_size), *a)


def depthwise_conv2d_function(x, weight, bias, stride, padding, dilation, backend: str) -> Tensor:
    """The op through :class:`DepthwiseConv2dFunction` (forward AD / torch.func)."""
    return DepthwiseConv2dFunction.apply(x, weight, bias, _ConvArgs(stride, padding, dilation, backend))


def _forward_ad_level() -> int:
    """The innermost active ``forward_ad.dual_level`` (-1: none)."""
    return getattr(_forward_ad, "_current_level", -1)


def needs_function_wrapper() -> bool:
    """True where the op must go through :class:`DepthwiseConv2dFunction`: a ``torch.func``
    transform (jvp, jacfwd, vmap, grad, jacrev, ...) or a ``torch.autograd.forward_ad.dual_level``
    is active.  False under torch.compile / export tracing."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    return _forward_ad_level() >= 0


# vmap rules (torch.func.vmap, and the vmaps inside jacfwd / jacrev / generate_vmap_rule): a vmapped
# depthwise convolution is one depthwise convolution with the vmap dimension folded into the batch
# (only the data is batched) or into the channels (the filter is batched: B*C groups).
def _fold_n(t: Tensor, d) -> Tensor:
    """(..B at d..) (N, C, H, W) -> (B*N, C, H, W)"""
    t = t.movedim(d, 0)
    return t.reshape((t.shape[0] * t.shape[1],) + tuple(t.shape[2:]))


def _fold_c(t: Tensor, d, B: int) -> Tensor:
    """(N, C, H, W) batched at d (or unbatched: broadcast) -> (N, B*C, H, W)"""
    t = t.unsqueeze(1).expand(t.shape[0], B, *t.shape[1:]) if d is None else t.movedim(d, 1)
    return t.reshape((t.shape[0], B * t.shape[2]) + tuple(t.shape[3:]))


def _fold_w(w: Tensor, d, B: int) -> Tensor:
    """(C, 1, KH, KW) batched at d (or broadcast) -> (B*C, 1, KH, KW)"""
    w = w.unsqueeze(0).expand(B, *w.shape) if d is None else w.movedim(d, 0)
    return w.reshape((B * w.shape[1],) + tuple(w.shape[2:]))


def _dwconv2d_vmap(info, in_dims, x, weight, bias, stride, padding, dilation, backend):
    xd, wd, bd = in_dims[0], in_dims[1], in_dims[2]
    B = info.batch_size
    if wd is None and bd is None:
        out = dwconv2d(_fold_n(x, xd), weight, bias, stride, padding, dilation, backend)
        return out.view((B, -1) + tuple(out.shape[1:])), 0
    N = x.shape[1] if xd == 0 else x.shape[0]
    if bias is not None:
        bias = bias.repeat(B) if bd is None else bias.movedim(bd, 0).reshape(-1)
    out = dwconv2d(_fold_c(x, xd, B), _fold_w(weight, wd, B), bias, stride, padding, dilation, backend)
    return out.view((out.shape[0], B, -1) + tuple(out.shape[2:])), 1


def _grad_input_vmap(info, in_dims, grad_out, weight, input_size, stride, padding, dilation, backend):
    gd, wd = in_dims[0], in_dims[1]
    B = info.batch_size
    N, C, H, W = input_size
    if wd is None:
        gx = dwconv2d_grad_input(_fold_n(grad_out, gd), weight, [B * N, C, H, W], stride, padding, dilation, backend)
        return gx.view(B, N, C, H, W), 0
    gx = dwconv2d_grad_input(_fold_c(grad_out, gd, B), _fold_w(weight, wd, B), [N, B * C, H, W], stride,
                             padding, dilation, backend)
    return gx.view(N, B, C, H, W), 1


def _grad_weight_vmap(info, in_dims, grad_out, x, weight_size, stride, padding, dilation, backend):
    gd, xd = in_dims[0], in_dims[1]
    B = info.batch_size
    C, one, KH, KW = weight_size
    gw = dwconv2d_grad_weight(_fold_c(grad_out, gd, B), _fold_c(x, xd, B), [B * C, one, KH, KW], stride,
                              padding, dilation, backend)
    return gw.view(B, C, one, KH, KW), 0


dwconv2d.register_vmap(_dwconv2d_vmap)
dwconv2d_grad_input.register_vmap(_grad_input_vmap)
dwconv2d_grad_weight.register_vmap(_grad_weight_vmap)


# ------------------------------------------------------------------------------------------------
# the eager fast path (CPU): the op's own body without the torch.library dispatch
# ------------------------------------------------------------------------------------------------
# A torch.library custom op costs ~100 µs a call in Python dispatch (measured on the 2-core dev box,
# single-threaded, 1x8x8x8 K=3: the op 252 µs vs the backend's pass alone 136 µs), as much as a
# small kernel's whole run.  In plain eager code on CPU tensors nothing can observe the op node
# itself, so lkconv.depthwise_conv2d runs the op's body directly (the same _forward_impl /
# _grad_input_impl / _grad_weight_impl, the same backend, the same memory-format rule: the same
# results), with a small autograd.Function for the gradients.  Everywhere the op node matters it
# is called as before: torch.compile / export / jit tracing, torch.func transforms and forward AD,
# any TorchDispatchMode or TorchFunctionMode (FakeTensor, FlopCounterMode, make_fx, DebugMode...),
# tensor subclasses, the autograd profiler (which then records lkconv::dwconv2d), CUDA tensors, and
# double backward (create_graph: the backward calls the differentiable gradient ops).
#: set False to always call the ``lkconv::`` ops (runtime knob; docs/architecture.md)
EAGER_FAST_PATH = True

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_fast_path_ok(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """True when :func:`eager_conv` may replace the op call (see the comment above)."""
    if not EAGER_FAST_PATH:
        return False
    if type(x) not in _PLAIN or type(weight) not in _PLAIN or x.device.type != "cpu":
        return False
    if bias is not None and type(bias) not in _PLAIN:
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._autograd._profiler_enabled():
        return False
    return not needs_function_wrapper()


class _EagerConvFunction(torch.autograd.Function):
    """The op's forward and backward without the custom-op dispatch (the eager fast path)."""

    @staticmethod
    def forward(ctx, x, weight, bias, cargs):
        ctx.save_for_backward(x, weight)
        ctx.cargs = cargs
        ctx.has_bias = bias is not None
        return _forward_impl(x, weight, bias, *cargs)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        a = ctx.cargs
        if torch.is_grad_enabled():  # create_graph: the differentiable gradient ops, as the op does
            gx = _call_grad_input(grad, weight, list(x.shape), a) if ctx.needs_input_grad[0] else None
            gw = _call_grad_weight(grad, x, list(weight.shape), a) if ctx.needs_input_grad[1] else None
        else:
            gx = _grad_input_impl(grad, weight, list(x.shape), *a) if ctx.needs_input_grad[0] else None
            gw = _grad_weight_impl(grad, x, list(weight.shape), *a) if ctx.needs_input_grad[1] else None
        gb = grad.sum(dim=(0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def eager_conv(x, weight, bias, stride, padding, dilation, backend: str) -> Tensor:
    """The op's result on the eager fast path (only where :func:`eager_fast_path_ok`)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _EagerConvFunction.apply(x, weight, bias, _ConvArgs(stride, padding, dilation, backend))
    return _forward_impl(x, weight, bias, stride, padding, dilation, backend)


# ------------------------------------------------------------------------------------------------
# the delegated eager CPU call, remembered (CPU, small kernels)
# ------------------------------------------------------------------------------------------------
# Where lkconv.depthwise_conv2d delegates to F.conv2d (every pass PyTorch's own kernel, see
# lkconv.functional), its own work is pure Python: argument normalisation, validation, backend
# resolution, the path table.  ~60 µs in a hot loop on a tiny plane, but ~0.3 ms after a real pass
# (measured, 8x128x56x56 K=3 channels_last forward, 1 thread: F.conv2d 3.88 ms inside the call, the
# call 4.21 ms): a 12 MB convolution evicts the interpreter's code and data from the caches, so every
# Python function of the call runs cold.  A call whose facts were seen before (every fact those steps
# read is in the key below) therefore skips them: one dict lookup, then F.conv2d.  Only successful
# delegated calls are remembered, so validation errors are raised again every time.
_DELEGATED: dict = {}
_DELEGATED_MAX = 512


# The same store in C++ (csrc/cpu_fastpath.cpp, the module lkconv._cpu_fast, built with the package's
# extensions): the check costs ~0.3 us hot and a few us cold instead of the key's 2.5 / 20-70 us, and the
# hit runs at::conv2d (what F.conv2d runs) from C++.  Where it is built, it is the store; without it
# the key below and _DELEGATED are.  The facts are the same (one list: the comment atop that file).
try:
    from . import _cpu_fast as _fast
except ImportError:  # a pure-Python install: the Python store
    _fast = None
_fast_ready = False


def _fast_store():
    """The C++ store, initialised (None: not built, or turned off by setting ``lkconv.ops._fast = None``)."""
    global _fast_ready, _cpu_mod
    if _fast is None:
        return None
    if not _fast_ready:
        if _cpu_mod is None:
            from .backends import cpu as _cpu

            _cpu_mod = _cpu
        _fast.init(torch.Tensor, torch.nn.Parameter, globals(), vars(_backends), vars(_cpu_mod), vars(_forward_ad))
        _fast_ready = True
    return _fast


def delegation_store() -> str:
    """Which store remembers delegated calls: ``"c++"`` (lkconv._cpu_fast) or ``"python"``."""
    return "c++" if _fast is not None else "python"


def remembered_delegations() -> int:
    """How many delegated calls the active store remembers."""
    return _fast.stats()["entries"] if _fast is not None and _fast_ready else len(_DELEGATED)


def clear_delegation_cache() -> None:
    """Forget the remembered delegated calls.  Needed only after changing what the cpu backend's
    rule reads beyond the key: its ``PATH_TABLE`` (edited in place or rebound), its module constants
    (``MEASURED_MAX_TAPS``, ``DIRECT_MAX_CONV_PAD``, ``DIRECT_ATEN_GW_MAX_TAPS``), or a helper of the
    resolution replaced (e.g. a monkeypatched ``choose_path``); everything else a decision reads is in
    the key."""
    _DELEGATED.clear()
    if _fast is not None:
        _fast.clear()


def _plain_arg(v) -> bool:
    """An int, a string or a pair of ints (not bools: True == 1 would share an int's entry)."""
    t = type(v)
    return t is int or t is str or (t is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int)


_cpu_mod = None
_C = torch._C
# any autocast region on (any device: a CUDA one only makes the call not rememberable); one C call,
# ~5x cheaper than torch.is_autocast_enabled("cpu"), which parses its device string every call
_autocast_on = getattr(_C, "_is_any_autocast_enabled", None) or (lambda: torch.is_autocast_enabled("cpu"))


def delegation_key(x, weight, bias, stride, padding, dilation, backend):
    """The facts that decide whether and how a call is delegated to F.conv2d (None: not
    rememberable: not a plain eager 4-D CPU call (every condition of :func:`eager_fast_path_ok`)
    with int / string / int-pair arguments, or autocast on).  Everything the functional's
    resolution reads: the tensors' types, shapes, strides, dtypes and devices, the arguments, which
    gradients autograd will need, the backend asked for and the default one (``use_backend``
    blocks included), the ``auto`` chain, the cpu backend's instance (and its ``path``), its forced
    path and its delegation rule, the intra-op thread count (the path table's thread class).  Kept lean on
    purpose: it runs on every call (the conditions are :func:`eager_fast_path_ok`'s, inlined)."""
    global _cpu_mod
    if not EAGER_FAST_PATH or type(x) not in _PLAIN or type(weight) not in _PLAIN or (
            bias is not None and type(bias) not in _PLAIN):
        return None
    if not ((type(stride) is int or _plain_arg(stride)) and (type(padding) in (int, str) or _plain_arg(padding))
            and (type(dilation) is int or _plain_arg(dilation))) or (backend is not None and type(backend) is not str):
        return None
    shape = x.shape
    if len(shape) != 4 or not x.is_cpu or torch.compiler.is_compiling() or _C._is_tracing():
        return None
    if (_C._len_torch_dispatch_stack() or _C._is_torch_function_mode_enabled() or _C._autograd._profiler_enabled()
            or _C._functorch.peek_interpreter_stack() is not None
            or getattr(_forward_ad, "_current_level", -1) >= 0 or _autocast_on()):
        return None
    if _cpu_mod is None:
        from .backends import cpu as _cpu

        _cpu_mod = _cpu
    inst = _backends._INSTANCES.get("cpu")
    if inst is None:  # the cpu backend not made yet: the call's resolution makes it (a key with None would not recur)
        return None
    rx, rw = x.requires_grad, weight.requires_grad
    rb = bias is not None and bias.requires_grad
    if (rx or rw or rb) and not torch.is_grad_enabled():
        rx = rw = rb = False
    # x is on the CPU (checked above); the weight's and bias's device: is_cpu (a mismatch raises in
    # the first call, which is then not remembered)
    return (shape, x.stride(), x.dtype, weight.shape, weight.dtype, weight.is_cpu,
            None if bias is None else (bias.shape, bias.dtype, bias.is_cpu, rb),
            rx, rw, stride, padding, dilation, backend,
            _backends._OVERRIDES.get(), _backends._default_backend, _backends.AUTO_CHAIN.get("cpu"), inst,
            getattr(type(inst), "delegates_to_torch", None), _cpu_mod.FORCE_PATH, torch.get_num_threads(),
            getattr(inst, "path", None))


def remember_delegation(key, conv_args, call) -> None:
    """Remember that the call ``call`` = (x, weight, bias, stride, padding, dilation, backend), whose
    Python key is ``key``, ran ``F.conv2d(x, w, b, *conv_args[:4])`` with lkconv's output format
    ``conv_args[4]`` (in the C++ store where it is built, else under ``key``)."""
    fast = _fast_store()
    if fast is not None:
        fast.remember(*call, conv_args)
        return
    if key is None:
        return
    if len(_DELEGATED) >= _DELEGATED_MAX:
        _DELEGATED.clear()
    try:
        _DELEGATED[key] = conv_args
    except Exception:  # a state fact that cannot be hashed or compared: not remembered
        pass
