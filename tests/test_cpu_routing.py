"""The cpu backend's path table (lkconv.backends.cpu.PATH_TABLE): its rules resolve every kernel size
and pass to the path the table names, a forced backend / path still wins, the table is what its run's
json derives (benchmarks/cpu_threshold.py --derive), and every path, the eager fast path and the op
agree with the fp64 reference.  No timing here."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

import lkconv
import lkconv.ops as ops
from lkconv.backends import cpu as cpu_mod
from lkconv.backends.reference import ReferenceBackend
from lkconv.params import normalize_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KS = (3, 5, 7, 9, 13, 19, 25, 31)
PASSES = ("forward", "grad_input", "grad_weight")
LAYOUTS = ("nchw", "cl")
FMT = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


def _bench():
    """benchmarks/cpu_threshold.py (checkout-only tooling), imported by path."""
    spec = importlib.util.spec_from_file_location("cpu_threshold", os.path.join(ROOT, "benchmarks", "cpu_threshold.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _expected(rows, taps):
    """An independent reading of one table row list: the last row whose min taps <= taps; beyond the
    largest measured kernel (31x31) the FFT."""
    if taps > 31 * 31:
        return "fft"
    return [p for m, p in rows if m <= taps][-1]


# ------------------------------------------------------------------------------------------------
# the table's form and rules
# ------------------------------------------------------------------------------------------------
def test_table_covers_every_class_pass_and_layout_with_valid_rows():
    for tcls in ("single", "multi"):
        for pass_ in PASSES:
            for layout in LAYOUTS:
                rows = cpu_mod.PATH_TABLE[(tcls, pass_, layout)]
                assert rows[0][0] == 0, (tcls, pass_, layout)
                assert [m for m, _ in rows] == sorted({m for m, _ in rows}), rows
                assert all(p in cpu_mod.PATHS for _, p in rows), rows
                assert all(a[1] != b[1] for a, b in zip(rows, rows[1:])), f"repeated path in {rows}"
    assert set(cpu_mod.PATH_TABLE_RUN) == {"single", "multi"}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pass_", PASSES)
def test_choose_path_follows_the_table_at_every_kernel_size(pass_, layout, threads):
    rows = cpu_mod.PATH_TABLE[(cpu_mod.thread_class(threads), pass_, layout)]
    for K in KS + (1, 11, 15, 17, 21, 27, 51):
        assert cpu_mod.choose_path(K, K, (1, 1), pass_, threads, layout) == _expected(rows, K * K), K
        # taps per strided output pixel: stride 2 divides the taps by 4
        assert cpu_mod.choose_path(K, K, (2, 2), pass_, threads, layout) == _expected(rows, K * K / 4), K
        assert cpu_mod.choose_path(K, 1, (1, 1), pass_, threads, layout) == _expected(rows, K), K


def _spy(monkeypatch):
    """Record which path each pass of the cpu backend takes (the real functions still run)."""
    seen = []
    for name, path in (("fft_forward", "fft"), ("fft_grad_input", "fft"), ("fft_grad_weight", "fft"),
                       ("direct_forward", "direct"), ("direct_grad_input", "direct"),
                       ("direct_grad_weight", "direct")):
        real = getattr(cpu_mod, name)

        def wrap(*a, _real=real, _path=path, **k):
            seen.append(_path)
            return _real(*a, **k)
        monkeypatch.setattr(cpu_mod, name, wrap)
    for name in ("layout_forward", "layout_grad_input", "layout_grad_weight"):
        real = getattr(cpu_mod, name)

        def wrap(*a, _real=real, **k):
            seen.append(a[-1])  # the layout argument names the path ("nchw" / "cl")
            return _real(*a, **k)
        monkeypatch.setattr(cpu_mod, name, wrap)
    return seen


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("K", KS)
def test_auto_takes_the_tables_path_for_every_pass(monkeypatch, K, layout):
    """Through lkconv.depthwise_conv2d (auto) and autograd: each pass runs the path the table names
    for this K, layout and the current thread count."""
    seen = _spy(monkeypatch)
    torch.manual_seed(K)
    x = torch.randn(1, 2, 9, 10).contiguous(memory_format=FMT[layout]).requires_grad_(True)
    w = torch.randn(2, 1, K, K, requires_grad=True)
    out = lkconv.depthwise_conv2d(x, w, None, 1, "same")
    out.backward(torch.randn_like(out))
    want = [cpu_mod.choose_path(K, K, (1, 1), p, layout=layout) for p in PASSES]
    params = normalize_params(1, "same", 1, (K, K))
    if cpu_mod.CPUBackend().delegates_to_torch(x, tuple(w.shape), params, PASSES):
        # every pass is PyTorch's own kernel: the call is F.conv2d itself, with PyTorch's autograd node
        assert seen == [] and type(out.grad_fn).__name__ == "ConvolutionBackward0"
    else:
        assert seen == want


@pytest.mark.parametrize("layout", LAYOUTS)
def test_delegation_to_f_conv2d_is_exact_and_only_where_the_table_says(layout):
    """Where every pass would run PyTorch's own kernels, lkconv.depthwise_conv2d returns F.conv2d's
    result (bitwise, gradients too); bf16, asymmetric padding, a forced path and large kernels are not
    delegated."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 12, 11).contiguous(memory_format=FMT[layout]).requires_grad_(True)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    params = normalize_params(1, 1, 1, (3, 3))
    assert cpu_mod.CPUBackend().delegates_to_torch(x, (4, 1, 3, 3), params, PASSES)
    out = lkconv.depthwise_conv2d(x, w, b, 1, 1)
    assert type(out.grad_fn).__name__ == "ConvolutionBackward0"
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), g)
    ref_out = torch.nn.functional.conv2d(x, w, b, 1, 1, 1, 4)
    want = torch.autograd.grad(ref_out, (x, w, b), g)
    assert torch.equal(out, ref_out) and all(torch.equal(u, v) for u, v in zip(got, want))
    # the reference agrees too (fp64)
    r = ReferenceBackend().forward(x.detach().double(), w.detach().double(), b.detach().double(), params)
    torch.testing.assert_close(out.detach().double(), r, rtol=1e-5, atol=1e-5)
    be = cpu_mod.CPUBackend()
    assert not be.delegates_to_torch(x.bfloat16(), (4, 1, 3, 3), params, PASSES)
    assert not be.delegates_to_torch(x, (4, 1, 3, 3), normalize_params(1, (1, 0, 1, 1), 1, (3, 3)), PASSES)
    assert not be.delegates_to_torch(x, (4, 1, 31, 31), normalize_params(1, 15, 1, (31, 31)), PASSES)
    assert not cpu_mod.CPUBackend(path="direct").delegates_to_torch(x, (4, 1, 3, 3), params, PASSES)
    with cpu_mod.force_path("direct"):
        out = lkconv.depthwise_conv2d(x, w, b, 1, 1)
    assert type(out.grad_fn).__name__ != "ConvolutionBackward0"


