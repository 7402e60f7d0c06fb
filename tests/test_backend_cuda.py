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
from lkconv.testing import compare_all_passes, tolerance

from cases import CUDA_CASES, DTYPES, LAYOUTS, load_emulation, make_inputs, requires_cuda_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCHEMAS = {
    "forward": "lkconv_cuda::forward(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
           "int algo=0) -> Tensor",
    "grad_input": "lkconv_cuda::grad_input(Tensor grad_out, Tensor weight, int[] input_size, int[] stride, "
                  "int[] padding, int[] dilation, int algo=0) -> Tensor",
    "grad_weight": "lkconv_cuda::grad_weight(Tensor grad_out, Tensor x, int[] weight_size, int[] stride, "
                   "int[] padding, int[] dilation, int algo=0) -> Tensor",
}


def _extension_loaded() -> bool:
    return cuda_backend.load_extension(jit=False) is None




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


def test_limits_header_matches_python():
    """csrc/dwconv_limits.h is the one home of the kernels' size limits; lkconv.backends.cuda.CUDA_LIMITS
    (which check() uses) mirrors it.  Every constant of the header must be in the mirror, equal."""
    import re

    text = open(os.path.join(ROOT, "csrc", "dwconv_limits.h")).read()
    header = {m.group(1): int(m.group(2)) for m in re.finditer(r"constexpr int64_t (\w+) = (\d+);", text)}
    assert len(header) >= 5, header
    assert header == cuda_backend.CUDA_LIMITS
    # no bare copy of a limit left in the sources that the header serves
    for name in ("dwconv_ops.cpp", "dwconv_forward.cu", "dwconv_grad_weight.cu"):
        src = open(os.path.join(ROOT, "csrc", name)).read()
        for bare in ("65535", "2147483647", "1 << 30", "1 << 20"):
            assert bare not in src, (name, bare)


