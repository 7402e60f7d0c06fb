"""The ``cpu`` backend: both of its paths (direct and FFT), forced explicitly, on every feature of
the op, all three passes + bias grad against the fp64 reference (tolerance rule (docs/architecture.md) via
lkconv.testing.compare_all_passes)."""

import pytest
import torch

import lkconv
from lkconv.backends import cpu as cpu_mod
from lkconv.backends import Request, get_backend, resolve_backend
from lkconv.params import normalize_params
from lkconv.testing import compare_all_passes

from cases import CPU_CASES, Case, make_inputs

PATHS = ["direct", "fft"]

CASES = CPU_CASES  # tests/cases.py


def _inputs(shape, k, dtype=torch.float32, bias=True):
    return make_inputs(Case("adhoc", shape, k, bias=bias), dtype)


def _run(path, x, w, b, stride, padding, dilation):
    with cpu_mod.force_path(path):
        res = compare_all_passes("cpu", x, w, b, stride, padding, dilation)
    assert res and all(r.ok for r in res), "\n".join(str(r) for r in res)
    return res


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_fp32(case, path):
    c = CASES[case]
    shape, k, (s, p, d), bias = c.shape, c.k, c.conv_args, c.bias
    x, w, b = _inputs(shape, k, torch.float32, bias)
    _run(path, x, w, b, s, p, d)


FP64_CASES = ["k3", "k7-same", "k31-same", "k8-even-same", "rect-31x5", "k31-gt-H", "stride2-k31",
              "dil-2x1", "asym-stride2-dil2", "batch0", "pad-beyond-kernel"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", FP64_CASES)
def test_fp64(case, path):
    c = CASES[case]
    shape, k, (s, p, d), bias = c.shape, c.k, c.conv_args, c.bias
    x, w, b = _inputs(shape, k, torch.float64, bias)
    res = _run(path, x, w, b, s, p, d)
    # fp64 really computes in fp64 (complex128 on the FFT path): the tolerance is ~1e-10 * scale,
    # the error must be far below it (~1e-12 relative or better), not merely within it
    assert all(r.err <= r.tol / 50 for r in res), "\n".join(map(str, res))


HALF_CASES = ["k3", "k13-same", "k31-gt-H", "stride2", "asym-4tuple"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", HALF_CASES)
def test_half(case, dtype, path):
    c = CASES[case]
    shape, k, (s, p, d), bias = c.shape, c.k, c.conv_args, c.bias
    x, w, b = _inputs(shape, k, dtype, bias)
    _run(path, x, w, b, s, p, d)


LAYOUT_CASES = ["k3", "k8-even-same", "k31-same", "stride2-k31", "asym-4tuple"]


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "slice":  # a strided view into a bigger buffer: every dim non-contiguous
        N, C, H, W = t.shape
        big = torch.zeros(N + 1, 2 * C, H + 3, 2 * W, dtype=t.dtype)
        v = big[1:, ::2, 2 : 2 + H, 1 : 2 * W : 2]
        v.copy_(t)
        assert not v.is_contiguous()
        return v
    return t


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["channels_last", "slice"])
@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_layouts(case, layout, path):
    c = CASES[case]
    shape, k, (s, p, d), bias = c.shape, c.k, c.conv_args, c.bias
    x, w, b = _inputs(shape, k, torch.float32, bias)
    _run(path, _layout(x, layout), w, b, s, p, d)


@pytest.mark.parametrize("path", PATHS)
def test_channels_last_output_and_grad_formats(path):
    x = torch.randn(2, 3, 12, 10).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(3, 1, 9, 9, requires_grad=True)
    with cpu_mod.force_path(path):
        out = lkconv.depthwise_conv2d(x, w, None, 1, "same", backend="cpu")
        g = torch.randn_like(out)
        gx, gw = torch.autograd.grad(out, (x, w), g)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert gx.shape == x.shape and gw.shape == w.shape and gw.is_contiguous()


def test_fft_chunking(monkeypatch):
    """Tiny chunk budget: exercises both chunk shapes (channel blocks, and (n-block, 1 channel))."""
    for budget in (1, 3 * 8 * 5 * 8):  # 1 byte -> per-plane chunks; a few planes -> channel blocks
        monkeypatch.setattr(cpu_mod.fft, "CHUNK_BYTES", budget)
        x, w, b = _inputs((3, 4, 9, 10), (7, 7), torch.float64, True)
        _run("fft", x, w, b, 1, "same", 1)
        x, w, b = _inputs((3, 4, 9, 10), (5, 4), torch.float32, False)
        _run("fft", x, w, b, 2, (2, 1, 0, 3), (1, 2))


@pytest.mark.parametrize("path", PATHS)
def test_nan_inf_propagate_like_torch(path):
    """NaN/Inf stay local as in F.conv2d (the FFT path would smear them over the plane, so
    non-finite inputs take the direct path)."""
    x = torch.randn(1, 2, 16, 16)
    x[0, 0, 3, 4] = float("nan")
    x[0, 1, 10, 12] = float("inf")
    w = torch.rand(2, 1, 9, 9) + 0.1
    ref = torch.nn.functional.conv2d(x, w, None, 1, 4, groups=2)
    with cpu_mod.force_path(path):
        out = lkconv.depthwise_conv2d(x, w, None, 1, 4, backend="cpu")
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out[fin], ref[fin], rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# FFT geometry, path choice, check(), auto
# ------------------------------------------------------------------------------------------------
def test_next_fast_len():
    def smooth(m):
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        return m == 1

    for n in range(1, 300):
        m = cpu_mod.next_fast_len(n)
        assert m >= n and smooth(m) and all(not smooth(j) for j in range(n, m))
        e = cpu_mod.next_fast_len(n, even=True)
        assert e >= n and e % 2 == 0 and smooth(e)


def test_fft_length_is_tight_for_same_padding():
    # "same", K=31 on 56: exact length is H + K//2 = 71 (not H + K - 1 = 86), rounded to 72
    assert cpu_mod.fft_length(56, 15, 31, 1, 56, 1) == 72
    # valid: H (the kernel never leaves the input)
    assert cpu_mod._axis(56, 0, 31, 1, 26, 1)[2] == 56


@pytest.mark.parametrize("threads", [1, 2])
def test_choose_path_takes_the_fft_for_the_largest_kernels(threads):
    # the rules of every row of the path table: tests/test_cpu_routing.py
    for pass_ in ("forward", "grad_input", "grad_weight"):
        for layout in ("nchw", "cl"):
            assert cpu_mod.choose_path(51, 51, (1, 1), pass_, threads, layout) == "fft"
            assert cpu_mod.choose_path(1, 1, (1, 1), pass_, threads, layout) != "fft"


def test_path_selection_and_validation():
    with pytest.raises(ValueError, match="path"):
        cpu_mod.CPUBackend(path="winograd")
    with pytest.raises(ValueError, match="path"):
        with cpu_mod.force_path("gpu"):
            pass
    assert cpu_mod.FORCE_PATH is None
    b = cpu_mod.CPUBackend(path="fft")
    p = normalize_params(1, 1, 1, (3, 3))
    x = torch.zeros(1, 1, 8, 8)
    assert b._path(x, (1, 1, 3, 3), p, "forward") == "fft"
    assert cpu_mod.CPUBackend()._path(x, (1, 1, 3, 3), p, "forward") == cpu_mod.choose_path(3, 3, (1, 1), "forward")
    assert cpu_mod.CPUBackend()._path(x, (1, 1, 51, 51), normalize_params(1, 25, 1, (51, 51)), "forward") == "fft"


def test_constructor_path_argument_matches_reference():
    x, w, b = _inputs((2, 3, 11, 12), (9, 9), torch.float64, True)
    p = normalize_params(1, "same", 1, (9, 9))
    from lkconv.backends.reference import reference_forward

    ref = reference_forward(x, w, b, p)
    for path in PATHS:
        out = cpu_mod.CPUBackend(path=path).forward(x, w, b, p)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_check_declines_non_cpu_and_non_float():
    be = get_backend("cpu")
    p = normalize_params(1, 1, 1, (3, 3))
    xm = torch.empty(1, 2, 5, 5, device="meta")
    wm = torch.empty(2, 1, 3, 3, device="meta")
    why = be.check(Request.of("forward", xm, wm, p))
    assert why is not None and "CPU" in why and "meta" in why
    xi = torch.zeros(1, 2, 5, 5, dtype=torch.int32)
    why = be.check(Request.of("grad_input", xi, xi.new_zeros(2, 1, 3, 3), p))
    assert why is not None and "int32" in why
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert be.check(Request.of("grad_weight", torch.zeros(1, 2, 5, 5, dtype=dt), torch.zeros(2, 1, 3, 3, dtype=dt), p)) is None


def test_auto_on_cpu_resolves_to_cpu():
    assert lkconv.backend_status()["cpu"] is None
    x = torch.randn(1, 4, 10, 10, requires_grad=True)
    w = torch.randn(4, 1, 7, 7, requires_grad=True)
    p = normalize_params(1, 3, 1, (7, 7))
    assert resolve_backend("auto", x, w, p) == "cpu"
    with lkconv.use_backend("auto"):
        assert resolve_backend(None, x, w, p) == "cpu"
    out = lkconv.depthwise_conv2d(x, w, None, 1, 3, backend="auto")
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, w, None, 1, 3, groups=4), rtol=1e-5, atol=1e-5)