def test_a_forced_backend_or_path_still_wins(monkeypatch):
    seen = _spy(monkeypatch)
    x = torch.randn(1, 2, 9, 9, requires_grad=True)
    w = torch.randn(2, 1, 31, 31, requires_grad=True)
    out = lkconv.depthwise_conv2d(x, w, None, 1, "same", backend="torch")
    out.sum().backward()
    assert seen == []  # the torch backend: none of the cpu paths
    for path in cpu_mod.PATHS:
        seen.clear()
        with cpu_mod.force_path(path):
            out = lkconv.depthwise_conv2d(x, w, None, 1, "same")
            out.sum().backward()
        assert seen == [path] * 3, path
        seen.clear()
        be = cpu_mod.CPUBackend(path=path)
        p = normalize_params(1, "same", 1, (3, 3))
        be.forward(x.detach(), w.detach()[:, :, :3, :3], None, p)
        assert seen == [path]
    with pytest.raises(ValueError, match="path"):
        cpu_mod.CPUBackend(path="gpu")
    with pytest.raises(ValueError, match="path"):
        with cpu_mod.force_path("nhwc"):
            pass
    assert cpu_mod.FORCE_PATH is None


# ------------------------------------------------------------------------------------------------
# regeneration from a run's json
# ------------------------------------------------------------------------------------------------
def _synthetic(threads, winners):
    """A results.json-like dict: winners[(pass, layout)][K] = the path that is fastest there."""
    cells = []
    for (pass_, layout), per_k in winners.items():
        for K, win in per_k.items():
            med = {p: 2.0 for p in ("fft", "direct", "nchw", "cl")}
            med[win] = 1.0
            med.update(torch=1.5, torch_rt=3.0, auto=1.0)
            cells.append({"K": K, "pass": pass_, "layout": layout, "median_ms": med})
    return {"env": {"threads": threads, "run": "synthetic"}, "cells": cells}