def test_cmake_reads_the_build_env():
    """CMakeLists.txt takes its sources, nvcc flags and arch list from csrc/build_env.py (the list
    setup.py builds, PTX included), instead of a copy of its own."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lkconv_build_env", os.path.join(ROOT, "csrc", "build_env.py"))
    env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(env)
    assert env.cmake_architectures("8.0;9.0+PTX") == "80-real;90"  # 90: sm_90 machine code + PTX
    assert env.cmake_architectures("8.6") == "86-real"
    cmake = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    for expr in ("e.DEFAULT_ARCH_LIST", "e.SOURCES", "e.nvcc_flags()", "e.cmake_architectures()"):
        assert expr in cmake, expr
    for name in env.SOURCES:
        assert name not in cmake, f"{name} listed in CMakeLists.txt again"
    assert "--expt-relaxed-constexpr" not in cmake


@pytest.mark.skipif(not _extension_loaded() or not torch.cuda.is_available(),
                    reason="needs lkconv._C and a CUDA GPU")
def test_output_format_rule_agrees_with_cpp():
    """csrc/dwconv_ops.cpp's format_of is the C++ copy of backends.base.output_memory_format: the
    extension's outputs come in the format the Python rule names, for every kind of layout
    (NCHW, channels_last, both at once (C == 1 or 1x1 planes), and a strided view)."""
    from lkconv.backends.base import output_memory_format

    for shape, cl in (((2, 3, 8, 8), False), ((2, 3, 8, 8), True), ((2, 1, 8, 8), True), ((2, 3, 1, 1), True)):
        x = torch.randn(*shape, device="cuda")
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        cases = [x, x[:, :, ::2] if shape[2] > 1 else x]
        for t in cases:
            C = t.shape[1]
            w = torch.randn(C, 1, 1, 1, device="cuda")
            y = torch.ops.lkconv_cuda.forward(t, w, None, [1, 1], [0, 0, 0, 0], [1, 1])
            assert y.is_contiguous(memory_format=output_memory_format(t)), (shape, cl, t.stride())
            gx = torch.ops.lkconv_cuda.grad_input(y, w, list(t.shape), [1, 1], [0, 0, 0, 0], [1, 1])
            assert gx.is_contiguous(memory_format=output_memory_format(y))


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
        lambda: torch.ops.lkconv_cuda.forward(x, w, None, [1, 1], [1, 1, 1, 1], [1, 1]),
        lambda: torch.ops.lkconv_cuda.grad_input(g, w, [1, 2, 5, 5], [1, 1], [1, 1, 1, 1], [1, 1]),
        lambda: torch.ops.lkconv_cuda.grad_weight(g, x, [2, 1, 3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
    ]
    for call in calls:
        with pytest.raises(NotImplementedError, match="CPU"):
            call()


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
CASES = CUDA_CASES  # tests/cases.py


def _make(case, dtype, layout, bias=True, seed=0):
    c = CASES[case]
    x, w, b = make_inputs(c, dtype, "cuda", layout, bias=bias, seed=seed, weight_scale=True)
    return (x, w, b, *c.conv_args)


def gpu_case_matrix(cases):
    """A GPU test over every case x dtype x layout (the cuda backend must be built)."""
    def wrap(f):
        for mark in (pytest.mark.parametrize("case", list(cases), ids=list(cases)),
                     pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES)),
                     pytest.mark.parametrize("layout", LAYOUTS), pytest.mark.gpu, requires_cuda_backend):
            f = mark(f)
        return f
    return wrap


@gpu_case_matrix(CASES)
def test_all_passes_vs_reference(case, dtype, layout):
    x, w, b, s, p, d = _make(case, DTYPES[dtype], layout)
    res = compare_all_passes("cuda", x, w, b, s, p, d)
    assert all(r.ok for r in res), "\n".join(map(str, res))


@requires_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", ["k7", "k31", "k63", "even_k8_same", "asym_pad", "k_gt_h_31_on_7", "tall_130",
                                  "wide_150", "dilation2_k7", "k31_56", "big_tile_multi", "k29_28", "k27_14", "k13_7",
                                  "slak_5x51", "slak_51x5_56", "k71_wmma"])
def test_fast_kernels_match_generic(case, dtype):
    """The fast kernels (algo 0) agree with the generic ones (algo 1) within the dtype's rounding."""
    x, w, b, s, p, d = _make(case, DTYPES[dtype], "nchw")
    pr = normalize_params(s, p, d, (w.shape[2], w.shape[3]))
    st, pad, dil = pr.as_lists()
    ops = torch.ops.lkconv_cuda
    y0, y1 = ops.forward(x, w, b, st, pad, dil, 0), ops.forward(x, w, b, st, pad, dil, 1)
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
    tensor-core tiles may spread NaN further than F.conv2d; documented).  fp32 with TF32 off: the IEEE kernels
    (test_toeplitz_tf32.py covers the TF32 ones)."""
    from lkconv.backends.reference import reference_forward
    from lkconv.testing import no_tf32, nonfinite_contract_violations

    x, w, b, s, p, d = _make("k31_56", DTYPES[dtype], "nchw", bias=False)
    x[0, 1, 20, 30] = float("inf")
    x[1, 2, 3, 4] = float("nan")
    with no_tf32():
        y = lkconv.depthwise_conv2d(x, w, None, s, p, d, backend="cuda")
    ref = reference_forward(x.double().cpu(), w.double().cpu(), None, normalize_params(s, p, d, (31, 31)))
    assert not nonfinite_contract_violations(y, ref, DTYPES[dtype])


@requires_cuda_backend
@pytest.mark.gpu
def test_auto_picks_cuda():
    """auto follows the routing table on a GPU: the 56x56/K31 fp16 layer runs every pass on cuda
    (modelled fastest); a 7x7 kernel has no model, so PyTorch."""
    x, w, b, s, p, d = _make("k31_56", torch.float16, "nchw")
    pr = normalize_params(s, p, d, (31, 31))
    assert lkconv.backends.resolve_backend("auto", x, w, pr) == "cuda"
    x, w, b, s, p, d = _make("k7", torch.float16, "nchw")
    assert lkconv.backends.resolve_backend("auto", x, w, normalize_params(s, p, d, (7, 7))) == "torch"


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
        torch.ops.lkconv_cuda.forward(x, w, None, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.lkconv_cuda.forward(x, w[:1], None, [1, 1], [1, 1, 1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.lkconv_cuda.forward(x.double(), w.double(), None, [1, 1], [1, 1, 1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="output size"):
        torch.ops.lkconv_cuda.forward(x, torch.randn(2, 1, 11, 11, device="cuda"), None, [1, 1], [0, 0, 0, 0], [1, 1])


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
        y = torch.ops.lkconv_cuda.forward(x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], algo)
        ref = torch.nn.functional.conv2d(x[:, :, -6:, -7:].float(), w.float(), None, 1, 1, 1, C)
        torch.testing.assert_close(y[:, :, -5:, -6:].float(), ref[:, :, 1:, 1:])
        assert y[:, :, : H - 8].abs().max().item() == 0
        del y
    gw = torch.ops.lkconv_cuda.grad_weight(x, x, [C, 1, 3, 3], [1, 1], [1, 1, 1, 1], [1, 1])
    # sum over positions of x(shifted) * x: the 3x4 block of ones overlaps itself 3*4 at the centre tap
    assert gw[0, 0, 1, 1].item() == 12.0


# ------------------------------------------------------------------------------------------------
# Host emulation of the fast kernels' index math: csrc/kernel_emulation.py (next to the kernels it
# transcribes), run on tiny shapes against F.conv2d
# ------------------------------------------------------------------------------------------------
EMU = load_emulation()


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
    "toeplitz_64x64": lambda *a: EMU.emulate_toeplitz(*a, config=(4, 4)),
    "toeplitz_16x16": lambda *a: EMU.emulate_toeplitz(*a, config=(1, 1)),
    "toeplitz_auto": EMU.emulate_toeplitz,
    "fp32_blocked": EMU.emulate_fp32_blocked,
    # the raw ldmatrix + mma.sync kernel (image-rows tiling): configs (NB, DG) with a staging vector width
    # (16 B, 4 B, scalar) and rows per CTA (more cases with N > 1: tests/test_toeplitz_mma.py)
    "toeplitz_mma_nb4_dg3_v8": lambda *a: EMU.emulate_toeplitz_mma(*a, config=(4, 3), vec_x=8),
    "toeplitz_mma_nb2_dg2_v2_bm2": lambda *a: EMU.emulate_toeplitz_mma(*a, config=(2, 2), vec_x=2, bm=2),
    "toeplitz_mma_auto": EMU.emulate_toeplitz_mma,
}


def test_toeplitz_tile_choice():
    assert EMU.toeplitz_small_tile(7, 7) and EMU.toeplitz_small_tile(14, 14) and EMU.toeplitz_small_tile(28, 28)
    assert not EMU.toeplitz_small_tile(56, 56) and not EMU.toeplitz_small_tile(64, 100)


def _emu_case(C, H, W, KH, KW, pad, seed):
    """fp64 inputs of an emulation case and the F.conv2d forward they must reproduce."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, C, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(C, 1, KH, KW, generator=gen, dtype=torch.float64)
    b = torch.randn(C, generator=gen, dtype=torch.float64)
    t, bo, l, r = pad
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (l, r, t, bo)), w, b, groups=C)
    return gen, x, w, b, ref, pad


