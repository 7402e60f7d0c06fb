"""The FFT path of the ``cpu`` backend (``torch.fft.rfft2`` / ``irfft2``).

Semantics (validated, normalised arguments; see :mod:`lkconv.params`)::

    out[n, c, i, j] = b[c] + sum_{a, b} w[c, a, b] * xpad[n, c, i*sh + a*dil_h, j*sw + b*dil_w]

Per axis (rows shown; columns are the same):
the stride-1 output ``y[i]`` (``i < n1 = (Ho-1)*sh + 1``) receives ``x[u]`` through tap ``a`` exactly
when ``i - u = delta_a = top - a*dil_h``.  Only taps with ``-(H-1) <= delta_a <= n1-1`` ever touch a real
input pixel; the others lie entirely in the padding and are dropped.  Placing ``x`` at offset 0 of a
zero-padded length-``L`` buffer and the kernel at ``h[delta_a mod L] = w[a]`` turns the three passes
into circular products:

* forward:     ``Y  = X * Hf``            (y = x circularly convolved with h), read ``y[0:n1:sh]``
* grad_input:  ``GX = GS * conj(Hf)``     (gs = grad_out zero-inserted to stride 1), read ``gx[0:H]``
* grad_weight: ``R  = sum_n conj(X) * GS`` read ``gw[a] = r[delta_a mod L]``

and they are exact (no circular wrap-around) when every pair difference ``delta - delta'`` with
``delta`` in ``[-(H-1), n1-1]`` and ``delta'`` a kept tap is smaller than ``L`` in magnitude, i.e.
``L >= max(H, n1, H + max(delta'), n1 - min(delta'))`` (see :func:`fft_length`).  With "same" padding
this is ``H + K//2`` rather than ``H + K - 1``.  ``L`` is then rounded up to a 2/3/5/7-smooth size.
Padding never materialises: the zero padding is the FFT buffer's tail.  fp64 runs in complex128,
fp32 in complex64; fp16/bf16 are computed in fp32 and cast once at the end.  Work is chunked over
channels and batch so the complex buffers stay under :data:`CHUNK_BYTES`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ...params import ConvParams
from ..base import output_memory_format

__all__ = ["CHUNK_BYTES", "next_fast_len", "fft_length", "fft_forward", "fft_grad_input", "fft_grad_weight"]

#: soft cap on the bytes of one complex chunk buffer (a few live at a time); None = automatic:
#: 1 MiB when torch runs single-threaded (cache-sized chunks: K=31 N=8 C=128 56x56 forward+both grads
#: 100 ms vs 253 ms with 64 MiB, CPU time), 64 MiB when multi-threaded (each FFT call is an OpenMP
#: parallel region; fewer, bigger ones measured 560 ms vs 2556 ms with 4 MiB chunks, 2 threads, on
#: the loaded shared box)
CHUNK_BYTES: Optional[int] = None


def _chunk_bytes() -> int:
    if CHUNK_BYTES is not None:
        return CHUNK_BYTES
    return 2**20 if torch.get_num_threads() == 1 else 64 * 2**20


# ------------------------------------------------------------------------------------------------
# FFT geometry
# ------------------------------------------------------------------------------------------------
def next_fast_len(n: int, even: bool = False) -> int:
    """Smallest m >= n whose prime factors are all in {2, 3, 5, 7} (and even if asked)."""
    m = max(1, n)
    while True:
        if not even or m % 2 == 0:
            r = m
            for p in (2, 3, 5, 7):
                while r % p == 0:
                    r //= p
            if r == 1:
                return m
        m += 1


def _axis(size: int, pad_lo: int, k: int, dil: int, out: int, stride: int):
    """Per-axis geometry: (n1, kept taps [(a, delta)], minimal exact length)."""
    n1 = (out - 1) * stride + 1
    taps = [(a, pad_lo - a * dil) for a in range(k)]
    taps = [(a, d) for a, d in taps if -(size - 1) <= d <= n1 - 1]
    need = max(size, n1)
    if taps:
        dmax = max(d for _, d in taps)
        dmin = min(d for _, d in taps)
        need = max(need, size + dmax, n1 - dmin)
    return n1, taps, need


def fft_length(size: int, pad_lo: int, k: int, dil: int, out: int, stride: int, even: bool = False) -> int:
    """The FFT length used along one axis (exact, no wrap-around; 2/3/5/7-smooth)."""
    return next_fast_len(_axis(size, pad_lo, k, dil, out, stride)[2], even)


class _Plan:
    """Everything the three FFT passes share for one geometry."""

    def __init__(self, in_hw, k_hw, out_hw, p: ConvParams):
        H, W = in_hw
        KH, KW = k_hw
        Ho, Wo = out_hw
        t, _, l, _ = p.padding
        self.H, self.W, self.Ho, self.Wo = H, W, Ho, Wo
        self.sh, self.sw = p.stride
        self.n1, rows, need_h = _axis(H, t, KH, p.dilation[0], Ho, self.sh)
        self.m1, cols, need_w = _axis(W, l, KW, p.dilation[1], Wo, self.sw)
        self.LH = next_fast_len(need_h)
        self.LW = next_fast_len(need_w, even=True)
        self.empty = not rows or not cols
        # index tensors: kernel taps kept, and where they sit in the circular buffer
        self.a_idx = torch.tensor([a for a, _ in rows], dtype=torch.long)
        self.b_idx = torch.tensor([b for b, _ in cols], dtype=torch.long)
        self.r_pos = torch.tensor([d % self.LH for _, d in rows], dtype=torch.long)
        self.c_pos = torch.tensor([d % self.LW for _, d in cols], dtype=torch.long)

    @property
    def s(self):
        return (self.LH, self.LW)

    def kernel_spectrum(self, w3: torch.Tensor) -> torch.Tensor:
        """rfft2 of the circular kernel buffer h for a (c, KH, KW) real kernel chunk."""
        h = w3.new_zeros((w3.shape[0], self.LH, self.LW))
        if not self.empty:
            sub = w3.index_select(1, self.a_idx).index_select(2, self.b_idx)
            h[:, self.r_pos[:, None], self.c_pos[None, :]] = sub
        return torch.fft.rfft2(h)

    def chunks(self, N: int, C: int, itemsize: int):
        """(n0, n1, c0, c1) blocks whose complex spectra stay under CHUNK_BYTES."""
        plane = self.LH * (self.LW // 2 + 1) * 2 * itemsize
        per = max(1, _chunk_bytes() // plane)
        if per >= N * C:
            yield 0, N, 0, C
            return
        if per >= N:
            cc = max(1, per // N)
            for c0 in range(0, C, cc):
                yield 0, N, c0, min(C, c0 + cc)
        else:
            for c0 in range(C):
                for n0 in range(0, N, per):
                    yield n0, min(N, n0 + per), c0, c0 + 1


def _spectrum(t: torch.Tensor, plan: "_Plan") -> torch.Tensor:
    """rfft2 of ``t`` zero-padded to (LH, LW), done axis by axis so the zero rows are never
    transformed along W (same result as ``torch.fft.rfft2(t, s=plan.s)``)."""
    return torch.fft.fft(torch.fft.rfft(t, n=plan.LW, dim=-1), n=plan.LH, dim=-2)


def _inverse(spec: torch.Tensor, plan: "_Plan", rows: slice, cols: slice) -> torch.Tensor:
    """``torch.fft.irfft2(spec, s=plan.s)[..., rows, cols]``, transforming along W only the rows
    that are kept."""
    y = torch.fft.ifft(spec, dim=-2)[:, :, rows]
    return torch.fft.irfft(y, n=plan.LW, dim=-1)[:, :, :, cols]


def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


def _out_like(shape, ref: torch.Tensor, dtype) -> torch.Tensor:
    """Empty result in ``dtype`` with ``ref``'s memory format (channels_last in -> out)."""
    return torch.empty(shape, dtype=dtype, device=ref.device, memory_format=output_memory_format(ref))


