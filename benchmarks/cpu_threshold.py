"""Measure the cpu backend's choice per (kernel size, pass, input layout) against PyTorch, derive the
path table from it, and check ``auto`` against the faster PyTorch layout.  One command:

    python benchmarks/cpu_threshold.py                       # every cell, writes a results folder
    python benchmarks/cpu_threshold.py --derive RUN/results.json   # the PATH_TABLE rows of a run
    python benchmarks/cpu_threshold.py --readme-table RUN/results.json   # README.md's CPU table

For each kernel size K (square, "same" padding, stride 1; default N=8, C=128, 56x56, fp32) and each
input layout L (``nchw``: NCHW tensors; ``cl``: channels_last tensors) it times, per pass (forward,
grad_input, grad_weight), interleaved (every round in a freshly shuffled order, see
:func:`time_interleaved`; the correctness check's call is the warm-up), at two levels:

*user level* (what a user's call costs; the verdict compares these):

* ``torch``      -- PyTorch as users call it on L tensors: F.conv2d, or one gradient through
  F.conv2d's autograd node (:func:`user_grad`: requires_grad on x only / w only, the backward timed
  as ``torch.autograd.grad(out, x or w, g, retain_graph=True)``)
* ``torch_rt``   -- the same with the computation in the *other* layout as a user writes it:
  ``F.conv2d(x.contiguous(other), w).contiguous(L)`` (a gradient: that chain's backward)
* ``auto``       -- ``lkconv.depthwise_conv2d`` the same way: the forward, or one gradient through
  the node the call records (F.conv2d's own where lkconv delegates, else lkconv's eager node)

*op level* (what the path table is derived from): lkconv's cpu paths called on the backend on L
tensors, with the op's output conversion: ``fft``, ``direct`` (lkconv's direct path in L), ``nchw``
and ``cl`` (PyTorch's own kernels run in that layout -- on L itself PyTorch's op-level time -- the
round trip included where L differs)

plus ``all`` (forward + both gradients through autograd) for ``torch`` and ``auto``, the round trip
alone (``to_cl`` / ``to_nchw`` of one activation), and the op's dispatch overhead at small sizes.
Every lkconv result is checked against PyTorch's before timing (max error / max |ref| < 1e-4).

``best torch`` of a cell = min(torch, torch_rt) for that input layout; ``auto / best torch`` is
best-torch time / auto time (>= 1: auto is faster); a cell under 0.95 is flagged.  The derived
table: per (pass, L), the fastest lkconv path at each K (a path within 5 % of the fastest is taken
in the order direct, own layout, fft, other layout), merged into ``(min taps, path)`` rows.

The results folder (``--out``, default benchmarks/results/cpu-threshold-<cpu>-<date>) gets
results.json (every sample, the environment, the command, the runtime), results.md and
auto_vs_torch.png.  The machine may be shared: medians and min-max spread are reported; say so.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lkconv  # noqa: E402
import lkconv.ops  # noqa: E402,F401  (registers torch.ops.lkconv.*)
from lkconv.backends import cpu, resolve_backend  # noqa: E402
from lkconv.backends.base import output_memory_format  # noqa: E402
from lkconv.params import normalize_params  # noqa: E402

PASSES = ("forward", "grad_input", "grad_weight")
LAYOUT_NAMES = ("nchw", "cl")
FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
LK_PATHS = ("fft", "direct", "nchw", "cl")
PROVIDERS = ("torch", "torch_rt") + LK_PATHS + ("auto",)
FLAG_BELOW = 0.95
TIE = 0.05
CLOCK = time.perf_counter


# ------------------------------------------------------------------------------------------------
# the table derivation (also used by tests/test_cpu_routing.py)
# ------------------------------------------------------------------------------------------------
def _preference(layout: str):
    """Tie order: PyTorch's own kernel in the input's layout first (a pass that runs it can be handed
    to F.conv2d whole, with no lkconv cost around it), then lkconv's direct path, the FFT, the other
    layout (a round trip)."""
    other = "cl" if layout == "nchw" else "nchw"
    return (layout, "direct", "fft", other)


def derive_table(results: dict, tie: float = TIE) -> dict:
    """``{(thread class, pass, layout): ((min taps, path), ...)}`` from a run's results.json dict:
    per (pass, layout) and K, the fastest of lkconv's paths by median (within ``tie`` of the fastest:
    the first of the layout's own PyTorch kernel, direct, fft, the other layout), merged into rows that start where
    the choice changes (the first row starts at 0 taps)."""
    tcls = cpu.thread_class(results["env"]["threads"])
    cells = results["cells"]
    table = {}
    for pass_ in PASSES:
        for layout in LAYOUT_NAMES:
            rows = []
            ks = sorted({c["K"] for c in cells if c["pass"] == pass_ and c["layout"] == layout})
            for K in ks:
                cell = next(c for c in cells if c["K"] == K and c["pass"] == pass_ and c["layout"] == layout)
                med = {p: cell["median_ms"][p] for p in LK_PATHS if cell["median_ms"].get(p) is not None}
                best = min(med.values())
                pick = next(p for p in _preference(layout) if p in med and med[p] <= best * (1 + tie))
                if not rows or rows[-1][1] != pick:
                    rows.append((0 if not rows else K * K, pick))
            table[(tcls, pass_, layout)] = tuple(rows)
    return table


def format_table(table: dict, run: str) -> str:
    lines = [f"# derived from {run}", "PATH_TABLE rows:"]
    for key, rows in sorted(table.items()):
        lines.append(f"    {key!r}: {rows!r},")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# callables
# ------------------------------------------------------------------------------------------------
def _fmt(t):
    return output_memory_format(t)


def torch_pass(pass_, x, w, g, pad, C):
    if pass_ == "forward":
        return lambda: F.conv2d(x, w, None, 1, pad, 1, C)
    if pass_ == "grad_input":
        return lambda: torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], pad, [1, 1], False, [0, 0], C,
                                                          [True, False, False])[0]
    return lambda: torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], pad, [1, 1], False, [0, 0], C,
                                                      [False, True, False])[1]


def torch_roundtrip(pass_, x, w, g, pad, C, layout):
    """PyTorch in the other layout than ``layout``: convert, compute, convert back."""
    other = FORMATS["cl" if layout == "nchw" else "nchw"]
    back = FORMATS[layout]
    if pass_ == "forward":
        return lambda: F.conv2d(x.contiguous(memory_format=other), w, None, 1, pad, 1, C).contiguous(
            memory_format=back)
    if pass_ == "grad_input":
        return lambda: torch.ops.aten.convolution_backward(
            g.contiguous(memory_format=other), x.contiguous(memory_format=other), w, None, [1, 1], pad, [1, 1],
            False, [0, 0], C, [True, False, False])[0].contiguous(memory_format=back)
    return lambda: torch.ops.aten.convolution_backward(
        g.contiguous(memory_format=other), x.contiguous(memory_format=other), w, None, [1, 1], pad, [1, 1],
        False, [0, 0], C, [False, True, False])[1]


def lk_path(pass_, path, x, w, g, p):
    be = cpu.CPUBackend(path=path)
    if pass_ == "forward":
        return lambda: be.forward(x, w, None, p).contiguous(memory_format=_fmt(x))
    if pass_ == "grad_input":
        return lambda: be.grad_input(g, w, tuple(x.shape), p).contiguous(memory_format=_fmt(g))
    return lambda: be.grad_weight(g, x, tuple(w.shape), p).contiguous()


def user_grad(conv, pass_, x, w, g):
    """One gradient as users get it: ``out = conv(x', w')`` recorded once with ``requires_grad`` on
    ``x'`` only (grad_input) or ``w'`` only (grad_weight) -- so the forward decides, as in a user's
    call, which node autograd records and which passes it will need -- then every call runs
    ``torch.autograd.grad(out, that tensor, g, retain_graph=True)``: the backward of that node,
    autograd's engine included, nothing accumulated into ``.grad`` and no forward in the timing.
    The same for PyTorch (``conv`` = F.conv2d) and lkconv (``conv`` = lkconv.depthwise_conv2d), so
    both sides pay the same autograd costs."""
    if pass_ not in ("grad_input", "grad_weight"):
        raise ValueError(f"user_grad: a gradient pass, got {pass_!r}")
    xr = x.detach().requires_grad_(pass_ == "grad_input")  # detach: same storage and strides
    wr = w.detach().requires_grad_(pass_ == "grad_weight")
    with torch.enable_grad():
        out = conv(xr, wr)
    inp = xr if pass_ == "grad_input" else wr

    def fn():
        return torch.autograd.grad(out, (inp,), g, retain_graph=True)[0]
    fn.node = type(out.grad_fn).__name__  # which autograd node the backward runs
    return fn


def torch_user(pass_, x, w, g, pad, C):
    """PyTorch as users call it on tensors of x's layout: F.conv2d (forward, no graph) or the
    gradient through F.conv2d's autograd node (:func:`user_grad`)."""
    conv = lambda u, v: F.conv2d(u, v, None, 1, pad, 1, C)  # noqa: E731
    if pass_ == "forward":
        return lambda: conv(x, w)
    return user_grad(conv, pass_, x, w, g)


