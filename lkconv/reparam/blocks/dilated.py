"""UniRepLKNet's dilated re-param block: a large depthwise conv + parallel dilated small depthwise
convs (each with BN) -> one large depthwise conv (on lkconv)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .. import transforms as T
from .common import ReparamModule, conv_from_kernel, make_conv

__all__ = ["DilatedReparamBlock", "DILATED_BRANCHES"]

#: UniRepLKNet's default branches per large kernel size: (kernel_sizes, dilations)
DILATED_BRANCHES = {
    17: ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7)),
    15: ((5, 7, 3, 3, 3), (1, 2, 3, 5, 7)),
    13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)),
    11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
    7: ((5, 3, 3), (1, 2, 3)),
    5: ((3, 3), (1, 2)),
}


class DilatedReparamBlock(ReparamModule):
    """Depthwise large kernel ``lk_origin`` + ``origin_bn`` and parallel dilated depthwise
    ``dil_conv_k{k}_{r}`` + ``dil_bn_k{k}_{r}`` (UniRepLKNet names).  Deploy form: ``lk_origin`` is a
    LargeKernelConv2d with bias (the BN and the dilated branches are gone).

    Args:
        channels: C (depthwise).
        kernel_size: odd large kernel K.
        kernel_sizes, dilations: the parallel branches; default :data:`DILATED_BRANCHES` [K]
            (needed when K is not in that table).  Each (k - 1) * r + 1 must be odd and <= K.
        deploy: construct in the deploy form.  backend: lkconv backend for the large conv.
    """

    def __init__(self, channels: int, kernel_size: int, kernel_sizes: Optional[Sequence[int]] = None,
                 dilations: Optional[Sequence[int]] = None, deploy: bool = False, *, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
        if (kernel_sizes is None) != (dilations is None):
            raise ValueError("give both kernel_sizes and dilations, or neither")
        if kernel_sizes is None:
            if kernel_size not in DILATED_BRANCHES:
                raise ValueError(f"no default dilated branches for kernel_size={kernel_size} (known: "
                                 f"{sorted(DILATED_BRANCHES)}); pass kernel_sizes= and dilations=")
            kernel_sizes, dilations = DILATED_BRANCHES[kernel_size]
        kernel_sizes, dilations = tuple(kernel_sizes), tuple(dilations)
        if len(kernel_sizes) != len(dilations):
            raise ValueError(f"kernel_sizes {kernel_sizes} and dilations {dilations} differ in length")
        for k, r in zip(kernel_sizes, dilations):
            eff = (k - 1) * r + 1
            if k < 1 or r < 1 or eff % 2 == 0 or eff > kernel_size:
                raise ValueError(f"branch k={k}, dilation={r}: equivalent size {eff} must be odd and <= {kernel_size}")
        self.channels, self.kernel_size = channels, kernel_size
        self.kernel_sizes, self.dilates = kernel_sizes, dilations
        self.backend = backend
        self.deployed = bool(deploy)
        self.lk_origin = make_conv(channels, channels, kernel_size, 1, kernel_size // 2, 1, channels, self.deployed)
        self.lk_origin.backend = backend
        if not self.deployed:
            self.origin_bn = nn.BatchNorm2d(channels)
            for k, r in zip(kernel_sizes, dilations):
                self.__setattr__(f"dil_conv_k{k}_{r}", nn.Conv2d(channels, channels, k, 1, (r * (k - 1) + 1) // 2, r,
                                                                 channels, False))
                self.__setattr__(f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for k, r in zip(self.kernel_sizes, self.dilates):
            out = out + getattr(self, f"dil_bn_k{k}_{r}")(getattr(self, f"dil_conv_k{k}_{r}")(x))
        return out

    @torch.no_grad()
    def get_equivalent_kernel_bias(self):
        if self.deployed:
            return self.lk_origin.weight.detach().clone(), self.lk_origin.bias.detach().clone()
        ks, bs = [], []
        k0, b0 = T.fuse_conv_bn(self.lk_origin.weight, None, self.origin_bn)
        ks.append(k0)
        bs.append(b0)
        for k, r in zip(self.kernel_sizes, self.dilates):
            kk, bb = T.fuse_conv_bn(getattr(self, f"dil_conv_k{k}_{r}").weight, None, getattr(self, f"dil_bn_k{k}_{r}"))
            ks.append(T.pad_kernel(T.dilated_to_dense(kk, r), self.kernel_size))
            bs.append(bb)
        return T.add_branches(ks, bs)

    @torch.no_grad()
    def reparameterize(self) -> "DilatedReparamBlock":
        if self.deployed:
            return self
        k, b = self.get_equivalent_kernel_bias()
        self.lk_origin = conv_from_kernel(k, b, 1, self.kernel_size // 2, 1, self.channels, like=self.lk_origin)
        self.lk_origin.backend = self.backend
        del self.origin_bn
        for k, r in zip(self.kernel_sizes, self.dilates):
            delattr(self, f"dil_conv_k{k}_{r}")
            delattr(self, f"dil_bn_k{k}_{r}")
        self.deployed = True
        return self