def fft_forward(x, weight, bias, p: ConvParams) -> torch.Tensor:
    N, C, H, W = x.shape
    KH, KW = weight.shape[2], weight.shape[3]
    Ho, Wo = p.out_size(H, W, KH, KW)
    cdt = _compute_dtype(x.dtype)
    out = _out_like((N, C, Ho, Wo), x, x.dtype)
    if out.numel() == 0:
        return out
    plan = _Plan((H, W), (KH, KW), (Ho, Wo), p)
    w3 = weight.reshape(C, KH, KW).to(cdt)
    isz = torch.empty((), dtype=cdt).element_size()
    bias_c = None if bias is None else bias.to(cdt)
    for n0, n1, c0, c1 in plan.chunks(N, C, isz):
        hf = plan.kernel_spectrum(w3[c0:c1])
        xf = _spectrum(x[n0:n1, c0:c1].to(cdt), plan)
        xf.mul_(hf)
        y = _inverse(xf, plan, slice(0, plan.n1, plan.sh), slice(0, plan.m1, plan.sw))
        if bias_c is not None:
            y = y + bias_c[c0:c1].view(1, -1, 1, 1)
        out[n0:n1, c0:c1].copy_(y)
    return out


def _zero_insert(g: torch.Tensor, plan: _Plan) -> torch.Tensor:
    if plan.sh == 1 and plan.sw == 1:
        return g
    gs = g.new_zeros((g.shape[0], g.shape[1], plan.n1, plan.m1))
    gs[:, :, :: plan.sh, :: plan.sw] = g
    return gs


