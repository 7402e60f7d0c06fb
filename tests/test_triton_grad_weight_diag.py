"""The diagonal grad_weight kernel of the ``triton`` backend (``dwconv_grad_weight_diag_kernel``: row
outer products Z = A^T B over output rows, then ``dW[kh, kw]`` = a diagonal sum of Z), against the
fp64 reference.

Without a GPU every case runs under the Triton interpreter (TRITON_INTERPRET=1, set before the kernels
are imported) at tiny shapes that still cover one, two and four kernel rows per tile (WQ = 64 / 32 /
16), partial row chunks, several images per dot and a partial last image group, the two splits of the
ordered reduction, stride, dilation, asymmetric padding, channels_last, slices, grad_out read in
place (16- and 8-byte vectors) and through its padded copy, and the Toeplitz fallback for planes
wider than ``ops.DIAG_MAX_W``.  With a GPU the ``gpu`` tests run the compiled kernel (default config
and autotuned) on RepLKNet-sized layers.
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

#: tiny interpreter cases: (N, C, H, W) / kernel / conv args chosen for the kernel's geometry
CPU_CASES = {c.id: c for c in (
    Case("wq64-k31", (2, 1, 20, 40), (31, 31), padding=15, bias=True),       # WQ 64: one kernel row per tile
    Case("wq32-k9-asym", (3, 2, 13, 18), (9, 7), padding=(4, 2, 3, 1)),     # WQ 32: two rows, N=3 (partial group)
    Case("wq16-k13-cl", (2, 2, 7, 7), (13, 13), padding=6, layout="channels_last"),  # WQ 16: four rows
    Case("stride2-dil2", (2, 2, 15, 16), (5, 3), stride=2, padding=(3, 2), dilation=(2, 1)),
    Case("dil-1x3-same", (1, 2, 11, 12), (3, 5), padding="same", dilation=(1, 3)),
    Case("slice-k7", (2, 3, 12, 12), (7, 7), padding=3, layout="sliced"),
    Case("g-copy-odd", (2, 2, 9, 11), (5, 5), padding=2),                     # WO = 11: padded grad_out copy
    Case("g-8byte-fp16", (2, 2, 9, 12), (5, 5), padding=2),                   # WO = 12: 8-byte vectors in 16 bit
    Case("rows-gt-H", (1, 2, 6, 9), (15, 3), padding=(7, 1)),                 # K > H: most rows clipped
)}
CPU_PARAMS = ([(c, "fp32") for c in CPU_CASES]
              + [("wq16-k13-cl", "fp16"), ("g-8byte-fp16", "fp16"), ("wq64-k31", "bf16"), ("stride2-dil2", "bf16")])


def _run(case, dtype, device="cpu", **mk):
    x, w, b = make_inputs(case, DTYPES[dtype], device, **mk)
    results = compare_all_passes("triton", x, w, b, *case.conv_args)
    assert all(r.ok for r in results), "\n".join(str(r) for r in results)


@pytest.fixture
def diag_spy(monkeypatch):
    """Counts the diagonal kernel's launches (proves the case ran it, not the Toeplitz fallback)."""
    from lkconv.backends.triton import ops as tops

    calls = []
    orig = tops._grad_weight_diag

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(tops, "_grad_weight_diag", spy)
    monkeypatch.setattr(tops, "BATCHROWS", False)  # small planes would run the batch-as-rows grad_weight
    return calls


@needs_interpreter
@pytest.mark.triton_interp
@pytest.mark.parametrize("case,dtype", CPU_PARAMS, ids=[f"{c}-{d}" for c, d in CPU_PARAMS])
def test_interpreter_all_passes(case, dtype, diag_spy):
    _run(CPU_CASES[case], dtype)
    assert diag_spy == [1]


@needs_interpreter
@pytest.mark.triton_interp
@pytest.mark.parametrize("idx", range(5), ids=lambda i: f"cfg{i}")
def test_interpreter_every_autotune_config(idx, monkeypatch, diag_spy):
    """Each (BKR, IMG) of the autotune list, against the fp64 reference, on a case with partial row
    chunks and a partial last image group."""
    from lkconv.backends.triton import ops as tops

    assert len(tops._DIAG_GRAD_WEIGHT_CONFIGS) == 5, "update the parametrisation: every config must run here"
    bkr, img, _, _ = tops._DIAG_GRAD_WEIGHT_CONFIGS[idx]
    monkeypatch.setattr(tops, "_INTERP_DIAG_GRAD_WEIGHT", dict(BKR=bkr, IMG=img))
    case = Case("cfg", (3, 2, 19, 21), (9, 9), padding=4)
    _run(case, ["fp16", "fp32", "bf16", "fp32", "fp16"][idx])
    assert diag_spy == [1]


@needs_interpreter
@pytest.mark.triton_interp
def test_wide_planes_fall_back_to_the_toeplitz_kernel(monkeypatch, diag_spy):
    from lkconv.backends.triton import ops as tops

    monkeypatch.setattr(tops, "DIAG_MAX_W", 8)
    _run(Case("wide", (2, 2, 9, 10), (5, 5), padding=2), "fp32")
    assert diag_spy == []


