"""The correctness gate: before a provider is timed on a case, its outputs are compared with the
fp64 reference (``lkconv.backends.reference``, written from the definition) under the tolerance rule (docs/architecture.md)
of :func:`lkconv.testing.tolerance`:

    max|out - ref| <= 2 * max|torch_d - ref| + floor_d * max(1, max|ref|)

``torch_d`` is PyTorch's own result in the benchmark dtype with TF32 off.  For ``tf32`` (fp32 data,
TF32 tensor cores allowed) the floor is fp16's (TF32 keeps fp16's 10-bit mantissa).

Big shapes: the reference runs in fp64 on the benchmark's device on the first ``n_gate`` images of
the batch (as many as fit a cost budget; all of them for small shapes).  The gate's grad_out is zero
for the other images, so the full-batch grad_weight must equal the sub-batch reference exactly and
grad_input must be zero there -- both are checked on the whole output of the full-size call.  The
forward is compared on the first ``n_gate`` images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..backends.reference import reference_forward, reference_grad_input, reference_grad_weight
from ..params import normalize_params
from ..testing import no_tf32, tolerance
from .providers import DTYPES
from .shapes import Shape

__all__ = ["Case", "GateResult", "check_outputs", "REF_BUDGET"]

#: reference cost budget (multiply-adds of the fp64 sum-of-slices) per pass, by device type
REF_BUDGET = {"cpu": 4e8, "cuda": 2e10}

_OUT_NAMES = {
    "forward": ("forward",),
    "grad_input": ("grad_input",),
    "grad_weight": ("grad_weight",),
    "all": ("forward", "grad_input", "grad_weight"),
}


@dataclass
class GateResult:
    ok: bool
    err: float            # worst err/tol ratio's err
    tol: float
    detail: str = ""
    parts: List[Tuple[str, float, float]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.err / self.tol if self.tol > 0 else float("inf")


class Case:
    """Tensors of one (shape, dtype mode, device) benchmark case plus its lazily computed reference."""

    def __init__(self, shape: Shape, dtype_mode: str, device: torch.device, seed: int = 0,
                 n_gate: Optional[int] = None):
        self.shape = shape
        self.dtype_mode = dtype_mode
        self.dtype, self.tf32 = DTYPES[dtype_mode]
        self.device = torch.device(device)
        self.params = normalize_params(1, shape.padding, 1, (shape.kh, shape.kw))
        gen = torch.Generator(device=self.device).manual_seed(seed)
        s = shape
        ho, wo = s.out_hw
        kw = dict(device=self.device, dtype=torch.float32, generator=gen)
        self.x = torch.randn(s.n, s.c, s.h, s.w, **kw).to(self.dtype)
        # outputs of unit scale: sum of KH*KW terms of randn * randn/sqrt(KH*KW)
        self.w = (torch.randn(s.c, 1, s.kh, s.kw, **kw) / (s.kh * s.kw) ** 0.5).to(self.dtype)
        self.g = torch.randn(s.n, s.c, ho, wo, **kw).to(self.dtype)
        if n_gate is None:
            per_image = s.c * ho * wo * s.kh * s.kw
            budget = REF_BUDGET.get(self.device.type, REF_BUDGET["cpu"])
            n_gate = int(max(1, min(s.n, budget // max(1, per_image))))
        self.n_gate = max(0, min(s.n, n_gate))
        self.g_gate = self.g.clone()
        self.g_gate[self.n_gate:] = 0
        self._ref: Optional[Dict[str, torch.Tensor]] = None
        self._tol: Optional[Dict[str, float]] = None

    def reference(self):
        """({pass: fp64 reference on the sub-batch}, {pass: tolerance})."""
        if self._ref is None:
            n, p = self.n_gate, self.params
            x64 = self.x[:n].double()
            w64 = self.w.double()
            g64 = self.g_gate[:n].double()
            ref = {
                "forward": reference_forward(x64, w64, None, p),
                "grad_input": reference_grad_input(g64, w64, x64.shape, p),
                "grad_weight": reference_grad_weight(g64, x64, w64.shape, p),
            }
            td = self._torch_d()
            floor_dtype = torch.float16 if self.tf32 else self.dtype
            self._tol = {k: tolerance(ref[k], td.get(k), floor_dtype) for k in ref}
            self._ref = ref
        return self._ref, self._tol

    def _torch_d(self) -> Dict[str, torch.Tensor]:
        n, s = self.n_gate, self.shape
        try:
            with no_tf32():
                xd = self.x[:n].detach().clone().requires_grad_(True)
                wd = self.w.detach().clone().requires_grad_(True)
                out = F.conv2d(xd, wd, None, 1, list(s.padding), 1, groups=s.c)
                gx, gw = torch.autograd.grad(out, (xd, wd), self.g_gate[:n])
            return {"forward": out.detach(), "grad_input": gx, "grad_weight": gw}
        except RuntimeError:  # e.g. a dtype torch does not implement on this device
            return {}


def _maxabs(t: torch.Tensor) -> float:
    if t.numel() == 0:
        return 0.0
    t = t.double()
    if not torch.isfinite(t).all():
        return float("nan")
    return t.abs().max().item()


def check_outputs(case: Case, pass_: str, outputs: Sequence[torch.Tensor]) -> GateResult:
    """Compare a provider's outputs for ``pass_`` (see providers.py for their order) with the reference."""
    ref, tol = case.reference()
    names = _OUT_NAMES[pass_]
    if len(outputs) != len(names):
        return GateResult(False, float("nan"), 0.0, f"expected {len(names)} outputs, got {len(outputs)}")
    n = case.n_gate
    parts = []
    for name, o in zip(names, outputs):
        r = ref[name]
        want = tuple(case.w.shape) if name == "grad_weight" else (
            tuple(case.x.shape) if name == "grad_input" else tuple(case.g.shape))
        if tuple(o.shape) != want:
            return GateResult(False, float("nan"), 0.0, f"{name}: shape {tuple(o.shape)} != expected {want}")
        if o.dtype != case.dtype:
            return GateResult(False, float("nan"), 0.0, f"{name}: dtype {o.dtype} != {case.dtype}")
        if name == "grad_weight":
            err = _maxabs(o.double() - r.to(o.device))
        else:
            err = _maxabs(o[:n].double() - r.to(o.device))
            if name == "grad_input" and n < o.shape[0]:  # grad_out is zero there: grad_input must be too
                rest = _maxabs(o[n:])
                err = rest if rest != rest else max(err, rest)
        parts.append((name, err, tol[name]))
    ok = all(e <= t for _, e, t in parts)  # NaN compares False
    worst = max(parts, key=lambda p: float("inf") if p[1] != p[1] else p[1] / max(p[2], 1e-300))
    detail = "; ".join(f"{nm} err={e:.2e} tol={t:.2e}" for nm, e, t in parts)
    return GateResult(ok, worst[1], worst[2], detail, parts)