def fft_grad_input(grad_out, weight, input_shape: Sequence[int], p: ConvParams) -> torch.Tensor:
    N, C, H, W = input_shape
    KH, KW = weight.shape[2], weight.shape[3]
    Ho, Wo = grad_out.shape[2], grad_out.shape[3]
    cdt = _compute_dtype(grad_out.dtype)
    gx = _out_like((N, C, H, W), grad_out, grad_out.dtype)
    if gx.numel() == 0:
        return gx
    plan = _Plan((H, W), (KH, KW), (Ho, Wo), p)
    if plan.empty:
        return gx.zero_()
    w3 = weight.reshape(C, KH, KW).to(cdt)
    isz = torch.empty((), dtype=cdt).element_size()
    for n0, n1, c0, c1 in plan.chunks(N, C, isz):
        hf = plan.kernel_spectrum(w3[c0:c1])
        gf = _spectrum(_zero_insert(grad_out[n0:n1, c0:c1].to(cdt), plan), plan)
        gf.mul_(hf.conj())
        gx[n0:n1, c0:c1].copy_(_inverse(gf, plan, slice(0, H), slice(0, W)))
    return gx


def fft_grad_weight(grad_out, x, weight_shape: Sequence[int], p: ConvParams) -> torch.Tensor:
    C, _, KH, KW = weight_shape
    N, _, H, W = x.shape
    Ho, Wo = grad_out.shape[2], grad_out.shape[3]
    cdt = _compute_dtype(x.dtype)
    gw = torch.zeros((C, KH, KW), dtype=cdt, device=x.device)
    plan = _Plan((H, W), (KH, KW), (Ho, Wo), p)
    if N == 0 or C == 0 or plan.empty:
        return gw.to(x.dtype).view(C, 1, KH, KW)
    isz = torch.empty((), dtype=cdt).element_size()
    acc = {}
    for n0, n1, c0, c1 in plan.chunks(N, C, isz):
        xf = _spectrum(x[n0:n1, c0:c1].to(cdt), plan)
        gf = _spectrum(_zero_insert(grad_out[n0:n1, c0:c1].to(cdt), plan), plan)
        gf.mul_(xf.conj())
        part = gf.sum(0)
        if (c0, c1) in acc:
            acc[(c0, c1)] += part
        else:
            acc[(c0, c1)] = part
        if n1 == N:  # this channel block is complete
            r = torch.fft.irfft2(acc.pop((c0, c1)), s=plan.s)
            sub = r.index_select(1, plan.r_pos).index_select(2, plan.c_pos)
            gw[c0:c1, plan.a_idx[:, None], plan.b_idx[None, :]] = sub
    return gw.to(x.dtype).view(C, 1, KH, KW)


