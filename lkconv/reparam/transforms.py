"""Pure structural re-parameterization transforms on (kernel, bias) pairs.

Every function here is ``@torch.no_grad()``, takes and returns plain tensors (never modules,
except where a BatchNorm module is the natural argument), does not modify its inputs, and is exact
in real arithmetic: in fp64 the outputs of the original and the transformed structure agree to
rounding (see tests/test_reparam_transforms.py and docs/reparam.md).

Conventions: a conv kernel has shape (O, I/groups, KH, KW) as in ``nn.Conv2d``; ``bias`` may be
``None`` (zero).  Names follow the DBB paper's transforms I-VI where they exist.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..params import int_pair

__all__ = [
    "bn_scale_shift",
    "fuse_conv_bn",
    "add_branches",
    "merge_1x1_kxk",
    "concat_branches",
    "avgpool_kernel",
    "pad_kernel",
    "identity_kernel",
    "dilated_to_dense",
    "expand_groups",
    "fuse_compactor",
    "resblock_to_plain",
    "compactor_row_norms",
]

KB = Tuple[Tensor, Tensor]


def _pair(v, name: str) -> Tuple[int, int]:
    return int_pair(name, v)  # the one int-pair parser (lkconv.params)


def _check_kernel(kernel, name: str = "kernel") -> None:
    if not isinstance(kernel, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(kernel).__name__}")
    if kernel.dim() != 4:
        raise ValueError(f"{name} must have 4 dims (O, I/groups, KH, KW), got shape {tuple(kernel.shape)}")
    if not kernel.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {kernel.dtype}")


def _bias_or_zeros(bias: Optional[Tensor], kernel: Tensor, name: str = "bias") -> Tensor:
    if bias is None:
        return kernel.new_zeros(kernel.shape[0])
    if not isinstance(bias, Tensor) or bias.shape != (kernel.shape[0],):
        raise ValueError(
            f"{name} must be None or a tensor of shape ({kernel.shape[0]},), got "
            f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}"
        )
    return bias


def _check_groups(groups, out_channels: int, name: str = "groups") -> int:
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{name} must be a positive int, got {groups!r}")
    if out_channels % groups:
        raise ValueError(f"{name}={groups} does not divide the {out_channels} output channels")
    return groups


# ---------------------------------------------------------------------------------------------
# Transform I: conv (+bias) followed by BatchNorm (eval statistics) -> conv with bias
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> KB:
    """The affine map of an eval-mode BatchNorm: ``bn(y) = scale * y + shift`` per channel.

    ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale`` (gamma=1, beta=0 without
    affine).  Needs running statistics (``track_running_stats=True``)."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"bn must be a BatchNorm module, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"bn ({bn}) has no running statistics (track_running_stats=False): it normalises with batch "
            "statistics even in eval mode and cannot be folded into a convolution"
        )
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    return scale, beta - bn.running_mean * scale


@torch.no_grad()
def fuse_conv_bn(kernel: Tensor, bias: Optional[Tensor], bn) -> KB:
    """Transform I.  ``BN(conv(x; K, b)) == conv(x; K * s, (b - mu) * s + beta)``, ``s = gamma/sqrt(var+eps)``.

    Args:
        kernel: (O, I/g, KH, KW) conv kernel (any groups; the BN acts on output channels).
        bias: conv bias (O,) or None.
        bn: a BatchNorm module with running statistics (affine or not), or a pair
            ``(scale, shift)`` as returned by :func:`bn_scale_shift`.
    Returns:
        (kernel, bias) of the single equivalent convolution.
    """
    _check_kernel(kernel)
    b = _bias_or_zeros(bias, kernel)
    if isinstance(bn, (tuple, list)) and len(bn) == 2:
        scale, shift = bn
    else:
        scale, shift = bn_scale_shift(bn)
    if scale.shape != (kernel.shape[0],):
        raise ValueError(f"bn has {scale.shape[0]} channels but the kernel has {kernel.shape[0]} output channels")
    scale = scale.to(kernel.dtype)
    shift = shift.to(kernel.dtype)
    return kernel * scale.reshape(-1, 1, 1, 1), b * scale + shift


