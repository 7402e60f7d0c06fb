"""``lkconv.reparameterize`` on third-party model code (re-created in tests/thirdparty_blocks.py):
the original RepLKNet (``merge_kernel``), SLaK's decomposed K x 5 + 5 x K + 5 x 5 kernels (no working
merge of their own: found from the structure), UniRepLKNet (``merge_dilated_branches`` + block
``reparameterize``), with BatchNorm2d and SyncBatchNorm, with and without the
``DepthWiseConv2dImplicitGEMM`` import hook; timm's FastViT with its 2C-output depthwise convs
(channel multiplier).  Each large-kernel block must end as one lkconv convolution with its BNs
folded, eval outputs equal (fp64 at rounding level, fp32 at fp32 tolerance), and every change is
checked: a merge that does not reproduce its block is undone and reported."""
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lkconv
import thirdparty_blocks as tp
from lkconv.nn import LargeKernelConv2d
from lkconv.reparam import ReparamLargeKernelConv, merge_parallel_branches, randomize_bn

_BN = nn.modules.batchnorm._BatchNorm


def _assert_close_rel(dep, x, ref, rel):
    """The deployed model's eval output on x within ``rel`` of the original's (relative to max|ref|)."""
    with torch.no_grad():
        err = (dep(x) - ref).abs().max().item()
    assert err <= rel * max(1.0, ref.abs().max().item()), err


