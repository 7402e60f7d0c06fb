"""The ``cuda`` backend (compiled extension, csrc/).

Without a GPU: the backend reports why it is unavailable, declines CPU tensors, is not loaded by
``import lkconv``; when the extension is built (``python setup.py build_ext --inplace`` /
.ci/build_cuda.sh) its ops are registered with the expected schemas and reject CPU tensors with a
clear error.  With a GPU (``pytest tests/test_backend_cuda.py``): every pass, dtype and layout against
the fp64 reference (lkconv.testing.compare_all_passes), fast vs generic kernels, determinism, opcheck,
CUDA-graph capture, > 2^31 elements (marked slow).
"""
import os
import sys

import pytest
import torch

import lkconv
from lkconv.backends import Request
from lkconv.backends import cuda as cuda_backend
from lkconv.params import normalize_params
from lkconv.testing import compare_all_passes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCHEMAS = {
    "fwd": "lkconv_cuda::fwd(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
           "int algo=0) -> Tensor",
    "grad_input": "lkconv_cuda::grad_input(Tensor grad_out, Tensor weight, int[] input_size, int[] stride, "
                  "int[] padding, int[] dilation, int algo=0) -> Tensor",
    "grad_weight": "lkconv_cuda::grad_weight(Tensor grad_out, Tensor x, int[] weight_size, int[] stride, "
                   "int[] padding, int[] dilation) -> Tensor",
}


def _extension_loaded() -> bool:
    return cuda_backend.load_extension(jit=False) is None


def _cuda_ready():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (none visible)"
    why = lkconv.backend_status().get("cuda")
    return f"cuda backend unavailable: {why}" if why else None


_CUDA_SKIP = _cuda_ready()
requires_cuda_backend = pytest.mark.skipif(_CUDA_SKIP is not None, reason=_CUDA_SKIP or "")


# ------------------------------------------------------------------------------------------------
# CPU-runnable
# ------------------------------------------------------------------------------------------------
def test_constructing_the_backend_loads_nothing():
    be = cuda_backend.CUDABackend()  # what the registry does lazily; probing happens on first use only
    assert be._probed is False


def test_unavailable_reason_is_clear():
    why = cuda_backend.CUDABackend().unavailable_reason()
    if torch.cuda.is_available() and _extension_loaded():
        assert why is None
    else:
        assert isinstance(why, str) and why
        if not torch.cuda.is_available():
            assert "CUDA" in why


def test_missing_extension_message_says_how_to_build(monkeypatch):
    monkeypatch.setattr(cuda_backend, "ops_registered", lambda: False)
    monkeypatch.setitem(sys.modules, "lkconv._C", None)  # import lkconv._C -> ImportError
    why = cuda_backend.load_extension(jit=False)
    assert why is not None
    assert "pip install --no-build-isolation -e ." in why and "LKCONV_JIT=1" in why, why


def test_check_declines_what_it_cannot_run():
    be = cuda_backend.CUDABackend()
    p = normalize_params(1, 1, 1, (3, 3))
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3)
    assert "CUDA" in be.check(Request.of("forward", x, w, p))
    for d in (torch.float64, torch.int32):
        xm = torch.empty(1, 2, 5, 5, dtype=d, device="meta")
        wm = torch.empty(2, 1, 3, 3, dtype=d, device="meta")
        assert be.check(Request.of("forward", xm, wm, p)) is not None  # meta: not CUDA either way
    if torch.cuda.is_available():
        xd = torch.randn(1, 2, 5, 5, dtype=torch.float64, device="cuda")
        wd = torch.randn(2, 1, 3, 3, dtype=torch.float64, device="cuda")
        assert "float64" in be.check(Request.of("forward", xd, wd, p))
        xh = torch.randn(1, 2, 5, 5, dtype=torch.float16, device="cuda")
        assert be.check(Request.of("forward", xh, wd.half(), p)) is None
        assert "differs" in be.check(Request.of("forward", xh, wd.float(), p))


@pytest.mark.skipif(not _extension_loaded(), reason="lkconv._C not built (run .ci/build_cuda.sh or "
                    "`python setup.py build_ext --inplace` with a CUDA toolkit)")
def test_extension_registers_ops_with_schemas():
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.lkconv_cuda, name).default._schema) == schema


