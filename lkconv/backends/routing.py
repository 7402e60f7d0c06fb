"""``auto``'s routing table for CUDA tensors: per pass, dtype and shape class, which backends are
expected to beat PyTorch, fastest first.

One table of times, :data:`TIMES_US`: ``(backend, shape class, pass, dtype class) -> (µs, basis)``
for ``backend`` in {``cuda``, ``triton``, ``torch``}.  The order ``auto`` tries for a pass is derived
from it (:func:`route_order`): every lkconv backend whose time is known and below PyTorch's, fastest
first, then ``torch``.  A backend with no entry for a cell is not chosen for it (no evidence that it
is faster), so ``auto`` never picks what is expected to be slower than PyTorch.  A user can still
force any backend (``backend=``, :func:`lkconv.use_backend`).

Today every entry is **modelled** (no GPU run has happened): the lkconv kernels' times come from the
static report of their SASS (``python -m lkconv static``; docs/performance_model.md: H100 SXM,
RepLKNet-31B layers at N=64, the slow end of the range, i.e. 0.7 issue efficiency), PyTorch's from an
independent static estimate of its native kernels (low confidence, about ±2x).  Measured times go
into :data:`MEASURED_US` (same keys) and win over the modelled ones: measured beats modelled.

Shape classes are the four RepLKNet-31B stages the model covers, by output plane (H_out*W_out
>= 40², >= 20², >= 10², smaller) for kernels of at least :data:`LARGE_KERNEL` taps per side at stride 1
and dilation 1.  Everything else (small kernels, strides, dilations) has no model: ``torch`` first.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .base import PASSES, Request

__all__ = ["TIMES_US", "MEASURED_US", "LARGE_KERNEL", "shape_class", "dtype_class", "route_order",
           "route_table", "join_route", "route_for"]

#: smallest kernel side the model covers (RepLKNet-31B's smallest large kernel is 13x13)
LARGE_KERNEL = 13

MODEL_BASIS = _MODEL = "modelled (static report static-2aa159e87270, H100 SXM, N=64, 0.7 issue efficiency)"
TORCH_BASIS = _TORCH_EST = "estimate (static model of PyTorch's native kernels, ±2x)"

Key = Tuple[str, str, str, str]  # (backend, shape class, pass, dtype class)


def _rows(backend: str, dtype: str, basis: str, **per_pass: Tuple[float, float, float, float]) -> Dict:
    """``per_pass``: pass -> µs at the 56², 28², 14², 7² classes (None: no entry)."""
    out = {}
    for pass_, times in per_pass.items():
        for cls, us in zip(("56", "28", "14", "7"), times):
            if us is not None:
                out[(backend, cls, pass_, dtype)] = (float(us), basis)
    return out


#: the one table (µs per layer, slow end of the modelled range); see the module docstring
TIMES_US: Dict[Key, Tuple[float, str]] = {
    # lkconv kernels: benchmarks/results/static-2aa159e87270/routing.json (the default kernel of each
    # backend; fp16 and bf16 merged by taking the slower); CUDA fp32: static-d4c30a8305b3/routing.json
    **_rows("cuda", "half", _MODEL + "; toeplitz_mma_kernel / grad_weight_tc_kernel",
            forward=(452, 509, 224, 214), grad_input=(452, 509, 224, 214), grad_weight=(179, 114, 98, 64)),
    **_rows("triton", "half", _MODEL + "; aligned kernels",
            forward=(617, 364, 148, 75), grad_input=(617, 364, 148, 75), grad_weight=(770, 511, 296, 221)),
    **_rows("cuda", "fp32", _MODEL.replace("static-2aa159e87270", "static-d4c30a8305b3")
            + "; fp32_rb_kernel / grad_weight_ffma_kernel",
            forward=(1181, 520, 462, 330), grad_input=(1181, 520, 462, 330),
            grad_weight=(1464, 752, 453, 254)),
    **_rows("triton", "fp32", _MODEL + "; aligned kernels, IEEE",
            forward=(4062, 2100, 747, 261), grad_input=(4062, 2100, 747, 261),
            grad_weight=(3752, 2497, 1434, 567)),
    **_rows("triton", "tf32", _MODEL + "; aligned kernels, TF32",
            forward=(1148, 664, 273, 137), grad_input=(1148, 664, 273, 137),
            grad_weight=(1279, 848, 492, 321)),
    # PyTorch's native kernels (NCHW; they do not use tensor cores or TF32)
    **_rows("torch", "half", _TORCH_EST,
            forward=(5711, 2169, 673, 86), grad_input=(11178, 4891, 2120, 246),
            grad_weight=(24567, 9772, 3619, 425)),
    **_rows("torch", "fp32", _TORCH_EST,
            forward=(5711, 2169, 673, 86), grad_input=(9582, 4193, 1817, 211),
            grad_weight=(24567, 9772, 3619, 425)),
}

# "tf32" (fp32 with PyTorch's convolution TF32 allowed): the cuda backend is IEEE-only and PyTorch's
# native kernels do not use TF32, so their fp32 times stand for it too
TIMES_US.update({(be, cls, pass_, "tf32"): (t, basis + "; same kernels as fp32 (no TF32 path)")
                 for (be, cls, pass_, dcls), (t, basis) in list(TIMES_US.items())
                 if dcls == "fp32" and be in ("cuda", "torch")})

#: measured times (same keys, basis "measured: benchmarks/results/<run>"); they win over TIMES_US
MEASURED_US: Dict[Key, Tuple[float, str]] = {}

_LKCONV_BACKENDS = ("cuda", "triton")


def shape_class(req: Request) -> Optional[str]:
    """"56", "28", "14" or "7" (the RepLKNet-31B stage whose model covers this case), or None
    (no model: small kernel, stride or dilation)."""
    KH, KW = req.weight_shape[2], req.weight_shape[3]
    p = req.params
    if min(KH, KW) < LARGE_KERNEL or tuple(p.stride) != (1, 1) or tuple(p.dilation) != (1, 1):
        return None
    N, _, H, W = req.input_shape
    ho, wo = p.out_size(H, W, KH, KW)
    hw = ho * wo
    return "56" if hw >= 40 * 40 else "28" if hw >= 20 * 20 else "14" if hw >= 10 * 10 else "7"


@torch.compiler.assume_constant_result
def _tf32_allowed() -> bool:
    from ..precision import conv_tf32_enabled

    return conv_tf32_enabled()


def dtype_class(dtype: torch.dtype) -> Optional[str]:
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    if dtype == torch.float32:
        return "tf32" if _tf32_allowed() else "fp32"
    return None


def _time(backend: str, cls: str, pass_: str, dcls: str) -> Optional[Tuple[float, str]]:
    key = (backend, cls, pass_, dcls)
    return MEASURED_US.get(key) or TIMES_US.get(key)


def route_order(req: Request) -> Tuple[Tuple[str, ...], str]:
    """The backends ``auto`` tries for this CUDA pass, in order (always ending with ``torch``), and
    why: the lkconv backends expected to beat PyTorch, fastest first."""
    cls, dcls = shape_class(req), dtype_class(req.dtype)
    if cls is None or dcls is None:
        return ("torch",), "no model for this case (small kernel, stride, dilation or dtype): PyTorch"
    torch_t = _time("torch", cls, req.pass_, dcls)
    if torch_t is None:
        return ("torch",), f"no PyTorch time for {cls}²/{req.pass_}/{dcls}: PyTorch"
    faster = []
    for be in _LKCONV_BACKENDS:
        t = _time(be, cls, req.pass_, dcls)
        if t is not None and t[0] < torch_t[0]:
            faster.append((t[0], be))
    faster.sort()
    basis = ", ".join(f"{be} {t:.0f}" for t, be in faster) + (", " if faster else "")
    return tuple(be for _, be in faster) + ("torch",), f"{basis}torch {torch_t[0]:.0f} µs"


def route_table() -> List[Dict]:
    """Every cell of the table with its order and the basis of each time (``python -m lkconv info``)."""
    rows = []
    for dcls in ("half", "fp32", "tf32"):
        for cls in ("56", "28", "14", "7"):
            for pass_ in PASSES:
                times = {be: _time(be, cls, pass_, dcls) for be in _LKCONV_BACKENDS + ("torch",)}
                torch_t = times["torch"]
                order = sorted((t[0], be) for be, t in times.items()
                               if be != "torch" and t is not None and torch_t is not None and t[0] < torch_t[0])
                rows.append(dict(dtype=dcls, shape=cls, pass_=pass_, order=[be for _, be in order] + ["torch"],
                                 times={be: (t[0] if t else None) for be, t in times.items()},
                                 basis={be: (t[1] if t else "no entry") for be, t in times.items()}))
    return rows


# ------------------------------------------------------------------------------------------------
# routes: one backend per pass inside the op's ``backend`` string
# ------------------------------------------------------------------------------------------------
_SEP, _EQ = ";", "="


def join_route(per_pass: Dict[str, str]) -> str:
    """One name when every pass uses the same backend, else ``"forward=cuda;grad_input=cuda;
    grad_weight=triton"`` (what the ops receive as ``backend``)."""
    names = set(per_pass.values())
    if len(names) == 1:
        return names.pop()
    return _SEP.join(f"{p}{_EQ}{per_pass[p]}" for p in PASSES if p in per_pass)


def route_for(backend: str, pass_: str) -> str:
    """The backend of ``pass_`` in ``backend`` (a plain name, or a route made by :func:`join_route`)."""
    if _EQ not in backend:
        return backend
    for part in backend.split(_SEP):
        p, _, name = part.partition(_EQ)
        if p == pass_:
            return name
    raise ValueError(f"lkconv: backend route {backend!r} names no backend for {pass_}")
