"""Channel multiplier: weight (m*C, 1, KH, KW) with groups = C, PyTorch's semantics (output channel
c*m + j reads input channel c).  Computed by the reference, torch and cpu backends (checked against
the fp64 reference like every other case, plus gradcheck, opcheck, torch.compile); declined loudly by
triton and cuda, which ``auto`` routes around (to ``torch`` on CUDA tensors)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lkconv
from lkconv.backends import cpu as cpu_backend
from lkconv.params import normalize_params
from lkconv.testing import compare_all_passes

BACKENDS = [b for b in ("reference", "torch", "cpu") if lkconv.backend_status().get(b) is None]

# (shape, m, kernel, stride, padding, dilation)
CASES = {
    "k3-m2": ((2, 3, 9, 8), 2, (3, 3), 1, 1, 1),
    "k7-stride2-m2": ((1, 2, 13, 12), 2, (7, 7), 2, 3, 1),
    "k13-same-m3": ((1, 2, 14, 15), 3, (13, 13), 1, "same", 1),
    "even-rect-dil-m2": ((2, 2, 11, 10), 2, (4, 6), 2, (1, 2), (2, 1)),
    "k31-m2": ((1, 2, 12, 11), 2, (31, 31), 1, 15, 1),
    "asym-4tuple-m4": ((1, 1, 8, 9), 4, (5, 3), 1, (0, 3, 2, 1), 1),
}


def _tensors(shape, m, k, dtype=torch.float32, layout="nchw"):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(shape[1] * m, 1, *k, generator=gen, dtype=dtype)
    b = torch.randn(shape[1] * m, generator=gen, dtype=dtype)
    return x, w, b


def test_reference_matches_f_conv2d_in_fp64():
    """The reference (written from the definition) agrees with F.conv2d(groups=C) for m > 1."""
    from lkconv.backends.reference import reference_forward, reference_grad_input, reference_grad_weight

    for name, (shape, m, k, s, pad, d) in CASES.items():
        x, w, b = _tensors(shape, m, k, torch.float64)
        p = normalize_params(s, pad, d, k)
        t, bo, l, r = p.padding
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ref = F.conv2d(F.pad(xr, (l, r, t, bo)), wr, b, p.stride, 0, p.dilation, groups=shape[1])
        g = torch.randn_like(ref)
        gx, gw = torch.autograd.grad(ref, (xr, wr), g)
        torch.testing.assert_close(reference_forward(x, w, b, p), ref.detach(), rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(reference_grad_input(g, w, x.shape, p), gx, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(reference_grad_weight(g, x, w.shape, p), gw, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_all_passes_match_fp64_reference(backend, case, layout):
    shape, m, k, s, pad, d = CASES[case]
    x, w, b = _tensors(shape, m, k, layout=layout)
    res = compare_all_passes(backend, x, w, b, s, pad, d)
    assert res and all(r.ok for r in res), [str(r) for r in res]


@pytest.mark.parametrize("path", ["fft", "direct"])
@pytest.mark.parametrize("case", ["k3-m2", "k13-same-m3", "even-rect-dil-m2", "k31-m2"])
def test_cpu_both_paths(path, case):
    """The cpu backend's FFT path (channel expansion) and direct path (native) both compute m > 1."""
    shape, m, k, s, pad, d = CASES[case]
    for dtype in (torch.float32, torch.float64):
        x, w, b = _tensors(shape, m, k, dtype)
        with cpu_backend.force_path(path):
            res = compare_all_passes("cpu", x, w, b, s, pad, d)
        assert res and all(r.ok for r in res), (dtype, [str(r) for r in res])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["gradcheck", "gradgradcheck"])
def test_gradcheck_fp64(backend, order):
    x, w, b = _tensors((1, 2, 6, 7), 3, (3, 5), torch.float64)
    x, w, b = (t.requires_grad_(True) for t in (x, w, b))
    check = getattr(torch.autograd, order)
    assert check(lambda x, w, b: lkconv.depthwise_conv2d(x, w, b, 2, (1, 2), 1, backend=backend), (x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_all_ops(backend):
    x, w, b = _tensors((2, 3, 8, 9), 2, (3, 3), torch.float64)
    p = normalize_params(1, 1, 1, (3, 3))
    s, pad, d = p.as_lists()
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    torch.library.opcheck(torch.ops.lkconv.dwconv2d.default, (xr, wr, br, s, pad, d, backend))
    out = torch.ops.lkconv.dwconv2d(x, w, b, s, pad, d, backend)
    assert out.shape == (2, 6, 8, 9)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.lkconv.dwconv2d_grad_input.default, (g, w, list(x.shape), s, pad, d, backend))
    torch.library.opcheck(torch.ops.lkconv.dwconv2d_grad_weight.default, (g, x, list(w.shape), s, pad, d, backend))


def test_compile_fullgraph_forward_backward():
    x, w, b = _tensors((2, 3, 10, 10), 2, (7, 7))
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def f(x, w, b):
        return lkconv.depthwise_conv2d(x, w, b, padding=3).square().sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = cf(xr, wr, b)
    gx, gw = torch.autograd.grad(loss, (xr, wr))
    xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = F.conv2d(xe, we, b, 1, 3, groups=3).square().sum()
    rgx, rgw = torch.autograd.grad(ref, (xe, we))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gw, rgw, rtol=1e-5, atol=1e-4)


