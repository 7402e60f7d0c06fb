"""The ``cpu`` backend: direct convolution for small kernels, FFT for large ones.

Semantics (validated, normalised arguments; see :mod:`lkconv.params`)::

    out[n, c, i, j] = b[c] + sum_{a, b} w[c, a, b] * xpad[n, c, i*sh + a*dh, j*sw + b*dw]

**FFT path** (``torch.fft.rfft2`` / ``irfft2``), per axis (rows shown; columns are the same):
the stride-1 output ``y[i]`` (``i < n1 = (Ho-1)*sh + 1``) receives ``x[u]`` through tap ``a`` exactly
when ``i - u = delta_a = top - a*dh``.  Only taps with ``-(H-1) <= delta_a <= n1-1`` ever touch a real
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

**Direct path**: oneDNN through PyTorch, used where it is fast: forward ``F.conv2d`` with an
explicit ``F.pad`` when the padding is asymmetric or larger than :data:`DIRECT_MAX_CONV_PAD`
(oneDNN's padding cliff); grad_input ``aten.convolution_backward``; grad_weight as a *forward*
depthwise convolution of the padded input with grad_out as the kernel (:func:`direct_grad_weight`),
4-20x faster than aten's own weight gradient.  fp16/bf16 are computed in fp32.  A vectorised
"sum of shifted slices" implementation (:func:`slices_forward` & co.) is kept for the threshold
benchmark (``benchmarks/cpu_threshold.py``), which measured it slower than oneDNN for every pass.

**Non-finite inputs and overflow**: an FFT would smear a NaN/Inf over its whole plane, while
``F.conv2d`` keeps it local, and finite inputs can overflow inside the transform; each pass takes the
FFT only when one cheap bound of every intermediate (:func:`fft_in_range`) stays in range, else the
direct path.  The FFT's rounding error is relative to the plane's largest values, not local;
:func:`local_accuracy` makes the registered instance take the direct path.

**Dead padding**: the direct path crops the taps, input rows and padding that only ever meet
zeros (:func:`_crop`) before materialising any padding.

**Choice**: FFT when the kernel has at least a measured number of taps per output pixel, i.e.
``KH*KW >= threshold * sh*sw`` (per pass; :data:`FFT_MIN_TAPS_PER_PASS`, or
:data:`FFT_MIN_TAPS_PER_PASS_SINGLE_THREAD` when torch runs single-threaded) (the FFT path computes all stride-1 outputs; the direct one only
the strided ones).  The constant was measured by ``benchmarks/cpu_threshold.py``.

Forcing a path (tests, benchmarks): ``CPUBackend(path="fft" | "direct")``, or for the registered
instance the module-level :data:`FORCE_PATH` / the :func:`force_path` context manager.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..params import ConvParams
from .base import Backend

__all__ = [
    "CPUBackend",
    "FFT_MIN_TAPS",
    "FFT_MIN_TAPS_PER_PASS",
    "FFT_MIN_TAPS_PER_PASS_SINGLE_THREAD",
    "FORCE_PATH",
    "force_path",
    "local_accuracy",
    "fft_in_range",
    "choose_path",
    "next_fast_len",
    "fft_length",
    "fft_forward",
    "fft_grad_input",
    "fft_grad_weight",
    "direct_forward",
    "direct_grad_input",
    "direct_grad_weight",
    "slices_forward",
    "slices_grad_input",
    "slices_grad_weight",
]

#: FFT when KH*KW >= threshold * stride_h*stride_w.  Measured by benchmarks/cpu_threshold.py on the
#: 2-core dev box (N=8, C=128, 56x56, fp32, "same", 1 thread, process CPU time because the box is
#: shared; 64 MiB FFT chunks, the multi-threaded default; docs/cpu_backend.md has the tables):
#: against lkconv's direct path the FFT wins the forward and grad_input from K=21 (441 taps) and
#: grad_weight from K=27 (729 taps).
FFT_MIN_TAPS = 441

#: the threshold per pass (each pass switches where the FFT starts to win for it)
FFT_MIN_TAPS_PER_PASS = {"forward": FFT_MIN_TAPS, "grad_input": FFT_MIN_TAPS, "grad_weight": 729}

#: the same when torch runs single-threaded, where the FFT uses 1 MiB chunks and is ~2x faster
#: (measured the same way: FFT ahead or tied in all three passes from K=15, 225 taps; behind in the
#: forward at K=11)
FFT_MIN_TAPS_PER_PASS_SINGLE_THREAD = {"forward": 225, "grad_input": 225, "grad_weight": 225}

#: None (choose by FFT_MIN_TAPS), "fft" or "direct": overrides the choice of every CPUBackend that
#: was constructed without an explicit ``path``.
FORCE_PATH: Optional[str] = None

#: soft cap on the bytes of one complex chunk buffer (a few live at a time); None = automatic:
#: 1 MiB when torch runs single-threaded (cache-sized chunks: K=31 N=8 C=128 56x56 fwd+both grads
#: 100 ms vs 253 ms with 64 MiB, CPU time), 64 MiB when multi-threaded (each FFT call is an OpenMP
#: parallel region; fewer, bigger ones measured 560 ms vs 2556 ms with 4 MiB chunks, 2 threads, on
#: the loaded shared box)
CHUNK_BYTES: Optional[int] = None


def _chunk_bytes() -> int:
    if CHUNK_BYTES is not None:
        return CHUNK_BYTES
    return 2**20 if torch.get_num_threads() == 1 else 64 * 2**20


_PATHS = ("fft", "direct")


@contextlib.contextmanager
def force_path(path: Optional[str]):
    """``with force_path("fft"): ...`` — make the registered ``cpu`` backend use one path."""
    global FORCE_PATH
    if path is not None and path not in _PATHS:
        raise ValueError(f"lkconv: path must be one of {_PATHS} or None, got {path!r}")
    prev = FORCE_PATH
    FORCE_PATH = path
    try:
        yield
    finally:
        FORCE_PATH = prev


def choose_path(kh: int, kw: int, stride: Tuple[int, int], pass_: str = "forward",
                threads: Optional[int] = None) -> str:
    """The measured rule: "fft" for large kernels (per strided output pixel), else "direct".
    ``threads``: torch's intra-op thread count (default: the current one)."""
    if threads is None:
        threads = torch.get_num_threads()
    table = FFT_MIN_TAPS_PER_PASS_SINGLE_THREAD if threads == 1 else FFT_MIN_TAPS_PER_PASS
    return "fft" if kh * kw >= table[pass_] * stride[0] * stride[1] else "direct"


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
    cl = ref.dim() == 4 and not ref.is_contiguous() and ref.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=ref.device, memory_format=fmt)


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


