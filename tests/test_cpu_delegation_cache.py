"""The remembered delegation of eager CPU calls (lkconv.ops: the C++ store lkconv._cpu_fast where it is
built, else delegation_key / _DELEGATED; every test runs on both): a call seen before runs F.conv2d at
once, with the same numbers, strides and autograd node as the first call and the fp64 reference;
anything its decision reads (shapes, strides, dtypes, flags, the thread count, a forced path or
backend, the delegation rule, the modes) gives a different key and so the decision of that case;
validation errors are raised every time."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lkconv
import lkconv.ops as ops
from lkconv.backends import cpu as cpu_mod
from lkconv.backends.reference import ReferenceBackend
from lkconv.params import normalize_params

FMT = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
TOL = {torch.float32: 2e-6, torch.float64: 1e-12}


@pytest.fixture(autouse=True, params=["c++", "python"])
def store(request, monkeypatch):
    """Each test on the C++ store (skipped where lkconv._cpu_fast is not built) and on the Python one."""
    if request.param == "c++" and ops._fast is None:
        pytest.skip("lkconv._cpu_fast is not built (python setup.py build_ext --inplace builds it)")
    if request.param == "python":
        monkeypatch.setattr(ops, "_fast", None)
    assert ops.delegation_store() == request.param
    ops.clear_delegation_cache()
    yield request.param
    ops.clear_delegation_cache()


def _hits():
    """Calls the C++ store answered so far (the Python store does not count: None)."""
    return ops._fast.stats()["hits"] if ops._fast is not None else None


def _spy(monkeypatch):
    """Which of the cpu backend's passes run (the delegated call runs none of them)."""
    seen = []
    for name in ("forward", "grad_input", "grad_weight"):
        real = getattr(cpu_mod.CPUBackend, name)

        def spy(self, *a, _real=real, _name=name, **k):
            seen.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(cpu_mod.CPUBackend, name, spy)
    return seen


def _err(a, b):
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("padding,stride", [("same", 1), ("valid", 1), (1, 1), (2, 2), ((1, 2), 1), ((2, 1), (2, 1))])
def test_remembered_call_matches_the_first_call_and_the_fp64_reference(padding, stride, layout, dtype, monkeypatch,
                                                                         store):
    torch.manual_seed(0)
    K = 3
    x = torch.randn(2, 4, 11, 10, dtype=dtype).contiguous(memory_format=FMT[layout])
    w = torch.randn(4, 1, K, K, dtype=dtype)
    b = torch.randn(4, dtype=dtype)
    p = normalize_params(stride, padding, 1, (K, K))
    ref = ReferenceBackend()
    want = ref.forward(x.double(), w.double(), b.double(), p)
    key = ops.delegation_key(x, w, b, stride, padding, 1, None)
    seen = _spy(monkeypatch)
    outs = []
    h0 = _hits()
    with torch.no_grad():
        for _ in range(3):  # the first call decides and remembers, the others hit
            outs.append(lkconv.depthwise_conv2d(x, w, b, stride, padding))
    assert seen == []  # delegated: none of the cpu backend's passes
    assert ops.remembered_delegations() == 1
    if store == "python":
        assert key is not None and key in ops._DELEGATED
    else:
        assert _hits() == h0 + 2
    for out in outs:
        assert torch.equal(out, outs[0]) and out.stride() == outs[0].stride()
        assert out.is_contiguous(memory_format=FMT[layout])
        assert _err(out, want) < TOL[dtype]
    # with gradients: the remembered call records PyTorch's node, whose gradients match the reference
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    for _ in range(2):
        out = lkconv.depthwise_conv2d(xr, wr, br, stride, padding)
        assert type(out.grad_fn).__name__ == "ConvolutionBackward0"
        g = torch.randn_like(out)
        gx, gw, gb = torch.autograd.grad(out, (xr, wr, br), g)
        assert _err(gx, ref.grad_input(g.double(), w.double(), x.shape, p)) < TOL[dtype]
        assert _err(gw, ref.grad_weight(g.double(), x.double(), w.shape, p)) < TOL[dtype]
        assert _err(gb, g.double().sum((0, 2, 3))) < TOL[dtype]
        assert gx.is_contiguous(memory_format=FMT[layout])


def _remembered(x, w, stride=1, padding=1, dilation=1, backend=None, bias=None):
    """Whether the call is remembered: a fresh store, the call made twice."""
    ops.clear_delegation_cache()
    with torch.no_grad():
        for _ in range(2):
            lkconv.depthwise_conv2d(x, w, bias, stride, padding, dilation, backend)
    return ops.remembered_delegations() > 0


