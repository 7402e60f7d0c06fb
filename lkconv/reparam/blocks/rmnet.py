"""RMNet: a ResNet basic block turned into a plain conv-ReLU-conv(-ReLU) block by carrying the
input through extra identity channels (exact for non-negative inputs)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import transforms as T
from .common import ReparamModule, conv_from_kernel

__all__ = ["RMBlock"]


class RMBlock(ReparamModule):
    """ResNet basic block ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with
    ``conv1`` (KxK, stride), ``bn1``, ``conv2`` (KxK), ``bn2`` and ``shortcut`` (empty for the identity,
    or ``shortcut.conv`` 1x1 with stride + ``shortcut.bn`` when stride != 1 or in != out).

    :meth:`reparameterize` installs ``conv1`` (in -> planes + in, with identity kernels for the extra
    channels), ReLU, ``conv2`` (planes + in -> planes, the shortcut folded in), ReLU: a plain block,
    **exact for non-negative inputs** (the output of a preceding ReLU), as RMNet requires.  For
    other inputs the deployed block computes something else, so only use it after a ReLU.
    """

    #: lkconv.reparameterize checks the deployed block on non-negative probe inputs
    exact_for_nonnegative_input = True

    def __init__(self, in_planes: int, planes: int, stride: int = 1, kernel_size: int = 3):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size % 2 == 0 or kernel_size < 1:
            raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
        K, p = kernel_size, kernel_size // 2
        self.in_planes, self.planes, self.stride, self.kernel_size = in_planes, planes, stride, K
        self.conv1 = nn.Conv2d(in_planes, planes, K, stride, p, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, K, 1, p, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut.add_module("conv", nn.Conv2d(in_planes, planes, 1, stride, bias=False))
            self.shortcut.add_module("bn", nn.BatchNorm2d(planes))
        self.deployed = False

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return F.relu(self.conv2(F.relu(self.conv1(x))))
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))

    @torch.no_grad()
    def get_equivalent_kernel_bias(self):
        """((k1', b1'), (k2', b2')) of the plain block."""
        if self.deployed:
            return ((self.conv1.weight.detach().clone(), self.conv1.bias.detach().clone()),
                    (self.conv2.weight.detach().clone(), self.conv2.bias.detach().clone()))
        k1, b1 = T.fuse_conv_bn(self.conv1.weight, None, self.bn1)
        k2, b2 = T.fuse_conv_bn(self.conv2.weight, None, self.bn2)
        sc = None
        if len(self.shortcut):
            sc = T.fuse_conv_bn(self.shortcut.conv.weight, None, self.shortcut.bn)
        return T.resblock_to_plain(k1, b1, k2, b2, sc)

    @torch.no_grad()
    def reparameterize(self) -> "RMBlock":
        if self.deployed:
            return self
        (k1, b1), (k2, b2) = self.get_equivalent_kernel_bias()
        p = self.kernel_size // 2
        self.conv1 = conv_from_kernel(k1, b1, self.stride, p, 1, 1, large=False)
        self.conv2 = conv_from_kernel(k2, b2, 1, p, 1, 1, large=False)
        del self.bn1, self.bn2, self.shortcut
        self.deployed = True
        return self
