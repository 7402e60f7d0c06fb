"""The ``triton`` backend: every pass of the real Triton kernels against the fp64 reference.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set
below before the kernels are imported) at tiny shapes that still cover partial tiles, K > H, even,
rectangular and large kernels, stride 2, dilation, asymmetric padding, channels_last, slices, bias
and fp32/fp16/bf16.  With a GPU the same file runs the compiled kernels on CUDA tensors (the CPU
interpreter cases then skip; run ``TRITON_INTERPRET=1 pytest tests/test_backend_triton.py`` for them).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    # must happen before the kernels are decorated (triton reads it at @triton.jit time)
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

import lkconv  # noqa: E402
from lkconv.backends import Request, UnsupportedError, get_backend  # noqa: E402
from lkconv.params import normalize_params  # noqa: E402
from lkconv.testing import compare_all_passes  # noqa: E402

from cases import TRITON_CPU_CASES, TRITON_CUDA_CASES, make_inputs  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

CPU_CASES = TRITON_CPU_CASES  # tests/cases.py (tiny shapes for the interpreter)
CUDA_CASES = TRITON_CUDA_CASES  # realistic shapes for the GPU


def run_case(c, dtype, device):
    x, w, b = make_inputs(c, dtype, device)
    results = compare_all_passes("triton", x, w, b, *c.conv_args)
    assert len(results) >= 3
    assert all(r.ok for r in results), "\n".join(str(r) for r in results)


_skip_no_interp = pytest.mark.skipif(
    not INTERPRET,
    reason="CPU cases run the Triton interpreter (no GPU visible, or TRITON_INTERPRET=1); a GPU is present",
)
_skip_no_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRET,
    reason="needs a CUDA GPU (and compiled, not interpreted, Triton kernels)",
)


def needs_interpreter(f):
    return pytest.mark.triton_interp(_skip_no_interp(f))


def needs_cuda_kernels(f):
    return pytest.mark.gpu(_skip_no_cuda(f))


# the tile geometry is dtype-independent: every case runs in fp32, a spread of them in fp16/bf16 too
# (keeps the interpreter's CI time down)
CPU_16BIT = [
    "k3-bias", "k13-same", "k31-gt-H", "k31-partial", "k63", "even-rect-6x8-same", "rect-31x5",
    "pad-gt-kernel", "stride2-partial", "stride2-dil2", "channels_last-stride2", "noncontig-slice", "batch0",
    "packed-7x7-k13", "packed-5x6-k31-cl",
]
CPU_PARAMS = [(c, "fp32") for c in CPU_CASES] + [(c, d) for d in ("fp16", "bf16") for c in CPU_16BIT]


@needs_interpreter
@pytest.mark.parametrize("case,dtype", CPU_PARAMS, ids=[f"{c}-{d}" for c, d in CPU_PARAMS])
def test_cpu_interpreter_all_passes(case, dtype):
    run_case(CPU_CASES[case], DTYPES[dtype], "cpu")


@needs_interpreter
def test_new_tf32_api_does_not_break_fp32_calls():
    """Setting TF32 through PyTorch's new fp32_precision API makes the legacy allow_tf32 getter raise;
    the backend must not read it (found by review: every fp32 call failed)."""
    conv = torch.backends.cudnn.conv
    old, old_rnn = conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision
    legacy = torch.backends.cudnn.allow_tf32  # readable now; the new API's setter makes it raise
    try:
        for prec in ("ieee", "tf32"):
            conv.fp32_precision = prec
            y = lkconv.depthwise_conv2d(torch.randn(1, 2, 8, 8), torch.randn(2, 1, 3, 3), padding=1, backend="triton")
            assert y.shape == (1, 2, 8, 8)
    finally:
        conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision = old, old_rnn
        torch.backends.cudnn.allow_tf32 = legacy  # back on the legacy API for the tests after this one


@needs_interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: the Inf * 0 itself
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cpu_interpreter_nonfinite_inputs(dtype):
    """Inf/NaN inputs: never a finite number where F.conv2d gives Inf/NaN; finite outputs exact.
    (The GEMM tiles may spread NaN further than F.conv2d: documented in docs/triton_backend.md.)"""
    from lkconv.backends.reference import reference_forward
    from lkconv.testing import nonfinite_contract_violations

    dt = DTYPES[dtype]
    x = torch.randn(1, 2, 12, 40)
    x[0, 0, 5, 20] = float("inf")
    x[0, 1, 2, 3] = float("nan")
    w = torch.randn(2, 1, 3, 5)
    p = normalize_params(1, (1, 2), 1, (3, 5))
    y = lkconv.depthwise_conv2d(x.to(dt), w.to(dt), padding=(1, 2), backend="triton")
    ref = reference_forward(x.double(), w.to(dt).double(), None, p)
    assert not nonfinite_contract_violations(y, ref, dt)
    # the checker itself: hiding the Inf/NaN, or a wrong finite value, is reported
    assert nonfinite_contract_violations(torch.nan_to_num(y), ref, dt)
    wrong = y.clone()
    wrong[0, 1, 11, 0] += 1
    assert nonfinite_contract_violations(wrong, ref, dt)


@needs_interpreter
def test_cpu_interpreter_double_backward():
    """Second order (gradient penalty) through the Triton kernels vs PyTorch's fp64 double backward."""
    from lkconv.testing import double_backward_errors

    torch.manual_seed(0)
    x, w, b = torch.randn(1, 2, 9, 10), torch.randn(2, 1, 5, 3), torch.randn(2)
    errs = double_backward_errors("triton", x, w, b, stride=2, padding=(2, 1), dilation=(1, 2))
    assert max(errs.values()) < 5e-5, errs


