"""Triton kernels of the lkconv ``triton`` backend (imported lazily: importing this module imports
triton, and triton decides *at decoration time* whether ``@triton.jit`` compiles for the GPU or runs
in the CPU interpreter; :data:`INTERPRETED` records which).

Notation (one channel ``c`` of one image ``n``; all passes are per-plane, the depthwise structure
means there is no reduction over channels)::

    y[i, j] = b + sum_{kh, kw} f[kh, kw] * x[i*SH + kh*DH - PT, j*SW + kw*DW - PL]      (0 outside x)

**Row-Toeplitz implicit GEMM** (docs/architecture.md, "Row-Toeplitz implicit GEMM").  For one kernel row ``kh`` the 1-D convolution
along W of a tile of BM output rows by BN output columns is a matrix product::

    Y[BM, BN] += X_kh[BM, BK] @ T_kh[BK, BN],   T_kh[k, n] = f[kh, (k - n*SW) / DW]

where ``X_kh`` holds BK consecutive input columns of the BM input rows ``i*SH + kh*DH - PT`` and
``T_kh`` is gathered from the filter with a mask (zero where ``(k - n*SW)`` is not a multiple of DW
in ``[0, KW*DW)``).  The input columns a tile needs span ``L = (BN-1)*SW + (KW-1)*DW + 1``; they are
walked in chunks of BK, and both the kernel rows and the column chunks are clipped to the part that
touches real input (taps that fall entirely into the padding are skipped: for K >= H most are).

* :func:`dwconv_forward_kernel` — forward, any stride/dilation, signed padding offsets (so grad_input at
  stride 1 is this kernel on ``grad_out`` with the flipped filter and offsets ``(K-1)*D - P``).
* :func:`dwconv_grad_input_kernel` — grad_input for stride > 1 (the transposed Toeplitz: ``T[j, w] = f[kh,
  (w + PL - j*SW) / DW]``, rows of grad_out picked by ``(h + PT - kh*DH) / SH``, masked where not
  integral).  Correct for any stride; half (or more) of its row loads are masked at stride 2.
* :func:`dwconv_grad_weight_kernel` — grad_weight as a GEMM with M = kernel rows, N = kernel columns and the
  reduction over (output row, input column) pairs: ``dW[kh, kw] += X[kh-rows, cols] @ G_T[cols,
  kw]`` with ``G_T[k, kw] = g[i, (k + PL - kw*DW) / SW]`` (a Toeplitz gather of one grad_out row).
  Each program reduces a contiguous range of (n, i) rows into fp32 partials ``ws[split, c, kh, kw]``;
  the launcher sums the splits in a fixed order (deterministic, no atomics) and casts once.

Every accumulator is fp32.  16-bit operands go to ``tl.dot`` as they are (tensor cores on the GPU);
fp32 operands use ``input_precision=PREC`` ("tf32" or "ieee", chosen by the launcher from
``torch.backends.cudnn.allow_tf32``).  ``UPCAST`` (constexpr) converts operands to fp32 before the dot:
the launcher sets it for bf16 under the interpreter, whose bf16 ``tl.dot`` is wrong.

Kernel sizes are runtime arguments (one binary serves every K; only stride, dilation, flags, dtype
and tile sizes are compile-time), which keeps the number of compiles on a cold cache small.

Offsets: the (n, c) plane base is always computed in int64; with ``BIG`` the in-plane offsets are
int64 as well (the launcher sets it when an in-plane offset can reach 2**31).
"""
from __future__ import annotations

import triton
import triton.language as tl

