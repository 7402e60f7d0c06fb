"""Small-plane grad_weight by row pairs (csrc/dwconv_small_plane_gw_rows.cu, small_plane_gw_rows_kernel).

CPU (CI): the host emulation in csrc/kernel_emulation.py (section "small-plane grad_weight by row pairs")
transcribes the kernel's plan (dh range, batch groups, chunk double buffer), staging (per-lane cp.async offsets
of 8 / 4 / 2 elements or element loads, zero-filled images past the batch), the per-lane ldmatrix.trans
addresses, the mma.sync fragment layouts, the valid (oh, dh) pair walk of each warp, the epilogue's Rs layout
and the tap sums; shared memory starts as NaN, so an element read before it is written, or a padding column that
reaches a tap sum, fails the comparison with the fp64 reference.

GPU (``-m gpu``): the compiled kernel against the generic kernel (algo=1) and the fp64 reference, fp16 / bf16
(fp32 runs on its own kernels: checked too), NCHW / channels_last / strided / misaligned views, NaN-poisoned
workspaces, two runs bitwise equal.
"""
import os
import re

import pytest
import torch
import torch.nn.functional as F

from lkconv.params import normalize_params
from lkconv.testing import compare_all_passes, tolerance

from cases import DTYPES, load_emulation, requires_cuda_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = load_emulation()

# (N, C, H, W, KH, KW, padding (t, b, l, r), vec_x, vec_g, target_ctas, in_rule)
# in_rule: the launcher routes the shape to the kernel (else the emulation runs its math with check_rule=False)
EMU_CASES = {
    "k27_14_n18": (18, 1, 14, 14, 27, 27, (13, 13, 13, 13), 2, 2, 512, True),   # N % 16 != 0: zero-filled images
    "n1_w9": (1, 2, 9, 9, 7, 7, (3, 3, 3, 3), 1, 1, 512, True),                 # N = 1, odd W: element staging
    "w16_vec8": (3, 1, 6, 16, 5, 9, (2, 2, 4, 4), 8, 8, 512, True),
    "w12_vec4_wo_ne_w": (2, 1, 7, 12, 5, 9, (1, 3, 5, 1), 4, 2, 512, True),    # Wo = 10, asymmetric padding
    "k_gt_h_asym": (3, 1, 6, 11, 13, 15, (5, 7, 9, 5), 1, 1, 512, True),        # K > H: the dh range clipped by H
    "first_last_dh_one_pair": (2, 1, 5, 10, 9, 19, (4, 4, 9, 9), 2, 2, 512, True),  # dh = +-4: one pair each
    "neg_pad": (2, 1, 8, 13, 5, 5, (-1, 3, 3, -1), 1, 1, 512, True),          # cropping padding: dh_lo = +1
    "pad_gt_k": (2, 1, 5, 10, 3, 3, (4, 5, 3, 3), 2, 2, 512, True),           # padding > K, Ho = 12 > H
    "chunks_double_buffer": (70, 1, 9, 10, 5, 5, (2, 2, 2, 2), 2, 2, 1, True),  # 3 chunks in one CTA (6 in the last)
    "batch_groups": (40, 1, 9, 9, 5, 5, (2, 2, 2, 2), 1, 1, 512, True),        # 2 batch groups (splits)
    "k1": (3, 1, 12, 12, 1, 1, (0, 0, 0, 0), 4, 4, 512, False),                # K = 1: sp_rule declines (sparse F_c)
    "k1x3_w16_h3": (2, 1, 3, 16, 1, 3, (0, 0, 1, 1), 8, 8, 512, False),
}
for _w in range(9, 17):  # every width the rule admits, one n8 tile partly dead (W <= 15) or full (16)
    EMU_CASES[f"w{_w}"] = (2, 1, 4, _w, 3, 5, (1, 1, 2, 2), EMU.gr_vec(_w, True, 8), EMU.gr_vec(_w, True, 8), 512,
                           True)


def _case(name, seed=5):
    N, C, H, W, KH, KW, pad, vx, vg, tgt, in_rule = EMU_CASES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(C, 1, KH, KW, generator=gen, dtype=torch.float64, requires_grad=True)
    t, b, l, r = pad
    y = F.conv2d(F.pad(x, (l, r, t, b)), w, groups=C)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (gw,) = torch.autograd.grad(y, (w,), g)
    Ho, Wo = y.shape[2:]
    return x, g, gw, (H, W, Ho, Wo, KH, KW, 1, 1, 1, 1, t, l), vx, vg, tgt, in_rule