@pytest.mark.parametrize("kernel", list(EMU_KERNELS))
@pytest.mark.parametrize("case", list(EMU_CASES), ids=list(EMU_CASES))
def test_fast_kernel_index_math_emulated(kernel, case):
    C, H, W, KH, KW, pad = EMU_CASES[case]
    emulate = EMU_KERNELS[kernel]
    gen, x, w, b, ref, (t, bo, l, r) = _emu_case(C, H, W, KH, KW, pad, seed=1)
    Ho, Wo = ref.shape[2:]
    F = torch.nn.functional
    y = emulate(x, w, b, t, l, Ho, Wo)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    # grad_input (stride 1) as the host code computes it: the same kernel with the flipped filter,
    # padding top' = KH-1-top, left' = KW-1-left (negative when padding > K-1), output H x W
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    gx = emulate(g, w.flip(2, 3), None, KH - 1 - t, KW - 1 - l, H, W)
    xr = x.clone().requires_grad_(True)
    (gx_ref,) = torch.autograd.grad(F.conv2d(F.pad(xr, (l, r, t, bo)), w, None, groups=C), xr, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)


# (N, C, H, W, KH, KW, stride, (top, bottom, left, right), dilation, splits, threads)
GRAD_WEIGHT_EMU = {
    "k3_lanes": (2, 1, 5, 3, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 3, 64),       # L > Wo: multi-row steps
    "k5_stride2_dil": (1, 2, 9, 8, 3, 2, (2, 1), (2, 0, 1, 3), (2, 2), 2, 4),   # taps > threads: several bases
    "k7_one_split": (2, 1, 6, 7, 7, 7, (1, 1), (3, 3, 3, 3), (1, 1), None, 64),
}


