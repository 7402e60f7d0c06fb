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
        # the registered instance's path set after it was made (CPUBackend.path): that path
        inst = lkconv.backends.get_backend("cpu")
        monkeypatch.setattr(inst, "path", "direct")
        lkconv.depthwise_conv2d(x, w5, None, 1, "same")
        assert seen == ["forward"]
        seen.clear()
        monkeypatch.setattr(inst, "path", None)
        lkconv.depthwise_conv2d(x, w5, None, 1, "same")
        assert seen == []
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

    def function_mode():
        from torch.overrides import TorchFunctionMode

        class Seen(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        with Seen():
            return call()

    def kineto_profiled():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
            return call()

    for fn in (dispatch_mode, forward_ad, threads, forced, traced, profiled, function_mode, kineto_profiled):
        unused(fn, close)
    unused(autocast)
    unused(lambda: torch.vmap(lambda u: lkconv.depthwise_conv2d(u, w, None, 1, 1))(x.unsqueeze(0))[0], close)
    # the other torch.func transforms (functorch's interpreter stack: its dynamic-layer keys in the TLS)
    conv_sum = lambda u: lkconv.depthwise_conv2d(u, w, None, 1, 1).sum()  # noqa: E731
    gw = torch.nn.functional.conv2d(torch.ones(1, 3, 11, 11), w, None, 1, 0, 1, 3)  # d sum / d x, as a conv
    unused(lambda: torch.func.grad(conv_sum)(x), lambda g: torch.allclose(g, gw.expand_as(x), atol=1e-5))
    unused(lambda: torch.func.jvp(conv_sum, (x,), (torch.zeros_like(x),))[1], lambda t: float(t) == 0.0)
    unused(lambda: torch.func.vjp(lambda u: lkconv.depthwise_conv2d(u, w, None, 1, 1), x)[0], close)


def _plain_call(x, w):
    with torch.no_grad():
        return lkconv.depthwise_conv2d(x, w, None, 1, 1)


def test_a_state_object_whose_eq_changes_or_clears_the_store(monkeypatch, store):
    """A state fact compared with __eq__ (here the default backend, a str subclass) may run Python code
    that forgets or adds remembered calls while the store is being scanned: the scan stops (a miss, the
    Python path decides), never reads a forgotten entry (the C++ store used to answer from it) and never
    crashes when the entries move (many new ones remembered from inside __eq__)."""
    import lkconv.backends as backends

    torch.manual_seed(0)
    x, w = torch.randn(1, 2, 8, 8), torch.randn(2, 1, 3, 3)
    want = F.conv2d(x, w, None, 1, 1, 1, 2)

    class Name(str):
        action = None

        def __eq__(self, other):
            act, Name.action = Name.action, None
            if act is not None:
                act()
            return str.__eq__(self, other)

        __hash__ = str.__hash__

    monkeypatch.setattr(backends, "_default_backend", Name("auto"))
    _plain_call(x, w)
    assert ops.remembered_delegations() == 1
    monkeypatch.setattr(backends, "_default_backend", Name("auto"))  # equal, another object: __eq__ runs
    # forget everything, then remember another call (its entry where the compared one was)
    Name.action = lambda: (ops.clear_delegation_cache(), _plain_call(torch.randn(1, 2, 8, 5), w))
    h = _hits()
    out = _plain_call(x, w)
    assert torch.equal(out, want)
    assert _hits() == h, "answered from an entry forgotten during the comparison"
    assert ops.remembered_delegations() == 2  # the other call, and this one (the Python path decided)
    # entries added from inside __eq__ (the vector reallocates under the scan)
    monkeypatch.setattr(backends, "_default_backend", Name("auto"))
    Name.action = lambda: [_plain_call(torch.randn(1, 2, 8, 4 + i), w) for i in range(40)]
    for _ in range(3):
        assert torch.equal(_plain_call(x, w), want)
    assert ops.remembered_delegations() >= 2


def test_a_state_object_whose_eq_raises_is_a_miss(monkeypatch, store):
    """An __eq__ that raises: not the same state (no error escapes, none is left set), the call's own result."""
    import lkconv.backends as backends

    x, w = torch.randn(1, 2, 8, 8), torch.randn(2, 1, 3, 3)
    want = F.conv2d(x, w, None, 1, 1, 1, 2)

    class Name(str):
        def __eq__(self, other):
            if type(other) is Name and other is not self:
                raise RuntimeError("no comparing")
            return str.__eq__(self, other)

        __hash__ = str.__hash__

    monkeypatch.setattr(backends, "_default_backend", Name("auto"))
    _plain_call(x, w)
    for _ in range(3):
        monkeypatch.setattr(backends, "_default_backend", Name("auto"))
        assert torch.equal(_plain_call(x, w), want)
        assert torch.equal(_plain_call(x, w), want)


def test_a_mutable_auto_chain_is_not_remembered(monkeypatch, store):
    """AUTO_CHAIN["cpu"] set to a list (as users may write it): the call works but is not remembered
    (the Python store cannot hash it; the C++ store would hold the very list, so an in-place edit
    would go unseen); edited in place, the new chain decides."""
    import lkconv.backends as backends
    from lkconv.backends.torch_native import TorchBackend

    monkeypatch.setitem(backends.AUTO_CHAIN, "cpu", ["cpu", "torch"])
    x, w = torch.randn(1, 2, 8, 8), torch.randn(2, 1, 3, 3)
    h = _hits()
    for _ in range(3):
        assert torch.equal(_plain_call(x, w), F.conv2d(x, w, None, 1, 1, 1, 2))
    assert ops.remembered_delegations() == 0 and _hits() == h
    seen = []
    real = TorchBackend.forward
    monkeypatch.setattr(TorchBackend, "forward", lambda self, *a: seen.append(1) or real(self, *a))
    backends.AUTO_CHAIN["cpu"][0] = "torch"  # in place: auto now takes the torch backend
    _plain_call(x, w)
    assert seen == [1]


def test_the_store_forgets_everything_beyond_512_entries(store):
    w = torch.randn(2, 1, 3, 3)
    xs = [torch.randn(1, 2, 3, 3 + i) for i in range(ops._DELEGATED_MAX + 1)]
    for x in xs[:-1]:
        _plain_call(x, w)
    assert ops.remembered_delegations() == ops._DELEGATED_MAX
    h = _hits()
    _plain_call(xs[0], w)  # still remembered
    if store == "c++":
        assert _hits() == h + 1
    _plain_call(xs[-1], w)  # one too many: all forgotten, then this one remembered
    assert ops.remembered_delegations() == 1


def test_init_twice_and_clear(store):
    """init() again (a reload) forgets the entries and holds no extra references; clear() forgets them."""
    import sys

    if store != "c++":
        pytest.skip("the C++ store's own API")
    x, w = torch.randn(1, 2, 8, 8), torch.randn(2, 1, 3, 3)
    _plain_call(x, w)
    assert ops.remembered_delegations() == 1
    args = (torch.Tensor, torch.nn.Parameter, vars(ops), vars(ops._backends), vars(cpu_mod), vars(ops._forward_ad))
    ops._fast.init(*args)
    before = [sys.getrefcount(a) for a in args]
    for _ in range(5):
        ops._fast.init(*args)
    assert [sys.getrefcount(a) for a in args] == before, "init() leaks its previous references"
    assert ops.remembered_delegations() == 0
    _plain_call(x, w)
    h = _hits()
    _plain_call(x, w)
    assert _hits() == h + 1 and ops.remembered_delegations() == 1
    ops._fast.clear()
    assert ops.remembered_delegations() == 0 and ops._fast.call(x, w, None, 1, 1, 1, None) is None
    with pytest.raises(TypeError):
        ops._fast.call(x, w)
    # a non-strided input (mkldnn, sparse): not remembered by the C++ store (its sizes / strides are
    # not a strided tensor's facts); the call is F.conv2d's all the same
    xm = x.to_mkldnn()
    conv_args = ((1, 1), (1, 1), (1, 1), 2, torch.contiguous_format)
    assert ops._fast.remember(xm, w, None, 1, 1, 1, None, conv_args) is False
    assert ops._fast.remember(x.to_sparse(), w, None, 1, 1, 1, None, conv_args) is False
    assert ops._fast.remember(x, w, None, 1, 1, 1, None, conv_args) is True


def test_threads_calling_at_once(store):
    """Several threads hit the store at once (the convolution runs with the GIL released) while another
    clears it now and then: every result is F.conv2d's."""
    import threading

    torch.manual_seed(0)
    xs = [torch.randn(2, 4, 16, 16 + i) for i in range(4)]
    w = torch.randn(4, 1, 3, 3)
    wants = [F.conv2d(x, w, None, 1, 1, 1, 4) for x in xs]
    errors, stop = [], threading.Event()

    def worker(i):
        try:
            for _ in range(60):
                out = _plain_call(xs[i], w)
                if not torch.equal(out, wants[i]):
                    errors.append(f"thread {i}: wrong result")
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    def clearer():
        while not stop.is_set():
            ops.clear_delegation_cache()
            stop.wait(0.002)

    h = _hits()
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    c = threading.Thread(target=clearer)
    for t in ts + [c]:
        t.start()
    for t in ts:
        t.join()
    stop.set()
    c.join()
    assert errors == []
    if store == "c++":
        assert _hits() > h
