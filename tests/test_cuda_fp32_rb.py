"""fp32_rb_kernel (csrc/dwconv_forward_fp32.cu): the fp32 register-blocked forward / stride-1 grad_input.

CPU (CI): the host emulation in csrc/kernel_emulation.py (``emulate_fp32_rb``: staging walk, chunk-major
filter, warp-uniform ranges, guarded rows, register ring, padded last chunk, single-tap tail, epilogue) in
both tile configurations and every staging vector width, forward and the flipped-kernel grad_input,
against F.conv2d in fp64; the launcher's tile rule, the layout's bank pattern and shared-memory size.
GPU (``-m gpu``): every pass / dtype / layout against the fp64 reference, fast vs generic kernels, and a
profiler check that fp32 stride-1 launches run fp32_rb_kernel (and that what it declines does not).
"""
import os

import pytest
import torch
import torch.nn.functional as F

import lkconv
from lkconv.params import normalize_params
from lkconv.testing import compare_all_passes

from cases import DTYPES, LAYOUTS, Case, load_emulation, make_inputs, requires_cuda_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


EMU = load_emulation()

# (N, C, H, W, KH, KW, (top, bottom, left, right)): first/last tiles (H, W > the 56 / 28 tile), K > H,
# asymmetric and larger-than-kernel padding, W not a multiple of the 7-column block, N not a multiple of the
# planes per CTA (empty planes), KW = 3 (mod 4) (padded last chunk) and 1, 2 (mod 4) (single taps),
# KH < R - 1 (no unguarded row), K = 64
FRB_EMU_CASES = {
    "k5_pad2": (1, 1, 9, 11, 5, 5, (2, 2, 2, 2)),
    "k13_asym_n3": (3, 2, 7, 20, 13, 13, (6, 7, 5, 0)),
    "k31_on_5x6": (1, 1, 5, 6, 31, 31, (15, 15, 15, 15)),
    "k29_on_30x33": (1, 1, 30, 33, 29, 29, (14, 14, 14, 14)),
    "rect_3x17_two_tiles": (2, 1, 30, 33, 3, 17, (1, 1, 8, 8)),
    "even_6x4_60x58": (1, 1, 60, 58, 6, 4, (1, 2, 2, 3)),
    "pad_gt_k": (1, 1, 4, 5, 3, 3, (4, 5, 3, 6)),
    "k9x7_12x13": (1, 1, 12, 13, 9, 7, (4, 4, 3, 3)),
    "k64_on_9x10": (1, 1, 9, 10, 64, 64, (31, 32, 30, 33)),
}


