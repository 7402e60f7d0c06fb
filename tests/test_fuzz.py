"""Property-based fuzzing of every available backend against the fp64 reference (hypothesis).

A case is plain data (shapes, kernel, channel multiplier, stride/padding/dilation, dtype, memory
layouts of x / weight / grad_out, bias, requires_grad of each input, unbatched, a seed); :func:`run_case` builds the tensors
from it and checks the real op (``lkconv.depthwise_conv2d``, autograd included):

* an invalid geometry (C = 0, empty spatial input, output size <= 0, "same" with stride > 1)
  raises ``ValueError``;
* a backend that declines a needed pass (``check()`` returns a reason) raises ``UnsupportedError``;
* otherwise output and every requested gradient match the fp64 reference within the tolerance rule
  tolerance (``lkconv.testing.tolerance``), with the right shape, dtype and memory format, and no
  NaN where the reference is finite.  Unused parts of sliced buffers are filled with NaN, so a
  kernel that reads outside its view is caught.

Profiles (env ``LKCONV_FUZZ_PROFILE``):

* ``ci`` (default): bounded example counts (:data:`CI_EXAMPLES`), ``derandomize=True`` so CI
  always runs the same cases; small sizes.
* ``gpu``: >= 10,000 examples for each GPU backend (and more for the CPU ones), random seeds.

``LKCONV_FUZZ_EXAMPLES=N`` overrides the count for every backend.  A failure prints a ``run_case``
line that reproduces it::

    python -c "from tests.test_fuzz import run_case; run_case({...}, 'cpu', 'cpu')"

The Triton backend is fuzzed under ``TRITON_INTERPRET=1`` on CPU tensors when there is no GPU; the
interpreter must be enabled before triton is imported, so without it in the environment that test
re-runs itself in a subprocess with the variable set.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lkconv  # noqa: E402
from lkconv import UnsupportedError  # noqa: E402
from lkconv.backends import Request, get_backend  # noqa: E402
from lkconv.ops import memory_format_of  # noqa: E402
from lkconv.params import normalize_params  # noqa: E402
from lkconv.testing import _torch_d_all_passes, no_tf32, reference_all_passes, tolerance  # noqa: E402

# ------------------------------------------------------------------------------------------------
# profiles
# ------------------------------------------------------------------------------------------------
_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("gpu", derandomize=False, **_COMMON)

PROFILE = os.environ.get("LKCONV_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "gpu"):
    raise ValueError(f"LKCONV_FUZZ_PROFILE must be 'ci' or 'gpu', got {PROFILE!r}")

#: examples per (backend, device) in the ci profile (2 CPU cores: the whole file stays ~1-2 min)
CI_EXAMPLES = {
    ("reference", "cpu"): 30,
    ("torch", "cpu"): 80,
    ("cpu", "cpu"): 200,
    ("triton", "cpu"): 20,  # TRITON_INTERPRET=1: ~0.5-1 s per example
    ("triton", "cuda"): 300,
    ("cuda", "cuda"): 300,
    ("torch", "cuda"): 100,
}
GPU_EXAMPLES = {
    ("reference", "cpu"): 100,
    ("torch", "cpu"): 500,
    ("cpu", "cpu"): 2000,
    ("triton", "cpu"): 200,
    ("triton", "cuda"): 10_000,
    ("cuda", "cuda"): 10_000,
    ("torch", "cuda"): 2000,
}


def n_examples(backend: str, device: str, ci=None, gpu=None) -> int:
    """Examples for (backend, device) in this profile (tables default to the first-order ones)."""
    if os.environ.get("LKCONV_FUZZ_EXAMPLES"):
        return int(os.environ["LKCONV_FUZZ_EXAMPLES"])
    table = (gpu or GPU_EXAMPLES) if PROFILE == "gpu" else (ci or CI_EXAMPLES)
    return table[(backend, device)]


def fuzz_settings(backend: str, device: str) -> settings:
    return settings(settings.get_profile(PROFILE), max_examples=n_examples(backend, device))


# ------------------------------------------------------------------------------------------------
# cases (plain data)
# ------------------------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
X_LAYOUTS = ("nchw", "channels_last", "slice", "channels_last_slice", "permuted", "expand_batch")
W_LAYOUTS = ("contiguous", "slice", "channels_last")
G_LAYOUTS = ("contiguous", "channels_last", "slice", "expand_batch")
PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


@st.composite
def conv_cases(draw, tiny: bool = False, dtypes=tuple(DTYPES)):
    """One random depthwise-conv call.  ``tiny`` keeps it cheap for the Triton interpreter."""
    if tiny:
        kside = st.one_of(st.integers(1, 7), st.sampled_from([8, 13, 15]))
    else:
        # about half the sides small, a quarter medium, the rest large (the reference costs KH*KW
        # tensor ops per pass, so huge kernels are rarer and come with tiny images)
        kside = st.one_of(
            st.integers(1, 9), st.integers(1, 9), st.integers(10, 33),
            st.sampled_from([12, 13, 16, 17, 27, 31, 32, 51, 63]),
        )
    kh = draw(kside, label="KH")
    kw = kh if draw(st.booleans(), label="square") else draw(kside, label="KW")
    big = max(kh, kw)
    # keep the reference (KH*KW slices) and the tensors small: large kernels get tiny images
    hmax = 12 if tiny else (40 if big <= 9 else 24 if big <= 32 else 12)
    # zero sizes are rare on purpose (they are error paths or empty outputs, cheap and few)
    side = st.one_of(
        st.integers(1, hmax), st.integers(1, hmax),
        st.sampled_from([p for p in PRIMES if p <= hmax] + [1]), st.integers(0, hmax),
    )
    H = draw(side, label="H")
    W = draw(side, label="W")
    nmax, cmax = (2, 3) if tiny else (3, 6)
    N = draw(st.one_of(st.integers(1, nmax), st.integers(1, nmax), st.integers(0, nmax)), label="N")
    C = draw(st.one_of(st.integers(1, cmax), st.integers(1, cmax), st.integers(0, cmax)), label="C")

    stride = draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))), label="stride")
    dil = st.integers(1, 3) if big <= 17 else st.integers(1, 2)
    dilation = draw(st.one_of(dil, st.tuples(dil, dil)), label="dilation")
    dh, dw_ = (dilation, dilation) if isinstance(dilation, int) else dilation
    eh, ew = dh * (kh - 1) + 1, dw_ * (kw - 1) + 1  # effective kernel
    emax = max(eh, ew)
    padding = draw(
        st.one_of(
            st.just("same"),
            st.just("valid"),
            st.integers(0, emax),
            st.just(("half",)),  # eh//2, ew//2: the RepLKNet form
            st.tuples(st.integers(0, eh), st.integers(0, ew)),
            st.tuples(st.integers(0, eh), st.integers(0, eh), st.integers(0, ew), st.integers(0, ew)),
        ),
        label="padding",
    )
    if padding == ("half",):
        padding = (eh // 2, ew // 2)
    probe = dict(N=N, C=C, H=H, W=W, KH=kh, KW=kw, stride=stride, padding=padding, dilation=dilation)
    err = expected_error(probe)
    if err is not None and "channel" not in err and "spatial" not in err and draw(st.integers(0, 3), label="repair") > 0:
        # three times in four, turn an impossible geometry into the smallest padding that works
        # (plus a little), so most examples compute something; the rest check the error path
        need_h, need_w = max(0, eh - H), max(0, ew - W)
        eh_, ew_ = draw(st.integers(0, 2), label="extra_h"), draw(st.integers(0, 2), label="extra_w")
        padding = (need_h // 2, need_h - need_h // 2 + eh_, need_w // 2, need_w - need_w // 2 + ew_)
    dtype = draw(st.sampled_from(list(dtypes)), label="dtype")
    return dict(
        N=N, C=C, H=H, W=W, KH=kh, KW=kw,
        stride=stride, padding=padding, dilation=dilation, dtype=dtype,
        x_layout=draw(st.sampled_from(X_LAYOUTS), label="x_layout"),
        w_layout=draw(st.sampled_from(W_LAYOUTS), label="w_layout"),
        g_layout=draw(st.sampled_from(G_LAYOUTS), label="g_layout"),
        bias=draw(st.booleans(), label="bias"),
        rg=draw(st.tuples(st.booleans(), st.booleans(), st.booleans()), label="requires_grad(x,w,b)"),
        unbatched=draw(st.booleans(), label="unbatched") if N == 1 else False,
        seed=draw(st.integers(0, 2**31 - 1), label="seed"),
        m=draw(st.sampled_from([1, 1, 1, 2, 3]), label="channel multiplier"),  # weight (m*C, 1, KH, KW)
    )


# ------------------------------------------------------------------------------------------------
# building tensors with a given memory layout
# ------------------------------------------------------------------------------------------------
def _randn(shape, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _layout(values: torch.Tensor, layout: str, device: str, dtype: torch.dtype) -> torch.Tensor:
    """``values`` (fp64, CPU, logical 4-D shape) placed in the requested memory layout on
    ``device`` in ``dtype``.  Bytes of a bigger buffer outside the view are NaN."""
    v = values.to(dtype)
    N, C, H, W = v.shape
    nan = float("nan")
    if layout in ("nchw", "contiguous"):
        return v.to(device).contiguous()
    if layout == "channels_last":
        return v.to(device).contiguous(memory_format=torch.channels_last)
    if layout == "slice":
        buf = torch.full((N, 2 * C + 1, H + 3, W + 5), nan, dtype=dtype, device=device)
        view = buf[:, 1::2, 1 : 1 + H, 2 : 2 + W]
    elif layout == "channels_last_slice":
        buf = torch.full((N, C + 2, H + 2, W + 1), nan, dtype=dtype, device=device)
        buf = buf.contiguous(memory_format=torch.channels_last)
        view = buf[:, 1 : 1 + C, 1 : 1 + H, :W]
    elif layout == "permuted":
        view = torch.full((H, N, W, C), nan, dtype=dtype, device=device).permute(1, 3, 0, 2)
    elif layout == "expand_batch":
        if N == 0:
            return v.to(device).contiguous()
        return v[:1].to(device).expand(N, C, H, W)  # stride 0 over the batch: every image equal
    else:
        raise ValueError(layout)
    view.copy_(v)
    assert view.shape == v.shape
    return view


def build(case, device: str):
    """(x, w, b, g_fn) for a case: fp64 CPU values placed in the case's layouts on ``device``."""
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = DTYPES[case["dtype"]]
    N, C, H, W, KH, KW = (case[k] for k in ("N", "C", "H", "W", "KH", "KW"))
    xv = _randn((N, C, H, W), gen)
    if case["x_layout"] == "expand_batch" and N > 0:
        xv = xv[:1].expand(N, C, H, W)
    x = _layout(xv, case["x_layout"], device, dtype)
    m = case.get("m", 1)  # channel multiplier
    w = _layout(_randn((m * C, 1, KH, KW), gen) / max(1.0, (KH * KW) ** 0.5), case["w_layout"], device, dtype)
    b = _randn((m * C,), gen).to(dtype).to(device) if case["bias"] else None

    def grad_out(shape):
        gv = torch.randn(shape, generator=torch.Generator().manual_seed(case["seed"] + 1), dtype=torch.float64)
        if case["g_layout"] == "expand_batch" and shape[0] > 0:
            gv = gv[:1].expand(*shape)
        return _layout(gv, case["g_layout"], device, dtype)

    return x, w, b, grad_out