@pytest.fixture
def one_config(monkeypatch):
    """Correctness runs on the GPU launch one default tile config per kernel (autotuning every case
    would compile every config of every variant); test_cuda_autotuned covers the autotuner."""
    from lkconv.backends.triton import ops as tops

    monkeypatch.setattr(tops, "AUTOTUNE", False)


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CUDA_CASES))
def test_cuda_all_passes(case, dtype, one_config):
    run_case(CUDA_CASES[case], DTYPES[dtype], "cuda")


@needs_cuda_kernels
@pytest.mark.parametrize("case", ["k31-partial", "stride2-dil2", "channels_last-k31", "noncontig-slice"])
def test_cuda_small_cases(case, one_config):
    # the interpreter's edge cases, compiled
    for dtype in DTYPES.values():
        run_case(CPU_CASES[case], dtype, "cuda")


@needs_cuda_kernels
def test_cuda_double_backward(one_config):
    """Second order (gradient penalty) through the compiled kernels, fp32 IEEE, vs fp64 PyTorch."""
    from lkconv.testing import double_backward_errors

    torch.manual_seed(0)
    x, w, b = torch.randn(2, 8, 30, 33).cuda(), torch.randn(8, 1, 13, 9).cuda(), torch.randn(8).cuda()
    for kw in (dict(padding="same"), dict(stride=2, padding=(6, 4), dilation=(1, 2))):
        errs = double_backward_errors("triton", x, w, b, **kw)
        assert max(errs.values()) < 5e-5, (kw, errs)


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", ["c32-56-k31", "c32-56-k31-cl", "c32-56-k31-slice", "c32-56-k7-s2", "c256-7-k13"])
def test_cuda_strided_kernels(case, dtype, one_config, monkeypatch):
    """The strided (v1) kernels, ALIGNED = False (the aligned ones are the default that
    test_cuda_all_passes runs): both paths against the fp64 reference on the same cases."""
    from lkconv.backends.triton import ops as tops

    monkeypatch.setattr(tops, "ALIGNED", False)
    run_case(CUDA_CASES[case], DTYPES[dtype], "cuda")


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cuda_aligned_vs_strided_agree(dtype, one_config, monkeypatch):
    """Aligned (fast) and strided (generic) kernels on one layer: each pass of the two within the
    tolerance rule of each other's distance to the reference (both checked against it above), and
    grad_weight bitwise reproducible on the aligned path."""
    from lkconv.backends.triton import ops as tops

    torch.manual_seed(0)
    dt = DTYPES[dtype]
    x = torch.randn(2, 32, 56, 56, device="cuda", dtype=dt)
    w = torch.randn(32, 1, 31, 31, device="cuda", dtype=dt)
    p = normalize_params(1, 15, 1, (31, 31))
    be = get_backend("triton")
    outs = {}
    for aligned in (True, False):
        monkeypatch.setattr(tops, "ALIGNED", aligned)
        y = be.forward(x, w, None, p)
        outs[aligned] = (y, be.grad_input(y, w, x.shape, p), be.grad_weight(y, x, w.shape, p))
    for a, b in zip(outs[True], outs[False]):
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 0.05 * scale, dtype
    monkeypatch.setattr(tops, "ALIGNED", True)
    assert torch.equal(be.grad_weight(outs[True][0], x, w.shape, p), outs[True][2])


