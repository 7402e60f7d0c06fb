"""Host emulation of the CUDA kernels' tiling and index math (CPU, no GPU needed).

The functions are line-by-line transcriptions of the kernels next to this file:
toeplitz_wmma_kernel and fp32_blocked_kernel in dwconv_forward.cu (same tile constants, staging,
skip conditions, Toeplitz blocks, sliding window), grad_weight_partial_kernel +
grad_weight_reduce_kernel in dwconv_grad_weight.cu (split/lane decomposition, incremental position
walk) and the staged grad_weight kernels there (grad_weight_tc_kernel down to the per-lane ldmatrix
addresses and mma.sync fragment layouts, grad_weight_ffma_kernel's register block and window), and the small-plane kernels of dwconv_small_plane.cu
(section "small planes"; tests/test_small_plane.py), and small_plane_gw_rows_kernel of dwconv_small_plane_gw_rows.cu
(section "small-plane grad_weight by row pairs"; tests/test_small_plane_gw_rows.py).  tests/test_backend_cuda.py runs them on tiny shapes against F.conv2d: they check the index
math, not the CUDA code generation.  A change to a kernel's tiling is mirrored here.
"""
import torch

FB_H, FB_W, FB_STRIP = 32, 64, 8


def ceil_div(a, b):
    return -(-a // b)


def toeplitz_small_tile(Ho, Wo):  # transcription of toeplitz_small_tile()
    big = ceil_div(Ho, 64) * 64 * ceil_div(Wo, 64) * 64
    small = ceil_div(Ho, 16) * 16 * ceil_div(Wo, 16) * 16
    return 2 * small <= big


def emulate_toeplitz(x, w, bias, pt, pl, Ho, Wo, config=None):
    """config: (TC_WARPS, TC_NB); None = what the launcher picks"""
    if config is None:
        config = (1, 1) if toeplitz_small_tile(Ho, Wo) else (4, 4)
    TC_WARPS, TC_NB = config
    TC_BM, TC_BN = 16 * TC_WARPS, 16 * TC_NB
    N, C, H, W = x.shape
    KH, KW = w.shape[2], w.shape[3]
    KK = (KW + 15 + 15) // 16
    ldx = 16 * (TC_NB + KK - 1)
    rows = TC_BM + KH - 1
    y = torch.full((N, C, Ho, Wo), float("nan"), dtype=torch.float64)
    for n in range(N):
        for c in range(C):
            f = w[c, 0].double()
            for by in range(ceil_div(Wo, TC_BN)):
                for bz in range(ceil_div(Ho, TC_BM)):
                    ow0, oh0 = by * TC_BN, bz * TC_BM
                    Xs = torch.zeros(rows, ldx, dtype=torch.float64)
                    for r in range(rows):
                        for q in range(ldx):
                            ih, iw = oh0 - pt + r, ow0 - pl + q
                            if 0 <= ih < H and 0 <= iw < W:
                                Xs[r, q] = x[n, c, ih, iw]
                    acc = torch.zeros(TC_WARPS, TC_NB, 16, 16, dtype=torch.float64)
                    kh_lo = min(max(pt - oh0 - TC_BM + 1, 0), KH)
                    kh_hi = min(max(H + pt - oh0, 0), KH)
                    for kh in range(kh_lo, kh_hi):
                        Ts = torch.zeros(KK, 16, 16, dtype=torch.float64)
                        for kk in range(KK):
                            for i in range(16):
                                for nn in range(16):
                                    kw = 16 * kk + i - nn
                                    if 0 <= kw < KW:
                                        Ts[kk, i, nn] = f[kh, kw]
                        for warp in range(TC_WARPS):
                            ih0 = oh0 - pt + warp * 16 + kh
                            if not (ih0 + 15 >= 0 and ih0 < H):
                                continue
                            for kk in range(KK):
                                for j in range(TC_NB):
                                    iwc = ow0 - pl + 16 * (j + kk)
                                    if iwc + 15 < 0 or iwc >= W:
                                        continue
                                    r0, c0 = warp * 16 + kh, 16 * (j + kk)
                                    acc[warp, j] += Xs[r0:r0 + 16, c0:c0 + 16] @ Ts[kk]
                    b = 0.0 if bias is None else float(bias[c])
                    for warp in range(TC_WARPS):
                        for j in range(TC_NB):
                            for m in range(16):
                                for nn in range(16):
                                    oh, ow = oh0 + warp * 16 + m, ow0 + 16 * j + nn
                                    if oh < Ho and ow < Wo:
                                        y[n, c, oh, ow] = acc[warp, j, m, nn] + b
    return y


def emulate_fp32_blocked(x, w, bias, pt, pl, Ho, Wo):
    N, C, H, W = x.shape
    KH, KW = w.shape[2], w.shape[3]
    ldx, rows = FB_W + KW - 1, FB_H + KH - 1
    y = torch.full((N, C, Ho, Wo), float("nan"), dtype=torch.float64)
    for n in range(N):
        for c in range(C):
            Fs = w[c, 0].double().flatten().tolist()
            for by in range(ceil_div(Wo, FB_W)):
                for bz in range(ceil_div(Ho, FB_H)):
                    ow0, oh0 = by * FB_W, bz * FB_H
                    Xs = [0.0] * (rows * ldx)
                    for e in range(rows * ldx):
                        r, q = divmod(e, ldx)
                        ih, iw = oh0 - pt + r, ow0 - pl + q
                        if 0 <= ih < H and 0 <= iw < W:
                            Xs[e] = float(x[n, c, ih, iw])
                    for t in range(FB_H * FB_W // FB_STRIP):
                        row, c0 = t // (FB_W // FB_STRIP), (t % (FB_W // FB_STRIP)) * FB_STRIP
                        oh, owb = oh0 + row, ow0 + c0
                        if oh >= Ho or owb >= Wo:
                            continue
                        kh_lo, kh_hi = min(max(pt - oh, 0), KH), min(max(H + pt - oh, 0), KH)
                        kw_lo = min(max(pl - (owb + FB_STRIP - 1), 0), KW)
                        kw_hi = min(max(W + pl - owb, 0), KW)
                        acc = [0.0] * FB_STRIP
                        for kh in range(kh_lo, kh_hi):
                            xr = (row + kh) * ldx + c0
                            if kw_lo >= kw_hi:
                                break
                            xv = [Xs[xr + kw_lo + j] for j in range(FB_STRIP)]
                            for kw in range(kw_lo, kw_hi):
                                fv = Fs[kh * KW + kw]
                                for j in range(FB_STRIP):
                                    acc[j] += xv[j] * fv
                                if kw + 1 < kw_hi:
                                    xv = xv[1:] + [Xs[xr + kw + FB_STRIP]]
                                    assert c0 + kw + FB_STRIP < ldx  # the smem read stays in the row
                        b = 0.0 if bias is None else float(bias[c])
                        for j in range(FB_STRIP):
                            if owb + j < Wo:
                                y[n, c, oh, owb + j] = acc[j] + b
    return y


def grad_weight_splits(N, Ho, Wo, C):  # transcription of grad_weight_splits() in dwconv_grad_weight.cu
    R = N * Ho * Wo
    s = ceil_div(R, 2048)
    s = min(s, ceil_div(2048, max(C, 1)), 1024)
    return max(s, 1)


def emulate_grad_weight(x, g, KH, KW, stride, pt, pl, dil, splits=None, threads=256):
    """Transcription of grad_weight_partial_kernel + grad_weight_reduce_kernel (split/lane decomposition and the
    incremental position walk)."""
    N, C, H, W = x.shape
    Ho, Wo = g.shape[2:]
    sh, sw = stride
    dil_h, dil_w = dil
    taps, R = KH * KW, N * Ho * Wo
    splits = splits or grad_weight_splits(N, Ho, Wo, C)
    partial = torch.full((splits, C, taps), float("nan"), dtype=torch.float64)
    chunk = ceil_div(R, splits)
    P = min(taps, threads)
    L = threads // P
    for c in range(C):
        for s in range(splits):
            r0, r1 = s * chunk, min(s * chunk + chunk, R)
            for base in range(0, taps, P):
                red = [0.0] * threads
                for tid in range(threads):
                    slot, lane = tid % P, tid // P
                    tap = base + slot
                    acc = 0.0
                    if lane < L and tap < taps:
                        kh, kw = divmod(tap, KW)
                        r = r0 + lane
                        ow, oh, n = r % Wo, (r // Wo) % Ho, r // (Wo * Ho)
                        while r < r1:
                            ih, iw = oh * sh - pt + kh * dil_h, ow * sw - pl + kw * dil_w
                            if 0 <= ih < H and 0 <= iw < W:
                                acc += float(x[n, c, ih, iw]) * float(g[n, c, oh, ow])
                            ow += L
                            while ow >= Wo:
                                ow -= Wo
                                oh += 1
                                if oh == Ho:
                                    oh, n = 0, n + 1
                            r += L
                    red[tid] = acc
                for slot in range(P):
                    if base + slot < taps:
                        partial[s, c, base + slot] = sum(red[l * P + slot] for l in range(L))
    return partial.sum(0).reshape(C, 1, KH, KW)


# ------------------------------------------------------------------------------------------------
# grad_weight fast path (dwconv_grad_weight.cu): grad_weight_tc_kernel (fp16/bf16) and
# grad_weight_ffma_kernel (fp32), stride 1, dilation 1, KH, KW <= 64
# ------------------------------------------------------------------------------------------------
GWT_RB, GWT_QW, GWT_WARPS, GWT_MAX_K = 16, 64, 4, 64


def round_up(v, m):
    return ceil_div(v, m) * m


def gwt_layout(KH, KW, esz, tc):  # transcription of gwt_layout(): element offsets and the byte size
    kh32, kw32 = round_up(KH, 32), round_up(KW, 32)
    xr = GWT_RB + kh32 - 1
    xp = GWT_QW + 8 if tc else GWT_QW + 4
    gp_log2 = 7 if GWT_QW + kw32 + 8 <= 128 else 8
    gp = 1 << gp_log2
    ge_off = round_up(xr * xp, 64)
    go_off = ge_off + round_up(GWT_RB * gp, 64) + 32 if tc else ge_off + GWT_RB * gp
    total = go_off + GWT_RB * gp if tc else go_off
    return dict(xr=xr, xp=xp, gp_log2=gp_log2, gp=gp, ge_off=ge_off, go_off=go_off,
                bytes=max(total * esz, GWT_WARPS * 32 * 32 * 4))


def grad_weight_fast_splits(N, Ho, C):  # grad_weight_splits() on the fast path
    s = min(ceil_div(N * Ho, 64), ceil_div(1024, max(C, 1)), 1024)
    return max(s, 1)


def gwt_xw(cols_left):  # gwt_xw_log2() as a width
    return 64 if cols_left > 32 else 32 if cols_left > 16 else 16


def gwt_gw(xw, KWP):  # gwt_gw_log2() as a width
    need = xw + KWP + 8
    return 64 if need <= 64 else 128 if need <= 128 else 256


def _gwt_stage(smem, L, xn, gn, H, W, Wo, pt, oh0, nr, xrows, xw, gw, qa, gal, vec_x, vec_g):
    """gwt_stage(): x rows < xrows, columns < xw, and grad_out rows < nr, columns < gw, vector by vector,
    the tail of a vector past the edge zero-filled (cp.async src-size), whole vectors outside the image zero."""
    assert xrows <= L["xr"] and xw <= GWT_QW and gw <= L["gp"]
    for e in range(xrows * (xw // vec_x)):
        r, jv = divmod(e, xw // vec_x)
        jv *= vec_x
        ih, q = oh0 - pt + r, qa + jv
        cnt = min(W - q, vec_x) if (0 <= ih < H and q < W) else 0
        base = r * L["xp"] + jv
        for k in range(vec_x):
            smem[base + k] = float(xn[ih, q + k]) if k < cnt else 0.0
    for e in range(nr * (gw // vec_g)):
        i, v = divmod(e, gw // vec_g)
        v *= vec_g
        col = gal + v
        assert col >= 0 or col + vec_g <= 0, "a grad_out vector straddles column 0"
        cnt = min(Wo - col, vec_g) if 0 <= col < Wo else 0
        base = L["ge_off"] + i * L["gp"] + v
        for k in range(vec_g):
            smem[base + k] = float(gn[oh0 + i, col + k]) if k < cnt else 0.0


def _mma_m16n8k16(acc, a_regs, b0, b1):
    """mma.sync.m16n8k16.row.col on the per-lane fragments (PTX ISA layout): a_regs[lane] = 4 pairs,
    b0/b1[lane] = pairs, acc[lane] = 4 fp32 (c0..c3), updated in place.  g = lane / 4, t = lane % 4:
    a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..); b0 (k = 2t..2t+1, n = g),
    b1 (k = 2t+8.., n = g); c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)."""
    A = torch.full((16, 16), float("nan"), dtype=torch.float64)
    B = torch.full((16, 8), float("nan"), dtype=torch.float64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for reg, (ro, co) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
            A[g + ro, 2 * t + co], A[g + ro, 2 * t + co + 1] = a_regs[lane][reg]
        B[2 * t, g], B[2 * t + 1, g] = b0[lane]
        B[2 * t + 8, g], B[2 * t + 9, g] = b1[lane]
    assert not torch.isnan(A).any() and not torch.isnan(B).any(), "fragment element not loaded"
    D = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        acc[lane][0] += float(D[g, 2 * t]); acc[lane][1] += float(D[g, 2 * t + 1])
        acc[lane][2] += float(D[g + 8, 2 * t]); acc[lane][3] += float(D[g + 8, 2 * t + 1])


def _ldmatrix_x4(smem, lane_addr):
    """ldmatrix.m8n8.x4.b16: lane l gives the address of row l % 8 of matrix l // 8; lane T receives, from
    each matrix, row T / 4, elements 2 (T % 4) and 2 (T % 4) + 1."""
    regs = []
    for T in range(32):
        regs.append([(smem[lane_addr[8 * mi + T // 4] + 2 * (T % 4)], smem[lane_addr[8 * mi + T // 4] + 2 * (T % 4) + 1])
                     for mi in range(4)])
    return regs


def emulate_grad_weight_fast(x, g, KH, KW, pt, pl, tc, vec_x=1, vec_g=1, splits=None):
    """Transcription of grad_weight_tc_kernel (tc=True: per-lane ldmatrix addresses, B pairs from Ge / Go,
    m16n8k16 fragments) or grad_weight_ffma_kernel (tc=False: 4 x 8 register block, 15-value window), then
    the warp-order epilogue and grad_weight_reduce_kernel.  Shared memory is a flat array initialised to
    NaN, so a read of anything not staged shows up in the result."""
    N, C, H, W = x.shape
    Ho, Wo = g.shape[2:]
    assert KH <= GWT_MAX_K and KW <= GWT_MAX_K
    esz = 2 if tc else 4
    L = gwt_layout(KH, KW, esz, tc)
    gp = L["gp"]
    taps, NHo = KH * KW, N * Ho
    splits = splits or grad_weight_fast_splits(N, Ho, C)
    chunk = ceil_div(NHo, splits)
    TWg = ceil_div(KW, 32)
    TG = ceil_div(KH, 32) * TWg
    WPG = GWT_WARPS // TG
    KWP = 32 * TWg
    partial = torch.full((splits, C, taps), float("nan"), dtype=torch.float64)
    for c in range(C):
        for s in range(splits):
            smem = [float("nan")] * (L["bytes"] // esz)
            rho0 = s * chunk
            rho1 = min(rho0 + chunk, NHo)
            acc = [[[0.0] * 4 for _ in range(32)] for _ in range(GWT_WARPS * 8)] if tc else \
                [[[0.0] * 32 for _ in range(32)] for _ in range(GWT_WARPS)]
            rho = rho0
            while rho < rho1:
                n, oh0 = divmod(rho, Ho)
                nr = min(GWT_RB, rho1 - rho, Ho - oh0)
                for qa in range(0, W, GWT_QW):
                    gbase = qa + pl - KWP
                    gal = (gbase // vec_g) * vec_g  # floor_div
                    delta = gbase - gal
                    xrows = nr + (round_up(KH, 16) if tc else round_up(KH, 32)) - 1
                    xw = gwt_xw(W - qa)
                    gw = gwt_gw(xw, KWP)
                    _gwt_stage(smem, L, x[n, c], g[n, c], H, W, Wo, pt, oh0, nr, xrows, xw, gw, qa, gal, vec_x, vec_g)
                    if tc:
                        wpr = gw // 2  # staged words per row
                        for e in range(nr * wpr):  # Go word w = (high half of Ge word w, low half of word w + 1)
                            k = e % wpr
                            w = (e // wpr) * (gp // 2) + k
                            smem[L["go_off"] + 2 * w] = smem[L["ge_off"] + 2 * w + 1]
                            smem[L["go_off"] + 2 * w + 1] = 0.0 if k + 1 == wpr else smem[L["ge_off"] + 2 * w + 2]
                    for warp in range(GWT_WARPS):
                        tg, wr = divmod(warp, WPG)
                        khg, kwg = 32 * (tg // TWg), 32 * (tg % TWg)
                        for i in range(wr, nr, WPG):
                            if tc:  # gwt_tc_rows<T, mb, nb>: tiles and chunks fixed per (warp, window)
                                cols = W - qa
                                nq = GWT_QW // 16 if cols >= GWT_QW else ceil_div(cols, 16)
                                mb = 2 if khg + 16 < KH else 1
                                nb = 4 if KW - kwg >= 32 else ceil_div(KW - kwg, 8)
                                a_base = [(khg + (l & 15)) * L["xp"] + (l >> 4) * 8 for l in range(32)]
                                for qc in range(nq):
                                    af = {}
                                    for mt in range(mb):
                                        addr = [a_base[l] + i * L["xp"] + 16 * mt * L["xp"] + 16 * qc for l in range(32)]
                                        assert max(addr) // L["xp"] < xrows and max(addr) % L["xp"] + 8 <= xw
                                        af[mt] = _ldmatrix_x4(smem, addr)
                                    for nt in range(nb):
                                        b0, b1 = [], []
                                        for lane in range(32):
                                            g4, t4 = lane >> 2, lane & 3
                                            odd = (delta + g4) & 1
                                            brow0 = L["go_off"] - 1 if odd else L["ge_off"]
                                            v0 = 2 * t4 + KWP - kwg - g4 + delta
                                            p = brow0 + i * gp + v0 + 16 * qc - 8 * nt
                                            assert p % 2 == 0 and 0 <= v0 + 16 * qc - 8 * nt - odd and \
                                                v0 + 16 * qc - 8 * nt + 9 - odd < gw
                                            b0.append((smem[p], smem[p + 1]))
                                            b1.append((smem[p + 8], smem[p + 9]))
                                        for mt in range(mb):
                                            _mma_m16n8k16(acc[warp * 8 + mt * 4 + nt], af[mt], b0, b1)
                            else:
                                # full 8-column steps while more than 4 image columns are left, then half a
                                # step (4 columns) for the last 1-4
                                wcols = min(W - qa, GWT_QW)
                                jfull = 8 * ((wcols - 4 + 7) // 8) if wcols > 4 else 0
                                steps = [(j0, 8) for j0 in range(0, jfull, 8)] + ([(jfull, 4)] if jfull < wcols else [])
                                for j0, cols in steps:
                                    for lane in range(32):
                                        khb, kwb = lane >> 2, lane & 3
                                        grow = L["ge_off"] + i * gp + KWP - kwg - 8 * kwb - 7 + delta
                                        wv = [smem[grow + j0 + m] for m in range(cols + 7)]
                                        assert grow + j0 >= L["ge_off"] + i * gp and grow + j0 + 14 < L["ge_off"] + i * gp + gw
                                        xrow = (i + khg + khb) * L["xp"]
                                        assert i + khg + khb + 24 < xrows and j0 + 8 <= xw
                                        a_ = acc[warp][lane]
                                        for ai in range(4):
                                            xv = smem[xrow + 8 * ai * L["xp"] + j0: xrow + 8 * ai * L["xp"] + j0 + cols]
                                            for jj in range(cols):
                                                for b in range(8):
                                                    a_[ai * 8 + b] += xv[jj] * wv[jj + 7 - b]
                rho += nr
            # epilogue: red[warp][32][32], then the warps of each tap group in warp order
            red = [[[float("nan")] * 32 for _ in range(32)] for _ in range(GWT_WARPS)]
            for warp in range(GWT_WARPS):
                for lane in range(32):
                    if tc:
                        g4, t4 = lane >> 2, lane & 3
                        for mt in range(2):
                            for nt in range(4):
                                for r in range(4):
                                    red[warp][16 * mt + g4 + 8 * (r >> 1)][8 * nt + 2 * t4 + (r & 1)] = \
                                        acc[warp * 8 + mt * 4 + nt][lane][r]
                    else:
                        khb, kwb = lane >> 2, lane & 3
                        for ai in range(4):
                            for b in range(8):
                                red[warp][khb + 8 * ai][8 * kwb + b] = acc[warp][lane][ai * 8 + b]
            for e in range(TG * 1024):
                tgi, row, col = e >> 10, (e >> 5) & 31, e & 31
                kh, kw = 32 * (tgi // TWg) + row, 32 * (tgi % TWg) + col
                if kh < KH and kw < KW:
                    partial[s, c, kh * KW + kw] = sum(red[tgi * WPG + w2][row][col] for w2 in range(WPG))
    out = torch.zeros(C, taps, dtype=torch.float64)
    for s in range(splits):  # grad_weight_reduce_kernel: split order
        out += partial[s]
    return out.reshape(C, 1, KH, KW)


# ------------------------------------------------------------------------------------------------
# toeplitz_mma_kernel (dwconv_forward.cu): raw ldmatrix + mma.sync row-Toeplitz forward, fp16/bf16,
# stride 1, dilation 1, KH, KW <= 64; "image-rows" tiling: the mma's n8 = 8 images at one output row,
# m16 = 16 output columns, k16 = 16 input columns; configs (NB, DG) = (2 | 4 column blocks, 2 | 3 offsets)
# ------------------------------------------------------------------------------------------------
TM_FO, TM_MAX_K, TM_WARPS, TM_IMG = 22, 64, 4, 8


def tm_s0(pl):  # transcription of tm_s0()
    return (-pl) % 8


def tm_layout(KH, KW, H, s0, NB, DG, bm):  # transcription of tm_layout(): element offsets and bytes
    nd = (KW + 15 + s0 + 15) // 16
    ngrp = ceil_div(nd, DG)
    nch = NB + ngrp * DG - 1
    xc = 16 * nch
    rows = min(H, bm + KH - 1)
    ip = rows * xc + 8
    z_off = TM_IMG * ip
    fp = round_up(16 * ngrp * DG + 24, 8)
    fe_off = round_up(z_off + xc, 64)
    fo_off = fe_off + round_up(KH * fp, 64) + 32
    return dict(s0=s0, nd=nd, ngrp=ngrp, nch=nch, xc=xc, rows=rows, ip=ip, z_off=z_off, fp=fp, fe_off=fe_off,
                fo_off=fo_off, bytes=(fo_off + KH * fp) * 2)


def toeplitz_mma_config(Wo, KW, pl):  # transcription of toeplitz_mma_config(): (NB, DG)
    nd = (KW + 15 + tm_s0(pl) + 15) // 16
    return (2 if Wo <= 32 else 4, 3 if (nd == 3 or nd >= 5) else 2)


def toeplitz_mma_rows(KH, KW, H, Ho, pl, NB, DG, max_smem_optin):  # transcription of toeplitz_mma_rows()
    def nbytes(bm):
        return tm_layout(KH, KW, H, tm_s0(pl), NB, DG, bm)["bytes"]
    bm = round_up(Ho, 2)
    while bm > 2 and nbytes(bm) > max_smem_optin // 2:
        bm = round_up(bm // 2, 2)
    return bm if nbytes(bm) <= max_smem_optin else 0


def emulate_toeplitz_mma(x, w, bias, pt, pl, Ho, Wo, config=None, vec_x=1, bm=None, max_smem_optin=227 * 1024):
    """Transcription of toeplitz_mma_kernel: the launcher's (NB, DG) and rows per CTA (bm), per-image row
    staging (vectors with zero-filled tails), the zero row, Fe / Fo filter rows, per-warp output-row pairs and
    their kernel-row range, the per-lane ldmatrix addresses (zero row for images >= N and rows outside),
    the per-lane A words (interleaved mma rows: output column 2 (i % 8) + i // 8), the chunk mask, m16n8k16
    fragments, the epilogue (each lane's C registers e, 2 + e: two adjacent columns of one image).  Shared memory is a flat
    NaN-initialised array per CTA; every read is bounds-checked (reading an unstaged element gives NaN)."""
    N, C, H, W = x.shape
    KH, KW = w.shape[2], w.shape[3]
    assert KH <= TM_MAX_K and KW <= TM_MAX_K
    NB, DG = config if config is not None else toeplitz_mma_config(Wo, KW, pl)
    if bm is None:
        bm = toeplitz_mma_rows(KH, KW, H, Ho, pl, NB, DG, max_smem_optin)
    assert bm > 0 and bm % 2 == 0
    BN, NCH = 16 * NB, NB + DG - 1
    L = tm_layout(KH, KW, H, tm_s0(pl), NB, DG, bm)
    assert L["bytes"] <= 227 * 1024
    s0, xc, ip, fp = L["s0"], L["xc"], L["ip"], L["fp"]
    y = torch.full((N, C, Ho, Wo), float("nan"), dtype=torch.float64)
    gx, gy, gz = C * ceil_div(N, TM_IMG), ceil_div(Wo, BN), ceil_div(Ho, bm)
    for bx in range(gx):
        c, n0 = bx % C, (bx // C) * TM_IMG
        f = w[c, 0].double()
        for by in range(gy):
            for bz in range(gz):
                ow0, oh0 = by * BN, bz * bm
                c0 = ow0 - pl - s0
                assert c0 % 8 == 0
                ih_lo, ih_hi = max(oh0 - pt, 0), min(oh0 + bm - 1 - pt + KH, H)
                assert ih_hi - ih_lo <= L["rows"]
                smem = [float("nan")] * (L["bytes"] // 2)
                for img in range(TM_IMG):  # staging
                    if n0 + img >= N:
                        break
                    for r in range(ih_hi - ih_lo):
                        for j in range(0, xc, vec_x):
                            col = c0 + j
                            assert col >= 0 or col + vec_x <= 0  # no vector straddles column 0
                            cnt = min(W - col, vec_x) if 0 <= col < W else 0
                            for k in range(vec_x):
                                smem[img * ip + r * xc + j + k] = float(x[n0 + img, c, ih_lo + r, col + k]) if k < cnt else 0.0
                for j in range(xc):
                    smem[L["z_off"] + j] = 0.0
                for kh in range(KH):
                    for u in range(fp):
                        kw = u - TM_FO
                        smem[L["fe_off"] + kh * fp + u] = float(f[kh, kw]) if 0 <= kw < KW else 0.0
                wpr = fp // 2
                for kh in range(KH):
                    for k in range(wpr):
                        wd = kh * wpr + k
                        smem[L["fo_off"] + 2 * wd] = smem[L["fe_off"] + 2 * wd + 1]
                        smem[L["fo_off"] + 2 * wd + 1] = smem[L["fe_off"] + 2 * wd + 2] if k + 1 < wpr else 0.0
                b = 0.0 if bias is None else float(bias[c])
                npairs = (min(Ho - oh0, bm) + 1) >> 1
                for warp in range(TM_WARPS):
                    for p in range(warp, npairs, TM_WARPS):
                        oha = oh0 + 2 * p
                        kh_lo, kh_hi = max(pt - oha - 1, 0), min(H + pt - oha, KH)
                        acc = [[[[0.0] * 4 for _ in range(32)] for _ in range(NB)] for _ in range(2)]
                        for g in range(L["ngrp"]):
                            live = [0 <= c0 + 16 * (DG * g + j) + 15 and c0 + 16 * (DG * g + j) < W for j in range(NCH)]
                            if not any(live):
                                continue
                            for kh in range(kh_lo, kh_hi):
                                addr0 = []  # per lane, element address of its ldmatrix row at chunk DG g
                                for lane in range(32):
                                    limg, lrow, lkh = lane & 7, lane >> 4, (lane >> 3) & 1
                                    ih = oha + lrow - pt + kh
                                    ok = n0 + limg < N and oha + lrow < Ho and 0 <= ih < H
                                    if ok:
                                        assert ih_lo <= ih < ih_hi
                                        a0 = limg * ip + (ih - ih_lo) * xc + 8 * lkh
                                    else:
                                        a0 = L["z_off"] + 8 * lkh
                                    addr0.append(a0 + 16 * DG * g)
                                af = []  # mma row i <-> output column 2 (i % 8) + i // 8: four distinct words
                                for dd in range(DG):
                                    regs = []
                                    for lane in range(32):
                                        g4, t4 = lane >> 2, lane & 3
                                        xoff = 2 * t4 - 2 * g4 - s0 + TM_FO
                                        pe_w = ((L["fo_off"] - 1 if s0 & 1 else L["fe_off"]) + xoff) >> 1
                                        po_w = ((L["fe_off"] if s0 & 1 else L["fo_off"] - 1) + xoff - 1) >> 1
                                        aoff = (kh * fp + 16 * DG * g) >> 1
                                        q = []
                                        for wi in (pe_w + aoff + 8 * dd, po_w + aoff + 8 * dd,
                                                   pe_w + aoff + 8 * dd + 4, po_w + aoff + 8 * dd + 4):
                                            e = 2 * wi
                                            row = L["fe_off"] + kh * fp if e < L["fo_off"] - 1 else L["fo_off"] + kh * fp
                                            assert row <= e and e + 1 < row + fp  # inside this kernel row of Fe / Fo
                                            q.append((smem[e], smem[e + 1]))
                                        regs.append(q)
                                    af.append(regs)
                                for j in range(NCH):
                                    if not live[j]:
                                        continue
                                    la = [a0 + 16 * j for a0 in addr0]
                                    assert all(a0 % 8 == 0 for a0 in la)
                                    assert all((a0 >= L["z_off"] and a0 + 8 <= L["z_off"] + xc) or
                                               (a0 % ip) % xc + 8 <= xc for a0 in la)
                                    bf = _ldmatrix_x4(smem, la)
                                    for ob in range(NB):
                                        dd = j - ob
                                        if not 0 <= dd < DG:
                                            continue
                                        for h in range(2):
                                            _mma_m16n8k16(acc[h][ob], af[dd], [bf[l][2 * h] for l in range(32)],
                                                          [bf[l][2 * h + 1] for l in range(32)])
                        for h in range(2):  # epilogue: C registers e, 2 + e = columns 2 g4, 2 g4 + 1 of image 2 t4 + e
                            for lane in range(32):
                                g4, t4 = lane >> 2, lane & 3
                                for e in range(2):
                                    img, oh = n0 + 2 * t4 + e, oha + h
                                    if img >= N or oh >= Ho:
                                        continue
                                    for ob in range(NB):
                                        ow = ow0 + 2 * g4 + 16 * ob
                                        if ow >= Wo:
                                            continue
                                        y[img, c, oh, ow] = acc[h][ob][lane][e] + b
                                        if ow + 1 < Wo:
                                            y[img, c, oh, ow + 1] = acc[h][ob][lane][2 + e] + b
    return y


# ------------------------------------------------------------------------------------------------
# fp32_rb_kernel (dwconv_forward_fp32.cu): fp32 forward-style kernel with R x CC register blocks per
# thread, stride 1, dilation 1, KH, KW <= 64; configs (R, CC, LC, LR, SUB, WY) "56" -> 56 x 56 x 4 planes,
# "28" -> 28 x 28 x 4 planes.  Vectorised over the 32 lanes of a warp (numpy), every lane with its own
# shared-memory addresses exactly as the kernel computes them.
# ------------------------------------------------------------------------------------------------
FRB_CONFIGS = {"56": (7, 7, 8, 1, 4, 8), "28": (7, 7, 4, 2, 4, 2)}
FRB_MAX_K = 64


def frb_pitch(LC, LR, SUB):  # transcription of frb_pitch(): (xp_mod, xp_rem, ps_mod, ps_rem)
    if (LC, LR, SUB) == (8, 2, 2):
        return 16, 8, 32, 16
    if (LC, LR, SUB) == (4, 2, 4):
        return 8, 4, 16, 8
    if (LC, LR, SUB) == (8, 1, 4):
        return 4, 0, 16, 8
    return 16, 8, 8, 4


def frb_rows_cap(LR, TH, KH, H):  # transcription of frb_rows_cap()
    return H if LR == 1 and H < TH + KH - 1 else TH + KH - 1


def frb_layout(KH, KW, TH, TW, SUB, pitch, rows_cap):  # transcription of frb_layout(): floats, bytes
    xp_mod, xp_rem, ps_mod, ps_rem = pitch
    xr = min(TH + KH - 1, rows_cap)
    xcols = round_up(TW + KW + 3, 4)
    xp = round_up(xcols - xp_rem, xp_mod) + xp_rem
    ps = round_up(xr * xp - ps_rem, ps_mod) + ps_rem
    fp = round_up(KW, 4)
    f_off = round_up(SUB * ps, 4)
    return dict(xr=xr, xcols=xcols, xp=xp, ps=ps, fp=fp, f_off=f_off, bytes=(f_off + KH * fp) * 4)


def fp32_rb_small_tile(Ho, Wo):  # transcription of fp32_rb_small_tile()
    big = ceil_div(Ho, 56) * 56 * ceil_div(Wo, 56) * 56
    small = ceil_div(Ho, 28) * 28 * ceil_div(Wo, 28) * 28
    return small < big


def frb_lane_x_offsets(config, KH, KW):
    """Per lane, the shared-memory float offset of the lane's first x load (rb * XP + cb, plus its plane) in
    warp 0: the bank pattern of every x load of the hot loop (the others add a warp-uniform offset)."""
    import numpy as np
    R, CC, LC, LR, SUB, WY = FRB_CONFIGS[config]
    L = frb_layout(KH, KW, WY * LR * R, LC * CC, SUB, frb_pitch(LC, LR, SUB), WY * LR * R + KH - 1)
    lanes = np.arange(32)
    sub, rt, ct = lanes // (LC * LR), (lanes // LC) % LR, lanes % LC
    return sub * L["ps"] + rt * R * L["xp"] + ct * CC


def emulate_fp32_rb(x, w, bias, pt, pl, Ho, Wo, config=None, vec_x=1):
    """Transcription of fp32_rb_kernel: the flattened staging with its incremental (row, vector) walk and
    zero-filled vectors, the chunk-major filter, the warp-uniform row / tap ranges, the per-row choice of output
    rows [i_lo, i_hi) (full, head, foot instantiations; guarded only when both ends are inside the block), the
    register ring with its compile-time slots (RS = 12, period 3 chunks: 3 per loop iteration, then 0-2), the
    padded last chunk and the single-tap tail, the epilogue.  Shared memory is a flat NaN-initialised array per CTA; every read is
    bounds-asserted and must not be NaN (never staged); the unguarded rows assert that every kernel row they
    use is inside the filter; every output is written exactly once."""
    import numpy as np
    if config is None:
        config = "28" if fp32_rb_small_tile(Ho, Wo) else "56"
    R, CC, LC, LR, SUB, WY = FRB_CONFIGS[config]
    TW, TH, THREADS = LC * CC, WY * LR * R, 32 * WY
    RS = (CC + 3 + 3) // 4 * 4
    assert RS // 4 == 3
    N, C, H, W = x.shape
    KH, KW = w.shape[2], w.shape[3]
    assert KH <= FRB_MAX_K and KW <= FRB_MAX_K
    CLIP = LR == 1
    L = frb_layout(KH, KW, TH, TW, SUB, frb_pitch(LC, LR, SUB), frb_rows_cap(LR, TH, KH, H))
    assert L["bytes"] <= 227 * 1024
    xr, xcols, xp, ps, fp, f_off = L["xr"], L["xcols"], L["xp"], L["ps"], L["fp"], L["f_off"]
    xd = x.double().numpy()
    wd = w.double().numpy()
    y = np.full((N, C, Ho, Wo), np.nan)
    clamp = lambda v, lo, hi: lo if v < lo else (hi if v > hi else v)  # noqa: E731
    kh4 = 4 * KH

    for grp in range(ceil_div(N, SUB)):
        for c in range(C):
            for by in range(ceil_div(Wo, TW)):
                for bz in range(ceil_div(Ho, TH)):
                    n0, ow0, oh0 = grp * SUB, by * TW, bz * TH
                    c0 = ((ow0 - pl) // 4) * 4
                    s0 = ow0 - pl - c0
                    assert 0 <= s0 < 4
                    smem = np.full(L["bytes"] // 4, np.nan)
                    # ---- staging: x, flattened (row, vector) walk per plane
                    ve = vec_x
                    vpr = xcols // ve
                    assert xcols % ve == 0
                    dr, dj = THREADS // vpr, THREADS - (THREADS // vpr) * vpr
                    xr_tile = TH + KH - 1
                    r_lo, r_hi = clamp(pt - oh0, 0, xr_tile), clamp(H + pt - oh0, 0, xr_tile)
                    r0 = r_lo if CLIP else 0
                    q_lo, q_hi = clamp(-c0, 0, xcols), clamp(W - c0, 0, xcols)
                    for sub in range(SUB):
                        n = n0 + sub
                        n_in = n < N
                        for tid in range(THREADS):
                            rr, j = tid // vpr, tid - (tid // vpr) * vpr
                            while rr < xr:
                                q, r = j * ve, rr + r0
                                cnt = 0
                                if n_in and r_lo <= r < r_hi and q_lo <= q < q_hi:
                                    cnt = q_hi - q if q_hi - q < ve else ve
                                assert not (q < q_lo < q + ve)        # a vector never straddles column 0
                                dst = sub * ps + rr * xp + q
                                assert dst % ve == 0 and q + ve <= xcols  # aligned vector, inside the row
                                for e in range(ve):
                                    smem[dst + e] = xd[n, c, oh0 - pt + r, c0 + q + e] if e < cnt else 0.0
                                rr += dr
                                j += dj
                                if j >= vpr:
                                    j -= vpr
                                    rr += 1
                    for kh in range(KH):  # filter, chunk-major
                        for kw in range(fp):
                            smem[f_off + (kw >> 2) * kh4 + 4 * kh + (kw & 3)] = wd[c, 0, kh, kw] if kw < KW else 0.0

                    lanes = np.arange(32)
                    sub_l, rt, ct = lanes // (LC * LR), (lanes // LC) % LR, lanes % LC
                    plane_lo = sub_l * ps

                    def rd_x(addr):  # per-lane x loads: inside the lane's staged plane, staged columns only
                        rel = addr - plane_lo
                        assert (rel >= 0).all() and (rel < xr * xp).all() and (rel % xp < xcols).all()
                        v = smem[addr]
                        assert not np.isnan(v).any()
                        return v

                    def rd_f(off, kw_in_chunk_ok=True):  # warp-uniform filter load (broadcast)
                        assert f_off <= off < f_off + KH * fp
                        v = smem[off]
                        assert not np.isnan(v)
                        return v

                    for warp in range(WY):
                        wr0 = oh0 + warp * (LR * R)
                        if wr0 >= Ho:
                            continue
                        rb = warp * (LR * R) + rt * R
                        cb = ct * CC
                        r0w = clamp(pt - oh0, 0, TH + KH - 1) if CLIP else 0
                        xb = sub_l * ps + (rb - r0w) * xp + s0 + cb
                        SR = R + KH - 1
                        s_lo = clamp(pt - (wr0 + (LR - 1) * R), 0, SR)
                        s_hi = clamp(H + pt - wr0, 0, SR)
                        kw_lo = clamp(pl - (ow0 + TW - 1), 0, KW)
                        kw_hi = clamp(W + pl - ow0, 0, KW)
                        kwa = kw_lo & ~3
                        ntap = kw_hi - kwa
                        nfull = (ntap >> 2) + (1 if (ntap & 3) == 3 else 0)
                        ntail = 0 if (ntap & 3) == 3 else (ntap & 3)
                        acc = np.zeros((32, R, CC))

                        def kernel_row_ok(s, i, guard):
                            if guard:
                                return 0 <= s - i < KH
                            assert 0 <= s - i < KH  # the unguarded rows never reach outside the filter
                            return True

                        def chunk(P, xs, fs, ring, s, rows, guard):
                            for t in range(4):
                                ring[(4 * P + CC - 1 + t) % RS] = rd_x(xs + CC - 1 + t)
                            for i in rows:
                                if not kernel_row_ok(s, i, guard):
                                    continue
                                base = fs - 4 * i
                                assert (base - f_off) % 4 == 0  # LDS.128: 16-byte aligned
                                f = [rd_f(base + t) for t in range(4)]
                                for t in range(4):
                                    for jj in range(CC):
                                        acc[:, i, jj] += ring[(4 * P + t + jj) % RS] * f[t]

                        def tap(xs, fs, s, rows, guard):
                            xv = [rd_x(xs + jj) for jj in range(CC)]
                            for i in rows:
                                if not kernel_row_ok(s, i, guard):
                                    continue
                                f = rd_f(fs - 4 * i)
                                for jj in range(CC):
                                    acc[:, i, jj] += xv[jj] * f

                        def row(xs, fs, s, rows, guard):
                            xt, ft = xs + 4 * nfull, fs + nfull * kh4
                            ring = [None] * RS
                            for v in range(CC - 1):
                                ring[v] = rd_x(xs + v)
                            n3, rem = nfull // 3, nfull - 3 * (nfull // 3)
                            for _ in range(n3):
                                chunk(0, xs, fs, ring, s, rows, guard)
                                chunk(1, xs + 4, fs + kh4, ring, s, rows, guard)
                                chunk(2, xs + 8, fs + 2 * kh4, ring, s, rows, guard)
                                xs, fs = xs + 12, fs + 3 * kh4
                            if rem > 0:
                                chunk(0, xs, fs, ring, s, rows, guard)
                            if rem > 1:
                                chunk(1, xs + 4, fs + kh4, ring, s, rows, guard)
                            if ntail > 0:
                                tap(xt, ft, s, rows, guard)
                            if ntail > 1:
                                tap(xt + 1, ft + 1, s, rows, guard)

                        if kw_lo < kw_hi:
                            for s in range(s_lo, s_hi):
                                xrow = xb + s * xp
                                frow = f_off + kwa * KH + 4 * s
                                i_lo, i_hi = max(s - KH + 1, 0), min(s + 1, R)
                                if i_lo == 0 and i_hi == R:
                                    row(xrow + kwa, frow, s, range(0, R), False)
                                elif i_lo == 0:                       # frb_row_head: rows [0, V), V = i_hi
                                    assert 1 <= i_hi <= R - 1
                                    row(xrow + kwa, frow, s, range(0, i_hi), False)
                                elif i_hi == R:                       # frb_row_foot: rows [R - V, R), V = R - i_lo
                                    assert 1 <= R - i_lo <= R - 1
                                    row(xrow + kwa, frow, s, range(i_lo, R), False)
                                else:                                 # KH < R - 1
                                    row(xrow + kwa, frow, s, range(0, R), True)
                        b = 0.0 if bias is None else float(bias[c])
                        for lane in range(32):
                            n = n0 + int(sub_l[lane])
                            if n >= N:
                                continue
                            for i in range(R):
                                oh = oh0 + int(rb[lane]) + i
                                if oh >= Ho:
                                    break
                                for jj in range(CC):
                                    ow = ow0 + int(cb[lane]) + jj
                                    if ow < Wo:
                                        assert np.isnan(y[n, c, oh, ow])  # each output written once
                                        y[n, c, oh, ow] = acc[lane, i, jj] + b
    return torch.from_numpy(y)


# ------------------------------------------------------------------------------------------------
# small planes (dwconv_small_plane.cu): the batch-as-rows GEMM per channel.  small_plane_mma_kernel /
# small_plane_ffma_kernel (forward; TRANS = grad_input as dY . F_c^T), small_plane_gw_mma_kernel /
# small_plane_gw_ffma_kernel (grad_weight: G = X^T dY, tap sums per split) + grad_weight_reduce_kernel.
# ------------------------------------------------------------------------------------------------
SP_THREADS, SP_WARPS, SP_MB_TC, SP_MB_F32 = 256, 8, 64, 32
SP_XP_F32 = SP_MB_F32 + 4
SP_MAX_PIX, SP_MAX_TAPS, SP_SMEM_BUDGET = 256, 4096, 112 * 1024
SP_MAX_GEOM, SP_MAX_PAD = 1024, 65536


def sp_rule(tc, sm_major, N, C, H, W, Ho, Wo, KH, KW, sh, sw, dh, dw, pt, pl):  # transcription of sp_rule()
    if tc and sm_major < 8:
        return False
    if N < 1 or C < 1 or C > 2147483647:
        return False
    if H * W > SP_MAX_PIX or Ho * Wo > SP_MAX_PIX or min(H, W, Ho, Wo) < 1:
        return False
    if KH * KW > SP_MAX_TAPS or max(sh, sw, dh, dw) > SP_MAX_GEOM or max(abs(pt), abs(pl)) > SP_MAX_PAD:
        return False
    return min(KH, H) * min(KW, W) * 8 >= H * W


def sp_layout_tc(P, QB, taps):  # sp_layout_tc(): element pitches, byte offsets
    kp = round_up(P, 16)
    pitch = kp + 8
    qr = round_up(QB, 16)
    bs_off = SP_MB_TC * pitch * 2
    fs_off = bs_off + qr * pitch * 2
    return dict(kp=kp, pitch=pitch, qr=qr, bs_off=bs_off, fs_off=fs_off, bytes=fs_off + 2 * round_up(taps * 2, 16))


def sp_layout_f32(P, QB, taps):  # sp_layout_f32()
    qr = round_up(QB, 8)
    bs_off = P * SP_XP_F32 * 4
    fs_off = bs_off + P * qr * 4
    return dict(kp=P, pitch=SP_XP_F32, qr=qr, bs_off=bs_off, fs_off=fs_off, bytes=fs_off + round_up(taps * 4, 16))


def sp_gw_layout(P, QB, tc):  # sp_gw_layout()
    if tc:
        grows = round_up(P, 16)
        xp, yp, gp = grows + 8, round_up(QB, 16) + 8, round_up(QB, 16) + 8
        ys_off = SP_MB_TC * xp * 2
        gs_off = round_up(ys_off + SP_MB_TC * yp * 2, 16)
    else:
        grows = round_up(P, 4)
        xp, yp = grows, round_up(QB, 8)
        gp = yp
        ys_off = SP_MB_F32 * xp * 4
        gs_off = ys_off + SP_MB_F32 * yp * 4
    return dict(grows=grows, xp=xp, yp=yp, gp=gp, ys_off=ys_off, gs_off=gs_off, bytes=gs_off + grows * gp * 4)


def sp_bytes(kind, P, QB, taps):  # kind 4: fp32 forward on TF32 tensor cores (section "toeplitz_tf32_kernel")
    return [lambda: sp_layout_tc(P, QB, taps), lambda: sp_layout_f32(P, QB, taps),
            lambda: sp_gw_layout(P, QB, True), lambda: sp_gw_layout(P, QB, False),
            lambda: sp_layout_tf32(P, QB, taps)][kind]()["bytes"]


def sp_make_plan(kind, P, Q, taps, N, C, max_smem_optin, target_ctas=512):
    """sp_make_plan(): kind 0/1 = 16-bit/fp32 forward, 2/3 = 16-bit/fp32 grad_weight, 4 = TF32 forward; None if
    nothing fits."""
    budget = min(max_smem_optin, SP_SMEM_BUDGET)
    mb = SP_MB_TC if kind in (0, 2, 4) else SP_MB_F32
    for s in range(1, 33):
        QB = round_up(ceil_div(Q, s), 8)
        nbytes = sp_bytes(kind, P, QB, taps)
        if nbytes > budget:
            continue
        qsplits = ceil_div(Q, QB)
        nchunks = ceil_div(N, mb)
        bg = ceil_div(target_ctas, C * qsplits)
        bg = max(min(bg, nchunks, 1024 // qsplits), 1)
        cpg = ceil_div(nchunks, bg)
        return dict(P=P, Q=Q, QB=QB, qsplits=qsplits, bgroups=ceil_div(nchunks, cpg), cpg=cpg, nchunks=nchunks,
                    bytes=nbytes)
    return None


def _sp_build_fc(B, b_off, sn, sk, f, geo, trans, q0, qn, pairs=False):
    """sp_build_fc(): thread t -> (pixel qi = t mod nq, kernel-row group t / nq of ceil(KH / kg) rows), the
    kw range per pixel, the kh range per group (clipped to the image when dil_h == 1), one run of taps per
    kernel row; pairs: the 32-bit word copy (an odd leading element alone, words from Fs or the shifted Fo, an
    odd trailing element alone).  Writes B[b_off + nidx * sn + kidx * sk] = f[kh, kw] (B zero-filled before)."""
    H, W, Ho, Wo, KH, KW, sh, sw, dh, dw, pt, pl = geo
    nq = Ho * Wo if trans else qn
    qs = 0 if trans else q0
    assert nq <= SP_THREADS
    kg = SP_THREADS // nq
    khper = ceil_div(KH, kg)
    fl = f.reshape(-1)
    fl_list = [float(v) for v in fl]
    fo = fl_list[1:] + [0.0]  # Fo[i] = Fs[i + 1], 0 at the end
    for t in range(nq * kg):  # threads beyond nq * kg return at once
        g, qi = divmod(t, nq)
        q = qs + qi
        oh, ow = divmod(q, Wo)
        iw0 = ow * sw - pl
        if dw == 1:
            kw_lo, kw_hi = max(-iw0, 0), W - iw0
        else:  # sp_kw_range_dilated()
            kw_lo = ceil_div(-iw0, dw) if iw0 < 0 else 0
            kw_hi = 0 if W - 1 - iw0 < 0 else (W - 1 - iw0) // dw + 1
        kw_hi = min(kw_hi, KW)
        if kw_lo >= kw_hi:
            continue
        kh_lo, kh_hi = g * khper, min(g * khper + khper, KH)
        ih0 = oh * sh - pt
        if dh == 1:
            kh_lo, kh_hi = max(-ih0, kh_lo), min(H - ih0, kh_hi)
        for kh in range(kh_lo, kh_hi):
            ih = ih0 + kh * dh
            if dh != 1 and not 0 <= ih < H:
                continue
            assert 0 <= ih < H
            pbase = ih * W + iw0
            if not trans:
                assert sk == 1 or not pairs
                if pairs:
                    d = b_off + qi * sn + pbase + kw_lo
                    n = kw_hi - kw_lo
                    i = 0
                    if d % 2:  # (B's base is 16-byte aligned: the element index's parity is the address's)
                        B[d] = float(fl[kh * KW + kw_lo])
                        i = 1
                    s0 = kh * KW + kw_lo + i
                    src, base = (fo, s0 - 1) if s0 % 2 else (fl_list, s0)  # an even (word-aligned) index either way
                    assert base % 2 == 0
                    for k in range((n - i) // 2):
                        assert (d + i + 2 * k) % 2 == 0
                        B[d + i + 2 * k] = src[base + 2 * k]
                        B[d + i + 2 * k + 1] = src[base + 2 * k + 1]
                    if (n - i) % 2:
                        B[d + n - 1] = float(fl[kh * KW + kw_hi - 1])
                    for kw in range(kw_lo, kw_hi):
                        assert 0 <= iw0 + kw < W
                else:
                    for kw in range(kw_lo, kw_hi):
                        p = pbase + kw * dw
                        assert 0 <= iw0 + kw * dw < W and 0 <= p < H * W
                        B[b_off + qi * sn + p * sk] = float(f[kh, kw])
            else:
                if dw == 1:
                    lo, hi = max(q0 - pbase, kw_lo), min(q0 + qn - pbase, kw_hi)
                else:  # sp_kw_clip_dilated()
                    lo = max((q0 - pbase + dw - 1) // dw, kw_lo)
                    hi = min((q0 + qn - 1 - pbase) // dw + 1, kw_hi)
                for kw in range(lo, hi):
                    p = pbase + kw * dw
                    assert q0 <= p < q0 + qn and 0 <= iw0 + kw * dw < W
                    B[b_off + q * sk + (p - q0) * sn] = float(f[kh, kw])


def _sp_stage(S, s_off, pitch, width, plane, rows, rows_valid, pix0, cnt, ve):
    """sp_stage(): rows of a flattened plane tensor plane[m, pixel] (m = batch row of the chunk)."""
    for m in range(rows):
        rv = m < rows_valid
        if ve > 1:
            for j in range(0, width, ve):
                n = min(max(cnt - j, 0), ve) if rv else 0
                for k in range(ve):
                    S[s_off + m * pitch + j + k] = float(plane[m, pix0 + j + k]) if k < n else 0.0
        else:
            for j in range(width):
                S[s_off + m * pitch + j] = float(plane[m, pix0 + j]) if (rv and j < cnt) else 0.0


def _ldmatrix_x4_trans(smem, lane_addr):
    """ldmatrix.m8n8.x4.trans.b16: lane l gives the address of row l % 8 of matrix l // 8; lane T receives,
    from each matrix, the elements (row 2 (T % 4), column T / 4) and (row 2 (T % 4) + 1, column T / 4)."""
    return [[(smem[lane_addr[8 * mi + 2 * (T % 4)] + T // 4], smem[lane_addr[8 * mi + 2 * (T % 4) + 1] + T // 4])
             for mi in range(4)] for T in range(32)]


def _sp_mma_item(smem, abase, a_step, a_m1, bbase, b_step, b_n1, ksteps, mt1, ntv, ldt):
    """sp_mma_item(): per-lane element addresses in abase / bbase (lists of 32); returns acc[mt][nt][lane][r]."""
    ld = _ldmatrix_x4_trans if ldt else _ldmatrix_x4
    acc = [[[[0.0] * 4 for _ in range(32)] for _ in range(4)] for _ in range(2)]
    for ks in range(ksteps):
        af = [ld(smem, [a + ks * a_step for a in abase])]
        af.append(ld(smem, [a + ks * a_step + a_m1 for a in abase]) if mt1 else None)
        r4 = ld(smem, [b + ks * b_step for b in bbase])
        bf = [([r[0] for r in r4], [r[1] for r in r4]), ([r[2] for r in r4], [r[3] for r in r4])]
        if ntv > 2:
            r4 = ld(smem, [b + ks * b_step + b_n1 for b in bbase])
            bf += [([r[0] for r in r4], [r[1] for r in r4]), ([r[2] for r in r4], [r[3] for r in r4])]
        for nt in range(ntv):
            _mma_m16n8k16(acc[0][nt], af[0], bf[nt][0], bf[nt][1])
            if mt1:
                _mma_m16n8k16(acc[1][nt], af[1], bf[nt][0], bf[nt][1])
    return acc


def _sp_planes(xin, trans, geo):
    """(read plane (kH, kW), written plane (nH, nW)) of the pass, as the kernels name them."""
    H, W, Ho, Wo = geo[:4]
    return ((Ho, Wo), (H, W)) if trans else ((H, W), (Ho, Wo))


def emulate_small_plane_forward(xin, w, bias, geo, trans, tc, max_smem_optin=227 * 1024, vec_x=1, target_ctas=512):
    """Transcription of small_plane_mma_kernel (tc) / small_plane_ffma_kernel for every CTA of the launch.
    geo = (H, W, Ho, Wo, KH, KW, sh, sw, dh, dw, pt, pl) of the forward convolution; xin = x (N, C, H, W), or
    for trans (grad_input) grad_out (N, C, Ho, Wo); returns y (N, C, Ho, Wo) or grad_input (N, C, H, W).
    Shared memory is a flat NaN-initialised array per CTA (a read of anything unwritten shows)."""
    H, W, Ho, Wo, KH, KW, sh, sw, dh, dw, pt, pl = geo
    N, C = xin.shape[:2]
    (kH, kW), (nH, nW) = _sp_planes(xin, trans, geo)
    assert tuple(xin.shape[2:]) == (kH, kW)
    assert sp_rule(tc, 9, N, C, H, W, Ho, Wo, KH, KW, sh, sw, dh, dw, pt, pl)
    P, Q, taps = kH * kW, nH * nW, KH * KW
    plan = sp_make_plan(0 if tc else 1, P, Q, taps, N, C, max_smem_optin, target_ctas)
    assert plan is not None
    QB = plan["QB"]
    L = sp_layout_tc(P, QB, taps) if tc else sp_layout_f32(P, QB, taps)
    esz = 2 if tc else 4
    MB = SP_MB_TC if tc else SP_MB_F32
    xf = xin.reshape(N, C, P).double()
    y = torch.full((N, C, Q), float("nan"), dtype=torch.float64)
    for c in range(C):
        f = w[c, 0].double()
        b = 0.0 if bias is None else float(bias[c])
        for by in range(plan["qsplits"]):
            q0 = by * QB
            qn = min(QB, Q - q0)
            for bz in range(plan["bgroups"]):
                smem = [float("nan")] * (L["bytes"] // esz)
                bs = L["bs_off"] // esz
                nB = L["qr"] * L["pitch"] if tc else P * L["qr"]
                for e in range(nB):
                    smem[bs + e] = 0.0
                if tc:
                    _sp_build_fc(smem, bs, L["pitch"], 1, f, geo, trans, q0, qn, pairs=not trans and dw == 1)
                else:
                    _sp_build_fc(smem, bs, 1, L["qr"], f, geo, trans, q0, qn)
                ch0 = bz * plan["cpg"]
                for ch in range(ch0, min(ch0 + plan["cpg"], plan["nchunks"])):
                    n0 = ch * MB
                    rv = min(N - n0, MB)
                    plane = torch.zeros(MB, round_up(max(P, 1), 16) + 16, dtype=torch.float64)
                    plane[:rv, :P] = xf[n0:n0 + rv, c]
                    if tc:
                        _sp_stage(smem, 0, L["pitch"], L["kp"], plane, MB, rv, 0, P, vec_x)
                        _sp_gemm_tc_forward(smem, L, y, c, n0, rv, q0, qn, b)
                    else:
                        for k in range(P):  # Xs[k][m], lanes = rows
                            for lane in range(32):
                                smem[k * SP_XP_F32 + lane] = float(plane[lane, k]) if lane < rv else 0.0
                        _sp_gemm_ffma_forward(smem, L, P, y, c, n0, rv, q0, qn, b)
    return y.reshape(N, C, nH, nW)


def _sp_gemm_tc_forward(smem, L, y, c, n0, rows_valid, q0, qn, bias):
    pitch = L["pitch"]
    bs = L["bs_off"] // 2
    ksteps = L["kp"] // 16
    nnb = ceil_div(qn, 32)
    a_lane = [(l & 15) * pitch + (l >> 4) * 8 for l in range(32)]
    b_lane = [bs + (((l >> 4) << 3) + (l & 7)) * pitch + ((l >> 3) & 1) * 8 for l in range(32)]
    for warp in range(SP_WARPS):
        for item in range(warp, 2 * nnb, SP_WARPS):
            mb, nb = item & 1, item >> 1
            if mb * 32 >= rows_valid:
                continue
            mt1 = mb * 32 + 16 < rows_valid
            ntv = min(ceil_div(qn - nb * 32, 8), 4)
            assert all(a % pitch + 16 <= L["kp"] + 8 for a in a_lane)
            assert (nb * 32 + (32 if ntv > 2 else 16)) <= L["qr"]
            # sp_fwd_item<T, true> (no bounds checks) when every row and pixel is live (and the pairs aligned)
            full = rows_valid - mb * 32 >= 32 and qn - nb * 32 >= 32
            acc = _sp_mma_item(smem, [a + mb * 32 * pitch for a in a_lane], 16, 16 * pitch,
                               [b_ + nb * 32 * pitch for b_ in b_lane], 16, 16 * pitch, ksteps, mt1, ntv, False)
            for mt in range(2):
                for h in range(2):
                    for lane in range(32):
                        g4, t4 = lane >> 2, lane & 3
                        m = mb * 32 + mt * 16 + g4 + 8 * h
                        if m >= rows_valid:
                            continue
                        for nt in range(4):
                            for e in range(2):
                                qq = nb * 32 + nt * 8 + 2 * t4 + e
                                assert not full or (qq < qn and m < rows_valid)
                                if qq < qn:
                                    assert nt < ntv and (mt == 0 or mt1)
                                    y[n0 + m, c, q0 + qq] = acc[mt][nt][lane][2 * h + e] + bias


def _sp_gemm_ffma_forward(smem, L, P, y, c, n0, rows_valid, q0, qn, bias):
    qr = L["qr"]
    bs = L["bs_off"] // 4
    for it in range(8 * ceil_div(qn, 8)):  # it = thread (+ 256 * round)
        mg, qg = it & 7, it >> 3
        acc = [[0.0] * 8 for _ in range(4)]
        for k in range(P):
            xa = [smem[k * SP_XP_F32 + 4 * mg + i] for i in range(4)]
            ba = [smem[bs + k * qr + 8 * qg + j] for j in range(8)]
            for i in range(4):
                for j in range(8):
                    acc[i][j] += xa[i] * ba[j]
        for i in range(4):
            m = 4 * mg + i
            if m >= rows_valid:
                continue
            for j in range(8):
                if 8 * qg + j < qn:
                    y[n0 + m, c, q0 + 8 * qg + j] = acc[i][j] + bias


def _sp_tap_sums(G, g_off, gp, geo, q0, qn):
    """sp_tap_sums(): thread = tap; G[p][q - q0] over its pairs in (oh, ow) order (the block's output rows,
    each row's columns clipped to the block and to the image)."""
    H, W, Ho, Wo, KH, KW, sh, sw, dh, dw, pt, pl = geo
    out = [0.0] * (KH * KW)
    oh_a, oh_b = q0 // Wo, (q0 + qn - 1) // Wo
    for t in range(KH * KW):
        kh, kw = divmod(t, KW)
        iw0 = kw * dw - pl
        ow_lo = ceil_div(-iw0, sw) if iw0 < 0 else 0
        ow_hi = 0 if W - 1 - iw0 < 0 else (W - 1 - iw0) // sw + 1
        s = 0.0
        for oh in range(oh_a, oh_b + 1):
            ih = oh * sh - pt + kh * dh
            if ih < 0 or ih >= H:
                continue
            lo = max(q0 - oh * Wo, ow_lo)
            hi = min(q0 + qn - oh * Wo, ow_hi, Wo)
            for ow in range(lo, hi):
                p, qq = ih * W + iw0 + ow * sw, oh * Wo + ow - q0
                assert 0 <= p < H * W and 0 <= qq < qn
                v = G[g_off + p * gp + qq]
                assert v == v, "G element not computed"
                s += v
        out[t] = s
    return out


def emulate_small_plane_grad_weight(x, g, geo, tc, max_smem_optin=227 * 1024, vec_x=1, vec_g=1, target_ctas=512):
    """Transcription of small_plane_gw_mma_kernel (tc: ldmatrix.trans fragments of X^T and dY, fp32 G in
    shared memory accumulated over the batch chunks of the group) / small_plane_gw_ffma_kernel (4 x 8 register
    block), the tap sums per split, then grad_weight_reduce_kernel (splits in order).  Returns (C, 1, KH, KW)."""
    H, W, Ho, Wo, KH, KW, sh, sw, dh, dw, pt, pl = geo
    N, C = x.shape[:2]
    assert sp_rule(tc, 9, N, C, H, W, Ho, Wo, KH, KW, sh, sw, dh, dw, pt, pl)
    P, Q, taps = H * W, Ho * Wo, KH * KW
    plan = sp_make_plan(2 if tc else 3, P, Q, taps, N, C, max_smem_optin, target_ctas)
    assert plan is not None
    QB, qsplits = plan["QB"], plan["qsplits"]
    splits = qsplits * plan["bgroups"]
    L = sp_gw_layout(P, QB, tc)
    esz = 2 if tc else 4
    MB = SP_MB_TC if tc else SP_MB_F32
    xf, gf = x.reshape(N, C, P).double(), g.reshape(N, C, Q).double()
    partial = torch.full((splits, C, taps), float("nan"), dtype=torch.float64)
    for c in range(C):
        for split in range(splits):
            qs, bg = split % qsplits, split // qsplits
            q0 = qs * QB
            qn = min(QB, Q - q0)
            smem = [float("nan")] * (L["gs_off"] // esz)   # Xs, Ys (elements of T)
            G = [float("nan")] * (L["grows"] * L["gp"])    # Gs (fp32)
            ch0 = bg * plan["cpg"]
            for ch in range(ch0, min(ch0 + plan["cpg"], plan["nchunks"])):
                n0 = ch * MB
                rv = min(N - n0, MB)
                xp_ = torch.zeros(MB, L["grows"] + 16, dtype=torch.float64)
                xp_[:rv, :P] = xf[n0:n0 + rv, c]
                gp_ = torch.zeros(MB, Q + 32, dtype=torch.float64)
                gp_[:rv, :Q] = gf[n0:n0 + rv, c]
                ys = L["ys_off"] // esz
                first = ch == ch0
                if tc:
                    _sp_stage(smem, 0, L["xp"], L["grows"], xp_, MB, rv, 0, P, vec_x)
                    _sp_stage(smem, ys, L["yp"], round_up(QB, 16), gp_, MB, rv, q0, qn, vec_g)
                    ksteps = ceil_div(rv, 16)
                    nmg, nnb = ceil_div(L["grows"], 32), ceil_div(qn, 32)
                    a_lane = [((((l >> 4) & 1) * 8 + (l & 7)) * L["xp"] + ((l >> 3) & 1) * 8) for l in range(32)]
                    b_lane = [ys + ((((l >> 3) & 1) * 8 + (l & 7)) * L["yp"] + ((l >> 4) & 1) * 8) for l in range(32)]
                    for warp in range(SP_WARPS):
                        for item in range(warp, nmg * nnb, SP_WARPS):
                            mb, nb = item % nmg, item // nmg
                            mt1 = mb * 32 + 16 < P
                            ntv = min(ceil_div(qn - nb * 32, 8), 4)
                            acc = _sp_mma_item(smem, [a + mb * 32 for a in a_lane], 16 * L["xp"], 16,
                                               [b_ + nb * 32 for b_ in b_lane], 16 * L["yp"], 16, ksteps, mt1, ntv,
                                               True)
                            for mt in range(2 if mt1 else 1):
                                for nt in range(ntv):
                                    for lane in range(32):
                                        g4, t4 = lane >> 2, lane & 3
                                        for h in range(2):
                                            row = mb * 32 + mt * 16 + g4 + 8 * h
                                            col = nb * 32 + nt * 8 + 2 * t4
                                            assert row < L["grows"] and col + 1 < L["gp"]
                                            for e in range(2):
                                                v = acc[mt][nt][lane][2 * h + e]
                                                G[row * L["gp"] + col + e] = v if first else G[row * L["gp"] + col + e] + v
                else:
                    _sp_stage(smem, 0, L["xp"], L["grows"], xp_, MB, rv, 0, P, vec_x)
                    _sp_stage(smem, ys, L["yp"], L["yp"], gp_, MB, rv, q0, qn, vec_g)
                    npg, nqg = L["grows"] // 4, ceil_div(qn, 8)
                    for it in range(npg * nqg):
                        pg, qg = it % npg, it // npg
                        acc = [[0.0] * 8 for _ in range(4)]
                        for n in range(rv):
                            xa = [smem[n * L["xp"] + 4 * pg + i] for i in range(4)]
                            ya = [smem[ys + n * L["yp"] + 8 * qg + j] for j in range(8)]
                            for i in range(4):
                                for j in range(8):
                                    acc[i][j] += xa[i] * ya[j]
                        for i in range(4):
                            for j in range(8):
                                k = (4 * pg + i) * L["gp"] + 8 * qg + j
                                G[k] = acc[i][j] if first else G[k] + acc[i][j]
            partial[split, c] = torch.tensor(_sp_tap_sums(G, 0, L["gp"], geo, q0, qn), dtype=torch.float64)
    out = partial[0].clone()
    for s in range(1, splits):  # grad_weight_reduce_kernel: the splits in split order
        out += partial[s]
    return out.reshape(C, 1, KH, KW)


# ------------------------------------------------------------------------------------------------
# small-plane grad_weight by row pairs (dwconv_small_plane_gw_rows.cu): small_plane_gw_rows_kernel, fp16/bf16,
# stride 1, dilation 1.  R_dh[ow, iw] = sum_{n, oh} dY[n, oh, ow] X[n, oh + dh, iw] per dh (16 x 16 mma.sync
# accumulators, GR_ND dh per warp), then dW[kh, kw] = sum_ow R_{kh - pt}[ow, ow + kw - pl]; splits = batch groups,
# then grad_weight_reduce_kernel.  Shared memory starts as NaN: an element read before it is written (or a
# padding column that reaches a tap sum) shows up as NaN in the result.
# ------------------------------------------------------------------------------------------------
GR_THREADS, GR_WARPS, GR_ND, GR_MB, GR_MAX_SIDE, GR_MIN_W, GR_RP = 256, 8, 4, 32, 16, 9, 24


def gr_plan(N, C, H, Ho, KH, pt, target_ctas=512):  # transcription of gr_plan() (the kernel: target 512)
    dh_lo = max(-pt, 1 - Ho)
    dh_hi = min(KH - 1 - pt, H - 1)
    ndh = max(dh_hi - dh_lo + 1, 0)
    xpi, ypi = H * 16 + 8, Ho * 16 + 8
    stage_bytes = GR_MB * (xpi + ypi) * 2
    nbytes = max(2 * stage_bytes, ndh * 16 * GR_RP * 4)
    nchunks = ceil_div(N, GR_MB)
    bg = max(min(ceil_div(target_ctas, C), nchunks, 1024), 1)
    cpg = ceil_div(nchunks, bg)
    return dict(dh_lo=dh_lo, ndh=ndh, xpi=xpi, ypi=ypi, stage_bytes=stage_bytes, bytes=nbytes, nchunks=nchunks,
                cpg=cpg, bgroups=ceil_div(nchunks, cpg))


def gr_rule(tc, sm_major, N, C, H, W, Ho, Wo, KH, KW, sh, sw, dh, dw, pt, pl, max_smem_optin=227 * 1024):
    """gr_rule(): the small-plane grad_weight rule (sp_rule + a plan that fits) and stride 1, dilation 1,
    GR_MIN_W <= W <= 16, H, Ho, Wo <= 16, 16-bit, sm80+, the row-pair plan within the budget."""
    if not tc or sm_major < 8 or (sh, sw, dh, dw) != (1, 1, 1, 1):
        return False
    if not (GR_MIN_W <= W <= GR_MAX_SIDE and 1 <= H <= GR_MAX_SIDE and 1 <= Wo <= GR_MAX_SIDE
            and 1 <= Ho <= GR_MAX_SIDE and N >= 1):
        return False
    if not sp_rule(tc, sm_major, N, C, H, W, Ho, Wo, KH, KW, sh, sw, dh, dw, pt, pl):
        return False
    if sp_make_plan(2, H * W, Ho * Wo, KH * KW, N, C, max_smem_optin) is None:
        return False
    return gr_plan(N, C, H, Ho, KH, pt)["bytes"] <= min(max_smem_optin, SP_SMEM_BUDGET)


def gr_vec(w, flat, aligned_elems):
    """gr_vec(): cp.async width for a flat contiguous plane with rows `w` wide; aligned_elems = the largest power
    of two (<= 8) that the pointer and the image / channel strides are multiples of (elements)."""
    if not flat:
        return 1
    for ve in (8, 4, 2):
        if w % ve == 0 and aligned_elems % ve == 0:
            return ve
    return 1


def _gr_offsets(ve, w, rows):
    """gr_offsets<VE>(): per lane the smem element offsets of vectors u = lane + 32 k (-1: none)."""
    nvw = w // ve
    nv = nvw * rows
    out = []
    for lane in range(32):
        so = []
        for k in range(4):
            u = lane + 32 * k
            r = u // nvw
            so.append(r * 16 + (u - r * nvw) * ve if u < nv else -1)
        out.append(so)
    return out


def _gr_stage(S, base, ip, plane, w, rows, rv, kpad, ve):
    """gr_stage(): images [0, kpad) of a chunk; plane[m] = the image's (rows, w) plane (m < rv)."""
    if ve > 1:
        offs = _gr_offsets(ve, w, rows)
        assert max(max(o) for o in offs) + ve <= rows * 16
        for warp in range(GR_WARPS):
            for m in range(warp, kpad, GR_WARPS):
                flat = plane[m].reshape(-1) if m < rv else None
                for lane in range(32):
                    for k in range(4):
                        so = offs[lane][k]
                        if so < 0:
                            continue
                        u = lane + 32 * k
                        for e in range(ve):  # cp.async of ve elements, zero-filled (src bytes 0) past the batch
                            S[base + m * ip + so + e] = float(flat[u * ve + e]) if m < rv else 0.0
    else:
        per = rows * w
        for e in range(kpad * per):
            m, pix = divmod(e, per)
            r, q = divmod(pix, w)
            S[base + m * ip + r * 16 + q] = float(plane[m, r, q]) if m < rv else 0.0


def _gr_mma(acc, a_regs, b0, b1):
    """mma.sync.m16n8k16 on per-lane fragments (layout as _mma_m16n8k16); NaN operands allowed: they stay
    confined to their own output row (A) / column (B), which the tap sums then must never read."""
    A = torch.empty((16, 16), dtype=torch.float64)
    B = torch.empty((16, 8), dtype=torch.float64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for reg, (ro, co) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
            A[g + ro, 2 * t + co], A[g + ro, 2 * t + co + 1] = a_regs[lane][reg]
        B[2 * t, g], B[2 * t + 1, g] = b0[lane]
        B[2 * t + 8, g], B[2 * t + 9, g] = b1[lane]
    D = (A.unsqueeze(2) * B.unsqueeze(0)).sum(1)  # each D[i, j] from row i of A and column j of B only
    for lane in range(32):
        g, t = lane // 4, lane % 4
        acc[lane][0] += float(D[g, 2 * t]); acc[lane][1] += float(D[g, 2 * t + 1])
        acc[lane][2] += float(D[g + 8, 2 * t]); acc[lane][3] += float(D[g + 8, 2 * t + 1])


def gr_lane_offsets(p):
    """the kernel's a_lane / b_lane (ldmatrix.x4.trans row addresses of lane l, here in elements): A (Ys) image
    (l & 7) + 8 ((l >> 4) & 1), ow half (l >> 3) & 1; B (Xs) image (l & 7) + 8 ((l >> 3) & 1), iw half
    (l >> 4) & 1 (tests/test_small_plane_gw_rows_review.py evaluates the kernel's own expressions against these)."""
    a_lane = [(((l >> 4) & 1) * 8 + (l & 7)) * p["ypi"] + ((l >> 3) & 1) * 8 for l in range(32)]
    b_lane = [(((l >> 3) & 1) * 8 + (l & 7)) * p["xpi"] + ((l >> 4) & 1) * 8 for l in range(32)]
    return a_lane, b_lane


def emulate_gw_rows(x, g, geo, vec_x=1, vec_g=1, check_rule=True, stats=None, target_ctas=512):
    """Transcription of small_plane_gw_rows_kernel for every CTA (c, batch group) + grad_weight_reduce_kernel.
    geo = (H, W, Ho, Wo, KH, KW, 1, 1, 1, 1, pt, pl); x (N, C, H, W), g (N, C, Ho, Wo); vec_x / vec_g: gr_vec of
    each plane (the kernel stages both with the smaller, VE = 1: element loads).  check_rule=False runs the
    kernel's math outside the launcher's rule (K = 1, W < 9: shapes the launcher routes elsewhere).  stats: a
    dict that receives the mma / ldmatrix counts.  target_ctas: gr_plan's CTA target (1: one batch group, so
    every chunk of the batch in one CTA: the double-buffered path).  Returns (C, 1, KH, KW) float64."""
    H, W, Ho, Wo, KH, KW, sh, sw, dh_, dw_, pt, pl = geo
    N, C = x.shape[:2]
    assert (sh, sw, dh_, dw_) == (1, 1, 1, 1) and max(H, W, Ho, Wo) <= GR_MAX_SIDE
    if check_rule:
        assert gr_rule(True, 9, N, C, H, W, Ho, Wo, KH, KW, 1, 1, 1, 1, pt, pl)
    p = gr_plan(N, C, H, Ho, KH, pt, target_ctas)
    assert p["ndh"] <= GR_WARPS * GR_ND
    ve = min(vec_x, vec_g)  # launch_gw_rows: one vector width (the template VE) for both planes
    taps = KH * KW
    splits = p["bgroups"]
    xd, gd = x.double(), g.double()
    partial = torch.full((splits, C, taps), float("nan"), dtype=torch.float64)
    ys_off = GR_MB * p["xpi"]
    a_lane, b_lane = gr_lane_offsets(p)
    a_k, b_k = 16 * p["ypi"], 16 * p["xpi"]
    st_el = p["stage_bytes"] // 2
    if stats is not None:
        stats.update(mma=0, ldsm_a=0, ldsm_b=0)
    for c in range(C):
        for bg in range(splits):
            smem = [float("nan")] * (p["bytes"] // 2)
            accs = [[[[[0.0] * 4 for _ in range(32)] for _ in range(2)] for _ in range(GR_ND)] for _ in range(GR_WARPS)]
            ch0 = bg * p["cpg"]
            ch1 = min(ch0 + p["cpg"], p["nchunks"])

            def stage(ch, buf):
                n0 = ch * GR_MB
                rv = min(N - n0, GR_MB)
                kpad = (rv + 15) & ~15
                base = buf * st_el
                _gr_stage(smem, base, p["xpi"], xd[n0:n0 + rv, c], W, H, rv, kpad, ve)
                _gr_stage(smem, base + ys_off, p["ypi"], gd[n0:n0 + rv, c], Wo, Ho, rv, kpad, ve)

            stage(ch0, 0)
            for ch in range(ch0, ch1):
                buf = (ch - ch0) & 1
                if ch + 1 < ch1:
                    stage(ch + 1, buf ^ 1)
                rv = min(N - ch * GR_MB, GR_MB)
                k2 = rv > 16
                xs, ys = buf * st_el, buf * st_el + ys_off
                for warp in range(GR_WARPS):
                    acc = accs[warp]
                    d0 = p["dh_lo"] + GR_ND * warp
                    ndw = min(p["ndh"] - GR_ND * warp, GR_ND)
                    oh_lo = max(-(d0 + ndw - 1), 0)
                    oh_hi = 0 if ndw <= 0 else min(H - d0, Ho)
                    for oh in range(oh_lo, oh_hi):
                        jlo, jhi = max(-(oh + d0), 0), min(H - oh - d0, ndw)
                        ao = [ys + a + oh * 16 for a in a_lane]
                        bo = [xs + b + (oh + d0) * 16 for b in b_lane]
                        for ks in range(2):
                            if ks == 1 and not k2:
                                break
                            af = _ldmatrix_x4_trans(smem, [a + ks * a_k for a in ao])
                            if stats is not None:
                                stats["ldsm_a"] += 1
                            for j in range(GR_ND):
                                if j < jlo or j >= jhi:
                                    continue
                                ih = oh + d0 + j
                                assert 0 <= ih < H and 0 <= oh < Ho and p["dh_lo"] <= d0 + j < p["dh_lo"] + p["ndh"]
                                r4 = _ldmatrix_x4_trans(smem, [b + ks * b_k + j * 16 for b in bo])
                                _gr_mma(acc[j][0], af, [r[0] for r in r4], [r[1] for r in r4])
                                _gr_mma(acc[j][1], af, [r[2] for r in r4], [r[3] for r in r4])
                                if stats is not None:
                                    stats["ldsm_b"] += 1
                                    stats["mma"] += 2
            # epilogue: Rs aliases the staging buffers (written after the last barrier)
            Rs = [float("nan")] * (p["bytes"] // 4)
            for warp in range(GR_WARPS):
                ndw = min(p["ndh"] - GR_ND * warp, GR_ND)
                for j in range(GR_ND):
                    if j >= ndw:
                        continue
                    r0 = (GR_ND * warp + j) * 16 * GR_RP
                    for lane in range(32):
                        g4, t4 = lane >> 2, lane & 3
                        for nt in range(2):
                            for h in range(2):
                                o = r0 + (g4 + 8 * h) * GR_RP + nt * 8 + 2 * t4
                                Rs[o], Rs[o + 1] = accs[warp][j][nt][lane][2 * h], accs[warp][j][nt][lane][2 * h + 1]
            for t in range(taps):
                kh, kw = divmod(t, KW)
                di, dw = kh - pt - p["dh_lo"], kw - pl
                s = 0.0
                if 0 <= di < p["ndh"]:
                    r = di * 16 * GR_RP
                    for ow in range(Wo):
                        iw = ow + dw
                        if 0 <= iw < W:
                            v = Rs[r + ow * GR_RP + iw]
                            assert v == v, "R element not computed (padding reached a tap sum)"
                            s += v
                partial[bg, c, t] = s
    out = partial[0].clone()
    for s in range(1, splits):  # grad_weight_reduce_kernel: the splits in split order
        out += partial[s]
    return out.reshape(C, 1, KH, KW)


# toeplitz_tf32_kernel (dwconv_toeplitz_tf32.cu): the fp32 forward / stride-1 grad_input on TF32 tensor cores,
# toeplitz_mma_kernel's image-rows tiling with 32-bit elements: mma.m16n8k8 (m16 = 16 output columns, n8 = 8
# images, k8 = 8 input columns), configs (NB, DG) = (2 | 4 column blocks, 4 | 6 offsets).  TF32 rounding
# (cvt.rna.tf32.f32) emulated bit-exactly; vectorised over the 32 lanes (numpy), every lane with its own
# shared-memory word addresses as the kernel computes them.  The sum inside one mma is taken in fp64 and rounded
# to fp32 when added to the accumulator (the hardware's internal order is not specified; the products of two
# TF32 values are exact in fp32 either way).
# ------------------------------------------------------------------------------------------------
TF_FO, TF_MAX_K, TF_WARPS, TF_IMG = 22, 64, 8, 8


def tf32_round(v):
    """cvt.rna.tf32.f32 on a float32 numpy array: round to nearest on the 13 dropped mantissa bits, ties away
    from zero (add half an ulp to the magnitude bits, clear the 13 low bits; a carry moves into the exponent,
    past the largest finite value to infinity).  Non-finite values: the 13 low bits cleared, nothing added -- the
    sm_80 / sm_90 SASS of the kernels' to_tf32 (measured-static: |v| >= Inf predicates the 0x1000 add off, the
    0xffffe000 mask is unconditional), so Inf stays Inf and a NaN whose payload lies only in the 13 low bits
    becomes Inf (the mma ignores those bits in any case)."""
    import numpy as np
    v = np.ascontiguousarray(v, dtype=np.float32)
    u = v.view(np.uint32)
    finite = (u & 0x7F800000) != 0x7F800000
    r = (np.where(finite, u + np.uint32(0x1000), u) & np.uint32(0xFFFFE000)).astype(np.uint32)
    return r.view(np.float32)


def tf_s0(pl):  # transcription of tf_s0()
    return (-pl) % 8


def tf_layout(KH, KW, H, s0, NB, DG, bm):  # transcription of tf_layout(): offsets in floats, bytes
    nd = (KW + 15 + s0 + 7) // 8
    ngrp = ceil_div(nd, DG)
    nch = 2 * NB - 2 + ngrp * DG
    xc = 8 * nch
    rows = min(H, bm + KH - 1)
    ip = rows * xc + 4
    z_off = TF_IMG * ip
    fp = round_up(8 * ngrp * DG + 24, 8)
    fe_off = round_up(z_off + xc, 32)
    return dict(s0=s0, nd=nd, ngrp=ngrp, nch=nch, xc=xc, rows=rows, ip=ip, z_off=z_off, fp=fp, fe_off=fe_off,
                bytes=(fe_off + KH * fp) * 4)


def toeplitz_tf32_config(Wo, KW, pl):  # transcription of toeplitz_tf32_config(): (NB, DG)
    nd = (KW + 15 + tf_s0(pl) + 7) // 8
    return (2 if Wo <= 32 else 4, 6 if nd % 6 in (0, 5) else 4)


def toeplitz_tf32_rows(KH, KW, H, Ho, pl, NB, DG, max_smem_optin):  # transcription of toeplitz_tf32_rows()
    def nbytes(bm):
        return tf_layout(KH, KW, H, tf_s0(pl), NB, DG, bm)["bytes"]
    bm = round_up(Ho, 2)
    while bm > 2 and nbytes(bm) > max_smem_optin:
        bm = round_up(bm // 2, 2)
    return bm if nbytes(bm) <= max_smem_optin else 0


def cuda_fp32_forward_kernel(tf32, sm_major, N, C, H, W, Ho, Wo, KH, KW, sh, sw, dh, dw, pt, pl,
                             max_smem_optin=227 * 1024):
    """launch_forward()'s fp32 order (dwconv_forward.cu) up to the first kernel that differs between TF32 allowed
    and not: the small-plane GEMM where sp_rule accepts the plane and its plan fits (with ``tf32`` on sm80+ the
    TF32 small_plane_mma_kernel<float>, else the IEEE small_plane_ffma_kernel), then, with ``tf32`` (algo 2),
    toeplitz_tf32_kernel where try_toeplitz_tf32 accepts it; "ieee" for the IEEE kernels after that
    (fp32_rb_kernel, fp32_blocked_kernel, generic_conv_kernel)."""
    if sp_rule(False, sm_major, N, C, H, W, Ho, Wo, KH, KW, sh, sw, dh, dw, pt, pl):
        kind = 4 if tf32 and sm_major >= 8 else 1
        if sp_make_plan(kind, H * W, Ho * Wo, KH * KW, N, C, max_smem_optin) is not None:
            return "small_plane_mma_kernel<float>" if kind == 4 else "small_plane_ffma_kernel"
    lim = 1 << 30
    if (tf32 and sm_major >= 8 and (sh, sw, dh, dw) == (1, 1, 1, 1) and KH <= TF_MAX_K and KW <= TF_MAX_K
            and all(v < lim for v in (N, C, H, W, Ho, Wo)) and -lim < pt < lim and -lim < pl < lim):
        NB, DG = toeplitz_tf32_config(Wo, KW, pl)
        bm = toeplitz_tf32_rows(KH, KW, H, Ho, pl, NB, DG, max_smem_optin)
        if bm and C * ceil_div(N, TF_IMG) <= 2**31 - 1 and ceil_div(Wo, 16 * NB) <= 65535 and ceil_div(Ho, bm) <= 65535:
            return "toeplitz_tf32_kernel"
    return "ieee"


def _tf_ldmatrix_x4(smem, addr, trans=False):
    """ldmatrix.m8n8.x4.b16 (the instruction the kernels issue) on 32-bit data, modelled on the 16-bit halves: lane
    l gives the (float) address of row l % 8 of matrix l // 8 (16 bytes = 8 b16 elements, 16-byte aligned); lane T
    receives, from each matrix, the b16 elements 2 (T % 4) (low half of the register) and 2 (T % 4) + 1 (high half)
    of row T / 4 -- for float rows the whole 32-bit word T % 4 of that row.  ``trans``: the .trans variant, elements
    (row 2 (T % 4), column T / 4) and (row 2 (T % 4) + 1, column T / 4): halves of two different floats (what the
    TF32 kernels must not issue; the tests show the difference)."""
    import numpy as np
    assert (addr % 4 == 0).all()
    h = smem.view(np.uint16)  # little-endian: b16 element e of a row = bytes 2e, 2e + 1
    T = np.arange(32)
    regs = []
    for mi in range(4):
        if trans:
            lo = h[2 * addr[8 * mi + 2 * (T % 4)] + T // 4]
            hi = h[2 * addr[8 * mi + 2 * (T % 4) + 1] + T // 4]
        else:
            row = 2 * addr[8 * mi + T // 4]
            lo, hi = h[row + 2 * (T % 4)], h[row + 2 * (T % 4) + 1]
        regs.append((lo.astype(np.uint32) | (hi.astype(np.uint32) << np.uint32(16))).view(np.float32))
    return regs


def _mma_m16n8k8_tf32(acc, af, b0, b1, check_tf32=True):
    """mma.sync.m16n8k8.row.col.f32.tf32.tf32.f32 on per-lane fragments (PTX ISA layout, g = lane / 4,
    t = lane % 4): a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4); b0 (k t, n g), b1 (k t + 4, n g);
    c0, c1 (g, 2t, 2t + 1), c2, c3 (g + 8, 2t, 2t + 1).  acc: (32, 4) float32, updated in place.  The operands
    must already be TF32 values (the kernel rounds them when staging; ``check_tf32=False``: the control run)."""
    import numpy as np
    lane = np.arange(32)
    g, t = lane >> 2, lane & 3
    A = np.full((16, 8), np.nan)
    B = np.full((8, 8), np.nan)
    A[g, t], A[g + 8, t], A[g, t + 4], A[g + 8, t + 4] = af[0], af[1], af[2], af[3]
    B[t, g], B[t + 4, g] = b0, b1
    assert not np.isnan(A).any() and not np.isnan(B).any(), "fragment element not loaded"
    for op in (A, B) if check_tf32 else ():
        assert (op.astype(np.float32).view(np.uint32) & 0x1FFF == 0).all(), "mma operand is not a TF32 value"
    D = A @ B
    acc[:, 0] = (acc[:, 0] + D[g, 2 * t]).astype(np.float32)
    acc[:, 1] = (acc[:, 1] + D[g, 2 * t + 1]).astype(np.float32)
    acc[:, 2] = (acc[:, 2] + D[g + 8, 2 * t]).astype(np.float32)
    acc[:, 3] = (acc[:, 3] + D[g + 8, 2 * t + 1]).astype(np.float32)


def emulate_toeplitz_tf32(x, w, bias, pt, pl, Ho, Wo, config=None, vec_x=1, bm=None, max_smem_optin=227 * 1024,
                          rounding=True):
    """Transcription of toeplitz_tf32_kernel: the launcher's (NB, DG) and rows per CTA, per-image row staging
    (vectors with zero-filled tails, TF32-rounded in place), the zero row, the TF32-rounded filter rows Fe, per-warp
    output-row pairs and their kernel-row range, the per-lane ldmatrix addresses (zero row for images >= N and
    rows outside), the per-lane A words (mma row i <-> output column 2 (i % 8) + i // 8), the chunk mask, the
    m16n8k8 fragments, the epilogue (fp32 accumulators + bias).  x, w, bias: fp32 values (any float tensor; cast
    to float32 as the kernel reads them).  ``rounding=False`` skips the cvt (an IEEE-operand control run for the
    tests: the kernel never does this).  Shared memory is a flat NaN-initialised float32 array per CTA; every
    read is bounds-checked.  Returns float64 (the fp32 values)."""
    import numpy as np
    rnd = tf32_round if rounding else (lambda v: np.asarray(v, dtype=np.float32))
    xn = x.detach().cpu().to(torch.float32).numpy()
    wn = w.detach().cpu().to(torch.float32).numpy()
    bn = None if bias is None else bias.detach().cpu().to(torch.float32).numpy()
    N, C, H, W = xn.shape
    KH, KW = wn.shape[2], wn.shape[3]
    assert KH <= TF_MAX_K and KW <= TF_MAX_K
    NB, DG = config if config is not None else toeplitz_tf32_config(Wo, KW, pl)
    if bm is None:
        bm = toeplitz_tf32_rows(KH, KW, H, Ho, pl, NB, DG, max_smem_optin)
    assert bm > 0 and bm % 2 == 0
    BN, NCH = 16 * NB, 2 * NB - 2 + DG
    L = tf_layout(KH, KW, H, tf_s0(pl), NB, DG, bm)
    assert L["bytes"] <= max_smem_optin
    s0, xc, ip, fp, fe = L["s0"], L["xc"], L["ip"], L["fp"], L["fe_off"]
    assert ip % 4 == 0 and (ip // 4) % 2 == 1 and xc % 8 == 0
    assert vec_x in (1, 2, 4)
    lane = np.arange(32)
    g4, t4 = lane >> 2, lane & 3
    limg, lrow, lkh = lane & 7, lane >> 4, (lane >> 3) & 1
    xoff = t4 - 2 * g4 - s0 + TF_FO
    assert (xoff >= 1).all()
    y = np.full((N, C, Ho, Wo), np.nan)
    gx, gy, gz = C * ceil_div(N, TF_IMG), ceil_div(Wo, BN), ceil_div(Ho, bm)
    for bx in range(gx):
        c, n0 = bx % C, (bx // C) * TF_IMG
        f = wn[c, 0]
        for by in range(gy):
            for bz in range(gz):
                ow0, oh0 = by * BN, bz * bm
                c0 = ow0 - pl - s0
                assert c0 % 8 == 0
                ih_lo, ih_hi = max(oh0 - pt, 0), min(oh0 + bm - 1 - pt + KH, H)
                assert ih_hi - ih_lo <= L["rows"]
                smem = np.full(L["bytes"] // 4, np.nan, dtype=np.float32)
                for img in range(TF_IMG):  # staging (cp.async vectors then the in-place cvt, or scalar + cvt)
                    if n0 + img >= N:
                        break
                    for r in range(ih_hi - ih_lo):
                        for j in range(0, xc, vec_x):
                            col = c0 + j
                            assert col >= 0 or col + vec_x <= 0  # no vector straddles column 0
                            cnt = min(W - col, vec_x) if 0 <= col < W else 0
                            vals = np.zeros(vec_x, dtype=np.float32)
                            vals[:cnt] = xn[n0 + img, c, ih_lo + r, col:col + cnt]
                            smem[img * ip + r * xc + j: img * ip + r * xc + j + vec_x] = rnd(vals)
                smem[L["z_off"]: L["z_off"] + xc] = 0.0
                for kh in range(KH):
                    row = np.zeros(fp, dtype=np.float32)
                    row[TF_FO: TF_FO + KW] = f[kh]
                    smem[fe + kh * fp: fe + (kh + 1) * fp] = rnd(row)
                b = np.float32(0.0) if bn is None else bn[c]
                npairs = (min(Ho - oh0, bm) + 1) >> 1
                for warp in range(TF_WARPS):
                    for p in range(warp, npairs, TF_WARPS):
                        oha = oh0 + 2 * p
                        kh_lo, kh_hi = max(pt - oha - 1, 0), min(H + pt - oha, KH)
                        acc = np.zeros((2, NB, 32, 4), dtype=np.float32)
                        lok = (n0 + limg < N) & (oha + lrow < Ho)
                        ih0 = oha + lrow - pt
                        for g in range(L["ngrp"]):
                            live = [c0 + 8 * (DG * g + j) + 7 >= 0 and c0 + 8 * (DG * g + j) < W for j in range(NCH)]
                            if not any(live):
                                continue
                            for kh in range(kh_lo, kh_hi):
                                ok = lok & (ih0 + kh >= 0) & (ih0 + kh < H)
                                rb = limg * ip + (ih0 + kh - ih_lo) * xc + 4 * lkh
                                assert ((ih0[ok] + kh >= ih_lo) & (ih0[ok] + kh < ih_hi)).all()
                                xa = np.where(ok, rb, L["z_off"] + 4 * lkh) + 8 * DG * g
                                aoff = kh * fp + 8 * DG * g + xoff
                                af = []
                                for dd in range(DG):
                                    idx = [aoff + 8 * dd, aoff + 8 * dd - 1, aoff + 8 * dd + 4, aoff + 8 * dd + 3]
                                    for ix in idx:  # inside this kernel row of Fe
                                        assert (ix >= kh * fp).all() and (ix < (kh + 1) * fp).all()
                                    af.append([smem[fe + ix] for ix in idx])
                                for j in range(NCH):
                                    if not live[j]:
                                        continue
                                    la = xa + 8 * j
                                    inside = [(a >= L["z_off"] and a + 4 <= L["z_off"] + xc) or
                                              (a < TF_IMG * ip and (a % ip) % xc + 4 <= xc) for a in la]
                                    assert all(inside)
                                    bf = _tf_ldmatrix_x4(smem, la)
                                    for ob in range(NB):
                                        dd = j - 2 * ob
                                        if not 0 <= dd < DG:
                                            continue
                                        _mma_m16n8k8_tf32(acc[0, ob], af[dd], bf[0], bf[1], rounding)
                                        _mma_m16n8k8_tf32(acc[1, ob], af[dd], bf[2], bf[3], rounding)
                        for h in range(2):  # epilogue: C registers e, 2 + e = columns 2 g4, 2 g4 + 1 of image 2 t4 + e
                            for ln in range(32):
                                for e in range(2):
                                    img, oh = n0 + 2 * t4[ln] + e, oha + h
                                    if img >= N or oh >= Ho:
                                        continue
                                    for ob in range(NB):
                                        ow = ow0 + 2 * g4[ln] + 16 * ob
                                        if ow >= Wo:
                                            continue
                                        y[img, c, oh, ow] = np.float32(acc[h, ob, ln, e] + b)
                                        if ow + 1 < Wo:
                                            y[img, c, oh, ow + 1] = np.float32(acc[h, ob, ln, 2 + e] + b)
    return torch.from_numpy(y)



# small_plane_mma_kernel<float, TRANS> (dwconv_small_plane.cu): the batch-as-rows GEMM on TF32 tensor cores
def sp_layout_tf32(P, QB, taps):  # transcription of sp_layout_tf32(): element pitches, byte offsets
    kp = round_up(P, 8)
    pitch = kp + 4
    qr = round_up(QB, 16)
    bs_off = SP_MB_TC * pitch * 4
    fs_off = bs_off + qr * pitch * 4
    return dict(kp=kp, pitch=pitch, qr=qr, bs_off=bs_off, fs_off=fs_off, bytes=fs_off + 2 * round_up(taps * 4, 16))


def emulate_small_plane_forward_tf32(xin, w, bias, geo, trans, max_smem_optin=227 * 1024, vec_x=1, target_ctas=512,
                                     rounding=True):
    """Transcription of small_plane_mma_kernel<float, TRANS> for every CTA of the launch (plan kind 4): the F_c
    build from the TF32-rounded filter (no word pairs), the 64-row staging with the lane's in-place rounding, the
    per-lane ldmatrix addresses of sp_fwd_item (in floats: 16 bytes = 4 floats, K steps of 8 floats = 32 bytes),
    m16n8k8 fragments, the epilogue.  geo, xin as emulate_small_plane_forward; ``rounding=False``: the IEEE-operand
    control run.  Shared memory is a flat NaN-initialised float32 array per CTA."""
    import numpy as np
    rnd = tf32_round if rounding else (lambda v: np.asarray(v, dtype=np.float32))
    H, W, Ho, Wo, KH, KW, sh, sw, dh, dw, pt, pl = geo
    N, C = xin.shape[:2]
    (kH, kW), (nH, nW) = _sp_planes(xin, trans, geo)
    assert tuple(xin.shape[2:]) == (kH, kW)
    assert sp_rule(False, 9, N, C, H, W, Ho, Wo, KH, KW, sh, sw, dh, dw, pt, pl)
    assert vec_x in (1, 2, 4)
    P, Q, taps = kH * kW, nH * nW, KH * KW
    plan = sp_make_plan(4, P, Q, taps, N, C, max_smem_optin, target_ctas)
    assert plan is not None
    QB = plan["QB"]
    L = sp_layout_tf32(P, QB, taps)
    kp, pitch, bs = L["kp"], L["pitch"], L["bs_off"] // 4
    xf = xin.detach().cpu().to(torch.float32).reshape(N, C, P).numpy()
    y = np.full((N, C, Q), np.nan)
    lane = np.arange(32)
    a_lane = (lane & 15) * pitch + (lane >> 4) * 4
    b_lane = bs + (((lane >> 4) << 3) + (lane & 7)) * pitch + ((lane >> 3) & 1) * 4
    g4, t4 = lane >> 2, lane & 3
    for c in range(C):
        f = torch.from_numpy(rnd(w[c, 0].detach().cpu().to(torch.float32).numpy()).astype(np.float64))
        b = np.float32(0.0 if bias is None else float(bias[c]))
        for by in range(plan["qsplits"]):
            q0 = by * QB
            qn = min(QB, Q - q0)
            for bz in range(plan["bgroups"]):
                smem = np.full(L["bytes"] // 4, np.nan, dtype=np.float32)
                smem[bs: bs + L["qr"] * pitch] = 0.0
                _sp_build_fc(smem, bs, pitch, 1, f, geo, trans, q0, qn, pairs=False)
                ch0 = bz * plan["cpg"]
                for ch in range(ch0, min(ch0 + plan["cpg"], plan["nchunks"])):
                    n0 = ch * SP_MB_TC
                    rv = min(N - n0, SP_MB_TC)
                    plane = torch.zeros(SP_MB_TC, round_up(max(P, 1), 16) + 16, dtype=torch.float64)
                    plane[:rv, :P] = torch.from_numpy(xf[n0:n0 + rv, c].astype(np.float64))
                    _sp_stage(smem, 0, pitch, kp, plane, SP_MB_TC, rv, 0, P, vec_x)
                    for m in range(SP_MB_TC):  # sp_round_tf32_own: every staged element, once
                        smem[m * pitch: m * pitch + kp] = rnd(smem[m * pitch: m * pitch + kp])
                    nnb = ceil_div(qn, 32)
                    for warp in range(SP_WARPS):
                        for item in range(warp, 2 * nnb, SP_WARPS):
                            mb, nb = item & 1, item >> 1
                            if mb * 32 >= rv:
                                continue
                            mt1 = mb * 32 + 16 < rv
                            ntv = min(ceil_div(qn - nb * 32, 8), 4)
                            assert nb * 32 + (32 if ntv > 2 else 16) <= L["qr"]
                            acc = np.zeros((2, 4, 32, 4), dtype=np.float32)
                            abase, bbase = a_lane + mb * 32 * pitch, b_lane + nb * 32 * pitch
                            for ks in range(kp // 8):
                                ao, bo = abase + 8 * ks, bbase + 8 * ks
                                assert ((ao % pitch) + 4 <= kp).all()
                                af = [_tf_ldmatrix_x4(smem, ao)]
                                af.append(_tf_ldmatrix_x4(smem, ao + 16 * pitch) if mt1 else None)
                                r4 = _tf_ldmatrix_x4(smem, bo)
                                bf = [(r4[0], r4[1]), (r4[2], r4[3])]
                                if ntv > 2:
                                    r4 = _tf_ldmatrix_x4(smem, bo + 16 * pitch)
                                    bf += [(r4[0], r4[1]), (r4[2], r4[3])]
                                for nt in range(ntv):
                                    _mma_m16n8k8_tf32(acc[0, nt], af[0], bf[nt][0], bf[nt][1], rounding)
                                    if mt1:
                                        _mma_m16n8k8_tf32(acc[1, nt], af[1], bf[nt][0], bf[nt][1], rounding)
                            for mt in range(2):
                                for h in range(2):
                                    m = mb * 32 + mt * 16 + g4 + 8 * h
                                    for nt in range(4):
                                        for e in range(2):
                                            qq = nb * 32 + nt * 8 + 2 * t4 + e
                                            ok = (m < rv) & (qq < qn)
                                            assert (not ok.any()) or (nt < ntv and (mt == 0 or mt1))
                                            y[n0 + m[ok], c, q0 + qq[ok]] = (acc[mt, nt, ok, 2 * h + e] + b).astype(np.float32)
    return torch.from_numpy(y.reshape(N, C, nH, nW))
