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


# ------------------------------------------------------------------------------------------------
# ACNet, RepVGG, DBB, UniRepLKNet dilated block
# ------------------------------------------------------------------------------------------------
from lkconv.reparam import (  # noqa: E402
    ACBlock,
    DilatedReparamBlock,
    DiverseBranchBlock,
    DyRepBlock,
    RepVGGBlock,
    ResRepBlock,
    RMBlock,
    shrink_input_channels,
)
from lkconv.reparam.blocks.dilated import DILATED_BRANCHES  # noqa: E402


@pytest.mark.parametrize("cin,cout,k,s,p,g", [
    (4, 6, 3, 1, None, 1), (5, 5, 5, 2, None, 5), (6, 6, 3, 1, 2, 2), (3, 7, 7, 1, None, 1),
])
def test_acblock(cin, cout, k, s, p, g):
    b = randomize_bn(ACBlock(cin, cout, k, s, p, g))
    x = torch.randn(2, cin, 9, 10, dtype=DT)
    b, _ = _check_equiv(b, x)
    assert set(dict(b.named_children())) == {"fused_conv"}


@pytest.mark.parametrize("cin,cout,s,g,k", [(4, 4, 1, 1, 3), (5, 5, 1, 5, 3), (4, 6, 2, 2, 3), (6, 6, 1, 3, 5),
                                            (3, 3, 2, 1, 3)])
def test_repvgg(cin, cout, s, g, k):
    b = RepVGGBlock(cin, cout, k, s, groups=g)
    assert (b.rbr_identity is not None) == (cin == cout and s == 1)
    randomize_bn(b)
    x = torch.randn(2, cin, 8, 9, dtype=DT)
    b, _ = _check_equiv(b, x)
    assert isinstance(b.nonlinearity, nn.ReLU)
    if g == cin == cout:
        assert isinstance(b.rbr_reparam, LargeKernelConv2d)


@pytest.mark.parametrize("cin,cout,k,s,g,internal", [
    (4, 6, 3, 1, 1, None),   # idconv1 (internal == in)
    (4, 6, 3, 2, 2, 8),      # conv1, grouped, stride 2
    (5, 5, 5, 1, 5, None),   # depthwise: avg with padding on the input, internal 2*in
    (6, 6, 7, 1, 3, None),
    (3, 5, 3, 1, 1, 2),
])
def test_dbb(cin, cout, k, s, g, internal):
    b = DiverseBranchBlock(cin, cout, k, s, groups=g, internal_channels_1x1_3x3=internal)
    randomize_bn(b)
    with torch.no_grad():  # non-trivial identity-based 1x1
        for m in b.modules():
            if type(m).__name__ == "IdentityBasedConv1x1":
                m.weight.normal_(0, 0.3)
    x = torch.randn(2, cin, 9, 8, dtype=DT)
    _check_equiv(b, x)


class _NaiveBNThenZeroPad(nn.Module):
    """BN followed by zero padding: the version without the BN-and-pad trick."""

    def __init__(self, bnpad):
        super().__init__()
        self.bn, self.p = bnpad.bn, bnpad.pad_pixels

    def forward(self, x):
        return F.pad(self.bn(x), [self.p] * 4)


def test_dbb_equivalence_check_catches_missing_pad_trick():
    b = randomize_bn(DiverseBranchBlock(4, 4, 3)).to(DT).eval()
    b.dbb_1x1_kxk.bn1 = _NaiveBNThenZeroPad(b.dbb_1x1_kxk.bn1)
    x = torch.randn(1, 4, 8, 8, dtype=DT)
    with torch.no_grad():
        y = b(x)
        b.reparameterize()
        d = (b(x) - y).abs()
    assert d[:, :, 1:-1, 1:-1].max() < 1e-12  # interior agrees
    assert d[:, :, 0].min() > 1e-6 and d[:, :, -1].min() > 1e-6  # every border pixel differs


def test_dbb_train_mode_backward():
    b = DiverseBranchBlock(4, 4, 3)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    b(x).sum().backward()
    assert x.grad is not None and b.dbb_1x1_kxk.bn1.bn.weight.grad is not None


