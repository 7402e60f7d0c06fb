"""Batch-as-rows Triton kernels for small planes (``H*W <= 256``): the whole plane is one GEMM dimension.

For one channel ``c`` the depthwise convolution of a small plane is a dense matrix product with the
``N`` images of the batch as GEMM rows::

    Y[N, HWo] = X[N, HWi] @ F_c[HWi, HWo],
    F_c[(ih, iw), (oh, ow)] = f[c, kh, kw]  where  ih = oh*SH + kh*DH - PT,  iw = ow*SW + kw*DW - PL
                            = 0             where no tap (kh, kw) in range maps (oh, ow) onto (ih, iw)

This is exact for any stride, dilation and (asymmetric, even larger-than-kernel) padding: the padding
is simply the input positions that do not exist.  For ``K >= 2H - 1`` (RepLKNet's 14x14/K27 and
7x7/K13 layers) every entry of ``F_c`` is a real tap, so this form does *fewer* MACs than the direct
``K^2`` sum; the launcher (``ops.batchrows_applicable``) uses it only while the padded GEMM-K
``next_pow2(HWi)`` is at most twice the taps per output ``KH*KW``.

grad_input is the same product with the transposed operator, ``dX[N, HWi] = dY[N, HWo] @ F_c^T`` --
again exact for every stride and dilation (no flipped filter, no phase split).

* :func:`dwconv_batchrows_kernel` -- forward (``TRANS=False``) and grad_input (``TRANS=True``).  One
  program = one channel x one tile of ``BN`` result positions x a run of ``M_PER`` M tiles of ``BM``
  images.  ``F_c[:, tile]`` (``KP x BN``, ``KP = next_pow2`` of the reduced plane) is formed **once**
  per program with index math from the filter's width-Toeplitz band (zero where the tap is out of
  range; 16-byte gathers, see the kernel) and reused by every M tile of the program; each M tile is one ``tl.dot`` of ``[BM, KP] @ [KP, BN]``.  The operand
  plane is read as contiguous rows (the launcher gives the kernel contiguous NCHW planes, the plane
  size is a compile-time constant, so the loads vectorise as far as ``HW``'s divisibility allows:
  16 B for ``HW % 8 == 0``, 8 B for ``HW % 4 == 0`` (14x14), scalar for odd ``HW`` (7x7)).

Every accumulator is fp32.  ``PREC``/``UPCAST`` as in :mod:`.kernels` (TF32 for fp32 when PyTorch
allows it, IEEE otherwise; bf16 upcast under the interpreter only).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .kernels import _mma


@triton.jit
def dwconv_batchrows_kernel(
    a_ptr, t_ptr, b_ptr, y_ptr,
    N, C, M_PER,
    PT, KH,
    HA: tl.constexpr, WA: tl.constexpr, HB: tl.constexpr, WB: tl.constexpr, WBP: tl.constexpr,
    SH: tl.constexpr, DH: tl.constexpr,
    TRANS: tl.constexpr, OUT_CL: tl.constexpr, HAS_BIAS: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr,
):
    """``y[n, c, plane B] = a[n, c, plane A] @ F_c`` (forward: A = input plane ``HA x WA``, B = output
    plane ``HB x WB``; grad_input, ``TRANS``: A = grad_out plane, B = grad_input plane, operator
    transposed).  ``a`` is contiguous NCHW; ``y`` is contiguous NCHW, or channels_last with ``OUT_CL``.

    GEMM-K is the dense plane A (position ``k = h*WA + w``, padded to ``KP``).  GEMM-N is plane B with
    a power-of-two row pitch ``WBP >= WB`` (position ``n = h*WBP + w``, ``w < WB`` real).  ``t`` is the
    width-Toeplitz band of the filter ``[C, KH, WA, WBP]`` (``ops._batchrows_band``): ``t[c, kh, k_w,
    n_w] = f[c, kh, dw / DW]`` with ``dw = k_w - n_w*SW + PL`` (forward) or ``n_w - k_w*SW + PL``
    (transposed), zero where ``dw`` is not a tap or ``n_w >= WB``; so the column stride, dilation and
    padding live in the band and the operator is ``F_c[k, n] = t[c, kh(k_h, n_h), k_w, n_w]`` with
    ``kh*DH = k_h - n_h*SH + PT`` (forward) or ``n_h - k_h*SH + PT`` (transposed), zero when that is
    not a kernel row.  Along ``n`` the gather is contiguous and aligned over ``WBP`` elements (the
    kernel row depends on ``n_h`` only): 16-byte loads."""
    PA: tl.constexpr = HA * WA
    pid = tl.program_id(0)
    n_nt = tl.cdiv(HB * WBP, BN)
    n_mt = tl.cdiv(N, BM)
    n_grp = tl.cdiv(n_mt, M_PER)
    jt = pid % n_nt
    r = pid // n_nt
    g = r % n_grp
    c = r // n_grp

    # ---- F_c[:, tile], formed once per program ---------------------------------------------------
    offs_k = tl.arange(0, KP)                # position in plane A (GEMM-K)
    offs_n = jt * BN + tl.arange(0, BN)      # pitched position in plane B (GEMM-N)
    ka_h = offs_k // WA
    ka_w = offs_k % WA
    nb_h = offs_n // WBP
    nb_w = offs_n % WBP
    if TRANS:  # A = output rows, B = input rows
        dh = nb_h[None, :] - ka_h[:, None] * SH + PT
    else:
        dh = ka_h[:, None] - nb_h[None, :] * SH + PT
    if DH == 1:
        kh = dh
        hok = (dh >= 0) & (dh < KH)
    else:
        kh = dh // DH
        hok = (dh >= 0) & (dh % DH == 0) & (kh < KH)
    kmask = offs_k < PA
    t_c = t_ptr + c.to(tl.int64) * KH * (WA * WBP)
    f = tl.load(t_c + (kh * WA + ka_w[:, None]) * WBP + nb_w[None, :], mask=hok & kmask[:, None], other=0.0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + c).to(tl.float32)

    # ---- the program's M tiles: Y[BM, BN] = A[BM, KP] @ F ----------------------------------------
    offs_m = tl.arange(0, BM)
    nmask = (nb_h < HB) & (nb_w < WB)
    p_out = nb_h * WB + nb_w
    a_c = a_ptr + c.to(tl.int64) * PA
    mt_lo = g * M_PER
    mt_hi = tl.minimum(mt_lo + M_PER, n_mt)
    for mt in range(mt_lo, mt_hi):
        rows = mt * BM + offs_m
        rmask = rows < N
        a_rows = a_c + rows.to(tl.int64) * (C * PA)
        a = tl.load(a_rows[:, None] + offs_k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc = _mma(a, f, tl.zeros((BM, BN), dtype=tl.float32), PREC, UPCAST)
        if HAS_BIAS:
            acc += bias
        if OUT_CL:  # y[n, c, p] at (n*HB*WB + p)*C + c
            y_off = (rows.to(tl.int64) * (HB * WB))[:, None] * C + p_out[None, :].to(tl.int64) * C + c
        else:
            y_off = (rows.to(tl.int64) * C + c)[:, None] * (HB * WB) + p_out[None, :]
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _split_bf16(a):
    """fp32 ``a`` as bf16 ``hi + lo``: ``hi`` is ``a`` truncated to bf16 (a bit mask: exact), ``a - hi`` is
    exact in fp32 and rounded to bf16 once, so the pair carries ~15 mantissa bits."""
    hi_f = (a.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return hi_f.to(tl.bfloat16), (a - hi_f).to(tl.bfloat16)


@triton.jit
def _onehot_mma(a, onehot, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``acc += a @ onehot`` for an fp32 ``a`` and a 0/1 matrix (bf16, or fp32 with ``PREC == "ieee"``):
    IEEE: one exact fp32 dot; otherwise two tensor-core dots of the bf16 split of ``a``
    (:func:`_split_bf16`; the one-hot operand is exact in bf16), ~2**-15 relative per term."""
    if PREC == "ieee":
        acc = tl.dot(a, onehot, acc, input_precision="ieee")
    else:
        hi, lo = _split_bf16(a)
        acc = _mma(hi, onehot, acc, None, UPCAST)
        acc = _mma(lo, onehot, acc, None, UPCAST)
    return acc


