"""reparameterize(model): a small network mixing every block -> deploy form with the same outputs,
fewer modules and (after ResRep pruning) fewer parameters; export of the deploy model."""
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lkconv
from lkconv.nn import LargeKernelConv2d
from lkconv.reparam import (
    ACBlock,
    DilatedReparamBlock,
    DiverseBranchBlock,
    DyRepBlock,
    ReparamLargeKernelConv,
    ReparamModule,
    RepVGGBlock,
    ResRepBlock,
    RMBlock,
    count_modules,
    count_parameters,
    randomize_bn,
    reparameterize,
    shrink_input_channels,
    to_plain,
)

DT = torch.float64


class ThirdPartyRepBlock(nn.Module):
    """A foreign block with the RepVGG-style ``switch_to_deploy`` protocol (uses hasattr, as such code does)."""

    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, 1, 1)
        self.b = nn.Conv2d(c, c, 1)

    def forward(self, x):
        if hasattr(self, "fused"):
            return self.fused(x)
        return self.a(x) + self.b(x)

    @torch.no_grad()
    def switch_to_deploy(self):
        if hasattr(self, "fused"):
            return
        self.fused = nn.Conv2d(self.a.in_channels, self.a.out_channels, 3, 1, 1).to(self.a.weight)
        self.fused.weight.copy_(self.a.weight + F.pad(self.b.weight, [1, 1, 1, 1]))
        self.fused.bias.copy_(self.a.bias + self.b.bias)
        del self.a, self.b