def _emu_case(N, C, H, W, KH, KW, pad, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(C, 1, KH, KW, generator=gen, dtype=torch.float64)
    b = torch.randn(C, generator=gen, dtype=torch.float64)
    t, bo, l, r = pad
    ref = F.conv2d(F.pad(x, (l, r, t, bo)), w, b, groups=C)
    return gen, x, w, b, ref


#: every case with 16-byte staging; the 8-byte and 4-byte (scalar: channels_last, odd row strides) staging on
#: the cases whose tiles start left of column 0 or end inside a vector
FRB_EMU_RUNS = [(c, cfg, 4) for c in FRB_EMU_CASES for cfg in ("56", "28")] + \
    [(c, cfg, v) for c in ("k5_pad2", "k13_asym_n3", "rect_3x17_two_tiles") for cfg in ("56", "28") for v in (2, 1)]


@pytest.mark.parametrize("case,config,vec_x", FRB_EMU_RUNS, ids=[f"{c}-{g}-v{4 * v}B" for c, g, v in FRB_EMU_RUNS])
def test_fp32_rb_emulated(case, config, vec_x):
    N, C, H, W, KH, KW, pad = FRB_EMU_CASES[case]
    gen, x, w, b, ref = _emu_case(N, C, H, W, KH, KW, pad, seed=3)
    t, bo, l, r = pad
    Ho, Wo = ref.shape[2:]
    y = EMU.emulate_fp32_rb(x, w, b, t, l, Ho, Wo, config=config, vec_x=vec_x)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    # grad_input (stride 1) as the host code runs it: the same kernel on grad_out with the flipped filter and
    # padding top' = KH-1-top, left' = KW-1-left (negative when padding > K-1), output H x W
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    gx = EMU.emulate_fp32_rb(g, w.flip(2, 3), None, KH - 1 - t, KW - 1 - l, H, W, config=config, vec_x=vec_x)
    xr = x.clone().requires_grad_(True)
    (gx_ref,) = torch.autograd.grad(F.conv2d(F.pad(xr, (l, r, t, bo)), w, None, groups=C), xr, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)


def test_fp32_rb_tile_choice():
    assert not EMU.fp32_rb_small_tile(56, 56)                  # 56 x 56 x 2 planes
    assert EMU.fp32_rb_small_tile(28, 28)                      # 28 x 28 x 4 planes
    assert not EMU.fp32_rb_small_tile(112, 112) and EMU.fp32_rb_small_tile(28, 84)
    assert EMU.fp32_rb_small_tile(14, 14) and EMU.fp32_rb_small_tile(7, 7)


@pytest.mark.parametrize("config", ["56", "28"])
def test_fp32_rb_x_loads_are_conflict_free(config):
    """frb_pitch's row / plane pitches: the 32 lanes' x loads hit 32 distinct banks."""
    for K in (3, 13, 27, 29, 31, 51, 64):
        offs = EMU.frb_lane_x_offsets(config, K, K)
        assert len({int(o) % 32 for o in offs}) == 32, (config, K)


def _layout(cfg, K, H=1 << 20):
    R, CC, LC, LR, SUB, WY = EMU.FRB_CONFIGS[cfg]
    TH = WY * LR * R
    return EMU.frb_layout(K, K, TH, LC * CC, SUB, EMU.frb_pitch(LC, LR, SUB), EMU.frb_rows_cap(LR, TH, K, H))


def test_fp32_rb_layout_fits():
    """The 28 x 28 tile (the launcher's fallback when the 56 x 56 one does not fit) fits sm80's opt-in limit
    (163 KB) for every K <= 64 at any height, so every fp32 stride-1 K <= 64 case has this kernel; the
    RepLKNet-31B sizes leave room for 2-3 CTAs per SM (228 KB): one CTA's staging overlaps the others' compute."""
    for K in (3, 13, 27, 29, 31, 51, 64):
        for cfg in ("56", "28"):
            L = _layout(cfg, K)
            assert L["xp"] >= L["xcols"] and L["ps"] >= L["xr"] * L["xp"] and L["f_off"] % 4 == 0
            assert L["xp"] % 4 == 0 and L["ps"] % 4 == 0  # 16-byte rows and planes (cp.async vectors, LDS.128)
        assert _layout("28", K)["bytes"] <= 163 * 1024, K
    assert _layout("56", 64, 64)["bytes"] <= 227 * 1024  # rows clipped to the image (56 x 56 x 4: LR = 1)
    for cfg, K, H, ctas in (("56", 31, 56, 2), ("28", 29, 28, 3), ("28", 27, 14, 3), ("28", 13, 7, 3)):
        assert ctas * (_layout(cfg, K, H)["bytes"] + 1024) <= 228 * 1024, (cfg, K)


# ------------------------------------------------------------------------------------------------
# compiled facts (nvcc, no GPU): both configurations, both archs
# ------------------------------------------------------------------------------------------------
def _static():
    from lkconv.static import compile as SC
    return SC


@pytest.mark.skipif(_static().cuda_unavailable_reason() is not None, reason="nvcc / cuobjdump not available")
@pytest.mark.parametrize("arch", [80, 90])
def test_fp32_rb_compiles_to_an_ffma_loop(arch):
    """No spills; the steady 3-chunk loop (7 output rows) is 588 FFMA, 12 LDS.32 + 21 LDS.128 and >= 90 %
    FFMA; every row count 1..7 has its own loop (no guards on the RepLKNet sizes)."""
    from lkconv.static import checks, model as SM

    kf = _static().compile_cuda(arch, sources=[os.path.join(ROOT, "csrc", "dwconv_forward_fp32.cu")])
    fs = [f for f in kf.values() if f["role"] == "fp32_rb"]
    assert {f["template"] for f in fs} == {(4, 8), (4, 2)}, [f["name"] for f in fs]
    for f in fs:
        assert checks.spill_problems(f) == [], f["name"]
        per_v = SM._frb_loops(f, 7, 7)["per_v"]
        assert sorted(per_v) == list(range(1, 8)), f["name"]
        mix = per_v[7]["mix"]
        assert mix["ffma"] == 588 and mix.get("lds") == 33 and mix.get("local", 0) == 0, mix
        assert mix["ffma"] / mix["total"] >= 0.90, mix


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------

#: shapes at the kernel's boundaries (56 x 56 and 28 x 28 tiles, several tiles, K > H, asymmetric padding,
#: W not a multiple of 7, odd N, KW mod 4 = 1 / 2 / 3, K = 64) and the RepLKNet-31B planes
FRB_GPU_CASES = {c.id: c for c in (
    Case("rb_k31_56", (3, 4, 56, 56), (31, 31), padding=15, bias=True),
    Case("rb_k29_28_odd_n", (3, 5, 28, 28), (29, 29), padding=14, bias=True),
    Case("rb_k27_14", (2, 3, 14, 14), (27, 27), padding=13, bias=True),
    Case("rb_two_tiles_60x117", (1, 3, 60, 117), (13, 13), padding=6, bias=True),
    Case("rb_k31_on_9x11", (2, 2, 9, 11), (31, 31), padding=15, bias=True),
    Case("rb_asym_pad", (2, 3, 30, 33), (7, 9), padding=(1, 5, 6, 0), bias=True),
    Case("rb_k64_same", (1, 2, 70, 66), (64, 64), padding=(31, 32, 30, 33), bias=True),
    Case("rb_rect_3x17", (2, 3, 31, 29), (3, 17), padding=(1, 8), bias=True),
    Case("rb_k6_even", (2, 3, 57, 30), (6, 6), padding="same", bias=True),
)}


def _make(case, dtype, layout, seed=0):
    c = FRB_GPU_CASES[case]
    x, w, b = make_inputs(c, dtype, "cuda", layout, bias=c.bias, seed=seed, weight_scale=True)
    return (x, w, b, *c.conv_args)


@requires_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(FRB_GPU_CASES), ids=list(FRB_GPU_CASES))
def test_fp32_rb_all_passes_vs_reference(case, dtype, layout):
    x, w, b, s, p, d = _make(case, DTYPES[dtype], layout)
    res = compare_all_passes("cuda", x, w, b, s, p, d)
    assert all(r.ok for r in res), "\n".join(map(str, res))