def test_calls_that_are_not_plain_are_never_remembered():
    x = torch.randn(1, 2, 8, 8)
    w = torch.randn(2, 1, 3, 3)
    assert _remembered(x, w)
    assert not _remembered(x, w, stride=[1, 1])  # a list: not hashable as is
    for bad in (True, (1, True)):  # a bool is not an int here: the call's own error, nothing remembered
        with pytest.raises(TypeError, match="stride"):
            _remembered(x, w, stride=bad)
        assert ops.remembered_delegations() == 0
    assert not _remembered(x, w, padding=(1, 1, 0, 0))  # asymmetric: not delegated
    assert not _remembered(x[0], w)  # unbatched
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _remembered(x, w)
    with torch.autograd.profiler.profile():
        assert not _remembered(x, w)
    old = ops.EAGER_FAST_PATH
    ops.EAGER_FAST_PATH = False
    try:
        assert not _remembered(x, w)
    finally:
        ops.EAGER_FAST_PATH = old
    with pytest.raises((TypeError, ValueError)):
        lkconv.depthwise_conv2d(x, w, None, 1, 1, 1, ["cpu"])  # a list backend: the call's own error
    assert ops.remembered_delegations() == 0
    # a bool stride still raises, after the int one was remembered
    with torch.no_grad():
        lkconv.depthwise_conv2d(x, w, None, 1, 1)
        with pytest.raises(TypeError):
            lkconv.depthwise_conv2d(x, w, None, True, 1)


def test_validation_errors_are_raised_every_time():
    x = torch.randn(1, 2, 8, 8)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    for _ in range(2):
        with pytest.raises(TypeError, match="dtype"):
            lkconv.depthwise_conv2d(x, w, None, 1, 1)
    assert ops.remembered_delegations() == 0