# ------------------------------------------------------------------------------------------------
# direct path: PyTorch's own convolution (oneDNN for fp32), fp16/bf16 via fp32
# ------------------------------------------------------------------------------------------------
def _split_pad(p: ConvParams):
    t, b, l, r = p.padding
    if t == b and l == r:
        return None, [t, l]
    return (l, r, t, b), [0, 0]


def _live_axis(size: int, p0: int, k: int, dil: int, out: int, stride: int):
    """Crop of one axis to the taps that can meet a real input pixel.

    Tap ``a`` reads input rows ``i*stride + a*dil - p0`` for ``i < out``; it can only meet the input
    when that range overlaps ``[0, size)``, which holds for a contiguous range of taps
    ``[a_lo, a_hi]``.  Returns None when no tap meets the input, else ``(taps, rows, pad_lo,
    pad_hi)``: the kept taps, the input rows still read, and the padding still needed around them
    (at most ``(out-1)*stride`` per side), which give the same ``out`` outputs."""
    a_lo = max(0, -(((out - 1) * stride - p0) // dil))  # ceil((p0 - (out-1)*stride) / dil)
    a_hi = min(k - 1, (size - 1 + p0) // dil)
    if a_lo > a_hi:
        return None
    q0 = p0 - a_lo * dil  # the padding in front of the first kept tap (negative: skip input rows)
    need = (out - 1) * stride + (a_hi - a_lo) * dil + 1  # padded length the kept taps read
    u0, u1 = max(0, -q0), min(size, need - q0)
    return slice(a_lo, a_hi + 1), slice(u0, u1), max(0, q0), max(0, need - q0 - size)


def _crop(in_hw, k_hw, out_hw, p: ConvParams):
    """The geometry of :func:`_live_axis` on both axes: None when nothing changes, "empty" when no
    tap meets the input, else ``(tap_rows, tap_cols, in_rows, in_cols, params)``."""
    rows = _live_axis(in_hw[0], p.padding[0], k_hw[0], p.dilation[0], out_hw[0], p.stride[0])
    cols = _live_axis(in_hw[1], p.padding[2], k_hw[1], p.dilation[1], out_hw[1], p.stride[1])
    if rows is None or cols is None:
        return "empty"
    (tr, ir, pt, pb), (tc, ic, pl, pr) = rows, cols
    same = (tr == slice(0, k_hw[0]) and tc == slice(0, k_hw[1]) and ir == slice(0, in_hw[0])
            and ic == slice(0, in_hw[1]) and (pt, pb, pl, pr) == tuple(p.padding))
    if same:
        return None
    return tr, tc, ir, ic, ConvParams(p.stride, (pt, pb, pl, pr), p.dilation)


#: oneDNN's depthwise forward falls off a cliff (~10x slower) when the convolution's own padding is
#: >= 7 (measured: K=13 "same" (pad 6) 31 ms, K=15 (pad 7) 581 ms, K=16 pre-padded 58 ms at N=8,
#: C=128, 56x56, 1 thread), so larger paddings are applied by an explicit F.pad first.
DIRECT_MAX_CONV_PAD = 6


def direct_forward(x, weight, bias, p: ConvParams) -> torch.Tensor:
    # padding that only ever meets zeros is never materialised: crop the taps and the padding first
    out_hw = p.out_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3])
    c = _crop(tuple(x.shape[2:]), tuple(weight.shape[2:]), out_hw, p)
    if c == "empty":  # no tap meets the input: the output is the bias
        out = _out_like((x.shape[0], x.shape[1]) + tuple(out_hw), x, x.dtype)
        return out.zero_() if bias is None else out.copy_(bias.view(1, -1, 1, 1).expand_as(out))
    if c is not None:
        tr, tc, ir, ic, pc = c
        return direct_forward(x[:, :, ir, ic], weight[:, :, tr, tc], bias, pc)
    cdt = _compute_dtype(x.dtype)
    xc, wc = x.to(cdt), weight.to(cdt)
    bc = None if bias is None else bias.to(cdt)
    pre, pad = _split_pad(p)
    if pre is None and max(pad) > DIRECT_MAX_CONV_PAD:
        pre, pad = (pad[1], pad[1], pad[0], pad[0]), [0, 0]
    if pre is not None:
        xc = F.pad(xc, pre)
    out = F.conv2d(xc, wc, bc, p.stride, pad, p.dilation, groups=x.shape[1])
    return out.to(x.dtype)


def direct_grad_input(grad_out, weight, input_shape: Sequence[int], p: ConvParams) -> torch.Tensor:
    N, C, H, W = input_shape
    cdt = _compute_dtype(grad_out.dtype)
    if N == 0 or C == 0:
        return _out_like((N, C, H, W), grad_out, grad_out.dtype).zero_()
    c = _crop((H, W), tuple(weight.shape[2:]), tuple(grad_out.shape[2:]), p)
    if c is not None:  # input pixels no kept tap reads get a zero gradient
        gx = _out_like((N, C, H, W), grad_out, grad_out.dtype).zero_()
        if c != "empty":
            tr, tc, ir, ic, pc = c
            sub = (N, C, ir.stop - ir.start, ic.stop - ic.start)
            gx[:, :, ir, ic] = direct_grad_input(grad_out, weight[:, :, tr, tc], sub, pc)
        return gx
    pre, pad = _split_pad(p)
    shape = (N, C, H, W)
    if pre is not None:
        l, r, t, b = pre
        shape = (N, C, H + t + b, W + l + r)
    g = grad_out.to(cdt)
    dummy = g.new_empty(1).expand(shape)
    gx = torch.ops.aten.convolution_backward(
        g, dummy, weight.to(cdt), None, list(p.stride), pad, list(p.dilation),
        False, [0, 0], C, [True, False, False],
    )[0]
    if pre is not None:
        gx = gx[:, :, t : t + H, l : l + W]
    return gx.to(grad_out.dtype)


#: up to this many taps aten's own weight gradient is faster than the conv-with-grad_out-as-kernel
#: formulation (measured: K=3 6.2 vs 7.2 ms; K=5 146 vs 30 ms, 1 thread CPU time)
DIRECT_ATEN_GW_MAX_TAPS = 9


def _aten_grad_weight(grad_out, x, weight_shape, p: ConvParams) -> torch.Tensor:
    C = weight_shape[0]
    cdt = _compute_dtype(x.dtype)
    pre, pad = _split_pad(p)
    xc = x.to(cdt)
    if pre is not None:
        xc = F.pad(xc, pre)
    dummy = xc.new_empty(1).expand(tuple(weight_shape))
    gw = torch.ops.aten.convolution_backward(
        grad_out.to(cdt), xc, dummy, None, list(p.stride), pad, list(p.dilation),
        False, [0, 0], C, [False, True, False],
    )[1]
    return gw.to(x.dtype)


def direct_grad_weight(grad_out, x, weight_shape: Sequence[int], p: ConvParams) -> torch.Tensor:
    """grad_weight as a *forward* depthwise convolution in which grad_out is the kernel:

        gw[c, a, b] = sum_n sum_{i,j} xpad[n, c, a*dh + i*sh, b*dw + j*sw] * g[n, c, i, j]

    i.e. a valid convolution of xpad (one group per (n, c)) with the (Ho, Wo) kernel g, kernel
    dilation = stride, output stride = dilation, cropped to (KH, KW) and summed over n.  oneDNN
    runs this 4-15x faster than aten.convolution_backward's weight gradient (measured, see
    docs/cpu_backend.md)."""
    C, _, KH, KW = weight_shape
    N = x.shape[0]
    cdt = _compute_dtype(x.dtype)
    if N == 0 or C == 0:
        return torch.zeros(tuple(weight_shape), dtype=x.dtype, device=x.device)
    c = _crop(tuple(x.shape[2:]), (KH, KW), tuple(grad_out.shape[2:]), p)
    if c is not None:  # taps that never meet the input get a zero gradient
        gw = torch.zeros(tuple(weight_shape), dtype=x.dtype, device=x.device)
        if c != "empty":
            tr, tc, ir, ic, pc = c
            sub = (C, 1, tr.stop - tr.start, tc.stop - tc.start)
            gw[:, :, tr, tc] = direct_grad_weight(grad_out, x[:, :, ir, ic], sub, pc)
        return gw
    if KH * KW <= DIRECT_ATEN_GW_MAX_TAPS:
        return _aten_grad_weight(grad_out, x, weight_shape, p)
    t, b, l, r = p.padding
    Ho, Wo = grad_out.shape[2], grad_out.shape[3]
    xp = F.pad(x.to(cdt), (l, r, t, b)).contiguous()
    Hp, Wp = xp.shape[2], xp.shape[3]
    g = grad_out.to(cdt).contiguous().view(N * C, 1, Ho, Wo)
    gw = F.conv2d(xp.view(1, N * C, Hp, Wp), g, None, p.dilation, 0, p.stride, groups=N * C)
    gw = gw.view(N, C, gw.shape[2], gw.shape[3])[:, :, :KH, :KW].sum(0)
    return gw.to(x.dtype).view(C, 1, KH, KW)


# ------------------------------------------------------------------------------------------------
# direct path, own vectorised version: a sum of shifted slices (kept for the threshold benchmark)
# ------------------------------------------------------------------------------------------------
def _tap_slices(p: ConvParams, a: int, b: int, ho: int, wo: int):
    sh, sw = p.stride
    dh, dw = p.dilation
    r0, c0 = a * dh, b * dw
    return slice(r0, r0 + sh * (ho - 1) + 1, sh), slice(c0, c0 + sw * (wo - 1) + 1, sw)


def slices_forward(x, weight, bias, p: ConvParams) -> torch.Tensor:
    N, C, H, W = x.shape
    KH, KW = weight.shape[2], weight.shape[3]
    ho, wo = p.out_size(H, W, KH, KW)
    cdt = _compute_dtype(x.dtype)
    t, b_, l, r = p.padding
    xp = F.pad(x.to(cdt), (l, r, t, b_))
    w = weight.to(cdt).reshape(C, KH, KW)
    out = _out_like((N, C, ho, wo), x, cdt)
    if bias is None:
        out.zero_()
    else:
        out.copy_(bias.to(cdt).view(1, C, 1, 1).expand_as(out))
    for a in range(KH):
        for b in range(KW):
            rs, cs = _tap_slices(p, a, b, ho, wo)
            out.addcmul_(xp[:, :, rs, cs], w[:, a, b].view(1, C, 1, 1))
    return out.to(x.dtype)


def slices_grad_input(grad_out, weight, input_shape, p: ConvParams) -> torch.Tensor:
    N, C, H, W = input_shape
    KH, KW = weight.shape[2], weight.shape[3]
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    cdt = _compute_dtype(grad_out.dtype)
    t, b_, l, r = p.padding
    g = grad_out.to(cdt)
    w = weight.to(cdt).reshape(C, KH, KW)
    gxp = g.new_zeros((N, C, H + t + b_, W + l + r))
    for a in range(KH):
        for b in range(KW):
            rs, cs = _tap_slices(p, a, b, ho, wo)
            gxp[:, :, rs, cs].addcmul_(g, w[:, a, b].view(1, C, 1, 1))
    return gxp[:, :, t : t + H, l : l + W].to(grad_out.dtype)


def slices_grad_weight(grad_out, x, weight_shape, p: ConvParams) -> torch.Tensor:
    C, _, KH, KW = weight_shape
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    cdt = _compute_dtype(x.dtype)
    t, b_, l, r = p.padding
    xp = F.pad(x.to(cdt), (l, r, t, b_))
    g = grad_out.to(cdt)
    gw = torch.empty((C, KH, KW), dtype=cdt, device=x.device)
    # per tap: one batched dot product per channel, (C, 1, M) @ (C, M, 1) with M = N*ho*wo
    gc = g.transpose(0, 1).reshape(C, 1, -1)
    for a in range(KH):
        for b in range(KW):
            rs, cs = _tap_slices(p, a, b, ho, wo)
            xs = xp[:, :, rs, cs].transpose(0, 1).reshape(C, -1, 1)
            gw[:, a, b] = torch.bmm(gc, xs).view(C)
    return gw.to(x.dtype).view(C, 1, KH, KW)


# ------------------------------------------------------------------------------------------------
def _finite(*ts) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)


