"""The one source of truth for the op's arguments: normalisation and validation.

``lkconv.depthwise_conv2d(x, w, b, stride, padding, dilation)`` has exactly the semantics of
``F.conv2d(x, w, b, stride, padding, dilation, groups=x.shape[1])`` with ``w`` of shape
``(m*C, 1, KH, KW)``: ``m >= 1`` is the channel multiplier (PyTorch's depthwise convolution with
``out_channels = m * in_channels``; output channel ``c*m + j`` reads input channel ``c``).  Everything user-facing is checked here, once; backends receive a
:class:`ConvParams` with explicit, non-negative, per-side padding and may assume it is valid.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "ConvParams",
    "normalize_params",
    "check_tensors",
    "FLOAT_DTYPES",
    "channel_multiplier",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

IntPair = Union[int, Sequence[int]]


@dataclass(frozen=True)
class ConvParams:
    """Validated convolution geometry.

    ``padding`` is ``(top, bottom, left, right)``: "same" with an even effective kernel pads
    asymmetrically (the extra row/column goes bottom/right), exactly as ``F.conv2d`` does.
    """

    stride: Tuple[int, int]
    padding: Tuple[int, int, int, int]
    dilation: Tuple[int, int]

    @property
    def symmetric(self) -> bool:
        t, b, l, r = self.padding
        return t == b and l == r

    def out_size(self, h: int, w: int, kh: int, kw: int) -> Tuple[int, int]:
        """Output spatial size (may be <= 0 for an invalid geometry; see ``check_tensors``)."""
        sh, sw = self.stride
        dil_h, dil_w = self.dilation
        t, b, l, r = self.padding
        ho = (h + t + b - dil_h * (kh - 1) - 1) // sh + 1
        wo = (w + l + r - dil_w * (kw - 1) - 1) // sw + 1
        return ho, wo

    def as_lists(self):
        """(stride, padding, dilation) as lists, the form the torch.library ops take."""
        return list(self.stride), list(self.padding), list(self.dilation)


def channel_multiplier(in_channels: int, weight_shape) -> int:
    """``m`` of a depthwise weight ``(m*C, 1, KH, KW)`` for an input of ``C = in_channels`` channels."""
    return int(weight_shape[0]) // max(1, int(in_channels))


#: stride/padding/dilation values beyond this cannot describe a real convolution and would overflow
#: the int64 op schema (or the kernels' int32 index math) with an unreadable error
_MAX_PARAM = 2**31 - 1


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def int_pair(name: str, value, minimum: Optional[int] = None) -> Tuple[int, int]:
    """The one int-pair parser: an int or a 1-/2-sequence of ints (not bools) -> ``(a, b)``, each
    ``>= minimum`` (when given) and ``<= 2**31 - 1``; otherwise TypeError/ValueError naming ``name``.
    Used for stride/dilation here and for the sizes of :mod:`lkconv.reparam.transforms`."""
    if _is_int(value):
        vals = (int(value), int(value))
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) in (1, 2) and all(_is_int(v) for v in value):
        vals = (int(value[0]), int(value[-1]))
    else:
        raise TypeError(
            f"lkconv: {name} must be an int or a pair of ints, got {value!r} ({type(value).__name__})"
        )
    for v in vals:
        if minimum is not None and v < minimum:
            raise ValueError(f"lkconv: {name} must be >= {minimum}, got {value!r}")
        if v > _MAX_PARAM:
            raise ValueError(f"lkconv: {name} must be <= {_MAX_PARAM}, got {value!r}")
    return vals


#: normalize_params results for the common argument types (plain ints and strings), keyed by value
#: and type so that e.g. True never hits the entry of 1 (bools are rejected); cleared when full
_PARAMS_CACHE: dict = {}
_PARAMS_CACHE_MAX = 1024


def _cache_key(stride, padding, dilation, kernel_size):
    if type(stride) is int and type(dilation) is int and type(padding) in (int, str):
        return (stride, type(padding), padding, dilation, int(kernel_size[0]), int(kernel_size[1]))
    return None


def normalize_params(stride, padding, dilation, kernel_size: Tuple[int, int]) -> ConvParams:
    """Normalise user arguments (ints, pairs, "same"/"valid") into a :class:`ConvParams`.

    ``padding`` may also be a 4-tuple ``(top, bottom, left, right)`` (lkconv's extension; F.conv2d
    itself only takes symmetric padding or a string).  Results for plain int / string arguments are
    cached (errors are never cached: they are raised again on every call).
    """
    key = _cache_key(stride, padding, dilation, kernel_size)
    if key is not None:
        hit = _PARAMS_CACHE.get(key)
        if hit is None:
            hit = _normalize_params(stride, padding, dilation, kernel_size)
            if len(_PARAMS_CACHE) >= _PARAMS_CACHE_MAX:
                _PARAMS_CACHE.clear()
            _PARAMS_CACHE[key] = hit
        return hit
    return _normalize_params(stride, padding, dilation, kernel_size)


def _normalize_params(stride, padding, dilation, kernel_size: Tuple[int, int]) -> ConvParams:
    s = int_pair("stride", stride, 1)
    d = int_pair("dilation", dilation, 1)
    kh, kw = kernel_size
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            pad = (0, 0, 0, 0)
        elif mode == "same":
            if s != (1, 1):
                raise ValueError(
                    f"lkconv: padding='same' is not supported for strided convolutions (stride={stride!r}), "
                    "as in F.conv2d"
                )
            th, tw = d[0] * (kh - 1), d[1] * (kw - 1)
            pad = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        else:
            raise ValueError(f"lkconv: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    elif isinstance(padding, (tuple, list)) and len(padding) == 4 and all(_is_int(v) for v in padding):
        pad = tuple(int(v) for v in padding)
        if min(pad) < 0:
            raise ValueError(f"lkconv: padding must be >= 0, got {padding!r}")
        if max(pad) > _MAX_PARAM:
            raise ValueError(f"lkconv: padding must be <= {_MAX_PARAM}, got {padding!r}")
    elif isinstance(padding, (tuple, list)) and len(padding) == 4:
        raise TypeError(f"lkconv: padding 4-tuple (top, bottom, left, right) must hold ints, got {padding!r}")
    elif isinstance(padding, (tuple, list)) and len(padding) not in (1, 2):
        raise TypeError(
            "lkconv: padding must be an int, a pair, a 4-tuple (top, bottom, left, right), 'same' or 'valid', "
            f"got {padding!r} (length {len(padding)})"
        )
    else:
        ph, pw = int_pair("padding", padding, 0)
        pad = (ph, ph, pw, pw)
    return ConvParams(stride=s, padding=pad, dilation=d)


def check_tensors(x: torch.Tensor, weight: torch.Tensor, bias, params: ConvParams) -> None:
    """Validate the tensors of one call (x is 4-D here; the functional handles unbatched input)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"lkconv: input must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"lkconv: weight must be a torch.Tensor, got {type(weight).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"lkconv: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if x.dim() != 4:
        raise ValueError(f"lkconv: input must be 4-D (N, C, H, W) or 3-D (C, H, W), got shape {tuple(x.shape)}")
    C = x.shape[1]
    if C == 0:
        raise ValueError(
            f"lkconv: input must have at least one channel (groups = C must be positive, as in F.conv2d), "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[0] > 0 and (x.shape[2] == 0 or x.shape[3] == 0):
        raise ValueError(
            f"lkconv: input spatial size must be >= 1 when the batch is not empty (as in F.conv2d), "
            f"got shape {tuple(x.shape)}"
        )
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(
            f"lkconv: weight must have shape (m*C, 1, KH, KW) for a depthwise convolution, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0 or weight.shape[0] % C:
        raise ValueError(
            f"lkconv: weight has {weight.shape[0]} output channels but input has C={C} channels; "
            "a depthwise weight must be (m*C, 1, KH, KW) with a channel multiplier m >= 1"
        )
    if weight.shape[2] < 1 or weight.shape[3] < 1:
        raise ValueError(f"lkconv: weight kernel size must be >= 1, got {tuple(weight.shape)}")
    O = weight.shape[0]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != O):
        raise ValueError(f"lkconv: bias must have shape ({O},) (the weight's output channels), got {tuple(bias.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"lkconv: input dtype must be one of float16/bfloat16/float32/float64, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"lkconv: weight dtype {weight.dtype} does not match input dtype {x.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"lkconv: bias dtype {bias.dtype} does not match input dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"lkconv: weight is on {weight.device} but input is on {x.device}")
    if bias is not None and bias.device != x.device:
        raise ValueError(f"lkconv: bias is on {bias.device} but input is on {x.device}")
    H, W = x.shape[2], x.shape[3]
    t, b, l, r = params.padding
    kh, kw = weight.shape[2], weight.shape[3]
    ho, wo = params.out_size(H, W, kh, kw)
    if ho <= 0 or wo <= 0:
        raise ValueError(
            f"lkconv: output size ({ho}, {wo}) is not positive: input {H}x{W} with padding "
            f"(top={t}, bottom={b}, left={l}, right={r}) is smaller than the dilated kernel "
            f"({params.dilation[0] * (kh - 1) + 1}x{params.dilation[1] * (kw - 1) + 1}) (argument: weight/padding)"
        )
