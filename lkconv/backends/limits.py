"""Index-range limits shared by the GPU backends' ``check()``.

The Triton and CUDA kernels compute row/column coordinates (``i*SH + kh*DH - PT``, tile origins,
the column span ``(BN-1)*SW + (KW-1)*DW + 1``, the stride-1 grad_input offsets ``(K-1)*D - P``, ...)
in int32.  A geometry whose coordinates can leave the int32 range would wrap around: wrong results
(zeros), or a loop bound that wraps and never ends.  Such geometries are declined before launch,
so ``auto`` routes them to a backend that computes in int64 (``torch``/``cpu``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from ..params import ConvParams

__all__ = ["INT32_MAX", "int32_geometry_reason"]

INT32_MAX = 2**31 - 1


def _axis_extent(size: int, out: int, k: int, stride: int, dil: int, p_lo: int, p_hi: int, tile: int) -> int:
    """An upper bound of every |coordinate| a kernel computes along one axis: tile origins run past
    the output by up to one tile, times the stride, plus the kernel extent (twice: the signed
    grad_input offsets), the padding and the plane itself.  ``size`` may be the input or (the
    per-pass check of grad_input) grad_out; ``max(out, size) * stride`` covers either, since the
    input is shorter than ``out*stride + (k-1)*dil + 1``."""
    span = (k - 1) * dil
    return (max(out, size) + tile) * stride + 2 * span + p_lo + p_hi + size + tile


def int32_geometry_reason(x_shape: Sequence[int], k_hw: Tuple[int, int], p: ConvParams,
                          tile: int = 256) -> Optional[str]:
    """None when every coordinate of this geometry fits the kernels' int32 arithmetic with
    ``tile`` rows/columns of slack, else the reason (mentions "int32")."""
    H, W = int(x_shape[2]), int(x_shape[3])
    KH, KW = int(k_hw[0]), int(k_hw[1])
    ho, wo = p.out_size(H, W, KH, KW)
    t, b, l, r = p.padding
    eh = _axis_extent(H, max(ho, 1), KH, p.stride[0], p.dilation[0], t, b, tile)
    ew = _axis_extent(W, max(wo, 1), KW, p.stride[1], p.dilation[1], l, r, tile)
    if max(eh, ew) > INT32_MAX:
        axis = "H" if eh >= ew else "W"
        return (f"the geometry (stride {p.stride}, padding {p.padding}, dilation {p.dilation}, kernel "
                f"{KH}x{KW}, plane {H}x{W}) needs coordinates along {axis} beyond the kernels' int32 range "
                f"(bound {max(eh, ew)} > 2**31-1)")
    return None