def test_derive_table_merges_winners_into_rows():
    b = _bench()
    winners = {(p, l): {3: "direct", 13: "direct", 19: "cl", 25: "fft", 31: "fft"} for p in PASSES for l in LAYOUTS}
    table = b.derive_table(_synthetic(2, winners))
    assert set(table) == {("multi", p, l) for p in PASSES for l in LAYOUTS}
    assert table[("multi", "forward", "nchw")] == ((0, "direct"), (361, "cl"), (625, "fft"))
    assert b.derive_table(_synthetic(1, winners))[("single", "grad_weight", "cl")] == table[("multi", "grad_weight", "cl")]


def test_derive_table_breaks_near_ties_by_preference():
    b = _bench()
    res = _synthetic(2, {("forward", "cl"): {3: "fft"}})
    res["cells"][0]["median_ms"].update(fft=1.0, direct=1.03, cl=1.01, nchw=0.99)
    # within 5 % of the fastest (nchw 0.99): the layout's own PyTorch kernel (cl) first, then direct, fft, ...
    assert b.derive_table(res)[("multi", "forward", "cl")] == ((0, "cl"),)
    res["cells"][0]["median_ms"].update(cl=1.2)
    assert b.derive_table(res)[("multi", "forward", "cl")] == ((0, "direct"),)
    res["cells"][0]["median_ms"].update(direct=1.2, fft=1.0)
    assert b.derive_table(res)[("multi", "forward", "cl")] == ((0, "fft"),)
    res["cells"][0]["median_ms"].update(fft=1.2)
    assert b.derive_table(res)[("multi", "forward", "cl")] == ((0, "nchw"),)


def test_derive_table_reproduces_the_tables_choice_at_the_measured_sizes():
    """A run whose winners are the table's paths at the benchmark's kernel sizes derives a table
    that makes the same choice at each of them."""
    b = _bench()
    for tcls, threads in (("single", 1), ("multi", 2)):
        winners = {(p, l): {K: _expected(cpu_mod.PATH_TABLE[(tcls, p, l)], K * K) for K in KS}
                   for p in PASSES for l in LAYOUTS}
        derived = b.derive_table(_synthetic(threads, winners))
        for (c, p, l), rows in derived.items():
            assert c == tcls
            for K in KS:
                assert _expected(rows, K * K) == winners[(p, l)][K], (tcls, p, l, K)


def test_table_rows_are_what_their_committed_run_derives():
    """Each thread class whose rows name a committed run (a folder with results.json) holds exactly
    what ``cpu_threshold.py --derive`` derives from it."""
    b = _bench()
    checked = 0
    for tcls, run in cpu_mod.PATH_TABLE_RUN.items():
        path = os.path.join(ROOT, run, "results.json")
        if not run.startswith("benchmarks/results/") or not os.path.exists(path):
            continue
        with open(path) as f:
            res = json.load(f)
        derived = b.derive_table(res)
        for key, rows in derived.items():
            assert key[0] == tcls
            assert rows == cpu_mod.PATH_TABLE[key], key
        checked += 1
    assert checked >= 1