def call_repr(case, backend, device) -> str:
    c = case
    return (
        f"lkconv.depthwise_conv2d(x[{c['N']},{c['C']},{c['H']},{c['W']} {c['dtype']} {c['x_layout']}"
        f"{' unbatched' if c['unbatched'] else ''}, w[{c.get('m', 1) * c['C']},1,{c['KH']},{c['KW']} {c['w_layout']}], "
        f"bias={c['bias']}, stride={c['stride']!r}, padding={c['padding']!r}, dilation={c['dilation']!r}, "
        f"backend={backend!r}) on {device}; requires_grad(x,w,b)={c['rg']}, grad_out {c['g_layout']}\n"
        f"reproduce: python -c \"from tests.test_fuzz import run_case; run_case({case!r}, {backend!r}, {device!r})\""
    )


# ------------------------------------------------------------------------------------------------
# the property
# ------------------------------------------------------------------------------------------------
def expected_error(case):
    """The ValueError lkconv must raise for this geometry, or None (independent of lkconv.params)."""
    N, C, H, W, KH, KW = (case[k] for k in ("N", "C", "H", "W", "KH", "KW"))
    s = (case["stride"],) * 2 if isinstance(case["stride"], int) else case["stride"]
    d = (case["dilation"],) * 2 if isinstance(case["dilation"], int) else case["dilation"]
    pad = case["padding"]
    eh, ew = d[0] * (KH - 1) + 1, d[1] * (KW - 1) + 1
    if pad == "same":
        if s != (1, 1):
            return "padding='same' is not supported for strided"
        ph, pw = eh - 1, ew - 1
    elif pad == "valid":
        ph = pw = 0
    elif isinstance(pad, int):
        ph = pw = 2 * pad
    elif len(pad) == 2:
        ph, pw = 2 * pad[0], 2 * pad[1]
    else:
        ph, pw = pad[0] + pad[1], pad[2] + pad[3]
    if C == 0:
        return "at least one channel"
    if N > 0 and (H == 0 or W == 0):
        return "input spatial size"
    if H + ph - eh < 0 or W + pw - ew < 0:
        return "is not positive"
    return None