@triton.jit
def _onehot_mma_left(onehot, a, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``acc += onehot @ a`` for a boolean ``onehot`` (see :func:`_onehot_mma`)."""
    if PREC == "ieee":
        acc = tl.dot(tl.where(onehot, 1.0, 0.0), a, acc, input_precision="ieee")
    else:
        hi, lo = _split_bf16(a)
        oh = tl.where(onehot, 1.0, 0.0).to(tl.bfloat16)  # via fp32 (exact); 0/1 as bf16
        acc = _mma(oh, hi, acc, None, UPCAST)
        acc = _mma(oh, lo, acc, None, UPCAST)
    return acc


@triton.jit
def dwconv_batchrows_grad_weight_kernel(
    x_ptr, g_ptr, bw_ptr, ws_ptr,
    N, C,
    PT, PL, KH, KW,
    H: tl.constexpr, W: tl.constexpr, HO: tl.constexpr, WO: tl.constexpr,
    HP: tl.constexpr, WP: tl.constexpr, WOP: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BHB: tl.constexpr, BKN: tl.constexpr, KHP: tl.constexpr, KWP: tl.constexpr,
):
    """grad_weight of small planes: per channel ``G = X^T @ dY`` on tensor cores (GEMM-M = the input plane
    with row pitch ``WP``, ``HP*WP`` positions; GEMM-N = ``BHB`` grad_out rows with pitch ``WOP``; GEMM-K =
    the batch, in chunks of ``BKN``), then the diagonal sums into ``dW[c, kh, kw]`` as two one-hot
    products, all in registers:

    * ``G[(ih, iw), (oh, ow)]`` is viewed as ``[HP, WP, BHB, WOP]`` and permuted to rows ``(ih, oh)``,
      columns ``(iw, ow)``; ``D = G' @ Bw`` with ``Bw[(iw, ow), kw] = [iw - ow*SW + PL == kw*DW]`` sums
      every width diagonal into its kernel column (``bw``: ``[WP*WOP, KWP]``, built once per call by
      ``ops._batchrows_onehot_w``; bf16, fp32 for ``PREC == "ieee"``);
    * ``dW_tile = Bh @ D`` with ``Bh[kh, (ih, oh)] = [ih - oh*SH + PT == kh*DH]`` sums the rows into
      their kernel row.

    Each program writes its tile's partial ``ws[tile, c, :, :]`` (fp32); the launcher sums the tiles
    in a fixed order: deterministic.  The one-hot products are exact in bf16; the fp32 operand is
    split hi + lo (:func:`_onehot_mma`), or one IEEE dot when ``PREC == "ieee"``."""
    BN: tl.constexpr = BHB * WOP
    KP: tl.constexpr = HP * WP
    pid = tl.program_id(0)
    n_rt = tl.cdiv(HO, BHB)
    rt = pid % n_rt
    c = pid // n_rt
    oh0 = rt * BHB

    offs_k = tl.arange(0, KP)
    k_h = offs_k // WP
    k_w = offs_k % WP
    kmask = (k_h < H) & (k_w < W)
    offs_n = tl.arange(0, BN)
    n_h = oh0 + offs_n // WOP
    n_w = offs_n % WOP
    nmask = (n_h < HO) & (n_w < WO)
    x_c = x_ptr + c.to(tl.int64) * (H * W) + k_h * W + k_w
    g_c = g_ptr + c.to(tl.int64) * (HO * WO) + n_h * WO + n_w
    offs_b = tl.arange(0, BKN)
    acc = tl.zeros((KP, BN), dtype=tl.float32)
    for n0 in range(0, N, BKN):
        rows = n0 + offs_b
        rmask = rows < N
        xa = tl.load(x_c[None, :] + (rows.to(tl.int64) * (C * H * W))[:, None],
                     mask=rmask[:, None] & kmask[None, :], other=0.0)             # [BKN, KP]
        gb = tl.load(g_c[None, :] + (rows.to(tl.int64) * (C * HO * WO))[:, None],
                     mask=rmask[:, None] & nmask[None, :], other=0.0)             # [BKN, BN]
        acc = _mma(tl.trans(xa), gb, acc, PREC, UPCAST)

    # width diagonals: rows (ih, oh), columns (iw, ow)
    g4 = tl.reshape(acc, (HP, WP, BHB, WOP))
    g2 = tl.reshape(tl.permute(g4, (0, 2, 1, 3)), (HP * BHB, WP * WOP))
    q = tl.arange(0, WP * WOP)
    kws = tl.arange(0, KWP)
    bw = tl.load(bw_ptr + q[:, None] * KWP + kws[None, :])
    d = _onehot_mma(g2, bw, tl.zeros((HP * BHB, KWP), dtype=tl.float32), PREC, UPCAST)

    # height: rows (ih, oh) -> kernel row
    rr = tl.arange(0, HP * BHB)
    r_h = rr // BHB
    r_o = oh0 + rr % BHB
    dhv = r_h - r_o * SH + PT
    khs = tl.arange(0, KHP)
    bh = (dhv[None, :] == khs[:, None] * DH) & (khs[:, None] < KH) & (r_o < HO)[None, :]
    dwt = _onehot_mma_left(bh, d, tl.zeros((KHP, KWP), dtype=tl.float32), PREC, UPCAST)

    ws = ws_ptr + (rt.to(tl.int64) * C + c) * (KH * KW)
    tl.store(ws + khs[:, None] * KW + kws[None, :], dwt, mask=(khs < KH)[:, None] & (kws < KW)[None, :])