# ---------------------------------------------------------------------------------------------
# Transform II: parallel branches with equal kernel shape -> sum
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def add_branches(kernels: Sequence[Tensor], biases: Optional[Sequence[Optional[Tensor]]] = None) -> KB:
    """Transform II.  ``conv(x; K1, b1) + conv(x; K2, b2) == conv(x; K1 + K2, b1 + b2)``
    (same shape, stride, groups and alignment; pad smaller kernels first with :func:`pad_kernel`)."""
    kernels = list(kernels)
    if not kernels:
        raise ValueError("kernels must not be empty")
    for i, k in enumerate(kernels):
        _check_kernel(k, f"kernels[{i}]")
        if k.shape != kernels[0].shape:
            raise ValueError(
                f"kernels[{i}] has shape {tuple(k.shape)}, kernels[0] has {tuple(kernels[0].shape)}: "
                "pad smaller kernels with pad_kernel() before adding"
            )
    biases = [None] * len(kernels) if biases is None else list(biases)
    if len(biases) != len(kernels):
        raise ValueError(f"got {len(kernels)} kernels but {len(biases)} biases")
    k = torch.stack(kernels).sum(0)
    b = torch.stack([_bias_or_zeros(bb, kk, f"biases[{i}]") for i, (kk, bb) in enumerate(zip(kernels, biases))]).sum(0)
    return k, b


# ---------------------------------------------------------------------------------------------
# Transform III: 1x1 conv -> (BN-and-pad) -> KxK conv  ==  one KxK conv
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def merge_1x1_kxk(k1: Tensor, b1: Optional[Tensor], k2: Tensor, b2: Optional[Tensor], groups: int = 1) -> KB:
    """Transform III.  A 1x1 conv (k1: (D, C/g, 1, 1), bias b1) followed by a KxK conv
    (k2: (E, D/g, KH, KW), bias b2), both with ``groups``, equals one KxK conv with

        K[e, c] = sum_d k2[e, d] * k1[d, c]   (within each group),
        b[e]    = b2[e] + sum_{d, h, w} k2[e, d, h, w] * b1[d].

    This is exact everywhere only if the KxK conv pads its input with the value the first stage
    produces on a zero input, i.e. ``b1`` (that is what :class:`~lkconv.reparam.BNAndPad` does);
    the merged conv then zero-pads the original input by the same amount.  With plain zero
    padding of the intermediate map the border pixels differ by the b1 terms that fall into the
    padding (tests show it).
    """
    _check_kernel(k1, "k1")
    _check_kernel(k2, "k2")
    if k1.shape[2:] != (1, 1):
        raise ValueError(f"k1 must be a 1x1 kernel, got shape {tuple(k1.shape)}")
    g = _check_groups(groups, k1.shape[0])
    _check_groups(groups, k2.shape[0])
    D, E = k1.shape[0], k2.shape[0]
    if k2.shape[1] * g != D:
        raise ValueError(
            f"k2 expects {k2.shape[1] * g} input channels (shape {tuple(k2.shape)}, groups={g}) but k1 "
            f"produces {D}"
        )
    b1 = _bias_or_zeros(b1, k1, "b1")
    b2 = _bias_or_zeros(b2, k2, "b2")
    dg, eg, cg = D // g, E // g, k1.shape[1]
    k1g = k1.reshape(g, dg, cg)  # [g, d, c]
    k2g = k2.reshape(g, eg, dg, k2.shape[2], k2.shape[3])  # [g, e, d, h, w]
    k = torch.einsum("gedhw,gdc->gechw", k2g, k1g).reshape(E, cg, k2.shape[2], k2.shape[3])
    b_hat = torch.einsum("gedhw,gd->ge", k2g, b1.reshape(g, dg)).reshape(E)
    return k, b_hat + b2


# ---------------------------------------------------------------------------------------------
# Transform IV: depth concatenation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def concat_branches(kernels: Sequence[Tensor], biases: Optional[Sequence[Optional[Tensor]]] = None) -> KB:
    """Transform IV.  ``cat([conv(x; K1, b1), conv(x; K2, b2)], dim=1) == conv(x; cat(K1, K2), cat(b1, b2))``
    (same input channels per group, kernel size, stride)."""
    kernels = list(kernels)
    if not kernels:
        raise ValueError("kernels must not be empty")
    for i, k in enumerate(kernels):
        _check_kernel(k, f"kernels[{i}]")
        if k.shape[1:] != kernels[0].shape[1:]:
            raise ValueError(
                f"kernels[{i}] has shape {tuple(k.shape)}: all kernels must share (I/g, KH, KW) = "
                f"{tuple(kernels[0].shape[1:])}"
            )
    biases = [None] * len(kernels) if biases is None else list(biases)
    if len(biases) != len(kernels):
        raise ValueError(f"got {len(kernels)} kernels but {len(biases)} biases")
    return torch.cat(kernels, 0), torch.cat(
        [_bias_or_zeros(bb, kk, f"biases[{i}]") for i, (kk, bb) in enumerate(zip(kernels, biases))]
    )


