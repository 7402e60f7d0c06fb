"""lkconv.depthwise_conv2d: semantics (== F.conv2d(groups=C)), argument handling, backend choice,
autocast, memory format.  Numerical cases go through lkconv.testing against the fp64 reference."""
import pytest
import torch
import torch.nn.functional as F

import lkconv
from lkconv.backends import resolve_backend
from lkconv.params import normalize_params
from lkconv.testing import compare_all_passes

from cases import GENERIC_CASES, make_inputs

CASES = GENERIC_CASES  # tests/cases.py: the curated feature list (every backend's own file covers the same)


def make(case, dtype=torch.float32, device="cpu"):
    c = CASES[case]
    x, w, b = make_inputs(c, dtype, device)
    s, p, d = c.conv_args
    return x, w, b, dict(stride=s, padding=p, dilation=d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_all_passes_against_fp64_reference(case, backend, dtype):
    x, w, b, kw = make(case, dtype)
    res = compare_all_passes(backend, x, w, b, **kw)
    assert res and all(r.ok for r in res), [str(r) for r in res]


@pytest.mark.parametrize("case", ["k7-bias", "even-k4-same", "stride2", "dil2", "asym-4tuple"])
def test_equals_F_conv2d_exactly_in_semantics(case):
    """Same shapes and values as F.conv2d(groups=C) for the argument forms F.conv2d accepts."""
    x, w, b, kw = make(case, torch.float64)
    if isinstance(kw["padding"], tuple) and len(kw["padding"]) == 4:
        t, bo, l, r = kw["padding"]
        ref = F.conv2d(F.pad(x, (l, r, t, bo)), w, b, kw["stride"], 0, kw["dilation"], groups=x.shape[1])
    else:
        ref = F.conv2d(x, w, b, groups=x.shape[1], **kw)
    out = lkconv.depthwise_conv2d(x, w, b, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_unbatched_input():
    x = torch.randn(3, 10, 10, dtype=torch.float64)
    w = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    out = lkconv.depthwise_conv2d(x, w, padding=2)
    torch.testing.assert_close(out, F.conv2d(x, w, padding=2, groups=3))
    assert out.shape == (3, 10, 10)


def test_channels_last_in_channels_last_out():
    x = torch.randn(2, 6, 9, 9).to(memory_format=torch.channels_last)
    w = torch.randn(6, 1, 5, 5)
    out = lkconv.depthwise_conv2d(x, w, padding=2)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    out = lkconv.depthwise_conv2d(x.contiguous(), w, padding=2)
    assert out.is_contiguous()


def test_nan_and_inf_propagate_like_torch():
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    x[0, 0, 3, 3] = float("nan")
    x[0, 1, 5, 5] = float("inf")
    w = torch.rand(2, 1, 3, 3, dtype=torch.float64) + 0.1
    out = lkconv.depthwise_conv2d(x, w, padding=1)
    ref = F.conv2d(x, w, padding=1, groups=2)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))


def test_cpu_autocast_bf16_like_nn_conv2d():
    x = torch.randn(2, 4, 9, 9)
    w = torch.randn(4, 1, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lkconv.depthwise_conv2d(x, w, padding=2)
        ref = F.conv2d(x, w, padding=2, groups=4)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)


def test_autocast_leaves_fp64_alone():
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lkconv.depthwise_conv2d(x, w, padding=1).dtype == torch.float64


def test_backend_selection_per_call_global_and_context():
    x = torch.randn(1, 2, 6, 6)
    w = torch.randn(2, 1, 3, 3)
    p = normalize_params(1, 1, 1, (3, 3))
    assert resolve_backend("torch", x, w, p) == "torch"
    assert lkconv.get_default_backend() == "auto"
    with lkconv.use_backend("reference"):
        assert resolve_backend(None, x, w, p) == "reference"
        # per call beats the global setting
        assert resolve_backend("torch", x, w, p) == "torch"
    assert lkconv.get_default_backend() == "auto"
    lkconv.set_backend("torch")
    try:
        assert resolve_backend(None, x, w, p) == "torch"
    finally:
        lkconv.set_backend("auto")
    # auto on CPU picks the fastest available CPU-capable backend
    assert resolve_backend("auto", x, w, p) in ("cpu", "torch")
    if lkconv.backend_status().get("cpu") is None:
        assert resolve_backend("auto", x, w, p) == "cpu"


