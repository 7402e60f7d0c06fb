"""Benchmark providers: who computes the convolution.

A provider turns (pass, tensors) into a zero-argument callable that computes that pass and returns
its outputs, so the same callable is first checked by the correctness gate and then timed:

* ``forward``      -> (out,)            under ``torch.no_grad()``
* ``grad_input``   -> (grad_input,)     the isolated data-gradient op
* ``grad_weight``  -> (grad_weight,)    the isolated weight-gradient op
* ``all``          -> (out, grad_input, grad_weight): forward + backward through autograd

Providers: ``torch`` (F.conv2d(groups=C), NCHW: PyTorch's default path), ``torch-cl`` (the same in
channels_last: cuDNN's NHWC kernels on GPU, oneDNN on CPU), ``lkconv-<backend>`` for every lkconv
backend (cpu, cuda, triton, ...), and ``replknet`` (the original RepLKNet extension, when its module
``_depthwise_conv2d_implicit_gemm_C`` / ``depthwise_conv2d_implicit_gemm`` is importable).
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .shapes import Shape

__all__ = ["DTYPES", "Provider", "TorchProvider", "LkconvProvider", "ReplknetProvider", "make_provider",
           "default_providers", "ALL_PROVIDER_NAMES"]

#: dtype modes: name -> (storage dtype, TF32 allowed)
DTYPES: Dict[str, Tuple[torch.dtype, bool]] = {
    "fp32": (torch.float32, False),
    "tf32": (torch.float32, True),
    "fp16": (torch.float16, False),
    "bf16": (torch.bfloat16, False),
    "fp64": (torch.float64, False),
}

Outputs = Tuple[torch.Tensor, ...]


class Provider:
    """Base class.  ``name`` is the column/series label."""

    name = "?"
    #: run on channels_last x and grad_out (the ``-cl`` providers)
    channels_last = False

    def unavailable(self, device: torch.device) -> Optional[str]:
        """None when this provider can run on ``device`` at all, else why not."""
        return None

    def supports(self, shape: Shape, dtype: torch.dtype, pass_: str, device: torch.device) -> Optional[str]:
        """None when the provider computes this case, else the reason it declines."""
        return None

    def prepare(self, x, w, g):
        """Convert the benchmark tensors to the provider's layout (done once, outside timing)."""
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last), w, g.contiguous(memory_format=torch.channels_last)
        return x, w, g

    def make(self, pass_: str, x, w, g, shape: Shape) -> Callable[[], Outputs]:
        raise NotImplementedError


def _all_pass(conv: Callable, x, w, g) -> Callable[[], Outputs]:
    xr = x.detach().requires_grad_(True)
    wr = w.detach().requires_grad_(True)

    def fn():
        out = conv(xr, wr)
        gx, gw = torch.autograd.grad(out, (xr, wr), g)
        return out.detach(), gx, gw

    return fn


class TorchProvider(Provider):
    """PyTorch's own F.conv2d(groups=C); ``channels_last`` converts x and grad_out (cuDNN NHWC)."""

    def __init__(self, channels_last: bool = False):
        self.channels_last = channels_last
        self.name = "torch-cl" if channels_last else "torch"

    def supports(self, shape, dtype, pass_, device):
        if device.type == "cpu" and dtype in (torch.float16,):
            return "torch has no fast fp16 depthwise convolution on CPU"
        return None

    def make(self, pass_, x, w, g, shape):
        C = shape.c
        pad = list(shape.padding)
        if pass_ == "forward":
            def fn():
                with torch.no_grad():
                    return (F.conv2d(x, w, None, 1, pad, 1, groups=C),)
            return fn
        if pass_ == "grad_input":
            def fn():
                return (torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], pad, [1, 1], False, [0, 0], C,
                                                           [True, False, False])[0],)
            return fn
        if pass_ == "grad_weight":
            def fn():
                return (torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], pad, [1, 1], False, [0, 0], C,
                                                           [False, True, False])[1],)
            return fn
        return _all_pass(lambda a, b: F.conv2d(a, b, None, 1, pad, 1, groups=C), x, w, g)