@contextlib.contextmanager
def _cpu_path(path):
    if path is None:
        yield
        return
    from lkconv.backends.cpu import force_path

    with force_path(path):
        yield


def run_case(case, backend: str, device: str = "cpu", cpu_path=None):
    """Check one case on one backend (the body of every fuzz test; call it to reproduce a failure)."""
    note(call_repr(case, backend, device))
    x, w, b, grad_out = build(case, device)
    dtype = DTYPES[case["dtype"]]
    rg_x, rg_w, rg_b = case["rg"]
    rg_b = rg_b and b is not None
    args = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"])

    xr = x.detach().requires_grad_(rg_x)
    wr = w.detach().requires_grad_(rg_w)
    br = None if b is None else b.detach().requires_grad_(rg_b)
    xin = xr.squeeze(0) if case["unbatched"] else xr
    want_grad = rg_x or rg_w or rg_b

    err = expected_error(case)
    if err is not None:
        event("invalid geometry -> ValueError")
        with pytest.raises(ValueError, match=err):
            lkconv.depthwise_conv2d(xin, wr, br, backend=backend, **args)
        return

    p = normalize_params(case["stride"], case["padding"], case["dilation"], (case["KH"], case["KW"]))
    passes = ["forward"] + (["grad_input"] if rg_x else []) + (["grad_weight"] if rg_w else [])
    inst = get_backend(backend)
    declined = [(ps, inst.check(Request.of(ps, x, w, p))) for ps in passes]
    declined = [(ps, why) for ps, why in declined if why is not None]
    if declined:
        event(f"declined: {declined[0][1][:60]}")
        note(f"backend declines: {declined}")
        with pytest.raises(UnsupportedError, match=f"backend '{backend}' does not support"):
            lkconv.depthwise_conv2d(xin, wr, br, backend=backend, **args)
        return
    event(f"computed {case['dtype']}")

    with no_tf32(), _cpu_path(cpu_path), torch.set_grad_enabled(want_grad):
        out = lkconv.depthwise_conv2d(xin, wr, br, backend=backend, **args)
    if case["unbatched"]:
        assert out.dim() == 3, f"unbatched input gave a {out.dim()}-D output"
        out = out.unsqueeze(0)
    assert out.dtype == dtype, f"forward dtype {out.dtype} != {dtype}"
    assert out.device == x.device
    if not case["unbatched"] and out.numel():
        if memory_format_of(x) == torch.channels_last:
            assert out.is_contiguous(memory_format=torch.channels_last), f"forward not channels_last: {out.stride()}"
        else:
            assert out.is_contiguous(), f"forward not contiguous: {out.stride()}"

    g = grad_out(tuple(out.shape))
    ref_out, ref_gx, ref_gw, ref_gb = reference_all_passes(x, w, b, p, g)
    td_out, td_gx, td_gw = _torch_d_all_passes(x, w, b, p, g)
    checks = [("forward", out.detach(), ref_out, td_out)]
    if want_grad:
        inputs = [t for t, r in ((xr, rg_x), (wr, rg_w), (br, rg_b)) if r]
        with no_tf32(), _cpu_path(cpu_path):
            grads = list(torch.autograd.grad(out, inputs, g))
        if rg_x:
            checks.append(("grad_input", grads.pop(0), ref_gx, td_gx))
        if rg_w:
            checks.append(("grad_weight", grads.pop(0), ref_gw, td_gw))
        if rg_b:
            # PyTorch's own bias gradient in this dtype (a plain sum, as in lkconv.ops): the tolerance rule
            # baseline; without it a long fp32 sum can exceed the bare floor (found by the fuzzer:
            # 1566 terms, err 1.06e-5 > floor 1.03e-5)
            checks.append(("grad_bias", grads.pop(0), ref_gb, g.sum(dim=(0, 2, 3))))
    report = []
    ok = True
    for name, o, r, t in checks:
        assert tuple(o.shape) == tuple(r.shape), f"{name}: shape {tuple(o.shape)} != reference {tuple(r.shape)}"
        assert o.dtype == dtype, f"{name}: dtype {o.dtype} != {dtype}"
        od = o.detach().double().cpu()
        e = (od - r).abs().max().item() if r.numel() else 0.0
        if r.numel() and torch.isfinite(r).all() and not torch.isfinite(od).all():
            e = float("nan")
        tol = tolerance(r, t, dtype)
        good = e <= tol  # NaN compares False
        ok &= good
        report.append(f"{name}: err={e:.3e} tol={tol:.3e} {'ok' if good else 'FAIL'}")
    note("; ".join(report))
    assert ok, "mismatch with the fp64 reference: " + "; ".join(report) + "\n" + call_repr(case, backend, device)


