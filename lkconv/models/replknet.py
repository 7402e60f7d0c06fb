"""RepLKNet (Ding et al., "Scaling Up Your Kernels to 31x31", CVPR 2022) built on lkconv.

The module tree -- and therefore every ``state_dict`` key -- follows the original RepLKNet code, so a
checkpoint saved by it loads here (:func:`load_original_checkpoint`)::

    stem.{0..3}.{conv,bn}                           conv-bn-relu x4 (3x3 s2, 3x3 dw, 1x1, 3x3 dw s2)
    stages.i.blocks.{2j}                            RepLKBlock
        .prelkb_bn  .pw1.{conv,bn}  .large_kernel.{lkb_origin.{conv,bn}, small_conv.{conv,bn}}
        (deployed: .large_kernel.lkb_reparam)  .lk_nonlinear  .pw2.{conv,bn}
    stages.i.blocks.{2j+1}                          ConvFFN
        .preffn_bn  .pw1.{conv,bn}  .nonlinear  .pw2.{conv,bn}
    stages.i.norm                                   BN only with norm_intermediate_features
    transitions.i.{0,1}.{conv,bn}                   1x1 conv-bn-relu, 3x3 dw stride-2 conv-bn-relu
    norm, head                                      BN, (avgpool), Linear

The large depthwise convolutions are :class:`lkconv.reparam.ReparamLargeKernelConv` (lkconv kernels
in training and deployment); everything else is plain PyTorch.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Dict, Optional, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as _cp

from ..nn.modules import LargeKernelConv2d
from ..reparam import ReparamLargeKernelConv, ReparamModule

__all__ = [
    "RepLKNet",
    "RepLKNetStage",
    "RepLKBlock",
    "ConvFFN",
    "DropPath",
    "conv_bn",
    "conv_bn_relu",
    "replknet_31b",
    "replknet_31l",
    "replknet_xl",
    "replknet_tiny",
    "MODEL_CONFIGS",
    "create_model",
    "set_model_backend",
    "to_nn_conv2d",
    "load_original_checkpoint",
    "CheckpointMismatchError",
]


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------
def _bn(channels: int, sync: bool) -> nn.Module:
    return nn.SyncBatchNorm(channels) if sync else nn.BatchNorm2d(channels)


def conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups, dilation=1, sync_bn=False):
    """``nn.Sequential(conv=Conv2d(bias=False), bn=BatchNorm2d)`` (the original's ``conv_bn``)."""
    if padding is None:
        padding = kernel_size // 2
    m = nn.Sequential()
    m.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                   groups, bias=False))
    m.add_module("bn", _bn(out_channels, sync_bn))
    return m


def conv_bn_relu(in_channels, out_channels, kernel_size, stride, padding, groups, dilation=1, sync_bn=False):
    """``conv_bn`` followed by ``nonlinear=ReLU`` (the original's ``conv_bn_relu``)."""
    m = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups, dilation, sync_bn)
    m.add_module("nonlinear", nn.ReLU())
    return m