class LkconvProvider(Provider):
    """``lkconv.depthwise_conv2d(..., backend=name)`` and the lkconv grad ops, as users call them."""

    def __init__(self, backend: str, channels_last: bool = False):
        self.backend = backend
        self.channels_last = channels_last
        self.name = f"lkconv-{backend}" + ("-cl" if channels_last else "")

    def unavailable(self, device):
        import lkconv

        status = lkconv.backend_status()
        if self.backend not in status:
            return f"no lkconv backend named {self.backend!r} (registered: {sorted(status)})"
        return status[self.backend]

    def supports(self, shape, dtype, pass_, device):
        from lkconv.backends import BackendError, resolve_backend
        from lkconv.params import normalize_params

        p = normalize_params(1, shape.padding, 1, (shape.kh, shape.kw))
        # zero-storage stand-ins: check() looks at dtype/device/shape only
        x = torch.empty(1, dtype=dtype, device=device).expand(shape.n, shape.c, shape.h, shape.w)
        w = torch.empty(1, dtype=dtype, device=device).expand(shape.c, 1, shape.kh, shape.kw)
        passes = ("forward", "grad_input", "grad_weight") if pass_ == "all" else (pass_,)
        try:
            resolve_backend(self.backend, x, w, p, passes)
        except (BackendError, ValueError, TypeError) as e:
            return str(e).replace("lkconv: ", "")
        return None

    def make(self, pass_, x, w, g, shape):
        import lkconv
        import lkconv.ops  # noqa: F401  (registers torch.ops.lkconv.*)

        name = self.backend
        ph, pw = shape.padding
        pad4 = [ph, ph, pw, pw]
        pad = (ph, pw)
        if pass_ == "forward":
            def fn():
                with torch.no_grad():
                    return (lkconv.depthwise_conv2d(x, w, None, 1, pad, 1, backend=name),)
            return fn
        if pass_ == "grad_input":
            xs = list(x.shape)

            def fn():
                return (torch.ops.lkconv.dwconv2d_grad_input(g, w, xs, [1, 1], pad4, [1, 1], name),)
            return fn
        if pass_ == "grad_weight":
            ws = list(w.shape)

            def fn():
                return (torch.ops.lkconv.dwconv2d_grad_weight(g, x, ws, [1, 1], pad4, [1, 1], name),)
            return fn
        return _all_pass(lambda a, b: lkconv.depthwise_conv2d(a, b, None, 1, pad, 1, backend=name), x, w, g)


