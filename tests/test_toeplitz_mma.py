"""toeplitz_mma_kernel ("image-rows" tiling).  CPU: csrc/kernel_emulation.py's transcription of the
kernel's staging, per-lane ldmatrix / A-word addresses, chunk mask and m16n8k16 fragments against F.conv2d
(fp64), forward and stride-1 grad_input, for every (NB, DG) configuration, several rows-per-CTA values, the
staging vector widths and the boundary cases (first/last tile, K > H, asymmetric and negative padding, W not
a multiple of the 16-column blocks, N not a multiple of the 8 images per CTA, odd Ho).  GPU (``-m gpu``): one
case per launcher configuration and boundary, every dtype and layout, against the fp64 reference (all
passes) and fast (algo 0) vs generic (algo 1)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "csrc"))
import kernel_emulation as EMU  # noqa: E402

import lkconv  # noqa: E402
from lkconv.params import normalize_params  # noqa: E402
from lkconv.testing import compare_all_passes  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from cases import DTYPES, LAYOUTS, Case, _table, make_inputs, requires_cuda_backend  # noqa: E402

F = torch.nn.functional

# (N, C, H, W, KH, KW, (top, bottom, left, right), (NB, DG) or None, bm or None, vec_x)
CASES = {
    "auto_k5": (1, 1, 9, 11, 5, 5, (2, 2, 2, 2), None, None, 1),
    "n9_k7_v2": (9, 1, 5, 6, 7, 7, (3, 3, 3, 3), None, None, 2),
    "n3_k13_asym_v4": (3, 2, 7, 20, 13, 13, (6, 7, 5, 0), None, None, 4),
    "k31_on_5x6": (2, 1, 5, 6, 31, 31, (15, 15, 15, 15), None, None, 1),
    "nb4_dg3_wide_v8": (2, 1, 6, 70, 3, 17, (1, 1, 8, 8), (4, 3), None, 8),
    "nb4_dg2_rowtiles": (10, 1, 9, 40, 4, 6, (1, 2, 2, 3), (4, 2), 4, 2),
    "nb2_dg3_bm2_oddHo": (3, 1, 7, 13, 5, 9, (2, 2, 4, 4), (2, 3), 2, 1),
    "nb2_dg2_two_groups": (1, 1, 6, 9, 3, 40, (1, 1, 20, 19), (2, 2), None, 1),
    "pad_gt_k": (2, 1, 4, 5, 3, 3, (4, 5, 3, 6), None, None, 1),
    "k29_on_28_cols_v4": (1, 1, 4, 28, 3, 29, (1, 1, 14, 14), None, None, 4),
    "k64_on_4x5": (1, 1, 4, 5, 64, 64, (32, 31, 32, 31), None, None, 1),
}


def _case(N, C, H, W, KH, KW, pad, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(C, 1, KH, KW, generator=gen, dtype=torch.float64)
    b = torch.randn(C, generator=gen, dtype=torch.float64)
    t, bo, l, r = pad
    ref = F.conv2d(F.pad(x, (l, r, t, bo)), w, b, groups=C)
    return gen, x, w, b, ref


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_toeplitz_mma_emulated(case):
    N, C, H, W, KH, KW, pad, config, bm, vec_x = CASES[case]
    gen, x, w, b, ref = _case(N, C, H, W, KH, KW, pad, seed=3)
    t, bo, l, r = pad
    Ho, Wo = ref.shape[2:]
    y = EMU.emulate_toeplitz_mma(x, w, b, t, l, Ho, Wo, config=config, vec_x=vec_x, bm=bm)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    # grad_input as the host code runs it: the same kernel, flipped filter, padding K-1-p (negative here when p > K-1)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    gx = EMU.emulate_toeplitz_mma(g, w.flip(2, 3), None, KH - 1 - t, KW - 1 - l, H, W, config=config, vec_x=vec_x,
                                  bm=None if bm is None else bm)
    xr = x.clone().requires_grad_(True)
    (gx_ref,) = torch.autograd.grad(F.conv2d(F.pad(xr, (l, r, t, bo)), w, None, groups=C), xr, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)


def test_toeplitz_mma_config_and_rows():
    """The launcher's choices for the RepLKNet-31B layers (stride 1, padding K // 2), H100 / A100 opt-in limits."""
    assert EMU.toeplitz_mma_config(56, 31, 15) == (4, 3)   # s0 = 1, nd = 3
    assert EMU.toeplitz_mma_config(28, 29, 14) == (2, 3)   # s0 = 2, nd = 3
    assert EMU.toeplitz_mma_config(14, 27, 13) == (2, 3)
    assert EMU.toeplitz_mma_config(7, 13, 6) == (2, 2)     # nd = 2
    assert EMU.toeplitz_mma_config(100, 40, 20) == (4, 2)  # s0 = 4, nd = 4: two groups of 2
    assert EMU.toeplitz_mma_config(100, 51, 25) == (4, 3)  # s0 = 7, nd = 5: two groups of 3
    h100, a100 = 227 * 1024, 163 * 1024
    assert EMU.toeplitz_mma_rows(31, 31, 56, 56, 15, 4, 3, h100) == 56   # whole plane, 2 CTAs / SM
    assert EMU.toeplitz_mma_rows(31, 31, 56, 56, 15, 4, 3, a100) == 14   # halved until it fits 81 KB (75 KB)
    assert EMU.toeplitz_mma_rows(29, 29, 28, 28, 14, 2, 3, h100) == 28
    for KH, H, NB, DG, lim in ((31, 56, 4, 3, h100), (31, 56, 4, 3, a100), (29, 28, 2, 3, h100), (64, 200, 4, 3, h100)):
        bm = EMU.toeplitz_mma_rows(KH, KH, H, H, KH // 2, NB, DG, lim)
        assert bm > 0 and bm % 2 == 0 and EMU.tm_layout(KH, KH, H, EMU.tm_s0(KH // 2), NB, DG, bm)["bytes"] <= lim
    # K = 64 on a 200-wide plane: even 2 rows (65 staged rows x 8 images) exceed the A100 limit -> 0, the
    # launcher declines and the wmma kernel runs
    assert EMU.toeplitz_mma_rows(64, 64, 200, 200, 32, 4, 3, a100) == 0


def test_toeplitz_mma_layout_conflict_free():
    """ldmatrix reads the same row of 8 images: the image pitch is an odd number of 16-byte units, so the 8
    row addresses of every matrix fall on 8 distinct 16-byte bank groups."""
    for KH, KW, H, NB, DG, bm in ((31, 31, 56, 4, 3, 56), (29, 29, 28, 2, 3, 28), (13, 13, 7, 2, 2, 8), (5, 51, 9, 4, 2, 4)):
        L = EMU.tm_layout(KH, KW, H, EMU.tm_s0(KW // 2), NB, DG, bm)
        assert (L["ip"] * 2 // 16) % 2 == 1 and L["xc"] % 16 == 0 and L["z_off"] % 8 == 0
        groups = {((img * L["ip"] * 2) // 16) % 8 for img in range(8)}
        assert len(groups) == 8


# ------------------------------------------------------------------------------------------------
# GPU: each launcher configuration (NB, DG) and boundary; the comment names what the H100 launch picks.
# Every plane has > 256 pixels: smaller ones go to the small-plane kernels (tests/test_small_plane.py).
# ------------------------------------------------------------------------------------------------
GPU_CASES = _table(
    Case('nb4_dg3_56_k31_n10', (10, 2, 56, 56), (31, 31), padding=15, bias=True),   # (4, 3), 2 image groups, N % 8 = 2
    Case('nb2_dg3_28_k29_n9', (9, 3, 28, 28), (29, 29), padding=14, bias=True),     # (2, 3), K > H
    Case('nb2_dg2_20_k13_n8', (8, 2, 20, 20), (13, 13), padding=6, bias=True),      # (2, 2), H * W > 256
    Case('nb4_dg2_40x50_k13_n3', (3, 2, 40, 50), (13, 13), padding=6, bias=True),   # (4, 2), Wo not a multiple of 16
    Case('rows_cols_tiles_k31', (2, 1, 100, 90), (31, 31), padding=15, bias=True),  # bm < Ho, two column tiles
    Case('two_groups_5x51', (3, 2, 28, 30), (5, 51), padding=(2, 25), bias=True),   # nd = 5: two groups of 3
    Case('asym_odd_k7', (5, 2, 25, 17), (7, 9), padding=(1, 5, 6, 0), bias=True),   # odd Ho, asymmetric padding
    Case('k31_on_6x50', (9, 1, 6, 50), (31, 31), padding=15, bias=True),            # K > H, zero rows per lane
)


@pytest.mark.parametrize("case", list(GPU_CASES.values()), ids=list(GPU_CASES))
def test_gpu_cases_reach_toeplitz_mma(case):
    """The launcher sends planes the small-plane rule accepts to the batch-as-rows kernels first; these GPU
    cases must not be among them, or they would not test this kernel."""
    N, C, H, W = case.shape
    KH, KW = case.k
    p = normalize_params(case.stride, case.padding, case.dilation, (KH, KW))
    Ho, Wo = p.out_size(H, W, KH, KW)
    assert not EMU.sp_rule(True, 9, N, C, H, W, Ho, Wo, KH, KW, *p.stride, *p.dilation, p.padding[0], p.padding[2])


requires_cuda = requires_cuda_backend


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_toeplitz_mma_all_passes_vs_reference(case, dtype, layout):
    c = GPU_CASES[case]
    x, w, b = make_inputs(c, DTYPES[dtype], "cuda", layout, seed=11, weight_scale=True)
    res = compare_all_passes("cuda", x, w, b, *c.conv_args)
    assert all(r.ok for r in res), "\n".join(map(str, res))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_toeplitz_mma_fast_matches_generic(case, dtype):
    c = GPU_CASES[case]
    x, w, b = make_inputs(c, DTYPES[dtype], "cuda", "nchw", seed=12, weight_scale=True)
    st, pad, dil = normalize_params(*c.conv_args, (w.shape[2], w.shape[3])).as_lists()
    ops = torch.ops.lkconv_cuda
    y0, y1 = ops.forward(x, w, b, st, pad, dil, 0), ops.forward(x, w, b, st, pad, dil, 1)
    g = torch.randn_like(y0)
    gx0 = ops.grad_input(g, w, list(x.shape), st, pad, dil, 0)
    gx1 = ops.grad_input(g, w, list(x.shape), st, pad, dil, 1)
    tol = {"fp16": 2e-2, "bf16": 1e-1}[dtype]
    assert torch.isfinite(y0).all() and torch.isfinite(gx0).all()
    torch.testing.assert_close(y0.float(), y1.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(gx0.float(), gx1.float(), atol=tol, rtol=tol)
