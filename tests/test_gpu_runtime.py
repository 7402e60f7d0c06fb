"""GPU runtime behaviour of every CUDA-capable backend (``cuda``, ``triton``, ``torch``):

* CUDA graphs: forward + backward captured once and replayed on new data give correct results;
  ``torch.compile(mode="reduce-overhead")`` (CUDA graph trees) agrees with eager;
* streams: work issued on a non-default stream runs on that stream (a kernel launched on the wrong
  stream would read its input before the producer on the right stream wrote it);
* device index: tensors on ``cuda:1`` while ``cuda:0`` is current;
* large tensors: > 2**31 elements (int64 indexing), checked exactly on sampled regions, including
  regions whose linear indices are above 2**31, for NCHW and channels_last, forward and both grads.

Everything skips cleanly without CUDA.  The sampled-region checker itself is verified on the CPU
against the full reference (``test_region_checker_on_cpu``), so it runs in CI too.
"""
import pytest
import torch

import lkconv
from lkconv.backends.reference import reference_forward, reference_grad_input, reference_grad_weight
from lkconv.params import ConvParams
from lkconv.testing import _torch_d_all_passes, compare_all_passes, no_tf32, tolerance

GPU_BACKENDS = ["cuda", "triton", "torch"]
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none visible)")


def _need(backend):
    why = lkconv.backend_status().get(backend)
    if why is not None:
        pytest.skip(f"backend {backend!r} not available: {why}")


def _supports(backend, x, w, padding=0, stride=1, dilation=1):
    from lkconv.backends import Request, get_backend
    from lkconv.params import normalize_params

    p = normalize_params(stride, padding, dilation, (w.shape[2], w.shape[3]))
    inst = get_backend(backend)
    for ps in ("forward", "grad_input", "grad_weight"):
        why = inst.check(Request.of(ps, x, w, p))
        if why is not None:
            pytest.skip(f"backend {backend!r} declines ({ps}): {why}")


def _ref_check(backend, x, w, b, g, out, gx, gw, gb, padding, stride=1, dilation=1):
    """out/grads of a run vs the fp64 reference, with the tolerance rule (docs/architecture.md)."""
    from lkconv.testing import reference_all_passes
    from lkconv.params import normalize_params

    p = normalize_params(stride, padding, dilation, (w.shape[2], w.shape[3]))
    ref = reference_all_passes(x, w, b, p, g)
    td = _torch_d_all_passes(x, w, b, p, g)
    msgs, ok = [], True
    td_gb = None if b is None else g.sum(dim=(0, 2, 3))  # PyTorch's bias gradient in this dtype
    for name, o, r, t in zip(("forward", "grad_input", "grad_weight", "grad_bias"), (out, gx, gw, gb), ref,
                             (*td, td_gb)):
        if o is None or r is None:
            continue
        err = (o.detach().double().cpu() - r).abs().max().item()
        tol = tolerance(r, t, x.dtype)
        good = err <= tol
        ok &= good
        msgs.append(f"{name}: err={err:.3e} tol={tol:.3e} {'ok' if good else 'FAIL'}")
    assert ok, f"{backend}: " + "; ".join(msgs)