class DropPath(nn.Module):
    """Stochastic depth per sample (drops the whole residual branch with probability ``drop_prob``)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= float(drop_prob) < 1.0:
            raise ValueError(f"DropPath: drop_prob must be in [0, 1), got {drop_prob!r}")
        self.drop_prob = float(drop_prob)

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f"drop_prob={self.drop_prob:.3f}"


class ConvFFN(nn.Module):
    """BN -> 1x1 conv-bn (expand) -> GELU -> 1x1 conv-bn (reduce), residual with drop path."""

    def __init__(self, in_channels, internal_channels, out_channels, drop_path=0.0, sync_bn=False):
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.preffn_bn = _bn(in_channels, sync_bn)
        self.pw1 = conv_bn(in_channels, internal_channels, 1, 1, 0, 1, sync_bn=sync_bn)
        self.pw2 = conv_bn(internal_channels, out_channels, 1, 1, 0, 1, sync_bn=sync_bn)
        self.nonlinear = nn.GELU()

    def forward(self, x):
        out = self.preffn_bn(x)
        out = self.pw1(out)
        out = self.nonlinear(out)
        out = self.pw2(out)
        return x + self.drop_path(out)


class RepLKBlock(nn.Module):
    """BN -> 1x1 conv-bn-relu -> large depthwise (ReparamLargeKernelConv) -> ReLU -> 1x1 conv-bn,
    residual with drop path."""

    def __init__(self, in_channels, dw_channels, block_lk_size, small_kernel, drop_path=0.0,
                 small_kernel_merged=False, sync_bn=False, backend=None):
        super().__init__()
        self.pw1 = conv_bn_relu(in_channels, dw_channels, 1, 1, 0, groups=1, sync_bn=sync_bn)
        self.pw2 = conv_bn(dw_channels, in_channels, 1, 1, 0, groups=1, sync_bn=sync_bn)
        self.large_kernel = ReparamLargeKernelConv(
            in_channels=dw_channels, out_channels=dw_channels, kernel_size=block_lk_size, stride=1,
            groups=dw_channels, small_kernel=small_kernel, small_kernel_merged=small_kernel_merged,
            backend=backend)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = _bn(in_channels, sync_bn)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        out = self.prelkb_bn(x)
        out = self.pw1(out)
        out = self.large_kernel(out)
        out = self.lk_nonlinear(out)
        out = self.pw2(out)
        return x + self.drop_path(out)


class RepLKNetStage(nn.Module):
    """``num_blocks`` x (RepLKBlock, ConvFFN); ``use_checkpoint`` recomputes each block in backward."""

    def __init__(self, channels, num_blocks, stage_lk_size, drop_path, small_kernel, dw_ratio=1.0,
                 ffn_ratio=4.0, use_checkpoint=False, small_kernel_merged=False,
                 norm_intermediate_features=False, sync_bn=False, backend=None):
        super().__init__()
        self.use_checkpoint = bool(use_checkpoint)
        blocks = []
        for i in range(num_blocks):
            dp = drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path
            blocks.append(RepLKBlock(channels, int(channels * dw_ratio), stage_lk_size, small_kernel, dp,
                                     small_kernel_merged, sync_bn, backend))
            blocks.append(ConvFFN(channels, int(channels * ffn_ratio), channels, dp, sync_bn))
        self.blocks = nn.ModuleList(blocks)
        self.norm = _bn(channels, sync_bn) if norm_intermediate_features else nn.Identity()

    def forward(self, x):
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled() and x.requires_grad:
                x = _cp.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


def _pos_int_list(name, v, n=None):
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(i, int) and i > 0 for i in v):
        raise ValueError(f"RepLKNet: {name} must be a non-empty list of positive ints, got {v!r}")
    if n is not None and len(v) != n:
        raise ValueError(f"RepLKNet: {name} must have {n} entries (one per stage), got {len(v)}: {v!r}")
    return list(v)


class RepLKNet(nn.Module):
    """RepLKNet with the original constructor arguments (``in_channels``; ``in_chans`` is an alias).

    Args:
        large_kernel_sizes: depthwise kernel size per stage, e.g. [31, 29, 27, 13].
        layers: blocks per stage, e.g. [2, 2, 18, 2].
        channels: width per stage, e.g. [128, 256, 512, 1024].
        drop_path_rate: stochastic depth, linearly increasing over blocks up to this value.
        small_kernel: the parallel small depthwise kernel (5), or None (RepLKNet-XL).
        dw_ratio, ffn_ratio: depthwise / FFN width multipliers.
        num_classes: classifier outputs (None: backbone mode, needs ``out_indices``).
        out_indices: stages whose features ``forward`` returns (backbone mode).
        use_checkpoint: activation checkpointing of every block (and the stem) to save memory.
        small_kernel_merged: build the deployed (re-parameterized) structure directly.
        use_sync_bn: SyncBatchNorm everywhere (multi-GPU training).
        norm_intermediate_features: BN on the features returned in backbone mode (XL detection).
        backend: lkconv backend for the large-kernel convolutions (None: lkconv's default).
    """

    def __init__(self, large_kernel_sizes, layers, channels, drop_path_rate=0.0, small_kernel=5,
                 dw_ratio=1.0, ffn_ratio=4.0, in_channels=3, num_classes=1000, out_indices=None,
                 use_checkpoint=False, small_kernel_merged=False, use_sync_bn=False,
                 norm_intermediate_features=False, backend: Optional[str] = None, in_chans=None):
        super().__init__()
        if in_chans is not None:
            in_channels = in_chans
        layers = _pos_int_list("layers", layers)
        n = len(layers)
        large_kernel_sizes = _pos_int_list("large_kernel_sizes", large_kernel_sizes, n)
        channels = _pos_int_list("channels", channels, n)
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"RepLKNet: in_channels/in_chans must be a positive int, got {in_channels!r}")
        if small_kernel is not None:
            if not isinstance(small_kernel, int) or small_kernel < 1:
                raise ValueError(f"RepLKNet: small_kernel must be a positive int or None, got {small_kernel!r}")
            bad = [k for k in large_kernel_sizes if k < small_kernel]
            if bad:
                raise ValueError(f"RepLKNet: every large_kernel_sizes entry must be >= small_kernel={small_kernel}, "
                                 f"got {large_kernel_sizes}")
        if not 0.0 <= float(drop_path_rate) < 1.0:
            raise ValueError(f"RepLKNet: drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        if num_classes is None and out_indices is None:
            raise ValueError("RepLKNet: give num_classes (classifier) or out_indices (backbone), not neither")
        if num_classes is not None and out_indices is not None:
            raise ValueError("RepLKNet: give num_classes (classifier) or out_indices (backbone), not both")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"RepLKNet: num_classes must be a positive int or None, got {num_classes!r}")
        if num_classes is not None and norm_intermediate_features:
            raise ValueError("RepLKNet: norm_intermediate_features is for backbone mode (out_indices)")
        if out_indices is not None:
            out_indices = list(out_indices)
            if not all(isinstance(i, int) and 0 <= i < n for i in out_indices):
                raise ValueError(f"RepLKNet: out_indices must be stage indices in [0, {n}), got {out_indices!r}")

        self.out_indices = out_indices
        self.norm_intermediate_features = norm_intermediate_features
        self.use_checkpoint = bool(use_checkpoint)
        self.num_stages = n
        self.num_classes = num_classes
        self.config = dict(large_kernel_sizes=large_kernel_sizes, layers=layers, channels=channels,
                           small_kernel=small_kernel, dw_ratio=dw_ratio, ffn_ratio=ffn_ratio)
        sb = bool(use_sync_bn)
        w0 = channels[0]
        self.stem = nn.ModuleList([
            conv_bn_relu(in_channels, w0, 3, 2, 1, groups=1, sync_bn=sb),
            conv_bn_relu(w0, w0, 3, 1, 1, groups=w0, sync_bn=sb),
            conv_bn_relu(w0, w0, 1, 1, 0, groups=1, sync_bn=sb),
            conv_bn_relu(w0, w0, 3, 2, 1, groups=w0, sync_bn=sb),
        ])
        nb = sum(layers)
        dpr = [float(drop_path_rate) * i / (nb - 1) if nb > 1 else 0.0 for i in range(nb)]
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for i in range(n):
            self.stages.append(RepLKNetStage(
                channels[i], layers[i], large_kernel_sizes[i], dpr[sum(layers[:i]):sum(layers[:i + 1])],
                small_kernel, dw_ratio, ffn_ratio, use_checkpoint, small_kernel_merged,
                norm_intermediate_features, sb, backend))
            if i < n - 1:
                self.transitions.append(nn.Sequential(
                    conv_bn_relu(channels[i], channels[i + 1], 1, 1, 0, groups=1, sync_bn=sb),
                    conv_bn_relu(channels[i + 1], channels[i + 1], 3, 2, 1, groups=channels[i + 1], sync_bn=sb),
                ))
        if num_classes is not None:
            self.norm = _bn(channels[-1], sb)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(channels[-1], num_classes)
        if backend is not None:
            set_model_backend(self, backend)  # validates the name

    def forward_features(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"RepLKNet: input must be a 4-D (N, C, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        x = self.stem[0](x)
        for layer in self.stem[1:]:
            if self.use_checkpoint and torch.is_grad_enabled() and x.requires_grad:
                x = _cp.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        outs = []
        for i in range(self.num_stages):
            x = self.stages[i](x)
            if self.out_indices is not None and i in self.out_indices:
                outs.append(self.stages[i].norm(x))
            if i < self.num_stages - 1:
                x = self.transitions[i](x)
        return x if self.out_indices is None else outs

    def forward(self, x):
        x = self.forward_features(x)
        if self.out_indices is not None:
            return x
        x = self.norm(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.head(x)

    def reparameterize(self) -> "RepLKNet":
        """Merge every large+small kernel pair into one large kernel (in place; returns self).
        BatchNorm statistics are used as they are: call it on a trained model (eval semantics)."""
        for m in list(self.modules()):
            if isinstance(m, ReparamModule):
                m.reparameterize()
        return self

    # the original name
    structural_reparam = reparameterize


# --------------------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------------------
MODEL_CONFIGS: Dict[str, dict] = {
    "replknet_31b": dict(large_kernel_sizes=[31, 29, 27, 13], layers=[2, 2, 18, 2],
                         channels=[128, 256, 512, 1024], small_kernel=5, dw_ratio=1.0, drop_path_rate=0.3),
    "replknet_31l": dict(large_kernel_sizes=[31, 29, 27, 13], layers=[2, 2, 18, 2],
                         channels=[192, 384, 768, 1536], small_kernel=5, dw_ratio=1.0, drop_path_rate=0.3),
    "replknet_xl": dict(large_kernel_sizes=[27, 27, 27, 13], layers=[2, 2, 18, 2],
                        channels=[256, 512, 1024, 2048], small_kernel=None, dw_ratio=1.5, drop_path_rate=0.3),
    # for tests and examples: K > H in the later stages at 32x32 input, a few thousand parameters
    "replknet_tiny": dict(large_kernel_sizes=[13, 11, 9, 7], layers=[1, 1, 2, 1],
                          channels=[8, 16, 24, 32], small_kernel=3, dw_ratio=1.0, ffn_ratio=2.0,
                          drop_path_rate=0.0),
}


def _make(name: str, **kwargs) -> RepLKNet:
    cfg = dict(MODEL_CONFIGS[name])
    cfg.update(kwargs)
    return RepLKNet(**cfg)


def replknet_31b(**kwargs) -> RepLKNet:
    """RepLKNet-31B: kernels [31, 29, 27, 13], layers [2, 2, 18, 2], channels [128, 256, 512, 1024],
    small kernel 5 (79M parameters with 1000 classes).  Keyword arguments override the config
    (num_classes, in_chans, drop_path_rate, use_checkpoint, small_kernel_merged, backend, ...)."""
    return _make("replknet_31b", **kwargs)


def replknet_31l(**kwargs) -> RepLKNet:
    """RepLKNet-31L: as 31B with channels [192, 384, 768, 1536] (172M parameters)."""
    return _make("replknet_31l", **kwargs)


def replknet_xl(**kwargs) -> RepLKNet:
    """RepLKNet-XL: kernels [27, 27, 27, 13], channels [256, 512, 1024, 2048], no small kernel,
    dw_ratio 1.5 (335M parameters)."""
    return _make("replknet_xl", **kwargs)


def replknet_tiny(**kwargs) -> RepLKNet:
    """A tiny RepLKNet for tests and CPU examples: kernels [13, 11, 9, 7], small kernel 3,
    layers [1, 1, 2, 1], channels [8, 16, 24, 32], ffn_ratio 2."""
    return _make("replknet_tiny", **kwargs)


def create_model(name: str, **kwargs) -> RepLKNet:
    """``create_model("replknet_31b", num_classes=10)``; names: see :data:`MODEL_CONFIGS`
    (also accepted: "31b", "31B", "RepLKNet-31B", "tiny", ...)."""
    key = name.lower().replace("-", "_")
    if not key.startswith("replknet_"):
        key = "replknet_" + key.replace("replknet", "").lstrip("_")
    if key not in MODEL_CONFIGS:
        raise ValueError(f"lkconv.models: unknown model {name!r}; choose one of {sorted(MODEL_CONFIGS)}")
    return _make(key, **kwargs)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def set_model_backend(model: nn.Module, backend: Optional[str]) -> nn.Module:
    """Set the lkconv backend of every lkconv module (and of every re-parameterizable block, so the
    deployed convolutions inherit it) in ``model``; None: lkconv's default.  Returns ``model``."""
    from ..backends import validate_backend_name

    validate_backend_name(backend)
    for m in model.modules():
        if isinstance(m, (LargeKernelConv2d, ReparamModule)):
            m.backend = backend
    return model


def to_nn_conv2d(model: nn.Module) -> nn.Module:
    """Replace every lkconv module by a plain ``nn.Conv2d`` sharing its parameters (in place): the
    same model on PyTorch's own convolution, for baselines.  State-dict keys do not change.
    (:func:`lkconv.reparam.to_plain`, the one swap function, under the models' name.)"""
    from ..reparam import to_plain

    return to_plain(model, inplace=True)


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: missing/unexpected keys or shape mismatches."""


def _unwrap_state_dict(obj) -> Dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("model", "state_dict", "model_state_dict", "module", "net"):
                if key in obj and isinstance(obj[key], Mapping):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, Mapping):
        raise TypeError(f"load_original_checkpoint: expected a state_dict (a mapping of names to tensors), "
                        f"got {type(obj).__name__}")
    sd = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise TypeError(f"load_original_checkpoint: state_dict keys must be strings, got {k!r}")
        while k.startswith("module."):
            k = k[len("module."):]
        if k.startswith("_orig_mod."):  # torch.compile'd model
            k = k[len("_orig_mod."):]
        sd[k] = v
    return sd


def load_original_checkpoint(model: nn.Module, path_or_state_dict: Union[str, os.PathLike, Mapping],
                             strict: bool = True, map_location="cpu") -> nn.Module:
    """Load a checkpoint saved by the original RepLKNet code (or by this one) into ``model``.

    Accepts a path (``torch.load``-ed on ``map_location``) or a mapping: a plain state_dict or one
    wrapped in ``{'model': ...}`` / ``{'state_dict': ...}``, with or without ``module.`` prefixes
    (DDP).  BatchNorm ``num_batches_tracked`` counters absent from old checkpoints are tolerated.
    With ``strict`` (default) any other missing or unexpected key, and any shape mismatch, raises
    :class:`CheckpointMismatchError` naming them; with ``strict=False`` matching keys are loaded and
    shape mismatches still raise.  Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_original_checkpoint: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        if not os.path.isfile(path_or_state_dict):
            raise FileNotFoundError(f"load_original_checkpoint: no such file: {os.fspath(path_or_state_dict)!r}")
        obj = torch.load(path_or_state_dict, map_location=map_location, weights_only=True)
    else:
        obj = path_or_state_dict
    sd = _unwrap_state_dict(obj)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sd if k in own and isinstance(sd[k], torch.Tensor) and sd[k].shape != own[k].shape]
    if shapes or (strict and (missing or unexpected)):
        parts = []

        def show(title, items):
            if items:
                more = f" ... (+{len(items) - 20} more)" if len(items) > 20 else ""
                parts.append(f"{title} ({len(items)}): " + ", ".join(items[:20]) + more)

        show("shape mismatches", shapes)
        if strict:
            show("missing keys", missing)
            show("unexpected keys", unexpected)
        hint = ""
        keys = " ".join(unexpected + missing)
        if "lkb_reparam" in keys and "lkb_origin" in keys:
            hint = (" Hint: one side is re-parameterized (lkb_reparam) and the other is not (lkb_origin/"
                    "small_conv): build the model with small_kernel_merged=True to load a deployed checkpoint,"
                    " or call model.reparameterize() after loading a training checkpoint.")
        elif "small_conv" in keys:
            hint = " Hint: small_kernel differs (None for RepLKNet-XL style, an int otherwise)."
        raise CheckpointMismatchError("load_original_checkpoint: checkpoint does not match the model; "
                                      + "; ".join(parts) + "." + hint)
    own_keys = set(own)
    model.load_state_dict({k: v for k, v in sd.items() if k in own_keys}, strict=False)
    return model
