"""The remembered delegation of eager CPU calls (lkconv.ops.delegation_key / remember_delegation): a
call seen before runs F.conv2d at once, with the same numbers, strides and autograd node as the first
call and the fp64 reference; anything its decision reads (shapes, strides, dtypes, flags, the thread
count, a forced path or backend, the delegation rule) gives a different key and so the decision of
that case; validation errors are raised every time."""
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


@pytest.fixture(autouse=True)
def _fresh_cache():
    ops.clear_delegation_cache()
    yield
    ops.clear_delegation_cache()


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
def test_remembered_call_matches_the_first_call_and_the_fp64_reference(padding, stride, layout, dtype, monkeypatch):
    torch.manual_seed(0)
    K = 3
    x = torch.randn(2, 4, 11, 10, dtype=dtype).contiguous(memory_format=FMT[layout])
    w = torch.randn(4, 1, K, K, dtype=dtype)
    b = torch.randn(4, dtype=dtype)
    p = normalize_params(stride, padding, 1, (K, K))
    ref = ReferenceBackend()
    want = ref.forward(x.double(), w.double(), b.double(), p)
    key = ops.delegation_key(x, w, b, stride, padding, 1, None)
    assert key is not None
    seen = _spy(monkeypatch)
    outs = []
    with torch.no_grad():
        for _ in range(3):  # the first call decides and remembers, the others hit
            outs.append(lkconv.depthwise_conv2d(x, w, b, stride, padding))
    assert seen == []  # delegated: none of the cpu backend's passes
    assert key in ops._DELEGATED
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


def test_calls_that_are_not_plain_are_never_remembered():
    x = torch.randn(1, 2, 8, 8)
    w = torch.randn(2, 1, 3, 3)
    assert ops.delegation_key(x, w, None, 1, 1, 1, None) is not None
    assert ops.delegation_key(x, w, None, [1, 1], 1, 1, None) is None  # a list: not hashable as is
    assert ops.delegation_key(x, w, None, True, 1, 1, None) is None  # a bool is not an int here
    assert ops.delegation_key(x, w, None, (1, True), 1, 1, None) is None
    assert ops.delegation_key(x, w, None, 1, (1, 1, 0, 0), 1, None) is None  # asymmetric: not delegated
    assert ops.delegation_key(x[0], w, None, 1, 1, 1, None) is None  # unbatched
    assert ops.delegation_key(x, w, None, 1, 1, 1, ["cpu"]) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.delegation_key(x, w, None, 1, 1, 1, None) is None
    with torch.autograd.profiler.profile():
        assert ops.delegation_key(x, w, None, 1, 1, 1, None) is None
    old = ops.EAGER_FAST_PATH
    ops.EAGER_FAST_PATH = False
    try:
        assert ops.delegation_key(x, w, None, 1, 1, 1, None) is None
    finally:
        ops.EAGER_FAST_PATH = old
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
    assert not ops._DELEGATED


def test_flags_shapes_forced_paths_and_backends_change_the_decision(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(1, 2, 12, 12).contiguous(memory_format=torch.channels_last)
    w5 = torch.randn(2, 1, 5, 5)
    seen = _spy(monkeypatch)
    with torch.no_grad():
        lkconv.depthwise_conv2d(x, w5, None, 1, "same")  # K=5 cl forward: PyTorch's cl kernel, delegated
    assert seen == [] and len(ops._DELEGATED) == 1
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
