"""lkconv.models: RepLKNet (tiny config on CPU), the original checkpoint layout, re-parameterization,
UniRepLKNet's DilatedReparamBlock."""
import copy
import io

import pytest
import torch
import torch.nn as nn

import lkconv
from lkconv.models import (
    CheckpointMismatchError,
    DilatedReparamBlock,
    DropPath,
    RepLKNet,
    UniRepLKNetBlock,
    create_model,
    load_original_checkpoint,
    replknet_31b,
    replknet_tiny,
    replknet_xl,
    set_model_backend,
    to_nn_conv2d,
)
from lkconv.models.replknet import MODEL_CONFIGS
from lkconv.nn import LargeKernelConv2d


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return model


def _tiny64(**kw):
    torch.manual_seed(0)
    m = replknet_tiny(num_classes=5, **kw).double()
    return _randomize_bn(m)


# --------------------------------------------------------------------------------------------------
# the original RepLKNet key layout, written out from the original code's structure (independently of
# lkconv.models): name -> shape
# --------------------------------------------------------------------------------------------------
def original_layout(large_kernel_sizes, layers, channels, small_kernel, dw_ratio=1.0, ffn_ratio=4.0,
                    in_channels=3, num_classes=1000, deployed=False):
    sd = {}

    def bn(prefix, c):
        for n in ("weight", "bias", "running_mean", "running_var"):
            sd[f"{prefix}.{n}"] = (c,)
        sd[f"{prefix}.num_batches_tracked"] = ()

    def conv_bn(prefix, cout, cin_per_group, k):
        sd[f"{prefix}.conv.weight"] = (cout, cin_per_group, k, k)
        bn(f"{prefix}.bn", cout)

    w0 = channels[0]
    conv_bn("stem.0", w0, in_channels, 3)
    conv_bn("stem.1", w0, 1, 3)
    conv_bn("stem.2", w0, w0, 1)
    conv_bn("stem.3", w0, 1, 3)
    for i, (k, n, c) in enumerate(zip(large_kernel_sizes, layers, channels)):
        dw, ffn = int(c * dw_ratio), int(c * ffn_ratio)
        for j in range(n):
            lk = f"stages.{i}.blocks.{2 * j}"
            conv_bn(f"{lk}.pw1", dw, c, 1)
            conv_bn(f"{lk}.pw2", c, dw, 1)
            if deployed:
                sd[f"{lk}.large_kernel.lkb_reparam.weight"] = (dw, 1, k, k)
                sd[f"{lk}.large_kernel.lkb_reparam.bias"] = (dw,)
            else:
                conv_bn(f"{lk}.large_kernel.lkb_origin", dw, 1, k)
                if small_kernel is not None:
                    conv_bn(f"{lk}.large_kernel.small_conv", dw, 1, small_kernel)
            bn(f"{lk}.prelkb_bn", c)
            ff = f"stages.{i}.blocks.{2 * j + 1}"
            bn(f"{ff}.preffn_bn", c)
            conv_bn(f"{ff}.pw1", ffn, c, 1)
            conv_bn(f"{ff}.pw2", c, ffn, 1)
        if i < len(layers) - 1:
            conv_bn(f"transitions.{i}.0", channels[i + 1], c, 1)
            conv_bn(f"transitions.{i}.1", channels[i + 1], 1, 3)
    bn("norm", channels[-1])
    sd["head.weight"] = (num_classes, channels[-1])
    sd["head.bias"] = (num_classes,)
    return sd


