"""The Triton batch-as-rows kernel for small planes (lkconv/backends/triton/batchrows.py): forward and
grad_input (transposed operator) against the fp64 reference.

Without a GPU the kernel runs on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set
before triton is imported) at tiny shapes; every case also checks that the batch-as-rows kernel really
ran (a spy on the launcher).  With a GPU the ``gpu`` cases run the compiled kernel.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

import lkconv  # noqa: E402
from lkconv.params import normalize_params  # noqa: E402
from lkconv.testing import compare_all_passes  # noqa: E402

from cases import DTYPES, Case, make_inputs  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU cases run the Triton interpreter (a GPU is present)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                               reason="needs a CUDA GPU (and compiled, not interpreted, Triton kernels)")


def _ops():
    from lkconv.backends.triton import ops

    return ops


@pytest.fixture
def spy(monkeypatch):
    """Counts the batch-as-rows launches per pass (trans=False: forward, True: grad_input)."""
    ops = _ops()
    calls = {False: 0, True: 0, "grad_weight": 0}
    real, real_gw = ops._batchrows, ops._batchrows_grad_weight

    def counted(*a, **k):
        calls[k["trans"]] += 1
        return real(*a, **k)

    def counted_gw(*a, **k):
        calls["grad_weight"] += 1
        return real_gw(*a, **k)

    monkeypatch.setattr(ops, "_batchrows", counted)
    monkeypatch.setattr(ops, "_batchrows_grad_weight", counted_gw)
    return calls


# tiny shapes for the interpreter (BM = BN = 16 there): every boundary of the formulation
CASES = {c.id: c for c in [
    Case("br-7x7-k13", (3, 2, 7, 7), (13, 13), padding=6, bias=True),            # HW = 49 (odd), K > H
    Case("br-14x14-k27", (2, 1, 14, 14), (27, 27), padding=13),                  # KP = 256, GEMM-N 224
    Case("br-2mtiles", (20, 1, 6, 5), (5, 5), padding=2),                        # N > BM: two M tiles
    Case("br-n1", (1, 3, 7, 7), (13, 13), padding=6),                            # N = 1
    Case("br-k-gt-h-rect", (2, 2, 5, 6), (9, 11), padding=(4, 5), bias=True),    # K > H, rectangular
    Case("br-asym-pad", (2, 2, 6, 7), (7, 7), padding=(1, 3, 2, 0)),             # asymmetric padding
    Case("br-pad-gt-half", (2, 1, 5, 5), (11, 11), padding=6),                   # output plane 7x7 > input
    Case("br-stride2", (3, 2, 9, 8), (9, 9), stride=2, padding=4),               # stride 2, HW = 72
    Case("br-stride-2x1", (2, 1, 8, 8), (9, 9), stride=(2, 1), padding=(4, 4)),
    Case("br-dil2", (2, 2, 7, 7), (7, 7), dilation=2, padding=6),                # dilation 2
    Case("br-stride2-dil2", (2, 1, 9, 9), (9, 9), stride=2, dilation=2, padding=8),
    Case("br-cl", (3, 2, 7, 7), (13, 13), padding=6, layout="channels_last", bias=True),
    Case("br-sliced", (2, 2, 7, 6), (13, 11), padding=(6, 5), layout="sliced"),
]}
# fp32 runs with IEEE products under the interpreter, which the rule takes only up to GEMM-K 64; the
# bigger fp32 cases run as "fp32-tf32" (input_precision "tf32" forced: the TF32 code path, bf16 hi/lo
# one-hot products in grad_weight)
def _fp32_id(c: Case) -> str:
    N, C, H, W = c.shape
    p = normalize_params(c.stride, c.padding, c.dilation, c.k)
    HO, WO = p.out_size(H, W, *c.k)
    ops = _ops()
    small = ops._batchrows_kp(H * W) <= 64 and ops._batchrows_kp(HO * WO) <= 64
    small = small and ops._batchrows_gw_geometry(H, W, WO, *c.k)[0] * ops._batchrows_gw_geometry(H, W, WO, *c.k)[1] <= 64
    return "fp32" if small else "fp32-tf32"


PARAMS = [(c, _fp32_id(CASES[c])) for c in CASES] + [(c, d) for d in ("fp16", "bf16") for c in CASES]


def _expect_batchrows(c: Case, dtype=torch.float16, prec="auto"):
    """Whether forward / grad_input / grad_weight of case c satisfy the applicability rules (the tests
    assert they ran).  ``prec``: the fp32 input precision the passes will run with (default: what
    ops._precision says now)."""
    ops = _ops()
    esz = torch.empty((), dtype=dtype).element_size()
    prec = ops._precision(dtype) if prec == "auto" else prec
    N, C, H, W = c.shape
    KH, KW = c.k
    p = normalize_params(c.stride, c.padding, c.dilation, c.k)
    HO, WO = p.out_size(H, W, KH, KW)
    return (ops.batchrows_applicable(H, W, HO, WO, KH, KW, esz, prec=prec),
            ops.batchrows_applicable(HO, WO, H, W, KH, KW, esz, prec=prec),
            ops.batchrows_grad_weight_applicable(H, W, HO, WO, KH, KW, esz, prec))


@needs_interpreter
@pytest.mark.parametrize("case,dtype", PARAMS, ids=[f"{c}-{d}" for c, d in PARAMS])
def test_cpu_interpreter_batchrows_all_passes(case, dtype, spy, monkeypatch):
    c = CASES[case]
    ops = _ops()
    if dtype == "fp32-tf32":
        monkeypatch.setattr(ops, "_precision", lambda dt: "tf32" if dt == torch.float32 else None)
    dt = DTYPES[dtype[:4]]
    fwd, gi, gw = _expect_batchrows(c, dt)
    assert fwd and gi and gw, "every case here is meant for the batch-as-rows kernels"
    if dtype == "fp32-tf32":
        _check_tf32_rule(c, "cpu")
    else:
        x, w, b = make_inputs(c, dt, "cpu")
        results = compare_all_passes("triton", x, w, b, *c.conv_args)
        assert len(results) >= 3
        assert all(r.ok for r in results), "\n".join(str(r) for r in results)
    assert spy[False] >= 1 and spy[True] >= 1 and spy["grad_weight"] >= 1, spy


def _check_tf32_rule(c: Case, device: str):
    """fp32 with TF32 products: every pass against the fp64 reference under the fp16 rule (TF32 keeps
    a 10-bit mantissa like fp16 and accumulates in fp32), PyTorch's fp16 result as the dtype term."""
    from lkconv.backends import get_backend
    from lkconv.testing import _torch_d_all_passes, reference_all_passes, tolerance

    x, w, b = make_inputs(c, torch.float32, device, weight_scale=True)
    p = normalize_params(c.stride, c.padding, c.dilation, c.k)
    be = get_backend("triton")
    HO, WO = p.out_size(x.shape[2], x.shape[3], *c.k)
    g = torch.randn(x.shape[0], x.shape[1], HO, WO, device=device)
    refs = reference_all_passes(x, w, b, p, g)[:3]
    t16 = _torch_d_all_passes(x.half(), w.half(), None if b is None else b.half(), p, g.half())
    ours = (be.forward(x, w, b, p), be.grad_input(g, w, x.shape, p), be.grad_weight(g, x, w.shape, p))
    for name, o, r, d in zip(("forward", "grad_input", "grad_weight"), ours, refs, t16):
        err = (o.double().cpu() - r).abs().max().item()
        assert err <= tolerance(r, d, torch.float16), (name, err)