def test_bn_and_pad_values():
    """Border = BN(0) (batch statistics in train mode, running ones in eval mode); interior = BN(x)."""
    from lkconv.reparam import BNAndPad
    layer = BNAndPad(2, 3).to(DT)
    randomize_bn(layer)
    x = torch.randn(2, 3, 5, 4, dtype=DT)
    for train in (True, False):
        layer.train(train)
        bn = layer.bn
        if train:
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        else:
            mean, var = bn.running_mean.clone(), bn.running_var.clone()
        out = layer(x)
        assert out.shape == (2, 3, 9, 8)
        border = bn.bias - mean * bn.weight / (var + bn.eps).sqrt()
        for c in range(3):
            ring = torch.cat([out[:, c, :2].flatten(), out[:, c, -2:].flatten(), out[:, c, :, :2].flatten(),
                              out[:, c, :, -2:].flatten()])
            assert torch.allclose(ring, border[c].expand_as(ring), atol=1e-12)
        inner = F.batch_norm(x, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
        assert torch.allclose(out[:, :, 2:-2, 2:-2], inner, atol=1e-12)


@pytest.mark.parametrize("c,K", [(4, 13), (5, 7), (3, 17), (6, 5)])
def test_dilated_reparam_block(c, K):
    b = DilatedReparamBlock(c, K)
    assert b.kernel_sizes == DILATED_BRANCHES[K][0]
    assert isinstance(b.lk_origin, LargeKernelConv2d)
    randomize_bn(b)
    x = torch.randn(2, c, 15, 14, dtype=DT)  # K > H for K=17 and borders for all
    b, _ = _check_equiv(b, x)
    assert isinstance(b.lk_origin, LargeKernelConv2d) and b.lk_origin.bias is not None
    assert set(dict(b.named_children())) == {"lk_origin"}
    d = DilatedReparamBlock(c, K, deploy=True)
    d.load_state_dict(b.state_dict())


def test_dilated_paper_table_13():
    """UniRepLKNet: K=13 uses kernels (5,7,3,3,3) with dilations (1,2,3,4,5)."""
    assert DILATED_BRANCHES[13] == ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5))


def test_dilated_custom_and_bad_branches():
    b = randomize_bn(DilatedReparamBlock(4, 9, kernel_sizes=(3, 3), dilations=(2, 4)))
    _check_equiv(b, torch.randn(1, 4, 10, 10, dtype=DT))
    with pytest.raises(ValueError, match="<= 9"):
        DilatedReparamBlock(4, 9, kernel_sizes=(5,), dilations=(3,))
    with pytest.raises(ValueError, match="no default"):
        DilatedReparamBlock(4, 19)


# ------------------------------------------------------------------------------------------------
# ResRep
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cin,cout,g,with_bn", [(4, 6, 1, True), (5, 5, 5, True), (6, 4, 2, False)])
def test_resrep_fusion(cin, cout, g, with_bn):
    b = ResRepBlock(cin, cout, 3, 1, 1, groups=g, with_bn=with_bn)
    randomize_bn(b)
    with torch.no_grad():
        b.compactor.weight.add_(torch.randn_like(b.compactor.weight) * 0.3)
    x = torch.randn(2, cin, 7, 8, dtype=DT)
    b, _ = _check_equiv(b, x)
    assert b.fused.groups == 1 and b.fused.out_channels == cout


def test_resrep_identity_init_and_penalty_gradient():
    b = ResRepBlock(3, 4, 3, 1, 1).to(DT).eval()
    x = torch.randn(1, 3, 5, 5, dtype=DT)
    with torch.no_grad():
        ref = b.bn(b.conv(x))
        assert torch.equal(b(x), ref)  # the compactor starts as the identity
    b.mask_smallest(2)
    b.compactor.weight.grad = torch.ones_like(b.compactor.weight)
    b.apply_penalty_gradient(0.1)
    g = b.compactor.weight.grad[:, :, 0, 0]
    w = b.compactor.weight.detach()[:, :, 0, 0]
    m = b.mask
    expect = m.view(-1, 1) + 0.1 * w / w.norm(dim=1, keepdim=True)
    assert torch.allclose(g, expect)
    assert int((m == 0).sum()) == 2


def test_resrep_prune_shrinks_following_layer_exactly():
    torch.manual_seed(1)
    block = ResRepBlock(4, 8, 3, 1, 1)
    nxt = nn.Conv2d(8, 5, 3, 1, 1)
    model = nn.Sequential(block, nn.ReLU(), nxt)
    randomize_bn(model)
    model = model.to(DT).eval()
    with torch.no_grad():
        block.compactor.weight.add_(torch.randn_like(block.compactor.weight) * 0.2)
        block.compactor.weight[[1, 4, 6]] = 0  # rows driven to zero by the penalty
    x = torch.randn(2, 4, 6, 6, dtype=DT)
    with torch.no_grad():
        ref = model(x)
        keep = block.prune(1e-8)
        assert keep.tolist() == [0, 2, 3, 5, 7]
        model[2] = shrink_input_channels(nxt, keep)
        y = model(x)
        block.reparameterize()
        y2 = model(x)
    n_before = 8 * 4 * 9 + 5 * 8 * 9
    assert model[2].in_channels == 5 and block.fused.out_channels == 5
    assert sum(p.numel() for p in model.parameters()) < n_before + 8 + 5
    assert _max_err(y, ref) < 1e-12 and _max_err(y2, ref) < 1e-10


