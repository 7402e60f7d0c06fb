"""ResRep: a 1x1 compactor after conv(+BN), penalty-gradient training, pruning of compactor rows
(shrinking the following layer), and conv-BN-compactor fusion into one (narrower) conv."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch import Tensor

from .. import transforms as T
from .common import ReparamModule, conv_from_kernel

__all__ = ["ResRepBlock", "shrink_input_channels"]


class ResRepBlock(ReparamModule):
    """``compactor(bn(conv(x)))``: ``conv`` (no bias, any groups), ``bn`` (optional: ``with_bn``),
    ``compactor`` (1x1, out -> out, initialised to the identity so the block starts as conv+BN).

    Training (ResRep "gradient resetting"): after ``loss.backward()`` call
    :meth:`apply_penalty_gradient` (``G <- G * mask + lambda * F / ||F||`` per compactor row).
    :meth:`mask_smallest` picks the rows to push to zero (mask 0).  :meth:`prune` removes rows whose
    L2 norm is <= ``threshold`` (exact when they are zero, an approximation otherwise) and returns
    the kept indices, to shrink the next layer with :func:`shrink_input_channels`.
    :meth:`reparameterize` fuses conv-BN-compactor into ``fused`` (a conv with bias, as many
    output channels as compactor rows are left).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, with_bn: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels) if with_bn else None
        self.compactor = nn.Conv2d(out_channels, out_channels, 1, bias=False)
        with torch.no_grad():
            self.compactor.weight.copy_(T.identity_kernel(out_channels, 1, dtype=self.compactor.weight.dtype))
        self.register_buffer("mask", torch.ones(out_channels))
        self.deployed = False

    @property
    def out_channels(self) -> int:
        return (self.fused if self.deployed else self.compactor).weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.fused(x)
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        return self.compactor(y)

    # ---------------------------------------------------------------- training-time pruning
    def row_norms(self) -> Tensor:
        return T.compactor_row_norms(self.compactor.weight.detach())

    @torch.no_grad()
    def apply_penalty_gradient(self, lasso_strength: float) -> None:
        """ResRep gradient resetting on the compactor: ``G <- G * mask + lambda * F / ||F||_row``."""
        w = self.compactor.weight
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        norms = w.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        w.grad.mul_(self.mask.view(-1, 1, 1, 1).to(w.dtype)).add_(lasso_strength * w / norms)

    @torch.no_grad()
    def mask_smallest(self, n: int) -> Tensor:
        """Set mask 0 for the ``n`` rows with the smallest norm (the rows to be pruned); returns their indices."""
        if not isinstance(n, int) or n < 0 or n > self.compactor.weight.shape[0]:
            raise ValueError(f"n must be an int in [0, {self.compactor.weight.shape[0]}], got {n!r}")
        idx = torch.argsort(self.row_norms())[:n]
        self.mask.fill_(1.0)
        self.mask[idx] = 0.0
        return idx

    @torch.no_grad()
    def zero_rows(self, threshold: float) -> Tensor:
        """Zero (without removing) the compactor rows with norm <= threshold; returns their indices."""
        idx = torch.nonzero(self.row_norms() <= threshold).flatten()
        self.compactor.weight[idx] = 0
        return idx

    @torch.no_grad()
    def prune(self, threshold: float) -> Tensor:
        """Remove the compactor rows with L2 norm <= ``threshold`` (the block's output channels
        shrink).  Returns the indices of the kept output channels (at least one is always kept)."""
        if self.deployed:
            raise RuntimeError("ResRepBlock.prune: the block is already re-parameterized")
        norms = self.row_norms()
        keep = torch.nonzero(norms > threshold).flatten()
        if keep.numel() == 0:
            keep = torch.argmax(norms).view(1)
        w = self.compactor.weight.detach()[keep].clone()
        new = nn.Conv2d(w.shape[1], w.shape[0], 1, bias=False).to(device=w.device, dtype=w.dtype)
        new.weight.copy_(w)
        self.compactor = new
        self.mask = self.mask[keep].clone()
        return keep

    @torch.no_grad()
    def get_equivalent_kernel_bias(self):
        if self.deployed:
            return self.fused.weight.detach().clone(), self.fused.bias.detach().clone()
        if self.bn is not None:
            k, b = T.fuse_conv_bn(self.conv.weight, None, self.bn)
        else:
            k, b = self.conv.weight, None
        return T.fuse_compactor(k, b, self.compactor.weight, None, groups=self.conv.groups)

    @torch.no_grad()
    def reparameterize(self) -> "ResRepBlock":
        if self.deployed:
            return self
        k, b = self.get_equivalent_kernel_bias()
        c = self.conv
        self.fused = conv_from_kernel(k, b, c.stride, c.padding, c.dilation, 1, large=False)
        del self.conv, self.bn, self.compactor
        self.deployed = True
        return self


@torch.no_grad()
def shrink_input_channels(layer: nn.Module, keep: Tensor) -> nn.Module:
    """A copy of ``layer`` that reads only the input channels ``keep`` (after a pruned
    :class:`ResRepBlock`): ``nn.Conv2d`` with groups 1 or depthwise, ``nn.BatchNorm2d``, ``nn.Linear``,
    or a :class:`ResRepBlock` (its conv).  Exact when the dropped channels are zero."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    if isinstance(layer, ResRepBlock):
        if layer.deployed:
            layer.fused = shrink_input_channels(layer.fused, keep)
        else:
            if layer.conv.groups != 1:
                raise ValueError("shrink_input_channels: a ResRepBlock with a grouped conv cannot drop input channels")
            layer.conv = shrink_input_channels(layer.conv, keep)
        return layer
    if isinstance(layer, nn.Conv2d):
        if layer.groups == 1:
            new = copy.deepcopy(layer)
            new.weight = nn.Parameter(layer.weight.detach()[:, keep].clone(), layer.weight.requires_grad)
            new.in_channels = int(keep.numel())
            return new
        if layer.groups == layer.in_channels == layer.out_channels:
            conv = nn.Conv2d(int(keep.numel()), int(keep.numel()), layer.kernel_size, layer.stride, layer.padding,
                             layer.dilation, int(keep.numel()), layer.bias is not None, layer.padding_mode)
            conv = conv.to(device=layer.weight.device, dtype=layer.weight.dtype)
            conv.weight.copy_(layer.weight[keep])
            if layer.bias is not None:
                conv.bias.copy_(layer.bias[keep])
            return conv
        raise ValueError(f"shrink_input_channels: cannot shrink a grouped conv ({layer})")
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        bn = type(layer)(int(keep.numel()), layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
        bn = bn.to(device=keep.device if layer.weight is None else layer.weight.device)
        if layer.affine:
            bn = bn.to(layer.weight.dtype)
            bn.weight.copy_(layer.weight[keep])
            bn.bias.copy_(layer.bias[keep])
        if layer.running_mean is not None:
            bn.running_mean = layer.running_mean[keep].clone()
            bn.running_var = layer.running_var[keep].clone()
            bn.num_batches_tracked = layer.num_batches_tracked.clone()
        bn.train(layer.training)
        return bn
    if isinstance(layer, nn.Linear):
        lin = nn.Linear(int(keep.numel()), layer.out_features, layer.bias is not None)
        lin = lin.to(device=layer.weight.device, dtype=layer.weight.dtype)
        lin.weight.copy_(layer.weight[:, keep])
        if layer.bias is not None:
            lin.bias.copy_(layer.bias)
        return lin
    raise TypeError(f"shrink_input_channels: unsupported layer type {type(layer).__name__}")