def _pairs(H, Ho, KH, pt):
    """valid (oh, dh) pairs: 0 <= oh < Ho, 0 <= oh + dh < H, 0 <= dh + pt < KH"""
    return sum(1 for oh in range(Ho) for kh in range(KH) if 0 <= oh + kh - pt < H)


@pytest.mark.parametrize("case", list(EMU_CASES), ids=list(EMU_CASES))
def test_gw_rows_emulated_vs_reference(case):
    x, g, gw_ref, geo, vx, vg, tgt, in_rule = _case(case)
    H, W, Ho, Wo, KH, KW = geo[:6]
    N, C = x.shape[:2]
    assert EMU.gr_rule(True, 9, N, C, *geo) == in_rule
    # the vector widths the host picks for a contiguous, aligned tensor of this shape
    assert (EMU.gr_vec(W, True, 8), EMU.gr_vec(Wo, True, 8)) == (vx, vg) or vx == vg == 1
    st = {}
    gw = EMU.emulate_gw_rows(x, g, geo, vx, vg, check_rule=in_rule, stats=st, target_ctas=tgt)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-10)
    # only valid (oh, dh) pairs are multiplied: 2 mma (two n8 tiles) per pair and 16-image k step
    p = EMU.gr_plan(N, C, H, Ho, KH, geo[10], tgt)
    ksteps = sum(EMU.ceil_div(min(N - ch * EMU.GR_MB, EMU.GR_MB), 16) for ch in range(p["nchunks"]))
    assert st["mma"] == 2 * _pairs(H, Ho, KH, geo[10]) * ksteps * C
    assert st["ldsm_b"] * 2 == st["mma"]


def test_gw_rows_cases_exercise_the_boundaries():
    plans = {n: EMU.gr_plan(c[0], c[1], c[2], _case(n)[3][2], c[4], c[6][0], c[9]) for n, c in EMU_CASES.items()}
    assert plans["chunks_double_buffer"]["cpg"] == 3 and plans["chunks_double_buffer"]["bgroups"] == 1
    assert plans["batch_groups"]["bgroups"] == 2
    assert plans["neg_pad"]["dh_lo"] == 1
    assert plans["k_gt_h_asym"]["ndh"] == 6 + 6 - 1  # K > H: every row pair, dh in [-(Ho - 1), H - 1]
    assert plans["first_last_dh_one_pair"]["ndh"] == 9
    assert (plans["pad_gt_k"]["dh_lo"], plans["pad_gt_k"]["ndh"]) == (-4, 3)
    # vector widths 8, 4, 2 and the element path are all emulated; W < 16 and Wo != W
    vecs = {min(c[7], c[8]) for c in EMU_CASES.values()}  # the kernel's VE: the narrower plane's width
    assert vecs == {1, 2, 4, 8}
    assert any(_case(n)[3][3] != _case(n)[3][1] for n in ("w12_vec4_wo_ne_w", "pad_gt_k"))
    assert {c[0] % 16 for c in EMU_CASES.values()} - {0}


