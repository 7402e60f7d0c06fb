"""``reparameterize(model)``: turn a training-form model into its deploy form; ``to_plain(model)``:
lkconv modules back to ``nn.Conv2d`` (for export to runtimes that do not know lkconv's ops)."""
from __future__ import annotations

import copy
from typing import Set

import torch
import torch.nn as nn

from ..nn import LargeKernelConv2d
from . import transforms as T

__all__ = ["reparameterize", "to_plain", "fuse_conv_bn_modules"]

_ACTIVE: Set[int] = set()  # modules whose own reparameterize() is running (guards recursion)


def _deploy_method(m: nn.Module):
    for name in ("reparameterize", "switch_to_deploy"):
        fn = getattr(m, name, None)
        if callable(fn):
            return fn
    return None


def _visit(m: nn.Module) -> None:
    # children first: a block's own method then sees already-deployed sub-blocks (ours are idempotent)
    for child in list(m.children()):
        _visit(child)
    fn = _deploy_method(m)
    # the guard lets a model's own reparameterize() call lkconv.reparameterize(self) without recursing
    if fn is not None and id(m) not in _ACTIVE:
        _ACTIVE.add(id(m))
        try:
            fn()
        finally:
            _ACTIVE.discard(id(m))


@torch.no_grad()
def _fused_conv(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> nn.Conv2d:
    k, b = T.fuse_conv_bn(conv.weight, conv.bias, bn)
    new = copy.deepcopy(conv)
    new.weight = nn.Parameter(k.detach().clone(), conv.weight.requires_grad)
    new.bias = nn.Parameter(b.detach().clone().to(k.dtype), conv.weight.requires_grad)
    return new


@torch.no_grad()
def fuse_conv_bn_modules(model: nn.Module) -> int:
    """In every ``nn.Sequential`` of ``model``, replace each (Conv2d, BatchNorm2d) pair of consecutive
    entries by (fused Conv2d with bias, Identity).  Only BNs with running statistics and matching
    channels are fused; indices and names stay valid.  Returns the number of fused pairs."""
    n = 0
    for seq in list(model.modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules.keys())
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
                    and bn.num_features == conv.out_channels):
                seq._modules[a] = _fused_conv(conv, bn)
                seq._modules[b] = nn.Identity()
                n += 1
    return n


def reparameterize(model: nn.Module, inplace: bool = True, plain_conv: bool = False) -> nn.Module:
    """Re-parameterize every block of ``model`` that knows how, then fuse conv+BN pairs.

    1. every submodule with a ``reparameterize()`` or ``switch_to_deploy()`` method (lkconv's blocks
       and third-party RepVGG/DBB/RepLKNet-style blocks) is called, children before parents;
    2. consecutive (Conv2d, BatchNorm2d) entries of ``nn.Sequential`` containers are fused
       (:func:`fuse_conv_bn_modules`);
    3. optionally (``plain_conv=True``) lkconv modules become ``nn.Conv2d`` (:func:`to_plain`) so
       ``torch.export``/ONNX graphs contain only aten convolutions.

    Args:
        model: any module.
        inplace: modify ``model`` (default) or a deep copy of it.
        plain_conv: see 3.
    Returns:
        the deploy model, in eval mode.  Outputs equal the training form's eval-mode outputs (RMBlock:
        for non-negative inputs, as RMNet requires).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"reparameterize: model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    _visit(model)
    fuse_conv_bn_modules(model)
    if plain_conv:
        model = to_plain(model)
    return model.eval()


@torch.no_grad()
def _plain(conv: LargeKernelConv2d) -> nn.Conv2d:
    """An ``nn.Conv2d`` with ``conv``'s attributes, parameters, buffers and hooks (shared, not
    copied); only lkconv's ``backend`` attribute is dropped."""
    new = nn.Conv2d.__new__(nn.Conv2d)
    nn.Module.__init__(new)
    for k, v in conv.__dict__.items():
        if k not in ("_parameters", "_buffers", "_modules", "backend"):
            new.__dict__[k] = v
    new._parameters = dict(conv._parameters)
    new._buffers = dict(conv._buffers)
    new._modules = dict(conv._modules)
    return new


def to_plain(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Replace every :class:`lkconv.nn.LargeKernelConv2d` (and subclasses) by an ``nn.Conv2d`` sharing
    its parameters (same outputs, same state_dict keys): for export to ONNX or any runtime without
    lkconv's custom ops.  Returns the model (a bare LargeKernelConv2d returns its nn.Conv2d)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_plain: model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, LargeKernelConv2d):
        return _plain(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LargeKernelConv2d):
                setattr(parent, name, _plain(child))
    return model
