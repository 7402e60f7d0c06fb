"""The CUDA TF32 kernels: toeplitz_tf32_kernel (csrc/dwconv_toeplitz_tf32.cu, planes > 256 px) and
small_plane_mma_kernel<float> (csrc/dwconv_small_plane.cu, planes <= 256 px), fp32 forward / grad_input on TF32
tensor cores, used only when PyTorch allows TF32 for convolutions (lkconv.precision.conv_tf32_enabled()).

CPU: csrc/kernel_emulation.py's transcription of the kernel (staging with in-place TF32 rounding, per-lane
ldmatrix / A-word addresses, chunk mask, m16n8k8 tf32 fragments, epilogue) against the fp64 reference within a
TF32 bound derived from the reduction length, for every (NB, DG) configuration, rows-per-CTA values, the staging
vector widths and the boundary cases; the same emulation without the rounding (the control) is IEEE-accurate and
differs from the TF32 result by far more than its own error, so a missing rounding would be noticed; the rounding
itself bit-exact against an independent formulation; the launcher's choices and the dispatch rule (TF32 allowed /
disallowed, legacy and new PyTorch API).  GPU (``-m gpu``): TF32 on vs off for every layout, within the TF32
bound of fp64 with TF32 on and bit-identical to the IEEE kernels (algo 0) with TF32 off."""
import math
import os
import sys

import numpy as np
import pytest
import torch

import lkconv
from lkconv.backends.cuda import pass_algo
from lkconv.params import normalize_params
from lkconv.precision import conv_tf32_enabled, tf32
from lkconv.testing import compare_all_passes

sys.path.insert(0, os.path.dirname(__file__))
from cases import (LAYOUTS, Case, _table, legacy_tf32_flags, load_emulation, make_inputs,  # noqa: E402
                   requires_cuda_backend)

EMU = load_emulation()
F = torch.nn.functional
U_TF32 = 2.0 ** -11   # unit roundoff of TF32 (10 explicit mantissa bits, round to nearest)
U_FP32 = 2.0 ** -24


def tf32_bound(x, w, b, pad, R):
    """Elementwise bound on |y - y_fp64| for a TF32 product sum of R = KH * KW terms with fp32 accumulation:
    each product of two TF32-rounded operands is off by at most (2 u + u^2) |x w|, each of the at most R + 1
    fp32 additions (taps, bias) by 2^-24 of a partial sum bounded by S = sum |x w| + |b|."""
    t, bo, l, r = pad
    C = x.shape[1]
    S = F.conv2d(F.pad(x.abs(), (l, r, t, bo)), w.abs(), None if b is None else b.abs(), groups=C)
    return (2 * U_TF32 + U_TF32 ** 2 + (R + 2) * U_FP32) * S, S


# --------------------------------------------------------------------------------------------------
# the rounding
# --------------------------------------------------------------------------------------------------
def _tf32_independent(v: np.ndarray) -> np.ndarray:
    """Round half away from zero to 11 significant bits through frexp (fp64), an independent formulation."""
    m, e = np.frexp(v.astype(np.float64))            # v = m 2^e, 0.5 <= |m| < 1
    q = np.sign(m) * np.floor(np.abs(m) * 2.0 ** 11 + 0.5)
    return np.ldexp(q, e - 11).astype(np.float32)


def test_tf32_round_bit_patterns():
    u = np.array([0x3F800000, 0x3F800FFF, 0x3F801000, 0x3F801001, 0x3F803000, 0xBF801000, 0xBF800FFF,
                  0x3FFFF000, 0x7F7FF000, 0x7F7FEFFF, 0x00000FFF, 0x00001000, 0x7F800000, 0xFF800000], dtype=np.uint32)
    want = np.array([0x3F800000, 0x3F800000, 0x3F802000, 0x3F802000, 0x3F804000, 0xBF802000, 0xBF800000,
                     0x40000000, 0x7F800000, 0x7F7FE000, 0x00000000, 0x00002000, 0x7F800000, 0xFF800000], dtype=np.uint32)
    got = EMU.tf32_round(u.view(np.float32)).view(np.uint32)
    assert (got == want).all(), [hex(g) for g in got]
    assert np.isnan(EMU.tf32_round(np.array([np.nan], dtype=np.float32))).all()
    # NaN payloads: the SASS lowering clears the 13 low bits of non-finite values too (a quiet NaN stays NaN; a NaN
    # with only low payload bits becomes Inf, as the mma would read it anyway)
    nan_u = np.array([0x7FC00000, 0xFFC00001, 0x7F802001, 0x7F800001], dtype=np.uint32)
    got = EMU.tf32_round(nan_u.view(np.float32)).view(np.uint32)
    assert (got == np.array([0x7FC00000, 0xFFC00000, 0x7F802000, 0x7F800000], dtype=np.uint32)).all()


