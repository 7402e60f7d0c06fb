"""Modules and convert(): nn.Conv2d compatibility, state_dict round trip, the original API."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lkconv.nn import DepthWiseConv2dImplicitGEMM, LargeKernelConv2d, convert


def test_large_kernel_conv2d_is_a_drop_in_for_depthwise_conv2d():
    ref = nn.Conv2d(6, 6, 7, padding=3, groups=6, bias=True).double()
    m = LargeKernelConv2d(6, 6, 7, padding=3, groups=6, bias=True).double()
    assert set(m.state_dict()) == set(ref.state_dict()) == {"weight", "bias"}
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x))
    ref2 = nn.Conv2d(6, 6, 7, padding=3, groups=6).double()
    ref2.load_state_dict(m.state_dict())  # and back
    torch.testing.assert_close(ref2(x), m(x))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_padding_modes_match_nn_conv2d(padding_mode):
    ref = nn.Conv2d(3, 3, 5, padding=2, groups=3, padding_mode=padding_mode).double()
    m = LargeKernelConv2d(3, 3, 5, padding=2, groups=3, padding_mode=padding_mode).double()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x))


def test_large_kernel_conv2d_rejects_non_depthwise():
    with pytest.raises(ValueError, match="groups"):
        LargeKernelConv2d(4, 6, 3, groups=4)  # out_channels not a multiple of in_channels
    with pytest.raises(ValueError, match="groups"):
        LargeKernelConv2d(4, 4, 3, groups=1)


@pytest.mark.parametrize("k", [3, 13, 31, 4])
def test_depthwise_implicit_gemm_original_api(k):
    m = DepthWiseConv2dImplicitGEMM(5, k).double()
    assert m.bias is None and tuple(m.weight.shape) == (5, 1, k, k)
    assert set(m.state_dict()) == {"weight"}
    if k % 2:
        assert m.padding == (k // 2, k // 2)
    else:
        assert m.padding == "same"
    x = torch.randn(2, 5, 9, 10, dtype=torch.float64)
    out = m(x)
    assert out.shape == x.shape  # "same", as the original extension
    torch.testing.assert_close(out, F.conv2d(x, m.weight, None, 1, "same", 1, groups=5))
    mb = DepthWiseConv2dImplicitGEMM(5, k, bias=True).double()
    assert set(mb.state_dict()) == {"weight", "bias"}


def _mixed_model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),            # dense: stays
        nn.Conv2d(8, 8, 13, padding=6, groups=8),  # depthwise large: swapped
        nn.BatchNorm2d(8),
        nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise small: below min_kernel, stays
            nn.Conv2d(8, 8, (7, 5), padding=(3, 2), groups=8, bias=False),  # swapped
        ),
        nn.Conv2d(8, 16, 1),                      # pointwise: stays
        nn.Conv2d(16, 16, 9, stride=2, padding=4, groups=8),  # grouped, not depthwise: stays
    ).double().eval()


def test_convert_swaps_only_eligible_depthwise_and_keeps_outputs():
    model = _mixed_model()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ref = model(x)
    sd = copy.deepcopy(model.state_dict())
    conv = convert(model, min_kernel=5, inplace=False)
    kinds = [type(m).__name__ for m in conv.modules() if isinstance(m, nn.Conv2d)]
    assert kinds == ["Conv2d", "LargeKernelConv2d", "Conv2d", "LargeKernelConv2d", "Conv2d", "Conv2d"]
    assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))  # copy untouched
    torch.testing.assert_close(conv(x), ref)
    assert conv.state_dict().keys() == sd.keys()
    # in place, and the parameters are shared (no copy): training continues on the same tensors
    w_before = model[1].weight
    same = convert(model, min_kernel=5)
    assert same is model and model[1].weight is w_before
    torch.testing.assert_close(model(x), ref)


def test_convert_min_kernel_and_bare_conv():
    model = _mixed_model()
    convert(model, min_kernel=1)
    assert isinstance(model[3][0], LargeKernelConv2d)
    bare = nn.Conv2d(4, 4, 7, padding=3, groups=4)
    out = convert(bare)
    assert isinstance(out, LargeKernelConv2d)
    with pytest.raises(ValueError, match="min_kernel"):
        convert(_mixed_model(), min_kernel=0)
    with pytest.raises(TypeError, match="model"):
        convert("not a model")


def test_convert_backend_and_training_through_module():
    model = _mixed_model().train()
    convert(model, backend="reference")
    assert model[1].backend == "reference"
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    model(x).sum().backward()
    assert model[1].weight.grad is not None and model[1].weight.grad.abs().sum() > 0
    assert "backend='reference'" in repr(model[1])


def test_backend_name_checked_at_construction():
    with pytest.raises(ValueError, match="backend"):
        LargeKernelConv2d(4, 4, 5, groups=4, backend="foo")
    with pytest.raises(ValueError, match="backend"):
        convert(_mixed_model(), backend="foo")
    with pytest.raises(ValueError, match="min_kernel"):
        convert(_mixed_model(), min_kernel=True)