@needs_cuda_kernels
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "strided"])
@pytest.mark.parametrize("case", ["c32-56-k31", "c256-7-k13", "c32-56-k7-s2"])
def test_cuda_fp32_tf32_path(case, aligned, one_config, monkeypatch):
    """fp32 with TF32 allowed (PyTorch's default; compare_all_passes runs with TF32 off, i.e. the
    IEEE path): every pass against the fp64 reference under the fp16 rule (TF32 keeps a 10-bit
    mantissa like fp16, and accumulates in fp32), with PyTorch's fp16 result as the dtype term."""
    from lkconv.backends.triton import ops as tops
    from lkconv.testing import _torch_d_all_passes, reference_all_passes, tf32, tolerance

    monkeypatch.setattr(tops, "ALIGNED", aligned)
    c = CUDA_CASES[case]
    x, w, b = make_inputs(c, torch.float32, "cuda")
    p = normalize_params(c.get("stride", 1), c.get("padding", 0), c.get("dilation", 1), c["k"])
    be = get_backend("triton")
    HO, WO = p.out_size(x.shape[2], x.shape[3], *c["k"])
    g = torch.randn(x.shape[0], x.shape[1], HO, WO, device="cuda")
    refs = reference_all_passes(x, w, b, p, g)[:3]
    t16 = _torch_d_all_passes(x.half(), w.half(), None if b is None else b.half(), p, g.half())
    with tf32(True):
        assert tops._precision(torch.float32) == "tf32"
        ours = (be.forward(x, w, b, p), be.grad_input(g, w, x.shape, p), be.grad_weight(g, x, w.shape, p))
    for name, o, r, d in zip(("forward", "grad_input", "grad_weight"), ours, refs, t16):
        err = (o.double().cpu() - r).abs().max().item()
        assert err <= tolerance(r, d, torch.float16), (name, err)


@needs_cuda_kernels
@pytest.mark.parametrize("case", ["c32-56-k31", "c256-7-k13"])
def test_cuda_autotuned(case):
    run_case(CUDA_CASES[case], torch.float16, "cuda")


# the GPU autotunes over other tile shapes: run a few of them through the interpreter as well
OTHER_TILES = {
    "bm32-bn16-bk32": (dict(BM=32, BN=16, BK=32), 32, "k31-partial", "fp16"),
    "bm16-bn32-bk16": (dict(BM=16, BN=32, BK=16), 16, "stride2-partial", "fp32"),
    "bm32-bn32-bk64": (dict(BM=32, BN=32, BK=64), 64, "dil-2x3-same", "bf16"),
    "bm16-bn16-bk32-cl": (dict(BM=16, BN=16, BK=32), 32, "channels_last-stride2", "fp32"),
}


@needs_interpreter
@pytest.mark.parametrize("name", list(OTHER_TILES))
def test_cpu_interpreter_other_tile_configs(name, monkeypatch):
    from lkconv.backends.triton import ops as tops

    conv, grad_weight_bk, case, dtype = OTHER_TILES[name]
    monkeypatch.setattr(tops, "ALIGNED", False)  # these are the strided (v1) kernels' tiles
    monkeypatch.setattr(tops, "_INTERP_CONV", conv)
    monkeypatch.setattr(tops, "_INTERP_GRAD_WEIGHT_BK", grad_weight_bk)
    run_case(CPU_CASES[case], DTYPES[dtype], "cpu")


# the strided (v1) kernels, ALIGNED = False: a spread of geometries and all three dtypes
V1_CASES = [
    ("k31-partial", "fp16"), ("stride2-partial", "fp32"), ("channels_last-k31", "fp32"),
    ("dil-2x3-same", "bf16"), ("pad-gt-kernel", "fp32"), ("noncontig-slice", "fp16"),
]


@needs_interpreter
@pytest.mark.parametrize("case,dtype", V1_CASES, ids=[f"{c}-{d}" for c, d in V1_CASES])
def test_cpu_interpreter_strided_kernels(case, dtype, monkeypatch):
    from lkconv.backends.triton import ops as tops

    monkeypatch.setattr(tops, "ALIGNED", False)
    run_case(CPU_CASES[case], DTYPES[dtype], "cpu")


# every GPU autotune config of the aligned kernels, run by the interpreter (small shapes; a config's
# tiles may exceed the plane: the masks must still hold)
def _aligned_conv_ids():
    from lkconv.backends.triton import ops as tops

    return [f"BM{bm}-BK{bk}-KHB{khb}" for bm, bk, khb, _, _ in tops._ALIGNED_CONV_CONFIGS]


def _aligned_grad_weight_ids():
    from lkconv.backends.triton import ops as tops

    return [f"BKC{bkc}-R{r}" for bkc, r, _, _ in tops._ALIGNED_GRAD_WEIGHT_CONFIGS]