def test_gw_rows_rule_for_the_replknet_small_layers():
    # 14x14 / K27 (N = 64): 16-bit on sm80 / sm90 takes the row-pair kernel; plan: 27 dh, one batch group of two
    # chunks (double buffer), 58 KB of shared memory
    assert EMU.gr_rule(True, 8, 64, 512, 14, 14, 14, 14, 27, 27, 1, 1, 1, 1, 13, 13)
    assert EMU.gr_rule(True, 9, 64, 512, 14, 14, 14, 14, 27, 27, 1, 1, 1, 1, 13, 13, 163 * 1024)
    p = EMU.gr_plan(64, 512, 14, 14, 27, 13)
    assert (p["dh_lo"], p["ndh"], p["bgroups"], p["cpg"], p["bytes"]) == (-13, 27, 1, 2, 59392)
    assert _pairs(14, 14, 27, 13) == 196  # = H * H: the GEMM work of R is that of G = X^T dY
    # declined: fp32, sm75, stride 2, dilation 2, W <= 8 (7x7 / K13 stays on small_plane_gw_mma_kernel), W > 16
    assert not EMU.gr_rule(False, 9, 64, 512, 14, 14, 14, 14, 27, 27, 1, 1, 1, 1, 13, 13)
    assert not EMU.gr_rule(True, 7, 64, 512, 14, 14, 14, 14, 27, 27, 1, 1, 1, 1, 13, 13)
    assert not EMU.gr_rule(True, 9, 8, 4, 14, 14, 7, 7, 5, 5, 2, 2, 1, 1, 2, 2)
    assert not EMU.gr_rule(True, 9, 8, 4, 14, 14, 10, 10, 3, 3, 1, 1, 2, 2, 0, 0)
    assert not EMU.gr_rule(True, 9, 64, 1024, 7, 7, 7, 7, 13, 13, 1, 1, 1, 1, 6, 6)
    assert not EMU.gr_rule(True, 9, 4, 4, 12, 17, 12, 17, 11, 11, 1, 1, 1, 1, 5, 5)
    # the whole rule: dh count fits the warps' accumulators for every admitted plane
    assert EMU.GR_MAX_SIDE * 2 - 1 <= EMU.GR_WARPS * EMU.GR_ND


