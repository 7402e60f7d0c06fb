"""Re-creations of third-party large-kernel model code, for testing ``lkconv.reparameterize`` on the
block types real users bring.  Written here from the public descriptions of these designs (papers
and the structure of the published models: module names, branch layout, deploy conventions); no code
is copied.  Each mirrors what matters to deployment:

* **RepLKNet** (the original ``replknet.py``): ``conv_bn`` = ``nn.Sequential(conv, bn)``;
  ``ReparamLargeKernelConv`` with ``lkb_origin`` (+ ``small_conv``), block-level ``merge_kernel()``
  that installs ``lkb_reparam`` and deletes the branches (``hasattr`` mode switch, so a second call
  raises ``AttributeError``), model-level ``structural_reparam()`` calling ``merge_kernel`` on every
  module that has it; ``RepLKBlock`` / ``ConvFFN`` / stages / stem / transitions.
* **SLaK** (``models/SLaK.py``): ConvNeXt-style blocks whose large kernel is *decomposed*:
  ``LoRA1`` (K x s), ``LoRA2`` (s x K) and ``small_conv`` (s x s), each a ``conv_bn`` with
  SyncBatchNorm by default; its ``merge_kernel()`` only knows ``lkb_origin`` and raises
  ``AttributeError`` on a decomposed block.
* **UniRepLKNet** (``unireplknet.py``): ``DilatedReparamBlock`` (``lk_origin`` + ``origin_bn`` + dilated
  ``dil_conv_k{k}_{r}`` / ``dil_bn_k{k}_{r}``, ``merge_dilated_branches()``), ``UniRepLKNetBlock``
  (dwconv -> BN -> SE -> Linear -> GELU -> GRN -> Linear -> BN, ``reparameterize()`` folding the BNs,
  layer scale and GRN bias), model-level ``reparameterize_unireplknet()``; SyncBN optional.

``use_lkconv=True`` plays the role of these projects' import hook for the
``DepthWiseConv2dImplicitGEMM`` extension (here lkconv's drop-in of the same name).
timm's FastViT / MobileOne / RepVGG are used directly from timm in the tests.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import lkconv
from lkconv.models.unireplknet import GRN  # NHWC global response norm (not what the deploy tests exercise)


# ------------------------------------------------------------------------------------------------
# shared helpers (each project has its own; their behaviour is the same)
# ------------------------------------------------------------------------------------------------
def _get_conv2d(in_c, out_c, k, stride, padding, dilation, groups, bias, use_lkconv):
    ks = k if isinstance(k, tuple) else (k, k)
    pad = padding if isinstance(padding, tuple) else (padding, padding)
    large_impl = (use_lkconv and in_c == out_c == groups and stride == 1 and dilation == 1
                  and ks[0] == ks[1] and ks[0] % 2 == 1 and pad == (ks[0] // 2, ks[1] // 2))
    if large_impl:
        return lkconv.nn.DepthWiseConv2dImplicitGEMM(in_c, ks[0], bias=bias)
    return nn.Conv2d(in_c, out_c, ks, stride, pad, dilation, groups, bias)


def _get_bn(c, sync):
    return nn.SyncBatchNorm(c) if sync else nn.BatchNorm2d(c)


def _conv_bn(in_c, out_c, k, stride, padding, groups, sync=False, use_lkconv=False, dilation=1):
    seq = nn.Sequential()
    seq.add_module("conv", _get_conv2d(in_c, out_c, k, stride, padding, dilation, groups, False, use_lkconv))
    seq.add_module("bn", _get_bn(out_c, sync))
    return seq


def _conv_bn_relu(in_c, out_c, k, stride, padding, groups, sync=False, use_lkconv=False):
    seq = _conv_bn(in_c, out_c, k, stride, padding, groups, sync, use_lkconv)
    seq.add_module("nonlinear", nn.ReLU())
    return seq


def _fold_bn(kernel, bn):
    """(kernel * gamma/std, beta - mean * gamma/std): eval-mode BN after a bias-free conv."""
    std = (bn.running_var + bn.eps).sqrt()
    s = bn.weight / std
    return kernel * s.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * s


class _DropPath(nn.Identity):
    """Stochastic depth is the identity in eval mode (all the deploy path sees)."""


class LayerNormCF(nn.Module):
    """LayerNorm over the channel dim of NCHW (``channels_first``) or the last dim (``channels_last``)."""

    def __init__(self, c, eps=1e-6, data_format="channels_last"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps, self.data_format, self.c = eps, data_format, c

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, (self.c,), self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


# ------------------------------------------------------------------------------------------------
# RepLKNet
# ------------------------------------------------------------------------------------------------
class RepLKReparamLargeKernelConv(nn.Module):
    def __init__(self, in_c, out_c, kernel_size, stride, groups, small_kernel, small_kernel_merged=False,
                 sync=False, use_lkconv=False):
        super().__init__()
        self.kernel_size, self.small_kernel = kernel_size, small_kernel
        self.use_lkconv = use_lkconv
        padding = kernel_size // 2
        if small_kernel_merged:
            self.lkb_reparam = _get_conv2d(in_c, out_c, kernel_size, stride, padding, 1, groups, True, use_lkconv)
        else:
            self.lkb_origin = _conv_bn(in_c, out_c, kernel_size, stride, padding, groups, sync, use_lkconv)
            if small_kernel is not None:
                assert small_kernel <= kernel_size
                self.small_conv = _conv_bn(in_c, out_c, small_kernel, stride, small_kernel // 2, groups, sync)

    def forward(self, x):
        if hasattr(self, "lkb_reparam"):
            return self.lkb_reparam(x)
        out = self.lkb_origin(x)
        if hasattr(self, "small_conv"):
            out = out + self.small_conv(x)
        return out

    def get_equivalent_kernel_bias(self):
        k, b = _fold_bn(self.lkb_origin.conv.weight, self.lkb_origin.bn)
        if hasattr(self, "small_conv"):
            sk, sb = _fold_bn(self.small_conv.conv.weight, self.small_conv.bn)
            p = (self.kernel_size - self.small_kernel) // 2
            k = k + F.pad(sk, [p] * 4)
            b = b + sb
        return k, b

    def merge_kernel(self):
        k, b = self.get_equivalent_kernel_bias()
        c = self.lkb_origin.conv
        self.lkb_reparam = _get_conv2d(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0], 1,
                                       c.groups, True, self.use_lkconv)
        self.lkb_reparam.weight.data = k
        self.lkb_reparam.bias.data = b
        self.__delattr__("lkb_origin")
        if hasattr(self, "small_conv"):
            self.__delattr__("small_conv")


class RepLKConvFFN(nn.Module):
    def __init__(self, c, internal, sync=False):
        super().__init__()
        self.preffn_bn = _get_bn(c, sync)
        self.pw1 = _conv_bn(c, internal, 1, 1, 0, 1, sync)
        self.pw2 = _conv_bn(internal, c, 1, 1, 0, 1, sync)
        self.nonlinear = nn.GELU()
        self.drop_path = _DropPath()

    def forward(self, x):
        return x + self.drop_path(self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x)))))


class RepLKBlock(nn.Module):
    def __init__(self, c, dw_c, block_lk_size, small_kernel, sync=False, use_lkconv=False):
        super().__init__()
        self.pw1 = _conv_bn_relu(c, dw_c, 1, 1, 0, 1, sync)
        self.pw2 = _conv_bn(dw_c, c, 1, 1, 0, 1, sync)
        self.large_kernel = RepLKReparamLargeKernelConv(dw_c, dw_c, block_lk_size, 1, dw_c, small_kernel,
                                                        sync=sync, use_lkconv=use_lkconv)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = _get_bn(c, sync)
        self.drop_path = _DropPath()

    def forward(self, x):
        out = self.pw1(self.prelkb_bn(x))
        out = self.pw2(self.lk_nonlinear(self.large_kernel(out)))
        return x + self.drop_path(out)


class RepLKNet(nn.Module):
    """Stem (two stride-2 stages of conv_bn_relu), stages of [RepLKBlock, ConvFFN] * layers with a
    transition (1x1 + 3x3 stride-2 depthwise) between them, BN, pooling, head."""

    def __init__(self, large_kernel_sizes=(13, 11, 9, 7), layers=(1, 1, 2, 1), channels=(8, 16, 16, 24),
                 small_kernel=5, dw_ratio=1, ffn_ratio=2, in_chans=3, num_classes=10, sync=False, use_lkconv=False):
        super().__init__()
        c0 = channels[0]
        self.stem = nn.ModuleList([
            _conv_bn_relu(in_chans, c0, 3, 2, 1, 1, sync),
            _conv_bn_relu(c0, c0, 3, 1, 1, c0, sync),
            _conv_bn_relu(c0, c0, 1, 1, 0, 1, sync),
            _conv_bn_relu(c0, c0, 3, 2, 1, c0, sync),
        ])
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for i, (k, n, c) in enumerate(zip(large_kernel_sizes, layers, channels)):
            blocks = []
            for _ in range(n):
                blocks.append(RepLKBlock(c, int(c * dw_ratio), k, small_kernel, sync, use_lkconv))
                blocks.append(RepLKConvFFN(c, int(c * ffn_ratio), sync))
            stage = nn.Sequential(*blocks)
            stage.add_module("norm", _get_bn(c, sync))
            self.stages.append(stage)
            if i < len(channels) - 1:
                nxt = channels[i + 1]
                self.transitions.append(nn.Sequential(_conv_bn_relu(c, nxt, 1, 1, 0, 1, sync),
                                                      _conv_bn_relu(nxt, nxt, 3, 2, 1, nxt, sync)))
        self.norm = _get_bn(channels[-1], sync)
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        for s in self.stem:
            x = s(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        x = self.norm(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def structural_reparam(self):
        for m in self.modules():
            if hasattr(m, "merge_kernel"):
                m.merge_kernel()


# ------------------------------------------------------------------------------------------------
# SLaK
# ------------------------------------------------------------------------------------------------
class SLaKReparamLargeKernelConv(nn.Module):
    """``Decom=True``: LoRA1 (K x s) + LoRA2 (s x K) (+ small_conv s x s), each conv + BN (SyncBN by
    default).  ``Decom=False``: lkb_origin (K x K) + small_conv, as RepLKNet."""

    def __init__(self, in_c, out_c, kernel_size, stride, groups, small_kernel, small_kernel_merged=False,
                 Decom=True, sync=True, use_lkconv=False):
        super().__init__()
        self.kernel_size, self.small_kernel, self.Decom = kernel_size, small_kernel, Decom
        padding = kernel_size // 2
        if small_kernel_merged:
            self.lkb_reparam = _get_conv2d(in_c, out_c, kernel_size, stride, padding, 1, groups, True, use_lkconv)
        elif Decom:
            self.LoRA1 = _conv_bn(in_c, out_c, (kernel_size, small_kernel), stride, (padding, small_kernel // 2),
                                  groups, sync)
            self.LoRA2 = _conv_bn(in_c, out_c, (small_kernel, kernel_size), stride, (small_kernel // 2, padding),
                                  groups, sync)
            self.small_conv = _conv_bn(in_c, out_c, small_kernel, stride, small_kernel // 2, groups, sync)
        else:
            self.lkb_origin = _conv_bn(in_c, out_c, kernel_size, stride, padding, groups, sync, use_lkconv)
            self.small_conv = _conv_bn(in_c, out_c, small_kernel, stride, small_kernel // 2, groups, sync)

    def forward(self, x):
        if hasattr(self, "lkb_reparam"):
            return self.lkb_reparam(x)
        if self.Decom:
            out = self.LoRA1(x) + self.LoRA2(x)
        else:
            out = self.lkb_origin(x)
        if hasattr(self, "small_conv"):
            out = out + self.small_conv(x)
        return out

    def get_equivalent_kernel_bias(self):  # knows only the non-decomposed form, as the original
        k, b = _fold_bn(self.lkb_origin.conv.weight, self.lkb_origin.bn)
        if hasattr(self, "small_conv"):
            sk, sb = _fold_bn(self.small_conv.conv.weight, self.small_conv.bn)
            p = (self.kernel_size - self.small_kernel) // 2
            k, b = k + F.pad(sk, [p] * 4), b + sb
        return k, b

    def merge_kernel(self):
        k, b = self.get_equivalent_kernel_bias()
        c = self.lkb_origin.conv
        self.lkb_reparam = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, 1, c.groups,
                                     True)
        self.lkb_reparam.weight.data, self.lkb_reparam.bias.data = k, b
        self.__delattr__("lkb_origin")
        if hasattr(self, "small_conv"):
            self.__delattr__("small_conv")


class SLaKBlock(nn.Module):
    def __init__(self, dim, kernel_size, small_kernel=5, Decom=True, sync=True, use_lkconv=False,
                 layer_scale_init_value=1e-6):
        super().__init__()
        self.large_kernel = SLaKReparamLargeKernelConv(dim, dim, kernel_size, 1, dim, small_kernel, Decom=Decom,
                                                       sync=sync, use_lkconv=use_lkconv)
        self.norm = LayerNormCF(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.drop_path = _DropPath()

    def forward(self, x):
        y = self.large_kernel(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = (self.gamma * y).permute(0, 3, 1, 2)
        return x + self.drop_path(y)


class _StagedBackbone(nn.Module):
    """The part SLaK and UniRepLKNet share (both ConvNeXt-shaped): downsample + stage pairs, then
    global average pooling, LayerNorm and a linear head."""

    def _add_head(self, dim, num_classes):
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean((-2, -1))))


class SLaK(_StagedBackbone):
    """ConvNeXt layout: 4x4 stride-4 stem + LayerNorm, downsampling LayerNorm + 2x2 stride-2 conv,
    stages of SLaKBlock (decomposed K x 5 + 5 x K + 5 x 5 kernels)."""

    def __init__(self, depths=(1, 1, 3, 1), dims=(8, 16, 24, 32), kernel_sizes=(51, 49, 47, 13), small_kernel=5,
                 Decom=True, sync=True, use_lkconv=False, in_chans=3, num_classes=10):
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, 4),
                                                              LayerNormCF(dims[0], data_format="channels_first"))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(LayerNormCF(dims[i], data_format="channels_first"),
                                                        nn.Conv2d(dims[i], dims[i + 1], 2, 2)))
        self.stages = nn.ModuleList(
            nn.Sequential(*[SLaKBlock(dims[i], kernel_sizes[i], small_kernel, Decom, sync, use_lkconv)
                            for _ in range(depths[i])]) for i in range(4))
        self._add_head(dims[-1], num_classes)


# ------------------------------------------------------------------------------------------------
# UniRepLKNet
# ------------------------------------------------------------------------------------------------
def _dilated_to_dense(kernel, r):
    """Taps of a dilation-r kernel spread onto a dense ((k-1)*r+1)^2 grid."""
    o, i, k, _ = kernel.shape
    dense = kernel.new_zeros(o, i, (k - 1) * r + 1, (k - 1) * r + 1)
    dense[:, :, ::r, ::r] = kernel
    return dense


_UNI_BRANCHES = {
    17: ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7)),
    15: ((5, 7, 3, 3, 3), (1, 2, 3, 5, 7)),
    13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)),
    11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
    7: ((5, 3, 3), (1, 2, 3)),
}


class UniDilatedReparamBlock(nn.Module):
    def __init__(self, channels, kernel_size, deploy=False, use_sync_bn=False, use_lkconv=False):
        super().__init__()
        self.use_lkconv = use_lkconv
        self.lk_origin = _get_conv2d(channels, channels, kernel_size, 1, kernel_size // 2, 1, channels, deploy,
                                     use_lkconv)
        self.kernel_sizes, self.dilates = _UNI_BRANCHES[kernel_size]
        if not deploy:
            self.origin_bn = _get_bn(channels, use_sync_bn)
            for k, r in zip(self.kernel_sizes, self.dilates):
                setattr(self, f"dil_conv_k{k}_{r}",
                        nn.Conv2d(channels, channels, k, 1, (r * (k - 1) + 1) // 2, r, channels, False))
                setattr(self, f"dil_bn_k{k}_{r}", _get_bn(channels, use_sync_bn))

    def forward(self, x):
        if not hasattr(self, "origin_bn"):
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for k, r in zip(self.kernel_sizes, self.dilates):
            out = out + getattr(self, f"dil_bn_k{k}_{r}")(getattr(self, f"dil_conv_k{k}_{r}")(x))
        return out

    def merge_dilated_branches(self):
        if not hasattr(self, "origin_bn"):
            return
        k0, b0 = _fold_bn(self.lk_origin.weight, self.origin_bn)
        K = k0.shape[-1]
        for k, r in zip(self.kernel_sizes, self.dilates):
            bk, bb = _fold_bn(getattr(self, f"dil_conv_k{k}_{r}").weight, getattr(self, f"dil_bn_k{k}_{r}"))
            dense = _dilated_to_dense(bk, r)
            p = (K - dense.shape[-1]) // 2
            k0 = k0 + F.pad(dense, [p] * 4)
            b0 = b0 + bb
        c = self.lk_origin
        merged = _get_conv2d(c.in_channels, c.out_channels, K, 1, K // 2, 1, c.groups, True, self.use_lkconv)
        merged.weight.data, merged.bias.data = k0, b0
        self.lk_origin = merged
        self.__delattr__("origin_bn")
        for k, r in zip(self.kernel_sizes, self.dilates):
            self.__delattr__(f"dil_conv_k{k}_{r}")
            self.__delattr__(f"dil_bn_k{k}_{r}")


class _SE(nn.Module):
    def __init__(self, c, internal):
        super().__init__()
        self.down = nn.Conv2d(c, internal, 1)
        self.up = nn.Conv2d(internal, c, 1)
        self.nonlinear = nn.ReLU()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.up(self.nonlinear(self.down(s))))


class _NCHWtoNHWC(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class _NHWCtoNCHW(nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


class UniRepLKNetBlock(nn.Module):
    def __init__(self, dim, kernel_size, deploy=False, use_sync_bn=False, use_lkconv=False, ffn_factor=4,
                 layer_scale_init_value=1e-6):
        super().__init__()
        if kernel_size >= 7:
            self.dwconv = UniDilatedReparamBlock(dim, kernel_size, deploy, use_sync_bn, use_lkconv)
        else:
            self.dwconv = _get_conv2d(dim, dim, kernel_size, 1, kernel_size // 2, 1, dim, deploy, use_lkconv)
        self.norm = nn.Identity() if deploy else _get_bn(dim, use_sync_bn)
        self.se = _SE(dim, dim // 4)
        ffn = int(ffn_factor * dim)
        self.pwconv1 = nn.Sequential(_NCHWtoNHWC(), nn.Linear(dim, ffn))
        self.act = nn.Sequential(nn.GELU(), GRN(ffn, use_bias=not deploy))
        if deploy:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn, dim), _NHWCtoNCHW())
        else:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn, dim, bias=False), _NHWCtoNCHW(), _get_bn(dim, use_sync_bn))
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if not deploy else None
        self.drop_path = _DropPath()

    def forward(self, x):
        y = self.se(self.norm(self.dwconv(x)))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma.view(1, -1, 1, 1) * y
        return x + self.drop_path(y)

    @torch.no_grad()
    def reparameterize(self):
        if hasattr(self.dwconv, "merge_dilated_branches"):
            self.dwconv.merge_dilated_branches()
        if hasattr(self.norm, "running_var"):
            std = (self.norm.running_var + self.norm.eps).sqrt()
            s = self.norm.weight / std
            if hasattr(self.dwconv, "lk_origin"):
                conv = self.dwconv.lk_origin
            else:
                conv = self.dwconv
            bias = conv.bias if conv.bias is not None else torch.zeros_like(s)
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros_like(s))
            conv.weight.data = conv.weight * s.view(-1, 1, 1, 1)
            conv.bias.data = self.norm.bias + (bias - self.norm.running_mean) * s
            self.norm = nn.Identity()
        final_scale = 1
        if self.gamma is not None:
            final_scale = self.gamma.data
            self.gamma = None
        grn = self.act[1]
        if grn.use_bias and len(self.pwconv2) == 3:
            grn_bias = grn.beta.data.flatten()
            grn.__delattr__("beta")
            grn.use_bias = False
            linear, bn = self.pwconv2[0], self.pwconv2[2]
            std = (bn.running_var + bn.eps).sqrt()
            s = bn.weight / std
            new = nn.Linear(linear.in_features, linear.out_features, bias=True).to(linear.weight)
            new.weight.data = linear.weight * (s * final_scale).view(-1, 1)
            lin_b = (linear.bias.data if linear.bias is not None else 0) + linear.weight.data @ grn_bias
            new.bias.data = (bn.bias + (lin_b - bn.running_mean) * s) * final_scale
            self.pwconv2 = nn.Sequential(new, self.pwconv2[1])


class UniRepLKNet(_StagedBackbone):
    """Stem (two 3x3 stride-2 convs with LayerNorm/GELU), 3x3 stride-2 downsampling + LayerNorm,
    stages of UniRepLKNetBlock (3x3 plain, 13x13 dilated re-param blocks)."""

    def __init__(self, depths=(1, 1, 3, 1), dims=(8, 16, 24, 32), kernel_sizes=((3,), (13,), (13, 3, 13), (11,)),
                 use_sync_bn=False, use_lkconv=False, in_chans=3, num_classes=10):
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, dims[0] // 2, 3, 2, 1), LayerNormCF(dims[0] // 2, data_format="channels_first"),
            nn.GELU(), nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1), LayerNormCF(dims[0], data_format="channels_first"))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 3, 2, 1),
                                                        LayerNormCF(dims[i + 1], data_format="channels_first")))
        self.stages = nn.ModuleList(
            nn.Sequential(*[UniRepLKNetBlock(dims[i], kernel_sizes[i][j], use_sync_bn=use_sync_bn,
                                             use_lkconv=use_lkconv) for j in range(depths[i])]) for i in range(4))
        self._add_head(dims[-1], num_classes)

    def reparameterize_unireplknet(self):
        for m in self.modules():
            if hasattr(m, "reparameterize"):
                m.reparameterize()
