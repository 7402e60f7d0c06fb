"""UniRepLKNet's dilated re-parameterized large-kernel block (Ding et al., "UniRepLKNet", CVPR 2024).

:class:`DilatedReparamBlock`: a large depthwise kernel + BN in parallel with several small dilated
depthwise kernels + BN; after training it re-parameterizes into *one* dense depthwise convolution
(an lkconv module) because a k x k kernel with dilation r equals a dense kernel of size r(k-1)+1 with
zeros between the taps.  State-dict names follow the original: ``lk_origin``, ``origin_bn``,
``dil_conv_k{k}_{r}``, ``dil_bn_k{k}_{r}``.

:class:`UniRepLKNetBlock`: the UniRepLKNet block around it (dwconv -> BN -> SE -> Linear expand ->
GELU -> GRN -> Linear reduce -> BN -> layer scale, residual with drop path).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..reparam import DILATED_BRANCHES, DilatedReparamBlock
from ..reparam.transforms import fuse_conv_bn
from .replknet import DropPath

__all__ = ["DilatedReparamBlock", "UniRepLKNetBlock", "GRN", "SEBlock", "DILATED_BRANCHES"]


class GRN(nn.Module):
    """Global response normalization (ConvNeXt V2) on channels-last (N, H, W, C) input."""

    def __init__(self, dim: int, use_bias: bool = True):
        super().__init__()
        self.use_bias = use_bias
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        if use_bias:
            self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        y = (self.gamma * nx + 1) * x
        return y + self.beta if self.use_bias else y


class SEBlock(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(up(relu(down(avgpool(x)))))."""

    def __init__(self, channels: int, internal: int):
        super().__init__()
        self.down = nn.Conv2d(channels, internal, 1, bias=True)
        self.up = nn.Conv2d(internal, channels, 1, bias=True)
        self.nonlinear = nn.ReLU(inplace=True)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.up(self.nonlinear(self.down(s)))
        return x * torch.sigmoid(s)


class _ToNHWC(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class _ToNCHW(nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


class UniRepLKNetBlock(nn.Module):
    """UniRepLKNet block: DilatedReparamBlock -> BN -> SE -> Linear(dim, ffn) -> GELU -> GRN ->
    Linear(ffn, dim) -> BN -> layer scale gamma, residual with drop path.

    ``reparameterize()`` merges the dilated branches and the following BN into one lkconv depthwise
    convolution (the FFN part stays as is).
    """

    def __init__(self, dim: int, kernel_size: int = 13, drop_path: float = 0.0,
                 layer_scale_init_value: float = 1e-6, ffn_factor: float = 4.0, backend=None):
        super().__init__()
        if kernel_size not in DILATED_BRANCHES:
            raise ValueError(f"UniRepLKNetBlock: kernel_size must be one of {sorted(DILATED_BRANCHES)}, "
                             f"got {kernel_size!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"UniRepLKNetBlock: dim must be a positive int, got {dim!r}")
        self.dwconv = DilatedReparamBlock(dim, kernel_size, deploy=False, backend=backend)
        self.norm = nn.BatchNorm2d(dim)
        self.se = SEBlock(dim, max(dim // 4, 1))
        ffn = int(ffn_factor * dim)
        self.pwconv1 = nn.Sequential(_ToNHWC(), nn.Linear(dim, ffn))
        self.act = nn.Sequential(nn.GELU(), GRN(ffn, use_bias=True))
        self.pwconv2 = nn.Sequential(nn.Linear(ffn, dim, bias=False), _ToNCHW(), nn.BatchNorm2d(dim))
        self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(dim))
                      if layer_scale_init_value is not None and layer_scale_init_value > 0 else None)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        y = self.se(self.norm(self.dwconv(x)))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma.view(1, -1, 1, 1) * y
        return x + self.drop_path(y)

    @torch.no_grad()
    def reparameterize(self) -> "UniRepLKNetBlock":
        self.dwconv.reparameterize()
        if isinstance(self.norm, nn.BatchNorm2d):
            conv = self.dwconv.lk_origin
            w, b = fuse_conv_bn(conv.weight, conv.bias, self.norm)
            conv.weight.copy_(w)
            conv.bias.copy_(b)
            self.norm = nn.Identity()
        return self