def _dw_branch(k):
    """A depthwise k x k conv (4 channels, "same" padding) + BN branch of the test blocks."""
    return nn.Sequential(nn.Conv2d(4, 4, k, 1, k // 2, groups=4, bias=False), nn.BatchNorm2d(4))


class _TwoBranches(nn.Module):
    """Two depthwise conv+BN branches ``a`` (ka x ka) and ``b`` (kb x kb); subclasses combine them."""

    def __init__(self, ka, kb):
        super().__init__()
        self.a, self.b = _dw_branch(ka), _dw_branch(kb)


def _deploy_one(block_cls, x_shape):
    """A block (randomised BNs, seed 0) in a Sequential, its eval output on a random input, and
    ``reparameterize``'s result with its report."""
    torch.manual_seed(0)
    net = nn.Sequential(_nontrivial(block_cls()))
    x = torch.randn(*x_shape)
    with torch.no_grad():
        ref = net(x)
    dep, report = lkconv.reparameterize(net, return_report=True)
    return net, x, ref, dep, report


def _nontrivial(model):
    """Random BN statistics/affine, layer scales and GRN parameters (zero or 1e-6 at init would make
    whole branches invisible in the output)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gamma") or n.endswith("beta"):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.5)
    randomize_bn(model, torch.Generator().manual_seed(1))
    return model.eval()


# name -> (factory, large-kernel block type, its kernel size per instance (None: any), action expected)
MODELS = {
    "replknet-bn": (lambda: tp.RepLKNet(), tp.RepLKReparamLargeKernelConv, "merged"),
    "replknet-syncbn-hook": (lambda: tp.RepLKNet(sync=True, use_lkconv=True), tp.RepLKReparamLargeKernelConv,
                             "merged"),
    "slak-decomposed-syncbn": (lambda: tp.SLaK(), tp.SLaKReparamLargeKernelConv, "structural"),
    "slak-decomposed-bn-hook": (lambda: tp.SLaK(sync=False, use_lkconv=True), tp.SLaKReparamLargeKernelConv,
                                "structural"),
    "slak-undecomposed-syncbn": (lambda: tp.SLaK(Decom=False), tp.SLaKReparamLargeKernelConv, "merged"),
    "unireplknet-bn": (lambda: tp.UniRepLKNet(), tp.UniDilatedReparamBlock, "merged"),
    "unireplknet-syncbn-hook": (lambda: tp.UniRepLKNet(use_sync_bn=True, use_lkconv=True), tp.UniDilatedReparamBlock,
                                "merged"),
}


def _build(name, dtype=torch.float32):
    factory, block_type, action = MODELS[name]
    torch.manual_seed(0)
    model = _nontrivial(factory()).to(dtype)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    return model, x, block_type, action


def _large_blocks(model, block_type):
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, block_type):
            conv = m.lkb_origin.conv if hasattr(m, "lkb_origin") else (
                m.LoRA1.conv if hasattr(m, "LoRA1") else m.lk_origin)
            k = max(conv.kernel_size)
            out[path] = (k, conv.in_channels, conv.out_channels)
    return out


def _module_at(model, path):
    m = model
    for part in path.split("."):
        m = getattr(m, part)
    return m


@pytest.mark.parametrize("name", list(MODELS))
def test_every_large_kernel_block_is_one_lkconv_conv(name):
    model, x, block_type, action = _build(name)
    blocks = _large_blocks(model, block_type)
    assert len(blocks) >= 4
    with torch.no_grad():
        ref = model(x)
    dep, report = lkconv.reparameterize(model, inplace=False, return_report=True)
    # 1. each large-kernel block: a single conv (the block itself or its only conv), BN folded, on lkconv
    for path, (k, cin, cout) in blocks.items():
        m = _module_at(dep, path)
        convs = [s for s in m.modules() if isinstance(s, nn.Conv2d)]
        assert len(convs) == 1, f"{path}: {len(convs)} convs after deploy: {m}"
        assert not any(isinstance(s, _BN) for s in m.modules()), f"{path}: a BatchNorm is left: {m}"
        conv = convs[0]
        assert isinstance(conv, LargeKernelConv2d), f"{path}: deployed conv {type(conv).__name__} is not on lkconv"
        assert conv.kernel_size == (k, k) and conv.bias is not None
        assert (conv.in_channels, conv.out_channels, conv.groups) == (cin, cout, cin)
    # 2. the report says so, per block type
    counts = report.counts()
    assert counts[block_type.__name__] == {action: len(blocks)}, report.summary()
    assert not report.left, report.summary()
    # 3. the same eval outputs (fp32 tolerance), and the deployed large kernels run through lkconv
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in dep.modules()
             if isinstance(m, LargeKernelConv2d) and max(m.kernel_size) >= 7]
    with torch.no_grad():
        out = dep(x)
    for h in hooks:
        h.remove()
    assert len(calls) >= len(blocks)
    scale = max(1.0, ref.abs().max().item())
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * scale, f"deploy vs train: max|diff| {err:.3e} (max|ref| {scale:.3e})"
    assert ref.abs().max() > 1e-2, "degenerate test model"


@pytest.mark.parametrize("name", ["replknet-syncbn-hook", "slak-decomposed-syncbn", "unireplknet-syncbn-hook"])
def test_fp64_deploy_exact_to_rounding(name):
    model, x, _, _ = _build(name, torch.float64)
    with torch.no_grad():
        ref = model(x)
        out = lkconv.reparameterize(model, inplace=False)(x)
    assert (out - ref).abs().max().item() <= 1e-10 * max(1.0, ref.abs().max().item())


def test_syncbn_after_conv_is_folded_in_sequentials():
    """RepLKNet with SyncBN: every conv_bn / conv_bn_relu Sequential is folded; the SyncBNs left are
    the ones that follow no conv (pre-block BN, stage norms), which the original deploy keeps too."""
    model, x, _, _ = _build("replknet-syncbn-hook")
    dep, report = lkconv.reparameterize(model, inplace=False, return_report=True)
    assert report.counts()["Conv2d+SyncBatchNorm"]["folded"] >= 20
    for seq in dep.modules():
        if isinstance(seq, nn.Sequential):
            mods = list(seq)
            for a, b in zip(mods, mods[1:]):
                assert not (isinstance(a, nn.Conv2d) and isinstance(b, _BN)), f"conv + BN left in {seq}"
    left = [n for n, m in dep.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    assert left and all(n.endswith(("prelkb_bn", "preffn_bn", "norm")) for n in left), left


def test_slak_own_merge_fails_and_the_structure_is_merged_instead():
    """SLaK's merge_kernel raises on a decomposed block (as the original); reparameterize restores
    the block after the failed call, then merges K x 5 + 5 x K + 5 x 5 into one K x K conv."""
    torch.manual_seed(0)
    blk = _nontrivial(tp.SLaKReparamLargeKernelConv(6, 6, 31, 1, 6, 5)).double()
    with pytest.raises(AttributeError):
        tp.SLaKReparamLargeKernelConv.merge_kernel(__import__("copy").deepcopy(blk))
    x = torch.randn(2, 6, 20, 23, dtype=torch.float64)
    with torch.no_grad():
        ref = blk(x)
    dep, report = lkconv.reparameterize(blk, return_report=True)
    assert isinstance(dep, LargeKernelConv2d) and dep.kernel_size == (31, 31) and dep.padding == (15, 15)
    (entry,) = report.entries
    assert entry.action == "structural" and "31x5" in entry.detail and "5x31" in entry.detail, entry
    _assert_close_rel(dep, x, ref, 1e-11)


def test_model_level_structural_reparam_alone_is_used_when_blocks_have_no_method():
    """A model whose only deploy method is the model-level one (calls every block's private merge)."""
    class Blk(_TwoBranches):
        def __init__(self):
            super().__init__(7, 3)

        def forward(self, x):
            return torch.relu(self.a(x)) + self.b(x)  # not a plain sum: structure must not merge it

        def _merge(self):
            k, b = tp._fold_bn(self.a[0].weight, self.a[1])
            conv = nn.Conv2d(4, 4, 7, 1, 3, groups=4)
            conv.weight.data, conv.bias.data = k, b
            self.a = nn.Sequential(conv)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(Blk(), Blk())

        def forward(self, x):
            return self.blocks(x)

        def structural_reparam(self):
            for m in self.modules():
                if isinstance(m, Blk):
                    m._merge()

    torch.manual_seed(0)
    net = _nontrivial(Net()).double()
    x = torch.randn(2, 4, 12, 13, dtype=torch.float64)
    with torch.no_grad():
        ref = net(x)
    dep, report = lkconv.reparameterize(net, inplace=False, return_report=True)
    assert report.counts()["Net"] == {"merged": 1}
    assert isinstance(dep.blocks[0].a[0], LargeKernelConv2d)  # the merged 7x7 depthwise runs on lkconv
    assert not report.left, report.summary()
    assert isinstance(dep.blocks[0].b[1], nn.Identity)  # the b branch's BN folded in its Sequential
    _assert_close_rel(dep, x, ref, 1e-10)


def test_a_wrong_merge_is_undone_and_reported():
    class Wrong(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 5, 1, 2, groups=4, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.small = nn.Conv2d(4, 4, 3, 1, 1, groups=4, bias=False)

        def forward(self, x):
            if hasattr(self, "merged"):
                return self.merged(x)
            return self.bn(self.conv(x)) * 2 + self.small(x)  # the * 2 is forgotten by merge_kernel

        @torch.no_grad()
        def merge_kernel(self):
            k, b = tp._fold_bn(self.conv.weight, self.bn)
            self.merged = nn.Conv2d(4, 4, 5, 1, 2, groups=4)
            self.merged.weight.copy_(k + F.pad(self.small.weight, [1, 1, 1, 1]))
            self.merged.bias.copy_(b)
            del self.conv, self.bn, self.small

    net, x, ref, dep, report = _deploy_one(Wrong, (2, 4, 10, 10))
    assert hasattr(dep[0], "conv") and not hasattr(dep[0], "merged"), "the wrong merge was kept"
    (entry,) = report.left
    assert entry.path == "0" and "merge_kernel(): deployed output differs" in entry.detail
    assert "not a sum of its conv/BN branches" in entry.detail  # and the structure was tried
    with torch.no_grad():
        torch.testing.assert_close(dep(x), ref)


def test_summary_is_logged(caplog):
    model, _, _, _ = _build("slak-decomposed-syncbn")
    with caplog.at_level(logging.INFO, logger="lkconv.reparam"):
        lkconv.reparameterize(model)
    assert "SLaKReparamLargeKernelConv: 6 structural" in caplog.text


def test_example_inputs_give_the_check_real_inputs():
    """A block whose input is not conv-shaped (NHWC) cannot be probed with a synthesized input: its
    method is not called and it is reported with a hint; with ``example_inputs`` it is checked on the
    captured real input and merged."""
    class NHWCBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = ReparamLargeKernelConv(4, 4, 9, 1, 4, 3)

        def forward(self, x):  # x: NHWC
            return self.blk(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

        def switch_to_deploy(self):
            ReparamLargeKernelConv.reparameterize(self.blk)

    def make():
        torch.manual_seed(0)
        net = nn.Sequential(_nontrivial(NHWCBlock()))
        for name in ("reparameterize", "switch_to_deploy", "merge_kernel"):  # only the wrapper can merge
            setattr(net[0].blk, name, None)
        return net

    x = torch.randn(2, 11, 12, 4)
    with torch.no_grad():
        ref = make()(x)
    _, synth = lkconv.reparameterize(make(), return_report=True)
    assert [e.block for e in synth.left] == ["NHWCBlock"] and "example_inputs" in synth.left[0].detail
    # (the inner block, NCHW, is still found from its branches)
    assert synth.counts()["ReparamLargeKernelConv"] == {"structural": 1}, synth.summary()
    dep, real = lkconv.reparameterize(make(), return_report=True, example_inputs=x)
    assert real.counts() == {"NHWCBlock": {"merged": 1}}, real.summary()
    assert dep[0].blk.deployed
    _assert_close_rel(dep, x, ref, 1e-4)


def test_merge_parallel_branches_rectangular_dilated_strided_fp64():
    torch.manual_seed(0)
    C = 3
    branches = [
        (nn.Conv2d(C, 2 * C, (11, 3), 2, (5, 1), groups=C, bias=False), nn.SyncBatchNorm(2 * C)),
        (nn.Conv2d(C, 2 * C, (3, 11), 2, (1, 5), groups=C, bias=True), None),
        (nn.Conv2d(C, 2 * C, 3, 2, 3, dilation=3, groups=C, bias=False), nn.BatchNorm2d(2 * C)),
    ]
    for c, bn in branches:
        c.double()
        if bn is not None:
            randomize_bn(bn).double().eval()
    x = torch.randn(2, C, 17, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = sum(bn(c(x)) if bn is not None else c(x) for c, bn in branches)
        conv, desc = merge_parallel_branches(branches)
        out = conv(x)
    assert conv.kernel_size == (11, 11) and conv.stride == (2, 2) and isinstance(conv, LargeKernelConv2d)
    assert conv.out_channels == 2 * C and conv.groups == C  # channel multiplier 2
    assert (out - ref).abs().max().item() <= 1e-12 * max(1.0, ref.abs().max().item()), desc
    with pytest.raises(ValueError, match="differ in channels, groups or stride"):
        merge_parallel_branches([branches[0], (nn.Conv2d(C, 2 * C, 3, 1, 1, groups=C), None)])


def test_lkconv_block_with_channel_multiplier_reparameterizes():
    torch.manual_seed(0)
    blk = _nontrivial(ReparamLargeKernelConv(4, 8, 13, 2, 4, 5)).double()
    assert isinstance(blk.lkb_origin.conv, LargeKernelConv2d)
    x = torch.randn(2, 4, 19, 20, dtype=torch.float64)
    with torch.no_grad():
        ref = blk(x)
        out = lkconv.reparameterize(blk)(x)
    assert isinstance(blk.lkb_reparam, LargeKernelConv2d) and blk.lkb_reparam.out_channels == 8
    assert (out - ref).abs().max().item() <= 1e-10 * max(1.0, ref.abs().max().item())


# ------------------------------------------------------------------------------------------------
# timm FastViT: the 7x7 stride-2 depthwise convs with 2C outputs
# ------------------------------------------------------------------------------------------------
def _fastvit():
    timm = pytest.importorskip("timm", reason="timm is a test-only dependency: pip install timm")
    torch.manual_seed(0)
    model = timm.create_model("fastvit_t8", pretrained=False, num_classes=10, layers=(1, 1, 1, 1),
                              embed_dims=(16, 32, 64, 128))
    model = _nontrivial(model)
    return model, torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def _multiplier_convs(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels
            and m.out_channels == 2 * m.in_channels and max(m.kernel_size) >= 5]


def test_fastvit_2c_output_convs_run_on_lkconv_after_convert():
    model, x = _fastvit()
    mult = _multiplier_convs(model)
    assert len(mult) >= 3, mult  # PatchEmbed's ReparamLargeKernelConv (7x7, stride 2, 2C outputs)
    with torch.no_grad():
        ref = model(x)
    conv = lkconv.convert(model, inplace=False)
    for n in mult:
        assert isinstance(_module_at(conv, n), LargeKernelConv2d), n
    left = [n for n, m in conv.named_modules() if type(m) is nn.Conv2d and m.groups == m.in_channels
            and m.out_channels % m.in_channels == 0 and max(m.kernel_size) >= 5]
    assert not left, left
    with torch.no_grad():
        out = conv(x)
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_fastvit_reparameterize_deploys_2c_convs_on_lkconv():
    model, x = _fastvit()
    with torch.no_grad():
        ref = model(x)
    dep, report = lkconv.reparameterize(model, inplace=False, return_report=True)
    assert not report.left, report.summary()
    assert report.counts()["ReparamLargeKernelConv"] == {"merged": 3}
    rlk = [m for m in dep.modules() if type(m).__name__ == "ReparamLargeKernelConv"]
    assert rlk and all(isinstance(m.reparam_conv, LargeKernelConv2d) for m in rlk)
    assert any(m.reparam_conv.out_channels == 2 * m.reparam_conv.in_channels for m in rlk)
    with torch.no_grad():
        out = dep(x)
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_left_children_stay_reported_when_the_parent_is_restored():
    """A parent whose method fails is restored from its snapshot (a copy): what was found out about
    its children (left, with the reason) still appears in the report."""
    class NotASum(_TwoBranches):
        def __init__(self):
            super().__init__(5, 3)

        def forward(self, x):
            return self.a(x) * self.b(x)

        def switch_to_deploy(self):
            raise RuntimeError("cannot deploy")

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = NotASum()

        def forward(self, x):
            return self.inner(x) + x

        def merge_kernel(self):
            raise AttributeError("no lkb_origin")

    net, x, ref, dep, report = _deploy_one(Parent, (2, 4, 9, 10))
    left = {e.path: e for e in report.left}
    assert set(left) == {"0", "0.inner"}, report.summary()
    assert "merge_kernel() raised AttributeError" in left["0"].detail
    assert "switch_to_deploy() raised RuntimeError" in left["0.inner"].detail  # found before the restore
    assert "not a sum" in left["0.inner"].detail  # and after it, on the restored copy
    with torch.no_grad():
        torch.testing.assert_close(dep(x), ref)


def test_fastvit_final_mobileone_2c_conv_converts_after_deploy():
    """FastViT's last MobileOneBlock is a 3x3 depthwise conv with 2C outputs: once deployed it is one
    conv that ``convert(min_kernel=3)`` puts on lkconv (channel multiplier 2)."""
    model, x = _fastvit()
    with torch.no_grad():
        ref = model(x)
    dep = lkconv.convert(lkconv.reparameterize(model, inplace=False), min_kernel=3)
    rc = dep.final_conv.reparam_conv
    assert isinstance(rc, LargeKernelConv2d) and (rc.in_channels, rc.out_channels, rc.groups) == (128, 256, 128)
    with torch.no_grad():
        out = dep(x)
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