def _plane_l1(t: torch.Tensor) -> torch.Tensor:
    """(N, C) sums of |t| over each plane, accumulated in fp64 (inf/nan if t holds any)."""
    return t.abs().sum(dim=(2, 3), dtype=torch.float64)


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
    (grad_out, x) for grad_weight.  One pass over the data, accumulated in fp64."""
    if a.numel() == 0 or b.numel() == 0:
        return True
    limit = torch.finfo(_compute_dtype(a.dtype)).max * FFT_RANGE_MARGIN
    L = _fft_length_product(in_hw, k_hw, out_hw, p)
    sa = _plane_l1(a)  # (N, C)
    if pass_ == "grad_weight":
        per_c = (sa * _plane_l1(b)).sum(0)
    else:
        per_c = sa.amax(0) * b.abs().sum(dim=(1, 2, 3), dtype=torch.float64)
    bound = float(per_c.max()) * L
    return bound < limit  # False for inf and nan


def local_accuracy():
    """``with local_accuracy(): ...`` — the registered ``cpu`` backend (so ``auto`` on CPU tensors)
    takes the direct path, whose error is local like ``F.conv2d``'s, instead of the FFT, whose error
    is relative to the largest values of the plane (see docs/cpu_backend.md).  The same as
    ``force_path("direct")``."""
    return force_path("direct")


class CPUBackend(Backend):
    name = "cpu"
    description = (
        "CPU: FFT (rfft2, exact, no wrap-around) for large kernels, oneDNN direct for small ones; "
        "switch point measured; fp32/fp64 (+fp16/bf16 via fp32)"
    )

    def __init__(self, path: Optional[str] = None):
        if path is not None and path not in _PATHS:
            raise ValueError(f"lkconv: CPUBackend path must be one of {_PATHS} or None, got {path!r}")
        self.path = path

    def check(self, x, weight, params, pass_):
        if x.device.type != "cpu":
            return f"the cpu backend runs on CPU tensors only (got a tensor on {x.device.type})"
        if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            return f"the cpu backend supports float32/float64/float16/bfloat16, not {x.dtype}"
        if weight.device.type != "cpu":
            return f"the cpu backend runs on CPU tensors only (weight on {weight.device.type})"
        return None

    def _path(self, weight_shape, p: ConvParams, pass_: str = "forward") -> str:
        if self.path is not None:
            return self.path
        if FORCE_PATH is not None:
            return FORCE_PATH
        return choose_path(weight_shape[2], weight_shape[3], p.stride, pass_)

    # An FFT spreads a NaN/Inf over its whole plane; torch's convolution keeps it local.  Inputs
    # that are not all finite therefore take the direct path (one cheap pass over the data), so
    # NaN/Inf propagate exactly as in F.conv2d.
    # Likewise an FFT whose intermediates could overflow (fft_in_range) takes the direct path.
    def forward(self, x, weight, bias, params):
        kh_kw, out_hw = tuple(weight.shape[2:]), params.out_size(x.shape[2], x.shape[3], *weight.shape[2:])
        if (self._path(weight.shape, params, "forward") == "fft"
                and fft_in_range(x, weight, tuple(x.shape[2:]), kh_kw, out_hw, params, "forward")):
            return fft_forward(x, weight, bias, params)
        return direct_forward(x, weight, bias, params)

    def grad_input(self, grad_out, weight, input_shape, params):
        if (self._path(weight.shape, params, "grad_input") == "fft"
                and fft_in_range(grad_out, weight, tuple(input_shape[2:]), tuple(weight.shape[2:]),
                                 tuple(grad_out.shape[2:]), params, "grad_input")):
            return fft_grad_input(grad_out, weight, input_shape, params)
        return direct_grad_input(grad_out, weight, input_shape, params)

    def grad_weight(self, grad_out, x, weight_shape, params):
        if (self._path(weight_shape, params, "grad_weight") == "fft"
                and fft_in_range(grad_out, x, tuple(x.shape[2:]), tuple(weight_shape[2:]),
                                 tuple(grad_out.shape[2:]), params, "grad_weight")):
            return fft_grad_weight(grad_out, x, weight_shape, params)
        return direct_grad_weight(grad_out, x, weight_shape, params)
