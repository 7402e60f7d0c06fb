"""Bad-input matrix: every invalid call to lkconv's public API raises a clear Python exception of the
right type whose message names the offending argument.  Nothing may crash the process.

Each row is (id, call, exception type, regex the message must match).  The regexes name the
argument (input / weight / bias / stride / padding / dilation / backend / groups / model /
min_kernel ...), so an unhelpful message ("Expected a value of type List[int]") fails the test.
"""
import re

import pytest
import torch
import torch.nn as nn

import lkconv
from lkconv import BackendUnavailableError, UnsupportedError


x = torch.randn(2, 3, 8, 8)
w = torch.randn(3, 1, 3, 3)
b = torch.randn(3)
dw = lkconv.depthwise_conv2d


def conv(*args, **kwargs):
    return lambda: dw(*args, **kwargs)


BAD_INPUTS = [
    # --- tensor types and ranks -----------------------------------------------------------------
    ("input-not-tensor", conv([[1.0]], w), TypeError, r"input must be a torch\.Tensor"),
    ("input-None", conv(None, w), TypeError, r"input must be a torch\.Tensor"),
    ("input-numpy", conv(x.numpy(), w), TypeError, r"input must be a torch\.Tensor"),
    ("weight-not-tensor", conv(x, 3.0), TypeError, r"weight must be a torch\.Tensor"),
    ("weight-None", conv(x, None), TypeError, r"weight must be a torch\.Tensor"),
    ("bias-not-tensor", conv(x, w, [1.0, 2.0, 3.0]), TypeError, r"bias must be a torch\.Tensor or None"),
    ("input-rank0", conv(torch.tensor(1.0), w), ValueError, r"input must be 4-D"),
    ("input-rank1", conv(torch.randn(8), w), ValueError, r"input must be 4-D"),
    ("input-rank2", conv(torch.randn(8, 8), w), ValueError, r"input must be 4-D"),
    ("input-rank5", conv(torch.randn(1, 2, 3, 8, 8), w), ValueError, r"input must be 4-D"),
    ("weight-rank2", conv(x, torch.randn(3, 3)), ValueError, r"weight must have shape \(m\*C, 1, KH, KW\)"),
    ("weight-rank3", conv(x, torch.randn(3, 3, 3)), ValueError, r"weight must have shape \(m\*C, 1, KH, KW\)"),
    ("weight-rank5", conv(x, torch.randn(3, 1, 1, 3, 3)), ValueError, r"weight must have shape"),
    # --- shapes ---------------------------------------------------------------------------------
    ("weight-not-depthwise", conv(x, torch.randn(3, 2, 3, 3)), ValueError, r"weight must have shape \(m\*C, 1, KH, KW\)"),
    ("weight-full-conv", conv(x, torch.randn(3, 3, 3, 3)), ValueError, r"weight must have shape"),
    ("weight-channels-mismatch", conv(x, torch.randn(4, 1, 3, 3)), ValueError, r"weight has 4 output channels but input has C=3"),
    ("weight-channels-mismatch-unbatched", conv(torch.randn(5, 8, 8), w), ValueError, r"weight has 3 .*C=5"),
    ("weight-empty-kernel-h", conv(x, torch.randn(3, 1, 0, 3)), ValueError, r"weight kernel size must be >= 1"),
    ("weight-empty-kernel-w", conv(x, torch.randn(3, 1, 3, 0)), ValueError, r"weight kernel size must be >= 1"),
    ("bias-wrong-length", conv(x, w, torch.randn(4)), ValueError, r"bias must have shape \(3,\)"),
    ("bias-2d", conv(x, w, torch.randn(3, 1)), ValueError, r"bias must have shape \(3,\)"),
    ("bias-scalar", conv(x, w, torch.tensor(1.0)), ValueError, r"bias must have shape \(3,\)"),
    ("input-zero-channels", conv(torch.randn(2, 0, 8, 8), torch.randn(0, 1, 3, 3)), ValueError, r"input must have at least one channel"),
    ("input-zero-height", conv(torch.randn(2, 3, 0, 8), w, padding=1), ValueError, r"input spatial size"),
    ("input-zero-width", conv(torch.randn(2, 3, 8, 0), w, padding=1), ValueError, r"input spatial size"),
    # --- dtypes ---------------------------------------------------------------------------------
    ("input-int64", conv(x.long(), w.long()), TypeError, r"input dtype must be one of"),
    ("input-int32", conv(x.int(), w), TypeError, r"input dtype must be one of"),
    ("input-uint8", conv(x.to(torch.uint8), w.to(torch.uint8)), TypeError, r"input dtype must be one of"),
    ("input-bool", conv(x > 0, w > 0), TypeError, r"input dtype must be one of"),
    ("input-complex64", conv(x.to(torch.complex64), w.to(torch.complex64)), TypeError, r"input dtype must be one of"),
    ("input-complex128", conv(x.to(torch.complex128), w.to(torch.complex128)), TypeError, r"input dtype must be one of"),
    ("input-float8", conv(x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)), TypeError, r"input dtype must be one of"),
    ("weight-int-input-float", conv(x, w.long()), TypeError, r"weight dtype torch\.int64 does not match input dtype"),
    ("mixed-fp32-fp64", conv(x, w.double()), TypeError, r"weight dtype torch\.float64 does not match input dtype torch\.float32"),
    ("mixed-fp16-fp32", conv(x.half(), w), TypeError, r"weight dtype torch\.float32 does not match input dtype torch\.float16"),
    ("mixed-bias-dtype", conv(x, w, b.double()), TypeError, r"bias dtype torch\.float64 does not match input dtype"),
    ("mixed-bias-bf16", conv(x, w, b.bfloat16()), TypeError, r"bias dtype torch\.bfloat16 does not match"),
    # --- devices --------------------------------------------------------------------------------
    ("input-meta-weight-cpu", conv(x.to("meta"), w), ValueError, r"weight is on cpu but input is on meta"),
    ("input-cpu-weight-meta", conv(x, w.to("meta")), ValueError, r"weight is on meta but input is on cpu"),
    ("bias-on-meta", conv(x, w, b.to("meta")), ValueError, r"bias is on meta but input is on cpu"),
    # --- stride ---------------------------------------------------------------------------------
    ("stride-0", conv(x, w, stride=0), ValueError, r"stride must be >= 1"),
    ("stride-neg", conv(x, w, stride=-1), ValueError, r"stride must be >= 1"),
    ("stride-pair-0", conv(x, w, stride=(1, 0)), ValueError, r"stride must be >= 1"),
    ("stride-float", conv(x, w, stride=1.5), TypeError, r"stride must be an int or a pair of ints"),
    ("stride-float-int-valued", conv(x, w, stride=2.0), TypeError, r"stride must be an int"),
    ("stride-str", conv(x, w, stride="foo"), TypeError, r"stride must be an int"),
    ("stride-3tuple", conv(x, w, stride=(1, 2, 3)), TypeError, r"stride must be an int or a pair"),
    ("stride-empty", conv(x, w, stride=()), TypeError, r"stride must be an int or a pair"),
    ("stride-None", conv(x, w, stride=None), TypeError, r"stride must be an int"),
    ("stride-bool", conv(x, w, stride=True), TypeError, r"stride must be an int"),
    ("stride-tensor", conv(x, w, stride=torch.tensor(1)), TypeError, r"stride must be an int"),
    ("stride-huge", conv(x, w, stride=2**70), ValueError, r"stride must be <="),
    # --- padding --------------------------------------------------------------------------------
    ("padding-neg", conv(x, w, padding=-1), ValueError, r"padding must be >= 0"),
    ("padding-pair-neg", conv(x, w, padding=(1, -1)), ValueError, r"padding must be >= 0"),
    ("padding-4tuple-neg", conv(x, w, padding=(0, 0, 0, -1)), ValueError, r"padding must be >= 0"),
    ("padding-float", conv(x, w, padding=1.5), TypeError, r"padding must be an int"),
    ("padding-str", conv(x, w, padding="foo"), ValueError, r"padding must be an int, a pair, 'same' or 'valid'"),
    ("padding-3tuple", conv(x, w, padding=(1, 2, 3)), TypeError, r"padding must be an int, a pair, a 4-tuple"),
    ("padding-5tuple", conv(x, w, padding=(1, 1, 1, 1, 1)), TypeError, r"padding must be .*4-tuple"),
    ("padding-4tuple-float", conv(x, w, padding=(1, 1, 1, 1.0)), TypeError, r"padding 4-tuple .* must hold ints"),
    ("padding-None", conv(x, w, padding=None), TypeError, r"padding must be an int"),
    ("padding-bool", conv(x, w, padding=False), TypeError, r"padding must be an int"),
    ("padding-huge", conv(x, w, padding=2**70), ValueError, r"padding must be <="),
    ("padding-4tuple-huge", conv(x, w, padding=(0, 0, 0, 2**70)), ValueError, r"padding must be <="),
    ("padding-same-stride2", conv(x, w, stride=2, padding="same"), ValueError, r"padding='same' is not supported for strided.*stride=2"),
    ("padding-same-stride-pair", conv(x, w, stride=(1, 2), padding="same"), ValueError, r"padding='same'.*stride"),
    # --- dilation -------------------------------------------------------------------------------
    ("dilation-0", conv(x, w, dilation=0), ValueError, r"dilation must be >= 1"),
    ("dilation-neg", conv(x, w, dilation=-1), ValueError, r"dilation must be >= 1"),
    ("dilation-float", conv(x, w, dilation=1.5), TypeError, r"dilation must be an int"),
    ("dilation-str", conv(x, w, dilation="foo"), TypeError, r"dilation must be an int"),
    ("dilation-3tuple", conv(x, w, dilation=(1, 2, 3)), TypeError, r"dilation must be an int or a pair"),
    ("dilation-huge", conv(x, w, dilation=2**70), ValueError, r"dilation must be <="),
    # --- output size <= 0 -----------------------------------------------------------------------
    ("output-empty-kernel-gt-input", conv(x, torch.randn(3, 1, 9, 9)), ValueError, r"output size \(0, 0\) is not positive.*weight/padding"),
    ("output-empty-height-only", conv(torch.randn(1, 3, 4, 20), torch.randn(3, 1, 7, 3)), ValueError, r"output size \(-2, 18\) is not positive"),
    ("output-empty-dilation", conv(x, w, dilation=5), ValueError, r"output size .* is not positive.*dilated kernel \(11x11\)"),
    ("output-empty-valid", conv(x, torch.randn(3, 1, 31, 31), padding="valid"), ValueError, r"output size .* is not positive"),
    # --- backend names --------------------------------------------------------------------------
    ("backend-unknown", conv(x, w, backend="foo"), ValueError, r"unknown backend 'foo' \(argument: backend\)"),
    ("backend-empty-string", conv(x, w, backend=""), ValueError, r"unknown backend '' \(argument: backend\)"),
    ("backend-case", conv(x, w, backend="CPU"), ValueError, r"unknown backend 'CPU'"),
    ("backend-int", conv(x, w, backend=3), TypeError, r"backend must be a string"),
    ("set-backend-unknown", lambda: lkconv.set_backend("foo"), ValueError, r"unknown backend 'foo' \(argument: backend\)"),
    ("use-backend-unknown", lambda: lkconv.use_backend("nope").__enter__(), ValueError, r"unknown backend 'nope'"),
    # --- modules ----------------------------------------------------------------------------------
    ("module-not-depthwise-groups1", lambda: lkconv.LargeKernelConv2d(4, 4, 3), ValueError, r"groups == in_channels and out_channels a multiple"),
    ("module-not-depthwise-out", lambda: lkconv.LargeKernelConv2d(4, 6, 3, groups=4), ValueError, r"depthwise only.*out_channels=6"),
    ("module-not-depthwise-in", lambda: lkconv.LargeKernelConv2d(2, 3, 3, groups=2), ValueError, r"in_channels=2, out_channels=3, groups=2"),
    ("module-bad-padding-mode", lambda: lkconv.LargeKernelConv2d(3, 3, 3, groups=3, padding_mode="foo"), ValueError, r"padding_mode"),
    ("module-wrong-input-channels", lambda: lkconv.LargeKernelConv2d(3, 3, 3, groups=3)(torch.randn(1, 4, 8, 8)), ValueError, r"weight has 3 output channels but input has C=4"),
    ("module-int-input", lambda: lkconv.LargeKernelConv2d(3, 3, 3, groups=3)(torch.ones(1, 3, 8, 8, dtype=torch.long)), TypeError, r"input dtype must be one of"),
    ("module-input-too-small", lambda: lkconv.LargeKernelConv2d(3, 3, 7, groups=3)(torch.randn(1, 3, 4, 4)), ValueError, r"output size .* is not positive"),
    ("module-unknown-backend", lambda: lkconv.LargeKernelConv2d(3, 3, 3, groups=3, backend="foo")(x), ValueError, r"unknown backend 'foo' \(argument: backend\)"),
    ("implicitgemm-zero-channels", lambda: lkconv.DepthWiseConv2dImplicitGEMM(0, 3), ValueError, r"groups"),
    ("implicitgemm-empty-kernel", lambda: lkconv.DepthWiseConv2dImplicitGEMM(3, 0)(x), ValueError, r"weight kernel size must be >= 1"),
    ("convert-not-module", lambda: lkconv.convert(3), TypeError, r"model must be an nn\.Module"),
    ("convert-state-dict", lambda: lkconv.convert(nn.Conv2d(3, 3, 5, groups=3).state_dict()), TypeError, r"model must be an nn\.Module"),
    ("convert-min-kernel-0", lambda: lkconv.convert(nn.Conv2d(3, 3, 5, groups=3), min_kernel=0), ValueError, r"min_kernel must be a positive int"),
    ("convert-min-kernel-str", lambda: lkconv.convert(nn.Conv2d(3, 3, 5, groups=3), min_kernel="5"), ValueError, r"min_kernel must be a positive int"),
    ("convert-min-kernel-float", lambda: lkconv.convert(nn.Conv2d(3, 3, 5, groups=3), min_kernel=5.0), ValueError, r"min_kernel"),
    ("convert-min-kernel-bool", lambda: lkconv.convert(nn.Conv2d(3, 3, 5, groups=3), min_kernel=True), ValueError, r"min_kernel must be a positive int"),
    ("convert-unknown-backend", lambda: lkconv.convert(nn.Conv2d(3, 3, 5, groups=3), backend="foo"), ValueError, r"unknown backend 'foo'"),
]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_clear_error(call, exc, pattern):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert re.search(pattern, msg), f"message does not match {pattern!r}: {msg!r}"