@needs_interpreter
@pytest.mark.triton_interp
def test_grad_weight_is_deterministic_and_nonfinite_stays_local():
    """Bitwise identical on repeat; an Inf in one channel's input does not leak into another channel
    (grad_out rows beyond a plane and scratch columns past WO are never summed)."""
    import lkconv

    torch.manual_seed(0)
    x = torch.randn(3, 2, 11, 13)
    x[0, 1, 3, 4] = float("inf")
    w = torch.randn(2, 1, 7, 7)
    g = torch.randn(3, 2, 11, 13)
    outs = []
    for _ in range(2):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = lkconv.depthwise_conv2d(xr, wr, padding=3, backend="triton")
        (gw,) = torch.autograd.grad(y, [wr], g)
        outs.append(gw)
    assert torch.equal(outs[0], outs[1])
    assert torch.isfinite(outs[0][0]).all(), "channel 0 must not see channel 1's Inf"
    wr = w.double().requires_grad_()
    ref = torch.nn.functional.conv2d(x[:, :1].double(), wr[:1], padding=3)
    (gref,) = torch.autograd.grad(ref, [wr], g[:, :1].double())
    assert (outs[0][0].double() - gref[0]).abs().max() < 1e-3


def test_geometry_and_default_config():
    from lkconv.backends.triton import ops as tops

    # 56x56: 64-column rows, one kernel row per 64-row tile, no border rows; 28x28: two kernel rows
    assert tops.diag_geometry(64, 56, 56, 56, 56, 31, 1, 1) == (64, 64, 64, 56)
    assert tops.diag_geometry(64, 28, 28, 28, 28, 29, 1, 1) == (32, 64, 32, 30)
    assert tops.diag_geometry(64, 7, 7, 7, 7, 13, 1, 2) == (16, 64, 16, 7 + 2 * 3 * 2)
    assert tops.diag_geometry(1, 100, 100, 100, 100, 7, 1, 1)[:3] == (128, 128, 128)
    # int32 operand offsets: planes of a huge channel count fall back to the Toeplitz kernel
    from lkconv.params import normalize_params

    p = normalize_params(1, 15, 1, (31, 31))
    big = torch.empty(2, 2**20, 56, 56, device="meta")
    ok = torch.empty(2, 128, 56, 56, device="meta")
    assert tops._diag_ok(ok, ok, 31, p) and not tops._diag_ok(big, big, 31, p)
    assert tops._rows_offsets_fit(64, 128, 56, 64, 1, 102) and not tops._rows_offsets_fit(64, 2**20, 56, 64, 1, 102)
    for bm, bn in ((64, 64), (64, 32), (128, 128)):
        cfg = tops._diag_default(bm, bn)
        assert cfg in tops._DIAG_GRAD_WEIGHT_CONFIGS
        kept = tops._prune_diag_grad_weight_for(9)(tops._diag_configs(), {}, BM=bm, BN=bn)
        assert cfg in [tops._diag_cfg(c) for c in kept], (bm, bn, cfg)


# ------------------------------------------------------------------------------------------------
# GPU (compiled kernels)
# ------------------------------------------------------------------------------------------------
GPU_CASES = {c.id: c for c in (
    Case("c32-56-k31", (4, 32, 56, 56), (31, 31), padding=15, bias=True),
    Case("c32-56-k31-cl", (2, 32, 56, 56), (31, 31), padding=15, layout="channels_last"),
    Case("c32-56-k31-slice", (2, 32, 56, 56), (31, 31), padding=15, layout="sliced"),
    Case("c64-28-k29", (4, 64, 28, 28), (29, 29), padding=14),
    Case("c64-14-k27", (4, 64, 14, 14), (27, 27), padding=13),
    Case("c64-7-k13", (4, 64, 7, 7), (13, 13), padding=6),
    Case("c16-33-k8-same", (2, 16, 33, 35), (8, 8), padding="same"),
    Case("c16-56-k7-s2-d2", (2, 16, 56, 56), (7, 7), stride=2, padding=6, dilation=2),
    Case("c8-120-k31", (2, 8, 120, 120), (31, 31), padding=15),
)}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_default_config(case, dtype, monkeypatch, diag_spy):
    from lkconv.backends.triton import ops as tops

    monkeypatch.setattr(tops, "AUTOTUNE", False)
    _run(GPU_CASES[case], dtype, "cuda")
    assert diag_spy == [1]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("case", ["c32-56-k31", "c64-28-k29"])
def test_gpu_autotuned(case, dtype, diag_spy):
    _run(GPU_CASES[case], dtype, "cuda")
    assert diag_spy == [1]


@pytest.mark.gpu
@needs_gpu
def test_gpu_poisoned_scratch_and_partials(monkeypatch):
    """NaN-filled outputs/partials (LKCONV_POISON_OUTPUTS) must all be overwritten."""
    monkeypatch.setenv("LKCONV_POISON_OUTPUTS", "1")
    _run(GPU_CASES["c64-28-k29"], "bf16", "cuda")