@pytest.mark.skipif(not _extension_loaded(), reason="lkconv._C not built")
def test_extension_rejects_cpu_tensors_cleanly():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3)
    g = torch.randn(1, 2, 5, 5)
    calls = [
        lambda: torch.ops.lkconv_cuda.fwd(x, w, None, [1, 1], [1, 1, 1, 1], [1, 1]),
        lambda: torch.ops.lkconv_cuda.grad_input(g, w, [1, 2, 5, 5], [1, 1], [1, 1, 1, 1], [1, 1]),
        lambda: torch.ops.lkconv_cuda.grad_weight(g, x, [2, 1, 3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
    ]
    for call in calls:
        with pytest.raises(NotImplementedError, match="CPU"):
            call()


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
# (N, C, H, W, KH, KW, stride, padding, dilation)
CASES = {
    "k1": (2, 3, 9, 10, 1, 1, 1, 0, 1),
    "k3": (2, 5, 12, 13, 3, 3, 1, 1, 1),
    "k7": (2, 4, 17, 19, 7, 7, 1, 3, 1),
    "k13": (2, 3, 20, 24, 13, 13, 1, 6, 1),
    "k31": (1, 3, 40, 70, 31, 31, 1, 15, 1),
    "k63": (1, 2, 70, 80, 63, 63, 1, 31, 1),
    "k31_valid": (1, 2, 40, 45, 31, 31, 1, 0, 1),
    "even_k8_same": (2, 3, 15, 17, 8, 8, 1, "same", 1),
    "rect_5x11": (2, 3, 16, 21, 5, 11, 1, (2, 5), 1),
    "rect_31x3": (1, 3, 40, 20, 31, 3, 1, (15, 1), 1),
    "k_gt_h_31_on_7": (2, 5, 7, 7, 31, 31, 1, 15, 1),
    "k_gt_h_13_on_5x9": (1, 3, 5, 9, 13, 13, 1, 6, 1),
    "stride2_k7": (2, 3, 17, 18, 7, 7, 2, 3, 1),
    "stride2_k13_rect": (1, 3, 20, 23, 13, 5, (2, 1), (6, 2), 1),
    "dilation2_k7": (2, 3, 20, 21, 7, 7, 1, 6, 2),
    "dilation_stride": (1, 3, 23, 22, 5, 5, 2, 4, (2, 3)),
    "asym_pad": (2, 3, 14, 15, 7, 7, 1, (1, 5, 6, 0), 1),
    "big_pad": (1, 2, 6, 6, 3, 5, 1, (4, 4, 5, 5), 1),
    "c_odd_100": (1, 100, 9, 9, 5, 5, 1, 2, 1),
    "tall_130": (1, 2, 130, 20, 9, 9, 1, 4, 1),
    "wide_150": (1, 2, 10, 150, 9, 9, 1, 4, 1),
    # the 64x64 tensor-core tile (every case above gets the 16x16 one in fp16/bf16): one CTA per
    # plane at RepLKNet's 56x56, and a 3x3 grid of CTAs per plane (blockIdx.y/z tile offsets)
    "k31_56": (2, 4, 56, 56, 31, 31, 1, 15, 1),
    "big_tile_multi": (1, 3, 150, 140, 31, 31, 1, 15, 1),
    "batch0": (0, 3, 8, 8, 5, 5, 1, 2, 1),
    "batch1": (1, 3, 8, 8, 5, 5, 1, 2, 1),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last", "sliced")


def _make(case, dtype, layout, bias=True, seed=0):
    N, C, H, W, KH, KW, s, p, d = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    if layout == "sliced":  # a non-contiguous view of a bigger buffer
        big = torch.randn(N, C + 2, H + 3, W + 5, generator=gen)
        x = big.to(dtype).cuda()[:, 1:C + 1, 2:H + 2, 3:W + 3]
        assert x.numel() == 0 or not x.is_contiguous()
    else:
        x = torch.randn(N, C, H, W, generator=gen).to(dtype).cuda()
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(C, 1, KH, KW, generator=gen) / (KH * KW) ** 0.5).to(dtype).cuda()
    b = torch.randn(C, generator=gen).to(dtype).cuda() if bias else None
    return x, w, b, s, p, d


@requires_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_all_passes_vs_reference(case, dtype, layout):
    x, w, b, s, p, d = _make(case, DTYPES[dtype], layout)
    res = compare_all_passes("cuda", x, w, b, s, p, d)
    assert all(r.ok for r in res), "\n".join(map(str, res))


@requires_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", ["k7", "k31", "k63", "even_k8_same", "asym_pad", "k_gt_h_31_on_7", "tall_130",
                                  "wide_150", "dilation2_k7", "k31_56", "big_tile_multi"])