def test_shrink_input_channels_bn_linear_and_errors():
    keep = torch.tensor([0, 2])
    bn = randomize_bn(nn.BatchNorm2d(3)).eval()
    x = torch.randn(1, 3, 2, 2)
    assert torch.allclose(shrink_input_channels(bn, keep)(x[:, keep]), bn(x)[:, keep])
    lin = nn.Linear(3, 2)
    v = torch.randn(4, 3)
    v[:, 1] = 0
    assert torch.allclose(shrink_input_channels(lin, keep)(v[:, keep]), lin(v))
    with pytest.raises(TypeError):
        shrink_input_channels(nn.ReLU(), keep)
    with pytest.raises(ValueError):
        shrink_input_channels(nn.Conv2d(4, 4, 3, groups=2), keep)


# ------------------------------------------------------------------------------------------------
# RMNet
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cin,cout,s", [(4, 4, 1), (5, 5, 1), (4, 6, 2), (3, 6, 1)])
def test_rmblock(cin, cout, s):
    b = randomize_bn(RMBlock(cin, cout, s))
    x = torch.randn(2, cin, 8, 7, dtype=DT).relu()
    b, _ = _check_equiv(b, x)
    assert b.conv1.out_channels == cout + cin and b.conv2.in_channels == cout + cin
    assert not hasattr(b, "shortcut")


def test_rmblock_needs_nonnegative_input():
    b = randomize_bn(RMBlock(4, 4)).to(DT).eval()
    x = -torch.rand(1, 4, 6, 6, dtype=DT) - 0.5
    with torch.no_grad():
        y = b(x)
        b.reparameterize()
        assert _max_err(b(x), y) > 1e-3


# ------------------------------------------------------------------------------------------------
# Dy-Rep
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cin,cout,s,g", [(4, 4, 1, 1), (6, 6, 1, 3), (4, 6, 2, 2)])
def test_dyrep_all_branches_equivalent(cin, cout, s, g):
    names = ["1x1", "1x1_kxk", "1x1_avg"] + (["identity"] if cin == cout and s == 1 else [])
    b = randomize_bn(DyRepBlock(cin, cout, 3, s, g, branches=names))
    assert set(b.branches) == {"kxk", *names}
    _check_equiv(b, torch.randn(2, cin, 8, 9, dtype=DT))


def test_dyrep_grow_prune_train_cycle_exact():
    torch.manual_seed(3)
    b = DyRepBlock(4, 4, 3, branches=("1x1",)).to(DT)
    x = torch.randn(4, 4, 7, 7, dtype=DT)
    opt = torch.optim.SGD(b.parameters(), lr=0.05)

    def train_steps(n):
        b.train()
        for _ in range(n):
            opt.zero_grad()
            b(x).square().mean().backward()
            b.record_importance()
            opt.step()

    train_steps(2)
    imp = b.importance()
    assert set(imp) == {"kxk", "1x1"} and all(v > 0 for v in imp.values())
    # growing keeps the function (eval and train mode)
    b.eval()
    with torch.no_grad():
        y0 = b(x)
        b.grow("1x1_kxk")
        b.grow("identity")
        assert _max_err(b(x), y0) < 1e-12
    opt = torch.optim.SGD(b.parameters(), lr=0.05)
    train_steps(2)
    b.eval()
    with torch.no_grad():
        y1 = b(x)
        # prune every non-kxk branch whose importance is below +inf: all folded into kxk, eval output unchanged
        res = b.step(prune_below=float("inf"))
        assert set(res["pruned"]) == {"1x1", "1x1_kxk", "identity"} and list(b.branches) == ["kxk"]
        assert _max_err(b(x), y1) < 1e-10
        b.step(grow=["1x1_avg"])
        y2 = b(x)
        b.reparameterize()
        assert _max_err(b(x), y2) < 1e-10
    with pytest.raises(RuntimeError):
        b.grow("1x1")


def test_dyrep_bad_names():
    b = DyRepBlock(4, 6, 3)
    with pytest.raises(ValueError, match="identity"):
        b.grow("identity")
    with pytest.raises(ValueError, match="unknown"):
        b.grow("5x5")
    with pytest.raises(ValueError, match="kxk"):
        b.prune("kxk")
    with pytest.raises(ValueError, match="already"):
        b.grow("kxk")


# ------------------------------------------------------------------------------------------------
# training form: forward/backward in train mode (batch statistics), finite gradients everywhere
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: ReparamLargeKernelConv(4, 4, 9, 1, 4, 3),
    lambda: ACBlock(4, 6, 3),
    lambda: RepVGGBlock(4, 4),
    lambda: DiverseBranchBlock(4, 4, 3, groups=2),
    lambda: DilatedReparamBlock(4, 7),
    lambda: ResRepBlock(4, 6, 3, 1, 1),
    lambda: RMBlock(4, 6, 2),
    lambda: DyRepBlock(4, 4, 3, branches=("1x1", "1x1_kxk", "1x1_avg", "identity")),
], ids=["replk", "acnet", "repvgg", "dbb", "dilated", "resrep", "rmnet", "dyrep"])
def test_training_form_backward(make):
    b = make().train()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    y = b(x)
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for n, p in b.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
