"""Helpers for checking re-parameterization: random BN statistics, module/parameter counts."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

__all__ = ["randomize_bn", "count_modules", "count_parameters"]


@torch.no_grad()
def randomize_bn(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Give every BatchNorm in ``model`` random running mean/var and affine parameters (instead of
    the defaults 0/1/1/0, which would hide fusion bugs).  Returns ``model``."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) * 1.5 + 0.25)
            if m.weight is not None:
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * 0.5 + 1.0)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.5)
    return model


def count_modules(model: nn.Module) -> int:
    """Number of modules (including ``model``)."""
    return sum(1 for _ in model.modules())


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements."""
    return sum(p.numel() for p in model.parameters())
