"""The op contract: torch.library.opcheck on every op, gradcheck in fp64, fake-kernel strides,
torch.compile(fullgraph=True) and torch.export with no graph break."""
import pytest
import torch

import lkconv
from lkconv.backends import resolve_backend
from lkconv.params import normalize_params


def cpu_backends():
    st = lkconv.backend_status()
    return [b for b in ("reference", "torch", "cpu") if st.get(b) is None]


def _args(layout="nchw", stride=1, padding=1, dilation=1, k=(3, 3), dtype=torch.float64, bias=True):
    x = torch.randn(2, 3, 8, 9, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(3, 1, *k, dtype=dtype)
    b = torch.randn(3, dtype=dtype) if bias else None
    p = normalize_params(stride, padding, dilation, k)
    return x, w, b, p


SAMPLES = {
    "k3": dict(),
    "k5-stride2-nobias": dict(k=(5, 5), stride=2, padding=2, bias=False),
    "k4-same-channels_last": dict(k=(4, 4), padding="same", layout="channels_last"),
    "rect-dil2": dict(k=(3, 5), padding=(2, 4), dilation=2),
}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("sample", list(SAMPLES), ids=list(SAMPLES))
def test_opcheck_all_ops(backend, sample):
    x, w, b, p = _args(**SAMPLES[sample])
    s, pad, d = p.as_lists()
    x.requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    torch.library.opcheck(torch.ops.lkconv.dwconv2d.default, (x, w, b, s, pad, d, backend))
    out = torch.ops.lkconv.dwconv2d(x.detach(), w.detach(), b, s, pad, d, backend)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.lkconv.dwconv2d_grad_input.default,
                          (g, w.detach(), list(x.shape), s, pad, d, backend))
    torch.library.opcheck(torch.ops.lkconv.dwconv2d_grad_weight.default,
                          (g, x.detach(), list(w.shape), s, pad, d, backend))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("sample", list(SAMPLES), ids=list(SAMPLES))
@pytest.mark.parametrize("order", ["gradcheck", "gradgradcheck"])
def test_gradcheck_fp64(backend, sample, order):
    """First and second order (double backward: gradient penalties, Hessian-vector products; the
    grad ops have autograd formulas of their own), checked numerically in fp64."""
    x, w, b, p = _args(**SAMPLES[sample])
    x = x[:1, :, :6, :7].clone().requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    kw = dict(stride=p.stride, padding=p.padding, dilation=p.dilation, backend=backend)
    check = getattr(torch.autograd, order)
    assert check(lambda x, w, b: lkconv.depthwise_conv2d(x, w, b, **kw), (x, w, b))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("geom", [
    dict(k=(31, 31), padding=15),
    dict(k=(4, 6), stride=2, padding=(1, 2), dilation=(2, 1)),
    dict(k=(3, 3), stride=(2, 3), padding=(0, 3, 2, 1), dilation=2),
], ids=["k31", "even-rect-stride2-dil", "asym-pad"])
def test_double_backward_matches_torch(backend, geom):
    """A WGAN-GP style gradient penalty, differentiated again: every second-order gradient equals
    PyTorch's own double backward of F.conv2d(groups=C) in fp64."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    k = geom["k"]
    stride, padding, dilation = geom.get("stride", 1), geom["padding"], geom.get("dilation", 1)
    x = torch.randn(2, 3, 13, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, *k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def ours(x, w, b):
        return lkconv.depthwise_conv2d(x, w, b, stride, padding, dilation, backend=backend)

    def theirs(x, w, b):
        if isinstance(padding, tuple) and len(padding) == 4:
            t, bo, le, r = padding
            return F.conv2d(F.pad(x, (le, r, t, bo)), w, b, stride, 0, dilation, groups=3)
        return F.conv2d(x, w, b, stride, padding, dilation, groups=3)

    def penalty_grads(fn):
        y = fn(x, w, b)
        gx, gw = torch.autograd.grad((y.sin() * y).sum(), (x, w), create_graph=True)
        pen = (gx ** 2).sum() + (gw ** 2).sum() + (gx * x).sum()
        return torch.autograd.grad(pen, (x, w, b))

    for name, a, r in zip(("x", "weight", "bias"), penalty_grads(ours), penalty_grads(theirs)):
        scale = r.abs().max().item()
        assert (a - r).abs().max().item() <= 1e-10 * max(scale, 1.0), name


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck_grad_ops_with_autograd(backend):
    """opcheck on the gradient ops with inputs that require grad: their autograd registration."""
    x, w, b, p = _args(k=(5, 3), stride=2, padding=(2, 1))
    s, pad, d = p.as_lists()
    out = torch.ops.lkconv.dwconv2d(x, w, None, s, pad, d, backend)
    g = torch.randn_like(out).requires_grad_(True)
    torch.library.opcheck(torch.ops.lkconv.dwconv2d_grad_input.default,
                          (g, w.clone().requires_grad_(True), list(x.shape), s, pad, d, backend))
    torch.library.opcheck(torch.ops.lkconv.dwconv2d_grad_weight.default,
                          (g, x.clone().requires_grad_(True), list(w.shape), s, pad, d, backend))


def test_fake_kernel_strides_follow_input():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 4, 10, 10).to(memory_format=torch.channels_last)
        w = torch.empty(4, 1, 5, 5)
        out = torch.ops.lkconv.dwconv2d(x, w, None, [1, 1], [2, 2, 2, 2], [1, 1], "torch")
        assert out.shape == (2, 4, 10, 10)
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_meta_tensors_shape_propagation():
    x = torch.empty(2, 4, 10, 11, device="meta")
    w = torch.empty(4, 1, 4, 6, device="meta")
    out = lkconv.depthwise_conv2d(x, w, padding="same")
    assert out.device.type == "meta" and out.shape == (2, 4, 10, 11)


def test_backend_resolved_before_the_op():
    with pytest.raises(ValueError, match="concrete backend"):
        torch.ops.lkconv.dwconv2d(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3), None,
                                  [1, 1], [1, 1, 1, 1], [1, 1], "auto")


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    x = torch.randn(2, 4, 12, 12, requires_grad=True)
    w = torch.randn(4, 1, 7, 7, requires_grad=True)
    b = torch.randn(4, requires_grad=True)

    def f(x, w, b):
        return torch.relu(lkconv.depthwise_conv2d(x, w, b, padding="same")).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = cf(x, w, b)
    grads = torch.autograd.grad(out, (x, w, b))
    ref = f(x, w, b)
    rgrads = torch.autograd.grad(ref, (x, w, b))
    torch.testing.assert_close(out, ref)
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


def test_compile_inductor_module():
    torch._dynamo.reset()
    m = torch.nn.Sequential(lkconv.LargeKernelConv2d(4, 4, 5, padding=2, groups=4), torch.nn.GELU())
    x = torch.randn(2, 4, 10, 10)
    cm = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(cm(x), m(x), rtol=1e-5, atol=1e-5)


def test_export_has_the_op_and_runs():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = lkconv.LargeKernelConv2d(4, 4, 5, padding=2, groups=4)

        def forward(self, x):
            return self.c(x)

    m = M()
    x = torch.randn(2, 4, 9, 9)
    ep = torch.export.export(m, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert any("lkconv.dwconv2d" in t for t in targets), targets
    torch.testing.assert_close(ep.module()(x), m(x))


def test_resolved_backend_is_concrete():
    x = torch.randn(1, 2, 6, 6)
    w = torch.randn(2, 1, 3, 3)
    name = resolve_backend("auto", x, w, normalize_params(1, 1, 1, (3, 3)))
    assert name != "auto" and name in lkconv.list_backends()