def torch_user_roundtrip(pass_, x, w, g, pad, C, layout):
    """PyTorch in the other layout as a user writes it: ``F.conv2d(x.contiguous(other), w)
    .contiguous(layout)``; for a gradient, that chain's backward (:func:`user_grad`)."""
    other = FORMATS["cl" if layout == "nchw" else "nchw"]
    back = FORMATS[layout]
    conv = lambda u, v: F.conv2d(u.contiguous(memory_format=other), v, None, 1, pad, 1, C).contiguous(  # noqa: E731
        memory_format=back)
    if pass_ == "forward":
        return lambda: conv(x, w)
    return user_grad(conv, pass_, x, w, g)


def lk_auto(pass_, x, w, g, p):
    """``auto`` as users call it: ``lkconv.depthwise_conv2d`` (the forward on tensors that do not
    require grad, exactly like ``torch``'s F.conv2d call: no ``no_grad`` block on one side only, which
    alone measured +3 % at K=3; a gradient through the node the call records, :func:`user_grad`:
    where the call is delegated to F.conv2d that is PyTorch's own node, else lkconv's eager
    autograd.Function)."""
    conv = lambda u, v: lkconv.depthwise_conv2d(u, v, None, 1, "same")  # noqa: E731
    if pass_ == "forward":
        if x.requires_grad or w.requires_grad:
            raise ValueError("lk_auto: the forward is timed on tensors that do not require grad")
        return lambda: conv(x, w)
    return user_grad(conv, pass_, x, w, g)