def _layout_of(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _original_state_dict(layout, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            out[k] = torch.rand(shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(shape, generator=g)
    return out


TINY = {k: MODEL_CONFIGS["replknet_tiny"][k] for k in
        ("large_kernel_sizes", "layers", "channels", "small_kernel", "dw_ratio", "ffn_ratio")}


@pytest.mark.parametrize("name", ["replknet_31b", "replknet_31l", "replknet_xl"])
def test_full_configs_match_original_layout(name):
    cfg = MODEL_CONFIGS[name]
    with torch.device("meta"):
        model = create_model(name)
    want = original_layout(cfg["large_kernel_sizes"], cfg["layers"], cfg["channels"], cfg["small_kernel"],
                           cfg["dw_ratio"], 4.0)
    assert _layout_of(model) == want
    nparams = sum(p.numel() for p in model.parameters())
    # the paper's Table: 79M (31B), 172M (31L), 335M (XL) parameters
    assert round(nparams / 1e6) == {"replknet_31b": 80, "replknet_31l": 173, "replknet_xl": 335}[name]
    n_lk = sum(isinstance(m, LargeKernelConv2d) for m in model.modules())
    assert n_lk == sum(cfg["layers"])


def test_tiny_forward_backward_matches_nn_conv2d():
    model = _tiny64()
    ref = to_nn_conv2d(copy.deepcopy(model))
    assert not any(isinstance(m, LargeKernelConv2d) for m in ref.modules())
    assert sum(isinstance(m, LargeKernelConv2d) for m in model.modules()) == sum(TINY["layers"])
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = model(x)
    y_ref = ref(x)
    assert y.shape == (2, 5)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-9, msg=n)


def test_tiny_fp32_forward_backward_channels_last_and_backend():
    torch.manual_seed(0)
    model = replknet_tiny(num_classes=3, in_chans=1, backend="torch").to(memory_format=torch.channels_last)
    assert all(m.backend == "torch" for m in model.modules() if isinstance(m, LargeKernelConv2d))
    x = torch.randn(3, 1, 33, 40).to(memory_format=torch.channels_last)
    y = model(x)
    assert y.shape == (3, 3) and torch.isfinite(y).all()
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    set_model_backend(model, None)
    assert all(m.backend is None for m in model.modules() if isinstance(m, LargeKernelConv2d))


def test_train_vs_deploy_equal_in_eval():
    model = _tiny64().eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    assert model.reparameterize() is model
    keys = list(model.state_dict())
    assert not any("lkb_origin" in k or "small_conv" in k for k in keys)
    assert sum(k.endswith("lkb_reparam.weight") for k in keys) == sum(TINY["layers"])
    assert _layout_of(model) == original_layout(**TINY, num_classes=5, deployed=True)
    assert all(isinstance(m.lkb_reparam, LargeKernelConv2d)
               for m in model.modules() if type(m).__name__ == "ReparamLargeKernelConv")
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)
    model.reparameterize()  # idempotent
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)


def test_generic_reparameterize_walker_on_replknet():
    reparam = pytest.importorskip("lkconv.reparam")
    if not hasattr(reparam, "reparameterize"):
        pytest.skip("lkconv.reparam.reparameterize not available in this checkout")
    model = _tiny64().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    lkconv.reparameterize(model)
    assert not any("lkb_origin" in k for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)


def test_deployed_checkpoint_loads_into_small_kernel_merged_model():
    model = _tiny64().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    model.reparameterize()
    dep = replknet_tiny(num_classes=5, small_kernel_merged=True).double().eval()
    load_original_checkpoint(dep, {"state_dict": model.state_dict()})
    with torch.no_grad():
        torch.testing.assert_close(dep(x), want, rtol=1e-10, atol=1e-10)
    # a deployed checkpoint into a training-form model: a clear error with a hint
    train_form = replknet_tiny(num_classes=5)
    with pytest.raises(CheckpointMismatchError, match=r"small_kernel_merged=True"):
        load_original_checkpoint(train_form, model.state_dict())


