"""``lkconv.depthwise_conv2d``: the user-facing functional.

    lkconv.depthwise_conv2d(x, w, b, stride, padding, dilation)
        == F.conv2d(x, w, b, stride, padding, dilation, groups=x.shape[1])

with ``w`` of shape (m*C, 1, KH, KW) (channel multiplier ``m >= 1``: output channel ``c*m + j``
reads input channel ``c``, as in PyTorch).  Arguments are normalised and validated here, once
(:mod:`lkconv.params`); autocast is applied like ``nn.Conv2d`` (conv2d is a lower-precision op on
both CUDA and CPU autocast); the backend is resolved to a concrete name and the ``lkconv::dwconv2d``
op is called.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Proxy as _Proxy

from . import ops as _ops  # noqa: F401  (registers the torch.library ops)
from .backends import resolve_backend
from .backends.base import output_memory_format
from .params import check_tensors, normalize_params

_is_compiling = torch.compiler.is_compiling  # Dynamo folds it to True: the C++ store stays out of graphs

__all__ = ["depthwise_conv2d"]


def _autocast(x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    dev = x.device.type
    if dev not in ("cuda", "cpu", "xpu", "mps") or not torch.is_autocast_enabled(dev):
        return x, weight, bias
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        if t is None or not t.is_floating_point() or t.dtype == torch.float64:
            return t
        return t.to(dt)

    return cast(x), cast(weight), cast(bias)


def _fx_node(x, weight, bias, stride, padding, dilation, backend):
    """Under ``torch.fx`` symbolic tracing: record one ``call_function`` node for this function (a
    leaf, like ``F.conv2d``), so ``symbolic_trace``, torchvision's ``create_feature_extractor`` and
    FX quantization work on models that call lkconv."""
    proxy = next(p for p in (x, weight, bias) if isinstance(p, _Proxy))
    return proxy.tracer.create_proxy(
        "call_function", depthwise_conv2d, (x, weight, bias, stride, padding, dilation), {"backend": backend}
    )


def _delegates_to_torch(x, weight, params, passes) -> bool:
    """The cpu backend would run PyTorch's own kernels for every pass: F.conv2d itself then
    (``CPUBackend.delegates_to_torch``; ``lkconv.ops.EAGER_FAST_PATH = False`` turns it off too)."""
    from .backends import get_backend

    # a plainly NCHW or channels_last input only: there F.conv2d's output and gradient formats are
    # lkconv's rule (backends.base.output_memory_format); other strides keep the lkconv path
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return False
    if len(passes) > 1 and not (x.is_contiguous() != x.is_contiguous(memory_format=torch.channels_last)):
        return False  # ambiguous strides (e.g. 1x1 planes): the gradients' formats could differ
    return get_backend("cpu").delegates_to_torch(x, tuple(weight.shape), params, passes)


def depthwise_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    backend: Optional[str] = None,
) -> Tensor:
    """Depthwise 2-D convolution with the exact semantics of ``F.conv2d(..., groups=C)``.

    Args:
        x: input (N, C, H, W) or unbatched (C, H, W); float16/bfloat16/float32/float64; NCHW,
            channels_last or any strided view.
        weight: (m*C, 1, KH, KW), any KH, KW >= 1 (odd, even, rectangular, larger than the input);
            ``m >= 1`` is the channel multiplier (``groups`` stays ``C``; output channel ``c*m + j``
            reads input channel ``c``).  The cuda and triton backends decline ``m > 1`` (``auto``
            then runs it on ``torch``); reference, torch and cpu compute it.
        bias: optional (m*C,).
        stride, dilation: int or pair, >= 1.
        padding: int, pair, ``"same"`` (stride 1 only; asymmetric for even kernels, like torch),
            ``"valid"``, or an explicit 4-tuple (top, bottom, left, right).
        backend: ``None`` (the global default, normally ``"auto"``), ``"auto"``, or a backend
            name: ``"cuda"``, ``"triton"``, ``"cpu"``, ``"torch"``, ``"reference"``.

    Returns:
        (N, m*C, Ho, Wo) in x's dtype (or the autocast dtype), channels_last if x is.
    """
    # a delegated eager CPU call seen before: F.conv2d at once (lkconv.ops, "the delegated eager CPU call")
    fast = _ops._fast
    if fast is not None:  # the C++ store (None: not remembered; Dynamo must not trace into it)
        key = None
        if not _is_compiling():
            out = fast.call(x, weight, bias, stride, padding, dilation, backend)
            if out is not None:
                return out
    else:
        key = _ops.delegation_key(x, weight, bias, stride, padding, dilation, backend)
        try:
            hit = None if key is None else _ops._DELEGATED.get(key)
        except Exception:  # a state fact that cannot be hashed or compared (a list chain, an __eq__ that
            key = hit = None  # raises): not rememberable, as in the C++ store
        if hit is not None:
            out = F.conv2d(x, weight, bias, hit[0], hit[1], hit[2], hit[3])
            return out if out.is_contiguous(memory_format=hit[4]) else out.contiguous(memory_format=hit[4])
    if isinstance(x, _Proxy) or isinstance(weight, _Proxy) or isinstance(bias, _Proxy):
        return _fx_node(x, weight, bias, stride, padding, dilation, backend)
    if not isinstance(x, Tensor):
        raise TypeError(f"lkconv: input must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"lkconv: weight must be a torch.Tensor, got {type(weight).__name__}")
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if weight.dim() != 4:
        raise ValueError(
            f"lkconv: weight must have shape (m*C, 1, KH, KW) for a depthwise convolution, got {tuple(weight.shape)}"
        )
    # plain ints: under torch.jit.trace tensor sizes are traced values, and a "same" padding computed
    # from them would reach the op schema as a list of tensors
    params = normalize_params(stride, padding, dilation, (int(weight.shape[2]), int(weight.shape[3])))
    x, weight, bias = _autocast(x, weight, bias)
    check_tensors(x, weight, bias, params)

    passes = ["forward"]
    if torch.is_grad_enabled():
        if x.requires_grad:
            passes.append("grad_input")
        if weight.requires_grad:
            passes.append("grad_weight")
    name = resolve_backend(backend, x, weight, params, passes)
    stride_l, pad_l, dil_l = params.as_lists()
    if _ops.eager_fast_path_ok(x, weight, bias):  # plain eager CPU code: no custom-op dispatch (lkconv.ops)
        if name == "cpu" and _delegates_to_torch(x, weight, params, passes):  # PyTorch's own kernels
            conv_args = (params.stride, (params.padding[0], params.padding[2]), params.dilation, x.shape[1],
                         output_memory_format(x))  # the last: lkconv's output-format rule
            out = F.conv2d(x, weight, bias, *conv_args[:4])
            fmt = conv_args[4]  # a no-op where F.conv2d agrees
            if not unbatched:
                _ops.remember_delegation(key, conv_args, (x, weight, bias, stride, padding, dilation, backend))
            if not out.is_contiguous(memory_format=fmt):
                out = out.contiguous(memory_format=fmt)
        else:
            out = _ops.eager_conv(x, weight, bias, stride_l, pad_l, dil_l, name)
    elif _ops.needs_function_wrapper():  # forward-mode AD / torch.func (see lkconv.ops)
        out = _ops.depthwise_conv2d_function(x, weight, bias, stride_l, pad_l, dil_l, name)
    else:
        out = torch.ops.lkconv.dwconv2d(x, weight, bias, stride_l, pad_l, dil_l, name)
    return out.squeeze(0) if unbatched else out