def test_gw_rows_layout_conflict_free():
    for H in range(1, 17):
        p = EMU.gr_plan(64, 8, H, H, 2 * H - 1, H - 1)
        # ldmatrix phases read 8 consecutive images at one row: odd image pitch in 16-byte units
        assert (p["xpi"] * 2) % 16 == 0 and (p["xpi"] * 2 // 16) % 2 == 1 and (p["ypi"] * 2 // 16) % 2 == 1
        assert p["stage_bytes"] % 16 == 0 and p["ndh"] <= EMU.GR_WARPS * EMU.GR_ND
    # epilogue float2 stores: rows g4 = 0..3 of a half-warp start 8 words apart (32 distinct banks)
    assert EMU.GR_RP % 32 == 24 and len({(r * EMU.GR_RP) % 32 // 8 for r in range(4)}) == 4


def test_gw_rows_constants_match_the_kernel_source():
    hdr = open(os.path.join(ROOT, "csrc", "dwconv_small_plane_gw_rows.h")).read()
    src = open(os.path.join(ROOT, "csrc", "dwconv_small_plane_gw_rows.cu")).read()
    consts = dict(re.findall(r"\b(GR_[A-Z0-9_]+) = (\d+)", hdr))
    for name in ("GR_THREADS", "GR_WARPS", "GR_ND", "GR_MB", "GR_MAX_SIDE", "GR_MIN_W", "GR_RP"):
        assert int(consts[name]) == getattr(EMU, name), name
    assert "(512 + C - 1) / C" in src  # the emulation's target_ctas default
    assert "dwconv_small_plane_gw_rows.cu" in open(os.path.join(ROOT, "csrc", "build_env.py")).read()
    from lkconv.static import model
    assert (model.GR_ND, model.GR_MB, model.GR_WARPS, model.GR_MIN_W) == (EMU.GR_ND, EMU.GR_MB, EMU.GR_WARPS,
                                                                          EMU.GR_MIN_W)
    for geo in ((64, 512, 14, 14, 27, 13), (3, 2, 9, 12, 5, 2), (70, 1, 16, 16, 31, 15)):
        N, C, H, Ho, KH, pt = geo
        assert model.gr_plan(N, C, H, Ho, KH, pt) == EMU.gr_plan(N, C, H, Ho, KH, pt)


def test_gw_rows_symbol_maps_to_its_role():
    from lkconv.static import kernels as SK
    for t, dt in (("__half", "fp16"), ("__nv_bfloat16", "bf16")):
        d = SK.describe_symbol(f"void lkconv::small_plane_gw_rows_kernel<{t}, 2>(lkconv::GradWeightArgs, "
                               "lkconv::GrPlan)")
        assert (d["role"], d["dtype"], d["backend"]) == ("sp_gw_rows", dt, "cuda")
        assert SK.ROLE_STATUS["sp_gw_rows"].startswith("default")


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
LAYOUTS = ("nchw", "channels_last", "sliced", "offset")

# (N, C, H, W, KH, KW, padding (t, b, l, r)); stride 1, dilation 1: every case in the row-pair rule (16-bit)
GPU_CASES = {
    "k27_14": (64, 4, 14, 14, 27, 27, (13, 13, 13, 13)),
    "k27_14_n40": (40, 3, 14, 14, 27, 27, (13, 13, 13, 13)),     # two chunks, the second with 8 images
    "k31_16": (3, 2, 16, 16, 31, 31, (15, 15, 15, 15)),
    "k13_9_n1": (1, 3, 9, 9, 13, 13, (6, 6, 6, 6)),
    "k9x15_10x12_asym": (5, 2, 10, 12, 9, 15, (2, 6, 9, 3)),
    "k11_13x15": (17, 2, 13, 15, 11, 11, (5, 5, 5, 5)),
    "k7_pad_gt_k": (6, 2, 9, 10, 7, 7, (8, 1, 2, 7)),
    "k21_11x16_c520": (70, 520, 11, 16, 21, 21, (10, 10, 10, 10)),  # C >= 512: one batch group of 3 chunks
}


def _gpu_inputs(case, dt, layout, seed=0):
    N, C, H, W, KH, KW, pad = GPU_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    if layout == "sliced":  # strided view: shifted base pointer, non-contiguous plane rows
        x = torch.randn(N, C + 1, H + 1, W + 3, generator=gen).to(dt).cuda()[:, 1:, 1:, 1:W + 1]
    elif layout == "offset":  # contiguous but one element off the 16-byte alignment: the element path
        x = torch.randn(N * C * H * W + 1, generator=gen).to(dt).cuda()[1:].view(N, C, H, W)
    else:
        x = torch.randn(N, C, H, W, generator=gen).to(dt).cuda()
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, 1, KH, KW, generator=gen).to(dt).cuda()
    b = torch.randn(C, generator=gen).to(dt).cuda()
    return x, w, b, 1, pad, 1


def test_gw_rows_gpu_cases_are_in_the_rule():
    for name, (N, C, H, W, KH, KW, (t, b, l, r)) in GPU_CASES.items():
        Ho, Wo = H + t + b - KH + 1, W + l + r - KW + 1
        for optin in (163 * 1024, 227 * 1024):
            assert EMU.gr_rule(True, 8, N, C, H, W, Ho, Wo, KH, KW, 1, 1, 1, 1, t, l, optin), name
    assert EMU.gr_plan(70, 520, 11, 11, 21, 10)["cpg"] == 3  # the double-buffered chunk loop on the GPU too


@requires_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_gw_rows_all_passes_vs_reference(case, dtype, layout):
    x, w, b, s, pad, d = _gpu_inputs(case, DTYPES[dtype], layout)
    res = compare_all_passes("cuda", x, w, b, s, pad, d)
    assert all(r.ok for r in res), "\n".join(map(str, res))


@requires_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_gw_rows_fast_vs_generic(case, dtype, layout, monkeypatch):
    """grad_weight: algo=0 (the row-pair kernel for fp16 / bf16) against algo=1 (grad_weight_partial_kernel) and
    the fp64 reference, NaN-poisoned workspaces (an unwritten partial fails), two runs bitwise equal."""
    monkeypatch.setenv("LKCONV_POISON_OUTPUTS", "1")
    dt = DTYPES[dtype]
    x, w, b, s, pad, d = _gpu_inputs(case, dt, layout, seed=1)
    N, C, H, W = x.shape
    KH, KW = w.shape[2:]
    pr = normalize_params(s, pad, d, (KH, KW))
    st, pd, dl = pr.as_lists()
    ops = torch.ops.lkconv_cuda
    y = ops.forward(x, w, b, st, pd, dl, 1)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dt).cuda()
    if layout == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)
    gw = ops.grad_weight(g, x, [C, 1, KH, KW], st, pd, dl, 0)
    gw1 = ops.grad_weight(g, x, [C, 1, KH, KW], st, pd, dl, 1)
    from lkconv.testing import reference_all_passes
    ref = reference_all_passes(x, w, b, pr, g)[2]
    assert torch.isfinite(gw).all()
    tol = tolerance(ref, gw1, dt)  # the generic kernel's own error in this dtype is the baseline
    torch.testing.assert_close(gw.double().cpu(), ref, atol=tol, rtol=0)
    assert torch.equal(gw, ops.grad_weight(g, x, [C, 1, KH, KW], st, pd, dl, 0))  # deterministic