# ---------------------------------------------------------------------------------------------
# Transform V: average pooling as a conv
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def avgpool_kernel(channels: int, kernel_size, groups: int = 1, *, dtype=None, device=None) -> Tensor:
    """Transform V.  ``AvgPool2d(K, stride, padding, count_include_pad=True)`` on C channels equals a
    conv with the same K/stride/zero padding and kernel ``F[d, c] = 1/(KH*KW) if c == d (within the
    group) else 0``; shape (C, C/groups, KH, KW)."""
    kh, kw = _pair(kernel_size, "kernel_size")
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    if kh < 1 or kw < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel_size!r}")
    g = _check_groups(groups, channels)
    cg = channels // g
    k = torch.zeros(channels, cg, kh, kw, dtype=dtype or torch.get_default_dtype(), device=device)
    idx = torch.arange(channels, device=device)
    k[idx, idx % cg] = 1.0 / (kh * kw)
    return k


# ---------------------------------------------------------------------------------------------
# Transform VI: a smaller kernel centred inside a larger one
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def pad_kernel(kernel: Tensor, target_size) -> Tensor:
    """Transform VI.  A (kh, kw) kernel with padding (p - (KH-kh)/2, ...) equals the (KH, KW) kernel
    that has it zero-padded in its centre.  Each side's difference must be even (otherwise the small
    kernel cannot be centred and the two convolutions are not aligned): ValueError."""
    _check_kernel(kernel)
    th, tw = _pair(target_size, "target_size")
    kh, kw = kernel.shape[2], kernel.shape[3]
    dh, dw = th - kh, tw - kw
    if dh < 0 or dw < 0:
        raise ValueError(f"kernel of size ({kh}, {kw}) is larger than target_size ({th}, {tw})")
    if dh % 2 or dw % 2:
        raise ValueError(
            f"kernel of size ({kh}, {kw}) cannot be centred in target_size ({th}, {tw}): the size "
            "differences must be even (odd in odd, even in even)"
        )
    return torch.nn.functional.pad(kernel, [dw // 2, dw // 2, dh // 2, dh // 2])


# ---------------------------------------------------------------------------------------------
# identity as a conv
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def identity_kernel(channels: int, kernel_size=1, groups: int = 1, *, dtype=None, device=None) -> Tensor:
    """``x == conv(x; I, padding=K//2)`` with ``I[c, c % (C/g), K//2, K//2] = 1`` (shape (C, C/g, KH, KW)).
    Kernel sides must be odd (an even kernel has no centre)."""
    kh, kw = _pair(kernel_size, "kernel_size")
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    if kh < 1 or kw < 1 or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"identity_kernel needs odd kernel sides (a centre tap), got kernel_size={kernel_size!r}")
    g = _check_groups(groups, channels)
    cg = channels // g
    k = torch.zeros(channels, cg, kh, kw, dtype=dtype or torch.get_default_dtype(), device=device)
    idx = torch.arange(channels, device=device)
    k[idx, idx % cg, kh // 2, kw // 2] = 1.0
    return k


# ---------------------------------------------------------------------------------------------
# dilated kernel -> dense kernel (UniRepLKNet)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def dilated_to_dense(kernel: Tensor, dilation) -> Tensor:
    """``conv(x; k, dilation=r, padding=p) == conv(x; k', padding=p)`` where k' has size
    ((KH-1)*rh+1, (KW-1)*rw+1) and ``k'[.., i*rh, j*rw] = k[.., i, j]``, zeros elsewhere."""
    _check_kernel(kernel)
    rh, rw = _pair(dilation, "dilation")
    if rh < 1 or rw < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation!r}")
    o, i, kh, kw = kernel.shape
    out = kernel.new_zeros(o, i, (kh - 1) * rh + 1, (kw - 1) * rw + 1)
    out[:, :, ::rh, ::rw] = kernel
    return out


# ---------------------------------------------------------------------------------------------
# grouped kernel -> dense kernel
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def expand_groups(kernel: Tensor, groups: int) -> Tensor:
    """A grouped kernel (O, C/g, KH, KW) as the equivalent dense kernel (O, C, KH, KW) (zeros off the
    block diagonal)."""
    _check_kernel(kernel)
    g = _check_groups(groups, kernel.shape[0])
    o, cg, kh, kw = kernel.shape
    if g == 1:
        return kernel.clone()
    og = o // g
    out = kernel.new_zeros(o, cg * g, kh, kw)
    for j in range(g):
        out[j * og:(j + 1) * og, j * cg:(j + 1) * cg] = kernel[j * og:(j + 1) * og]
    return out


# ---------------------------------------------------------------------------------------------
# ResRep: conv (+BN) followed by a 1x1 compactor -> one conv
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def fuse_compactor(kernel: Tensor, bias: Optional[Tensor], compactor: Tensor,
                   compactor_bias: Optional[Tensor] = None, groups: int = 1) -> KB:
    """``conv1x1(conv(x; K, b); Q, q) == conv(x; K', b')`` with ``K'[o'] = sum_o Q[o', o] K[o]`` and
    ``b' = Q b + q``.  ``compactor`` is (O', O, 1, 1) (groups 1).  A grouped ``kernel`` (``groups``
    > 1) is first expanded to a dense one, since the compactor mixes channels across groups."""
    _check_kernel(kernel)
    _check_kernel(compactor, "compactor")
    if compactor.shape[2:] != (1, 1) or compactor.shape[1] != kernel.shape[0]:
        raise ValueError(
            f"compactor must have shape (O', {kernel.shape[0]}, 1, 1) for a kernel with {kernel.shape[0]} "
            f"output channels, got {tuple(compactor.shape)}"
        )
    b = _bias_or_zeros(bias, kernel)
    q = _bias_or_zeros(compactor_bias, compactor, "compactor_bias")
    k = expand_groups(kernel, groups) if groups != 1 else kernel
    Q = compactor[:, :, 0, 0]
    return torch.einsum("po,ochw->pchw", Q, k), Q @ b + q


@torch.no_grad()
def compactor_row_norms(compactor: Tensor) -> Tensor:
    """L2 norm of each output row of a 1x1 compactor (O', O, 1, 1) -> (O',)."""
    _check_kernel(compactor, "compactor")
    return compactor.flatten(1).norm(dim=1)


# ---------------------------------------------------------------------------------------------
# RMNet: ResNet basic block -> plain conv-ReLU-conv
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def resblock_to_plain(k1: Tensor, b1: Optional[Tensor], k2: Tensor, b2: Optional[Tensor],
                      shortcut: Optional[KB] = None) -> Tuple[KB, KB]:
    """RMNet.  ``relu(conv2(relu(conv1(x))) + s(x))`` (``s`` the identity, or a 1x1 projection given as
    ``shortcut=(kp, bp)`` with conv1's stride) equals, for x >= 0, ``relu(conv2'(relu(conv1'(x))))`` with

        conv1' = [k1 ; I]   (I the identity KxK kernel on the C_in input channels, bias 0),
        conv2' = [k2 , P]   (P = I, or kp padded to KxK), bias b2 (+ bp),

    because ``relu(x) = x`` for non-negative x (the output of a previous ReLU).  conv1' keeps conv1's
    stride/padding; conv2' keeps conv2's stride (must be 1) and padding K//2.

    Args:
        k1: (M, C, K, K), k2: (O, M, K, K) (groups 1, odd K, BN already fused).
        shortcut: None for the identity (needs O == C), or (kp (O, C, 1, 1), bp).
    Returns:
        ((k1', b1'), (k2', b2')) with k1' (M + C, C, K, K) and k2' (O, M + C, K, K).
    """
    _check_kernel(k1, "k1")
    _check_kernel(k2, "k2")
    M, C, kh, kw = k1.shape
    O = k2.shape[0]
    if k2.shape[1] != M:
        raise ValueError(f"k2 must take the {M} channels conv1 produces, got shape {tuple(k2.shape)}")
    if kh % 2 == 0 or kw % 2 == 0 or k2.shape[2] % 2 == 0 or k2.shape[3] % 2 == 0:
        raise ValueError("resblock_to_plain needs odd kernel sizes (identity taps at the centre)")
    b1 = _bias_or_zeros(b1, k1, "b1")
    b2 = _bias_or_zeros(b2, k2, "b2")
    k1p = torch.cat([k1, identity_kernel(C, (kh, kw), dtype=k1.dtype, device=k1.device)], 0)
    b1p = torch.cat([b1, b1.new_zeros(C)])
    if shortcut is None:
        if O != C:
            raise ValueError(f"an identity shortcut needs out channels == in channels, got {O} != {C}")
        p = identity_kernel(C, tuple(k2.shape[2:]), dtype=k2.dtype, device=k2.device)
        bp = torch.zeros_like(b2)
    else:
        kp, bp = shortcut
        _check_kernel(kp, "shortcut kernel")
        if kp.shape != (O, C, 1, 1):
            raise ValueError(f"shortcut kernel must have shape ({O}, {C}, 1, 1), got {tuple(kp.shape)}")
        p = pad_kernel(kp, tuple(k2.shape[2:]))
        bp = _bias_or_zeros(bp, kp, "shortcut bias")
    return (k1p, b1p), (torch.cat([k2, p], 1), b2 + bp)
