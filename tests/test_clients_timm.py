"""Real clients: timm models with depthwise convolutions.

* ``lkconv.convert`` keeps their (eval-mode) outputs: ConvNeXt (7x7 depthwise), FastViT (7x7
  depthwise ConvMlp, RepMixer 3x3 depthwise branches) and a stack of timm's re-parameterizable blocks
  (FastViT's ``ReparamLargeKernelConv`` at 13x13, ``MobileOneBlock``, byobnet's ``MobileOneBlock`` /
  ``RepVggBlock``).
* ``lkconv.reparameterize`` agrees with timm's own ``reparameterize_model`` on them, and the deployed
  model can then be converted to lkconv modules with unchanged outputs.

timm is a test-only dependency (``pip install timm``); without it this file is skipped.  Models are
built with ``pretrained=False`` at tiny sizes; BatchNorm statistics and layer scales are randomised
(one training-mode calibration pass) so that no branch is numerically invisible.
"""

import pytest
import torch
import torch.nn as nn

import lkconv

timm = pytest.importorskip("timm", reason="timm is a test-only dependency: pip install timm")
from timm.utils import reparameterize_model as timm_reparameterize  # noqa: E402

try:  # lkconv.reparam is optional for the convert tests
    from lkconv.reparam import reparameterize as lk_reparameterize

    _REPARAM_ERR = None
except Exception as e:  # pragma: no cover - depends on the checkout
    lk_reparameterize = None
    _REPARAM_ERR = f"lkconv.reparam is not importable: {type(e).__name__}: {e}"


def _timm_blocks():
    import timm.models.byobnet as bb
    import timm.models.fastvit as fv

    return nn.Sequential(
        fv.ReparamLargeKernelConv(16, 16, 13, stride=1, group_size=1, small_kernel=3),  # RepLKNet-style 13x13 dw
        fv.MobileOneBlock(16, 16, 3, group_size=1, num_conv_branches=2),
        bb.MobileOneBlock(16, 16, 7, group_size=1, num_conv_branches=3),
        bb.RepVggBlock(16, 16, 3, group_size=1),
        bb.RepVggBlock(16, 16, 3, group_size=0),  # dense: stays an nn.Conv2d
        fv.ReparamLargeKernelConv(16, 16, 7, stride=2, group_size=1, small_kernel=3),  # strided dw
    )


# name -> (factory, input shape, minimum number of depthwise convs convert() must swap (min_kernel=3))
MODELS = {
    "convnext_atto": (
        lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10),
        (2, 3, 32, 32), 12,
    ),
    "fastvit_t8_tiny": (
        lambda: timm.create_model("fastvit_t8", pretrained=False, num_classes=10,
                                  layers=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128)),
        (1, 3, 32, 32), 4,
    ),
    "timm_rep_blocks": (_timm_blocks, (2, 16, 19, 21), 6),
}
REPARAM_MODELS = ["fastvit_t8_tiny", "timm_rep_blocks"]


