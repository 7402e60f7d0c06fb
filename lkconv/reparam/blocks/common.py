"""Building blocks shared by the re-parameterizable blocks: conv+BN, BN-and-pad, the base class."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...nn import LargeKernelConv2d
from .. import transforms as T

__all__ = ["ConvBN", "BNAndPad", "ReparamModule", "make_conv", "conv_from_kernel", "is_depthwise"]


def is_depthwise(in_channels: int, out_channels: int, groups: int) -> bool:
    """groups == in_channels and out_channels = m * in_channels (channel multiplier m >= 1)."""
    return groups == in_channels and in_channels > 0 and out_channels > 0 and out_channels % in_channels == 0


def make_conv(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
              bias=False, large=True) -> nn.Conv2d:
    """A depthwise conv as :class:`lkconv.nn.LargeKernelConv2d` (when ``large``), otherwise ``nn.Conv2d``.
    Both have the same state_dict keys."""
    if large and is_depthwise(in_channels, out_channels, groups):
        return LargeKernelConv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)


@torch.no_grad()
def conv_from_kernel(kernel: Tensor, bias: Optional[Tensor], stride=1, padding=0, dilation=1, groups=1,
                     large=True, like: Optional[nn.Conv2d] = None) -> nn.Conv2d:
    """The deploy conv holding ``(kernel, bias)``: LargeKernelConv2d when depthwise and ``large``
    (keeping ``like``'s backend if ``like`` is a LargeKernelConv2d), else ``nn.Conv2d``."""
    out_c, in_per_group, kh, kw = kernel.shape
    conv = make_conv(in_per_group * groups, out_c, (kh, kw), stride, padding, dilation, groups,
                     bias is not None, large)
    if isinstance(conv, LargeKernelConv2d) and isinstance(like, LargeKernelConv2d):
        conv.backend = like.backend
    conv = conv.to(device=kernel.device, dtype=kernel.dtype)
    conv.weight.copy_(kernel)
    if bias is not None:
        conv.bias.copy_(bias)
    return conv


class ConvBN(nn.Sequential):
    """conv (no bias) followed by BatchNorm2d; submodules ``conv`` and ``bn`` (the original
    RepLKNet/RepVGG/DBB ``conv_bn`` layout, so their checkpoints load)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 large=True):
        super().__init__()
        self.add_module("conv", make_conv(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                          groups, False, large))
        self.add_module("bn", nn.BatchNorm2d(out_channels))

    @torch.no_grad()
    def fuse(self) -> Tuple[Tensor, Tensor]:
        """(kernel, bias) of the single equivalent conv (eval-mode BN)."""
        return T.fuse_conv_bn(self.conv.weight, self.conv.bias, self.bn)


class BNAndPad(nn.Module):
    """BatchNorm followed by padding with the value BN gives a zero input (``beta - mean*gamma/std``):
    in eval mode this equals zero-padding *before* the BN, which is what makes the 1x1 -> KxK merge
    (:func:`~lkconv.reparam.transforms.merge_1x1_kxk`) exact at the borders.  Submodule ``bn``."""

    def __init__(self, pad_pixels: int, num_features: int, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True):
        super().__init__()
        if not isinstance(pad_pixels, int) or pad_pixels < 0:
            raise ValueError(f"pad_pixels must be a non-negative int, got {pad_pixels!r}")
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        self.pad_pixels = pad_pixels

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(x)
        p = self.pad_pixels
        if p > 0:
            bn = self.bn
            if bn.training or bn.running_mean is None:
                # batch statistics: the padding value is BN(0) under the current batch stats
                mean = x.mean(dim=(0, 2, 3)) if x.numel() else torch.zeros_like(bn.running_mean)
                var = x.var(dim=(0, 2, 3), unbiased=False) if x.numel() else torch.ones_like(bn.running_var)
            else:
                mean, var = bn.running_mean, bn.running_var
            scale = torch.rsqrt(var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            pad_values = -mean * scale
            if bn.bias is not None:
                pad_values = pad_values + bn.bias
            pad_values = pad_values.to(out.dtype).view(1, -1, 1, 1)
            padded = F.pad(out, [p, p, p, p])
            # border = pad value, interior = out (mask form: export/compile friendly, no in-place writes)
            mask = F.pad(torch.ones_like(out[:1, :1]), [p, p, p, p])
            out = padded * mask + pad_values * (1 - mask)
        return out

    def extra_repr(self) -> str:
        return f"pad_pixels={self.pad_pixels}"


class ReparamModule(nn.Module):
    """Base class of lkconv's re-parameterizable blocks.

    ``deployed`` tells the form; :meth:`reparameterize` switches (in place, idempotently) to the
    deploy form and returns ``self``; :meth:`get_equivalent_kernel_bias` gives the deploy
    parameters without changing anything.  ``switch_to_deploy`` is an alias (the name used by the
    original RepVGG/DBB code).
    """

    deployed: bool = False

    def get_equivalent_kernel_bias(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def reparameterize(self) -> "ReparamModule":  # pragma: no cover - abstract
        raise NotImplementedError

    def switch_to_deploy(self) -> "ReparamModule":
        return self.reparameterize()


def deploy_merged(block, attr: str, like: str, drop) -> nn.Module:
    """The usual ``reparameterize()``: install ``block.get_equivalent_kernel_bias()`` as the conv
    ``attr`` (stride, padding and groups of the block; ``like``: the attribute path of the conv whose
    type and backend it keeps) and delete the training branches ``drop``.  Idempotent; returns block."""
    if block.deployed:
        return block
    k, b = block.get_equivalent_kernel_bias()
    ref = block
    for part in like.split("."):
        ref = ref[part] if isinstance(ref, nn.ModuleDict) else getattr(ref, part)
    setattr(block, attr, conv_from_kernel(k, b, block.stride, block.padding, 1, block.groups, like=ref))
    for name in drop:
        delattr(block, name)
    block.deployed = True
    return block