def all_pass(conv, x, w, g):
    xr = x.detach().clone().requires_grad_(True)
    wr = w.detach().clone().requires_grad_(True)

    def fn():
        out = conv(xr, wr)
        return torch.autograd.grad(out, (xr, wr), g)
    return fn


def _rel_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def time_interleaved(fns: dict, repeats: int, group_of, slow_abs: float, slow_rel: float,
                     warm: dict = None, small_s: float = 0.0, small_mult: int = 1, near: float = 2.5,
                     seed: int = 0, small_budget_s: float = 0.0, max_samples: int = 100) -> dict:
    """Seconds per call of every callable, interleaved: one warm-up call each (skipped for the
    callables in ``warm``: already run once, with that time), then rounds in which every callable
    that still needs samples runs once, in an order shuffled afresh each round (``seed``: fixed, so
    a run is repeatable) -- a fixed order lets one callable always follow the same other one (e.g.
    one that just converted 25 MB between layouts), which measurably biased identical kernels by
    6-7 % at K=3 (docs/cpu_backend.md).

    Samples, in two phases.  First ``repeats`` for every callable, 2 for one whose warm-up took more
    than ``slow_abs`` s and ``slow_rel`` times the fastest warm-up of its group (same pass and layout:
    far from the choice).  Then, in a group whose fastest median so far is under ``small_s`` s (the
    cheap cells, where a few per cent decide a ratio), every callable whose median is within ``near``
    times that fastest gets more, all of them the same number -- ``repeats * small_mult``, or as many
    as fit in ``small_budget_s`` seconds at the fastest one's median, up to ``max_samples`` -- so the
    callables a ratio compares are sampled over the same rounds (a box whose speed drifts biases
    callables sampled over different spans: measured, 5 early samples of one against 100 of an
    identical kernel, 0.91).  Nearness is judged on the first phase's medians, not on the warm-up
    (the process's first call of a kernel is cold).  Returns ``{key: [seconds, ...]}``, one entry per
    call made after the warm-up."""
    import random

    warm = dict(warm or {})
    for k, f in fns.items():
        if k in warm:
            continue
        t0 = CLOCK()
        f()
        warm[k] = CLOCK() - t0
    fastest_warm = {}
    for k, t in warm.items():
        fastest_warm[group_of(k)] = min(t, fastest_warm.get(group_of(k), float("inf")))
    slow = {k for k in fns if warm[k] > slow_abs and warm[k] > slow_rel * fastest_warm[group_of(k)]}
    ts = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(seed)

    def rounds(caps):
        for _ in range(max(caps.values(), default=0)):
            rng.shuffle(order)
            for k in order:
                if len(ts[k]) >= caps[k]:
                    continue
                f = fns[k]
                t0 = CLOCK()
                f()
                ts[k].append(CLOCK() - t0)
    caps = {k: 2 if k in slow else repeats for k in fns}
    rounds(caps)
    med = {k: statistics.median(v) for k, v in ts.items() if v}
    fastest = {}
    for k, m in med.items():
        fastest[group_of(k)] = min(m, fastest.get(group_of(k), float("inf")))
    for k in fns:
        best = fastest.get(group_of(k), float("inf"))
        if k not in slow and best < small_s and med[k] <= near * best:
            caps[k] = max(caps[k], repeats * small_mult, min(max_samples, round(small_budget_s / max(best, 1e-9))))
    rounds(caps)
    return ts


