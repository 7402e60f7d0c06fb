"""Launchers of the Triton kernels: output allocation, strides, grids, autotune configs.

Imported lazily by :class:`lkconv.backends.triton.TritonBackend` (it imports triton).  Under the
CPU interpreter (``TRITON_INTERPRET=1`` when :mod:`.kernels` was imported) every kernel runs with one
fixed, minimal tile configuration (autotuning is pointless there); on the GPU the kernels are wrapped
in ``@triton.autotune`` keyed on ``(KH, KW, H, W)``, stride, dilation and layout, plus the argument
dtypes (which Triton's autotuner adds to the key itself).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton

from ...params import ConvParams
from ..base import new_output, output_memory_format
from ...precision import conv_tf32_enabled
from . import kernels as K

INTERPRETED = K.INTERPRETED
_I32 = 2**31 - 1

# ------------------------------------------------------------------------------------------------
# tile configurations
# ------------------------------------------------------------------------------------------------
# forward / grad_input: (BM output rows, BN output columns, BK input columns per dot, warps, stages).
# BN stays small because the Toeplitz B tile's useful density is KW / (BN*SW + KW - 1): 0.65 at K=31
# with BN=16; BM carries the reuse of every gathered T tile.  The list is deliberately short (every
# config is one more compile on a cold cache): big planes (56x56) want BM=64/128, small planes
# (7x7, 14x14) BM=16/32 (a tile never spans planes); configs with tiles much larger than the plane
# are pruned before benchmarking (_prune_conv).
_CONV_CONFIGS = [
    (16, 16, 32, 2, 2),
    (32, 16, 32, 4, 2),
    (64, 16, 32, 4, 3),
    (128, 16, 32, 4, 3),
    (64, 32, 64, 4, 3),
]
# grad_weight: BKH/BKW are fixed by the kernel size (see _kblock); BK (input columns per dot), warps
# and stages are tuned
_GRAD_WEIGHT_CONFIGS = [(32, 4, 2), (64, 4, 3), (128, 8, 3)]

_INTERP_CONV = dict(BM=16, BN=16, BK=16)
_INTERP_GRAD_WEIGHT_BK = 16

# autotune keys: kernel size, plane sizes (input and output: the prune step looks at the output, which
# padding changes), geometry, layout (Triton's autotuner adds the dtypes)
_CONV_KEY = ["KH", "KW", "H", "W", "HO", "WO", "SH", "SW", "DH", "DW", "PLANE_FAST"]
_GRAD_WEIGHT_KEY = ["KH", "KW", "H", "W", "SH", "SW", "DH", "DW"]


# configs that spill registers, found by the static report (`python -m lkconv static`, ptxas of triton
# 3.8; benchmarks/results/static-*/kernels.csv): (kind, input_precision, config) -> the SM majors where
# it spills.  Pruned before autotuning; tests/test_static.py proves every surviving config spill-free.
_STATIC_SPILLS = {
    ("conv", "ieee", (64, 32, 64, 4, 3)): {8},          # sm_80: 92 B (forward), 304 B (strided grad_input)
    ("grad_weight", "ieee", (128, 8, 3)): {8, 9},              # sm_80 32x32 blocks: 60 B; sm_90 16x16 blocks: 4 B
}


def _current_sm_major() -> int:
    try:
        return torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 9
    except Exception:  # noqa: BLE001 - no usable device: assume Hopper (the prune only drops spilling configs)
        return 9


def _spills(kind: str, prec, cfg: tuple, sm_major: int) -> bool:
    return sm_major in _STATIC_SPILLS.get((kind, prec, cfg), ())


def _conv_cfg(c) -> tuple:
    return (c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_warps, c.num_stages)


def _prune_conv(rows_arg: str, cols_arg: str, sm_major=None):
    """Drop configs whose tile exceeds the plane rounded up to a power of two, and configs known to
    spill on this GPU (keep the smallest config if none is left)."""

    def prune(configs, named_args, **kwargs):
        rows, cols = int(named_args[rows_arg]), int(named_args[cols_arg])
        bm_cap = max(16, triton.next_power_of_2(max(rows, 1)))
        bn_cap = max(16, triton.next_power_of_2(max(cols, 1)))
        major = sm_major if sm_major is not None else _current_sm_major()
        kept = [c for c in configs if c.kwargs["BM"] <= bm_cap and c.kwargs["BN"] <= bn_cap
                and not _spills("conv", kwargs.get("PREC"), _conv_cfg(c), major)]
        return kept or [min(configs, key=lambda c: c.kwargs["BM"] * c.kwargs["BN"])]

    return prune


def _prune_grad_weight(sm_major=None):
    """Drop grad_weight configs known to spill on this GPU (keep the first config if none is left)."""

    def prune(configs, named_args, **kwargs):
        major = sm_major if sm_major is not None else _current_sm_major()
        kept = [c for c in configs
                if not _spills("grad_weight", kwargs.get("PREC"), (c.kwargs["BK"], c.num_warps, c.num_stages), major)]
        return kept or configs[:1]

    return prune


def _conv_configs():
    return [
        triton.Config(dict(BM=bm, BN=bn, BK=bk), num_warps=w, num_stages=s) for bm, bn, bk, w, s in _CONV_CONFIGS
    ]


def _grad_weight_configs():
    return [triton.Config(dict(BK=bk), num_warps=w, num_stages=s) for bk, w, s in _GRAD_WEIGHT_CONFIGS]


#: False: launch one default configuration instead of autotuning (GPU correctness tests use it to
#: keep the number of compiles down; benchmarks and normal use leave it True)
AUTOTUNE = True

if INTERPRETED:
    _forward_tuned = _grad_input_tuned = _grad_weight_tuned = None
else:  # pragma: no cover - needs a GPU
    _forward_tuned = triton.autotune(
        configs=_conv_configs(), key=_CONV_KEY, prune_configs_by={"early_config_prune": _prune_conv("HO", "WO")}
    )(K.dwconv_forward_kernel)
    _grad_input_tuned = triton.autotune(
        configs=_conv_configs(), key=_CONV_KEY, prune_configs_by={"early_config_prune": _prune_conv("H", "W")}
    )(K.dwconv_grad_input_kernel)
    _grad_weight_tuned = triton.autotune(
        configs=_grad_weight_configs(), key=_GRAD_WEIGHT_KEY,
        prune_configs_by={"early_config_prune": _prune_grad_weight()},
    )(K.dwconv_grad_weight_kernel)


def _launch_conv(tuned, base, grid, rows: int, args, kwargs) -> None:
    """Launch a forward/grad_input kernel: fixed tiles under the interpreter, autotuned on the GPU (or one
    default config sized to the plane when AUTOTUNE is False)."""
    if INTERPRETED:
        base[grid](*args, **kwargs, **_INTERP_CONV)
    elif AUTOTUNE:
        tuned[grid](*args, **kwargs)
    else:
        bm = min(64, max(16, triton.next_power_of_2(max(rows, 1))))
        base[grid](*args, **kwargs, BM=bm, BN=16, BK=32, num_warps=4, num_stages=3)


def _launch_grad_weight(grid, args, kwargs) -> None:
    if INTERPRETED:
        K.dwconv_grad_weight_kernel[grid](*args, **kwargs, BK=_INTERP_GRAD_WEIGHT_BK)
    elif AUTOTUNE:
        _grad_weight_tuned[grid](*args, **kwargs)
    else:
        # 64x64 kernel blocks (K >= 33) spill registers with 4 warps (ptxas, sm_90): use 8
        warps = 8 if kwargs["BKH"] * kwargs["BKW"] >= 4096 else 4
        K.dwconv_grad_weight_kernel[grid](*args, **kwargs, BK=64, num_warps=warps, num_stages=3)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _is_channels_last(t: torch.Tensor) -> bool:
    """The output-format rule (:func:`lkconv.backends.base.output_memory_format`), as a bool."""
    return output_memory_format(t) == torch.channels_last


def _plane_fast(t: torch.Tensor) -> bool:
    """Order programs channel-fastest when channels are adjacent in memory (channels_last)."""
    return t.shape[1] > 1 and t.stride(1) == 1


def _max_inplane_offset(t: torch.Tensor) -> int:
    return (t.shape[2] - 1) * abs(t.stride(2)) + (t.shape[3] - 1) * abs(t.stride(3))


def _big(*ts: torch.Tensor) -> bool:
    # a little slack: masked lanes may compute offsets a tile (<= 128 rows/cols) past the edge
    return any(_max_inplane_offset(t) + 256 * (abs(t.stride(2)) + abs(t.stride(3))) >= _I32 for t in ts)


def _precision(dtype: torch.dtype):
    """input_precision for tl.dot: TF32 for fp32 only when PyTorch allows it for convolutions."""
    if dtype == torch.float32:
        return "tf32" if (not INTERPRETED and conv_tf32_enabled()) else "ieee"
    if dtype == torch.bfloat16 and INTERPRETED:
        return "ieee"  # operands are upcast to fp32 (see _upcast)
    return None


def _upcast(dtype: torch.dtype) -> bool:
    # the interpreter's tl.dot on bf16 operands is wrong (docs/triton_backend.md, "Interpreter caveat"): compute it in fp32
    return INTERPRETED and dtype == torch.bfloat16


def _flat_weight(weight: torch.Tensor, flip: bool = False) -> torch.Tensor:
    C, _, KH, KW = weight.shape
    w = weight.flip(2, 3) if flip else weight
    return w.reshape(C, KH * KW).contiguous()


#: how channels_last inputs are read: "strides" (directly, programs ordered channel-fastest so
#: neighbouring channels share cache lines) or "copy" (one explicit NCHW copy of the input first; the
#: output is still written channels_last).  A module-level switch for the GPU benchmark to compare;
#: both are tested under the interpreter.
CHANNELS_LAST_INPUT = "strides"


def _read_layout(t: torch.Tensor) -> torch.Tensor:
    if CHANNELS_LAST_INPUT == "copy" and _is_channels_last(t):
        return t.contiguous()
    return t


def _empty_like_format(shape, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return new_output(shape, ref, dtype, output_memory_format(ref))


def _device_guard(t: torch.Tensor):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    import contextlib

    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------
# passes
# ------------------------------------------------------------------------------------------------
def _conv(x, wflat, bias, out, KH, KW, stride, dilation, pt, pl):
    """out = Toeplitz convolution of x (forward kernel) with signed offsets (pt, pl)."""
    N, C, H, W = x.shape
    HO, WO = out.shape[2], out.shape[3]
    if out.numel() == 0:
        return out
    NC = N * C

    def grid(m):
        return (triton.cdiv(HO, m["BM"]) * triton.cdiv(WO, m["BN"]) * NC,)

    args = (
        x, wflat, bias if bias is not None else wflat, out,
        NC, C, H, W, HO, WO,
        *x.stride(), *out.stride(),
        pt, pl,
    )
    kwargs = dict(
        KH=KH, KW=KW, SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1],
        HAS_BIAS=bias is not None, PLANE_FAST=_plane_fast(x), BIG=_big(x, out),
        PREC=_precision(x.dtype), UPCAST=_upcast(x.dtype),
    )
    with _device_guard(x):
        _launch_conv(_forward_tuned, K.dwconv_forward_kernel, grid, HO, args, kwargs)
    return out


def forward(x: torch.Tensor, weight: torch.Tensor, bias, p: ConvParams) -> torch.Tensor:
    N, C, H, W = x.shape
    KH, KW = weight.shape[2], weight.shape[3]
    HO, WO = p.out_size(H, W, KH, KW)
    out = _empty_like_format((N, C, HO, WO), x, x.dtype)
    x = _read_layout(x)
    b = None if bias is None else bias.contiguous()
    t, _, l, _ = p.padding
    return _conv(x, _flat_weight(weight), b, out, KH, KW, p.stride, p.dilation, t, l)


def grad_input(grad_out: torch.Tensor, weight: torch.Tensor, input_shape: Sequence[int], p: ConvParams):
    N, C, H, W = (int(v) for v in input_shape)
    KH, KW = weight.shape[2], weight.shape[3]
    t, _, l, _ = p.padding
    dil_h, dil_w = p.dilation
    gx = _empty_like_format((N, C, H, W), grad_out, grad_out.dtype)
    grad_out = _read_layout(grad_out)
    if gx.numel() == 0:
        return gx
    if p.stride == (1, 1):
        # gx[h] = sum_k f[K-1-k] g[h + k*D - ((K-1)*D - P)]: the forward on grad_out with the flipped
        # filter and (signed) offsets (K-1)*D - P; only the top/left offsets matter, the output size is H x W
        return _conv(
            grad_out, _flat_weight(weight, flip=True), None, gx, KH, KW, (1, 1), p.dilation,
            (KH - 1) * dil_h - t, (KW - 1) * dil_w - l,
        )
    HO, WO = grad_out.shape[2], grad_out.shape[3]
    NC = N * C

    def grid(m):
        return (triton.cdiv(H, m["BM"]) * triton.cdiv(W, m["BN"]) * NC,)

    args = (
        grad_out, _flat_weight(weight), gx,
        NC, C, H, W, HO, WO,
        *grad_out.stride(), *gx.stride(),
        t, l,
    )
    kwargs = dict(
        KH=KH, KW=KW, SH=p.stride[0], SW=p.stride[1], DH=dil_h, DW=dil_w,
        PLANE_FAST=_plane_fast(grad_out), BIG=_big(grad_out, gx),
        PREC=_precision(grad_out.dtype), UPCAST=_upcast(grad_out.dtype),
    )
    with _device_guard(grad_out):
        _launch_conv(_grad_input_tuned, K.dwconv_grad_input_kernel, grid, H, args, kwargs)
    return gx


def _kblock(k: int) -> int:
    return min(64, max(16, triton.next_power_of_2(k)))


def _num_splits(rows: int, programs_per_split: int, device: torch.device) -> int:
    if INTERPRETED:
        return min(rows, 2)  # two splits: exercises the ordered reduction of partials
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(4 * sms, programs_per_split)
    # at least a few rows per program so the partials stay small next to the work
    return max(1, min(want, triton.cdiv(rows, 4)))


def grad_weight(grad_out: torch.Tensor, x: torch.Tensor, weight_shape: Sequence[int], p: ConvParams):
    C, _, KH, KW = (int(v) for v in weight_shape)
    N, _, H, W = x.shape
    HO, WO = grad_out.shape[2], grad_out.shape[3]
    rows = N * HO
    if rows == 0 or WO == 0:
        return torch.zeros((C, 1, KH, KW), dtype=x.dtype, device=x.device)
    x, grad_out = _read_layout(x), _read_layout(grad_out)
    BKH, BKW = _kblock(KH), _kblock(KW)
    per_split = C * triton.cdiv(KH, BKH) * triton.cdiv(KW, BKW)
    splits = _num_splits(rows, per_split, x.device)
    rows_per_split = triton.cdiv(rows, splits)
    splits = triton.cdiv(rows, rows_per_split)
    ws = new_output((splits, C, KH, KW), x, torch.float32)
    t, _, l, _ = p.padding
    args = (
        x, grad_out, ws,
        C, H, W, HO, WO, rows, rows_per_split,
        *x.stride(), *grad_out.stride(),
        t, l,
    )
    kwargs = dict(
        KH=KH, KW=KW, SH=p.stride[0], SW=p.stride[1], DH=p.dilation[0], DW=p.dilation[1],
        BIG=_big(x, grad_out), PREC=_precision(x.dtype), UPCAST=_upcast(x.dtype),
        BKH=BKH, BKW=BKW,
    )
    with _device_guard(x):
        _launch_grad_weight((per_split * splits,), args, kwargs)
    # deterministic: a fixed-order reduction over the splits (no atomics), one cast at the end
    return ws.sum(dim=0).to(x.dtype).reshape(C, 1, KH, KW)
