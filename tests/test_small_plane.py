"""Small planes (csrc/dwconv_small_plane.cu): the batch-as-rows GEMM per channel.

CPU (CI): the host emulation in csrc/kernel_emulation.py ("small planes" section) transcribes the kernels'
F_c build (thread decomposition, kw ranges), staging (vector widths with zero-filled tails), pixel blocks
and batch groups, per-lane ldmatrix / ldmatrix.trans addresses and mma.sync fragments, the FFMA register
blocks, the epilogues and grad_weight's tap sums + ordered split reduction; it runs against the fp64
reference (F.conv2d and its autograd) for every kernel (16-bit / fp32, forward / grad_input / grad_weight)
and the boundaries: N not a multiple of the batch chunk, planes not a multiple of 16, K > H, asymmetric and
negative padding, stride 2, dilation 2, N = 1, several pixel blocks, several batch chunks per group.
GPU (``-m gpu``): the compiled kernels against the generic kernels (algo=1) and the fp64 reference, every
dtype and layout, determinism of grad_weight.
"""
import os
import re

import pytest
import torch
import torch.nn.functional as F

import lkconv
from lkconv.params import normalize_params
from lkconv.testing import compare_all_passes, tolerance

from cases import DTYPES, load_emulation, requires_cuda_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


EMU = load_emulation()

# (N, C, H, W, KH, KW, stride, (top, bottom, left, right), dilation, blocks, vec, target_ctas)
# blocks: a shared-memory limit just below one pixel block's need (so the plan takes two or more blocks);
# target_ctas = 1: one batch group, so several batch chunks per CTA
SP_CASES = {
    "k3_5x5": (3, 2, 5, 5, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, 1, 512),
    "k_gt_h_asym": (2, 1, 4, 6, 7, 9, (1, 1), (2, 4, 4, 3), (1, 1), False, 4, 512),
    "stride2": (2, 1, 7, 7, 5, 5, (2, 2), (2, 2, 2, 2), (1, 1), False, 8, 512),
    "stride2x1_dil2": (2, 1, 9, 8, 3, 3, (2, 1), (2, 0, 1, 3), (2, 2), False, 2, 512),
    "dil2": (1, 2, 6, 6, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), False, 1, 512),
    "n1_7x7_k13": (1, 1, 7, 7, 13, 13, (1, 1), (6, 6, 6, 6), (1, 1), False, 1, 512),
    "pixel_blocks": (2, 1, 6, 6, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1), True, 8, 512),
    "pixel_blocks_stride2": (2, 1, 12, 11, 5, 5, (2, 2), (1, 2, 0, 2), (1, 1), True, 2, 512),
    "chunks_per_group": (70, 1, 3, 3, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, 2, 1),
    "pad_gt_k": (2, 1, 4, 5, 3, 3, (1, 1), (4, 5, 3, 6), (1, 1), False, 1, 512),
}