#: True when these kernels were created for the CPU interpreter (TRITON_INTERPRET=1 at import time)
INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if PREC is None:
        acc = tl.dot(a, b, acc)
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def dwconv_forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    NC, C, H, W, HO, WO,
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    PT, PL,
    KH, KW,
    SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    HAS_BIAS: tl.constexpr, PLANE_FAST: tl.constexpr, BIG: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tw = tl.cdiv(WO, BN)
    n_tiles = tl.cdiv(HO, BM) * n_tw
    if PLANE_FAST:  # channels_last: neighbouring programs read the same cache lines
        plane = pid % NC
        tile = pid // NC
    else:
        tile = pid % n_tiles
        plane = pid // n_tiles
    n = plane // C
    c = plane % C
    i0 = (tile // n_tw) * BM
    j0 = (tile % n_tw) * BN

    x_base = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    y_base = y_ptr + n.to(tl.int64) * syn + c.to(tl.int64) * syc
    f_base = w_ptr + c.to(tl.int64) * (KH * KW)

    offs_m = i0 + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)

    # kernel rows that reach a real input row for some output row of this tile
    i_last = tl.minimum(i0 + BM, HO) - 1
    kh_lo = (tl.maximum(PT - i_last * SH, 0) + DH - 1) // DH
    kh_hi = tl.minimum((tl.maximum(H - 1 + PT - i0 * SH, -1) + DH) // DH, KH)
    # input columns of the tile: c0 + [0, L), clipped to the real input [0, W)
    c0 = j0 * SW - PL
    L = (BN - 1) * SW + (KW - 1) * DW + 1
    k_lo = tl.maximum(-c0, 0)
    k_hi = tl.minimum(W - c0, L)

    # one flat loop over (kernel row, column chunk): a single pipelinable loop for the compiler
    n_chunks = (tl.maximum(k_hi - k_lo, 0) + BK - 1) // BK
    n_iter = tl.maximum(kh_hi - kh_lo, 0) * n_chunks

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for it in range(0, n_iter):
        kh = kh_lo + it // n_chunks
        kk = k_lo + (it % n_chunks) * BK + offs_k
        rows = offs_m * SH + kh * DH - PT
        rmask = (rows >= 0) & (rows < H)
        cols = c0 + kk
        cmask = cols < W
        if BIG:
            rows = rows.to(tl.int64)
            cols = cols.to(tl.int64)
        a = tl.load(
            x_base + rows[:, None] * sxh + cols[None, :] * sxw,
            mask=rmask[:, None] & cmask[None, :],
            other=0.0,
        )
        d = kk[:, None] - offs_n[None, :] * SW
        if DW == 1:
            kw = d
            tmask = (d >= 0) & (d < KW)
        else:
            kw = d // DW
            tmask = (d >= 0) & (d % DW == 0) & (kw < KW)
        t = tl.load(f_base + kh * KW + kw, mask=tmask, other=0.0)
        acc = _mma(a, t, acc, PREC, UPCAST)

    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    ocols = j0 + offs_n
    orows = offs_m
    if BIG:
        ocols = ocols.to(tl.int64)
        orows = orows.to(tl.int64)
    tl.store(
        y_base + orows[:, None] * syh + ocols[None, :] * syw,
        acc.to(y_ptr.dtype.element_ty),
        mask=(offs_m < HO)[:, None] & ((j0 + offs_n) < WO)[None, :],
    )


@triton.jit
def dwconv_grad_input_kernel(
    g_ptr, w_ptr, gx_ptr,
    NC, C, H, W, HO, WO,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    PT, PL,
    KH, KW,
    SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    PLANE_FAST: tl.constexpr, BIG: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """grad_input by the transposed Toeplitz (any stride; used for stride > 1).  Tiles cover
    grad_input (H x W); the reduction runs over grad_out columns j."""
    pid = tl.program_id(0)
    n_tw = tl.cdiv(W, BN)
    n_tiles = tl.cdiv(H, BM) * n_tw
    if PLANE_FAST:
        plane = pid % NC
        tile = pid // NC
    else:
        tile = pid % n_tiles
        plane = pid // n_tiles
    n = plane // C
    c = plane % C
    h0 = (tile // n_tw) * BM
    w0 = (tile % n_tw) * BN

    g_base = g_ptr + n.to(tl.int64) * sgn + c.to(tl.int64) * sgc
    x_base = gx_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    f_base = w_ptr + c.to(tl.int64) * (KH * KW)

    offs_m = h0 + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)

    # kernel rows with 0 <= h + PT - kh*DH <= (HO-1)*SH for some h of the tile
    h_last = tl.minimum(h0 + BM, H) - 1
    kh_hi = tl.minimum((tl.maximum(h_last + PT, -1) + DH) // DH, KH)
    kh_lo = (tl.maximum(h0 + PT - (HO - 1) * SH, 0) + DH - 1) // DH
    # grad_out columns j with j*SW in [w0 + PL - (KW-1)*DW, w0 + BN - 1 + PL]
    j_lo = (tl.maximum(w0 + PL - (KW - 1) * DW, 0) + SW - 1) // SW
    j_hi = tl.minimum((tl.maximum(w0 + BN - 1 + PL, -1) + SW) // SW, WO)

    n_chunks = (tl.maximum(j_hi - j_lo, 0) + BK - 1) // BK
    n_iter = tl.maximum(kh_hi - kh_lo, 0) * n_chunks

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for it in range(0, n_iter):
        kh = kh_lo + it // n_chunks
        jj = j_lo + (it % n_chunks) * BK + offs_k
        num = offs_m + PT - kh * DH
        gi = num // SH
        rmask = (num >= 0) & (num % SH == 0) & (gi < HO)
        jmask = jj < j_hi
        jjo = jj
        if BIG:
            gi = gi.to(tl.int64)
            jjo = jj.to(tl.int64)
        a = tl.load(
            g_base + gi[:, None] * sgh + jjo[None, :] * sgw,
            mask=rmask[:, None] & jmask[None, :],
            other=0.0,
        )
        d = (w0 + offs_n)[None, :] + PL - jj[:, None] * SW
        if DW == 1:
            kw = d
            tmask = (d >= 0) & (d < KW)
        else:
            kw = d // DW
            tmask = (d >= 0) & (d % DW == 0) & (kw < KW)
        t = tl.load(f_base + kh * KW + kw, mask=tmask, other=0.0)
        acc = _mma(a, t, acc, PREC, UPCAST)

    ocols = w0 + offs_n
    orows = offs_m
    if BIG:
        ocols = ocols.to(tl.int64)
        orows = orows.to(tl.int64)
    tl.store(
        x_base + orows[:, None] * sxh + ocols[None, :] * sxw,
        acc.to(gx_ptr.dtype.element_ty),
        mask=(offs_m < H)[:, None] & ((w0 + offs_n) < W)[None, :],
    )


@triton.jit
def dwconv_grad_weight_kernel(
    x_ptr, g_ptr, ws_ptr,
    C, H, W, HO, WO, ROWS, ROWS_PER_SPLIT,
    sxn, sxc, sxh, sxw,
    sgn, sgc, sgh, sgw,
    PT, PL,
    KH, KW,
    SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BIG: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BKH: tl.constexpr, BKW: tl.constexpr, BK: tl.constexpr,
):
    """fp32 partial grad_weight of one (channel, kh block, kw block, split of the N*HO rows)."""
    pid = tl.program_id(0)
    n_khb = tl.cdiv(KH, BKH)
    n_kwb = tl.cdiv(KW, BKW)
    c = pid % C
    r = pid // C
    kwb = r % n_kwb
    r = r // n_kwb
    khb = r % n_khb
    s = r // n_khb
    kh0 = khb * BKH
    kw0 = kwb * BKW

    offs_h = kh0 + tl.arange(0, BKH)
    offs_w = kw0 + tl.arange(0, BKW)
    offs_k = tl.arange(0, BK)
    kw_last = tl.minimum(kw0 + BKW, KW) - 1

    # input columns this kw block can meet: j*SW + kw*DW - PL, j < WO, kw in [kw0, kw_last]
    col_lo = tl.maximum(kw0 * DW - PL, 0)
    col_hi = tl.minimum((WO - 1) * SW + kw_last * DW - PL + 1, W)

    q_lo = s * ROWS_PER_SPLIT
    q_hi = tl.minimum(q_lo + ROWS_PER_SPLIT, ROWS)
    n_chunks = (tl.maximum(col_hi - col_lo, 0) + BK - 1) // BK
    n_iter = tl.maximum(q_hi - q_lo, 0) * n_chunks
    kwmask = (offs_w < KW)[None, :]
    khmask = offs_h < KH
    c64 = c.to(tl.int64)
    acc = tl.zeros((BKH, BKW), dtype=tl.float32)
    # one flat loop over (row q = (n, i), column chunk); rows of the kh block that fall into the
    # padding are masked (the loads are skipped, the dot adds zeros)
    for it in range(0, n_iter):
        q = q_lo + it // n_chunks
        cols = col_lo + (it % n_chunks) * BK + offs_k
        n = q // HO
        i = q % HO
        x_base = x_ptr + n.to(tl.int64) * sxn + c64 * sxc
        g_row = g_ptr + n.to(tl.int64) * sgn + c64 * sgc + i.to(tl.int64) * sgh
        rows = i * SH + offs_h * DH - PT
        rmask = (rows >= 0) & (rows < H) & khmask
        cmask = cols < W
        colso = cols
        if BIG:
            rows = rows.to(tl.int64)
            colso = cols.to(tl.int64)
        a = tl.load(
            x_base + rows[:, None] * sxh + colso[None, :] * sxw,
            mask=rmask[:, None] & cmask[None, :],
            other=0.0,
        )
        d = cols[:, None] + PL - offs_w[None, :] * DW  # = j * SW
        if SW == 1:
            jj = d
            bmask = (d >= 0) & (d < WO) & kwmask
        else:
            jj = d // SW
            bmask = (d >= 0) & (d % SW == 0) & (jj < WO) & kwmask
        if BIG:
            jj = jj.to(tl.int64)
        b = tl.load(g_row + jj * sgw, mask=bmask, other=0.0)
        acc = _mma(a, b, acc, PREC, UPCAST)

    ws = ws_ptr + (s.to(tl.int64) * C + c) * (KH * KW)
    tl.store(
        ws + offs_h[:, None] * KW + offs_w[None, :],
        acc,
        mask=(offs_h < KH)[:, None] & kwmask,
    )


# ------------------------------------------------------------------------------------------------
# aligned variants (the default path): the input is read from a zero-bordered, aligned copy and the
# Toeplitz operand from a precomputed band, so every operand load is contiguous and provably aligned
# ------------------------------------------------------------------------------------------------
#: column alignment (elements) of the aligned input copy and of every chunk start
ALIGN = 16


@triton.jit
def dwconv_forward_aligned_kernel(
    xp_ptr, t_ptr, b_ptr, y_ptr,
    N, C, H, W, WP, HO, WO,
    sxp,
    syn, syc, syh, syw,
    PT, PL16, LBORD,
    KH, LB,
    SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIG: tl.constexpr, PACKED: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KHB: tl.constexpr,
):
    """Forward (and grad_input at stride 1) from aligned operands.

    ``xp`` is the input as contiguous planes ``[N*C, H, WP]`` with every row shifted right by
    ``LBORD = PL mod 16`` zero columns and zero-filled up to ``WP`` (a multiple of 16): input column
    ``x`` of the original is column ``x + LBORD`` of ``xp``, so the first input column a tile needs,
    ``j0*SW - PL``, sits at ``j0*SW - PL16`` (``PL16 = PL - LBORD``, a multiple of 16) -- a multiple
    of 16 for every tile.  ``t`` is the Toeplitz band ``[C, KH, LB, BN]``, ``t[c, kh, r, n] =
    f[c, kh, (r - n*SW) / DW]`` (zero where not integral or outside ``[0, KW)``; the dilation is in
    the band, not in the kernel), ``LB`` = the tile's input-column span rounded up to 16.  Per
    (kernel row, column chunk) the kernel loads ``A = xp[rows, s + k0 : s + k0 + BK]`` and ``T =
    t[c, kh, k0 : k0 + BK, :]``: both contiguous along their fast axis, masks constant over 16
    elements, so they compile to 16-byte vector loads (cp.async when pipelined).  The mathematics is
    the one of :func:`dwconv_forward_kernel`.

    One dot covers ``KHB`` kernel rows: GEMM-K = ``KHB * BK`` with ``k = (kernel row - kh, column
    k0 + k % BK)``, i.e. ``Y += [X_kh | X_kh+1 | ...] @ [T_kh; T_kh+1; ...]`` -- fewer, larger dots
    (the per-iteration overhead is paid once per ``KHB`` kernel rows); kernel rows past the tile's
    last useful one are masked (zeros).

    ``PACKED`` (small planes, ``2*HO <= BM``): one tile holds ``BM // HO`` whole output planes of
    the same channel (consecutive images ``n``) stacked along GEMM-M -- the filter band is the same
    for all of them, so they share every ``T``; tile row ``m`` is output row ``m % HO`` of image
    ``g*pack + m // HO``."""
    pid = tl.program_id(0)
    n_tw = tl.cdiv(WO, BN)
    if PACKED:
        pack = BM // HO
        n_grp = tl.cdiv(N, pack)
        j0 = (pid % n_tw) * BN
        r = pid // n_tw
        g = r % n_grp
        c = r // n_grp
        i0 = 0
        pm = tl.arange(0, BM) // HO
        offs_m = tl.arange(0, BM) % HO
        nrow = g * pack + pm
        mvalid = (pm < pack) & (nrow < N)
        x_base = xp_ptr + ((nrow * C + c).to(tl.int64) * sxp)[:, None]
        y_base = y_ptr + (nrow.to(tl.int64) * syn + c.to(tl.int64) * syc)[:, None]
    else:
        n_tiles = tl.cdiv(HO, BM) * n_tw
        tile = pid % n_tiles
        plane = pid // n_tiles
        n = plane // C
        c = plane % C
        i0 = (tile // n_tw) * BM
        j0 = (tile % n_tw) * BN
        offs_m = i0 + tl.arange(0, BM)
        mvalid = offs_m < HO
        x_base = xp_ptr + plane.to(tl.int64) * sxp
        y_base = y_ptr + n.to(tl.int64) * syn + c.to(tl.int64) * syc
    t_base = t_ptr + c.to(tl.int64) * KH * LB * BN

    offs_n = tl.arange(0, BN)

    i_last = tl.minimum(i0 + BM, HO) - 1
    kh_lo = (tl.maximum(PT - i_last * SH, 0) + DH - 1) // DH
    kh_hi = tl.minimum((tl.maximum(H - 1 + PT - i0 * SH, -1) + DH) // DH, KH)
    # padded column of the tile's first input column (a multiple of 16), and the band rows that
    # meet real input, the start rounded down to 16 so every chunk starts aligned
    s = j0 * SW - PL16
    k_lo = (tl.maximum(LBORD - s, 0) // 16) * 16
    k_hi = tl.minimum(LBORD + W - s, LB)
    n_chunks = (tl.maximum(k_hi - k_lo, 0) + BK - 1) // BK
    n_iter = ((tl.maximum(kh_hi - kh_lo, 0) + KHB - 1) // KHB) * n_chunks

    offs_kk = tl.arange(0, KHB * BK)
    sub = offs_kk // BK  # kernel row within the group
    kcol = offs_kk % BK  # column within the chunk
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # (kernel row group, chunk) carried as counters: no integer division in the loop
    khg = kh_lo
    ch = 0
    for it in range(0, n_iter):
        kh = khg + sub
        khmask = kh < kh_hi
        kk = k_lo + ch * BK + kcol
        rows = offs_m[:, None] * SH + (kh * DH - PT)[None, :]
        cols = s + kk
        if BIG:
            rows = rows.to(tl.int64)
        a = tl.load(
            x_base + rows * WP + cols[None, :],
            mask=(rows >= 0) & (rows < H) & mvalid[:, None] & (khmask & (cols < WP))[None, :],
            other=0.0,
        )
        t = tl.load(
            t_base + (kh * LB + kk)[:, None] * BN + offs_n[None, :],
            mask=(khmask & (kk < LB))[:, None],
            other=0.0,
        )
        acc = _mma(a, t, acc, PREC, UPCAST)
        ch += 1
        wrap = ch == n_chunks
        khg = tl.where(wrap, khg + KHB, khg)
        ch = tl.where(wrap, 0, ch)

    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    ocols = j0 + offs_n
    orows = offs_m
    if BIG:
        ocols = ocols.to(tl.int64)
        orows = orows.to(tl.int64)
    tl.store(
        y_base + orows[:, None] * syh + ocols[None, :] * syw,
        acc.to(y_ptr.dtype.element_ty),
        mask=mvalid[:, None] & ((j0 + offs_n) < WO)[None, :],
    )


@triton.jit
def dwconv_grad_weight_aligned_kernel(
    xp_ptr, g_ptr, ws_ptr,
    C, H, WP, HO, WO, SGROUPS, SG_PER_SPLIT,
    sxp,
    sgn, sgc, sgh, sgw,
    PT, PL16,
    KH, KW,
    SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BIG: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BKH: tl.constexpr, NA: tl.constexpr, RS: tl.constexpr, BKC: tl.constexpr, R: tl.constexpr,
):
    """fp32 partial grad_weight of one (channel, kernel block, split of the N*HO rows), with GEMM-M =
    ``BKH * NA`` (kernel rows x column groups of 16) so that K = 17..32 gives M = 64.

    With ``kw = kw0 + 16*a + b`` (``a < NA``, ``b < 16``) and ``u = j*SW + b*DW`` the padded column
    of ``xp`` (layout of :func:`dwconv_forward_aligned_kernel`) is ``u + (kw0 + 16*a)*DW - PL16``, so::

        dW[kh, kw0 + 16a + b] = sum_{q, u} A[(a, kh), (q, u)] * B[(q, u), b]
        A[(a, kh), (q, u)] = xp[q's row i*SH + kh*DH - PT, u + (kw0 + 16a)*DW - PL16]
        B[(q, u), b]       = g[q, (u - b*DW) / SW]     (zero where not integral or outside [0, WO))

    A is a set of contiguous, 16-aligned row segments of the input (vector loads); B, the Toeplitz
    side, is a 16-column gather of grad_out (half the gather per MAC of a 32-column one).  One dot
    reduces ``R`` output rows of one image (each ``BKC`` columns ``u``): GEMM-K = ``R * BKC``.
    The output rows of each image are cut into super-groups of ``RS`` rows (``RS`` a multiple of
    every tuned ``R``, so the split does not depend on the config); the ``N * cdiv(HO, RS)``
    super-groups are split into contiguous ranges of ``SG_PER_SPLIT``, one per program (fp32
    partials ``ws[split]``, summed in a fixed order by the launcher)."""
    tl.static_assert(RS % R == 0)
    BM: tl.constexpr = BKH * NA
    BK: tl.constexpr = R * BKC
    pid = tl.program_id(0)
    n_khb = tl.cdiv(KH, BKH)
    n_kwb = tl.cdiv(KW, 16 * NA)
    c = pid % C
    r = pid // C
    kwb = r % n_kwb
    r = r // n_kwb
    khb = r % n_khb
    s = r // n_khb
    kh0 = khb * BKH
    kw0 = kwb * (16 * NA)

    offs_m = tl.arange(0, BM)
    am = offs_m // BKH
    kh = kh0 + offs_m % BKH
    shift = (kw0 + 16 * am) * DW - PL16  # a multiple of 16 when PL16 is
    mmask = (kh < KH) & (kw0 + 16 * am < KW)
    offs_k = tl.arange(0, BK)
    kr = offs_k // BKC
    ku = offs_k % BKC
    offs_b = tl.arange(0, 16)

    # u = j*SW + b*DW over j < WO, b < 16
    n_chunks = ((WO - 1) * SW + 15 * DW + 1 + BKC - 1) // BKC
    n_sg = (HO + RS - 1) // RS  # super-groups per image
    hop = n_sg * RS  # rows per image including the masked tail of the last super-group
    g_lo = s * SG_PER_SPLIT
    g_hi = tl.minimum(g_lo + SG_PER_SPLIT, SGROUPS)
    n_iter = tl.maximum(g_hi - g_lo, 0) * (RS // R) * n_chunks
    c64 = c.to(tl.int64)
    acc = tl.zeros((BM, 16), dtype=tl.float32)
    # (image, first row of the group, column chunk) carried as counters: no division in the loop
    n = g_lo // n_sg
    i0 = (g_lo % n_sg) * RS
    ch = 0
    for it in range(0, n_iter):
        i = i0 + kr
        qmask = i < HO
        u = ch * BKC + ku
        rows = i[None, :] * SH + (kh * DH - PT)[:, None]
        cols = u[None, :] + shift[:, None]
        amask = (rows >= 0) & (rows < H) & mmask[:, None] & qmask[None, :] & (cols >= 0) & (cols < WP)
        x_base = xp_ptr + (n * C + c).to(tl.int64) * sxp
        if BIG:
            rows = rows.to(tl.int64)
        a = tl.load(x_base + rows * WP + cols, mask=amask, other=0.0)
        d = u[:, None] - offs_b[None, :] * DW  # = j * SW
        if SW == 1:
            jj = d
            bmask = (d >= 0) & (d < WO)
        else:
            jj = d // SW
            bmask = (d >= 0) & (d % SW == 0) & (jj < WO)
        bmask = bmask & qmask[:, None]
        g_base = g_ptr + n.to(tl.int64) * sgn + c64 * sgc
        g_row = i * sgh
        if BIG:
            jj = jj.to(tl.int64)
            g_row = i.to(tl.int64) * sgh
        b = tl.load(g_base + g_row[:, None] + jj * sgw, mask=bmask, other=0.0)
        acc = _mma(a, b, acc, PREC, UPCAST)
        ch += 1
        wrap = ch == n_chunks
        ch = tl.where(wrap, 0, ch)
        i0 = tl.where(wrap, i0 + R, i0)
        nwrap = i0 >= hop
        n = tl.where(nwrap, n + 1, n)
        i0 = tl.where(nwrap, 0, i0)

    kw = kw0 + 16 * am[:, None] + offs_b[None, :]
    ws = ws_ptr + (s.to(tl.int64) * C + c) * (KH * KW)
    tl.store(ws + kh[:, None] * KW + kw, acc, mask=(kh < KH)[:, None] & (kw < KW))


# ------------------------------------------------------------------------------------------------
# grad_weight by row outer products and a diagonal sum (the default grad_weight for WO <= 128)
# ------------------------------------------------------------------------------------------------
@triton.jit
def dwconv_grad_weight_diag_kernel(
    xg_ptr, g_ptr, z_ptr, ws_ptr,
    N, C, H, W, HO, WO, N_PER_SPLIT, HG,
    GPV, GRV, WOV,
    PT, PL,
    KH, KW,
    SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    WQ: tl.constexpr, VEC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKR: tl.constexpr,
    IMG: tl.constexpr, KWB: tl.constexpr,
):
    """fp32 partial grad_weight of one (channel, block of ``KHT = BM // WQ`` kernel rows, split of the
    images) as one GEMM whose reduction runs over output rows, and a diagonal sum.

    ``xg`` is the input as planes ``[N*C, HG, WQ]``, ``xg[p, r, u] = x[p, r - TB, u]`` with ``TB =
    (KHT - 1) * DH`` zero rows on top, zero outside x (``WQ`` a power of two >= W, ``HG = H + 2*TB``);
    ``g`` is grad_out with rows of ``GRV * VEC`` elements and planes of ``GPV * VEC`` (strides passed
    in units of ``VEC`` = one 16-byte vector, so that the compiler can prove every row start aligned;
    ``WOV * VEC`` columns of a row may be read).  For output row ``q = (n, i)`` and ``m = (kh - kh0)
    * WQ + u``::

        Z[m, v] = sum_q A[q, m] * B[q, v],   A[q, m] = x[n, c, i*SH + kh*DH - PT, u],   B[q, v] = g[n, c, i, v]

    -- both operands are plain contiguous, aligned row segments (16-byte vector loads, cp.async when
    pipelined; GEMM-M = ``BM`` = 64 for wgmma, GEMM-N = ``BN`` >= WO, GEMM-K = ``BKR`` output rows
    of ``IMG`` images per dot; the operand offsets are loop-invariant, each iteration adds one scalar
    per operand).
    The reduction runs over the output rows that meet a real input row for some kernel row of the
    block (so every row read lies in ``xg``: at most ``TB`` rows outside x on either side).  Then
    ``dW[kh, kw] = sum_v Z[(kh - kh0)*WQ + v*SW + kw*DW - PL, v]`` over ``v < WO`` and real input
    columns: the program stores Z to its own scratch slot, synchronises its threads and sums the
    ``KW`` diagonals.  Deterministic: each program writes its own ``ws[split, c, kh, :]``."""
    KHT: tl.constexpr = BM // WQ
    TB: tl.constexpr = (KHT - 1) * DH
    pid = tl.program_id(0)
    n_mt = tl.cdiv(KH, KHT)
    mt = pid % n_mt
    r = pid // n_mt
    c = r % C
    s = r // C
    kh0 = mt * KHT

    offs_m = tl.arange(0, BM)
    offs_k = tl.arange(0, IMG * BKR)
    kr = offs_k % BKR  # output row within the chunk
    ki = offs_k // BKR  # image within the chunk
    offs_v = tl.arange(0, BN)
    # loop-invariant operand offsets (rows of the chunk x columns)
    a_off = (ki * (C * HG * WQ) + kr * (SH * WQ))[:, None] + ((kh0 + offs_m // WQ) * (DH * WQ) + offs_m % WQ)[None, :]
    b_off = (ki * (C * GPV * VEC) + kr * (GRV * VEC))[:, None] + offs_v[None, :]
    vmask = (offs_v < WOV * VEC)[None, :]

    # output rows i that meet a real input row for some kernel row of the block
    kh_last = tl.minimum(kh0 + KHT, KH) - 1
    i_lo = (tl.maximum(PT - kh_last * DH, 0) + SH - 1) // SH
    i_hi = tl.minimum((tl.maximum(H - 1 + PT - kh0 * DH, -1) + SH) // SH, HO)
    n_ch = (tl.maximum(i_hi - i_lo, 0) + BKR - 1) // BKR
    n_lo = s * N_PER_SPLIT
    n_hi = tl.minimum(n_lo + N_PER_SPLIT, N)
    n_iter = ((tl.maximum(n_hi - n_lo, 0) + IMG - 1) // IMG) * n_ch

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    n = n_lo
    plane = (n_lo * C + c).to(tl.int64)
    i0 = i_lo
    for it in range(0, n_iter):
        kmask = ((kr < i_hi - i0) & (ki < n_hi - n))[:, None]
        xrow = xg_ptr + plane * HG * WQ + (i0 * SH + TB - PT) * WQ
        grow = g_ptr + plane * GPV * VEC + i0 * GRV * VEC
        a = tl.load(xrow + a_off, mask=kmask, other=0.0)
        b = tl.load(grow + b_off, mask=kmask & vmask, other=0.0)
        acc = _mma(tl.trans(a), b, acc, PREC, UPCAST)
        i0 += BKR
        wrap = i0 >= i_hi
        i0 = tl.where(wrap, i_lo, i0)
        n = tl.where(wrap, n + IMG, n)
        plane = tl.where(wrap, plane + IMG * C, plane)

    # diagonal sums through this program's scratch slot
    zb = z_ptr + pid.to(tl.int64) * (BM * BN)
    tl.store(zb + offs_m[:, None] * BN + offs_v[None, :], acc)
    tl.debug_barrier()
    kw = tl.arange(0, KWB)
    col = offs_v[None, :] * SW + kw[:, None] * DW - PL  # input column of (kw, v)
    valid = (col >= 0) & (col < W) & (offs_v < WO)[None, :] & (kw < KW)[:, None]
    ws = ws_ptr + ((s.to(tl.int64) * C + c) * KH) * KW
    for t in tl.static_range(KHT):
        zv = tl.load(zb + (t * WQ + col) * BN + offs_v[None, :], mask=valid, other=0.0)
        kh = kh0 + t
        tl.store(ws + kh * KW + kw, tl.sum(zv, axis=1), mask=(kw < KW) & (kh < KH))


# ------------------------------------------------------------------------------------------------
# forward by whole-row Toeplitz bands (the default forward / stride-1 grad_input for planes of more than
# 256 pixels and at most 128 columns)
# ------------------------------------------------------------------------------------------------
@triton.jit
def dwconv_forward_rows_kernel(
    xq_ptr, t_ptr, b_ptr, y_ptr,
    N, C, H, HO, WO, HQ, PT,
    syn, syc, syh, syw,
    KH, KHP,
    SH: tl.constexpr, DH: tl.constexpr,
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    WQ: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PACK: tl.constexpr,
):
    """Forward (and grad_input at stride 1) of tiles of ``BM`` output rows by the whole output width.

    ``xq`` is the input as planes ``[N*C, HQ, WQ]`` with ``HQ = H`` rows, ``xq[p, r, u] = x[p, r, u]``
    (zero columns ``W <= u < WQ``; ``WQ`` a power of two >= W: x itself when its rows are already
    ``WQ`` wide and contiguous); rows outside ``[0, H)`` -- the zero padding -- are not stored but
    masked; ``t`` is the whole-row Toeplitz band ``[C, KHP, WQ, BN]``, ``t[c, kh, u, j] =
    f[c, kh, (u - j*SW + PL) / DW]`` (zero where not integral, outside ``[0, KW)``, for ``j >= WO``
    and for the zero kernel rows ``KH <= kh < KHP``).
    Then, with ``k = (kh, u)``::

        Y[m, j] = sum_{kh, u} A[m, (kh, u)] * T[(kh, u), j],   A[m, (kh, u)] = xq[p(m), i(m)*SH + kh*DH - PT, u]

    GEMM-N is the whole output row (``BN`` >= WO), GEMM-K runs over chunks of ``BK`` consecutive
    ``k``: a part of one kernel row (``BK <= WQ``) or, at dilation 1 (where ``(kh, u)`` is contiguous
    in ``xq``), ``KHB = BK // WQ`` whole kernel rows; the kernel-row range is rounded out to a
    multiple of ``KHB`` (the extra rows meet the masked padding or the band's zero rows); ``A`` rows are
    contiguous, 16-aligned row segments and ``T`` chunks contiguous rows of the band, so both are
    16-byte vector loads (cp.async when pipelined) at loop-invariant offsets plus one scalar per
    iteration; ``A``'s only mask is the row range ``0 <= r < H``: a loop-invariant row index per
    (m, chunk row) compared with two per-iteration scalars (constant over each row segment, so the
    vectors stay whole; a masked row is zero-filled, never read).  ``PACK`` >
    1: a tile holds ``PACK`` whole output planes of one channel (consecutive images, ``BM // PACK >=
    HO`` rows each).  Kernel rows that meet only padding for every row of the tile are skipped."""
    NUC: tl.constexpr = (WQ + BK - 1) // BK  # chunks per kernel row (BK <= WQ), else 1
    KHB: tl.constexpr = (BK + WQ - 1) // WQ  # kernel rows per chunk (BK >= WQ), else 1
    tl.static_assert(KHB == 1 or DH == 1)
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BM)
    if PACK > 1:
        n_grp = tl.cdiv(N, PACK)
        g = pid % n_grp
        c = pid // n_grp
        pm = offs_m // (BM // PACK)
        im = offs_m % (BM // PACK)
        nm = g * PACK + pm
        mvalid = (im < HO) & (nm < N) & (pm < PACK)
        n0 = g * PACK
        i0 = 0
        i_last = HO - 1
        row_off = (pm * (C * HQ) + im * SH) * WQ
    else:
        n_rt = tl.cdiv(HO, BM)
        rt = pid % n_rt
        r = pid // n_rt
        n0 = r % N
        c = r // N
        i0 = rt * BM
        im = i0 + offs_m
        nm = n0 + offs_m * 0
        mvalid = im < HO
        i_last = tl.minimum(i0 + BM, HO) - 1
        row_off = im * (SH * WQ)
    kh_lo = (tl.maximum(PT - i_last * SH, 0) + DH - 1) // DH
    kh_hi = tl.minimum((tl.maximum(H - 1 + PT - i0 * SH, -1) + DH) // DH, KH)
    kh_lo = (kh_lo // KHB) * KHB
    n_iter = ((tl.maximum(kh_hi - kh_lo, 0) + KHB - 1) // KHB) * NUC

    offs_k = tl.arange(0, BK)
    offs_n = tl.arange(0, BN)
    x_base = xq_ptr + ((n0 * C + c).to(tl.int64) * HQ - PT) * WQ
    t_base = t_ptr + c.to(tl.int64) * KHP * WQ * BN
    a_off = row_off[:, None] + offs_k[None, :]
    t_off = offs_k[:, None] * BN + offs_n[None, :]
    # copy row of A[m, k] at kernel row 0 (k // WQ: the kernel row within a chunk of whole rows, DH == 1
    # there); rows of no output get one that no kernel row brings into [0, H)
    r0 = tl.where(mvalid[:, None], (im * SH - PT)[:, None] + (offs_k // WQ)[None, :], -(1 << 30))
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for it in range(0, n_iter):
        kh = kh_lo + (it // NUC) * KHB
        u0 = (it % NUC) * BK
        amask = (r0 >= -kh * DH) & (r0 < H - kh * DH)
        a = tl.load(x_base + (kh * (DH * WQ) + u0) + a_off, mask=amask, other=0.0)
        t = tl.load(t_base + (kh * WQ + u0) * BN + t_off)
        acc = _mma(a, t, acc, PREC, UPCAST)

    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    y_row = nm.to(tl.int64) * syn + c.to(tl.int64) * syc + im.to(tl.int64) * syh
    tl.store(y_ptr + y_row[:, None] + offs_n.to(tl.int64)[None, :] * syw, acc.to(y_ptr.dtype.element_ty),
             mask=mvalid[:, None] & (offs_n < WO)[None, :])
