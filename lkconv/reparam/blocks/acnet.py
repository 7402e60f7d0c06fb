"""ACNet's asymmetric convolution block: KxK + 1xK + Kx1 (each with BN) -> one KxK conv."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .. import transforms as T
from .common import ReparamModule, conv_from_kernel, make_conv

__all__ = ["ACBlock"]


def _odd(k, name="kernel_size"):
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k % 2 == 0:
        raise ValueError(f"{name} must be an odd positive int, got {k!r}")
    return k


class ACBlock(ReparamModule):
    """Asymmetric Convolution Block (ACNet).  Training form: ``square_conv``/``square_bn`` (KxK),
    ``ver_conv``/``ver_bn`` (Kx1), ``hor_conv``/``hor_bn`` (1xK), outputs summed.  Deploy form:
    ``fused_conv`` (KxK with bias).  ``padding`` >= K//2 (default K//2); odd K."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride=1, padding=None,
                 groups: int = 1, deploy: bool = False):
        super().__init__()
        K = _odd(kernel_size)
        p = K // 2 if padding is None else padding
        if not isinstance(p, int) or p < K // 2:
            raise ValueError(f"padding must be an int >= kernel_size // 2 = {K // 2}, got {padding!r}")
        off = p - K // 2
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, K
        self.stride, self.padding, self.groups = stride, p, groups
        self.deployed = bool(deploy)
        if self.deployed:
            self.fused_conv = make_conv(in_channels, out_channels, K, stride, p, 1, groups, True)
        else:
            self.square_conv = make_conv(in_channels, out_channels, K, stride, p, 1, groups, False)
            self.square_bn = nn.BatchNorm2d(out_channels)
            self.ver_conv = nn.Conv2d(in_channels, out_channels, (K, 1), stride, (p, off), 1, groups, False)
            self.ver_bn = nn.BatchNorm2d(out_channels)
            self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, K), stride, (off, p), 1, groups, False)
            self.hor_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.fused_conv(x)
        return (self.square_bn(self.square_conv(x)) + self.ver_bn(self.ver_conv(x))
                + self.hor_bn(self.hor_conv(x)))

    @torch.no_grad()
    def get_equivalent_kernel_bias(self):
        if self.deployed:
            return self.fused_conv.weight.detach().clone(), self.fused_conv.bias.detach().clone()
        K = self.kernel_size
        ks, bs = T.fuse_conv_bn(self.square_conv.weight, None, self.square_bn)
        kv, bv = T.fuse_conv_bn(self.ver_conv.weight, None, self.ver_bn)
        kh, bh = T.fuse_conv_bn(self.hor_conv.weight, None, self.hor_bn)
        return T.add_branches([ks, T.pad_kernel(kv, K), T.pad_kernel(kh, K)], [bs, bv, bh])

    @torch.no_grad()
    def reparameterize(self) -> "ACBlock":
        if self.deployed:
            return self
        k, b = self.get_equivalent_kernel_bias()
        self.fused_conv = conv_from_kernel(k, b, self.stride, self.padding, 1, self.groups, like=self.square_conv)
        for n in ("square_conv", "square_bn", "ver_conv", "ver_bn", "hor_conv", "hor_bn"):
            delattr(self, n)
        self.deployed = True
        return self