def test_flags_shapes_forced_paths_and_backends_change_the_decision(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(1, 2, 12, 12).contiguous(memory_format=torch.channels_last)
    w5 = torch.randn(2, 1, 5, 5)
    seen = _spy(monkeypatch)
    with torch.no_grad():
        lkconv.depthwise_conv2d(x, w5, None, 1, "same")  # K=5 cl forward: PyTorch's cl kernel, delegated
    assert seen == [] and ops.remembered_delegations() == 1
    # the weight's gradient is lkconv's own at K=5: the same tensors with w requiring grad are not delegated
    wr = w5.clone().requires_grad_(True)
    out = lkconv.depthwise_conv2d(x, wr, None, 1, "same")
    assert type(out.grad_fn).__name__ == "_EagerConvFunctionBackward" and seen == ["forward"]
    out.backward(torch.randn_like(out))
    assert seen == ["forward", "grad_weight"]
    seen.clear()
    # a forced path, a forced backend, a use_backend block
    with torch.no_grad():
        with cpu_mod.force_path("direct"):
            lkconv.depthwise_conv2d(x, w5, None, 1, "same")
        assert seen == ["forward"]
        seen.clear()
        torch_fwd = []
        from lkconv.backends.torch_native import TorchBackend
        real = TorchBackend.forward
        monkeypatch.setattr(TorchBackend, "forward", lambda self, *a: torch_fwd.append(1) or real(self, *a))
        lkconv.depthwise_conv2d(x, w5, None, 1, "same", backend="torch")
        with lkconv.use_backend("torch"):
            lkconv.depthwise_conv2d(x, w5, None, 1, "same")
        assert torch_fwd == [1, 1] and seen == []
        # another kernel size: its own decision (K=31 cl forward at 2 threads: the FFT)
        w31 = torch.randn(2, 1, 31, 31)
        want = cpu_mod.CPUBackend().delegates_to_torch(x, (2, 1, 31, 31), normalize_params(1, "same", 1, (31, 31)),
                                                         ("forward",))
        lkconv.depthwise_conv2d(x, w31, None, 1, "same")
        assert seen == ([] if want else ["forward"])
        seen.clear()
        # the delegation rule itself replaced (as tests do): the remembered decision is not used
        monkeypatch.setattr(cpu_mod.CPUBackend, "delegates_to_torch", lambda self, *a: False)
        lkconv.depthwise_conv2d(x, w5, None, 1, "same")
        assert seen == ["forward"]


@pytest.mark.parametrize("first", [1, 2])
def test_the_thread_count_changes_the_decision(first, monkeypatch):
    """K=31, channels_last, forward only: PyTorch's cl kernel single-threaded, the FFT at 2 threads
    (the committed tables); whichever thread count comes first, the other one gets its own choice."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 12, 12).contiguous(memory_format=torch.channels_last)
    w = torch.randn(2, 1, 31, 31)
    p = normalize_params(1, "same", 1, (31, 31))
    old = torch.get_num_threads()
    decision = {}
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            decision[t] = cpu_mod.CPUBackend().delegates_to_torch(x, tuple(w.shape), p, ("forward",))
        assert decision[1] != decision[2], "the committed tables no longer differ here: pick another case"
        seen = _spy(monkeypatch)
        ref = ReferenceBackend().forward(x.double(), w.double(), None, p)
        for t in (first, 3 - first, first):
            torch.set_num_threads(t)
            seen.clear()
            with torch.no_grad():
                out = lkconv.depthwise_conv2d(x, w, None, 1, "same")
            assert seen == ([] if decision[t] else ["forward"]), t
            assert _err(out, ref) < 1e-5
    finally:
        torch.set_num_threads(old)


def test_a_remembered_call_is_not_used_under_modes_transforms_or_other_facts(store, monkeypatch):
    """Remember one call, then make the same call under each condition its decision reads (or where the
    op node must be seen): the remembered entry is not used there (C++ store: no hit; both: the
    condition's own result, correct), and is used again afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9)
    w = torch.randn(3, 1, 3, 3)
    p = normalize_params(1, 1, 1, (3, 3))
    want = ReferenceBackend().forward(x.double(), w.double(), None, p)
    call = lambda u=x, v=w, **k: lkconv.depthwise_conv2d(u, v, None, 1, 1, **k)  # noqa: E731
    with torch.no_grad():
        call()
    assert ops.remembered_delegations() == 1

    def unused(fn, check=None):
        h = _hits()
        out = fn()
        if store == "c++":
            assert _hits() == h, "the remembered call was used"
        if check is not None:
            check(out)
        with torch.no_grad():
            call()  # and the entry still serves the plain call
        if store == "c++":
            assert _hits() == h + 1

    close = lambda out: _err(out, want) < 2e-6  # noqa: E731
    unused(lambda: call(x.double(), w.double()), lambda o: o.dtype == torch.float64 and close(o))
    unused(lambda: call(x.contiguous(memory_format=torch.channels_last)), lambda o: close(o))
    unused(lambda: call(torch.randn(2, 3, 9, 18)[..., ::2]))  # other strides
    unused(lambda: lkconv.depthwise_conv2d(x, w, torch.zeros(3), 1, 1), lambda o: close(o))
    unused(lambda: call(x.clone().requires_grad_(True)), lambda o: o.requires_grad)
    unused(lambda: call(backend="reference"), lambda o: close(o))
    unused(lambda: lkconv.depthwise_conv2d(x, w, None, (1, 1), 1), lambda o: close(o))  # another spelling

    def dispatch_mode():
        from torch.utils._python_dispatch import TorchDispatchMode

        class Seen(TorchDispatchMode):
            ops = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.ops.append(str(func))
                return func(*args, **(kwargs or {}))

        with Seen():
            out = call()
        assert any("lkconv" in o for o in Seen.ops), Seen.ops  # the mode saw lkconv's op
        return out

    def forward_ad():
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            out = lkconv.depthwise_conv2d(fwAD.make_dual(x, torch.ones_like(x)), w, None, 1, 1)
            tangent = fwAD.unpack_dual(out).tangent
        assert tangent is not None
        return fwAD.unpack_dual(out).primal

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call()
        assert out.dtype == torch.bfloat16
        return out

    def threads():
        old = torch.get_num_threads()
        torch.set_num_threads(1 if old != 1 else 2)
        try:
            return call()
        finally:
            torch.set_num_threads(old)

    def forced():
        with cpu_mod.force_path("direct"):
            return call()

    def traced():
        # check_trace=False: the trace check re-runs the function eagerly (a plain call, rightly remembered)
        return torch.jit.trace(lambda u: lkconv.depthwise_conv2d(u, w, None, 1, 1), (x,), check_trace=False)(x)

    def profiled():
        with torch.autograd.profiler.profile():
            return call()

    for fn in (dispatch_mode, forward_ad, threads, forced, traced, profiled):
        unused(fn, close)
    unused(autocast)
    unused(lambda: torch.vmap(lambda u: lkconv.depthwise_conv2d(u, w, None, 1, 1))(x.unsqueeze(0))[0], close)