@needs_interpreter
@pytest.mark.parametrize("idx", range(5), ids=lambda i: f"conv{i}")
def test_cpu_interpreter_aligned_autotune_configs(idx, monkeypatch):
    """Each (forward / grad_input, grad_weight) autotune config of the aligned kernels, against the
    fp64 reference: conv config idx, and grad_weight config idx (mod their count)."""
    from lkconv.backends.triton import ops as tops

    assert len(tops._ALIGNED_CONV_CONFIGS) == 5, "update the parametrisation: every config must run here"
    bm, bk, khb, _, _ = tops._ALIGNED_CONV_CONFIGS[idx]
    bkc, r, _, _ = tops._ALIGNED_GRAD_WEIGHT_CONFIGS[idx % len(tops._ALIGNED_GRAD_WEIGHT_CONFIGS)]
    assert r <= tops._GRAD_WEIGHT_RS and tops._GRAD_WEIGHT_RS % r == 0
    monkeypatch.setattr(tops, "_INTERP_ALIGNED_CONV", dict(BM=bm, BK=bk, KHB=khb))
    monkeypatch.setattr(tops, "_INTERP_ALIGNED_GRAD_WEIGHT", dict(BKC=bkc, R=r))
    monkeypatch.setattr(tops, "DIAG_MAX_W", 0)  # grad_weight: the Toeplitz aligned kernel (wide planes' path)
    monkeypatch.setattr(tops, "BATCHROWS", False)  # small planes would run the batch-as-rows kernel
    case = ["k31-partial", "stride2-partial", "dil-2x3-same", "even-rect-6x8-same", "channels_last-k31"][idx]
    dtype = ["fp16", "fp32", "bf16", "fp32", "fp16"][idx]
    run_case(CPU_CASES[case], DTYPES[dtype], "cpu")


@needs_interpreter
@pytest.mark.parametrize("idx", range(5), ids=lambda i: f"conv{i}")
def test_cpu_interpreter_aligned_autotune_configs_packed(idx, monkeypatch):
    """Each forward / grad_input config of the aligned kernel on packed small planes (BM // 7 planes
    per tile, a partial last group)."""
    from lkconv.backends.triton import ops as tops

    bm, bk, khb, _, _ = tops._ALIGNED_CONV_CONFIGS[idx]
    monkeypatch.setattr(tops, "_INTERP_ALIGNED_CONV", dict(BM=bm, BK=bk, KHB=khb))
    monkeypatch.setattr(tops, "BATCHROWS", False)  # 7x7/K13 would run the batch-as-rows kernel
    assert tops._packed(3, 7, bm)
    run_case(CPU_CASES["packed-7x7-k13"], DTYPES[["fp32", "fp16", "bf16", "fp32", "fp16"][idx]], "cpu")


def test_packing_decision():
    from lkconv.backends.triton import ops as tops

    assert tops._packed(2, 7, 16) and tops._packed(64, 28, 128) and tops._packed(64, 32, 64)
    assert not tops._packed(1, 7, 64)  # one image: nothing to pack
    assert not tops._packed(64, 56, 128)  # large planes: tiles of one plane
    assert not tops._packed(8, 9, 16)  # two planes do not fit the tile
    # the non-autotuned defaults are configs of the list (so the interpreter runs them) and a packed
    # default holds at least two planes
    for ho in (1, 5, 7, 8, 9, 14, 16, 17, 28, 32, 33, 56, 200):
        for packed in (False, True) if ho <= tops.PACK_MAX_ROWS else (False,):
            cfg = tops._default_aligned_conv(ho, packed)
            assert cfg in tops._ALIGNED_CONV_CONFIGS, (ho, packed, cfg)
            assert not packed or cfg[0] >= 2 * ho, (ho, cfg)


def test_aligned_input_copy_layout():
    """The aligned copy: LBORD = pl mod 16 zero columns, the input, zeros up to WP (a multiple of 16);
    PL16 = pl - LBORD a multiple of 16 (negative pl included: grad_input's signed offsets)."""
    from lkconv.backends.triton import ops as tops

    x = torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last)
    for pl in (0, 3, 15, 16, 31, -1, -17):
        xp, pl16, lbord, wp = tops._aligned_input(x, pl)
        assert xp.is_contiguous() and xp.shape == (2, 3, 5, wp)
        assert wp % 16 == 0 and pl16 % 16 == 0 and 0 <= lbord < 16 and pl16 + lbord == pl
        assert wp - 7 <= 30
        assert torch.equal(xp[..., lbord:lbord + 7], x)
        assert not xp[..., :lbord].any() and not xp[..., lbord + 7:].any()