@requires_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(FRB_GPU_CASES), ids=list(FRB_GPU_CASES))
def test_fp32_rb_matches_generic(case, layout):
    """fp32: the register-blocked kernel (algo 0) agrees with the generic one (algo 1), forward and grad_input."""
    x, w, b, s, p, d = _make(case, torch.float32, layout)
    st, pad, dil = normalize_params(s, p, d, (w.shape[2], w.shape[3])).as_lists()
    ops = torch.ops.lkconv_cuda
    y0, y1 = ops.forward(x, w, b, st, pad, dil, 0), ops.forward(x, w, b, st, pad, dil, 1)
    assert torch.isfinite(y0).all()
    g = torch.randn_like(y0)
    gx0 = ops.grad_input(g, w, list(x.shape), st, pad, dil, 0)
    gx1 = ops.grad_input(g, w, list(x.shape), st, pad, dil, 1)
    torch.testing.assert_close(y0, y1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx0, gx1, atol=1e-4, rtol=1e-4)


def _kernel_names(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@requires_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("case,expect", [("rb_k31_56", True), ("rb_k29_28_odd_n", True), ("rb_k64_same", True)])
def test_fp32_rb_is_the_fp32_default(case, expect):
    """fp32 stride 1, dilation 1, K <= 64: forward and grad_input launch fp32_rb_kernel."""
    x, w, b, s, p, d = _make(case, torch.float32, "nchw")
    st, pad, dil = normalize_params(s, p, d, (w.shape[2], w.shape[3])).as_lists()
    ops = torch.ops.lkconv_cuda
    names = _kernel_names(lambda: ops.forward(x, w, b, st, pad, dil, 0))
    assert any("fp32_rb_kernel" in n for n in names) == expect, names
    y = ops.forward(x, w, b, st, pad, dil, 0)
    names = _kernel_names(lambda: ops.grad_input(torch.randn_like(y), w, list(x.shape), st, pad, dil, 0))
    assert any("fp32_rb_kernel" in n for n in names) == expect, names


@requires_cuda_backend
@pytest.mark.gpu
def test_fp32_rb_declines_what_it_does_not_cover():
    """Stride 2, dilation 2, K > 64 and fp16: another kernel runs (and is correct: tests/test_backend_cuda.py)."""
    ops = torch.ops.lkconv_cuda
    x = torch.randn(1, 2, 40, 40, device="cuda")
    for k, st, dil, pad in ((7, [2, 2], [1, 1], [3, 3, 3, 3]), (7, [1, 1], [2, 2], [6, 6, 6, 6]),
                            (65, [1, 1], [1, 1], [32, 32, 32, 32])):
        w = torch.randn(2, 1, k, k, device="cuda")
        names = _kernel_names(lambda: ops.forward(x, w, None, st, pad, dil, 0))
        assert not any("fp32_rb_kernel" in n for n in names), (k, st, dil, names)
    xh, wh = x.half(), torch.randn(2, 1, 7, 7, device="cuda").half()
    names = _kernel_names(lambda: ops.forward(xh, wh, None, [1, 1], [3, 3, 3, 3], [1, 1], 0))
    assert not any("fp32_rb_kernel" in n for n in names), names


@requires_cuda_backend
@pytest.mark.gpu
def test_fp32_rb_nonfinite_inputs():
    """Never a finite value where F.conv2d's is non-finite; finite outputs are right.  (The padded last chunk
    multiplies zero filter taps by in-image values, so an Inf/NaN input can make more outputs NaN than
    F.conv2d does, as documented for the fast kernels.)"""
    x = torch.randn(2, 3, 56, 56, device="cuda")
    x[0, 1, 10, 20] = float("inf")
    x[1, 2, 40, 3] = float("nan")
    w = torch.rand(3, 1, 31, 31, device="cuda") + 0.1  # positive: no inf - inf
    ops = torch.ops.lkconv_cuda
    y = ops.forward(x, w, None, [1, 1], [15, 15, 15, 15], [1, 1], 0)
    ref = F.conv2d(x.double(), w.double(), None, 1, 15, 1, 3)
    assert not (torch.isfinite(y) & ~torch.isfinite(ref)).any()
    fin = torch.isfinite(y)
    assert fin.sum() > 0.5 * fin.numel()
    torch.testing.assert_close(y[fin].double(), ref[fin], atol=1e-3, rtol=1e-4)