# ------------------------------------------------------------------------------------------------
# CUDA graphs
# ------------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay(backend, dtype):
    _need(backend)
    dev = "cuda"
    N, C, H, W, K = 2, 32, 40, 44, 13
    x = torch.randn(N, C, H, W, device=dev, dtype=dtype).requires_grad_(True)
    w = (torch.randn(C, 1, K, K, device=dev, dtype=dtype) / K).requires_grad_(True)
    b = torch.randn(C, device=dev, dtype=dtype).requires_grad_(True)
    g = torch.randn(N, C, H, W, device=dev, dtype=dtype)
    _supports(backend, x, w, padding=K // 2)

    def step():
        out = lkconv.depthwise_conv2d(x, w, b, padding=K // 2, backend=backend)
        out.backward(g)
        return out

    with no_tf32():
        # warm up on a side stream (autotuning, lazy module loading, allocator) as the docs require
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        x.grad = w.grad = b.grad = None

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step()

        for trial in range(3):
            with torch.no_grad():
                x.copy_(torch.randn_like(x))
                w.copy_(torch.randn_like(w) / K)
                b.copy_(torch.randn_like(b))
                g.copy_(torch.randn_like(g))
            graph.replay()
            torch.cuda.synchronize()
            _ref_check(f"{backend} graph replay {trial}", x.detach(), w.detach(), b.detach(), g,
                       static_out, x.grad, w.grad, b.grad, padding=K // 2)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_reduce_overhead_matches_eager(backend):
    _need(backend)
    dev = "cuda"
    x = torch.randn(2, 16, 33, 35, device=dev, dtype=torch.float16)
    w = torch.randn(16, 1, 31, 31, device=dev, dtype=torch.float16) / 31
    _supports(backend, x, w, padding=15)

    def f(x, w):
        return lkconv.depthwise_conv2d(x, w, None, padding=15, backend=backend)

    def run(fn):
        xr = x.detach().requires_grad_(True)
        wr = w.detach().requires_grad_(True)
        out = fn(xr, wr)
        gx, gw = torch.autograd.grad(out.float().square().sum(), (xr, wr))
        return out.detach().clone(), gx.clone(), gw.clone()

    eager = run(f)
    torch._dynamo.reset()
    try:
        comp = torch.compile(f, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up, record, then replay the CUDA graphs (forward and backward)
            got = run(comp)
        torch.cuda.synchronize()
    finally:
        torch._dynamo.reset()
    for name, a, e in zip(("forward", "grad_input", "grad_weight"), got, eager):
        err = (a.double() - e.double()).abs().max().item()
        tol = 1e-2 * max(1.0, e.abs().max().item())
        assert err <= tol, f"{backend} {name}: compiled (reduce-overhead) vs eager err={err:.3e} tol={tol:.3e}"


# ------------------------------------------------------------------------------------------------
# streams and devices
# ------------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_runs_on_the_current_non_default_stream(backend):
    """Producer and lkconv on a side stream, behind a long sleep.  A backend that launches on the
    default (or legacy) stream reads x before the copy lands (NaN) or races with it."""
    _need(backend)
    dev = "cuda"
    N, C, H, W, K = 2, 16, 48, 50, 31
    src = torch.randn(N, C, H, W, device=dev)
    w = torch.randn(C, 1, K, K, device=dev) / K
    g_src = torch.randn(N, C, H, W, device=dev)
    _supports(backend, src, w, padding=K // 2)
    x = torch.full_like(src, float("nan"))
    g = torch.full_like(g_src, float("nan"))
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with no_tf32(), torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time in front of the producer
        x.copy_(src)
        g.copy_(g_src)
        xr = x.detach().requires_grad_(True)
        wr = w.detach().requires_grad_(True)
        out = lkconv.depthwise_conv2d(xr, wr, None, padding=K // 2, backend=backend)
        gx, gw = torch.autograd.grad(out, (xr, wr), g)
    s.synchronize()
    torch.cuda.synchronize()
    _ref_check(f"{backend} on a side stream", src, w, None, g_src, out, gx, gw, None, padding=K // 2)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_zero_device_index(backend):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    _need(backend)
    dev = "cuda:1"
    x = torch.randn(2, 8, 30, 31, device=dev)
    w = torch.randn(8, 1, 13, 13, device=dev) / 13
    b = torch.randn(8, device=dev)
    _supports(backend, x, w, padding=6)
    with torch.cuda.device(0):
        res = compare_all_passes(backend, x, w, b, padding=6)
        out = lkconv.depthwise_conv2d(x, w, b, padding=6, backend=backend)
    assert out.device == torch.device(dev)
    assert all(r.ok for r in res), [str(r) for r in res]


# ------------------------------------------------------------------------------------------------
# large tensors: exact checks on sampled regions
# ------------------------------------------------------------------------------------------------
P0 = ConvParams((1, 1), (0, 0, 0, 0), (1, 1))


def check_regions(backend, x, w, pad, regions):
    """Run forward + backward of a stride-1 depthwise conv with symmetric ``pad`` on ``x`` (any size,
    any device) with a grad_out that is zero except on ``regions`` [(n, c, r0, r1, c0, c1), ...] of
    the output, and compare exactly those regions (forward), the input window they touch
    (grad_input, and zeros elsewhere at a few probes) and the whole grad_weight with the fp64
    reference computed on small crops.  Returns a list of failure strings (empty = all good)."""
    N, C, H, W = x.shape
    K = w.shape[-1]
    dtype = x.dtype
    gen = torch.Generator().manual_seed(0)
    with no_tf32():
        xr = x.detach().requires_grad_(True)
        wr = w.detach().requires_grad_(True)
        out = lkconv.depthwise_conv2d(xr, wr, None, padding=pad, backend=backend)
        g = torch.zeros_like(out)
        g_regions = []
        for (n, c, r0, r1, c0, c1) in regions:
            gr = torch.randn((r1 - r0, c1 - c0), generator=gen, dtype=torch.float64)
            g[n, c, r0:r1, c0:c1] = gr.to(dtype).to(x.device)
            g_regions.append(g[n, c, r0:r1, c0:c1].detach().double().cpu())
        gx, gw = torch.autograd.grad(out, (xr, wr), g)
    fails = []
    gw_ref = torch.zeros(C, 1, K, K, dtype=torch.float64)
    gw_td = torch.zeros(C, 1, K, K, dtype=torch.float64)
    for (n, c, r0, r1, c0, c1), g_reg in zip(regions, g_regions):
        # input window [a, b) x [d, e) (may stick out of the image: zero padding)
        a, b, d, e = r0 - pad, r1 - pad + K - 1, c0 - pad, c1 - pad + K - 1
        ia, ib, id_, ie = max(a, 0), min(b, H), max(d, 0), min(e, W)
        crop = torch.zeros(1, 1, b - a, e - d, dtype=torch.float64)
        crop[0, 0, ia - a : ib - a, id_ - d : ie - d] = x[n, c, ia:ib, id_:ie].double().cpu()
        wc = w[c : c + 1].double().cpu()
        g4 = g_reg[None, None]
        ref_out = reference_forward(crop, wc, None, P0)
        ref_gx = reference_grad_input(g4, wc, crop.shape, P0)
        gw_ref[c] += reference_grad_weight(g4, crop, wc.shape, P0)[0]
        # PyTorch in the same dtype on the same device, for the tolerance
        td_out, td_gx, td_gw = _torch_d_all_passes(crop.to(dtype).to(x.device), wc.to(dtype).to(x.device), None,
                                                   P0, g4.to(dtype).to(x.device))
        if td_gw is not None:
            gw_td[c] += td_gw[0].double().cpu()
        got_out = out[n, c, r0:r1, c0:c1].double().cpu()[None, None]
        err = (got_out - ref_out).abs().max().item()
        tol = tolerance(ref_out, td_out, dtype)
        if not err <= tol:
            fails.append(f"forward region {(n, c, r0, r1, c0, c1)}: err={err:.3e} tol={tol:.3e}")
        got_gx = gx[n, c, ia:ib, id_:ie].double().cpu()
        ref_gx_in = ref_gx[0, 0, ia - a : ib - a, id_ - d : ie - d]
        td_gx_in = None if td_gx is None else td_gx[0, 0, ia - a : ib - a, id_ - d : ie - d]
        err = (got_gx - ref_gx_in).abs().max().item()
        tol = tolerance(ref_gx_in, td_gx_in, dtype)
        if not err <= tol:
            fails.append(f"grad_input window of {(n, c, r0, r1, c0, c1)}: err={err:.3e} tol={tol:.3e}")
    # grad_input is zero away from every window (probe the four corners of every plane we touched,
    # and one untouched plane when there is one)
    touched = {(n, c) for (n, c, *_ ) in regions}
    windows = [(n, c, r0 - pad, r1 - pad + K - 1, c0 - pad, c1 - pad + K - 1) for (n, c, r0, r1, c0, c1) in regions]
    probes = []
    for (n, c) in touched | {(N - 1, (regions[0][1] + 1) % C)}:
        for (r, q) in ((0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1), (H // 2, W // 2)):
            if not any(wn == n and wc_ == c and a <= r < b and d <= q < e for (wn, wc_, a, b, d, e) in windows):
                probes.append((n, c, r, q))
    for (n, c, r, q) in probes:
        v = gx[n, c, r, q].item()
        if v != 0:
            fails.append(f"grad_input[{n}, {c}, {r}, {q}] = {v} outside every window (expected 0)")
    err = (gw.detach().double().cpu() - gw_ref).abs().max().item()
    tol = tolerance(gw_ref, gw_td if dtype != torch.float64 else None, dtype)
    if not err <= tol:
        fails.append(f"grad_weight: err={err:.3e} tol={tol:.3e}")
    return fails


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_region_checker_on_cpu(backend, layout):
    """The sampled-region checker agrees with a full reference run on a small CPU case (so the GPU
    large-tensor test below checks what it claims), and catches a wrong result."""
    _need(backend)
    x = torch.randn(2, 3, 40, 37)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 1, 7, 7) / 7
    regions = [(0, 0, 0, 8, 0, 9), (1, 2, 30, 40, 25, 37), (1, 1, 15, 20, 3, 30)]
    assert check_regions(backend, x, w, 3, regions) == []

    # a deliberately wrong backend (output shifted by one column) must be caught
    from lkconv.backends import register_backend
    from lkconv.backends.torch_native import TorchBackend

    class Shifted(TorchBackend):
        name = "shifted-test"

        def forward(self, x, weight, bias, p):
            return torch.roll(super().forward(x, weight, bias, p), 1, dims=3)

    register_backend("shifted-test", Shifted)
    try:
        fails = check_regions("shifted-test", x, w, 3, regions)
    finally:
        from lkconv.backends import _FACTORIES, _INSTANCES

        _FACTORIES.pop("shifted-test", None)
        _INSTANCES.pop("shifted-test", None)
    assert any(f.startswith("forward") for f in fails), fails


LARGE = {
    # one huge plane pair: linear indices above 2**31 in channel 1's bottom rows
    "planes-33000sq": dict(shape=(1, 2, 33000, 33000), K=13),
    # many small planes: the batch/channel index carries the offset past 2**31
    "batch-2400x8x352sq": dict(shape=(2400, 8, 352, 352), K=31),
}


@requires_cuda
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", list(LARGE))
@pytest.mark.parametrize("backend", ["cuda", "triton"])  # lkconv's own kernels (torch's limits are torch's)
def test_more_than_2_31_elements(backend, case, layout):
    _need(backend)
    N, C, H, W = LARGE[case]["shape"]
    K = LARGE[case]["K"]
    assert N * C * H * W > 2**31
    dtype = torch.float16
    free, _ = torch.cuda.mem_get_info()
    need = 5 * N * C * H * W * 2  # x, out, grad_out, grad_input (+ slack)
    if free < need:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB free GPU memory, {free / 2**30:.0f} GiB free")
    if layout == "channels_last":
        x = torch.empty(N, H, W, C, device="cuda", dtype=dtype).permute(0, 3, 1, 2)
    else:
        x = torch.empty(N, C, H, W, device="cuda", dtype=dtype)
    x.normal_()
    w = torch.randn(C, 1, K, K, device="cuda", dtype=dtype) / K
    _supports(backend, x, w, padding=K // 2)
    regions = [
        (0, 0, 0, 48, 0, 64),  # the very first elements
        (N - 1, C - 1, H - 48, H, W - 64, W),  # the very last elements (linear index ~ numel)
        (N - 1, C - 1, H // 2, H // 2 + 16, W - 32, W),
        (N // 2, C // 2, H - 20, H, 0, 40),
    ]
    fails = check_regions(backend, x, w, K // 2, regions)
    assert not fails, f"{backend} {case} {layout}: " + "; ".join(fails)