@pytest.mark.parametrize("case", list(GRAD_WEIGHT_EMU), ids=list(GRAD_WEIGHT_EMU))
def test_grad_weight_decomposition_emulated(case):
    N, C, H, W, KH, KW, st, pad, dil, splits, threads = GRAD_WEIGHT_EMU[case]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(C, 1, KH, KW, generator=gen, dtype=torch.float64, requires_grad=True)
    t, bo, l, r = pad
    F = torch.nn.functional
    out = F.conv2d(F.pad(x, (l, r, t, bo)), w, None, st, 0, dil, groups=C)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (gw_ref,) = torch.autograd.grad(out, w, g)
    gw = EMU.emulate_grad_weight(x, g, KH, KW, st, t, l, dil, splits, threads)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-10)


# grad_weight fast path (grad_weight_tc_kernel / grad_weight_ffma_kernel), host emulation:
# (N, C, H, W, KH, KW, (top, bottom, left, right), vec_x, vec_g, splits)
GRAD_WEIGHT_FAST_EMU = {
    "k5_two_images": (2, 1, 9, 11, 5, 5, (2, 2, 2, 2), 1, 1, None),          # batches stop at the image edge
    "k5_splits_mid_image": (2, 1, 9, 11, 5, 5, (2, 2, 2, 2), 2, 2, 3),        # split boundaries inside an image
    "k13_asym": (1, 1, 7, 20, 13, 13, (6, 7, 5, 0), 4, 4, None),
    "k31_on_5x6": (1, 1, 5, 6, 31, 31, (15, 15, 15, 15), 2, 2, None),        # K > H, K > W
    "wide_70_two_windows": (1, 1, 4, 70, 3, 17, (1, 1, 8, 8), 4, 8, None),   # W > 64: two column windows, tails
    "tall_40_batches": (2, 2, 40, 9, 3, 3, (1, 1, 1, 1), 1, 1, 5),           # > 16 rows: several batches per split
    "k40_four_tap_groups": (1, 1, 6, 7, 40, 40, (20, 19, 20, 19), 1, 2, None),
    "rect_5x40_two_groups": (1, 1, 6, 9, 5, 40, (2, 2, 20, 19), 2, 4, None),
    "rect_40x5_two_groups": (1, 1, 6, 9, 40, 5, (20, 19, 2, 2), 2, 2, None),
    "pad_gt_k": (1, 1, 4, 5, 3, 3, (4, 5, 3, 6), 1, 1, None),
    "k64_valid": (1, 1, 64, 66, 64, 64, (0, 0, 0, 0), 2, 2, None),            # the largest kernel of the path
}


