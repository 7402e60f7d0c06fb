"""RepVGG block: 3x3 conv+BN, 1x1 conv+BN and an identity BN -> one 3x3 conv (+ activation)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .. import transforms as T
from .common import ConvBN, ReparamModule, deploy_merged, make_conv

__all__ = ["RepVGGBlock"]


class RepVGGBlock(ReparamModule):
    """RepVGG block with the original attribute names: ``rbr_dense`` (KxK conv+BN), ``rbr_1x1``
    (1x1 conv+BN), ``rbr_identity`` (BN, present when in == out and stride 1), ``nonlinearity``;
    deploy form ``rbr_reparam`` (KxK with bias).  ``forward = act(sum of branches)``.

    Args: in_channels, out_channels, kernel_size (odd, default 3), stride, padding (default K//2),
    groups, act (module applied after the sum; default ReLU, None for identity), deploy.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride=1, padding=None,
                 groups: int = 1, act: Optional[nn.Module] = "relu", deploy: bool = False):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
        K = kernel_size
        p = K // 2 if padding is None else padding
        if p != K // 2:
            raise ValueError(f"RepVGGBlock needs padding == kernel_size // 2 = {K // 2} (branch alignment), got {p!r}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, K
        self.stride, self.padding, self.groups = stride, p, groups
        self.nonlinearity = nn.ReLU() if act == "relu" else (nn.Identity() if act is None else act)
        self.deployed = bool(deploy)
        if self.deployed:
            self.rbr_reparam = make_conv(in_channels, out_channels, K, stride, p, 1, groups, True)
        else:
            has_id = out_channels == in_channels and stride == 1
            self.rbr_identity = nn.BatchNorm2d(in_channels) if has_id else None
            self.rbr_dense = ConvBN(in_channels, out_channels, K, stride, p, 1, groups)
            self.rbr_1x1 = ConvBN(in_channels, out_channels, 1, stride, p - K // 2, 1, groups, large=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.nonlinearity(self.rbr_reparam(x))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.nonlinearity(out)

    @torch.no_grad()
    def get_equivalent_kernel_bias(self):
        if self.deployed:
            return self.rbr_reparam.weight.detach().clone(), self.rbr_reparam.bias.detach().clone()
        K = self.kernel_size
        k3, b3 = self.rbr_dense.fuse()
        k1, b1 = self.rbr_1x1.fuse()
        ks, bs = [k3, T.pad_kernel(k1, K)], [b3, b1]
        if self.rbr_identity is not None:
            idk = T.identity_kernel(self.in_channels, K, self.groups, dtype=k3.dtype, device=k3.device)
            ki, bi = T.fuse_conv_bn(idk, None, self.rbr_identity)
            ks.append(ki)
            bs.append(bi)
        return T.add_branches(ks, bs)

    @torch.no_grad()
    def reparameterize(self) -> "RepVGGBlock":
        return deploy_merged(self, "rbr_reparam", "rbr_dense.conv", ("rbr_dense", "rbr_1x1", "rbr_identity"))