def test_state_dict_round_trip(tmp_path):
    model = _tiny64().eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = replknet_tiny(num_classes=5).double()
    other.load_state_dict(torch.load(buf, weights_only=True))
    other.eval()
    for (k, a), (k2, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    # and through load_original_checkpoint from a file, wrapped as the original training scripts did
    path = tmp_path / "ck.pth"
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    third = replknet_tiny(num_classes=5).double().eval()
    load_original_checkpoint(third, str(path))
    with torch.no_grad():
        torch.testing.assert_close(third(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module_prefix", "no_num_batches"])
def test_load_original_layout(wrap):
    layout = original_layout(**TINY, num_classes=5)
    sd = _original_state_dict(layout)
    obj = sd
    if wrap == "model":
        obj = {"model": sd, "optimizer": {}, "epoch": 299}
    elif wrap == "state_dict":
        obj = {"state_dict": sd}
    elif wrap == "module_prefix":
        obj = {"model": {"module." + k: v for k, v in sd.items()}}
    elif wrap == "no_num_batches":
        obj = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    model = replknet_tiny(num_classes=5)
    assert load_original_checkpoint(model, obj) is model
    got = model.state_dict()
    for k, v in sd.items():
        if wrap == "no_num_batches" and k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(got[k], v), k


def test_load_original_xl_style_layout_without_small_kernel():
    cfg = dict(large_kernel_sizes=[9, 7], layers=[1, 1], channels=[8, 16], small_kernel=None, dw_ratio=1.5)
    layout = original_layout(**cfg, num_classes=3)
    assert not any("small_conv" in k for k in layout)
    sd = _original_state_dict(layout)
    model = RepLKNet(**cfg, num_classes=3)
    load_original_checkpoint(model, sd)
    assert torch.equal(model.state_dict()["stages.1.blocks.0.large_kernel.lkb_origin.conv.weight"],
                       sd["stages.1.blocks.0.large_kernel.lkb_origin.conv.weight"])
    x = torch.randn(1, 3, 32, 32)
    assert model.eval()(x).shape == (1, 3)


def test_load_original_mismatches_raise_clearly():
    layout = original_layout(**TINY, num_classes=5)
    sd = _original_state_dict(layout)
    model = replknet_tiny(num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    bad = dict(sd)
    bad["head.weight"] = torch.randn(1000, 32)  # a 1000-class head into a 5-class model
    bad["head.bias"] = torch.randn(1000)
    with pytest.raises(CheckpointMismatchError, match=r"head\.weight: checkpoint \(1000, 32\) vs model \(5, 32\)"):
        load_original_checkpoint(model, bad)
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatches"):
        load_original_checkpoint(model, bad, strict=False)  # shapes are never silently skipped

    missing = {k: v for k, v in sd.items() if k != "stages.2.blocks.2.large_kernel.small_conv.conv.weight"}
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): stages\.2\.blocks\.2\.large_kernel"):
        load_original_checkpoint(model, missing)

    extra = dict(sd, **{"stages.0.blocks.0.large_kernel.lkb_origin.conv.bias": torch.zeros(8)})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\): stages\.0\.blocks\.0"):
        load_original_checkpoint(model, extra)

    # nothing was loaded by the failed attempts
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    # strict=False: the extra key is ignored, the rest loads
    load_original_checkpoint(model, extra, strict=False)
    assert torch.equal(model.state_dict()["head.weight"], sd["head.weight"])

    with pytest.raises(TypeError, match="state_dict"):
        load_original_checkpoint(model, [1, 2, 3])
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_original_checkpoint(model, "/nonexistent/replknet.pth")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        load_original_checkpoint("model", sd)


def test_use_checkpoint_same_gradients():
    torch.manual_seed(0)
    a = replknet_tiny(num_classes=4).double()
    b = replknet_tiny(num_classes=4, use_checkpoint=True).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=n)


def test_backbone_mode_out_indices():
    torch.manual_seed(0)
    m = RepLKNet(**TINY, num_classes=None, out_indices=[1, 3], norm_intermediate_features=True).eval()
    feats = m(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 8, 8), (1, 32, 2, 2)]
    assert not hasattr(m, "head")