# ------------------------------------------------------------------------------------------------
# one test per (backend, device)
# ------------------------------------------------------------------------------------------------
def _require(backend: str):
    why = lkconv.backend_status().get(backend, f"backend {backend!r} is not registered")
    if why is not None:
        pytest.skip(f"backend {backend!r} not available here: {why}")


def _fuzz(backend, device, strategy, cpu_path=None):
    @fuzz_settings(backend, device)
    @given(case=strategy)
    def inner(case):
        run_case(case, backend, device, cpu_path)

    inner()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_fuzz_cpu_builtin(backend):
    _require(backend)
    # The reference backend sums KH*KW shifted slices *in the input dtype*: in fp16/bf16 that
    # accumulation is far less accurate than PyTorch's (fp32-accumulating) conv, so it misses the
    # tolerance rule (docs/architecture.md) (found by this fuzzer; e.g. bf16, K=24, dilation 2: grad_input err 2.8e-2
    # > tol 2.7e-2).  It is the fp64 oracle, not a low-precision kernel: fuzz it in fp32/fp64.
    dtypes = ("fp32", "fp64") if backend == "reference" else tuple(DTYPES)
    _fuzz(backend, "cpu", conv_cases(dtypes=dtypes))


def test_fuzz_cpu_backend():
    """The cpu backend with its automatic path choice (direct below the FFT threshold, FFT above)."""
    _require("cpu")
    _fuzz("cpu", "cpu", conv_cases())


