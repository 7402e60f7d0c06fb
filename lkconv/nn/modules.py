"""Modules: ``LargeKernelConv2d`` (an ``nn.Conv2d``, depthwise only) and
``DepthWiseConv2dImplicitGEMM`` (the original RepLKNet extension's API).

Both subclass ``nn.Conv2d``, so their ``state_dict`` keys (``weight``, ``bias``) and parameter
shapes are identical to the depthwise ``nn.Conv2d`` they replace: a checkpoint loads either way.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch.nn as nn
import torch.nn.functional as F

from ..functional import depthwise_conv2d

__all__ = ["LargeKernelConv2d", "DepthWiseConv2dImplicitGEMM"]


def _check_backend_name(backend):
    """Fail at construction, not at the first forward, on a misspelt backend name."""
    from ..backends import validate_backend_name

    validate_backend_name(backend)
    return backend


def _is_depthwise(in_channels: int, out_channels: int, groups: int) -> bool:
    """groups == in_channels and out_channels = m * in_channels (m >= 1)."""
    return groups == in_channels and in_channels > 0 and out_channels > 0 and out_channels % in_channels == 0


class LargeKernelConv2d(nn.Conv2d):
    """``nn.Conv2d`` with the same constructor, restricted to depthwise convolution
    (``groups == in_channels`` and ``out_channels = m * in_channels``, ``m >= 1`` the channel
    multiplier: output channel ``c*m + j`` reads input channel ``c``), computed by
    :func:`lkconv.depthwise_conv2d`.

    Extra keyword: ``backend`` ("auto" by default; any lkconv backend name).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        backend: Optional[str] = None,
    ):
        if not _is_depthwise(in_channels, out_channels, groups):
            raise ValueError(
                "lkconv.LargeKernelConv2d is depthwise only: it needs groups == in_channels and out_channels a "
                f"multiple of in_channels, got in_channels={in_channels}, out_channels={out_channels}, groups={groups}"
            )
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype,
        )
        self.backend = _check_backend_name(backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", backend={self.backend!r}" if self.backend is not None else "")

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        return depthwise_conv2d(input, weight, bias, self.stride, padding, self.dilation, backend=self.backend)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, backend: Optional[str] = None) -> "LargeKernelConv2d":
        """A LargeKernelConv2d with ``conv``'s configuration sharing its parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        # nn.Module.__init__ gave ``new`` its own state (hook dicts, parameter/buffer/module dicts,
        # training flag, ...): copy only the convolution's configuration on top of it, so that hooks
        # registered on one module never fire on the other
        fresh = set(new.__dict__)
        for k, v in conv.__dict__.items():
            if k not in fresh:
                new.__dict__[k] = copy.copy(v) if isinstance(v, (list, dict, set)) else v
        new.training = conv.training
        new._parameters.update(conv._parameters)  # the same Parameter objects: shared, not copied
        new._buffers.update(conv._buffers)
        new._non_persistent_buffers_set.update(conv._non_persistent_buffers_set)
        new._modules.update(conv._modules)
        new.backend = _check_backend_name(backend)
        if not _is_depthwise(new.in_channels, new.out_channels, new.groups):
            raise ValueError(f"lkconv: {conv} is not a depthwise convolution (groups == in_channels, "
                             "out_channels a multiple of in_channels)")
        return new


class DepthWiseConv2dImplicitGEMM(LargeKernelConv2d):
    """Drop-in for RepLKNet's ``DepthWiseConv2dImplicitGEMM(channels, kernel, bias=False)``.

    Like the original it keeps the spatial size ("same" padding).  Unlike the original its
    ``padding`` attribute tells the truth: ``kernel // 2`` for odd kernels, ``"same"`` (asymmetric,
    as ``F.conv2d``) for even ones.  ``state_dict``: ``weight`` (C, 1, K, K) and optional ``bias``.
    """

    def __init__(self, channels: int, kernel, bias: bool = False, *, backend: Optional[str] = None,
                 device=None, dtype=None):
        ks = nn.modules.utils._pair(kernel)
        if all(k % 2 == 1 for k in ks):
            padding = (ks[0] // 2, ks[1] // 2)
        else:
            padding = "same"
        super().__init__(channels, channels, ks, 1, padding, 1, channels, bias, "zeros", device, dtype,
                         backend=backend)