def test_bad_input_ids_unique():
    ids = [c[0] for c in BAD_INPUTS]
    assert len(ids) == len(set(ids))


def test_default_backend_survives_failed_use_backend():
    before = lkconv.get_default_backend()
    with pytest.raises(ValueError, match="backend"):
        with lkconv.use_backend("nope"):
            pass
    assert lkconv.get_default_backend() == before


def test_errors_raised_before_any_backend_work_under_no_grad_and_grad():
    """The same validation runs with and without autograd (no path skips it)."""
    xr = x.clone().requires_grad_(True)
    for ctx in (torch.no_grad, torch.enable_grad):
        with ctx():
            with pytest.raises(ValueError, match="stride must be >= 1"):
                dw(xr, w, stride=0)
            with pytest.raises(TypeError, match="weight dtype"):
                dw(xr, w.double())


# --- backends that cannot run here ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cuda", "triton", "cpu"])
def test_unavailable_backend_raises_backend_unavailable(name):
    why = lkconv.backend_status().get(name)
    if why is None:
        pytest.skip(f"backend {name!r} is available in this process; nothing to check")
    with pytest.raises(BackendUnavailableError, match=rf"backend '{name}' is not available: .+"):
        dw(x, w, backend=name)
    # and the status line explains it without raising
    assert isinstance(why, str) and why.strip()


