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

from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.modules import LargeKernelConv2d
from ..reparam import ReparamModule
from .replknet import DropPath

__all__ = ["DilatedReparamBlock", "UniRepLKNetBlock", "GRN", "SEBlock", "dilated_to_dense",
           "DILATED_BRANCHES"]

#: kernel size -> (small kernel sizes, dilation rates) of the parallel branches (the paper's choice)
DILATED_BRANCHES: Dict[int, Tuple[List[int], List[int]]] = {
    17: ([5, 9, 3, 3, 3], [1, 2, 4, 5, 7]),
    15: ([5, 7, 3, 3, 3], [1, 2, 3, 5, 7]),
    13: ([5, 7, 3, 3, 3], [1, 2, 3, 4, 5]),
    11: ([5, 5, 3, 3, 3], [1, 2, 3, 4, 5]),
    9: ([5, 5, 3, 3], [1, 2, 3, 4]),
    7: ([5, 3, 3], [1, 2, 3]),
    5: ([3, 3], [1, 2]),
}


def _fuse_bn(weight: torch.Tensor, bias, bn: nn.BatchNorm2d):
    std = (bn.running_var + bn.eps).sqrt()
    t = bn.weight / std
    b = bn.bias - bn.running_mean * t
    if bias is not None:
        b = b + bias * t
    return weight * t.reshape(-1, 1, 1, 1), b


def dilated_to_dense(kernel: torch.Tensor, dilation: int) -> torch.Tensor:
    """(C, 1, k, k) kernel with dilation r -> the equivalent dense (C, 1, r(k-1)+1, r(k-1)+1) kernel."""
    if dilation == 1:
        return kernel
    c, one, kh, kw = kernel.shape
    dense = kernel.new_zeros(c, one, dilation * (kh - 1) + 1, dilation * (kw - 1) + 1)
    dense[:, :, ::dilation, ::dilation] = kernel
    return dense


class DilatedReparamBlock(ReparamModule):
    """Depthwise ``kernel_size`` conv + BN, plus dilated small-kernel branches (each conv + BN).

    Args:
        channels: input = output channels.
        kernel_size: one of 5, 7, 9, 11, 13, 15, 17 (the branch layout of :data:`DILATED_BRANCHES`).
        deploy: build the merged structure directly (one depthwise conv with bias).
        backend: lkconv backend of the large-kernel convolution (None: default).
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False, backend=None):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"DilatedReparamBlock: channels must be a positive int, got {channels!r}")
        if kernel_size not in DILATED_BRANCHES:
            raise ValueError(f"DilatedReparamBlock: kernel_size must be one of {sorted(DILATED_BRANCHES)}, "
                             f"got {kernel_size!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.kernel_sizes, self.dilates = (list(v) for v in DILATED_BRANCHES[kernel_size])
        self.deployed = bool(deploy)
        self.backend = backend
        self.lk_origin = LargeKernelConv2d(channels, channels, kernel_size, 1, kernel_size // 2, 1, channels,
                                           bias=self.deployed, backend=backend)
        if not self.deployed:
            self.origin_bn = nn.BatchNorm2d(channels)
            for k, r in zip(self.kernel_sizes, self.dilates):
                setattr(self, f"dil_conv_k{k}_{r}",
                        nn.Conv2d(channels, channels, k, 1, (r * (k - 1) + 1) // 2, r, channels, bias=False))
                setattr(self, f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    def forward(self, x):
        if self.deployed:
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for k, r in zip(self.kernel_sizes, self.dilates):
            out = out + getattr(self, f"dil_bn_k{k}_{r}")(getattr(self, f"dil_conv_k{k}_{r}")(x))
        return out

    @torch.no_grad()
    def get_equivalent_kernel_bias(self):
        """The (C, 1, K, K) kernel and (C,) bias of the merged convolution (eval-mode BN statistics)."""
        if self.deployed:
            return self.lk_origin.weight.detach().clone(), self.lk_origin.bias.detach().clone()
        k, b = _fuse_bn(self.lk_origin.weight, None, self.origin_bn)
        for ks, r in zip(self.kernel_sizes, self.dilates):
            kk, bb = _fuse_bn(getattr(self, f"dil_conv_k{ks}_{r}").weight, None, getattr(self, f"dil_bn_k{ks}_{r}"))
            dense = dilated_to_dense(kk, r)
            p = (self.kernel_size - dense.shape[-1]) // 2
            k = k + F.pad(dense, [p, p, p, p])
            b = b + bb
        return k, b

    @torch.no_grad()
    def reparameterize(self) -> "DilatedReparamBlock":
        """Install the merged form (in place): one depthwise conv with bias.  Returns self."""
        if self.deployed:
            return self
        k, b = self.get_equivalent_kernel_bias()
        old = self.lk_origin
        new = LargeKernelConv2d(self.channels, self.channels, self.kernel_size, 1, self.kernel_size // 2, 1,
                                self.channels, bias=True, backend=self.backend, device=k.device, dtype=k.dtype)
        new.weight.copy_(k)
        new.bias.copy_(b)
        self.lk_origin = new
        del self.origin_bn
        for ks, r in zip(self.kernel_sizes, self.dilates):
            delattr(self, f"dil_conv_k{ks}_{r}")
            delattr(self, f"dil_bn_k{ks}_{r}")
        self.deployed = True
        return self

    merge_dilated_branches = reparameterize

    def extra_repr(self):
        return f"channels={self.channels}, kernel_size={self.kernel_size}, deployed={self.deployed}"


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
            w, b = _fuse_bn(conv.weight, conv.bias, self.norm)
            conv.weight.copy_(w)
            conv.bias.copy_(b)
            self.norm = nn.Identity()
        return self