@torch.no_grad()
def _make_nontrivial(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Random layer scales and affine BN, then BN running stats from one training-mode pass."""
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("gamma") or "layer_scale" in name:
            p.copy_(torch.rand(p.shape, generator=gen) * 0.4 + 0.1)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one pass sets the statistics of that batch
        if bn.affine:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen) * 0.2)
    model.train()
    model(x)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def _build(name, dtype):
    factory, shape, n_dw = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    gen = torch.Generator().manual_seed(1)
    calib = torch.randn((2, *shape[1:]), generator=gen)
    _make_nontrivial(model, calib)
    model = model.to(dtype).eval()
    x = torch.randn(shape, generator=gen).to(dtype)
    return model, x, n_dw


def _lk_modules(model):
    return [m for m in model.modules() if isinstance(m, lkconv.LargeKernelConv2d)]


def _close(out, ref, dtype, what, baseline=0.0):
    """max|out - ref| <= 2 * baseline + floor * max(1, max|ref|)   (the tolerance rule of docs/architecture.md; ``baseline`` is
    the error of timm's own result where there is one)."""
    scale = max(1.0, ref.abs().max().item())
    tol = 2.0 * baseline + (1e-10 if dtype == torch.float64 else 2e-5) * scale
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= tol, f"{what}: max|diff| = {err:.3e} > {tol:.3e} (max|ref| = {ref.abs().max().item():.3e})"


# fp32 everywhere (the brief: eval, fp32, tight tolerance); fp64 (bit-level tolerance) on the cheap block
# stack only -- fp64 convolutions are slow on the CPU
CONVERT_CASES = [(n, torch.float32) for n in MODELS] + [("timm_rep_blocks", torch.float64)]
REPARAM_CASES = [(n, torch.float32) for n in REPARAM_MODELS] + [("timm_rep_blocks", torch.float64)]


def _ids(cases):
    return [f"{n}-{'fp64' if d == torch.float64 else 'fp32'}" for n, d in cases]


@pytest.mark.parametrize("name,dtype", CONVERT_CASES, ids=_ids(CONVERT_CASES))
def test_convert_keeps_outputs(name, dtype):
    model, x, n_dw = _build(name, dtype)
    with torch.no_grad():
        ref = model(x)
    keys = list(model.state_dict())
    conv = lkconv.convert(model, min_kernel=3, inplace=False)
    assert not _lk_modules(model), "convert(inplace=False) modified the original model"
    swapped = _lk_modules(conv)
    assert len(swapped) >= n_dw, f"convert swapped {len(swapped)} depthwise convs, expected >= {n_dw}"
    assert list(conv.state_dict()) == keys, "convert changed the state_dict keys"
    with torch.no_grad():
        out = conv(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert ref.abs().max() > 1e-3, "test model output is degenerate"
    _close(out, ref, dtype, f"{name} converted vs original ({dtype})")


def test_convert_respects_min_kernel():
    model, x, _ = _build("convnext_atto", torch.float32)
    assert len(_lk_modules(lkconv.convert(model, min_kernel=9, inplace=False))) == 0  # all 7x7
    assert len(_lk_modules(lkconv.convert(model, min_kernel=7, inplace=False))) == 12


def test_converted_model_trains_like_the_original():
    """One backward pass: parameter gradients of the converted model equal the original's."""
    model, x, _ = _build("timm_rep_blocks", torch.float64)
    conv = lkconv.convert(model, min_kernel=3, inplace=False)
    assert _lk_modules(conv)
    for m in (model, conv):
        m.train()
        m.zero_grad()
        m(x).square().sum().backward()
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), conv.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-9, atol=1e-11, msg=lambda m: f"{n1}: {m}")


@pytest.mark.skipif(lk_reparameterize is None, reason=_REPARAM_ERR or "")
@pytest.mark.parametrize("name,dtype", REPARAM_CASES, ids=_ids(REPARAM_CASES))
def test_reparameterize_agrees_with_timm(name, dtype):
    model, x, _ = _build(name, dtype)
    n_train = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        ref = model(x)
    t = timm_reparameterize(model, inplace=False)
    ours = lk_reparameterize(model, inplace=False)
    assert not ours.training
    n_timm = sum(p.numel() for p in t.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_timm < n_train
    assert n_ours <= n_timm, f"lkconv.reparameterize left {n_ours} parameters, timm {n_timm}"
    # every block timm deployed is deployed by lkconv too
    timm_deployed = {n for n, m in t.named_modules() if getattr(m, "reparam_conv", None) is not None}
    ours_deployed = {n for n, m in ours.named_modules() if getattr(m, "reparam_conv", None) is not None}
    assert timm_deployed and timm_deployed <= ours_deployed, sorted(timm_deployed - ours_deployed)
    with torch.no_grad():
        out_t, out_o = t(x), ours(x)
    # fp32: the fused kernels round differently from the branch sum; compare at fp32-scale tolerance
    _close(out_o, out_t, dtype if dtype == torch.float64 else torch.float32, f"{name}: lkconv vs timm reparam")
    timm_err = (out_t.double() - ref.double()).abs().max().item()
    _close(out_o, ref, dtype, f"{name}: lkconv reparam vs training form (timm's error {timm_err:.3e})", timm_err)

    # and the deploy form converts to lkconv modules with the same outputs
    deployed = lkconv.convert(ours, min_kernel=3, inplace=False)
    large = [m for m in _lk_modules(deployed) if max(m.kernel_size) >= 7]
    assert large, "no large-kernel depthwise conv left after reparameterization"
    with torch.no_grad():
        out_c = deployed(x)
    _close(out_c, out_o, dtype, f"{name}: converted deploy form vs deploy form")
