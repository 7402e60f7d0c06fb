"""``lkconv.convert(model)``: swap eligible depthwise ``nn.Conv2d`` layers for lkconv modules."""
from __future__ import annotations

import copy
from typing import Optional

import torch.nn as nn

from .modules import LargeKernelConv2d, _check_backend_name, _is_depthwise

__all__ = ["convert", "is_eligible"]


def is_eligible(m: nn.Module, min_kernel: int = 1) -> bool:
    """A plain ``nn.Conv2d`` (not a subclass) that is depthwise (``groups == in_channels``, also with a
    channel multiplier: ``out_channels = m * in_channels``) with max(kernel) >= min_kernel."""
    return (
        type(m) is nn.Conv2d
        and _is_depthwise(m.in_channels, m.out_channels, m.groups)
        and max(m.kernel_size) >= min_kernel
    )


def convert(model: nn.Module, min_kernel: int = 5, inplace: bool = True, backend: Optional[str] = None) -> nn.Module:
    """Replace every eligible depthwise ``nn.Conv2d`` in ``model`` (channel multiplier included) by a
    :class:`~lkconv.nn.LargeKernelConv2d` that shares its parameters (weights preserved, outputs
    unchanged, ``state_dict`` keys unchanged).

    Args:
        model: any module (a bare ``nn.Conv2d`` is converted and returned as well).
        min_kernel: only layers whose largest kernel side is >= this are swapped (default 5: small
            depthwise kernels are already fast in cuDNN).
        inplace: modify ``model`` (default) or work on a deep copy.
        backend: backend for the new modules (None: lkconv's default, normally "auto").

    Returns:
        the converted model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lkconv.convert: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(min_kernel, int) or isinstance(min_kernel, bool) or min_kernel < 1:
        raise ValueError(f"lkconv.convert: min_kernel must be a positive int, got {min_kernel!r}")
    _check_backend_name(backend)
    if not inplace:
        model = copy.deepcopy(model)
    if is_eligible(model, min_kernel):
        return LargeKernelConv2d.from_conv2d(model, backend=backend)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_eligible(child, min_kernel):
                setattr(parent, name, LargeKernelConv2d.from_conv2d(child, backend=backend))
    return model