def _plane_l1(t: torch.Tensor) -> torch.Tensor:
    """(N, C) sums of |t| over each plane, accumulated in fp64 (inf/nan if t holds any)."""
    return t.abs().sum(dim=(2, 3), dtype=torch.float64)


def _max_abs(t: torch.Tensor) -> float:
    """max |t| (inf/nan if t holds any): two vectorised reductions, no temporary."""
    return max(abs(float(t.amax())), abs(float(t.amin())))


def _coarse_bound(a: torch.Tensor, b: torch.Tensor, pass_: str) -> float:
    """An upper bound of the per-channel ``|a|_1 * |b|_1`` of :func:`fft_in_range` from the largest
    magnitudes (for grad_weight summed over the batch, as there)."""
    hw_a = a.shape[-1] * a.shape[-2]
    if pass_ == "grad_weight":
        return a.shape[0] * hw_a * _max_abs(a) * b.shape[-1] * b.shape[-2] * _max_abs(b)
    return hw_a * _max_abs(a) * (b[0].numel() * _max_abs(b))  # b: the weight, |b_c|_1 <= KH*KW*max|b|


def _fft_length_product(in_hw, k_hw, out_hw, p: ConvParams) -> int:
    t, _, l, _ = p.padding
    lh = fft_length(in_hw[0], t, k_hw[0], p.dilation[0], out_hw[0], p.stride[0])
    lw = fft_length(in_hw[1], l, k_hw[1], p.dilation[1], out_hw[1], p.stride[1], even=True)
    return lh * lw


#: the FFT is used only when its bound stays below this fraction of the compute dtype's largest value
FFT_RANGE_MARGIN = 0.25


def fft_in_range(a: torch.Tensor, b: torch.Tensor, in_hw, k_hw, out_hw, p: ConvParams, pass_: str) -> bool:
    """Whether the FFT of this pass can neither overflow nor meet a NaN/Inf (else: direct path).

    An unnormalised length-L DFT of a plane is bounded by the plane's L1 norm, a product of two
    spectra by the product of the norms, and every partial sum of the inverse by L times that, so
    ``L * |a|_1 * |b|_1`` (per channel; for grad_weight summed over the batch) bounds every
    intermediate.  Finite inputs whose bound exceeds the compute dtype's range (two pixels at 3e38 in
    fp32) would come out as Inf/NaN over the whole plane; inputs that already hold Inf/NaN make the
    bound non-finite.  ``a``/``b``: (x, weight) for the forward, (grad_out, weight) for grad_input,
    (grad_out, x) for grad_weight.

    Two stages: a coarse bound from the largest magnitudes (``|a|_1 <= H*W*max|a|``; one max/min
    reduction, about 1 ms at 8x128x56x56 where the per-plane L1 sums cost ~50) settles the common
    case; only when it fails (large values, or Inf/NaN, which make it non-finite) the per-plane L1
    bound above decides, accumulated in fp64."""
    if a.numel() == 0 or b.numel() == 0:
        return True
    limit = torch.finfo(_compute_dtype(a.dtype)).max * FFT_RANGE_MARGIN
    L = _fft_length_product(in_hw, k_hw, out_hw, p)
    if _coarse_bound(a, b, pass_) * L < limit:
        return True
    sa = _plane_l1(a)  # (N, C)
    if pass_ == "grad_weight":
        per_c = (sa * _plane_l1(b)).sum(0)
    else:
        per_c = sa.amax(0) * b.abs().sum(dim=(1, 2, 3), dtype=torch.float64)
    bound = float(per_c.max()) * L
    return bound < limit  # False for inf and nan
