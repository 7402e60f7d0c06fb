"""Diverse Branch Block (DBB): KxK, 1x1, 1x1->KxK and 1x1->avg-pool branches (each with BN)
-> one KxK conv.  Uses transforms I-VI."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import transforms as T
from .common import BNAndPad, ConvBN, ReparamModule, deploy_merged, make_conv

__all__ = ["DiverseBranchBlock", "IdentityBasedConv1x1"]


class IdentityBasedConv1x1(nn.Conv2d):
    """A 1x1 conv (groups allowed, in == out) whose effective kernel is ``weight + I`` with
    ``weight`` initialised to zero (DBB's ``idconv1``)."""

    def __init__(self, channels: int, groups: int = 1):
        super().__init__(channels, channels, 1, 1, 0, groups=groups, bias=False)
        if channels % groups:
            raise ValueError(f"groups={groups} must divide channels={channels}")
        self.register_buffer("id_tensor", T.identity_kernel(channels, 1, groups), persistent=False)
        nn.init.zeros_(self.weight)

    def get_actual_kernel(self) -> Tensor:
        return self.weight + self.id_tensor.to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.get_actual_kernel(), None, 1, 0, 1, self.groups)


class DiverseBranchBlock(ReparamModule):
    """DBB with the original attribute names:

    - ``dbb_origin``: KxK conv+BN (stride, padding K//2);
    - ``dbb_1x1``: 1x1 conv+BN (when groups < out_channels);
    - ``dbb_1x1_kxk``: ``idconv1`` (or ``conv1`` when internal != in), ``bn1`` (BNAndPad), ``conv2`` (KxK,
      no padding), ``bn2``;
    - ``dbb_avg``: ``conv`` (1x1), ``bn`` (BNAndPad), ``avg`` (AvgPool, no padding), ``avgbn`` — or, for
      depthwise (groups == out_channels == in_channels), ``avg`` with padding and ``avgbn``;
    - deploy form: ``dbb_reparam`` (KxK with bias).
    Odd K; padding must be K//2 (branch alignment).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride=1, padding=None,
                 groups: int = 1, internal_channels_1x1_3x3: Optional[int] = None, deploy: bool = False):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
        K = kernel_size
        p = K // 2 if padding is None else padding
        if p != K // 2:
            raise ValueError(f"DiverseBranchBlock needs padding == kernel_size // 2 = {K // 2}, got {padding!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, K
        self.stride, self.padding, self.groups = stride, p, groups
        self.deployed = bool(deploy)
        if self.deployed:
            self.dbb_reparam = make_conv(in_channels, out_channels, K, stride, p, 1, groups, True)
            return
        self.dbb_origin = ConvBN(in_channels, out_channels, K, stride, p, 1, groups)
        self.dbb_avg = nn.Sequential()
        if groups < out_channels:
            self.dbb_avg.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, 1, 0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPad(p, out_channels))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(K, stride, 0))
            self.dbb_1x1 = ConvBN(in_channels, out_channels, 1, stride, 0, 1, groups, large=False)
        else:
            if in_channels != out_channels:
                raise ValueError("DiverseBranchBlock with groups == out_channels needs in_channels == out_channels, "
                                 f"got {in_channels} != {out_channels}")
            self.dbb_avg.add_module("avg", nn.AvgPool2d(K, stride, p))
            self.dbb_1x1 = None
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels))
        internal = internal_channels_1x1_3x3
        if internal is None:
            internal = in_channels if groups < out_channels else 2 * in_channels
        if internal % groups:
            raise ValueError(f"internal_channels_1x1_3x3={internal} must be divisible by groups={groups}")
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == in_channels:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(in_channels, groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(in_channels, internal, 1, 1, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPad(p, internal))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal, out_channels, K, stride, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.dbb_reparam(x)
        out = self.dbb_origin(x) + self.dbb_avg(x) + self.dbb_1x1_kxk(x)
        if self.dbb_1x1 is not None:
            out = out + self.dbb_1x1(x)
        return out

    @torch.no_grad()
    def get_equivalent_kernel_bias(self):
        if self.deployed:
            return self.dbb_reparam.weight.detach().clone(), self.dbb_reparam.bias.detach().clone()
        K, g = self.kernel_size, self.groups
        k_origin, b_origin = self.dbb_origin.fuse()
        ks, bs = [k_origin], [b_origin]
        if self.dbb_1x1 is not None:
            k1, b1 = self.dbb_1x1.fuse()
            ks.append(T.pad_kernel(k1, K))
            bs.append(b1)
        seq = self.dbb_1x1_kxk
        first = seq.idconv1.get_actual_kernel() if hasattr(seq, "idconv1") else seq.conv1.weight
        k1, b1 = T.fuse_conv_bn(first, None, seq.bn1.bn)
        k2, b2 = T.fuse_conv_bn(seq.conv2.weight, None, seq.bn2)
        k, b = T.merge_1x1_kxk(k1, b1, k2, b2, groups=g)
        ks.append(k)
        bs.append(b)
        avg = T.avgpool_kernel(self.out_channels, K, g, dtype=k_origin.dtype, device=k_origin.device)
        ka, ba = T.fuse_conv_bn(avg, None, self.dbb_avg.avgbn)
        if hasattr(self.dbb_avg, "conv"):
            kc, bc = T.fuse_conv_bn(self.dbb_avg.conv.weight, None, self.dbb_avg.bn.bn)
            ka, ba = T.merge_1x1_kxk(kc, bc, ka, ba, groups=g)
        ks.append(ka)
        bs.append(ba)
        return T.add_branches(ks, bs)

    @torch.no_grad()
    def reparameterize(self) -> "DiverseBranchBlock":
        return deploy_merged(self, "dbb_reparam", "dbb_origin.conv",
                             ("dbb_origin", "dbb_avg", "dbb_1x1_kxk", "dbb_1x1"))