def _small_overhead(repeats: int = 7, inner: int = 200) -> list:
    """The op's dispatch overhead at small sizes: µs per call (min over ``repeats`` batches of
    ``inner`` calls) of F.conv2d, the cpu backend's pass alone, the op, and the functional; run
    single-threaded (the overhead is Python, and OpenMP's barriers on a shared box are noise)."""
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for (N, C, H, K) in ((1, 8, 8, 3), (1, 64, 14, 7)):
        x = torch.randn(N, C, H, H)
        w = torch.randn(C, 1, K, K)
        p = normalize_params(1, "same", 1, (K, K))
        s, pd, d = p.as_lists()
        be = lkconv.backends.get_backend("cpu")
        pad = [K // 2, K // 2]
        xr = x.clone().requires_grad_(True)
        wr = w.clone().requires_grad_(True)
        g = torch.randn(N, C, H, H)
        fns = {
            "F.conv2d": lambda: F.conv2d(x, w, None, 1, pad, 1, C),
            "cpu backend .forward": lambda: be.forward(x, w, None, p),
            "torch.ops.lkconv.dwconv2d": lambda: torch.ops.lkconv.dwconv2d(x, w, None, s, pd, d, "cpu"),
            "depthwise_conv2d(backend='cpu')": lambda: lkconv.depthwise_conv2d(x, w, None, 1, "same", backend="cpu"),
            "depthwise_conv2d (auto)": lambda: lkconv.depthwise_conv2d(x, w, None, 1, "same"),
        }
        with torch.no_grad():
            res = {}
            for k, f in fns.items():
                for _ in range(50):
                    f()
            best = {k: float("inf") for k in fns}
            for _ in range(repeats):
                for k, f in fns.items():
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        f()
                    best[k] = min(best[k], (time.perf_counter() - t0) / inner * 1e6)
            res.update(best)
        fb = {
            "torch fwd+bwd": all_pass(lambda a, b: F.conv2d(a, b, None, 1, pad, 1, C), x, w, g),
            "lkconv auto fwd+bwd": all_pass(lambda a, b: lkconv.depthwise_conv2d(a, b, None, 1, "same"), x, w, g),
        }
        best = {k: float("inf") for k in fb}
        for f in fb.values():
            for _ in range(20):
                f()
        for _ in range(repeats):
            for k, f in fb.items():
                t0 = time.perf_counter()
                for _ in range(inner // 4):
                    f()
                best[k] = min(best[k], (time.perf_counter() - t0) / (inner // 4) * 1e6)
        res.update(best)
        out.append({"shape": f"{N}x{C}x{H}x{H} K{K}", "threads": 1, "us": res})
    torch.set_num_threads(threads)
    return out


def outside_kernel(N: int, C: int, H: int, K: int = 3, rounds: int = 25) -> list:
    """lkconv's own time around PyTorch's kernel at full size: per delegation store (the active one
    and, where that is the C++ one, the Python one for comparison) and input layout, the K forward
    (delegated to F.conv2d) timed as a whole, interleaved with F.conv2d called directly; ms, medians
    of ``rounds``.  The difference is what the call costs outside the kernel after a real pass (cold
    caches), not in a hot loop on a tiny plane.  For the Python store also the F.conv2d inside the
    same calls (the functional's ``F`` replaced by a timing shim; the C++ store calls at::conv2d
    itself: ``inside`` None)."""
    import lkconv.functional as lkf
    import lkconv.ops as lkops

    real, inner = lkf.F, []

    class _Shim:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def conv2d(*args, **kw):
            t0 = CLOCK()
            r = real.conv2d(*args, **kw)
            inner.append(CLOCK() - t0)
            return r
    out = []
    fast = lkops._fast
    for store in (["c++", "python"] if fast is not None else ["python"]):
        for layout in LAYOUT_NAMES:
            x = torch.randn(N, C, H, H).contiguous(memory_format=FORMATS[layout])
            w = torch.randn(C, 1, K, K)
            direct = lambda: F.conv2d(x, w, None, 1, [K // 2, K // 2], 1, C)  # noqa: E731
            call = lambda: lkconv.depthwise_conv2d(x, w, None, 1, "same")  # noqa: E731
            if store == "python":
                lkops._fast = None
                lkf.F = _Shim()
            lkops.clear_delegation_cache()
            try:
                call()
                direct()
                hits0 = fast.stats()["hits"] if store == "c++" else None
                inner.clear()
                t_call, t_direct = [], []
                for r in range(rounds):
                    for which in ((0, 1) if r % 2 else (1, 0)):
                        t0 = CLOCK()
                        (call if which == 0 else direct)()
                        (t_call if which == 0 else t_direct).append(CLOCK() - t0)
                served = fast.stats()["hits"] - hits0 if store == "c++" else len(inner)
            finally:
                lkf.F = real
                lkops._fast = fast
                lkops.clear_delegation_cache()
            if served != rounds:  # not delegated here: nothing to split
                print(f"# outside_kernel: K={K} {layout} ({store} store): {served} of {rounds} calls delegated; "
                      "skipped", flush=True)
                continue
            med = lambda v: statistics.median(v) * 1e3  # noqa: E731
            out.append(dict(K=K, layout=layout, store=store, call=med(t_call),
                            inside=med(inner) if store == "python" else None, f_conv2d=med(t_direct)))
    return out


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _ms(v):
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 10 else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def _node(c):
    n = c.get("auto_node")
    return "-" if n is None else "F.conv2d" if n == "ConvolutionBackward0" else "lkconv" if "Eager" in n else n


def _cell_ratio(c):
    m = c["median_ms"]
    best = min(m["torch"], m["torch_rt"])
    return best / m["auto"]


def ratio_ci(c, resamples: int = 1000, level: float = 0.95, seed: int = 0):
    """A bootstrap confidence interval of a cell's ratio min(median torch, median torch_rt) / median auto:
    each callable's samples resampled with replacement, independently (the samples of one callable
    are spread over the whole cell: the rounds are shuffled), ``resamples`` times.  ``(lo, hi)``, or
    None for a run that kept no samples (runs before the samples were stored)."""
    import random

    t = c.get("times_ms")
    if not t or not all(t.get(k) for k in ("torch", "torch_rt", "auto")):
        return None
    rng = random.Random(seed)
    med = statistics.median

    def boot(v):
        return med(rng.choices(v, k=len(v)))
    rs = sorted(min(boot(t["torch"]), boot(t["torch_rt"])) / boot(t["auto"]) for _ in range(resamples))
    k = int(round((1 - level) / 2 * (resamples - 1)))
    return rs[k], rs[resamples - 1 - k]


def _rms(v) -> str:
    """README's number format: 3 significant digits below 100 ms, whole ms above."""
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def readme_table(res: dict) -> str:
    """README.md's CPU table (and its forward + both gradients line) from a run's results dict:
    per K and pass, torch on NCHW and on channels_last tensors, ``auto`` (its path) on each input
    layout and its ratio to the faster PyTorch layout (**bold** under 0.95; in brackets its bootstrap
    95 % interval, :func:`ratio_ci`, for runs that kept their samples).
    ``python benchmarks/cpu_threshold.py --readme-table RUN/results.json`` prints it; every run
    writes it to ``readme_table.md``; tests/test_cpu_routing.py checks README.md holds the table of
    the run it cites."""
    cell = {(c["K"], c["pass"], c["layout"]): c for c in res["cells"]}
    lines = ["| K | pass | torch NCHW | torch channels_last | lkconv `auto`, NCHW in (path) | vs best torch "
             "| lkconv `auto`, channels_last in (path) | vs best torch |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]

    def ratio(c):
        r = _cell_ratio(c)
        ci = ratio_ci(c)
        txt = f"**{r:.2f}×**" if r < FLAG_BELOW else f"{r:.2f}×"
        return txt + (f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else "")
    for K in sorted({c["K"] for c in res["cells"]}):
        for pass_ in PASSES:
            n, l = cell[(K, pass_, "nchw")], cell[(K, pass_, "cl")]
            lines.append(f"| {K} | {pass_} | {_rms(n['median_ms']['torch'])} | {_rms(l['median_ms']['torch'])} | "
                         f"{_rms(n['median_ms']['auto'])} ({n['auto_path']}) | {ratio(n)} | "
                         f"{_rms(l['median_ms']['auto'])} ({l['auto_path']}) | {ratio(l)} |")
    if res.get("all"):
        lines += ["", "Forward + both gradients through autograd (ms): " + "; ".join(
            f"K={a['K']} {a['layout']}: torch {_rms(a['torch'])}, lkconv {_rms(a['auto'])} "
            f"({a['torch'] / a['auto']:.2f}×)" for a in res["all"])]
    return "\n".join(lines) + "\n"


def write_markdown(res: dict, path: Path) -> str:
    env = res["env"]
    lines = [
        "# cpu threshold run", "",
        f"`{env['command']}` — {env['date_utc']}, {env['cpu']}, {env['threads']} threads, torch {env['torch']}, "
        f"{env['clock']} clock, lkconv {env['lkconv_commit']}; N={env['n']} C={env['c']} {env['hw']}x{env['hw']} {env['dtype']}, "
        f"'same' padding, stride 1; median of {env['repeats']} interleaved repeats (slow callables far from the "
        f"choice: 2); runtime {env['runtime_s']:.0f} s wall, {env.get('cpu_time_s', float('nan')):.0f} s CPU; load average before/after {env['loadavg_before']} / "
        f"{env['loadavg_after']}; MALLOC_MMAP_THRESHOLD_={env['malloc_mmap_threshold'] or 'unset'}.", "",
        "Two levels of timing.  **User level** (`torch`, `torch_rt`, `auto`; the ratio): what a user's "
        "call costs -- the forward as `F.conv2d` / `lkconv.depthwise_conv2d` on tensors that do not require "
        "grad; a gradient as "
        "the backward of the autograd node the user's call recorded, with `requires_grad` on x only "
        "(grad_input) or on w only (grad_weight), timed as `torch.autograd.grad(out, x or w, g, "
        "retain_graph=True)` (autograd's engine included on both sides, no forward, nothing accumulated). "
        "**Op level** (`fft`, `direct`, `nchw`, `cl`; what the path table is derived from): one pass of "
        "lkconv's cpu backend called directly on one path, with the op's output conversion; `nchw` / `cl` "
        "are PyTorch's own kernels (F.conv2d / aten.convolution_backward) run in that layout, so on the "
        "input's own layout they are PyTorch's op-level time.", "",
        "`torch` = PyTorch on tensors of that layout; `torch_rt` = PyTorch in the other layout as a user "
        "writes it (`F.conv2d(x.contiguous(other), w).contiguous(layout)`; a gradient: that chain's "
        "backward); `auto` = lkconv as users call it (`node`: the autograd node its gradient ran, "
        "`ConvolutionBackward0` where the call is delegated to F.conv2d); ratio = min(torch, torch_rt) / "
        "auto (>= 1: auto faster; **bold** = under 0.95); `x-layout` = the faster of torch on NCHW and "
        "on channels_last tensors, no conversion, / auto (informational); `95 % interval` = the ratio's "
        "bootstrap interval (each callable's samples resampled independently, 1000 times).  Order: shuffled "
        f"afresh every round; cells whose fastest callable is under {env.get('small_ms', 0):g} ms: "
        f"{env.get('repeats', 0) * env.get('small_mult', 1)} samples for the callables within 2.5x of "
        f"the fastest, or as many as fit in {env.get('small_budget_s', 0):g} s (up to 100).  Delegated calls "
        f"remembered in: {env.get('delegation_store', 'python')}.", "",
        "| K | pass | layout | torch | torch_rt | fft | direct | nchw | cl | auto | auto path | node | ratio | 95 % interval "
        "| x-layout |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for c in res["cells"]:
        m = c["median_ms"]
        r = _cell_ratio(c)
        rs = f"**{r:.2f}**" if r < FLAG_BELOW else f"{r:.2f}"
        ci = ratio_ci(c)
        cis = f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else "-"
        lines.append(f"| {c['K']} | {c['pass']} | {c['layout']} | " + " | ".join(
            _ms(m.get(p)) for p in ("torch", "torch_rt") + LK_PATHS + ("auto",))
            + f" | {c['auto_path']} | {_node(c)} | {rs} | {cis} | {c['x_layout_ratio']:.2f} |")
    lines += ["", "Spread (min-max ms) of torch / best lkconv path / auto per cell:", "",
              "| K | pass | layout | torch | best path | auto |", "|---|---|---|---|---|---|"]
    for c in res["cells"]:
        sp = c["spread_ms"]
        bp = c["best_path"]
        f = lambda k: f"{sp[k][0]:.3g}-{sp[k][1]:.3g}"  # noqa: E731
        lines.append(f"| {c['K']} | {c['pass']} | {c['layout']} | {f('torch')} | {bp} {f(bp)} | {f('auto')} |")
    if res.get("all"):
        lines += ["", "Forward + both gradients through autograd (ms):", "",
                  "| K | layout | torch | auto | torch / auto |", "|---|---|---:|---:|---:|"]
        for a in res["all"]:
            lines.append(f"| {a['K']} | {a['layout']} | {_ms(a['torch'])} | {_ms(a['auto'])} | "
                         f"{a['torch'] / a['auto']:.2f}x |")
    lines += ["", "Round trip of one activation (ms): " + ", ".join(
        f"K={r['K']}: to_cl {r['to_cl']:.2f}, to_nchw {r['to_nchw']:.2f}" for r in res["roundtrip"][:1])]
    if res.get("overhead"):
        lines += ["", "Dispatch overhead at small sizes (µs per call, min of batches, 1 thread):", "",
                  "| shape | " + " | ".join(res["overhead"][0]["us"]) + " |",
                  "|---|" + "---:|" * len(res["overhead"][0]["us"])]
        for o in res["overhead"]:
            lines.append(f"| {o['shape']} | " + " | ".join(f"{v:.0f}" for v in o["us"].values()) + " |")
    if res.get("outside"):
        lines += ["", "lkconv's time around the kernel at full size (delegated K=3 forward, ms, medians; `F.conv2d` = "
                  "called directly, interleaved; `inside` = the F.conv2d inside the same calls, Python store only): "
                  + "; ".join(f"{o.get('store', 'python')} store, {o['layout']}: call {o['call']:.3f}, "
                              + (f"inside {o['inside']:.3f}, " if o.get("inside") is not None else "")
                              + f"F.conv2d {o['f_conv2d']:.3f} (call - F.conv2d {o['call'] - o['f_conv2d']:+.3f})"
                              for o in res["outside"])]
    flagged = [c for c in res["cells"] if _cell_ratio(c) < FLAG_BELOW]
    lines += ["", f"Cells under {FLAG_BELOW}: " + (", ".join(
        f"K={c['K']} {c['pass']} {c['layout']} ({_cell_ratio(c):.2f})" for c in flagged) or "none"), "",
        "Derived table:", "", "```", format_table(derive_table(res), res["env"]["run"]), "```", ""]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def write_plot(res: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # optional
        print(f"# plot skipped: matplotlib not available ({type(e).__name__}: {e})")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, pass_ in zip(axes, PASSES):
        for layout, style in (("nchw", "o-"), ("cl", "s--")):
            cs = [c for c in res["cells"] if c["pass"] == pass_ and c["layout"] == layout]
            ax.plot([c["K"] for c in cs], [_cell_ratio(c) for c in cs], style, label=f"{layout} input")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(FLAG_BELOW, color="r", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("K")
        ax.set_title(pass_)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("best PyTorch time / auto time")
    axes[0].legend()
    env = res["env"]
    fig.suptitle(f"lkconv auto vs the faster PyTorch layout, N={env['n']} C={env['c']} {env['hw']}² "
                 f"{env['dtype']}, {env['threads']} threads, {env['cpu']}, {env['date_utc'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
def run(a) -> dict:
    t_start = time.perf_counter()
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    if a.threads:
        torch.set_num_threads(a.threads)
    dt = getattr(torch, a.dtype)
    torch.manual_seed(0)
    N, C, H = a.n, a.c, a.hw
    from lkconv.bench.env import environment

    base_env = environment("cpu")
    cpu_slug = "".join(ch if ch.isalnum() else "-" for ch in str(base_env.get("cpu", "cpu")).lower()).strip("-")
    stamp = _dt.datetime.now(_dt.timezone.utc)
    out_dir = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / (
        f"cpu-threshold-{cpu_slug}-{stamp:%Y%m%d-%H%M%S}")
    env = dict(
        command="python benchmarks/cpu_threshold.py " + " ".join(sys.argv[1:]),
        date_utc=f"{stamp:%Y-%m-%d %H:%M:%S} UTC", cpu=base_env.get("cpu"), cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(), torch=torch.__version__, cpu_time_start=time.process_time(), lkconv_commit=base_env.get("lkconv_commit"),
        n=N, c=C, hw=H, dtype=a.dtype, repeats=a.repeats, small_ms=a.small_ms, small_mult=a.small_mult,
        method="user-level gradients (v2)", clock=a.clock, ks=a.ks, loadavg_before=list(os.getloadavg()),
        malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        small_budget_s=a.small_budget_s, delegation_store=lkconv.ops.delegation_store(),
        run=str(out_dir.relative_to(ROOT)) if out_dir.is_absolute() and ROOT in out_dir.parents else str(out_dir),
    )
    print(f"# cpu threshold: N={N} C={C} {H}x{H} {a.dtype}, 'same', stride 1, threads={env['threads']}, "
          f"median of {a.repeats}; torch {torch.__version__}; out: {env['run']}", flush=True)
    # glibc's mmap threshold adapts after a large block is freed: do that once, before any timing
    for _ in range(2):
        t = torch.empty(64 * 2**20 // 4)
        t.fill_(0)
        del t
    cells, alls, rts = [], [], []
    for K in a.ks:
        x0 = torch.randn(N, C, H, H, dtype=dt)
        w = torch.randn(C, 1, K, K, dtype=dt)
        g0 = torch.randn(N, C, H, H, dtype=dt)
        p = normalize_params(1, "same", 1, (K, K))
        pad = [K // 2, K // 2]
        fns, refs = {}, {}
        for layout in LAYOUT_NAMES:
            x = x0.contiguous(memory_format=FORMATS[layout])
            g = g0.contiguous(memory_format=FORMATS[layout])
            for pass_ in PASSES:
                fns[(pass_, layout, "torch")] = torch_user(pass_, x, w, g, pad, C)
                fns[(pass_, layout, "torch_rt")] = torch_user_roundtrip(pass_, x, w, g, pad, C, layout)
                for path in LK_PATHS:
                    fns[(pass_, layout, path)] = lk_path(pass_, path, x, w, g, p)
                fns[(pass_, layout, "auto")] = lk_auto(pass_, x, w, g, p)
            if not a.no_all:
                fns[("all", layout, "torch")] = all_pass(lambda u, v: F.conv2d(u, v, None, 1, pad, 1, C), x, w, g)
                fns[("all", layout, "auto")] = all_pass(
                    lambda u, v: lkconv.depthwise_conv2d(u, v, None, 1, "same"), x, w, g)
            fns[("roundtrip", layout, "to_cl" if layout == "nchw" else "to_nchw")] = (
                lambda x=x, layout=layout: x.contiguous(
                    memory_format=FORMATS["cl" if layout == "nchw" else "nchw"]))
        # correctness gate: every lkconv result against PyTorch's (and its memory format); the gate's
        # call is each callable's warm-up (its time decides whether it is timed twice only)
        gate_t = {}

        def gate(key, f):
            t0 = CLOCK()
            r = f()
            gate_t[key] = CLOCK() - t0
            return r
        for key, f in fns.items():
            if key[0] in PASSES and key[2] == "torch":
                refs[key[:2]] = gate(key, f)
        for (pass_, layout, prov), f in fns.items():
            if pass_ not in PASSES or prov == "torch":
                continue
            ref = refs[(pass_, layout)]
            got = gate((pass_, layout, prov), f)
            err = _rel_err(got, ref)
            if err > 1e-4:
                raise SystemExit(f"K={K} {pass_} {layout} {prov}: relative error {err:.2e} against PyTorch")
            if pass_ != "grad_weight" and prov != "torch_rt" and _fmt(got) != _fmt(ref):
                raise SystemExit(f"K={K} {pass_} {layout} {prov}: memory format differs from PyTorch's")
        ts = time_interleaved(fns, a.repeats, group_of=lambda k: (k[0], k[1]), slow_abs=a.slow_s,
                              slow_rel=4.0, warm=gate_t, small_s=a.small_ms * 1e-3, small_mult=a.small_mult,
                              seed=K, small_budget_s=a.small_budget_s)
        med = {k: statistics.median(v) * 1e3 for k, v in ts.items()}
        spread = {k: (min(v) * 1e3, max(v) * 1e3) for k, v in ts.items()}
        for layout in LAYOUT_NAMES:
            xl = x0.contiguous(memory_format=FORMATS[layout])
            for pass_ in PASSES:
                m = {prov: med[(pass_, layout, prov)] for prov in PROVIDERS}
                data = xl
                auto_path = cpu.choose_path(K, K, (1, 1), pass_, layout=cpu.layout_of(data))
                best_path = min(LK_PATHS, key=lambda q: m[q])
                cells.append(dict(
                    K=K, pass_=pass_, layout=layout, median_ms=m,
                    spread_ms={prov: spread[(pass_, layout, prov)] for prov in PROVIDERS},
                    samples={prov: len(ts[(pass_, layout, prov)]) for prov in PROVIDERS},
                    times_ms={prov: [round(v * 1e3, 4) for v in ts[(pass_, layout, prov)]] for prov in PROVIDERS},
                    auto_path=auto_path, best_path=best_path,
                    auto_node=getattr(fns[(pass_, layout, "auto")], "node", None)))
                cells[-1]["pass"] = cells[-1].pop("pass_")
            if not a.no_all:
                alls.append(dict(K=K, layout=layout, torch=med[("all", layout, "torch")],
                                 auto=med[("all", layout, "auto")]))
        rts.append(dict(K=K, to_cl=med[("roundtrip", "nchw", "to_cl")], to_nchw=med[("roundtrip", "cl", "to_nchw")]))
        for c in cells[-6:]:
            c["x_layout_ratio"] = min(
                next(d["median_ms"]["torch"] for d in cells[-6:] if d["pass"] == c["pass"] and d["layout"] == lay)
                for lay in LAYOUT_NAMES) / c["median_ms"]["auto"]
            r = _cell_ratio(c)
            mm = c["median_ms"]
            print(f"K={K:2d} {c['pass']:11s} {c['layout']:4s} torch {_ms(mm['torch']):>6} rt {_ms(mm['torch_rt']):>6} "
                  f"| fft {_ms(mm['fft']):>6} direct {_ms(mm['direct']):>6} nchw {_ms(mm['nchw']):>6} "
                  f"cl {_ms(mm['cl']):>6} | auto {_ms(mm['auto']):>6} ({c['auto_path']}) ratio {r:.2f}"
                  + ("  <-- under 0.95" if r < FLAG_BELOW else ""), flush=True)
        # a partial results.json after every K (a long run on a busy machine keeps what it measured)
        out_dir.mkdir(parents=True, exist_ok=True)
        env["runtime_s"] = time.perf_counter() - t_start
        env["partial"] = f"up to K={K}"
        (out_dir / "results.json").write_text(json.dumps(
            dict(env=env, cells=cells, all=alls, roundtrip=rts, overhead=[]), indent=1))
    env.pop("partial", None)
    overhead = [] if a.no_overhead else _small_overhead()
    outside = [] if a.no_overhead else outside_kernel(N, C, H)
    env["loadavg_after"] = list(os.getloadavg())
    env["runtime_s"] = time.perf_counter() - t_start
    env["cpu_time_s"] = time.process_time() - env.pop("cpu_time_start")
    return dict(env=env, cells=cells, all=alls, roundtrip=rts, overhead=overhead, outside=outside), out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--c", type=int, default=128)
    ap.add_argument("--hw", type=int, default=56)
    ap.add_argument("--ks", type=int, nargs="+", default=[3, 5, 7, 9, 13, 19, 25, 31])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall: perf_counter; cpu: process CPU time (robust to other processes on a shared "
                         "machine; use with --threads 1)")
    ap.add_argument("--slow-s", type=float, default=0.25,
                    help="a callable slower than this (and 4x the fastest of its cell) is timed twice only")
    ap.add_argument("--small-ms", type=float, default=150.0,
                    help="cells whose fastest median takes under this many ms get more samples (the same number) "
                         "for the callables near the fastest: --small-mult times the repeats, or what fits in "
                         "--small-budget-s (a few per cent decide their ratio)")
    ap.add_argument("--small-mult", type=int, default=5)
    ap.add_argument("--small-budget-s", type=float, default=0.5,
                    help="...or, for those callables, as many samples as fit in this many seconds (up to 100)")
    ap.add_argument("--no-all", action="store_true", help="skip forward + both gradients through autograd")
    ap.add_argument("--no-overhead", action="store_true", help="skip the small-size dispatch overhead")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/cpu-threshold-...)")
    ap.add_argument("--readme-table", metavar="RESULTS_JSON", default=None,
                    help="only print README.md's CPU table for a run's results.json")
    ap.add_argument("--derive", metavar="RESULTS_JSON", default=None,
                    help="only print the PATH_TABLE rows derived from a run's results.json")
    a = ap.parse_args(argv)
    if a.derive:
        res = json.loads(Path(a.derive).read_text())
        print(format_table(derive_table(res), res["env"]["run"]))
        return
    if a.readme_table:
        print(readme_table(json.loads(Path(a.readme_table).read_text())), end="")
        return
    res, out_dir = run(a)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out_dir / "results.md")
    (out_dir / "readme_table.md").write_text(readme_table(res))
    write_plot(res, out_dir / "auto_vs_torch.png")
    print()
    print(format_table(derive_table(res), res["env"]["run"]))
    flagged = [c for c in res["cells"] if _cell_ratio(c) < FLAG_BELOW]
    print(f"# cells under {FLAG_BELOW}: " + (", ".join(
        f"K={c['K']} {c['pass']} {c['layout']} ({_cell_ratio(c):.2f})" for c in flagged) or "none"))
    if res["overhead"]:
        for o in res["overhead"]:
            print(f"# overhead {o['shape']}: " + ", ".join(f"{k} {v:.0f} us" for k, v in o["us"].items()))
    for o in res.get("outside", []):
        inside = f", F.conv2d inside it {o['inside']:.3f} ms" if o.get("inside") is not None else ""
        print(f"# K={o['K']} {o['layout']} forward at full size ({o['store']} store): call {o['call']:.3f} ms"
              f"{inside}, F.conv2d alone {o['f_conv2d']:.3f} ms")
    print(f"# runtime {res['env']['runtime_s']:.0f} s; wrote {out_dir}")


if __name__ == "__main__":
    main()
