"""Test helpers shared by the test suite, benchmarks and ``python -m lkconv verify``.

The rule (docs/architecture.md, "Tolerance rule"): for a kernel computing in dtype d,

    max|out - ref| <= 2 * max|torch_d - ref| + floor_d * max(1, max|ref|)

where ``ref`` is the fp64 reference (on the CPU) and ``torch_d`` is PyTorch's own result in dtype d
(TF32 off for fp32).  ``compare_all_passes`` runs forward, grad_input and grad_weight of a backend
through the real ``lkconv`` op (autograd included) and checks all three against that rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .backends.reference import reference_forward, reference_grad_input, reference_grad_weight
from .params import ConvParams, normalize_params
from .precision import tf32  # re-exported: TF32 on/off for a block (safe with either PyTorch API)

__all__ = ["FLOORS", "tolerance", "tf32", "reference_all_passes", "compare_all_passes", "PassResult", "no_tf32"]

#: relative floor per dtype (multiplied by max(1, max|ref|))
FLOORS: Dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def no_tf32():
    """TF32 off for convolutions and matmuls (fp32 comparisons are IEEE)."""
    return tf32(False)


def tolerance(ref: torch.Tensor, torch_d: Optional[torch.Tensor], dtype: torch.dtype) -> float:
    ref = ref.double().cpu()
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    tol = FLOORS[dtype] * scale
    if torch_d is not None and torch_d.numel():
        tol += 2.0 * (torch_d.double().cpu() - ref).abs().max().item()
    return tol


def _torch_d_all_passes(x, w, b, p: ConvParams, g):
    """PyTorch's own forward and gradients in x's dtype/device (None where torch cannot do it)."""
    t, bo, l, r = p.padding
    try:
        with no_tf32():
            xd = x.detach().requires_grad_(True)
            wd = w.detach().requires_grad_(True)
            xin = F.pad(xd, (l, r, t, bo))
            out = F.conv2d(xin, wd, b, p.stride, 0, p.dilation, groups=x.shape[1])
            gx, gw = torch.autograd.grad(out, (xd, wd), g)
        return out.detach(), gx, gw
    except RuntimeError:  # e.g. fp16 conv not implemented on this CPU build
        return None, None, None


def reference_all_passes(x, w, b, p: ConvParams, g):
    """fp64 CPU reference of (out, grad_input, grad_weight, grad_bias) for grad_out ``g``."""
    x64, w64, g64 = x.detach().double().cpu(), w.detach().double().cpu(), g.detach().double().cpu()
    b64 = None if b is None else b.detach().double().cpu()
    out = reference_forward(x64, w64, b64, p)
    gx = reference_grad_input(g64, w64, x64.shape, p)
    gw = reference_grad_weight(g64, x64, w64.shape, p)
    gb = g64.sum(dim=(0, 2, 3)) if b is not None else None
    return out, gx, gw, gb


@dataclass
class PassResult:
    name: str
    err: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.err <= self.tol and self.err == self.err  # NaN fails

    def __str__(self) -> str:
        return f"{self.name}: err={self.err:.3e} tol={self.tol:.3e} {'ok' if self.ok else 'FAIL'}"


def compare_all_passes(
    backend: str,
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    seed: int = 0,
    check_memory_format: bool = True,
):
    """Run ``lkconv.depthwise_conv2d(..., backend=backend)`` forward and backward and compare every
    pass with the fp64 reference.  Returns a list of :class:`PassResult` (assert all ``ok``)."""
    from .functional import depthwise_conv2d
    from .ops import memory_format_of

    p = normalize_params(stride, padding, dilation, (w.shape[2], w.shape[3]))
    xr = x.detach().requires_grad_(True)
    wr = w.detach().requires_grad_(True)
    br = None if b is None else b.detach().requires_grad_(True)
    with no_tf32():
        out = depthwise_conv2d(xr, wr, br, stride, padding, dilation, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).to(out.device)
    with no_tf32():
        grads = torch.autograd.grad(out, [t for t in (xr, wr, br) if t is not None], g)
    ref = reference_all_passes(x, w, b, p, g)
    td = _torch_d_all_passes(x, w, b, p, g)
    results = []
    names = ["forward", "grad_input", "grad_weight", "grad_bias"]
    ours = [out, grads[0], grads[1], grads[2] if b is not None else None]
    gb_d = g.sum(dim=(0, 2, 3)) if b is not None else None  # PyTorch's own sum in the dtype: the baseline
    tds = [td[0], td[1], td[2], gb_d]
    for name, o, r, t in zip(names, ours, ref, tds):
        if r is None:
            continue
        assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)} != reference {tuple(r.shape)}"
        assert o.dtype == x.dtype, f"{name}: dtype {o.dtype} != input dtype {x.dtype}"
        err = (o.detach().double().cpu() - r).abs().max().item() if r.numel() else 0.0
        if o.numel() and not torch.isfinite(o).all() and torch.isfinite(r).all():
            err = float("nan")
        results.append(PassResult(name, err, tolerance(r, t, x.dtype)))
    if check_memory_format:
        assert memory_format_of(out) == memory_format_of(x) or out.numel() == 0, "forward memory format"
    return results


def double_backward_errors(
    backend: str,
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
) -> Dict[str, float]:
    """Second-order check: a gradient penalty ``|dL/dx|^2 + |dL/dw|^2 + <dL/dx, x>`` with
    ``L = sum(sin(y) * y)``, differentiated again w.r.t. x, w (and b), through ``lkconv`` on
    ``backend`` in x's dtype/device, against PyTorch's own double backward of F.conv2d in fp64 on the
    CPU.  Returns ``{name: max|ours - ref| / max(1, max|ref|)}`` (TF32 off)."""
    from .functional import depthwise_conv2d

    p = normalize_params(stride, padding, dilation, (w.shape[2], w.shape[3]))
    t, bo, le, r = p.padding

    def grads(fn, xs, ws, bs):
        xs = xs.detach().requires_grad_(True)
        ws = ws.detach().requires_grad_(True)
        bs = None if bs is None else bs.detach().requires_grad_(True)
        y = fn(xs, ws, bs)
        gx, gw = torch.autograd.grad((y.sin() * y).sum(), (xs, ws), create_graph=True)
        pen = (gx ** 2).sum() + (gw ** 2).sum() + (gx * xs).sum()
        return torch.autograd.grad(pen, [v for v in (xs, ws, bs) if v is not None])

    def ours(xs, ws, bs):
        return depthwise_conv2d(xs, ws, bs, stride, padding, dilation, backend=backend)

    def ref(xs, ws, bs):
        return F.conv2d(F.pad(xs, (le, r, t, bo)), ws, bs, p.stride, 0, p.dilation, groups=xs.shape[-3])

    with no_tf32():
        a = grads(ours, x, w, b)
    d = lambda v: None if v is None else v.detach().double().cpu()  # noqa: E731
    rr = grads(ref, d(x), d(w), d(b))
    out = {}
    for name, u, v in zip(("x", "weight", "bias"), a, rr):
        out[name] = (u.detach().double().cpu() - v).abs().max().item() / max(1.0, v.abs().max().item())
    return out


def nonfinite_contract_violations(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> list:
    """The contract for non-finite inputs (docs/reliability.md): wherever the fp64 reference is
    non-finite, ``out`` is non-finite too (never a finite number in place of Inf/NaN), and wherever
    ``out`` is finite it matches the reference within the tolerance rule's floor.  Tensor-core backends
    (triton, cuda) may turn *more* outputs non-finite than F.conv2d: a zero filter tap times Inf is
    NaN inside their GEMM tiles.  Returns a list of violation messages (empty = contract held)."""
    o = out.detach().double().cpu()
    r = ref.detach().double().cpu()
    bad = []
    hidden = (~torch.isfinite(r)) & torch.isfinite(o)
    if hidden.any():
        bad.append(f"{int(hidden.sum())} outputs finite where the reference is Inf/NaN")
    both = torch.isfinite(o) & torch.isfinite(r)
    if both.any():
        err = (o[both] - r[both]).abs().max().item()
        tol = FLOORS[dtype] * 8 * max(1.0, r[both].abs().max().item())
        if err > tol:
            bad.append(f"finite outputs differ from the reference: err {err:.3e} > {tol:.3e}")
    return bad