class ReplknetProvider(Provider):
    """The original RepLKNet implicit-GEMM extension (MegEngine/cutlass based), when installed.

    Raw functions ``forward_fp32/backward_data_fp32/backward_filter_fp32`` (and ``_fp16``) of
    ``_depthwise_conv2d_implicit_gemm_C`` are used when present; otherwise the module
    ``depthwise_conv2d_implicit_gemm.DepthWiseConv2dImplicitGEMM`` (forward and all passes only).
    It supports CUDA, fp32/fp16, NCHW, square odd kernels with padding K//2, stride 1.
    """

    name = "replknet"
    _MODULES = ("_depthwise_conv2d_implicit_gemm_C", "depthwise_conv2d_implicit_gemm")

    def __init__(self):
        self._ext = None
        self._mod = None
        self._why: Optional[str] = None
        self._loaded = False

    def _load(self):
        if self._loaded:
            return
        self._loaded = True
        errors = []
        try:
            self._ext = importlib.import_module(self._MODULES[0])
        except Exception as e:
            errors.append(f"{self._MODULES[0]}: {type(e).__name__}: {e}")
        try:
            self._mod = importlib.import_module(self._MODULES[1])
        except Exception as e:
            errors.append(f"{self._MODULES[1]}: {type(e).__name__}: {e}")
        if self._ext is None and self._mod is None:
            self._why = ("original RepLKNet extension not importable (build it from the RepLKNet repo's "
                         "cutlass/examples/19_large_depthwise_conv2d_torch_extension); " + "; ".join(errors))

    def _raw(self, dtype) -> Optional[Tuple[Callable, Callable, Callable]]:
        sfx = {torch.float32: "fp32", torch.float16: "fp16"}.get(dtype)
        if self._ext is None or sfx is None:
            return None
        names = (f"forward_{sfx}", f"backward_data_{sfx}", f"backward_filter_{sfx}")
        if not all(hasattr(self._ext, n) for n in names):
            return None
        return tuple(getattr(self._ext, n) for n in names)

    def unavailable(self, device):
        self._load()
        if self._why:
            return self._why
        if device.type != "cuda":
            return "the RepLKNet extension runs on CUDA only"
        return None

    def supports(self, shape, dtype, pass_, device):
        if dtype not in (torch.float32, torch.float16):
            return f"the RepLKNet extension supports fp32/fp16 only, not {dtype}"
        if shape.kh != shape.kw or shape.kh % 2 == 0:
            return "the RepLKNet extension supports square odd kernels only"
        if self._raw(dtype) is None and pass_ in ("grad_input", "grad_weight"):
            return "isolated gradient passes need the raw extension functions (only the module is importable)"
        if self._raw(dtype) is None and getattr(self._mod, "DepthWiseConv2dImplicitGEMM", None) is None:
            return "neither raw extension functions nor DepthWiseConv2dImplicitGEMM found"
        return None

    def prepare(self, x, w, g):
        return x.contiguous(), w.contiguous(), g.contiguous()

    def make(self, pass_, x, w, g, shape):
        raw = self._raw(x.dtype)
        if raw is not None:
            fwd, bwd_data, bwd_filter = raw
            if pass_ == "forward":
                return lambda: (fwd(x, w),)
            if pass_ == "grad_input":
                return lambda: (bwd_data(g, w),)
            if pass_ == "grad_weight":
                return lambda: (bwd_filter(g, x, w),)

            class _Fn(torch.autograd.Function):
                @staticmethod
                def forward(ctx, a, b):
                    ctx.save_for_backward(a, b)
                    return fwd(a, b)

                @staticmethod
                def backward(ctx, gr):
                    a, b = ctx.saved_tensors
                    gr = gr.contiguous()
                    return bwd_data(gr, b), bwd_filter(gr, a, b)

            return _all_pass(_Fn.apply, x, w, g)
        m = self._mod.DepthWiseConv2dImplicitGEMM(shape.c, shape.kh, bias=False).to(x.device, x.dtype)
        with torch.no_grad():
            m.weight.copy_(w)
        if pass_ == "forward":
            def fn():
                with torch.no_grad():
                    return (m(x),)
            return fn

        def conv(a, b):
            return torch.func.functional_call(m, {"weight": b}, (a,))

        return _all_pass(conv, x, w, g)


ALL_PROVIDER_NAMES = ("torch", "torch-cl", "lkconv-cpu", "lkconv-cuda", "lkconv-triton", "replknet")


def make_provider(name: str) -> Provider:
    """``torch``, ``torch-cl``, ``replknet``, ``lkconv-<backend>`` or ``lkconv-<backend>-cl``."""
    if name == "torch":
        return TorchProvider(False)
    if name == "torch-cl":
        return TorchProvider(True)
    if name == "replknet":
        return ReplknetProvider()
    if name.startswith("lkconv-"):
        rest = name[len("lkconv-"):]
        cl = rest.endswith("-cl")
        if cl:
            rest = rest[:-3]
        if rest:
            return LkconvProvider(rest, channels_last=cl)
    raise ValueError(
        f"unknown provider {name!r} (argument: --providers); use torch, torch-cl, replknet, lkconv-<backend>"
        f" or lkconv-<backend>-cl, e.g. {', '.join(ALL_PROVIDER_NAMES)}"
    )


def default_providers(device: torch.device) -> List[Provider]:
    if device.type == "cuda":
        names = ["torch", "torch-cl", "lkconv-cuda", "lkconv-triton", "replknet"]
    else:
        names = ["torch", "torch-cl", "lkconv-cpu"]
    return [make_provider(n) for n in names]
