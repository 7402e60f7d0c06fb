"""Re-parameterizable blocks: training form == deploy form (eval mode, fp64, random BN statistics)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lkconv.nn import LargeKernelConv2d
from lkconv.reparam import ReparamLargeKernelConv, randomize_bn

DT = torch.float64


def _max_err(a, b):
    return (a - b).abs().max().item()


def _check_equiv(block, x, tol=1e-10):
    """eval-mode output before and after reparameterize() agree (the caller randomizes BN first);
    returns (deploy block, training-form output)."""
    block = block.to(DT).eval()
    with torch.no_grad():
        y_train = block(x)
        out = block.reparameterize()
        assert out is block
        assert block.deployed
        y_deploy = block(x)
    err = _max_err(y_train, y_deploy)
    scale = max(1.0, y_train.abs().max().item())
    assert err <= tol * scale, f"{type(block).__name__}: max err {err:.3e} (scale {scale:.2f})"
    return block, y_train


# ------------------------------------------------------------------------------------------------
# ReparamLargeKernelConv (RepLKNet)
# ------------------------------------------------------------------------------------------------
LK_CASES = [
    # (in, out, kernel, stride, groups, small_kernel, H, W)
    pytest.param(5, 5, 13, 1, 5, 5, 9, 11, id="dw-odd-C5-K13-s5-K>H"),
    pytest.param(6, 6, 7, 1, 6, 3, 10, 8, id="dw-even-C6-K7-s3"),
    pytest.param(4, 4, 31, 1, 4, 5, 12, 12, id="dw-K31-s5"),
    pytest.param(6, 6, 9, 2, 6, 3, 11, 10, id="dw-stride2"),
    pytest.param(4, 4, 8, 1, 4, 4, 7, 9, id="dw-even-kernel-K8-s4"),
    pytest.param(3, 3, (7, 5), 1, 3, 3, 9, 8, id="dw-rect-7x5-s3"),
    pytest.param(4, 6, 7, 1, 2, 3, 8, 8, id="grouped-4to6-g2"),
    pytest.param(3, 5, 5, 1, 1, 3, 6, 7, id="dense-3to5"),
    pytest.param(5, 5, 13, 1, 5, None, 9, 9, id="dw-no-small"),
]


def _manual_replk(block, x):
    """The training form computed with plain F.conv2d + F.batch_norm (eval stats)."""
    def branch(cb):
        y = F.conv2d(x, cb.conv.weight, None, cb.conv.stride, cb.conv.padding, 1, cb.conv.groups)
        bn = cb.bn
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    y = branch(block.lkb_origin)
    if block.small_kernel is not None:
        y = y + branch(block.small_conv)
    return y


@pytest.mark.parametrize("cin,cout,k,s,g,sk,H,W", LK_CASES)
def test_replk_train_equals_deploy(cin, cout, k, s, g, sk, H, W):
    block = ReparamLargeKernelConv(cin, cout, k, s, g, sk)
    randomize_bn(block)
    block = block.to(DT).eval()
    x = torch.randn(2, cin, H, W, dtype=DT)
    with torch.no_grad():
        ref = _manual_replk(block, x)
    block, y_train = _check_equiv(block, x)
    assert _max_err(y_train, ref) <= 1e-10 * max(1.0, ref.abs().max().item())
    assert not hasattr(block, "lkb_origin") and not hasattr(block, "small_conv")
    assert block.lkb_reparam.bias is not None
    if g == cin == cout:
        assert isinstance(block.lkb_reparam, LargeKernelConv2d)
    else:
        assert type(block.lkb_reparam) is nn.Conv2d
    # idempotent; merge_kernel is the original name
    block.merge_kernel()
    assert block.deployed


def test_replk_large_conv_is_lkconv_and_checkpoint_keys():
    b = ReparamLargeKernelConv(8, 8, 13, 1, 8, 5)
    assert isinstance(b.lkb_origin.conv, LargeKernelConv2d)
    assert type(b.small_conv.conv) is nn.Conv2d
    keys = set(b.state_dict())
    for pre in ("lkb_origin", "small_conv"):
        assert {f"{pre}.conv.weight", f"{pre}.bn.weight", f"{pre}.bn.bias", f"{pre}.bn.running_mean",
                f"{pre}.bn.running_var", f"{pre}.bn.num_batches_tracked"} <= keys
    assert not any(k.endswith("conv.bias") for k in keys)
    d = ReparamLargeKernelConv(8, 8, 13, 1, 8, 5, small_kernel_merged=True)
    assert set(d.state_dict()) == {"lkb_reparam.weight", "lkb_reparam.bias"}
    assert isinstance(d.lkb_reparam, LargeKernelConv2d)


def test_replk_deployed_checkpoint_roundtrip():
    """A reparameterized block's state_dict loads into a block built with small_kernel_merged=True."""
    b = randomize_bn(ReparamLargeKernelConv(6, 6, 11, 1, 6, 3)).to(DT).eval()
    x = torch.randn(1, 6, 9, 9, dtype=DT)
    with torch.no_grad():
        y = b(x)
        b.reparameterize()
        d = ReparamLargeKernelConv(6, 6, 11, 1, 6, 3, small_kernel_merged=True).to(DT).eval()
        d.load_state_dict(b.state_dict())
        assert _max_err(d(x), y) <= 1e-10 * max(1.0, y.abs().max().item())


def test_replk_train_mode_forward_and_backward():
    b = ReparamLargeKernelConv(4, 4, 9, 1, 4, 3)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    y = b(x)
    y.square().mean().backward()
    assert x.grad is not None and b.lkb_origin.conv.weight.grad is not None
    assert b.small_conv.conv.weight.grad is not None


@pytest.mark.parametrize("kw", [dict(small_kernel=15), dict(small_kernel=4), dict(kernel_size=0),
                                dict(groups=3)])
def test_replk_bad_arguments(kw):
    args = dict(in_channels=4, out_channels=4, kernel_size=13, stride=1, groups=4, small_kernel=5)
    args.update(kw)
    with pytest.raises(ValueError):
        ReparamLargeKernelConv(**args)
