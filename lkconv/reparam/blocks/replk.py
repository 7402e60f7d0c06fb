"""RepLKNet's ``ReparamLargeKernelConv``: a large conv+BN with a parallel small conv+BN, merged
into one large conv with bias for deployment.  The large depthwise conv runs on lkconv."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import transforms as T
from .common import ConvBN, ReparamModule, conv_from_kernel, make_conv

__all__ = ["ReparamLargeKernelConv"]


def _size(v, name):
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) and i >= 1 for i in v):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {v!r}")


class ReparamLargeKernelConv(ReparamModule):
    """RepLKNet's re-parameterizable large-kernel conv, with the original attribute names so
    original checkpoints load:

    - training form: ``lkb_origin`` (``.conv`` without bias, ``.bn``) and, if ``small_kernel`` is
      not None, ``small_conv`` (``.conv``, ``.bn``); output = sum of both (eval-mode BN);
    - deploy form (``small_kernel_merged=True`` or after :meth:`reparameterize`): ``lkb_reparam``,
      one conv with bias.

    Padding is ``kernel_size // 2`` (``small_kernel // 2`` for the small branch), so the two
    branches are aligned when ``kernel_size - small_kernel`` is even (checked).  Depthwise convs
    (``groups == in_channels``, ``out_channels = m * in_channels``, channel multiplier ``m >= 1``) are
    :class:`lkconv.nn.LargeKernelConv2d`, others
    ``nn.Conv2d``; the small branch is always ``nn.Conv2d``.

    Args:
        in_channels, out_channels, kernel_size, stride, groups: as ``nn.Conv2d``.
        small_kernel: size of the parallel small kernel, or None for no small branch.
        small_kernel_merged: construct directly in the deploy form.
        backend: lkconv backend for the large depthwise conv (None: lkconv's default).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, groups: int = 1,
                 small_kernel=None, small_kernel_merged: bool = False, *, backend: Optional[str] = None):
        super().__init__()
        ks = _size(kernel_size, "kernel_size")
        _size(stride, "stride")
        if small_kernel is not None:
            sk = _size(small_kernel, "small_kernel")
            if sk[0] > ks[0] or sk[1] > ks[1]:
                raise ValueError(f"small_kernel {small_kernel!r} must not exceed kernel_size {kernel_size!r}")
            if (ks[0] - sk[0]) % 2 or (ks[1] - sk[1]) % 2:
                raise ValueError(
                    f"small_kernel {small_kernel!r} cannot be centred in kernel_size {kernel_size!r}: "
                    "kernel_size - small_kernel must be even (the branches would not be aligned)"
                )
        if not isinstance(groups, int) or groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups!r} must be a positive int dividing in_channels={in_channels} "
                             f"and out_channels={out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.stride = stride
        self.groups = groups
        self.backend = backend
        padding = (ks[0] // 2, ks[1] // 2)
        self.padding = padding
        self.deployed = bool(small_kernel_merged)
        if self.deployed:
            self.lkb_reparam = make_conv(in_channels, out_channels, ks, stride, padding, 1, groups, True)
            self._set_backend(self.lkb_reparam)
        else:
            self.lkb_origin = ConvBN(in_channels, out_channels, ks, stride, padding, 1, groups)
            self._set_backend(self.lkb_origin.conv)
            if small_kernel is not None:
                sk = _size(small_kernel, "small_kernel")
                self.small_conv = ConvBN(in_channels, out_channels, sk, stride, (sk[0] // 2, sk[1] // 2), 1, groups,
                                         large=False)

    def _set_backend(self, conv):
        if hasattr(conv, "backend"):  # LargeKernelConv2d
            conv.backend = self.backend

    def forward(self, inputs: Tensor) -> Tensor:
        if self.deployed:
            return self.lkb_reparam(inputs)
        out = self.lkb_origin(inputs)
        if self.small_kernel is not None:
            out = out + self.small_conv(inputs)
        return out

    @torch.no_grad()
    def get_equivalent_kernel_bias(self):
        """(kernel, bias) of the merged large conv."""
        if self.deployed:
            return self.lkb_reparam.weight.detach().clone(), self.lkb_reparam.bias.detach().clone()
        eq_k, eq_b = self.lkb_origin.fuse()
        if self.small_kernel is not None:
            small_k, small_b = self.small_conv.fuse()
            eq_k = eq_k + T.pad_kernel(small_k, tuple(eq_k.shape[2:]))
            eq_b = eq_b + small_b
        return eq_k, eq_b

    @torch.no_grad()
    def reparameterize(self) -> "ReparamLargeKernelConv":
        """Install ``lkb_reparam`` (a LargeKernelConv2d with bias when depthwise) and delete the
        training branches.  Idempotent; returns self."""
        if self.deployed:
            return self
        k, b = self.get_equivalent_kernel_bias()
        self.lkb_reparam = conv_from_kernel(k, b, self.stride, self.padding, 1, self.groups,
                                            like=self.lkb_origin.conv)
        self._set_backend(self.lkb_reparam)
        del self.lkb_origin
        if self.small_kernel is not None:
            del self.small_conv
        self.deployed = True
        return self

    #: the original RepLKNet method name
    merge_kernel = reparameterize

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, small_kernel={self.small_kernel}, deployed={self.deployed}")