def test_drop_path():
    torch.manual_seed(0)
    dp = DropPath(0.5)
    x = torch.ones(64, 2, 3, 3)
    y = dp(x)
    kept = (y[:, 0, 0, 0] != 0)
    assert torch.all(y[kept] == 2.0) and torch.all(y[~kept] == 0) and 0 < kept.sum() < 64
    assert torch.equal(dp.eval()(x), x)
    m = replknet_tiny(num_classes=2, drop_path_rate=0.2)
    rates = [mod.drop_prob for mod in m.modules() if isinstance(mod, DropPath)]
    assert rates and max(rates) == pytest.approx(0.2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers=[1, 1], large_kernel_sizes=[7], channels=[8, 16]), "large_kernel_sizes must have 2"),
    (dict(layers=[1, 1], large_kernel_sizes=[7, 7], channels=[8, 0]), "channels"),
    (dict(layers=[1, 1], large_kernel_sizes=[7, 3], channels=[8, 16], small_kernel=5), "small_kernel"),
    (dict(layers=[1], large_kernel_sizes=[7], channels=[8], num_classes=None), "num_classes"),
    (dict(layers=[1], large_kernel_sizes=[7], channels=[8], out_indices=[0]), "not both"),
    (dict(layers=[1], large_kernel_sizes=[7], channels=[8], drop_path_rate=1.5), "drop_path_rate"),
    (dict(layers=[1], large_kernel_sizes=[7], channels=[8], in_chans=0), "in_chans"),
    (dict(layers=[1], large_kernel_sizes=[7], channels=[8], backend="nope"), "unknown backend"),
])
def test_bad_arguments(kwargs, match):
    kw = dict(small_kernel=3)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        RepLKNet(**kw)


def test_create_model_names_and_bad_input():
    assert isinstance(create_model("tiny", num_classes=2), RepLKNet)
    assert create_model("RepLKNet-31B", num_classes=2, channels=[8, 8, 8, 8], layers=[1, 1, 1, 1]).config[
        "large_kernel_sizes"] == [31, 29, 27, 13]
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet50")
    with pytest.raises(ValueError, match="4-D"):
        replknet_tiny(num_classes=2)(torch.randn(3, 32, 32))
    assert replknet_xl.__doc__ and replknet_31b.__doc__


# --------------------------------------------------------------------------------------------------
# UniRepLKNet
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [5, 9, 13, 17])
def test_dilated_reparam_block_equivalence(k):
    torch.manual_seed(k)
    blk = _randomize_bn(DilatedReparamBlock(6, k).double(), seed=k).eval()
    names = {n for n, _ in blk.named_children()}
    assert "lk_origin" in names and "origin_bn" in names and any(n.startswith("dil_conv_k") for n in names)
    x = torch.randn(2, 6, 19, 23, dtype=torch.float64)
    with torch.no_grad():
        want = blk(x)
        blk.reparameterize()
        got = blk(x)
    assert blk.deployed and isinstance(blk.lk_origin, LargeKernelConv2d)
    assert set(blk.state_dict()) == {"lk_origin.weight", "lk_origin.bias"}
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_unireplknet_block_equivalence_and_train():
    torch.manual_seed(0)
    blk = _randomize_bn(UniRepLKNetBlock(8, 7, layer_scale_init_value=1.0).double()).eval()
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        want = blk(x)
        blk.reparameterize()
        got = blk(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    blk2 = UniRepLKNetBlock(8, 7)
    y = blk2(torch.randn(2, 8, 12, 12))
    y.sum().backward()
    assert blk2.dwconv.lk_origin.weight.grad is not None


def test_dilated_reparam_block_bad_kernel():
    with pytest.raises(ValueError, match="kernel_size"):
        DilatedReparamBlock(4, 31)
    with pytest.raises(ValueError, match="kernel_size must be one of"):
        UniRepLKNetBlock(4, 31)
    with pytest.raises(ValueError, match="dim"):
        UniRepLKNetBlock(0, 7)