def test_bad_multiplier_raises_naming_the_argument():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"weight has 5 output channels but input has C=3.*channel multiplier"):
        lkconv.depthwise_conv2d(x, torch.randn(5, 1, 3, 3))
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        lkconv.depthwise_conv2d(x, torch.randn(6, 1, 3, 3), torch.randn(3))


def test_module_and_convert_with_multiplier():
    """LargeKernelConv2d takes out_channels = m * in_channels; convert swaps such depthwise convs
    (FastViT's 7x7 stride-2 convs with 2C outputs) with unchanged outputs."""
    torch.manual_seed(0)
    m = lkconv.LargeKernelConv2d(4, 8, 7, stride=2, padding=3, groups=4)
    x = torch.randn(2, 4, 15, 16)
    torch.testing.assert_close(m(x), F.conv2d(x, m.weight, m.bias, 2, 3, groups=4), rtol=1e-5, atol=1e-5)
    model = nn.Sequential(nn.Conv2d(4, 8, 7, 2, 3, groups=4), nn.Conv2d(8, 12, 3, 1, 1, groups=4))
    ref = model(x)
    lkconv.convert(model)
    assert isinstance(model[0], lkconv.LargeKernelConv2d)
    assert type(model[1]) is nn.Conv2d  # groups=4 with 8 inputs: grouped, not depthwise
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_triton_declines_and_explicit_grad_op_raises():
    """Under Triton's interpreter (CPU): the triton backend declines m > 1 with a reason naming the
    multiplier, also for a direct grad_input op call whose check() only sees grad_out."""
    pytest.importorskip("triton", reason="triton is not installed")
    code = textwrap.dedent("""
        import torch, lkconv
        from lkconv.backends import UnsupportedError
        x, w = torch.randn(1, 3, 8, 8), torch.randn(6, 1, 3, 3)
        try:
            lkconv.depthwise_conv2d(x, w, padding=1, backend="triton")
        except UnsupportedError as e:
            assert "channel multiplier 2" in str(e), e
        else:
            raise SystemExit("triton accepted m=2")
        try:
            torch.ops.lkconv.dwconv2d_grad_input(torch.randn(1, 6, 8, 8), w, [1, 3, 8, 8], [1, 1], [1, 1, 1, 1],
                                                 [1, 1], "triton")
        except UnsupportedError as e:
            assert "channel multiplier 2" in str(e), e
        else:
            raise SystemExit("triton grad_input accepted m=2")
        # m == 1 still runs on triton
        y = lkconv.depthwise_conv2d(x, torch.randn(3, 1, 3, 3), padding=1, backend="triton")
        assert y.shape == (1, 3, 8, 8)
        print("OK")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    if "is not available" in r.stderr:
        pytest.skip(f"triton backend unavailable under the interpreter: {r.stderr[-300:]}")
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_cuda_auto_routes_to_torch_and_explicit_kernels_decline():
    from lkconv.backends import UnsupportedError, resolve_backend

    x, w, b = (t.cuda() for t in _tensors((2, 3, 16, 16), 2, (13, 13)))
    p = normalize_params(1, 6, 1, (13, 13))
    assert resolve_backend("auto", x, w, p) == "torch"
    res = compare_all_passes("auto", x, w, b, 1, 6, 1)
    assert res and all(r.ok for r in res), [str(r) for r in res]
    for name in ("cuda", "triton"):
        if lkconv.backend_status().get(name) is None:
            with pytest.raises(UnsupportedError, match="channel multiplier"):
                lkconv.depthwise_conv2d(x, w, b, padding=6, backend=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_matches_torch(backend):
    """A gradient penalty differentiated again: every second-order gradient equals PyTorch's."""
    from lkconv.testing import double_backward_errors

    x, w, b = _tensors((2, 2, 9, 10), 2, (5, 3), torch.float64)
    errs = double_backward_errors(backend, x, w, b, stride=2, padding=(2, 1), dilation=1)
    assert errs and all(e <= 1e-9 for e in errs.values()), errs


@pytest.mark.parametrize("backend", ["cpu", "torch", "reference"])
def test_forward_ad_and_vmap_with_channel_multiplier(backend):
    """jvp (tangents on x, weight and bias) and vmap over the data, the filter and both, with m = 2,
    against F.conv2d in fp64: the vmap rules fold a batched filter into the channels, which must
    keep output channel c*m + j reading input channel c."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64)
    w = torch.randn(6, 1, 5, 5, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)

    def ours(x, w, b):
        return lkconv.depthwise_conv2d(x, w, b, 1, 2, backend=backend)

    def ref(x, w, b):
        return F.conv2d(x, w, b, 1, 2, groups=3)

    tangents = tuple(torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, w, b))
    (o1, t1), (o2, t2) = torch.func.jvp(ours, (x, w, b), tangents), torch.func.jvp(ref, (x, w, b), tangents)
    torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(t1, t2, rtol=1e-10, atol=1e-10)
    X = torch.randn(4, 2, 3, 9, 9, generator=g, dtype=torch.float64)
    W = torch.randn(4, 6, 1, 5, 5, generator=g, dtype=torch.float64)
    B = torch.randn(4, 6, generator=g, dtype=torch.float64)
    for got, want in (
        (torch.func.vmap(lambda w: ours(x, w, b))(W), torch.stack([ref(x, W[i], b) for i in range(4)])),
        (torch.func.vmap(lambda x: ours(x, w, b))(X), torch.stack([ref(X[i], w, b) for i in range(4)])),
        (torch.func.vmap(ours)(X, W, B), torch.stack([ref(X[i], W[i], B[i]) for i in range(4)])),
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
