"""Host emulation of the CUDA kernels' tiling and index math (CPU, no GPU needed).

The functions are line-by-line transcriptions of the kernels next to this file:
toeplitz_wmma_kernel and fp32_blocked_kernel in dwconv_forward.cu (same tile constants, staging,
skip conditions, Toeplitz blocks, sliding window) and grad_weight_partial_kernel +
grad_weight_reduce_kernel in dwconv_grad_weight.cu (split/lane decomposition, incremental position
walk).  tests/test_backend_cuda.py runs them on tiny shapes against F.conv2d: they check the index
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