@pytest.mark.parametrize("sw,dw,flip", [(1, 1, False), (2, 1, False), (1, 3, True), (3, 2, False)])
def test_toeplitz_band_matches_definition(sw, dw, flip):
    """band[c, kh, r, n] = f[c, kh, (r - n*sw)/dw] where integral and in range, else exactly 0 (an Inf
    in the filter does not leak into the zeros)."""
    from lkconv.backends.triton import ops as tops

    w = torch.randn(2, 1, 3, 5)
    w[1, 0, 2, 4] = float("inf")
    band, lb = tops._toeplitz_band(w, flip, sw, dw)
    f = w.flip(2, 3) if flip else w
    assert band.shape == (2, 3, lb, 16) and lb % 16 == 0 and lb >= 15 * sw + 4 * dw + 1
    for r in range(lb):
        for n in range(16):
            d = r - n * sw
            if d >= 0 and d % dw == 0 and d // dw < 5:
                assert torch.equal(band[:, :, r, n], f[:, 0, :, d // dw])
            else:
                assert not band[:, :, r, n].any()


@needs_interpreter
@pytest.mark.parametrize("case", ["k7-partial-tiles", "channels_last-stride2"])
def test_cpu_interpreter_int64_offsets(case, monkeypatch):
    """The BIG (int64 in-plane offsets) variant of every kernel, forced on at a small shape."""
    from lkconv.backends.triton import ops as tops

    monkeypatch.setattr(tops, "_big", lambda *ts: True)
    run_case(CPU_CASES[case], torch.float16, "cpu")


def test_poison_mode_fills_new_outputs_with_nan(monkeypatch):
    """LKCONV_POISON_OUTPUTS=1: the buffers the GPU backends hand to their kernels start as NaN
    (off: plain torch.empty)."""
    from lkconv.backends.base import new_output, poison_outputs

    ref = torch.zeros(1, 2, 3, 3).contiguous(memory_format=torch.channels_last)
    monkeypatch.delenv("LKCONV_POISON_OUTPUTS", raising=False)
    assert not poison_outputs()
    monkeypatch.setenv("LKCONV_POISON_OUTPUTS", "1")
    assert poison_outputs()
    t = new_output((1, 2, 4, 4), ref, torch.float16, torch.channels_last)
    assert t.dtype == torch.float16 and t.is_contiguous(memory_format=torch.channels_last)
    assert bool(torch.isnan(t).all())


@needs_interpreter
@pytest.mark.parametrize("case", ["k7-partial-tiles", "stride2-partial", "k31-partial"])
def test_cpu_interpreter_poisoned_outputs(case, monkeypatch):
    """With poisoned (NaN-filled) output buffers every pass still matches the reference: the kernels
    write every element of forward, grad_input and the grad_weight workspace (partial tiles,
    stride 2 and K > tile included)."""
    monkeypatch.setenv("LKCONV_POISON_OUTPUTS", "1")
    run_case(CPU_CASES[case], torch.float32, "cpu")


def test_int64_switch_threshold():
    """BIG turns on exactly when an in-plane offset (plus a tile of slack) can reach 2**31."""
    from lkconv.backends.triton import ops as tops

    small = torch.empty(1, 1, 8, 8, device="meta")
    assert not tops._big(small)
    huge = torch.empty(1, 1, 2**16, 2**15 + 8, device="meta")  # (H-1)*W > 2**31
    assert tops._big(huge)


@needs_interpreter
@pytest.mark.parametrize("case", ["channels_last", "channels_last-stride2"])
def test_cpu_interpreter_channels_last_copy_strategy(case, monkeypatch):
    """The alternative channels_last strategy (one explicit NCHW copy of the input) is exact too."""
    from lkconv.backends.triton import ops as tops

    monkeypatch.setattr(tops, "ALIGNED", False)  # the aligned kernels always read their own copy
    monkeypatch.setattr(tops, "CHANNELS_LAST_INPUT", "copy")
    run_case(CPU_CASES[case], torch.float16, "cpu")


@needs_interpreter
def test_cpu_interpreter_opcheck_channels_last():
    """torch.library.opcheck (schema, fake kernel strides vs real, autograd registration) with the
    triton backend on all three ops."""
    x = torch.randn(1, 3, 6, 7).to(memory_format=torch.channels_last)
    w = torch.randn(3, 1, 3, 4)
    b = torch.randn(3)
    s, pad, d = [1, 1], [1, 2, 1, 2], [1, 1]
    torch.library.opcheck(
        torch.ops.lkconv.dwconv2d.default,
        (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), s, pad, d, "triton"),
    )
    out = torch.ops.lkconv.dwconv2d(x.detach(), w.detach(), b.detach(), s, pad, d, "triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.lkconv.dwconv2d_grad_input.default, (g, w.detach(), list(x.shape), s, pad, d, "triton"))
    torch.library.opcheck(torch.ops.lkconv.dwconv2d_grad_weight.default, (g, x.detach(), list(w.shape), s, pad, d, "triton"))


@needs_interpreter
def test_cpu_interpreter_compile_fullgraph():
    """backend="triton" traces under torch.compile(fullgraph=True) (check() is plain Python) and the
    compiled forward + backward match the reference."""
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64).float().requires_grad_(True)
    w = torch.randn(2, 1, 5, 5).requires_grad_(True)

    def f(x, w):
        return lkconv.depthwise_conv2d(x, w, padding=2, backend="triton")

    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    ref = lkconv.depthwise_conv2d(x.double(), w.double(), padding=2, backend="reference")
    rgx, rgw = torch.autograd.grad(ref.sum(), (x, w))
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gx, rgx, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gw, rgw, atol=1e-4, rtol=1e-5)