@pytest.mark.parametrize("path", ["fft", "direct", "nchw", "cl"])
def test_fuzz_cpu_backend_forced_path(path):
    """Each of the cpu backend's paths on every geometry, not only where its table picks it."""
    _require("cpu")
    try:
        from lkconv.backends.cpu import force_path  # noqa: F401
    except ImportError:
        pytest.skip("lkconv.backends.cpu has no force_path()")
    n = max(10, n_examples("cpu", "cpu") // 4)

    @settings(settings.get_profile(PROFILE), max_examples=n)
    @given(case=conv_cases())
    def inner(case):
        run_case(case, "cpu", "cpu", path)

    inner()


def _triton_device():
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


def _rerun_under_interpreter(test_name: str):
    """Run ``test_name`` of this file in a subprocess with TRITON_INTERPRET=1 (the variable must be set
    before triton is imported, which may already have happened in this process)."""
    import importlib.util

    if importlib.util.find_spec("lkconv.backends.triton") is None:
        pytest.skip("lkconv.backends.triton does not exist yet")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"{__file__}::{test_name}"]
    r = subprocess.run(cmd, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       capture_output=True, text=True, timeout=600)
    tail = (r.stdout + r.stderr)[-6000:]
    if r.returncode == 5 or " skipped" in tail and " passed" not in tail:
        pytest.skip(f"{test_name} under TRITON_INTERPRET=1 skipped in the subprocess:\n" + tail[-1500:])
    assert r.returncode == 0, f"{test_name} under TRITON_INTERPRET=1 failed:\n{tail}"