def test_forced_path_really_runs_that_path(monkeypatch):
    calls = []
    for name in ("fft_forward", "fft_grad_input", "fft_grad_weight",
                 "direct_forward", "direct_grad_input", "direct_grad_weight"):
        fn = getattr(cpu_mod, name)
        monkeypatch.setattr(cpu_mod, name, lambda *a, _fn=fn, _n=name, **k: (calls.append(_n), _fn(*a, **k))[1])
    x, w, b = _inputs((1, 2, 8, 8), (3, 3), torch.float32, True)
    for path in PATHS:
        calls.clear()
        _run(path, x, w, b, 1, 1, 1)
        assert sorted(calls) == sorted(f"{path}_{p}" for p in ("forward", "grad_input", "grad_weight"))


def test_fp32_fft_relative_error_at_replknet_like_size():
    """The accuracy target: fp32 FFT relative error <= 1e-5 (of max|ref|) for all passes at a
    RepLKNet-like plane (56x56, K=31, 'same'); the N*C is kept small for CI time."""
    x, w, b = _inputs((2, 3, 56, 56), (31, 31), torch.float32, True)
    res = _run("fft", x, w, b, 1, "same", 1)
    from lkconv.testing import reference_all_passes

    p = normalize_params(1, "same", 1, (31, 31))
    g = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    ref = reference_all_passes(x, w, b, p, g)
    be = cpu_mod.CPUBackend(path="fft")
    ours = (be.forward(x, w, b, p), be.grad_input(g.float(), w, x.shape, p), be.grad_weight(g.float(), x, w.shape, p))
    for o, r in zip(ours, ref[:3]):
        rel = (o.double() - r).abs().max().item() / r.abs().max().item()
        assert rel <= 1e-5, (rel, [str(q) for q in res])