def _device():
    return "cuda" if (torch.cuda.is_available() and not INTERPRET) else "cpu"


@pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(), reason="no way to run Triton kernels here")
def test_grad_weight_is_deterministic():
    dev = _device()
    x = torch.randn(2, 2, 17, 9, device=dev, dtype=torch.float16)
    g = torch.randn(2, 2, 17, 9, device=dev, dtype=torch.float16)
    p = normalize_params(1, "same", 1, (13, 13))
    be = get_backend("triton")
    a = be.grad_weight(g, x, (2, 1, 13, 13), p)
    b = be.grad_weight(g, x, (2, 1, 13, 13), p)
    assert a.dtype == torch.float16 and a.shape == (2, 1, 13, 13)
    assert torch.equal(a, b)


@pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(), reason="no way to run Triton kernels here")
def test_float64_is_declined():
    dev = _device()
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64, device=dev)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64, device=dev)
    p = normalize_params(1, 1, 1, (3, 3))
    why = get_backend("triton").check(Request.of("forward", x, w, p))
    assert why is not None and "float64" in why
    with pytest.raises(UnsupportedError, match="float64"):
        lkconv.depthwise_conv2d(x, w, padding=1, backend="triton")


@needs_cuda_kernels
def test_cuda_output_formats_and_tf32_switch():
    from lkconv.backends.triton import ops as tops

    x = torch.randn(2, 8, 20, 20, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    w = torch.randn(8, 1, 7, 7, device="cuda", dtype=torch.float16)
    p = normalize_params(1, 3, 1, (7, 7))
    be = get_backend("triton")
    y = be.forward(x, w, None, p)
    assert y.is_contiguous(memory_format=torch.channels_last)
    gx = be.grad_input(y, w, x.shape, p)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    old = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert tops._precision(torch.float32) == "tf32"
        torch.backends.cudnn.allow_tf32 = False
        assert tops._precision(torch.float32) == "ieee"
    finally:
        torch.backends.cudnn.allow_tf32 = old


def test_interpreter_selftest_explains_a_broken_interpreter(monkeypatch):
    """Triton 3.6's interpreter + numpy >= 2.4 fails every kernel with "only 0-dimensional arrays can
    be converted to Python scalars"; the probe must turn that into an availability reason with the fix,
    not let each call die with an InterpreterError.  Simulated here by a jit that raises that error."""
    import lkconv.backends.triton as tb

    if INTERPRET:
        assert tb._interpreter_selftest() is None  # this environment's interpreter works

    class _Broken:
        def __init__(self, fn):
            pass

        def __getitem__(self, grid):
            def run(*a, **k):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return run

    monkeypatch.setattr(triton, "jit", _Broken)
    reason = tb._interpreter_selftest()
    assert reason is not None and "TRITON_INTERPRET=1" in reason, reason
    assert "numpy<2.4" in reason and triton.__version__ in reason, reason


def test_cpu_without_interpreter_is_a_clear_error():
    """In a fresh process without TRITON_INTERPRET: a CPU tensor with backend="triton" raises an
    lkconv error that says how to run it, and importing the backend does not load the kernels."""
    code = textwrap.dedent(
        """
        import sys, torch, lkconv
        from lkconv.backends import BackendError
        import lkconv.backends.triton as tb
        x = torch.randn(1, 2, 8, 8); w = torch.randn(2, 1, 3, 3)
        try:
            lkconv.depthwise_conv2d(x, w, padding=1, backend="triton")
        except BackendError as e:
            print("ERR", type(e).__name__, e)
        else:
            print("NO ERROR")
        print("KERNELS_LOADED", "lkconv.backends.triton.kernels" in sys.modules)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # same answer on a GPU box: CPU tensors need the interpreter
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ERR " in out.stdout, out.stdout
    assert "TRITON_INTERPRET=1" in out.stdout and "CUDA" in out.stdout, out.stdout
    assert "KERNELS_LOADED False" in out.stdout, out.stdout


def test_backend_is_registered_and_reports_status():
    status = lkconv.backend_status()
    assert "triton" in status
    if INTERPRET or torch.cuda.is_available():
        assert status["triton"] is None, status["triton"]
    else:
        assert "CUDA" in status["triton"]


_COMPILE_CHECK = textwrap.dedent(
    """
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lkconv.backends.triton import kernels as K
    assert not K.INTERPRETED

    def compile_(fn, dt, consts, arch, warps=4, ones=False):
        consts = dict(consts)
        if ones:  # Triton turns int arguments equal to 1 into constants: the most constexpr-heavy variant
            consts.update({n: 1 for n in fn.arg_names if n not in consts and not n.endswith("_ptr")})
        sig = {}
        for n in fn.arg_names:
            if n in consts:
                sig[n] = "constexpr"
            elif n.endswith("_ptr"):
                sig[n] = "*fp32" if n == "ws_ptr" else "*" + dt
            else:
                sig[n] = "i32"
        ck = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=warps, num_stages=3))
        return ck.asm["ptx"]

    def geo(k, s, d, big=False, prec=None):  # k: the BKH/BKW block only (KH, KW are runtime ints)
        return dict(SH=s, SW=s, DH=d, DW=d, BIG=big, PREC=prec, UPCAST=False)

    conv = dict(PLANE_FAST=False, BM=64, BN=16, BK=32)
    for arch in (90, 80):
        ptx = compile_(K.dwconv_forward_kernel, "fp16", dict(geo(31, 1, 1), HAS_BIAS=True, **conv), arch)
        assert "mma" in ptx, "fp16 forward does not use tensor cores"
        ptx = compile_(K.dwconv_grad_weight_kernel, "bf16", dict(geo(31, 1, 1), BKH=32, BKW=32, BK=64), arch)
        assert "mma" in ptx, "bf16 grad_weight does not use tensor cores"
    compile_(K.dwconv_forward_kernel, "fp32", dict(geo(13, 1, 1, prec="tf32"), HAS_BIAS=False, **conv), 90)
    compile_(K.dwconv_grad_input_kernel, "bf16", dict(geo(7, 2, 2, big=True), PLANE_FAST=True, BM=64, BN=16, BK=32), 90)
    compile_(K.dwconv_grad_weight_kernel, "fp32", dict(geo(63, 2, 3, big=True, prec="ieee"), BKH=64, BKW=64, BK=32), 90, warps=8)
    compile_(K.dwconv_forward_kernel, "fp16", dict(geo(3, 2, 3), HAS_BIAS=False, PLANE_FAST=True, BM=16, BN=16, BK=16), 90, ones=True)
    compile_(K.dwconv_grad_input_kernel, "fp16", dict(geo(1, 1, 1), PLANE_FAST=False, BM=16, BN=16, BK=16), 90, ones=True)
    compile_(K.dwconv_grad_weight_kernel, "fp16", dict(geo(3, 2, 3), BKH=16, BKW=16, BK=16), 90, ones=True)
    # the GPU launchers: autotuners build without a GPU; tiles far larger than the plane are pruned
    from lkconv.backends.triton import ops as O
    assert not O.INTERPRETED
    cfgs = O._conv_configs()
    small = O._prune_conv("HO", "WO")(cfgs, {"HO": 7, "WO": 7})
    assert [(c.kwargs["BM"], c.kwargs["BN"]) for c in small] == [(16, 16)], small
    big = O._prune_conv("HO", "WO")(cfgs, {"HO": 56, "WO": 56})
    assert len(big) >= 3 and all(c.kwargs["BM"] <= 64 for c in big), big
    print("COMPILED")
    """
)


def _nvidia_backend_present():
    try:
        import triton.backends.nvidia as nv
    except Exception:
        return False
    return os.path.exists(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas"))


@pytest.mark.skipif(not _nvidia_backend_present(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_sm90_and_sm80_without_a_gpu():
    """The interpreter does not type-check like the compiler: compile the real kernels (GPU code
    generation down to cubin, no GPU needed) for representative and constant-specialised variants,
    and check the 16-bit passes use tensor-core MMA instructions."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "COMPILED" in out.stdout, (out.stdout + out.stderr)[-3000:]