def test_tf32_round_matches_independent_formulation():
    rng = np.random.default_rng(0)
    v = (rng.standard_normal(20000) * np.exp2(rng.integers(-60, 60, 20000))).astype(np.float32)
    ties = ((v.view(np.uint32) & np.uint32(0xFFFFE000)) | np.uint32(0x1000)).view(np.float32)  # exact halfway cases
    for arr in (v, ties):
        got = EMU.tf32_round(arr)
        assert (got.view(np.uint32) == _tf32_independent(arr).view(np.uint32)).all()
        assert (got.view(np.uint32) & 0x1FFF == 0).all()
        rel = np.abs(got.astype(np.float64) - arr) / np.abs(arr.astype(np.float64))
        assert rel.max() <= U_TF32


def test_ldmatrix_b16_delivers_32bit_fragments():
    """ldmatrix.m8n8.x4.b16 on float rows, modelled on its 16-bit halves: lane T gets word T % 4 of row T / 4 of each
    matrix, which is the m16n8k8 .tf32 b0 / b1 (k t, n g) and a0..a3 layout the kernels rely on; the .trans variant
    would mix the halves of two floats (so it must not be used on 32-bit data).  Also the kernels' own lane roles:
    toeplitz_tf32_kernel's (image lane & 7, k half (lane >> 3) & 1, pair row lane >> 4) gives b0, b1 of both rows,
    small_plane_mma_kernel's A roles (row lane & 15, k half lane >> 4) give a0..a3."""
    rng = np.random.default_rng(4)
    smem = rng.standard_normal(4096).astype(np.float32)
    lane = np.arange(32)
    g, t = lane >> 2, lane & 3
    rows = rng.permutation(4096 // 4)[:32] * 4          # 16-byte aligned row addresses (floats), all distinct
    regs = EMU._tf_ldmatrix_x4(smem, rows)
    for mi in range(4):
        assert (regs[mi].view(np.uint32) == smem[rows[8 * mi + g] + t].view(np.uint32)).all()
    tr = EMU._tf_ldmatrix_x4(smem, rows, trans=True)
    assert not any((tr[mi].view(np.uint32) == regs[mi].view(np.uint32)).all() for mi in range(4))
    # toeplitz_tf32_kernel: B[k][n] = image n's staged row (pitch ip) at column k, pair row h at + xc
    ip, xc = 9 * 16 + 4, 16
    X = rng.standard_normal(8 * ip).astype(np.float32)
    limg, lkh, lrow = lane & 7, (lane >> 3) & 1, lane >> 4
    bf = EMU._tf_ldmatrix_x4(X, limg * ip + lrow * xc + 4 * lkh)
    for h in range(2):
        B = np.stack([X[n * ip + h * xc: n * ip + h * xc + 8] for n in range(8)], axis=1)  # (k, n)
        assert (bf[2 * h] == B[t, g]).all() and (bf[2 * h + 1] == B[t + 4, g]).all()
    # small_plane_mma_kernel<float>: A[m][k] = Xs row m (pitch p) at column k
    p = 12
    Xs = rng.standard_normal(16 * p).astype(np.float32)
    af = EMU._tf_ldmatrix_x4(Xs, (lane & 15) * p + (lane >> 4) * 4)
    A = Xs.reshape(16, p)[:, :8]
    assert (af[0] == A[g, t]).all() and (af[1] == A[g + 8, t]).all()
    assert (af[2] == A[g, t + 4]).all() and (af[3] == A[g + 8, t + 4]).all()


# --------------------------------------------------------------------------------------------------
# the kernel's emulation
# --------------------------------------------------------------------------------------------------
# (N, C, H, W, KH, KW, (top, bottom, left, right), (NB, DG) or None, bm or None, vec_x)
CASES = {
    "auto_k7_nb2_dg4_v4": (9, 1, 12, 20, 7, 7, (3, 3, 3, 3), None, None, 4),       # N % 8 = 1
    "k31_nb2_dg6_k_gt_h": (3, 1, 8, 20, 31, 31, (15, 15, 15, 15), None, None, 1),  # nd = 6, K > H
    "nb4_dg6_wide_v2": (2, 1, 6, 70, 3, 29, (1, 1, 14, 14), (4, 6), None, 2),      # two column tiles
    "nb4_dg4_rowtiles_oddHo": (10, 1, 9, 40, 4, 6, (1, 2, 2, 3), (4, 4), 4, 4),   # bm < Ho, odd Ho
    "nb2_dg4_two_groups": (1, 1, 6, 9, 3, 40, (1, 1, 20, 19), (2, 4), None, 1),    # nd = 8: two groups of 4
    "nb2_dg6_bm2_asym": (3, 2, 7, 13, 5, 9, (2, 2, 4, 4), (2, 6), 2, 1),
    "pad_gt_k": (2, 1, 4, 5, 3, 3, (4, 5, 3, 6), None, None, 1),
}


def _case(N, C, H, W, KH, KW, pad, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64).float().double()  # fp32 values
    w = (torch.randn(C, 1, KH, KW, generator=gen, dtype=torch.float64) / math.sqrt(KH * KW)).float().double()
    b = torch.randn(C, generator=gen, dtype=torch.float64).float().double()
    t, bo, l, r = pad
    ref = F.conv2d(F.pad(x, (l, r, t, bo)), w, b, groups=C)
    return gen, x, w, b, ref


def _check_tf32(y, y_ieee, ref, bound, S, R):
    err, err_ieee = (y - ref).abs(), (y_ieee - ref).abs()
    assert not torch.isnan(y).any()
    assert (err <= bound).all(), f"max err {err.max().item():.3e}, max bound {bound.max().item():.3e}"
    # the control (no rounding) is IEEE fp32-accurate; the TF32 result is far from it: a lost rounding shows
    assert (err_ieee <= (R + 2) * U_FP32 * S).all()
    assert err.max() > 16 * err_ieee.max() and err.max() > 2.0 ** -16 * S.max()


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_toeplitz_tf32_emulated(case):
    N, C, H, W, KH, KW, pad, config, bm, vec_x = CASES[case]
    gen, x, w, b, ref = _case(N, C, H, W, KH, KW, pad, seed=5)
    t, bo, l, r = pad
    Ho, Wo = ref.shape[2:]
    kw = dict(config=config, vec_x=vec_x, bm=bm)
    y = EMU.emulate_toeplitz_tf32(x, w, b, t, l, Ho, Wo, **kw)
    y_ieee = EMU.emulate_toeplitz_tf32(x, w, b, t, l, Ho, Wo, rounding=False, **kw)
    bound, S = tf32_bound(x, w, b, pad, KH * KW)
    _check_tf32(y, y_ieee, ref, bound, S, KH * KW)
    # grad_input as the host code runs it: the same kernel, flipped filter, padding K-1-p (negative when p > K-1)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64).float().double()
    pg = (KH - 1 - t, KH - 1 - bo, KW - 1 - l, KW - 1 - r)
    gx = EMU.emulate_toeplitz_tf32(g, w.flip(2, 3), None, pg[0], pg[2], H, W, **kw)
    gx_ieee = EMU.emulate_toeplitz_tf32(g, w.flip(2, 3), None, pg[0], pg[2], H, W, rounding=False, **kw)
    xr = x.clone().requires_grad_(True)
    (gx_ref,) = torch.autograd.grad(F.conv2d(F.pad(xr, (l, r, t, bo)), w, None, groups=C), xr, g)
    gpad = tuple(max(v, 0) for v in pg)  # the bound's |g| * |w| sum over the same taps (negative pads crop)
    Sg = F.conv2d(F.pad(g.abs(), (gpad[2], gpad[3], gpad[0], gpad[1])), w.flip(2, 3).abs(), groups=C)
    Sg = Sg[:, :, max(-pg[0], 0):max(-pg[0], 0) + H, max(-pg[2], 0):max(-pg[2], 0) + W]
    _check_tf32(gx, gx_ieee, gx_ref, (2 * U_TF32 + U_TF32 ** 2 + (KH * KW + 2) * U_FP32) * Sg, Sg, KH * KW)


def test_toeplitz_tf32_config_and_rows():
    """The launcher's choices for the RepLKNet-31B layers (stride 1, padding K // 2), H100 / A100 opt-in limits."""
    assert EMU.toeplitz_tf32_config(56, 31, 15) == (4, 6)   # s0 = 1, nd = 6: one group
    assert EMU.toeplitz_tf32_config(28, 29, 14) == (2, 6)   # s0 = 2, nd = 6
    assert EMU.toeplitz_tf32_config(20, 13, 6) == (2, 4)    # nd = 4
    assert EMU.toeplitz_tf32_config(100, 40, 20) == (4, 4)  # s0 = 4, nd = 8: two groups of 4
    assert EMU.toeplitz_tf32_config(100, 64, 32) == (4, 4)  # s0 = 0, nd = 10: three groups of 4
    assert EMU.toeplitz_tf32_config(100, 64, 29) == (4, 6)  # s0 = 3, nd = 11: two groups of 6
    h100, a100 = 227 * 1024, 163 * 1024
    assert EMU.toeplitz_tf32_rows(31, 31, 56, 56, 15, 4, 6, h100) == 56   # whole plane, one CTA of 8 warps per SM
    assert EMU.tf_layout(31, 31, 56, 1, 4, 6, 56)["bytes"] == 181472
    assert EMU.toeplitz_tf32_rows(29, 29, 28, 28, 14, 2, 6, h100) == 28   # 66080 B: three CTAs per SM
    for KH, H, NB, DG, lim in ((31, 56, 4, 6, h100), (31, 56, 4, 6, a100), (29, 28, 2, 6, h100), (39, 100, 4, 4, h100)):
        bm = EMU.toeplitz_tf32_rows(KH, KH, H, H, KH // 2, NB, DG, lim)
        assert bm > 0 and bm % 2 == 0 and EMU.tf_layout(KH, KH, H, EMU.tf_s0(KH // 2), NB, DG, bm)["bytes"] <= lim
        if bm < H:  # halved only because the next size up does not fit
            assert EMU.tf_layout(KH, KH, H, EMU.tf_s0(KH // 2), NB, DG, 2 * bm)["bytes"] > lim or 2 * bm >= H
    # K = 64 on a 200-wide plane: even 2 rows (65 staged rows x 8 images x 144 floats) exceed the opt-in -> 0:
    # the launcher declines and the IEEE fp32 kernels run
    assert EMU.toeplitz_tf32_rows(64, 64, 200, 200, 32, 4, 4, h100) == 0
    assert _kernel(True, 2, 3, 200, 64) == "ieee"


def test_toeplitz_tf32_layout_conflict_free():
    """ldmatrix: the 8 image rows of a matrix on 8 distinct 16-byte bank groups (odd pitch in 16-byte units);
    A words: every warp access touches distinct words on distinct banks (18 consecutive words)."""
    for KH, KW, H, NB, DG, bm in ((31, 31, 56, 4, 6, 56), (29, 29, 28, 2, 6, 28), (13, 13, 20, 2, 4, 20)):
        for s0 in range(8):
            L = EMU.tf_layout(KH, KW, H, s0, NB, DG, bm)
            assert (L["ip"] * 4 // 16) % 2 == 1 and L["xc"] % 8 == 0 and L["fe_off"] % 32 == 0
            assert len({((img * L["ip"] * 4) // 16) % 8 for img in range(8)}) == 8
            lane = np.arange(32)
            xoff = (lane & 3) - 2 * (lane >> 2) - s0 + EMU.TF_FO
            for delta in (0, -1, 4, 3):
                words = set((L["fe_off"] + 5 * L["fp"] + xoff + delta).tolist())
                assert len({w % 32 for w in words}) == len(words) == 18


# --------------------------------------------------------------------------------------------------
# small planes: small_plane_mma_kernel<float, TRANS>
# --------------------------------------------------------------------------------------------------
# (N, C, H, W, KH, KW, stride, padding, dilation, trans (grad_input as dY . F_c^T), vec_x)
SP_CASES = {
    "fwd_14_k7_two_chunks_v4": (70, 1, 14, 14, 7, 7, 1, 3, 1, False, 4),   # 64 + 6 batch rows
    "fwd_7_k13_k_gt_h": (9, 2, 7, 7, 13, 13, 1, 6, 1, False, 1),
    "fwd_stride2_v2": (9, 1, 9, 10, 5, 5, 2, 2, 1, False, 2),
    "gi_dil2_trans_v2": (5, 1, 12, 12, 5, 5, 1, 4, 2, True, 2),
    "gi_stride2_trans": (5, 2, 13, 13, 5, 5, 2, 2, 1, True, 1),
    "fwd_asym_rect": (3, 1, 11, 15, 9, 5, 1, (4, 1), 1, False, 1),
}


@pytest.mark.parametrize("case", list(SP_CASES), ids=list(SP_CASES))
def test_small_plane_tf32_emulated(case):
    N, C, H, W, KH, KW, st, pad, dil, trans, ve = SP_CASES[case]
    ph, pw = (pad, pad) if isinstance(pad, int) else pad
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64).float().double()
    w = (torch.randn(C, 1, KH, KW, generator=gen, dtype=torch.float64) / math.sqrt(KH * KW)).float().double()
    b = torch.randn(C, generator=gen, dtype=torch.float64).float().double()
    conv = dict(stride=st, padding=(ph, pw), dilation=dil, groups=C)
    ref = F.conv2d(x, w, None if trans else b, **conv)
    Ho, Wo = ref.shape[2:]
    geo = (H, W, Ho, Wo, KH, KW, st, st, dil, dil, ph, pw)
    if trans:  # grad_input: dX = dY . F_c^T of the same forward geometry
        g = torch.randn(ref.shape, generator=gen, dtype=torch.float64).float().double()
        xr = x.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(F.conv2d(xr, w, None, **conv), xr, g)
        S = torch.nn.grad.conv2d_input(x.shape, w.abs(), g.abs(), **conv)
        y = EMU.emulate_small_plane_forward_tf32(g, w, None, geo, True, vec_x=ve)
        y_ieee = EMU.emulate_small_plane_forward_tf32(g, w, None, geo, True, vec_x=ve, rounding=False)
    else:
        want = ref
        S = F.conv2d(x.abs(), w.abs(), b.abs(), **conv)
        y = EMU.emulate_small_plane_forward_tf32(x, w, b, geo, False, vec_x=ve)
        y_ieee = EMU.emulate_small_plane_forward_tf32(x, w, b, geo, False, vec_x=ve, rounding=False)
    R = KH * KW
    _check_tf32(y, y_ieee, want, (2 * U_TF32 + U_TF32 ** 2 + (R + 2) * U_FP32) * S, S, R)


def test_small_plane_tf32_layout_and_plan():
    """sp_layout_tf32: float rows of an odd number of 16-byte units (ldmatrix rows on distinct bank groups),
    32-byte K steps; the plans of the RepLKNet 14² / 7² layers fit the small-plane budget."""
    for P in (49, 196, 256):
        L = EMU.sp_layout_tf32(P, 64, 729)
        assert L["kp"] % 8 == 0 and (L["pitch"] * 4 // 16) % 2 == 1 and L["bs_off"] % 16 == 0
        assert len({((r * L["pitch"] * 4) // 16) % 8 for r in range(8)}) == 8
    for H, K, C in ((14, 27, 512), (7, 13, 1024)):
        plan = EMU.sp_make_plan(4, H * H, H * H, K * K, 64, C, 227 * 1024)
        assert plan is not None and plan["bytes"] <= EMU.SP_SMEM_BUDGET
        assert plan["QB"] * plan["qsplits"] >= H * H


# --------------------------------------------------------------------------------------------------
# the dispatch rule
# --------------------------------------------------------------------------------------------------
def _kernel(tf32_on, N, C, H, K, stride=1, sm=9):
    P = K // 2
    Ho = (H + 2 * P - K) // stride + 1
    return EMU.cuda_fp32_forward_kernel(tf32_on, sm, N, C, H, H, Ho, Ho, K, K, stride, stride, 1, 1, P, P)


def test_dispatch_kernel_choice():
    """launch_forward's fp32 order: small planes run the small-plane GEMM (on TF32 tensor cores with TF32 allowed,
    else IEEE FFMA); the RepLKNet 56² / 28² layers run toeplitz_tf32_kernel only with TF32 allowed; stride 2,
    sm < 8 and K > 64 stay IEEE."""
    for tf32_on in (True, False):
        sp = "small_plane_mma_kernel<float>" if tf32_on else "small_plane_ffma_kernel"
        assert _kernel(tf32_on, 64, 512, 14, 27) == sp
        assert _kernel(tf32_on, 64, 1024, 7, 13) == sp
        assert _kernel(tf32_on, 64, 1024, 7, 13, sm=7) == "small_plane_ffma_kernel"  # no tensor cores for it
        want = "toeplitz_tf32_kernel" if tf32_on else "ieee"
        assert _kernel(tf32_on, 64, 128, 56, 31) == want
        assert _kernel(tf32_on, 64, 256, 28, 29) == want
        assert _kernel(tf32_on, 2, 3, 100, 65) == "ieee"
        assert _kernel(tf32_on, 2, 3, 60, 31, stride=2) == "ieee"
        assert _kernel(tf32_on, 2, 3, 60, 31, sm=7) == "ieee"


def test_pass_algo_legacy_api(restore_precision_flags):
    if legacy_tf32_flags() is None:
        pytest.skip("the legacy TF32 getters raise in this process (new API already in use)")
    for on in (True, False):
        torch.backends.cudnn.allow_tf32 = on
        assert conv_tf32_enabled() is on
        want = 2 if on else 0
        assert pass_algo(0, torch.float32, "forward") == want
        assert pass_algo(0, torch.float32, "grad_input") == want
        assert pass_algo(0, torch.float32, "grad_weight") == 0
        for dt in (torch.float16, torch.bfloat16):
            assert pass_algo(0, dt, "forward") == 0
        assert pass_algo(1, torch.float32, "forward") == 1  # LKCONV_CUDA_ALGO=generic wins


def test_pass_algo_new_api(restore_precision_flags):
    if getattr(torch.backends.cudnn.conv, "fp32_precision", None) is None:
        pytest.skip("this PyTorch has no fp32_precision API")
    for conv, parent, want in (("tf32", "ieee", 2), ("ieee", "tf32", 0), ("none", "tf32", 2), ("none", "ieee", 0)):
        torch.backends.cudnn.fp32_precision = parent
        torch.backends.cudnn.conv.fp32_precision = conv
        assert pass_algo(0, torch.float32, "forward") == want
        assert pass_algo(0, torch.float32, "grad_input") == want
        assert pass_algo(0, torch.float32, "grad_weight") == 0
    with tf32(False):
        assert pass_algo(0, torch.float32, "forward") == 0
    with tf32(True):
        assert pass_algo(0, torch.float32, "forward") == 2


# --------------------------------------------------------------------------------------------------
# GPU: every launcher configuration, TF32 on vs off, every layout.  Planes > 256 pixels (smaller ones go to the
# IEEE small-plane kernels whatever the TF32 setting).
# --------------------------------------------------------------------------------------------------
GPU_CASES = _table(
    Case('nb4_dg6_56_k31_n10', (10, 2, 56, 56), (31, 31), padding=15, bias=True),   # (4, 6), N % 8 = 2
    Case('nb2_dg6_28_k29_n9', (9, 3, 28, 28), (29, 29), padding=14, bias=True),     # (2, 6), K > H
    Case('nb2_dg4_20_k13_n8', (8, 2, 20, 20), (13, 13), padding=6, bias=True),      # (2, 4)
    Case('nb4_dg4_40x50_k13_n3', (3, 2, 40, 50), (13, 13), padding=6, bias=True),   # (4, 4), Wo % 16 != 0
    Case('rows_cols_tiles_k31', (2, 1, 100, 90), (31, 31), padding=15, bias=True),  # bm < Ho, two column tiles
    Case('two_groups_5x40', (3, 2, 28, 30), (5, 40), padding=(2, 20), bias=True),   # nd = 8: two groups of 4
    Case('asym_odd_k7', (5, 2, 25, 17), (7, 9), padding=(1, 5, 6, 0), bias=True),   # odd Ho, asymmetric padding
)


@pytest.mark.parametrize("case", list(GPU_CASES.values()), ids=list(GPU_CASES))
def test_gpu_cases_reach_toeplitz_tf32(case):
    N, C, H, W = case.shape
    KH, KW = case.k
    p = normalize_params(case.stride, case.padding, case.dilation, (KH, KW))
    Ho, Wo = p.out_size(H, W, KH, KW)
    t, _, l, _ = p.padding
    assert EMU.cuda_fp32_forward_kernel(True, 9, N, C, H, W, Ho, Wo, KH, KW, 1, 1, 1, 1, t, l) == "toeplitz_tf32_kernel"
    assert EMU.cuda_fp32_forward_kernel(True, 8, N, C, H, W, Ho, Wo, KH, KW, 1, 1, 1, 1, t, l,
                                        max_smem_optin=163 * 1024) == "toeplitz_tf32_kernel"


def _ref_and_bound(x, w, b, p, g):
    from lkconv.testing import reference_all_passes
    x64, w64, g64 = x.detach().double().cpu(), w.detach().double().cpu(), g.detach().double().cpu()
    b64 = None if b is None else b.detach().double().cpu()
    out, gx, _, _ = reference_all_passes(x, w, b, p, g)
    KH, KW = w.shape[2:]
    R = KH * KW
    k = 2 * U_TF32 + U_TF32 ** 2 + (R + 2) * U_FP32
    S = lkconv.backends.reference.reference_forward(x64.abs(), w64.abs(), None if b64 is None else b64.abs(), p)
    Sg = lkconv.backends.reference.reference_grad_input(g64.abs(), w64.abs(), x64.shape, p)
    return out, gx, k * S, k * Sg, S, Sg


requires_cuda = requires_cuda_backend


#: small planes (<= 256 px): small_plane_mma_kernel<float> with TF32 allowed, every pass geometry it covers
SP_GPU_CASES = _table(
    Case('sp_14_k27_n70', (70, 3, 14, 14), (27, 27), padding=13, bias=True),        # RepLKNet 14², 2 batch chunks
    Case('sp_7_k13_n9', (9, 4, 7, 7), (13, 13), padding=6, bias=True),               # RepLKNet 7²
    Case('sp_stride2_k5', (9, 2, 13, 13), (5, 5), stride=2, padding=2, bias=True),  # grad_input via dY . F_c^T
    Case('sp_dil2_k5', (5, 2, 12, 12), (5, 5), padding=4, dilation=2, bias=True),
    Case('sp_asym_9x5', (3, 2, 11, 15), (9, 5), padding=(4, 1), bias=True),
)


@pytest.mark.parametrize("case", list(SP_GPU_CASES.values()), ids=list(SP_GPU_CASES))
def test_gpu_cases_reach_small_plane_tf32(case):
    N, C, H, W = case.shape
    KH, KW = case.k
    p = normalize_params(case.stride, case.padding, case.dilation, (KH, KW))
    Ho, Wo = p.out_size(H, W, KH, KW)
    t, _, l, _ = p.padding
    assert EMU.cuda_fp32_forward_kernel(True, 9, N, C, H, W, Ho, Wo, KH, KW, *p.stride, *p.dilation, t, l) == \
        "small_plane_mma_kernel<float>"


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(GPU_CASES) + list(SP_GPU_CASES), ids=list(GPU_CASES) + list(SP_GPU_CASES))
def test_tf32_on_vs_off(case, layout):
    """TF32 allowed: forward and grad_input within the TF32 bound of fp64 (and visibly TF32); TF32 disallowed:
    the IEEE kernels (algo 0) bit for bit, every pass within the fp32 tolerance."""
    c = GPU_CASES[case] if case in GPU_CASES else SP_GPU_CASES[case]
    x, w, b = make_inputs(c, torch.float32, "cuda", layout, seed=13, weight_scale=True)
    p = normalize_params(c.stride, c.padding, c.dilation, tuple(w.shape[2:]))
    op_args = (list(p.stride), list(p.padding), list(p.dilation))
    with tf32(True):
        xr = x.detach().requires_grad_(True)
        out = lkconv.depthwise_conv2d(xr, w, b, c.stride, c.padding, c.dilation, backend="cuda")
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float().cuda()
        (gx,) = torch.autograd.grad(out, xr, g)
        direct = torch.ops.lkconv_cuda.forward(x, w, b, *op_args, 2)
    assert torch.equal(out, direct), "TF32 allowed: depthwise_conv2d did not run algo 2"
    ref, gx_ref, bound, bound_g, S, Sg = _ref_and_bound(x, w, b, p, g)
    for name, o, rf, bd, s in (("forward", out, ref, bound, S), ("grad_input", gx, gx_ref, bound_g, Sg)):
        err = (o.double().cpu() - rf).abs()
        assert torch.isfinite(o).all(), name
        assert (err <= bd).all(), f"{name}: TF32 err {err.max().item():.3e} > bound"
        assert err.max() > 2.0 ** -16 * s.max(), f"{name}: no TF32 rounding visible: IEEE kernel ran?"
    with tf32(False):
        out_ieee = lkconv.depthwise_conv2d(x, w, b, c.stride, c.padding, c.dilation, backend="cuda")
        algo0 = torch.ops.lkconv_cuda.forward(x, w, b, *op_args, 0)
    assert torch.equal(out_ieee, algo0), "TF32 off: not the unchanged IEEE kernels"
    res = compare_all_passes("cuda", x, w, b, *c.conv_args)  # IEEE fp32 tolerance, every pass
    assert all(r.ok for r in res), "\n".join(map(str, res))


@requires_cuda
@pytest.mark.gpu
def test_toeplitz_tf32_matches_emulation_on_gpu():
    """The compiled kernel against its transcription on a small case: equal up to the order of the sum inside one
    mma (the operands are bit-identical TF32 values)."""
    N, C, H, W, K = 9, 2, 20, 24, 13
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, C, H, W, generator=gen)
    w = torch.randn(C, 1, K, K, generator=gen) / K
    b = torch.randn(C, generator=gen)
    y = torch.ops.lkconv_cuda.forward(x.cuda(), w.cuda(), b.cuda(), [1, 1], [6, 6, 6, 6], [1, 1], 2).double().cpu()
    ye = EMU.emulate_toeplitz_tf32(x, w, b, 6, 6, H, W, vec_x=4)
    _, S = tf32_bound(x.double(), w.double(), b.double(), (6, 6, 6, 6), K * K)
    assert ((y - ye).abs() <= (K * K + 2) * U_FP32 * S).all()


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tf32_grad_weight_stays_ieee(layout):
    c = GPU_CASES["nb2_dg6_28_k29_n9"]
    x, w, b = make_inputs(c, torch.float32, "cuda", layout, seed=17, weight_scale=True)
    with tf32(True):
        wr = w.detach().requires_grad_(True)
        out = lkconv.depthwise_conv2d(x, wr, b, c.stride, c.padding, c.dilation, backend="cuda")
        g = torch.randn_like(out)
        (gw,) = torch.autograd.grad(out, wr, g)
    with tf32(False):
        wr2 = w.detach().requires_grad_(True)
        out2 = lkconv.depthwise_conv2d(x, wr2, b, c.stride, c.padding, c.dilation, backend="cuda")
        (gw2,) = torch.autograd.grad(out2, wr2, g)
    assert torch.equal(gw, gw2)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("trans", [False, True], ids=["forward", "grad_input_stride2"])
def test_small_plane_tf32_matches_emulation_on_gpu(trans):
    """small_plane_mma_kernel<float> against its transcription: equal up to the order of the sum inside one mma."""
    N, C, H, K, st = 70, 2, 14, 7, (2 if trans else 1)
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(C, 1, K, K, generator=gen) / K
    Ho = (H + 6 - K) // st + 1
    geo = (H, H, Ho, Ho, K, K, st, st, 1, 1, 3, 3)
    if trans:
        g = torch.randn(N, C, Ho, Ho, generator=gen)
        y = torch.ops.lkconv_cuda.grad_input(g.cuda(), w.cuda(), [N, C, H, H], [st, st], [3, 3, 3, 3], [1, 1], 2)
        ye = EMU.emulate_small_plane_forward_tf32(g, w, None, geo, True, vec_x=1)
        S = torch.nn.grad.conv2d_input((N, C, H, H), w.abs().double(), g.abs().double(), stride=st, padding=3, groups=C)
    else:
        x = torch.randn(N, C, H, H, generator=gen)
        y = torch.ops.lkconv_cuda.forward(x.cuda(), w.cuda(), None, [1, 1], [3, 3, 3, 3], [1, 1], 2)
        ye = EMU.emulate_small_plane_forward_tf32(x, w, None, geo, False, vec_x=4)
        S = F.conv2d(x.abs().double(), w.abs().double(), padding=3, groups=C)
    assert ((y.double().cpu() - ye).abs() <= (K * K + 2) * U_FP32 * S).all()