class MixedNet(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.repvgg = RepVGGBlock(c, c)
        self.acb = ACBlock(c, c, 3)
        self.dbb = DiverseBranchBlock(c, c, 3, groups=2)
        self.replk = ReparamLargeKernelConv(c, c, 13, 1, c, 5)
        self.dilated = DilatedReparamBlock(c, 7)
        self.resrep = ResRepBlock(c, 8, 3, 1, 1)
        self.mid = nn.Sequential(nn.Conv2d(8, c, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.rm = RMBlock(c, c)
        self.dyrep = DyRepBlock(c, c, 3, branches=("1x1", "1x1_kxk", "identity"))
        self.foreign = ThirdPartyRepBlock(c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.repvgg(x)  # ends with ReLU
        x = F.relu(self.acb(x))
        x = F.relu(self.dbb(x))
        x = self.replk(x) + x
        x = F.relu(self.dilated(x))
        x = self.mid(F.relu(self.resrep(x)))  # ReLU output: non-negative for the RM block
        x = self.rm(x)
        x = F.relu(self.dyrep(x))
        x = self.foreign(x)
        return self.head(x.mean((2, 3)))


def _make(seed=0):
    torch.manual_seed(seed)
    net = MixedNet()
    randomize_bn(net)
    with torch.no_grad():
        net.resrep.compactor.weight.add_(torch.randn_like(net.resrep.compactor.weight) * 0.2)
        net.resrep.compactor.weight[[2, 5]] = 0  # as the ResRep penalty leaves them
        for br in net.dyrep.branches.values():
            for m in br.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.normal_(1, 0.3)
    return net.to(DT).eval()


def test_mixed_model_reparameterize_same_outputs_fewer_modules_and_params():
    net = _make()
    x = torch.randn(2, 3, 12, 11, dtype=DT)
    with torch.no_grad():
        ref = net(x)
    n_mod, n_par = count_modules(net), count_parameters(net)
    # ResRep pruning: drop the zero compactor rows and shrink the following 1x1 conv
    keep = net.resrep.prune(1e-12)
    assert keep.numel() == 6
    net.mid[0] = shrink_input_channels(net.mid[0], keep)
    dep = reparameterize(net, inplace=False)
    assert net.repvgg.deployed is False  # inplace=False left the original alone
    with torch.no_grad():
        y = dep(x)
        y_pruned_train = net(x)
    scale = max(1.0, ref.abs().max().item())
    assert (y_pruned_train - ref).abs().max().item() < 1e-10 * scale
    err = (y - ref).abs().max().item()
    assert err < 1e-9 * scale, f"deploy vs train max err {err:.3e}"
    assert not dep.training
    assert count_modules(dep) < n_mod
    assert count_parameters(dep) < n_par
    for m in dep.modules():
        assert not isinstance(m, nn.BatchNorm2d), f"BN left: {m}"
        if isinstance(m, ReparamModule):
            assert m.deployed
    assert isinstance(dep.replk.lkb_reparam, LargeKernelConv2d)
    assert isinstance(dep.dilated.lk_origin, LargeKernelConv2d)
    assert hasattr(dep.foreign, "fused")
    assert dep.resrep.fused.out_channels == 6 and dep.mid[0].in_channels == 6
    # the stem's conv+BN pair was fused in its Sequential
    assert isinstance(dep.stem[1], nn.Identity) and dep.stem[0].bias is not None
    # idempotent
    reparameterize(dep)
    with torch.no_grad():
        assert torch.equal(dep(x), y)


def test_fp32_deploy_close():
    net = _make().float()
    x = torch.randn(2, 3, 12, 11)
    with torch.no_grad():
        ref = net(x)
        y = reparameterize(net)(x)
    assert (y - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())


def test_to_plain_and_lkconv_reparameterize_alias():
    assert lkconv.reparameterize is reparameterize
    net = _make()
    x = torch.randn(1, 3, 9, 9, dtype=DT)
    with torch.no_grad():
        ref = net(x)
        dep = reparameterize(net, plain_conv=True)
        y = dep(x)
    assert not any(isinstance(m, LargeKernelConv2d) for m in dep.modules())
    assert (y - ref).abs().max().item() < 1e-9 * max(1.0, ref.abs().max().item())
    conv = to_plain(LargeKernelConv2d(4, 4, 5, padding=2, groups=4))
    assert type(conv) is nn.Conv2d
    with pytest.raises(TypeError):
        reparameterize("not a model")


def test_model_own_reparameterize_calling_lkconv_does_not_recurse():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = RepVGGBlock(4, 4)
            self.calls = 0

        def forward(self, x):
            return self.b(x)

        def reparameterize(self):
            self.calls += 1
            return reparameterize(self)

    n = Net()
    n.reparameterize()
    assert n.b.deployed and n.calls == 2  # the user's call, then once from the walk; no recursion


def _aten_targets(gm):
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def _small_deploy_net():
    torch.manual_seed(0)
    net = nn.Sequential(RepVGGBlock(4, 4), ReparamLargeKernelConv(4, 4, 13, 1, 4, 3),
                        DilatedReparamBlock(4, 7), nn.Conv2d(4, 4, 3, 1, 1), nn.BatchNorm2d(4))
    randomize_bn(net)
    return net.eval()


def test_torch_export_plain_convolutions_only():
    net = _small_deploy_net()
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        ref = net(x)
    dep = reparameterize(net)
    ep = torch.export.export(dep, (x,))
    targets = _aten_targets(ep.graph_module)
    assert any("lkconv" in t for t in targets)  # lkconv modules export as lkconv::dwconv2d
    plain = to_plain(dep)
    ep2 = torch.export.export(plain, (x,))
    targets2 = _aten_targets(ep2.graph_module)
    assert not any("lkconv" in t for t in targets2), targets2
    assert any("conv" in t for t in targets2)
    assert not any("batch_norm" in t for t in targets2)
    assert all(t.startswith("aten.") for t in targets2), targets2
    with torch.no_grad():
        assert (ep2.module()(x) - ref).abs().max().item() < 1e-4


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None,
                    reason="onnx/onnxscript not installed (the torch.export test above covers export)")
def test_onnx_export_plain_convolutions():
    import onnx

    net = _small_deploy_net()
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        ref = net(x)
    dep = reparameterize(net, plain_conv=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(dep, (x,), dynamo=True, verbose=False)
    model = prog.model_proto
    ops = {n.op_type for n in model.graph.node}
    assert "Conv" in ops and not ops & {"BatchNormalization"}, ops
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), ops
    onnx.checker.check_model(model)
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        assert abs(torch.from_numpy(out) - ref).max().item() < 1e-4