_ALIGNED_SASS_CHECK = textwrap.dedent(
    r"""
    import os, re, subprocess, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lkconv.backends.triton import kernels as K
    BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

    def compile_rt(fn, vals, consts, arch, warps, stages):
        # Triton's runtime specialisation: ints equal to 1 become constants, ints and pointers that
        # are multiples of 16 get tt.divisibility=16
        sig, cx, attrs = {}, dict(consts), {}
        for i, n in enumerate(fn.arg_names):
            if n in cx:
                sig[n] = "constexpr"
                continue
            v = vals[n]
            if isinstance(v, str):
                sig[n] = "*" + v
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif v == 1:
                sig[n] = "constexpr"
                cx[n] = 1
            else:
                sig[n] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        ck = triton.compile(ASTSource(fn, sig, cx, attrs), target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=warps, num_stages=stages))
        path = os.path.join(sys.argv[1], f"{fn.__name__}_{arch}.cubin")
        open(path, "wb").write(ck.asm["cubin"])
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        return sass, res

    # the RepLKNet 56x56, K = 31 layer (N=64, C=128), bf16, the default (non-autotuned) tiles
    C, H = 128, 56
    fwd = dict(xp_ptr="bf16", t_ptr="bf16", b_ptr="bf16", y_ptr="bf16", N=64, C=C, H=H, W=H, WP=80, HO=H, WO=H,
               sxp=H * 80, syn=C * H * H, syc=H * H, syh=H, syw=1, PT=15, PL16=0, LBORD=15, KH=31, LB=48)
    gw = dict(xp_ptr="bf16", g_ptr="bf16", ws_ptr="fp32", C=C, H=H, WP=80, HO=H, WO=H, SGROUPS=64 * 14,
              SG_PER_SPLIT=100, sxp=H * 80, sgn=C * H * H, sgc=H * H, sgh=H, sgw=1, PT=15, PL16=0, KH=31, KW=31)
    for arch in (90, 80):
        sass, res = compile_rt(K.dwconv_forward_aligned_kernel, fwd, dict(
            SH=1, SW=1, DH=1, HAS_BIAS=False, BIG=False, PACKED=False, PREC=None, UPCAST=False, BM=64, BN=16, BK=16,
            KHB=8), arch, 4, 3)
        assert "LOCAL:0" in res, res
        assert re.search(r"LDGSTS\.E\.(BYPASS\.)?(LTC128B\.)?128", sass), "forward: no 16-byte cp.async"
        assert "LDG.E.U16" not in sass, "forward: a scalar 2-byte global load is left"
        assert ("HGMMA.64x16x16" if arch == 90 else "HMMA.16816") in sass, arch
        sass, res = compile_rt(K.dwconv_grad_weight_aligned_kernel, gw, dict(
            SH=1, SW=1, DH=1, DW=1, BIG=False, PREC=None, UPCAST=False, BKH=32, NA=2, RS=4, BKC=32, R=2), arch, 4, 3)
        assert "LOCAL:0" in res, res
        assert re.search(r"LDGSTS\.E\.(BYPASS\.)?(LTC128B\.)?128", sass), "grad_weight: no 16-byte cp.async of x"
        assert ("HGMMA.64x16x16" if arch == 90 else "HMMA.16816") in sass, arch
    # packed small planes (7x7, K = 13, C = 1024): 9 planes per 64-row tile
    fwd7 = dict(fwd, C=1024, H=7, W=7, WP=16, HO=7, WO=7, sxp=7 * 16, syn=1024 * 49, syc=49, syh=7, PT=6,
                LBORD=6, KH=13, LB=32)
    sass, res = compile_rt(K.dwconv_forward_aligned_kernel, fwd7, dict(
        SH=1, SW=1, DH=1, HAS_BIAS=False, BIG=False, PACKED=True, PREC=None, UPCAST=False, BM=64, BN=16, BK=16,
        KHB=8), 90, 4, 3)
    assert "LOCAL:0" in res, res
    assert re.search(r"LDGSTS\.E\.(BYPASS\.)?128", sass) and "LDG.E.U16" not in sass, "packed forward loads"
    assert "HGMMA.64x16x16" in sass
    print("SASS OK")
    """
)


@pytest.mark.skipif(not _nvidia_backend_present(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_aligned_kernels_sass_vector_loads_and_mma(tmp_path):
    """The aligned kernels, compiled for sm_90 and sm_80 with the runtime's specialisation (no GPU):
    16-byte cp.async loads of the input and band (no scalar 2-byte loads left in the forward),
    wgmma on sm_90 (grad_weight with GEMM-M = 64 included), mma.sync on sm_80, no spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _ALIGNED_SASS_CHECK, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "SASS OK" in out.stdout, (out.stdout + out.stderr)[-3000:]