@needs_interpreter
@pytest.mark.parametrize("case", ["br-stride2", "br-asym-pad", "br-cl"])
def test_cpu_interpreter_batchrows_vs_other_kernels(case, monkeypatch):
    """Fast (batch-as-rows) vs generic (aligned / strided Toeplitz kernels): both close to each other."""
    ops = _ops()
    c = CASES[case]
    x, w, b = make_inputs(c, torch.float32, "cpu")
    g = torch.randn(x.shape[0], x.shape[1], *lkconv.depthwise_conv2d(x, w, b, *c.conv_args, backend="torch").shape[2:])
    p = normalize_params(c.stride, c.padding, c.dilation, c.k)
    from lkconv.backends import get_backend

    be = get_backend("triton")
    fast = (be.forward(x, w, b, p), be.grad_input(g, w, x.shape, p))
    monkeypatch.setattr(ops, "BATCHROWS", False)
    slow = (be.forward(x, w, b, p), be.grad_input(g, w, x.shape, p))
    for f, s in zip(fast, slow):
        assert f.shape == s.shape and f.stride() == s.stride()
        torch.testing.assert_close(f, s, rtol=1e-4, atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("bm,bn", sorted({(c[0], c[1]) for c in
                                         __import__("lkconv.backends.triton.ops", fromlist=["x"])._BATCHROWS_CONFIGS}))
def test_cpu_interpreter_batchrows_every_config(bm, bn, monkeypatch, spy):
    """Every tile of the autotune list (warps and stages do not exist in the interpreter)."""
    ops = _ops()
    monkeypatch.setattr(ops, "_INTERP_BATCHROWS", dict(BM=bm, BN=bn))
    for case, dt in (("br-7x7-k13", "bf16"), ("br-stride2", "fp16")):
        c = CASES[case]
        x, w, b = make_inputs(c, DTYPES[dt], "cpu")
        results = compare_all_passes("triton", x, w, b, *c.conv_args)
        assert all(r.ok for r in results), "\n".join(str(r) for r in results)
    assert spy[False] >= 2 and spy[True] >= 2


@needs_interpreter
def test_cpu_interpreter_batchrows_m_tile_groups(monkeypatch, spy):
    """M tiles split over several programs (one M tile each) and all in one program give the same."""
    ops = _ops()
    c = Case("br-3mtiles", (40, 2, 7, 7), (13, 13), padding=6, bias=True)
    x, w, b = make_inputs(c, torch.float32, "cpu")
    one = lkconv.depthwise_conv2d(x, w, b, *c.conv_args, backend="triton")
    monkeypatch.setattr(ops, "_batchrows_m_per", lambda n_mt, ppg, dev: 1)
    results = compare_all_passes("triton", x, w, b, *c.conv_args)
    assert all(r.ok for r in results), "\n".join(str(r) for r in results)
    split = lkconv.depthwise_conv2d(x, w, b, *c.conv_args, backend="triton")
    torch.testing.assert_close(one, split, rtol=0, atol=0)  # the same products, in the same order
    assert spy[False] >= 2


@needs_interpreter
def test_cpu_interpreter_batchrows_tf32_and_ieee(monkeypatch, spy):
    """fp32 takes input_precision "tf32" when PyTorch allows TF32 (on the GPU: ops._precision), "ieee"
    otherwise: the same small case both ways (IEEE under the fp32 rule, TF32 under the fp16 rule)."""
    ops = _ops()
    c = CASES["br-7x7-k13"]
    x, w, b = make_inputs(c, torch.float32, "cpu")
    assert ops._precision(torch.float32) == "ieee"
    results = compare_all_passes("triton", x, w, b, *c.conv_args)
    assert all(r.ok for r in results), "\n".join(str(r) for r in results)
    n = dict(spy)
    assert n[False] >= 1 and n[True] >= 1 and n["grad_weight"] >= 1
    monkeypatch.setattr(ops, "_precision", lambda dt: "tf32" if dt == torch.float32 else None)
    _check_tf32_rule(c, "cpu")
    assert spy[False] > n[False] and spy[True] > n[True] and spy["grad_weight"] > n["grad_weight"]


@needs_interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_cpu_interpreter_batchrows_nonfinite(spy):
    """Inf/NaN inputs: never a finite number where F.conv2d gives Inf/NaN; finite outputs exact."""
    from lkconv.backends.reference import reference_forward
    from lkconv.testing import nonfinite_contract_violations

    x = torch.randn(2, 2, 7, 7)
    x[0, 0, 3, 3] = float("inf")
    x[1, 1, 0, 6] = float("nan")
    w = torch.randn(2, 1, 13, 13)
    p = normalize_params(1, 6, 1, (13, 13))
    y = lkconv.depthwise_conv2d(x, w, padding=6, backend="triton")
    ref = reference_forward(x.double(), w.double(), None, p)
    assert not nonfinite_contract_violations(y, ref, torch.float32)
    assert spy[False] == 1


def test_batchrows_applicability_rule(monkeypatch):
    ops = _ops()
    assert ops.batchrows_applicable(14, 14, 14, 14, 27, 27)       # RepLKNet-31B 14x14/K27: 256 <= 1458
    assert ops.batchrows_applicable(7, 7, 7, 7, 13, 13)           # 7x7/K13: 64 <= 338
    assert ops.batchrows_applicable(1, 256, 1, 256, 1, 128)       # a 1 x 256 plane
    assert not ops.batchrows_applicable(17, 16, 17, 16, 31, 31)   # 272 elements: too big
    assert not ops.batchrows_applicable(14, 14, 18, 18, 27, 27)   # output plane 324 > 256
    assert not ops.batchrows_applicable(16, 16, 16, 16, 3, 3)     # K = 3: 256 > 2 * 9 (dense costs 14x more)
    assert not ops.batchrows_applicable(14, 14, 14, 14, 7, 7)     # 256 > 98
    assert ops.batchrows_applicable(7, 7, 7, 7, 13, 13, channels=2**31 // 49)
    assert not ops.batchrows_applicable(7, 7, 7, 7, 13, 13, channels=2**31 // 49 + 1)  # int32 image stride
    assert not ops.batchrows_grad_weight_applicable(7, 7, 7, 7, 13, 13, channels=2**31 // 49 + 1)
    assert ops.batchrows_applicable(7, 7, 7, 7, 13, 13, 4, prec="ieee", sm_major=9)  # fp32 IEEE at GEMM-K 64
    assert not ops.batchrows_applicable(14, 14, 14, 14, 27, 27, 4, prec="ieee", sm_major=9)  # fp32 IEEE: K <= 64
    assert ops.batchrows_applicable(14, 14, 14, 14, 27, 27, 4, prec="tf32", sm_major=9)
    assert not ops.batchrows_applicable(14, 14, 14, 14, 27, 27, 4, prec="tf32", sm_major=8)  # smem on sm_80
    monkeypatch.setattr(ops, "BATCHROWS", False)
    assert not ops.batchrows_applicable(7, 7, 7, 7, 13, 13)
    assert not ops.batchrows_grad_weight_applicable(7, 7, 7, 7, 13, 13)


@pytest.mark.parametrize("sw,dw,trans", [(1, 1, False), (2, 1, False), (1, 2, True), (2, 3, True)])
def test_batchrows_band_matches_definition(sw, dw, trans):
    ops = _ops()
    C, KH, KW, wa, wb, pl = 2, 3, 5, 6, 5, 4
    w = torch.randn(C, 1, KH, KW)
    w[1, 0, 2, 1] = float("inf")
    wbp = ops._batchrows_pitch(wb)
    assert wbp == 8
    band = ops._batchrows_band(w, wa, wb, wbp, sw, dw, pl, trans)
    assert band.shape == (C, KH, wa, wbp) and band.is_contiguous()
    for k in range(wa):
        for n in range(wbp):
            d = (n - k * sw + pl) if trans else (k - n * sw + pl)
            tap = d >= 0 and d % dw == 0 and d // dw < KW and n < wb
            want = w[:, 0, :, d // dw] if tap else torch.zeros(C, KH)
            assert torch.equal(band[:, :, k, n], want), (k, n)


def test_batchrows_default_config_is_in_the_list():
    ops = _ops()
    for pb in (8, 16, 56, 64, 224, 256):
        assert ops._default_batchrows(pb) in ops._BATCHROWS_CONFIGS
    assert ops._default_batchrows(224) == (64, 128, 8, 2)   # 14x14: the model's best (docs/triton_backend.md)
    assert ops._default_batchrows(56) == (64, 64, 4, 2)     # 7x7


def test_batchrows_prune():
    ops = _ops()
    kept = ops._prune_batchrows_for(9)(ops._batchrows_configs(), {}, HB=7, WBP=8, PREC=None)
    assert {c.kwargs["BN"] for c in kept} == {32, 64}       # GEMM-N 56: no 128-wide tile
    kept = ops._prune_batchrows_for(9)(ops._batchrows_configs(), {}, HB=14, WBP=16, PREC=None)
    assert len(kept) == len(ops._BATCHROWS_CONFIGS) - sum(
        9 in ops._STATIC_SPILLS.get(("batchrows", None, cfg), ()) for cfg in ops._BATCHROWS_CONFIGS)


# ------------------------------------------------------------------------------------------------
# GPU (pytest -m gpu): the compiled kernel, default config and autotuned, every dtype and layout
# ------------------------------------------------------------------------------------------------
GPU_CASES = {c.id: c for c in [
    Case("c32-14-k27-n70", (70, 32, 14, 14), (27, 27), padding=13, bias=True),   # 2 M tiles (64 + 6)
    Case("c64-7-k13", (3, 64, 7, 7), (13, 13), padding=6),
    Case("c64-7-k13-cl", (5, 64, 7, 7), (13, 13), padding=6, layout="channels_last"),
    Case("c32-14-k27-sliced", (4, 32, 14, 14), (27, 27), padding=13, layout="sliced"),
    Case("c16-10-k9-s2", (66, 16, 10, 10), (9, 9), stride=2, padding=4),
    Case("c16-7-k7-d2", (2, 16, 7, 7), (7, 7), dilation=2, padding=(6, 5, 4, 6)),
    Case("c8-16-k17-n1", (1, 8, 16, 16), (17, 17), padding=8),                  # HW = 256: KP = 256
]}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_cuda_batchrows_all_passes(case, dtype, monkeypatch, spy):
    ops = _ops()
    monkeypatch.setattr(ops, "AUTOTUNE", False)
    c = GPU_CASES[case]
    dt = DTYPES[dtype]
    # compare_all_passes runs fp32 with TF32 off (IEEE): the rule keeps fp32 IEEE to GEMM-K <= 64
    expect = _expect_batchrows(c, dt, "ieee" if dt == torch.float32 else None)
    assert any(expect), "every GPU case is meant for the batch-as-rows kernels in some pass"
    x, w, b = make_inputs(c, dt, "cuda", weight_scale=True)
    results = compare_all_passes("triton", x, w, b, *c.conv_args)
    assert all(r.ok for r in results), "\n".join(str(r) for r in results)
    for ran, want in zip((spy[False], spy[True], spy["grad_weight"]), expect):
        assert (ran >= 1) == want, (spy, expect)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", ["c32-14-k27-n70", "c64-7-k13"])
def test_cuda_batchrows_autotuned(case, spy):
    c = GPU_CASES[case]
    x, w, b = make_inputs(c, torch.float16, "cuda", weight_scale=True)
    results = compare_all_passes("triton", x, w, b, *c.conv_args)
    assert all(r.ok for r in results), "\n".join(str(r) for r in results)
    assert spy[False] >= 1 and spy[True] >= 1 and spy["grad_weight"] >= 1


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", ["c32-14-k27-n70", "c16-10-k9-s2"])
def test_cuda_batchrows_fp32_tf32_and_ieee(case, monkeypatch, spy):
    """fp32 with TF32 allowed (fp16 rule) and with TF32 off (compare_all_passes: the fp32 rule); with
    TF32 every pass the rule takes runs the batch-as-rows kernels."""
    from lkconv.testing import tf32

    ops = _ops()
    monkeypatch.setattr(ops, "AUTOTUNE", False)
    c = GPU_CASES[case]
    x, w, b = make_inputs(c, torch.float32, "cuda", weight_scale=True)
    results = compare_all_passes("triton", x, w, b, *c.conv_args)  # TF32 off: IEEE
    assert all(r.ok for r in results), "\n".join(str(r) for r in results)
    before = dict(spy)
    expect = _expect_batchrows(c, torch.float32, "tf32")
    assert all(expect)
    with tf32(True):
        assert ops._precision(torch.float32) == "tf32"
        _check_tf32_rule(c, "cuda")
    for k in (False, True, "grad_weight"):
        assert spy[k] > before[k], (k, spy, before)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cuda_batchrows_vs_aligned(dtype, monkeypatch):
    """Fast (batch-as-rows) vs generic (aligned Toeplitz) on RepLKNet's 7x7/K13 and 14x14/K27 layers."""
    from lkconv.backends import get_backend

    ops = _ops()
    monkeypatch.setattr(ops, "AUTOTUNE", False)
    be = get_backend("triton")
    for H, K, C in ((7, 13, 128), (14, 27, 64)):
        x = torch.randn(64, C, H, H, device="cuda", dtype=DTYPES[dtype])
        w = (torch.randn(C, 1, K, K, device="cuda") / K).to(DTYPES[dtype])
        p = normalize_params(1, K // 2, 1, (K, K))
        g = torch.randn_like(x)
        fast = (be.forward(x, w, None, p), be.grad_input(g, w, x.shape, p))
        monkeypatch.setattr(ops, "BATCHROWS", False)
        slow = (be.forward(x, w, None, p), be.grad_input(g, w, x.shape, p))
        monkeypatch.setattr(ops, "BATCHROWS", True)
        for f, s in zip(fast, slow):
            torch.testing.assert_close(f.float(), s.float(), rtol=5e-2, atol=5e-2)