def test_unknown_backend_names_the_argument():
    x = torch.randn(1, 2, 6, 6)
    w = torch.randn(2, 1, 3, 3)
    with pytest.raises(ValueError, match="backend"):
        lkconv.depthwise_conv2d(x, w, backend="nope")
    with pytest.raises(ValueError, match="backend"):
        lkconv.set_backend("nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_unavailable_backend_says_why():
    x = torch.randn(1, 2, 6, 6)
    w = torch.randn(2, 1, 3, 3)
    with pytest.raises(lkconv.BackendError) as ei:
        lkconv.depthwise_conv2d(x, w, backend="cuda")
    assert "cuda" in str(ei.value)


def test_gradients_only_for_what_requires_grad():
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    lkconv.depthwise_conv2d(x, w, padding=1).sum().backward()
    assert x.grad is not None and w.grad is None


def test_require_is_the_one_resolution_point():
    from lkconv.backends import Request, UnsupportedError, require, validate_backend_name

    x = torch.randn(1, 2, 6, 6)
    w = torch.randn(2, 1, 3, 3)
    p = normalize_params(1, 1, 1, (3, 3))
    req = Request.of("grad_weight", x, w, p)
    assert req.weight_dtype is None and req.output_shape == (1, 2, 6, 6)
    assert require("torch", req).name == "torch"
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        require("auto", req)
    with pytest.raises(ValueError, match=r"unknown backend 'nope' \(argument: backend\)"):
        require("nope", req)
    # a backend that declines a pass raises UnsupportedError naming the pass
    xi = Request("grad_input", x.device, torch.int32, torch.int32, (1, 2, 6, 6), (2, 1, 3, 3), p)
    with pytest.raises(UnsupportedError, match=r"'cpu' does not support this case \(grad_input\)"):
        require("cpu", xi)
    # the op itself goes through require: a direct call the backend declines says so, naming the pass
    with pytest.raises(UnsupportedError, match=r"'cpu' does not support this case \(forward\).*int32"):
        torch.ops.lkconv.dwconv2d(x.int(), w.int(), None, [1, 1], [1, 1, 1, 1], [1, 1], "cpu")
    validate_backend_name(None)
    with pytest.raises(TypeError, match="backend must be a string"):
        validate_backend_name(None, allow_none=False)
    with pytest.raises(TypeError, match="backend must be a string"):
        validate_backend_name(3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type (CUDA)")
def test_direct_op_call_on_mixed_devices_names_them():
    x = torch.randn(1, 2, 6, 6)
    w = torch.randn(2, 1, 3, 3, device="cuda")
    with pytest.raises(ValueError, match="different devices"):
        torch.ops.lkconv.dwconv2d(x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], "torch")


def test_make_inputs_layouts():
    """tests/cases.py's builder: the layout it is asked for, the case's bias, reproducible with a seed."""
    from cases import Case

    c = Case("t", (2, 3, 5, 6), (3, 2), bias=True)
    x, w, b = make_inputs(c, torch.float16)
    assert x.shape == (2, 3, 5, 6) and w.shape == (3, 1, 3, 2) and b.shape == (3,) and x.dtype == torch.float16
    assert x.is_contiguous()
    x, _, _ = make_inputs(c, layout="channels_last")
    assert not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    x, _, b = make_inputs(c, layout="sliced", bias=False)
    assert b is None and not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(make_inputs(c, seed=3)[1], make_inputs(c, seed=3)[1])
    with pytest.raises(ValueError, match="layout"):
        make_inputs(c, layout="nhwc")