@pytest.mark.parametrize("tc", [True, False], ids=["tc", "ffma"])
@pytest.mark.parametrize("case", list(GRAD_WEIGHT_FAST_EMU), ids=list(GRAD_WEIGHT_FAST_EMU))
def test_grad_weight_fast_emulated(case, tc):
    N, C, H, W, KH, KW, pad, vec_x, vec_g, splits = GRAD_WEIGHT_FAST_EMU[case]
    if not tc:  # fp32: 16-byte vectors are 4 elements
        vec_x, vec_g = min(vec_x, 4), min(vec_g, 4)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(C, 1, KH, KW, generator=gen, dtype=torch.float64, requires_grad=True)
    t, bo, l, r = pad
    F = torch.nn.functional
    out = F.conv2d(F.pad(x, (l, r, t, bo)), w, None, groups=C)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (gw_ref,) = torch.autograd.grad(out, w, g)
    gw = EMU.emulate_grad_weight_fast(x, g, KH, KW, t, l, tc, vec_x, vec_g, splits)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-10)


def test_grad_weight_fast_layout_fits_default_smem():
    # every kernel size of the fast path stays within the 48 KB a launch gets without an opt-in
    for tc, esz in ((True, 2), (False, 4)):
        for k in (1, 13, 31, 32, 33, 64):
            lay = EMU.gwt_layout(k, k, esz, tc)
            assert lay["bytes"] <= 48 * 1024, (tc, k, lay)
            assert lay["ge_off"] >= lay["xr"] * lay["xp"] and lay["gp"] >= 64 + 32 * -(-k // 32) + 8
            if tc:  # ldmatrix rows on distinct 16-B bank groups; Go 16 banks away from Ge
                assert (lay["xp"] * esz // 16) % 2 == 1
                assert ((lay["go_off"] - lay["ge_off"]) * esz // 4) % 32 == 16


# GPU: the fast grad_weight kernels against the generic one (algo 1) and the reference.  Widths chosen for
# the staging vector widths: W=56 (16-B rows), 28 (8-B fp16/bf16, 16-B fp32), 14 (4-B / 8-B), 7 (scalar);
# "sliced" shifts the base pointer (scalar or narrower vectors), channels_last is always scalar.
GRAD_WEIGHT_FAST_CASES = {
    "k31_56": (2, 3, 56, 56, 31, 31, 15),
    "k29_28": (2, 4, 28, 28, 29, 29, 14),
    "k27_14": (3, 4, 14, 14, 27, 27, 13),
    "k13_7": (4, 5, 7, 7, 13, 13, 6),
    "k5_wide_150": (1, 2, 10, 150, 5, 5, 2),
    "k64_even": (1, 2, 70, 72, 64, 64, 32),
    "k40x7": (2, 2, 30, 33, 40, 7, (20, 3)),
}


@gpu_case_matrix(GRAD_WEIGHT_FAST_CASES)
def test_grad_weight_fast_vs_generic_and_reference(case, dtype, layout):
    from lkconv.backends.reference import reference_grad_weight

    N, C, H, W, KH, KW, p = GRAD_WEIGHT_FAST_CASES[case]
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(4)
    if layout == "sliced":
        x = torch.randn(N, C + 1, H + 1, W + 3, generator=gen).to(dt).cuda()[:, 1:, 1:, 1:W + 1]
    else:
        x = torch.randn(N, C, H, W, generator=gen).to(dt).cuda()
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    pr = normalize_params(1, p, 1, (KH, KW))
    st, pad, dil = pr.as_lists()
    Ho, Wo = H + pad[0] + pad[1] - KH + 1, W + pad[2] + pad[3] - KW + 1
    g = torch.randn(N, C, Ho, Wo, generator=gen).to(dt).cuda()
    if layout == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)
    ops = torch.ops.lkconv_cuda
    fast = ops.grad_weight(g, x, [C, 1, KH, KW], st, pad, dil, 0)
    generic = ops.grad_weight(g, x, [C, 1, KH, KW], st, pad, dil, 1)
    ref = reference_grad_weight(g.double(), x.double(), (C, 1, KH, KW), pr)
    # the project's tolerance rule: the dtype's floor plus twice PyTorch's own error in this dtype
    w0 = torch.zeros(C, 1, KH, KW, dtype=dt, device="cuda", requires_grad=True)
    F = torch.nn.functional
    out = F.conv2d(F.pad(x, (pad[2], pad[3], pad[0], pad[1])), w0, None, groups=C)
    (torch_d,) = torch.autograd.grad(out, w0, g)
    tol = tolerance(ref, torch_d, dt)
    assert fast.dtype == dt and fast.shape == (C, 1, KH, KW)
    torch.testing.assert_close(fast.double(), ref, atol=tol, rtol=0)
    torch.testing.assert_close(fast.double(), generic.double(), atol=tol, rtol=0)
    again = ops.grad_weight(g, x, [C, 1, KH, KW], st, pad, dil, 0)
    assert torch.equal(fast, again)  # deterministic


@requires_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_grad_weight_fast_poisoned_workspace(dtype, monkeypatch):
    # with NaN-filled outputs and workspace, every partial must be written by the fast kernel
    monkeypatch.setenv("LKCONV_POISON_OUTPUTS", "1")
    dt = DTYPES[dtype]
    x = torch.randn(3, 5, 20, 21, device="cuda").to(dt)
    g = torch.randn(3, 5, 20, 21, device="cuda").to(dt)
    gw = torch.ops.lkconv_cuda.grad_weight(g, x, [5, 1, 33, 9], [1, 1], [16, 16, 4, 4], [1, 1], 0)
    assert torch.isfinite(gw).all()


@requires_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_grad_weight_fast_nonfinite_inputs(dtype):
    """The staged grad_weight multiplies the zero-filled grad_out border by in-image x values, so an Inf/NaN
    can turn more taps NaN than F.conv2d; never a finite tap where the reference is non-finite."""
    from lkconv.backends.reference import reference_grad_weight
    from lkconv.testing import nonfinite_contract_violations

    dt = DTYPES[dtype]
    x = torch.randn(2, 3, 28, 28, device="cuda").to(dt)
    g = torch.randn(2, 3, 28, 28, device="cuda").to(dt)
    x[0, 1, 5, 7] = float("inf")
    g[1, 2, 20, 3] = float("nan")
    pr = normalize_params(1, 14, 1, (29, 29))
    gw = torch.ops.lkconv_cuda.grad_weight(g, x, [3, 1, 29, 29], *pr.as_lists(), 0)
    ref = reference_grad_weight(g.double().cpu(), x.double().cpu(), (3, 1, 29, 29), pr)
    assert not nonfinite_contract_violations(gw, ref, dt)


# toeplitz_mma_kernel for 32 < K <= 64 (several Toeplitz-offset groups; more than 48 KB of shared memory: opt-in):
# (C, H, W, KH, KW, (top, bottom, left, right), (NB, DG), vec_x)
TOEPLITZ_MMA_LARGE_K = {
    "k5x51_nb2_dg3_v2": (1, 6, 20, 5, 51, (2, 2, 25, 25), (2, 3), 2),
    "k5x51_nb4_dg2_v8": (1, 6, 20, 5, 51, (2, 2, 25, 25), (4, 2), 8),
    "k40x36_nb2_dg2": (1, 5, 9, 40, 36, (20, 19, 18, 17), (2, 2), 1),
    "k64_on_4x5": (1, 4, 5, 64, 64, (32, 31, 32, 31), (2, 3), 1),
}


@pytest.mark.parametrize("case", list(TOEPLITZ_MMA_LARGE_K), ids=list(TOEPLITZ_MMA_LARGE_K))
def test_toeplitz_mma_large_kernels_emulated(case):
    C, H, W, KH, KW, pad, config, vec_x = TOEPLITZ_MMA_LARGE_K[case]
    gen, x, w, b, ref, (t, bo, l, r) = _emu_case(C, H, W, KH, KW, pad, seed=5)
    Ho, Wo = ref.shape[2:]
    F = torch.nn.functional
    y = EMU.emulate_toeplitz_mma(x, w, b, t, l, Ho, Wo, config, vec_x)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    gx = EMU.emulate_toeplitz_mma(g, w.flip(2, 3), None, KH - 1 - t, KW - 1 - l, H, W, config, vec_x)
    xr = x.clone().requires_grad_(True)
    (gx_ref,) = torch.autograd.grad(F.conv2d(F.pad(xr, (l, r, t, bo)), w, None, groups=C), xr, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)
