"""The rows forward kernel of the ``triton`` backend (``dwconv_forward_rows_kernel``: tiles of 64 output
rows by the whole output row, GEMM-K over (kernel row, input column) of a row-bordered input copy and a
whole-row Toeplitz band) -- forward and stride-1 grad_input -- against the fp64 reference.

Without a GPU every case runs under the Triton interpreter at tiny shapes (more than 256 pixels, the
kernel's range) that still cover packed planes (a partial last group, a plane slot with unused rows),
several row tiles, chunks of part of a kernel row and of two whole kernel rows (with the kernel-row
range rounded out), stride and dilation, signed offsets (padding > kernel), channels_last, slices and
bias; the wide-plane fallback to the Toeplitz aligned kernel.  The ``gpu`` tests run the compiled
kernel (default config and autotuned) on RepLKNet-sized layers.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from lkconv.testing import compare_all_passes  # noqa: E402

from cases import DTYPES, Case, make_inputs  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs the Triton interpreter (no GPU visible)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA GPU")

CPU_CASES = {c.id: c for c in (
    Case("pack2-k31-bias", (2, 2, 20, 14), (31, 31), padding=15, bias=True),   # K > H, WQ 16, 2 planes a tile
    Case("pack3-asym", (4, 1, 19, 19), (9, 7), padding=(4, 2, 3, 1)),        # 3 planes of 21-row slots, N=4
    Case("tall-rowtiles", (1, 1, 70, 9), (9, 7), padding=(4, 3)),              # 2 row tiles, kernel rows clipped
    Case("dil-2x3-same", (2, 2, 17, 16), (5, 4), padding="same", dilation=(2, 3)),
    Case("stride2", (1, 2, 24, 22), (5, 5), stride=2, padding=2),              # forward only (grad_input strided)
    Case("pad-gt-kernel", (2, 2, 20, 20), (3, 3), padding=(5, 4, 6, 2)),       # negative grad_input offsets
    Case("channels_last", (2, 3, 17, 17), (7, 7), padding=3, layout="channels_last"),
    Case("slice-wq64", (2, 2, 17, 40), (7, 5), padding=(3, 2), layout="sliced"),
)}
CPU_PARAMS = ([(c, "fp32") for c in CPU_CASES]
              + [("pack2-k31-bias", "fp16"), ("channels_last", "fp16"), ("tall-rowtiles", "bf16"),
                 ("slice-wq64", "bf16")])


def _run(case, dtype, device="cpu"):
    x, w, b = make_inputs(case, DTYPES[dtype], device)
    results = compare_all_passes("triton", x, w, b, *case.conv_args)
    assert all(r.ok for r in results), "\n".join(str(r) for r in results)


@pytest.fixture
def rows_spy(monkeypatch):
    from lkconv.backends.triton import ops as tops

    calls = []
    orig = tops._conv_rows

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(tops, "_conv_rows", spy)
    return calls


@needs_interpreter
@pytest.mark.triton_interp
@pytest.mark.parametrize("case,dtype", CPU_PARAMS, ids=[f"{c}-{d}" for c, d in CPU_PARAMS])
def test_interpreter_all_passes(case, dtype, rows_spy):
    _run(CPU_CASES[case], dtype)
    assert len(rows_spy) == (1 if case == "stride2" else 2)  # forward and stride-1 grad_input


@needs_interpreter
@pytest.mark.triton_interp
@pytest.mark.parametrize("idx", range(5), ids=lambda i: f"cfg{i}")
def test_interpreter_every_autotune_config(idx, monkeypatch, rows_spy):
    """Each BK of the autotune list (16 .. 128 columns: a part of a 64-column row up to two whole rows),
    against the fp64 reference."""
    from lkconv.backends.triton import ops as tops

    assert len(tops._ROWS_CONFIGS) == 5, "update the parametrisation: every config must run here"
    bk = tops._ROWS_CONFIGS[idx][0]
    monkeypatch.setattr(tops, "_INTERP_ROWS", dict(BK=bk))
    assert tops._rows_fit(bk, 64, 1) == bk
    _run(Case("cfg", (3, 2, 18, 40), (9, 9), padding=4, bias=True), ["fp16", "fp32", "bf16", "fp32", "fp16"][idx])
    assert len(rows_spy) == 2


@needs_interpreter
@pytest.mark.triton_interp
def test_small_and_wide_planes_use_the_aligned_kernel(monkeypatch, rows_spy):
    from lkconv.backends.triton import ops as tops

    _run(Case("small", (2, 2, 9, 10), (5, 5), padding=2), "fp32")  # 90 pixels: the packed aligned kernel
    assert rows_spy == []
    monkeypatch.setattr(tops, "ROWS_MAX_W", 16)
    _run(Case("wide", (1, 2, 17, 20), (5, 5), padding=2), "fp32")
    assert rows_spy == []


@needs_interpreter
@pytest.mark.triton_interp
def test_copy_only_where_rows_need_padding(monkeypatch):
    """The rows kernel masks the padding rows: its input copy only pads rows to WQ columns, and rows
    already WQ wide (contiguous, 16-byte aligned) are read in place -- against the fp64 reference, both
    ways (in place: NCHW; copied: a sliced view, a storage offset that breaks the alignment, 20 columns)."""
    from lkconv.backends.triton import ops as tops

    rows_calls, copies = [], []  # per rows call, the copies it made: (input shape, top rows, rows, WQ)
    conv_rows, bordered = tops._conv_rows, tops._bordered_rows

    def conv_spy(x, *a, **k):
        rows_calls.append([])
        try:
            return conv_rows(x, *a, **k)
        finally:
            copies.append(rows_calls.pop())

    def copy_spy(x, t, hg, wq):
        if rows_calls:  # the rows kernel's copy (the diagonal grad_weight kernel has its own)
            rows_calls[-1].append((tuple(x.shape), t, hg, wq))
        return bordered(x, t, hg, wq)

    monkeypatch.setattr(tops, "_conv_rows", conv_spy)
    monkeypatch.setattr(tops, "_bordered_rows", copy_spy)
    _run(Case("inplace-w32", (2, 2, 12, 32), (7, 5), padding=(3, 2), bias=True), "fp32")
    assert copies == [[], []]  # forward and grad_input, both in place
    copies.clear()
    _run(Case("sliced-w32", (2, 2, 12, 32), (7, 5), padding=(3, 2), layout="sliced"), "bf16")
    assert copies[0] == [((2, 2, 12, 32), 0, 12, 32)] and copies[1] == []  # grad_out is contiguous
    copies.clear()
    x, w, _ = make_inputs(Case("off", (2, 2, 12, 32), (5, 5)), DTYPES["fp16"], "cpu")
    buf = torch.empty(x.numel() + 1, dtype=x.dtype)
    xo = buf[1:].view_as(x).copy_(x)  # contiguous, data_ptr 2 bytes off 16-byte alignment
    assert xo.is_contiguous() and xo.data_ptr() % 16
    results = compare_all_passes("triton", xo, w, None, 1, 2)
    assert all(r.ok for r in results), "\n".join(str(r) for r in results)
    assert copies[0] == [((2, 2, 12, 32), 0, 12, 32)]
    copies.clear()
    _run(Case("w20", (1, 2, 16, 20), (9, 3), padding=(4, 1)), "fp32")
    assert copies == [[((1, 2, 16, 20), 0, 16, 32)]] * 2


def test_geometry_band_and_default_config():
    from lkconv.backends.triton import ops as tops

    # the copy has H rows (the padding rows are masked, not stored)
    assert tops.rows_geometry(64, 56, 56, 56, 56, 31, 1, 1) == (64, 64, 56, 1, 32)
    assert tops.rows_geometry(64, 28, 28, 28, 28, 29, 1, 1) == (32, 32, 28, 2, 30)
    assert tops.rows_geometry(1, 28, 28, 28, 28, 29, 1, 1)[3] == 1
    assert tops.rows_geometry(4, 20, 20, 20, 20, 5, 1, 3)[4] == 5  # dilation > 1: chunks within a row
    assert tops._rows_ok(56, 56, 56, 56, 31, 1, 1) and not tops._rows_ok(14, 14, 14, 14, 27, 1, 1)
    assert not tops._rows_ok(56, 200, 56, 200, 31, 1, 1)
    # band[c, kh, u, j] = f[c, kh, (u - j*sw + pl) / dw], zero elsewhere (and for the padded kernel rows)
    w = torch.randn(2, 1, 3, 4)
    for sw, dw, pl, flip in ((1, 1, 2, False), (2, 1, 1, True), (1, 2, -1, False)):
        band = tops._row_band(w, flip, sw, dw, pl, 10, 6, 16, 8, 4)
        f = w.flip(2, 3) if flip else w
        ref = torch.zeros(2, 4, 16, 8)
        for u in range(10):
            for j in range(6):
                d = u - j * sw + pl
                if d >= 0 and d % dw == 0 and d // dw < 4:
                    ref[:, :3, u, j] = f[:, 0, :, d // dw]
        assert torch.equal(band, ref), (sw, dw, pl, flip)
    for wq, dh in ((64, 1), (32, 1), (16, 2)):
        bk, w_, s = tops._rows_default(wq, dh)
        kept = [tops._rows_cfg(c) for c in tops._prune_rows_for(9)(tops._rows_configs(), {}, WQ=wq, DH=dh)]
        assert (bk, w_, s) in kept, (wq, dh)


# ------------------------------------------------------------------------------------------------
# GPU (compiled kernels)
# ------------------------------------------------------------------------------------------------
GPU_CASES = {c.id: c for c in (
    Case("c32-56-k31", (2, 32, 56, 56), (31, 31), padding=15, bias=True),
    Case("c32-56-k31-cl", (2, 32, 56, 56), (31, 31), padding=15, layout="channels_last"),
    Case("c32-56-k31-slice", (2, 32, 56, 56), (31, 31), padding=15, layout="sliced"),
    Case("c64-28-k29", (3, 64, 28, 28), (29, 29), padding=14),
    Case("c16-33-k8-same", (2, 16, 33, 35), (8, 8), padding="same"),
    Case("c16-30-k5-dil3", (2, 16, 30, 30), (5, 5), padding="same", dilation=3),
    Case("c16-56-k7-s2", (2, 16, 56, 56), (7, 7), stride=2, padding=3),
    Case("c8-120-k31", (2, 8, 120, 120), (31, 31), padding=15),
)}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_default_config(case, dtype, monkeypatch, rows_spy):
    from lkconv.backends.triton import ops as tops

    monkeypatch.setattr(tops, "AUTOTUNE", False)
    _run(GPU_CASES[case], dtype, "cuda")
    assert rows_spy


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("case", ["c32-56-k31", "c64-28-k29"])
def test_gpu_autotuned(case, dtype, rows_spy):
    _run(GPU_CASES[case], dtype, "cuda")
    assert rows_spy
