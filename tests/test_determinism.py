"""Determinism: with ``torch.use_deterministic_algorithms(True)`` every available backend returns
bit-identical outputs and gradients across runs -- or, like torch itself, raises a RuntimeError
that says it cannot be deterministic.  The global setting is restored afterwards.

On a GPU the shapes are big enough for split reductions / atomics in grad_weight to matter.
"""
import contextlib
import os

import pytest
import torch

import lkconv


@contextlib.contextmanager
def deterministic_mode():
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # torch's requirement for cuBLAS on CUDA
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        if prev_cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = prev_cublas


@pytest.fixture
def deterministic():
    with deterministic_mode():
        yield


def _available():
    return {n for n, why in lkconv.backend_status().items() if why is None}


CPU_CASES = {
    "k3-pad1": dict(shape=(2, 3, 9, 10), k=(3, 3), padding=1),
    "k13-same-bias": dict(shape=(2, 4, 16, 15), k=(13, 13), padding="same", bias=True),
    "k31-stride2": dict(shape=(1, 3, 20, 21), k=(31, 31), padding=15, stride=2),
    "k8x5-dil2-cl": dict(shape=(2, 5, 17, 14), k=(8, 5), padding="same", dilation=2, channels_last=True),
}
TINY_CASE = dict(shape=(1, 2, 9, 8), k=(7, 6), padding="same", bias=True)
GPU_CASES = {
    "k31-big": dict(shape=(8, 64, 56, 56), k=(31, 31), padding=15, bias=True),
    "k13-cl": dict(shape=(4, 96, 64, 64), k=(13, 13), padding=6, channels_last=True),
    "k7-stride2": dict(shape=(8, 128, 57, 57), k=(7, 7), padding=3, stride=2),
}


def _run(backend, x, w, b, g, c):
    xr, wr = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    br = None if b is None else b.detach().requires_grad_(True)
    out = lkconv.depthwise_conv2d(xr, wr, br, stride=c.get("stride", 1), padding=c["padding"],
                                  dilation=c.get("dilation", 1), backend=backend)
    grads = torch.autograd.grad(out, [t for t in (xr, wr, br) if t is not None], g)
    return [out.detach(), *grads]


def _check(backend, device, case, dtype):
    if backend not in _available():
        pytest.skip(f"backend {backend!r} not available: {lkconv.backend_status()[backend]}")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible)")
    if backend == "triton" and device == "cpu" and torch.cuda.is_available():
        pytest.skip("triton runs on the GPU here")
    c = case
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(c["shape"], generator=gen).to(device=device, dtype=dtype)
    if c.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c["shape"][1], 1, *c["k"], generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(c["shape"][1], generator=gen).to(device=device, dtype=dtype) if c.get("bias") else None
    # grad_out shape from a meta run (no compute)
    shape = lkconv.depthwise_conv2d(x.to("meta"), w.to("meta"), None, stride=c.get("stride", 1),
                                    padding=c["padding"], dilation=c.get("dilation", 1)).shape
    g = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if c.get("channels_last"):
        g = g.contiguous(memory_format=torch.channels_last)
    try:
        first = _run(backend, x, w, b, g, c)
    except lkconv.UnsupportedError as e:
        pytest.skip(f"backend {backend!r} declines this case: {e}")
    except RuntimeError as e:
        # the torch convention: an op that cannot be deterministic raises and says so
        assert "determinis" in str(e).lower(), f"unexpected error under deterministic mode: {e}"
        return
    for run in range(2):
        again = _run(backend, x, w, b, g, c)
        names = ["forward", "grad_input", "grad_weight", "grad_bias"]
        for name, a, bb in zip(names, first, again):
            assert torch.equal(a, bb), (
                f"{backend} on {device}: {name} differs between run 0 and run {run + 1} with "
                f"deterministic algorithms on (max diff {(a.double() - bb.double()).abs().max().item():.3e})"
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CPU_CASES), ids=list(CPU_CASES))
@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_bit_identical_across_runs_cpu(deterministic, backend, case, dtype):
    _check(backend, "cpu", CPU_CASES[case], dtype)


@pytest.mark.triton_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_bit_identical_across_runs_triton_interpreter(deterministic, dtype):
    """Triton on CPU tensors (TRITON_INTERPRET=1 in this process); one tiny case, the interpreter is slow."""
    _check("triton", "cpu", TINY_CASE, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_bit_identical_across_runs_gpu(deterministic, backend, case, dtype):
    _check(backend, "cuda", GPU_CASES[case], dtype)


def test_setting_is_restored():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    with deterministic_mode():
        assert torch.are_deterministic_algorithms_enabled()
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == before
    with pytest.raises(ZeroDivisionError):  # restored on errors too
        with deterministic_mode():
            1 / 0
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == before