# ------------------------------------------------------------------------------------------------
# no behaviour change: every path and the eager fast path against the fp64 reference / the op
# ------------------------------------------------------------------------------------------------
CASES = [  # (N, C, H, W, K, stride, padding, m, dtype)
    (2, 3, 13, 11, 3, 1, "same", 1, torch.float32),
    (2, 3, 13, 11, 5, 2, 2, 1, torch.float32),
    (1, 2, 12, 12, 15, 1, "same", 1, torch.float32),
    (2, 2, 10, 9, 4, 1, (1, 2, 0, 3), 2, torch.float32),
    (1, 2, 9, 9, 7, 1, "same", 1, torch.float64),
    (1, 2, 9, 9, 7, 1, "same", 1, torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"K{c[4]}s{c[5]}m{c[7]}{str(c[8])[6:]}")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", cpu_mod.PATHS)
def test_every_path_matches_the_fp64_reference(case, layout, path):
    N, C, H, W, K, s, pad, m, dt = case
    torch.manual_seed(0)
    x = torch.randn(N, C, H, W, dtype=dt).contiguous(memory_format=FMT[layout])
    w = torch.randn(m * C, 1, K, K, dtype=dt)
    p = normalize_params(s, pad, 1, (K, K))
    ref = ReferenceBackend()
    out = ref.forward(x.double(), w.double(), None, p)
    g = torch.randn(out.shape, dtype=dt).contiguous(memory_format=FMT[layout])
    want = (out, ref.grad_input(g.double(), w.double(), x.shape, p), ref.grad_weight(g.double(), x.double(), w.shape, p))
    be = cpu_mod.CPUBackend(path=path)
    got = (be.forward(x, w, None, p), be.grad_input(g, w, tuple(x.shape), p), be.grad_weight(g, x, tuple(w.shape), p))
    tol = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dt]
    for name, a, b in zip(PASSES, got, want):
        assert a.dtype == dt and a.shape == b.shape, name
        err = (a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)
        assert err < tol, (name, float(err))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("K", [3, 7, 31])
def test_eager_fast_path_equals_the_op(K, layout, monkeypatch):
    """lkconv.depthwise_conv2d on plain CPU tensors skips the custom-op dispatch: the same results
    (bitwise), strides and gradients (bias included) as calling the op, double backward too.  (The
    delegation to F.conv2d, which PyTorch's own autograd then differentiates, is tested on its own.)"""
    monkeypatch.setattr(cpu_mod.CPUBackend, "delegates_to_torch", lambda self, *a: False)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 12, 12).contiguous(memory_format=FMT[layout])
    w = torch.randn(3, 1, K, K)
    b = torch.randn(3)
    g = torch.randn(2, 3, 12, 12)
    res = {}
    for fast in (True, False):
        old = ops.EAGER_FAST_PATH
        ops.EAGER_FAST_PATH = fast
        try:
            xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
            out = lkconv.depthwise_conv2d(xr, wr, br, 1, "same")
            grads = torch.autograd.grad(out, (xr, wr, br), g, create_graph=True)
            gg = torch.autograd.grad(grads[1].sum(), (xr,))[0]  # double backward through the grad ops
            with torch.no_grad():
                nog = lkconv.depthwise_conv2d(x, w, b, 1, "same")
        finally:
            ops.EAGER_FAST_PATH = old
        res[fast] = (out, *grads, gg, nog)
    for a, c in zip(res[True], res[False]):
        assert torch.equal(a, c)
        assert a.stride() == c.stride()
    assert res[True][0].grad_fn is not None


def test_eager_fast_path_is_not_taken_where_the_op_node_matters():
    from torch.utils._python_dispatch import TorchDispatchMode

    x = torch.randn(1, 2, 8, 8)
    w = torch.randn(2, 1, 3, 3)
    assert ops.eager_fast_path_ok(x, w, None)
    assert not ops.eager_fast_path_ok(x.to("meta"), w.to("meta"), None)

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen() as mode:
        assert not ops.eager_fast_path_ok(x, w, None)
        lkconv.depthwise_conv2d(x, w, None, 1, 1)
    assert any("lkconv.dwconv2d" in o for o in mode.ops), mode.ops
    with torch.autograd.profiler.profile() as prof:
        lkconv.depthwise_conv2d(x, w, None, 1, 1)
    assert any("lkconv::dwconv2d" in e.name for e in prof.function_events)
    old = ops.EAGER_FAST_PATH
    ops.EAGER_FAST_PATH = False
    try:
        assert not ops.eager_fast_path_ok(x, w, None)
    finally:
        ops.EAGER_FAST_PATH = old


def test_normalize_params_cache_keeps_every_check():
    p = normalize_params(1, "same", 1, (5, 5))
    assert normalize_params(1, "same", 1, (5, 5)) is p
    with pytest.raises(TypeError):
        normalize_params(True, "same", 1, (5, 5))  # a bool is not the int 1
    with pytest.raises(ValueError):
        normalize_params(2, "same", 1, (5, 5))
    with pytest.raises(ValueError):
        normalize_params(2, "same", 1, (5, 5))  # errors are raised again, never cached
    assert normalize_params(1, "SAME", 1, (4, 4)).padding == (1, 2, 1, 2)