def test_cuda_backend_unavailable_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    why = lkconv.backend_status()["cuda"]
    assert why, "the cuda backend claims to be available on a machine without a GPU"
    with pytest.raises(BackendUnavailableError, match="cuda"):
        dw(x, w, backend="cuda")


def test_auto_never_picks_an_unavailable_backend():
    out = dw(x, w, padding=1, backend="auto")
    assert out.shape == (2, 3, 8, 8)


# --- a backend that declines a case ------------------------------------------------------------------
def _available():
    return [n for n, why in lkconv.backend_status().items() if why is None]


@pytest.mark.parametrize("name", ["cpu", "cuda", "triton"])
def test_explicit_backend_declines_meta_tensors_or_computes_shape(name):
    """An explicitly requested backend either serves a meta tensor (shape only) or declines with
    UnsupportedError naming itself -- it never crashes or returns garbage shapes."""
    if name not in _available():
        pytest.skip(f"backend {name!r} not available: {lkconv.backend_status()[name]}")
    xm, wm = x.to("meta"), w.to("meta")
    try:
        out = dw(xm, wm, padding=1, backend=name)
    except UnsupportedError as e:
        assert re.search(rf"backend '{name}' does not support this case", str(e)), str(e)
    else:
        assert out.shape == (2, 3, 8, 8) and out.device.type == "meta"


@pytest.mark.parametrize("name", ["reference", "torch", "cpu", "triton", "cuda"])
def test_tensor_larger_than_int32_indexing_is_served_or_declined(name):
    """> 2**31 elements (on the meta device: no memory).  Every available backend either declines
    with UnsupportedError or produces the right output shape; none may crash."""
    if name not in _available():
        pytest.skip(f"backend {name!r} not available: {lkconv.backend_status()[name]}")
    xm = torch.empty(2, 64, 4096, 4100, device="meta")
    assert xm.numel() > 2**31
    wm = torch.empty(64, 1, 31, 31, device="meta")
    try:
        out = dw(xm, wm, padding=15, backend=name)
    except UnsupportedError as e:
        assert name in str(e)
    else:
        assert out.shape == (2, 64, 4096, 4100)