def test_fuzz_triton():
    """Triton: on the GPU if there is one, else under TRITON_INTERPRET=1 on CPU tensors (tiny sizes).
    Without the variable set (it must be set before triton is imported) it re-runs in a subprocess."""
    device = _triton_device()
    if device is None:
        _rerun_under_interpreter("test_fuzz_triton")
        return
    _require("triton")
    tiny = device == "cpu"
    # triton declines fp64 (checked once in test_fuzz_triton_declines_fp64): spend the examples on the rest
    dtypes = ("fp32", "fp16", "bf16")
    _fuzz("triton", device, conv_cases(tiny=tiny, dtypes=dtypes))


def test_fuzz_triton_declines_fp64():
    """The one dtype the Triton backend does not take is declined (UnsupportedError), never computed."""
    if _triton_device() is None:
        _rerun_under_interpreter("test_fuzz_triton_declines_fp64")
        return
    if lkconv.backend_status().get("triton") is not None:
        pytest.skip(f"triton not available: {lkconv.backend_status().get('triton')}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64, device=device)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64, device=device)
    with pytest.raises(UnsupportedError, match="backend 'triton' does not support"):
        lkconv.depthwise_conv2d(x, w, padding=1, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_fuzz_cuda_device(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible)")
    _require(backend)
    _fuzz(backend, "cuda", conv_cases())


# ------------------------------------------------------------------------------------------------
# second order: double backward (gradient penalties) against PyTorch's fp64 double backward
# ------------------------------------------------------------------------------------------------
#: examples per (backend, device) for the second-order property
DOUBLE_CI_EXAMPLES = {("cpu", "cpu"): 40, ("torch", "cpu"): 15, ("triton", "cpu"): 5, ("cuda", "cuda"): 100,
                      ("triton", "cuda"): 100}
DOUBLE_GPU_EXAMPLES = {("cpu", "cpu"): 500, ("torch", "cpu"): 100, ("triton", "cpu"): 50, ("cuda", "cuda"): 1000,
                       ("triton", "cuda"): 1000}
#: max |ours - ref| / max(1, max|ref|) over the second-order gradients
DOUBLE_TOL = {"fp64": 1e-9, "fp32": 1e-4}


def run_double_backward_case(case, backend: str, device: str = "cpu"):
    """Second-order check of one valid case (fp32/fp64): lkconv.testing.double_backward_errors."""
    from lkconv.testing import double_backward_errors

    note(call_repr(case, backend, device))
    x, w, b, _ = build(case, device)
    if case["unbatched"]:
        x = x.squeeze(0)
    errs = double_backward_errors(backend, x, w, b, case["stride"], case["padding"], case["dilation"])
    note(f"second-order errors: {errs}")
    tol = DOUBLE_TOL[case["dtype"]]
    bad = {k: v for k, v in errs.items() if not v <= tol}  # NaN fails
    assert not bad, f"double backward vs PyTorch fp64: {errs} > {tol}\n" + call_repr(case, backend, device)


def _fuzz_double(backend, device, tiny=False):
    _require(backend)
    n = n_examples(backend, device, DOUBLE_CI_EXAMPLES, DOUBLE_GPU_EXAMPLES)
    dtypes = ("fp32",) if backend == "triton" else ("fp32", "fp64")

    def valid(case):
        if expected_error(case) is not None or case["N"] == 0:
            return False
        p = normalize_params(case["stride"], case["padding"], case["dilation"], (case["KH"], case["KW"]))
        x, w, _, _ = build(case, device)
        return all(get_backend(backend).check(Request.of(ps, x, w, p)) is None for ps in ("forward", "grad_input", "grad_weight"))

    @settings(settings.get_profile(PROFILE), max_examples=n)
    @given(case=conv_cases(tiny=tiny, dtypes=dtypes).filter(valid))
    def inner(case):
        run_double_backward_case(case, backend, device)

    inner()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fuzz_double_backward_cpu(backend):
    _fuzz_double(backend, "cpu")


def test_fuzz_double_backward_triton_interpreter():
    device = _triton_device()
    if device is None:
        _rerun_under_interpreter("test_fuzz_double_backward_triton_interpreter")
        return
    if device != "cpu":
        pytest.skip("a GPU is present: test_fuzz_double_backward_cuda[triton] runs the compiled kernels")
    _fuzz_double("triton", "cpu", tiny=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fuzz_double_backward_cuda(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible)")
    _fuzz_double(backend, "cuda")


# ------------------------------------------------------------------------------------------------
# the fuzzer itself must see the interesting corners (a strategy that never produces them is useless)
# ------------------------------------------------------------------------------------------------
def test_strategy_reaches_the_corners():
    seen = set()

    @settings(max_examples=300, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=conv_cases())
    def collect(case):
        if case["KH"] != case["KW"]:
            seen.add("rect")
        if case["KH"] % 2 == 0:
            seen.add("even")
        if max(case["KH"], case["KW"]) >= 31:
            seen.add("large")
        if case["H"] < case["KH"]:
            seen.add("H<K")
        seen.update({f"N{case['N']}"} if case["N"] in (0, 1) else set())
        seen.update({"C0"} if case["C"] == 0 else set())
        seen.add(case["x_layout"])
        seen.add(case["dtype"])
        seen.add("same" if case["padding"] == "same" else "valid" if case["padding"] == "valid" else
                 f"pad{len(case['padding'])}" if isinstance(case["padding"], tuple) else "padint")
        seen.add("invalid" if expected_error(case) else "valid-geometry")
        if case["unbatched"]:
            seen.add("unbatched")
        if case["m"] > 1 and not expected_error(case):
            seen.add("multiplier")

    collect()
    must = {"rect", "even", "large", "H<K", "N0", "N1", "C0", "same", "valid", "pad2", "pad4", "padint",
            "invalid", "valid-geometry", "unbatched", "multiplier", *X_LAYOUTS, *DTYPES}
    assert must <= seen, f"never generated: {sorted(must - seen)}"