def _optin(kind, P, Q, taps, blocks):
    """the device limit the emulated launch sees: 227 KB, or (blocks) the size of a two-block plan"""
    return EMU.sp_bytes(kind, P, EMU.round_up(-(-Q // 2), 8), taps) if blocks else 227 * 1024


def _case(name, seed=3):
    N, C, H, W, KH, KW, st, pad, dil, optin, vec, tgt = SP_CASES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(C, 1, KH, KW, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, generator=gen, dtype=torch.float64)
    t, bo, l, r = pad
    xr = x.clone().requires_grad_(True)
    y = F.conv2d(F.pad(xr, (l, r, t, bo)), w, b, st, 0, dil, groups=C)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    gx, gw = torch.autograd.grad(y, (xr, w), g)
    Ho, Wo = y.shape[2:]
    geo = (H, W, Ho, Wo, KH, KW, st[0], st[1], dil[0], dil[1], t, l)
    return x, w.detach(), b, y.detach(), g, gx, gw, geo, optin, vec, tgt


@pytest.mark.parametrize("tc", [True, False], ids=["mma", "ffma"])
@pytest.mark.parametrize("case", list(SP_CASES), ids=list(SP_CASES))
def test_small_plane_kernels_emulated(case, tc):
    x, w, b, y_ref, g, gx_ref, gw_ref, geo, blocks, vec, tgt = _case(case)
    H, W, Ho, Wo, KH, KW, sh, sw, dh, dw, pt, pl = geo
    taps = KH * KW
    vec = vec if tc else min(vec, 4)  # 16-byte vectors are 8 half / 4 float elements
    fk, gk = (0, 2) if tc else (1, 3)
    y = EMU.emulate_small_plane_forward(x, w, b, geo, False, tc, _optin(fk, H * W, Ho * Wo, taps, blocks), vec, tgt)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    # grad_input as the host code runs it: stride 1 -> the forward kernel with the flipped filter and padding
    # dil*(K-1) - p (negative when p > dil*(K-1)); stride > 1 -> the transposed kernel (dY . F_c^T)
    if sh == 1 and sw == 1:
        geo_f = (Ho, Wo, H, W, KH, KW, 1, 1, dh, dw, dh * (KH - 1) - pt, dw * (KW - 1) - pl)
        if EMU.sp_rule(tc, 9, x.shape[0], x.shape[1], *geo_f):
            gx = EMU.emulate_small_plane_forward(g, w.flip(2, 3), None, geo_f, False, tc,
                                                 _optin(fk, Ho * Wo, H * W, taps, blocks), vec, tgt)
            torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)
    gx_t = EMU.emulate_small_plane_forward(g, w, None, geo, True, tc, _optin(fk, Ho * Wo, H * W, taps, blocks), vec,
                                           tgt)  # the transposed form, any stride
    torch.testing.assert_close(gx_t, gx_ref, rtol=1e-10, atol=1e-10)
    gw = EMU.emulate_small_plane_grad_weight(x, g, geo, tc, _optin(gk, H * W, Ho * Wo, taps, blocks), vec, vec, tgt)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-10)


def test_small_plane_cases_exercise_the_boundaries():
    """The case table above really reaches several pixel blocks, several chunks per batch group, planes not
    a multiple of 16 and K > H (so the emulation tests cover those code paths)."""
    def plan(name, kind):
        N, C, H, W, KH, KW, st, pad, dil, blocks, vec, tgt = SP_CASES[name]
        geo = _case(name)[7]
        P, Q = geo[0] * geo[1], geo[2] * geo[3]
        return EMU.sp_make_plan(kind, P, Q, KH * KW, N, C, _optin(kind, P, Q, KH * KW, blocks), tgt)

    for kind in range(4):
        assert plan("pixel_blocks", kind)["qsplits"] > 1, kind
        assert plan("pixel_blocks_stride2", kind)["qsplits"] > 1, kind
    assert plan("chunks_per_group", 0)["cpg"] == 2 and plan("chunks_per_group", 1)["cpg"] == 3
    assert plan("k3_5x5", 0)["P"] % 16 and plan("k_gt_h_asym", 0)["P"] == 24


def test_rule_and_plan_for_the_replknet_small_layers():
    # 14x14 / K27 and 7x7 / K13 (N = 64): every dtype and pass takes the small-plane kernels on sm80 / sm90
    for (C, H, K) in ((512, 14, 27), (1024, 7, 13)):
        p = K // 2
        assert EMU.sp_rule(True, 8, 64, C, H, H, H, H, K, K, 1, 1, 1, 1, p, p)
        assert EMU.sp_rule(False, 7, 64, C, H, H, H, H, K, K, 1, 1, 1, 1, p, p)
        assert not EMU.sp_rule(True, 7, 64, C, H, H, H, H, K, K, 1, 1, 1, 1, p, p)  # mma.sync needs sm80
        for kind in range(4):
            for optin in (163 * 1024, 227 * 1024, 99 * 1024):
                pl = EMU.sp_make_plan(kind, H * H, H * H, K * K, 64, C, optin)
                assert pl is not None and pl["bytes"] <= min(optin, EMU.SP_SMEM_BUDGET)
                assert pl["QB"] % 8 == 0 and pl["qsplits"] * pl["QB"] >= H * H
    # 14x14 bf16 forward: two pixel blocks of 104 (76 KB: two CTAs per SM on A100 and H100)
    pl = EMU.sp_make_plan(0, 196, 196, 729, 64, 512, 227 * 1024)
    assert (pl["QB"], pl["qsplits"], pl["bgroups"], pl["bytes"]) == (104, 2, 1, 78976)
    # declined: a plane over 256 pixels, a sparse F_c (3x3 on 16x16), strides beyond the int32 build math
    assert not EMU.sp_rule(True, 9, 1, 1, 17, 17, 17, 17, 5, 5, 1, 1, 1, 1, 2, 2)
    assert not EMU.sp_rule(True, 9, 1, 1, 16, 16, 16, 16, 3, 3, 1, 1, 1, 1, 1, 1)
    assert not EMU.sp_rule(True, 9, 1, 1, 4, 4, 1, 1, 3, 3, 2048, 1, 1, 1, 0, 0)


def test_small_plane_layouts_conflict_free():
    for P in (9, 25, 49, 196, 256):
        L = EMU.sp_layout_tc(P, 104, 729)
        assert (L["pitch"] * 2 // 16) % 2 == 1 and L["pitch"] >= L["kp"] >= P  # ldmatrix rows: distinct banks
        G = EMU.sp_gw_layout(P, 104, True)
        assert (G["xp"] * 2 // 16) % 2 == 1 and (G["yp"] * 2 // 16) % 2 == 1
        assert G["gp"] % 16 == 8  # the float2 C-fragment stores of a half-warp cover 32 distinct banks
        assert G["gs_off"] % 16 == 0 and L["bs_off"] % 16 == 0


def test_constants_match_the_kernel_source():
    src = open(os.path.join(ROOT, "csrc", "dwconv_small_plane.cu")).read()
    hdr = open(os.path.join(ROOT, "csrc", "dwconv_small_plane.h")).read()
    consts = dict(re.findall(r"\b(SP_[A-Z0-9_]+) = (\d[\d *]*)", src + hdr))
    for name in ("SP_THREADS", "SP_WARPS", "SP_MB_TC", "SP_MB_F32", "SP_MAX_PIX", "SP_MAX_TAPS", "SP_MAX_GEOM",
                 "SP_MAX_PAD"):
        assert int(eval(consts[name])) == getattr(EMU, name), name
    assert int(eval(consts["SP_SMEM_BUDGET"])) == EMU.SP_SMEM_BUDGET
    assert "bg = ceil_div(512, base)" in src  # target_ctas default of the emulation
    from lkconv.static import model
    assert model.SP_SMEM_BUDGET == EMU.SP_SMEM_BUDGET


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
requires_cuda = requires_cuda_backend
LAYOUTS = ("nchw", "channels_last", "sliced")

# (N, C, H, W, KH, KW, stride, padding (t, b, l, r), dilation)
GPU_CASES = {
    "k27_14": (64, 4, 14, 14, 27, 27, 1, (13, 13, 13, 13), 1),
    "k13_7": (65, 5, 7, 7, 13, 13, 1, (6, 6, 6, 6), 1),        # two batch chunks, the second with one row
    "k13_7_n1": (1, 3, 7, 7, 13, 13, 1, (6, 6, 6, 6), 1),
    "k31_16x16": (3, 2, 16, 16, 31, 31, 1, (15, 15, 15, 15), 1),
    "k9_5x6_asym": (4, 3, 5, 6, 9, 7, 1, (2, 6, 5, 1), 1),
    "k5_stride2": (6, 3, 13, 11, 5, 5, 2, (2, 2, 2, 2), 1),
    "k7_dil2": (5, 2, 9, 10, 7, 7, 1, (6, 6, 6, 6), 2),
    "k7_stride2_dil2": (3, 2, 12, 12, 7, 5, 2, (5, 6, 4, 3), 2),
    "k15_odd_17x15": (2, 2, 15, 17, 15, 15, 1, (7, 7, 7, 7), 1),  # 255 pixels
}


def _gpu_inputs(case, dt, layout, seed=0):
    N, C, H, W, KH, KW, s, pad, d = GPU_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    if layout == "sliced":  # strided view: shifted base pointer, non-contiguous plane rows
        x = torch.randn(N, C + 1, H + 1, W + 3, generator=gen).to(dt).cuda()[:, 1:, 1:, 1:W + 1]
    else:
        x = torch.randn(N, C, H, W, generator=gen).to(dt).cuda()
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, 1, KH, KW, generator=gen).to(dt).cuda()
    b = torch.randn(C, generator=gen).to(dt).cuda()
    return x, w, b, s, pad, d


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_small_plane_all_passes_vs_reference(case, dtype, layout):
    x, w, b, s, pad, d = _gpu_inputs(case, DTYPES[dtype], layout)
    res = compare_all_passes("cuda", x, w, b, s, pad, d)
    assert all(r.ok for r in res), "\n".join(map(str, res))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_small_plane_fast_vs_generic(case, dtype, layout, monkeypatch):
    """Every pass: algo=0 (the small-plane kernels) against algo=1 (the generic kernels), with NaN-poisoned
    outputs and workspaces (an unwritten element fails), and grad_weight bitwise reproducible."""
    monkeypatch.setenv("LKCONV_POISON_OUTPUTS", "1")
    dt = DTYPES[dtype]
    x, w, b, s, pad, d = _gpu_inputs(case, dt, layout, seed=1)
    N, C, H, W = x.shape
    KH, KW = w.shape[2:]
    pr = normalize_params(s, pad, d, (KH, KW))
    st, pd, dl = pr.as_lists()
    ops = torch.ops.lkconv_cuda
    y = ops.forward(x, w, b, st, pd, dl, 0)
    y1 = ops.forward(x, w, b, st, pd, dl, 1)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dt).cuda()
    if layout == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)
    gx = ops.grad_input(g, w, [N, C, H, W], st, pd, dl, 0)
    gx1 = ops.grad_input(g, w, [N, C, H, W], st, pd, dl, 1)
    gw = ops.grad_weight(g, x, [C, 1, KH, KW], st, pd, dl, 0)
    gw1 = ops.grad_weight(g, x, [C, 1, KH, KW], st, pd, dl, 1)
    from lkconv.testing import reference_all_passes
    ref = reference_all_passes(x, w, b, pr, g)
    for name, fast, generic, r in (("forward", y, y1, ref[0]), ("grad_input", gx, gx1, ref[1]),
                                   ("grad_weight", gw, gw1, ref[2])):
        assert torch.isfinite(fast).all(), name
        tol = tolerance(r, generic, dt)  # the generic kernel's own error in this dtype is the baseline
        torch.testing.assert_close(fast.double().cpu(), r, atol=tol, rtol=0, msg=name)
    assert torch.equal(gw, ops.grad_weight(g, x, [C, 1, KH, KW], st, pd, dl, 0))  # deterministic


def test_small_plane_symbols_map_to_roles():
    from lkconv.static import kernels as SK

    cases = {
        "void lkconv::small_plane_mma_kernel<__nv_bfloat16, false>(lkconv::ConvArgs, lkconv::SpPlan, int)":
            ("sp_mma", "bf16"),
        "void lkconv::small_plane_mma_kernel<__half, true>(lkconv::ConvArgs, lkconv::SpPlan, int)": ("sp_mma", "fp16"),
        "void lkconv::small_plane_ffma_kernel<false>(lkconv::ConvArgs, lkconv::SpPlan)": ("sp_ffma", "fp32"),
        "void lkconv::small_plane_gw_mma_kernel<__half>(lkconv::GradWeightArgs, lkconv::SpPlan, int, int)":
            ("sp_gw_mma", "fp16"),
        "lkconv::small_plane_gw_ffma_kernel(lkconv::GradWeightArgs, lkconv::SpPlan, int, int)": ("sp_gw_ffma", "fp32"),
    }
    for name, (role, dtype) in cases.items():
        d = SK.describe_symbol(name)
        assert (d["role"], d["dtype"], d["backend"]) == (role, dtype, "cuda"), name
        assert SK.ROLE_STATUS[role].startswith("default")