def test_fast_kernels_match_generic(case, dtype):
    """The fast kernels (algo 0) agree with the generic ones (algo 1) within the dtype's rounding."""
    x, w, b, s, p, d = _make(case, DTYPES[dtype], "nchw")
    pr = normalize_params(s, p, d, (w.shape[2], w.shape[3]))
    st, pad, dil = pr.as_lists()
    ops = torch.ops.lkconv_cuda
    y0, y1 = ops.fwd(x, w, b, st, pad, dil, 0), ops.fwd(x, w, b, st, pad, dil, 1)
    g = torch.randn_like(y0)
    gx0 = ops.grad_input(g, w, list(x.shape), st, pad, dil, 0)
    gx1 = ops.grad_input(g, w, list(x.shape), st, pad, dil, 1)
    tol = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}[dtype]
    torch.testing.assert_close(y0.float(), y1.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(gx0.float(), gx1.float(), atol=tol, rtol=tol)


@requires_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_grad_weight_is_deterministic(dtype):
    x, w, b, s, p, d = _make("k31", DTYPES[dtype], "nchw")
    x = torch.randn(4, 3, 64, 64, device="cuda").to(DTYPES[dtype])
    g = torch.randn(4, 3, 64, 64, device="cuda").to(DTYPES[dtype])
    args = (g, x, list(w.shape), [1, 1], [15, 15, 15, 15], [1, 1])
    a, b2 = torch.ops.lkconv_cuda.grad_weight(*args), torch.ops.lkconv_cuda.grad_weight(*args)
    assert torch.equal(a, b2)


@requires_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["k7", "stride2_k7", "asym_pad"])
def test_opcheck_lkconv_ops(case):
    x, w, b, s, p, d = _make(case, torch.float32, "nchw")
    pr = normalize_params(s, p, d, (w.shape[2], w.shape[3]))
    st, pad, dil = pr.as_lists()
    xr, wr, br = x.clone().requires_grad_(True), w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.lkconv.dwconv2d.default, (xr, wr, br, st, pad, dil, "cuda"))
    out = torch.ops.lkconv.dwconv2d(x, w, b, st, pad, dil, "cuda")
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.lkconv.dwconv2d_grad_input.default, (g, w, list(x.shape), st, pad, dil, "cuda"))
    torch.library.opcheck(torch.ops.lkconv.dwconv2d_grad_weight.default, (g, x, list(w.shape), st, pad, dil, "cuda"))


@requires_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["k7", "k31", "stride2_k13_rect", "dilation_stride", "asym_pad"])
def test_double_backward(case):
    """Second order (a gradient penalty) through the CUDA kernels, fp32 (IEEE), vs PyTorch's fp64
    double backward of F.conv2d."""
    from lkconv.testing import double_backward_errors

    x, w, b, s, p, d = _make(case, torch.float32, "nchw")
    errs = double_backward_errors("cuda", x, w, b, s, p, d)
    assert max(errs.values()) < 5e-5, errs


@requires_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_nonfinite_inputs(dtype):
    """Inf/NaN inputs: never a finite number where F.conv2d gives Inf/NaN; finite outputs exact (the
    tensor-core tiles may spread NaN further than F.conv2d; documented)."""
    from lkconv.backends.reference import reference_forward
    from lkconv.testing import nonfinite_contract_violations

    x, w, b, s, p, d = _make("k31_56", DTYPES[dtype], "nchw", bias=False)
    x[0, 1, 20, 30] = float("inf")
    x[1, 2, 3, 4] = float("nan")
    y = lkconv.depthwise_conv2d(x, w, None, s, p, d, backend="cuda")
    ref = reference_forward(x.double().cpu(), w.double().cpu(), None, normalize_params(s, p, d, (31, 31)))
    assert not nonfinite_contract_violations(y, ref, DTYPES[dtype])


@requires_cuda_backend
@pytest.mark.gpu
def test_auto_picks_cuda():
    x, w, b, s, p, d = _make("k7", torch.float16, "nchw")
    pr = normalize_params(s, p, d, (7, 7))
    assert lkconv.backends.resolve_backend("auto", x, w, pr) == "cuda"


@requires_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_cuda_graph_capture(dtype):
    x, w, b, s, p, d = _make("k13", DTYPES[dtype], "nchw")
    xr = x.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)

    def step():
        y = lkconv.depthwise_conv2d(xr, wr, b, s, p, d, backend="cuda")
        gx, gw = torch.autograd.grad(y.float().square().sum(), (xr, wr))
        return y, gx, gw

    s_ = torch.cuda.Stream()
    s_.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s_):
        for _ in range(2):
            eager = step()  # warm-up (also loads the extension) outside the capture
    torch.cuda.current_stream().wait_stream(s_)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        xr.copy_(torch.randn_like(xr))
    graph.replay()
    torch.cuda.synchronize()
    again = step()
    for c, e in zip(captured, again):
        torch.testing.assert_close(c, e, atol=0, rtol=0)  # same kernels, deterministic
    assert eager[0].shape == captured[0].shape


