"""Measure where the CPU backend should switch from direct convolution to FFT, and how it compares
with PyTorch's own CPU depthwise convolution.

For each kernel size K (square, "same" padding, stride 1) at a RepLKNet-like layer shape
(default N=8, C=128, 56x56, fp32) it times, per pass (forward, grad_input, grad_weight):

* ``torch``  — PyTorch's F.conv2d / aten.convolution_backward as is (the ``torch`` backend)
* ``direct`` — lkconv's direct path: oneDNN used well (explicit pre-padding above the padding
  cliff; grad_weight as a forward convolution with grad_out as the kernel)
* ``slices`` — lkconv's own vectorised direct method (sum of shifted slices, in-place FMAs)
* ``fft``    — lkconv's rfft2 path

plus ``torch autograd`` (F.conv2d(groups=C) forward + backward for both grads, the baseline of the
5x target) and ``lkconv cpu`` (the backend's own choice, forward + both grads, through autograd).
Each number is the median of ``--repeats`` runs after one warm-up.  The machine may be shared:
report medians and say so.

    python benchmarks/cpu_threshold.py                    # full table, prints markdown
    python benchmarks/cpu_threshold.py --ks 3 7 31 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lkconv  # noqa: E402
from lkconv.backends import cpu  # noqa: E402
from lkconv.backends.base import output_memory_format  # noqa: E402
from lkconv.backends.torch_native import TorchBackend  # noqa: E402
from lkconv.params import ConvParams, normalize_params  # noqa: E402

PASSES = ("forward", "grad_input", "grad_weight")
NAMES = ("torch", "direct", "slices", "fft")


# ------------------------------------------------------------------------------------------------
# the "slices" method: a vectorised sum of shifted slices (one addcmul per tap), timed against
# oneDNN and the FFT; measured slower than oneDNN for every pass, so it lives here, not in lkconv
# ------------------------------------------------------------------------------------------------
def _cdt(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


def _empty_like_format(shape, ref: torch.Tensor, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=ref.device, memory_format=output_memory_format(ref))


def _tap_slices(p: ConvParams, a: int, b: int, ho: int, wo: int):
    sh, sw = p.stride
    dh, dw = p.dilation
    r0, c0 = a * dh, b * dw
    return slice(r0, r0 + sh * (ho - 1) + 1, sh), slice(c0, c0 + sw * (wo - 1) + 1, sw)


def slices_forward(x, weight, bias, p: ConvParams) -> torch.Tensor:
    N, C, H, W = x.shape
    KH, KW = weight.shape[2], weight.shape[3]
    ho, wo = p.out_size(H, W, KH, KW)
    cdt = _cdt(x.dtype)
    t, b_, l, r = p.padding
    xp = F.pad(x.to(cdt), (l, r, t, b_))
    w = weight.to(cdt).reshape(C, KH, KW)
    out = _empty_like_format((N, C, ho, wo), x, cdt)
    if bias is None:
        out.zero_()
    else:
        out.copy_(bias.to(cdt).view(1, C, 1, 1).expand_as(out))
    for a in range(KH):
        for b in range(KW):
            rs, cs = _tap_slices(p, a, b, ho, wo)
            out.addcmul_(xp[:, :, rs, cs], w[:, a, b].view(1, C, 1, 1))
    return out.to(x.dtype)


def slices_grad_input(grad_out, weight, input_shape, p: ConvParams) -> torch.Tensor:
    N, C, H, W = input_shape
    KH, KW = weight.shape[2], weight.shape[3]
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    cdt = _cdt(grad_out.dtype)
    t, b_, l, r = p.padding
    g = grad_out.to(cdt)
    w = weight.to(cdt).reshape(C, KH, KW)
    gxp = g.new_zeros((N, C, H + t + b_, W + l + r))
    for a in range(KH):
        for b in range(KW):
            rs, cs = _tap_slices(p, a, b, ho, wo)
            gxp[:, :, rs, cs].addcmul_(g, w[:, a, b].view(1, C, 1, 1))
    return gxp[:, :, t : t + H, l : l + W].to(grad_out.dtype)


def slices_grad_weight(grad_out, x, weight_shape, p: ConvParams) -> torch.Tensor:
    C, _, KH, KW = weight_shape
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    cdt = _cdt(x.dtype)
    t, b_, l, r = p.padding
    xp = F.pad(x.to(cdt), (l, r, t, b_))
    g = grad_out.to(cdt)
    gw = torch.empty((C, KH, KW), dtype=cdt, device=x.device)
    # per tap: one batched dot product per channel, (C, 1, M) @ (C, M, 1) with M = N*ho*wo
    gc = g.transpose(0, 1).reshape(C, 1, -1)
    for a in range(KH):
        for b in range(KW):
            rs, cs = _tap_slices(p, a, b, ho, wo)
            xs = xp[:, :, rs, cs].transpose(0, 1).reshape(C, -1, 1)
            gw[:, a, b] = torch.bmm(gc, xs).view(C)
    return gw.to(x.dtype).view(C, 1, KH, KW)


CLOCK = time.perf_counter


def timeit_interleaved(fns: dict, repeats: int, slow_s: float = 2.0) -> dict:
    """Median seconds per callable.  The callables are run round-robin (one warm-up round first)
    so that load changes on a shared machine hit them all alike; one that takes more than
    ``slow_s`` is timed at most twice."""
    ts = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(repeats):
        for k, f in fns.items():
            if len(ts[k]) >= 2 and min(ts[k]) > slow_s:
                continue
            t0 = CLOCK()
            f()
            ts[k].append(CLOCK() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def impls(x, w, g, p):
    shape = x.shape
    tb = TorchBackend()
    return {
        "torch": (
            lambda: tb.forward(x, w, None, p),
            lambda: tb.grad_input(g, w, shape, p),
            lambda: tb.grad_weight(g, x, w.shape, p),
        ),
        "direct": (
            lambda: cpu.direct_forward(x, w, None, p),
            lambda: cpu.direct_grad_input(g, w, shape, p),
            lambda: cpu.direct_grad_weight(g, x, w.shape, p),
        ),
        "slices": (
            lambda: slices_forward(x, w, None, p),
            lambda: slices_grad_input(g, w, shape, p),
            lambda: slices_grad_weight(g, x, w.shape, p),
        ),
        "fft": (
            lambda: cpu.fft_forward(x, w, None, p),
            lambda: cpu.fft_grad_input(g, w, shape, p),
            lambda: cpu.fft_grad_weight(g, x, w.shape, p),
        ),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--c", type=int, default=128)
    ap.add_argument("--hw", type=int, default=56)
    ap.add_argument("--ks", type=int, nargs="+", default=[3, 5, 7, 9, 11, 13, 17, 21, 27, 31])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--slices-max-k", type=int, default=9, help="skip the slices method above this K (slow)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--e2e-only", action="store_true",
                    help="only the end-to-end comparison with torch (skip the per-pass table)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall: perf_counter; cpu: process CPU time (robust to other processes on a "
                         "shared machine; use with --threads 1)")
    a = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    if a.threads:
        torch.set_num_threads(a.threads)
    dt = getattr(torch, a.dtype)
    torch.manual_seed(0)
    N, C, H = a.n, a.c, a.hw
    print(f"# cpu threshold: N={N} C={C} {H}x{H} {a.dtype}, 'same' padding, stride 1, "
          f"threads={torch.get_num_threads()}, {a.clock} clock, median of {a.repeats}; torch {torch.__version__}")
    print(f"# current rule: FFT when KH*KW >= {cpu.FFT_MIN_TAPS} (per pass: {cpu.FFT_MIN_TAPS_PER_PASS})")
    rows = []
    if not a.e2e_only:
        print("| K | pass | torch ms | lkconv direct ms | slices ms | fft ms | fastest |")
        print("|---|---|---:|---:|---:|---:|---|")
    for K in a.ks:
        x = torch.randn(N, C, H, H, dtype=dt)
        w = torch.randn(C, 1, K, K, dtype=dt)
        p = normalize_params(1, "same", 1, (K, K))
        g = torch.randn(N, C, H, H, dtype=dt)
        fns = impls(x, w, g, p)
        # end to end: torch autograd vs lkconv's cpu backend (its own choice) through autograd
        xr = x.clone().requires_grad_(True)
        wr = w.clone().requires_grad_(True)

        def torch_fwd():
            with torch.no_grad():
                F.conv2d(x, w, None, 1, "same", 1, C)

        def torch_fb():
            out = F.conv2d(xr, wr, None, 1, "same", 1, C)
            torch.autograd.grad(out, (xr, wr), g)

        def lk_fwd():
            with torch.no_grad():
                lkconv.depthwise_conv2d(x, w, None, 1, "same", backend="cpu")

        def lk_fb():
            out = lkconv.depthwise_conv2d(xr, wr, None, 1, "same", backend="cpu")
            torch.autograd.grad(out, (xr, wr), g)

        todo = {}
        for i, pass_ in enumerate(() if a.e2e_only else PASSES):
            for name in NAMES:
                if name == "slices" and K > a.slices_max_k:
                    continue
                todo[(pass_, name)] = fns[name][i]
        for k, f in (("torch_fwd", torch_fwd), ("torch_fb", torch_fb), ("lk_fwd", lk_fwd), ("lk_fb", lk_fb)):
            todo[k] = f
        med = timeit_interleaved(todo, a.repeats)
        res = {}
        for pass_ in () if a.e2e_only else PASSES:
            t = {name: med[(pass_, name)] for name in NAMES if (pass_, name) in med}
            best = min(t, key=t.get)
            res[pass_] = t
            fmt = lambda n: f"{t[n] * 1e3:.1f}" if n in t else "-"  # noqa: E731
            print(f"| {K} | {pass_} | {fmt('torch')} | {fmt('direct')} | {fmt('slices')} | {fmt('fft')} | {best} |",
                  flush=True)
        e2e = {k: med[k] for k in ("torch_fwd", "torch_fb", "lk_fwd", "lk_fb")}
        rows.append((K, res, e2e))
    print()
    print("| K | torch fwd ms | lkconv cpu fwd ms | speedup | torch fwd+bwd ms | lkconv cpu fwd+bwd ms | speedup | paths |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for K, res, e in rows:
        paths = "/".join(cpu.choose_path(K, K, (1, 1), ps)[0] for ps in PASSES)
        print(f"| {K} | {e['torch_fwd'] * 1e3:.0f} | {e['lk_fwd'] * 1e3:.0f} | {e['torch_fwd'] / e['lk_fwd']:.1f}x "
              f"| {e['torch_fb'] * 1e3:.0f} | {e['lk_fb'] * 1e3:.0f} | {e['torch_fb'] / e['lk_fb']:.1f}x | {paths} |")
    print()
    # crossover per pass: smallest K from which FFT beats the best direct method at every larger K
    for pass_ in () if a.e2e_only else PASSES:
        ks = [K for K, res, _ in rows]
        win = [res[pass_]["fft"] < min(v for n, v in res[pass_].items() if n in ("direct", "slices"))
               for _, res, _ in rows]
        cross = next((ks[i] for i in range(len(ks)) if all(win[i:])), None)
        print(f"# {pass_}: FFT fastest from K = {cross} on (taps {cross * cross if cross else '-'})")


if __name__ == "__main__":
    main()
