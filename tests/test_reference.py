"""The oracle itself: the reference (written from the definition) agrees with F.conv2d in fp64 on
every feature of the op, for all three passes."""
import pytest
import torch
import torch.nn.functional as F

from lkconv.backends.reference import reference_forward, reference_grad_input, reference_grad_weight
from lkconv.params import normalize_params

CASES = {
    "k3": dict(shape=(2, 3, 9, 8), k=(3, 3), stride=1, padding=1, dilation=1),
    "k7-same": dict(shape=(1, 4, 11, 13), k=(7, 7), stride=1, padding="same", dilation=1),
    "k4-even-same": dict(shape=(2, 2, 9, 10), k=(4, 4), stride=1, padding="same", dilation=1),
    "rect-3x8": dict(shape=(1, 3, 12, 9), k=(3, 8), stride=1, padding=(1, 4), dilation=1),
    "k13-gt-H": dict(shape=(1, 2, 6, 7), k=(13, 13), stride=1, padding=6, dilation=1),
    "stride2": dict(shape=(2, 3, 13, 12), k=(5, 5), stride=2, padding=2, dilation=1),
    "stride-2x3": dict(shape=(1, 3, 13, 14), k=(3, 4), stride=(2, 3), padding=(1, 0), dilation=1),
    "dil2": dict(shape=(1, 2, 15, 15), k=(3, 5), stride=1, padding=3, dilation=(2, 1)),
    "dil-same-even": dict(shape=(1, 2, 10, 11), k=(4, 2), stride=1, padding="same", dilation=3),
    "valid": dict(shape=(2, 2, 9, 9), k=(5, 5), stride=1, padding="valid", dilation=1),
    "k1": dict(shape=(2, 5, 4, 4), k=(1, 1), stride=1, padding=0, dilation=1),
    "k31": dict(shape=(1, 2, 10, 12), k=(31, 31), stride=1, padding=15, dilation=1),
    "batch0": dict(shape=(0, 3, 8, 8), k=(3, 3), stride=1, padding=1, dilation=1),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_reference_matches_torch_fp64(case):
    c = CASES[case]
    N, C, H, W = c["shape"]
    x = torch.randn(N, C, H, W, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, 1, *c["k"], dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, dtype=torch.float64)
    p = normalize_params(c["stride"], c["padding"], c["dilation"], c["k"])
    ref = reference_forward(x.detach(), w.detach(), b, p)
    tor = F.conv2d(x, w, b, c["stride"], c["padding"], c["dilation"], groups=C)
    assert ref.shape == tor.shape
    torch.testing.assert_close(ref, tor.detach(), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(tor)
    if N:
        gx, gw = torch.autograd.grad(tor, (x, w), g)
    else:
        gx, gw = torch.zeros_like(x), torch.zeros_like(w)
    torch.testing.assert_close(reference_grad_input(g, w.detach(), x.shape, p), gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference_grad_weight(g, x.detach(), w.shape, p), gw, rtol=1e-12, atol=1e-12)


def test_same_padding_is_asymmetric_for_even_kernels():
    p = normalize_params(1, "same", 1, (4, 6))
    assert p.padding == (1, 2, 2, 3)
    p = normalize_params(1, "same", (2, 1), (4, 5))
    assert p.padding == (3, 3, 2, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_backend_16bit_within_tolerance(dtype):
    """16-bit inputs are computed in fp32 and cast once, so even K=24 sums meet the tolerance rule."""
    from lkconv.testing import compare_all_passes

    x = torch.randn(1, 2, 12, 12).to(dtype)
    w = torch.randn(2, 1, 24, 24).to(dtype)
    res = compare_all_passes("reference", x, w, torch.randn(2).to(dtype), padding="same")
    assert all(r.ok for r in res), [str(r) for r in res]