@requires_cuda_backend
@pytest.mark.gpu
def test_bad_arguments_raise_clear_errors():
    x = torch.randn(1, 2, 8, 8, device="cuda")
    w = torch.randn(2, 1, 3, 3, device="cuda")
    with pytest.raises(RuntimeError, match="padding must have 4 values"):
        torch.ops.lkconv_cuda.fwd(x, w, None, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.lkconv_cuda.fwd(x, w[:1], None, [1, 1], [1, 1, 1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.lkconv_cuda.fwd(x.double(), w.double(), None, [1, 1], [1, 1, 1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="output size"):
        torch.ops.lkconv_cuda.fwd(x, torch.randn(2, 1, 11, 11, device="cuda"), None, [1, 1], [0, 0, 0, 0], [1, 1])


@requires_cuda_backend
@pytest.mark.gpu
@pytest.mark.slow
def test_more_than_2_31_elements():
    """int64 indexing: 2^31 + elements in one fp16 tensor (needs ~10 GB of GPU memory)."""
    N, C, H, W = 1, 2, 32768 + 8, 32768
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip(f"needs ~12 GiB free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.zeros(N, C, H, W, dtype=torch.float16, device="cuda")
    assert x.numel() > 2**31
    x[:, :, -3:, -4:] = 1.0  # only the last corner is non-zero
    w = torch.ones(C, 1, 3, 3, dtype=torch.float16, device="cuda")
    for algo in (0, 1):
        y = torch.ops.lkconv_cuda.fwd(x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], algo)
        ref = torch.nn.functional.conv2d(x[:, :, -6:, -7:].float(), w.float(), None, 1, 1, 1, C)
        torch.testing.assert_close(y[:, :, -5:, -6:].float(), ref[:, :, 1:, 1:])
        assert y[:, :, : H - 8].abs().max().item() == 0
        del y
    gw = torch.ops.lkconv_cuda.grad_weight(x, x, [C, 1, 3, 3], [1, 1], [1, 1, 1, 1], [1, 1])
    # sum over positions of x(shifted) * x: the 3x4 block of ones overlaps itself 3*4 at the centre tap
    assert gw[0, 0, 1, 1].item() == 12.0


# ------------------------------------------------------------------------------------------------
# Host emulation of the fast kernels' tiling/index math (CPU, no GPU needed).  These functions are
# line-by-line transcriptions of toeplitz_wmma_kernel and fp32_blocked_kernel in csrc/dwconv_forward.cu
# (same tile constants, staging, skip conditions, Toeplitz blocks, sliding window), run on tiny
# shapes and compared with F.conv2d -- they check the index math, not the CUDA code generation.
# ------------------------------------------------------------------------------------------------
FB_H, FB_W, FB_STRIP = 32, 64, 8


def _ceil_div(a, b):
    return -(-a // b)


def _toeplitz_small_tile(Ho, Wo):  # transcription of toeplitz_small_tile()
    big = _ceil_div(Ho, 64) * 64 * _ceil_div(Wo, 64) * 64
    small = _ceil_div(Ho, 16) * 16 * _ceil_div(Wo, 16) * 16
    return 2 * small <= big


def emulate_toeplitz(x, w, bias, pt, pl, Ho, Wo, config=None):
    """config: (TC_WARPS, TC_NB); None = what the launcher picks"""
    if config is None:
        config = (1, 1) if _toeplitz_small_tile(Ho, Wo) else (4, 4)
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
            for by in range(_ceil_div(Wo, TC_BN)):
                for bz in range(_ceil_div(Ho, TC_BM)):
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
            for by in range(_ceil_div(Wo, FB_W)):
                for bz in range(_ceil_div(Ho, FB_H)):
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


# (C, H, W, KH, KW, (top, bottom, left, right)): tile edges, K > H, asymmetric and large padding
EMU_CASES = {
    "k5_pad2": (1, 9, 11, 5, 5, (2, 2, 2, 2)),
    "k13_asym": (1, 7, 20, 13, 13, (6, 7, 5, 0)),
    "k31_on_5x6": (1, 5, 6, 31, 31, (15, 15, 15, 15)),
    "rect_3x17_tall": (1, 70, 18, 3, 17, (1, 1, 8, 8)),
    "even_4x6_wide": (1, 6, 70, 4, 6, (1, 2, 2, 3)),
    "pad_gt_k": (1, 4, 5, 3, 3, (4, 5, 3, 6)),
}


EMU_KERNELS = {
    "toeplitz_64x64": lambda *a: emulate_toeplitz(*a, config=(4, 4)),
    "toeplitz_16x16": lambda *a: emulate_toeplitz(*a, config=(1, 1)),
    "toeplitz_auto": emulate_toeplitz,
    "fp32_blocked": emulate_fp32_blocked,
}


def test_toeplitz_tile_choice():
    assert _toeplitz_small_tile(7, 7) and _toeplitz_small_tile(14, 14) and _toeplitz_small_tile(28, 28)
    assert not _toeplitz_small_tile(56, 56) and not _toeplitz_small_tile(64, 100)


@pytest.mark.parametrize("kernel", list(EMU_KERNELS))
@pytest.mark.parametrize("case", list(EMU_CASES), ids=list(EMU_CASES))
def test_fast_kernel_index_math_emulated(kernel, case):
    C, H, W, KH, KW, pad = EMU_CASES[case]
    emulate = EMU_KERNELS[kernel]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, C, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(C, 1, KH, KW, generator=gen, dtype=torch.float64)
    b = torch.randn(C, generator=gen, dtype=torch.float64)
    t, bo, l, r = pad
    F = torch.nn.functional
    ref = F.conv2d(F.pad(x, (l, r, t, bo)), w, b, groups=C)
    Ho, Wo = ref.shape[2:]
    y = emulate(x, w, b, t, l, Ho, Wo)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    # grad_input (stride 1) as the host code computes it: the same kernel with the flipped filter,
    # padding top' = KH-1-top, left' = KW-1-left (negative when padding > K-1), output H x W
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    gx = emulate(g, w.flip(2, 3), None, KH - 1 - t, KW - 1 - l, H, W)
    xr = x.clone().requires_grad_(True)
    (gx_ref,) = torch.autograd.grad(F.conv2d(F.pad(xr, (l, r, t, bo)), w, None, groups=C), xr, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)


def _wgrad_splits(N, Ho, Wo, C):  # transcription of wgrad_splits() in csrc/dwconv_grad_weight.cu
    R = N * Ho * Wo
    s = _ceil_div(R, 2048)
    s = min(s, _ceil_div(2048, max(C, 1)), 1024, 65535)
    return max(s, 1)


def emulate_wgrad(x, g, KH, KW, stride, pt, pl, dil, splits=None, threads=256):
    """Transcription of wgrad_partial_kernel + wgrad_reduce_kernel (split/lane decomposition and the
    incremental position walk)."""
    N, C, H, W = x.shape
    Ho, Wo = g.shape[2:]
    sh, sw = stride
    dh, dw = dil
    taps, R = KH * KW, N * Ho * Wo
    splits = splits or _wgrad_splits(N, Ho, Wo, C)
    partial = torch.full((splits, C, taps), float("nan"), dtype=torch.float64)
    chunk = _ceil_div(R, splits)
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
                            ih, iw = oh * sh - pt + kh * dh, ow * sw - pl + kw * dw
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


# (N, C, H, W, KH, KW, stride, (top, bottom, left, right), dilation, splits, threads)
WGRAD_EMU = {
    "k3_lanes": (2, 1, 5, 3, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 3, 64),       # L > Wo: multi-row steps
    "k5_stride2_dil": (1, 2, 9, 8, 3, 2, (2, 1), (2, 0, 1, 3), (2, 2), 2, 4),   # taps > threads: several bases
    "k7_one_split": (2, 1, 6, 7, 7, 7, (1, 1), (3, 3, 3, 3), (1, 1), None, 64),
}


@pytest.mark.parametrize("case", list(WGRAD_EMU), ids=list(WGRAD_EMU))
def test_wgrad_decomposition_emulated(case):
    N, C, H, W, KH, KW, st, pad, dil, splits, threads = WGRAD_EMU[case]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(C, 1, KH, KW, generator=gen, dtype=torch.float64, requires_grad=True)
    t, bo, l, r = pad
    F = torch.nn.functional
    out = F.conv2d(F.pad(x, (l, r, t, bo)), w, None, st, 0, dil, groups=C)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (gw_ref,) = torch.autograd.grad(out, w, g)
    gw = emulate_wgrad(x, g, KH, KW, st, t, l, dil, splits, threads)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-10)
