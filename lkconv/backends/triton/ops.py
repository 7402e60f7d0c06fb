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

# aligned kernels (the default path, see ALIGNED): BN is fixed at 16 (the Toeplitz band is built for
# it); forward / grad_input (BM, BK input columns per kernel row, KHB kernel rows per dot, warps,
# stages) -- one dot has GEMM-K = KHB * BK; grad_weight (BKC input columns per output row, R output
# rows per dot, warps, stages) -- one dot has GEMM-K = R * BKC
_ALIGNED_CONV_CONFIGS = [
    (16, 16, 4, 2, 2),
    (32, 16, 4, 4, 3),
    (64, 16, 8, 4, 3),
    (64, 16, 16, 4, 2),
    (128, 16, 8, 8, 3),
]
_ALIGNED_GRAD_WEIGHT_CONFIGS = [(32, 2, 4, 3), (64, 1, 4, 3), (32, 4, 4, 3)]
_INTERP_ALIGNED_CONV = dict(BM=16, BK=16, KHB=2)
_INTERP_ALIGNED_GRAD_WEIGHT = dict(BKC=16, R=2)
#: grad_weight splits the rows of each image into super-groups of this many rows (a multiple of
#: every R above and of the interpreter's)
_GRAD_WEIGHT_RS = 4
BAND_BN = 16

# autotune keys: kernel size, plane sizes (input and output: the prune step looks at the output, which
# padding changes), geometry, layout (Triton's autotuner adds the dtypes)
_CONV_KEY = ["KH", "KW", "H", "W", "HO", "WO", "SH", "SW", "DH", "DW", "PLANE_FAST"]
_GRAD_WEIGHT_KEY = ["KH", "KW", "H", "W", "SH", "SW", "DH", "DW"]
_ALIGNED_CONV_KEY = ["KH", "LB", "H", "W", "HO", "WO", "SH", "SW", "DH", "PACKED"]
_ALIGNED_GRAD_WEIGHT_KEY = ["KH", "KW", "H", "WP", "HO", "WO", "SH", "SW", "DH", "DW", "BKH", "NA"]


# configs that spill registers, found by the static report (`python -m lkconv static`, ptxas of triton
# 3.8; benchmarks/results/static-*/kernels.csv): (kind, input_precision, config) -> the SM majors where
# it spills.  Pruned before autotuning; tests/test_static.py proves every surviving config spill-free.
_STATIC_SPILLS = {
    ("conv", "ieee", (64, 32, 64, 4, 3)): {8},          # sm_80: 92 B (forward), 304 B (strided grad_input)
    ("grad_weight", "ieee", (128, 8, 3)): {8, 9},              # sm_80 32x32 blocks: 60 B; sm_90 16x16 blocks: 4 B
    # aligned kernels, (BM, BK, KHB, warps, stages) / (BKC, R, warps, stages); "_packed": PACKED=True
    ("aligned_conv", None, (64, 16, 16, 4, 2)): {8},           # fp16/bf16 sm_80: 4 B
    ("aligned_conv", "ieee", (64, 16, 16, 4, 2)): {9},         # sm_90: 12 B
    ("aligned_conv", "ieee", (64, 16, 8, 4, 3)): {8},          # sm_80: 440 B
    ("aligned_conv_packed", "ieee", (64, 16, 8, 4, 3)): {8},   # sm_80: 592 B
    ("aligned_conv_packed", "ieee", (128, 16, 8, 8, 3)): {8},  # sm_80: 588 B
    ("aligned_conv_packed", "tf32", (64, 16, 16, 4, 2)): {8},  # sm_80: 24 B
    ("aligned_grad_weight", "ieee", (32, 4, 4, 3)): {8},       # sm_80: 380 B
    # found with triton 3.6 (torch 2.11's, and the GPU box's); triton 3.8 compiles them spill-free
    ("grad_weight", "tf32", (64, 4, 3)): {8},                  # sm_80 32x32 blocks: 16 B
    ("aligned_conv_packed", "tf32", (128, 16, 8, 8, 3)): {8},  # sm_80: 8 B
    ("aligned_grad_weight", "ieee", (32, 2, 4, 3)): {9},       # sm_90: 4 B
    # rows forward (BK, warps, stages) and diag grad_weight (BKR, IMG, warps, stages), triton 3.8, at the
    # 56² (64x64 tiles) and 28² (64x32) geometry; pruned for every tile width
    ("rows_conv", None, (128, 4, 3)): {8},                     # fp16/bf16 sm_80 64x64: 4 B
    ("rows_conv", None, (64, 4, 3)): {8},                      # triton 3.6: fp16/bf16 sm_80 64x32 pack2: 4 B
    ("rows_conv", "ieee", (64, 4, 3)): {8, 9},                 # sm_80 64x64: 868 B, 64x32: 172 B; sm_90: 16 B
    ("rows_conv", "ieee", (64, 8, 3)): {8},                    # sm_80: 4 B
    ("rows_conv", "ieee", (128, 4, 3)): {8, 9},                # sm_80: 2476 B; sm_90: 4 B
    ("diag_grad_weight", None, (32, 1, 4, 3)): {8},            # fp16/bf16 sm_80 64x64: 16 B
    ("diag_grad_weight", "ieee", (64, 1, 4, 3)): {8},          # sm_80: 9144 B (64x64), 3372 B (64x32)
    ("diag_grad_weight", "ieee", (32, 2, 4, 3)): {8},          # sm_80: 9168 B / 3528 B
    ("diag_grad_weight", "ieee", (16, 4, 4, 3)): {8},          # sm_80: 9152 B / 3520 B
    # batch-as-rows kernels, (BM, BN, warps, stages) / grad_weight (BKN, warps, stages)
    ("batchrows", "ieee", (64, 64, 4, 2)): {8, 9},             # 7x7 fp32: 460 B sm_80, 448 B sm_90
    ("batchrows_gw", None, (32, 4, 2)): {8},                   # 14x14 fp16/bf16 sm_80: 32 B
    ("batchrows_gw", "ieee", (64, 4, 2)): {8},                 # 7x7 fp32 sm_80: 13,280 B
    ("batchrows_gw", "tf32", (64, 4, 2)): {9},                 # 14x14 tf32 sm_90: 8 B
}


def _first_safe(kind: str, prec, sm_major: int, preferred: tuple, configs) -> tuple:
    """``preferred`` unless the static report found it spilling for this precision on this SM major,
    else the first config of ``configs`` that does not spill (``preferred`` if none)."""
    for cfg in [tuple(preferred)] + [tuple(c) for c in configs]:
        if not _spills(kind, prec, cfg, sm_major):
            return cfg
    return tuple(preferred)


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


def _aligned_conv_configs():
    return [
        triton.Config(dict(BM=bm, BK=bk, KHB=khb), num_warps=w, num_stages=s)
        for bm, bk, khb, w, s in _ALIGNED_CONV_CONFIGS
    ]


def _aligned_grad_weight_configs():
    return [
        triton.Config(dict(BKC=bkc, R=r), num_warps=w, num_stages=s) for bkc, r, w, s in _ALIGNED_GRAD_WEIGHT_CONFIGS
    ]


def _aligned_conv_cfg(c) -> tuple:
    return (c.kwargs["BM"], c.kwargs["BK"], c.kwargs["KHB"], c.num_warps, c.num_stages)


def _prune_aligned_conv_for(sm_major=None):
    """Aligned forward/grad_input: packed (small planes): keep the configs whose tile holds at least
    two planes; otherwise drop those whose BM exceeds the output rows rounded up to a power of two
    (keep the smallest if none is left); then drop the configs known to spill on this GPU (keep the
    smallest surviving one if none is left)."""

    def prune(configs, named_args, **kwargs):
        rows = int(named_args["HO"])
        packed = bool(kwargs.get("PACKED", named_args.get("PACKED")))
        if packed:
            kept = [c for c in configs if c.kwargs["BM"] >= 2 * rows]
            kept = kept or [max(configs, key=lambda c: c.kwargs["BM"])]
        else:
            bm_cap = max(16, triton.next_power_of_2(max(rows, 1)))
            kept = [c for c in configs if c.kwargs["BM"] <= bm_cap]
            kept = kept or [min(configs, key=lambda c: c.kwargs["BM"])]
        major = sm_major if sm_major is not None else _current_sm_major()
        kind = "aligned_conv_packed" if packed else "aligned_conv"
        safe = [c for c in kept if not _spills(kind, kwargs.get("PREC"), _aligned_conv_cfg(c), major)]
        return safe or kept[:1]

    return prune


_prune_aligned_conv = _prune_aligned_conv_for()


def _prune_aligned_grad_weight_for(sm_major=None):
    """Aligned grad_weight: drop the configs known to spill on this GPU (keep the first if none is left)."""

    def prune(configs, named_args, **kwargs):
        major = sm_major if sm_major is not None else _current_sm_major()
        kept = [c for c in configs if not _spills("aligned_grad_weight", kwargs.get("PREC"),
                                                  (c.kwargs["BKC"], c.kwargs["R"], c.num_warps, c.num_stages), major)]
        return kept or configs[:1]

    return prune


_prune_aligned_grad_weight = _prune_aligned_grad_weight_for()


#: output rows up to which the aligned forward packs whole planes of one channel into a tile
PACK_MAX_ROWS = 32


def _packed(n: int, ho: int, bm_max: int) -> bool:
    """Pack planes when at least two images and at least two planes fit the largest tile."""
    return n >= 2 and 2 * ho <= min(bm_max, 2 * PACK_MAX_ROWS)


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

if INTERPRETED:
    _forward_aligned_tuned = _grad_weight_aligned_tuned = None
else:  # pragma: no cover - needs a GPU
    _forward_aligned_tuned = triton.autotune(
        configs=_aligned_conv_configs(), key=_ALIGNED_CONV_KEY,
        prune_configs_by={"early_config_prune": _prune_aligned_conv},
    )(K.dwconv_forward_aligned_kernel)
    _grad_weight_aligned_tuned = triton.autotune(
        configs=_aligned_grad_weight_configs(), key=_ALIGNED_GRAD_WEIGHT_KEY,
        prune_configs_by={"early_config_prune": _prune_aligned_grad_weight},
    )(K.dwconv_grad_weight_aligned_kernel)

#: True (default): forward, grad_input at stride 1 and grad_weight run the aligned kernels (an
#: aligned zero-bordered copy of the input, a precomputed Toeplitz band; 16-byte vector loads).
#: False: the original kernels, which read every tensor through its strides.
ALIGNED = True


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


def _aligned_input(x: torch.Tensor, pl: int):
    """The aligned, zero-bordered copy the aligned kernels read: contiguous planes ``[N, C, H, WP]``
    whose rows start with ``LBORD = pl mod 16`` zero columns, then the ``W`` input columns, then
    zeros up to ``WP`` (a multiple of 16).  Returns ``(xp, PL16, LBORD, WP)`` with ``PL16 = pl -
    LBORD`` (a multiple of 16, possibly negative).  Extra memory: ``(WP - W) / W`` of |x| on top of
    one copy of x (at most 30 columns per row; docs/triton_backend.md has the table)."""
    N, C, H, W = x.shape
    a = K.ALIGN
    lbord = pl % a
    wp = triton.cdiv(lbord + W, a) * a
    xp = torch.empty((N, C, H, wp), dtype=x.dtype, device=x.device)
    if lbord:
        xp[..., :lbord].zero_()
    if lbord + W < wp:
        xp[..., lbord + W:].zero_()
    xp[..., lbord:lbord + W].copy_(x)
    return xp, pl - lbord, lbord, wp


def _toeplitz_band(weight: torch.Tensor, flip: bool, sw: int, dw: int, bn: int = BAND_BN):
    """The Toeplitz band ``[C, KH, LB, bn]`` of the aligned forward kernel: ``band[c, kh, r, n] =
    f[c, kh, (r - n*sw) / dw]``, zero where ``r - n*sw`` is not a multiple of ``dw`` in ``[0, KW*dw)``
    (``torch.where``, not a product, so an Inf in the filter stays out of the zeros); ``LB`` is the
    tile's input-column span ``(bn-1)*sw + (KW-1)*dw + 1`` rounded up to 16.  Returns ``(band, LB)``."""
    C, _, KH, KW = weight.shape
    w = weight.flip(2, 3) if flip else weight
    span = (bn - 1) * sw + (KW - 1) * dw + 1
    lb = triton.cdiv(span, K.ALIGN) * K.ALIGN
    r = torch.arange(lb, device=weight.device)[:, None]
    n = torch.arange(bn, device=weight.device)[None, :]
    d = r - n * sw
    valid = (d >= 0) & (d % dw == 0) & (d < KW * dw)
    idx = torch.where(valid, d // dw, torch.zeros_like(d))
    band = w.reshape(C, KH, KW)[:, :, idx]
    band = torch.where(valid, band, torch.zeros((), dtype=w.dtype, device=w.device))
    return band.contiguous(), lb


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


def _default_aligned_conv(ho: int, packed: bool, prec=None, sm_major: int = 9):
    """The non-autotuned config per shape class, the one the static model ranks best
    (docs/triton_backend.md, modelled table): packed planes of <= 8 rows: 128-row tiles; other packed
    planes: 64 rows, 8 kernel rows per dot; large planes: 64 rows, 16 kernel rows per dot; planes of
    one image with <= 32 rows: a tile sized to the plane.  A choice the static report found spilling
    for this input precision on this SM major (``_STATIC_SPILLS``) is replaced by the first config of
    the same BM that does not spill (the autotuner's prune applies the same rule)."""
    if packed:
        cfg = (128, 16, 8, 8, 3) if ho <= 8 else (64, 16, 8, 4, 3)
    else:
        bm = min(64, max(16, triton.next_power_of_2(max(ho, 1))))
        cfg = {16: (16, 16, 4, 2, 2), 32: (32, 16, 4, 4, 3)}.get(bm, (64, 16, 16, 4, 2))
    kind = "aligned_conv_packed" if packed else "aligned_conv"
    if _spills(kind, prec, cfg, sm_major):
        same = [c for c in _ALIGNED_CONV_CONFIGS if c[0] == cfg[0] and not _spills(kind, prec, c, sm_major)]
        small = [c for c in _ALIGNED_CONV_CONFIGS if not _spills(kind, prec, c, sm_major)]
        cfg = (same or small or [cfg])[0]
    return cfg


def _conv_aligned(x, weight, flip, bias, out, stride, dilation, pt, pl):
    """out = the Toeplitz convolution of x with (flipped) weight and signed offsets (pt, pl), by the
    aligned forward kernel (an aligned copy of x, a precomputed band)."""
    N, C, H, W = x.shape
    HO, WO = out.shape[2], out.shape[3]
    if out.numel() == 0:
        return out
    KH = weight.shape[2]
    xp, pl16, lbord, wp = _aligned_input(x, pl)
    band, lb = _toeplitz_band(weight, flip, stride[1], dilation[1])
    NC = N * C
    if INTERPRETED:
        bm_max = _INTERP_ALIGNED_CONV["BM"]
    else:  # autotuned or the per-shape-class defaults: the largest tile is 128 rows either way
        bm_max = max(c[0] for c in _ALIGNED_CONV_CONFIGS)
    packed = _packed(N, HO, bm_max)

    def grid(m):
        if packed:
            return (triton.cdiv(WO, BAND_BN) * triton.cdiv(N, m["BM"] // HO) * C,)
        return (triton.cdiv(HO, m["BM"]) * triton.cdiv(WO, BAND_BN) * NC,)

    args = (
        xp, band, bias if bias is not None else band, out,
        N, C, H, W, wp, HO, WO,
        H * wp, *out.stride(),
        pt, pl16, lbord,
        KH, lb,
    )
    kwargs = dict(
        SH=stride[0], SW=stride[1], DH=dilation[0],
        HAS_BIAS=bias is not None, BIG=_big(xp, out), PACKED=packed,
        PREC=_precision(x.dtype), UPCAST=_upcast(x.dtype), BN=BAND_BN,
    )
    base = K.dwconv_forward_aligned_kernel
    with _device_guard(x):
        if INTERPRETED:
            base[grid](*args, **kwargs, **_INTERP_ALIGNED_CONV)
        elif AUTOTUNE:
            _forward_aligned_tuned[grid](*args, **kwargs)
        else:
            bm, bk, khb, warps, stages = _default_aligned_conv(HO, packed, kwargs["PREC"], _current_sm_major())
            base[grid](*args, **kwargs, BM=bm, BK=bk, KHB=khb, num_warps=warps, num_stages=stages)
    return out


def forward(x: torch.Tensor, weight: torch.Tensor, bias, p: ConvParams) -> torch.Tensor:
    N, C, H, W = x.shape
    KH, KW = weight.shape[2], weight.shape[3]
    HO, WO = p.out_size(H, W, KH, KW)
    out = _empty_like_format((N, C, HO, WO), x, x.dtype)
    b = None if bias is None else bias.contiguous()
    t, _, l, _ = p.padding
    if ALIGNED and batchrows_applicable(H, W, HO, WO, KH, KW, x.element_size(), prec=_precision(x.dtype),
                                        channels=C):
        return _batchrows(x, weight, b, out, p.stride, p.dilation, t, l, trans=False)
    if ALIGNED:
        if out.numel() and _rows_ok(H, W, HO, WO, KH, p.stride[0], p.dilation[0]):
            return _conv_rows(x, weight, False, b, out, p.stride, p.dilation, t, l)
        return _conv_aligned(x, weight, False, b, out, p.stride, p.dilation, t, l)
    x = _read_layout(x)
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
    HO, WO = grad_out.shape[2], grad_out.shape[3]
    if ALIGNED and batchrows_applicable(HO, WO, H, W, KH, KW, grad_out.element_size(),
                                        prec=_precision(grad_out.dtype), channels=C):  # transposed operator
        return _batchrows(grad_out, weight, None, gx, p.stride, p.dilation, t, l, trans=True)
    if p.stride == (1, 1):
        # gx[h] = sum_k f[K-1-k] g[h + k*D - ((K-1)*D - P)]: the forward on grad_out with the flipped
        # filter and (signed) offsets (K-1)*D - P; only the top/left offsets matter, the output size is H x W
        if ALIGNED:
            conv = _conv_rows if _rows_ok(*grad_out.shape[2:], H, W, KH, 1, dil_h) else _conv_aligned
            return conv(
                grad_out, weight, True, None, gx, (1, 1), p.dilation,
                (KH - 1) * dil_h - t, (KW - 1) * dil_w - l,
            )
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


def _num_splits(rows: int, programs_per_split: int, device: torch.device, per_sm: int = 4) -> int:
    if INTERPRETED:
        return min(rows, 2)  # two splits: exercises the ordered reduction of partials
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(per_sm * sms, programs_per_split)
    # at least a few rows per program so the partials stay small next to the work
    return max(1, min(want, triton.cdiv(rows, 4)))


def grad_weight(grad_out: torch.Tensor, x: torch.Tensor, weight_shape: Sequence[int], p: ConvParams):
    C, _, KH, KW = (int(v) for v in weight_shape)
    N, _, H, W = x.shape
    HO, WO = grad_out.shape[2], grad_out.shape[3]
    rows = N * HO
    if rows == 0 or WO == 0:
        return torch.zeros((C, 1, KH, KW), dtype=x.dtype, device=x.device)
    if ALIGNED and batchrows_grad_weight_applicable(H, W, HO, WO, KH, KW, x.element_size(), _precision(x.dtype),
                                                    channels=C):
        return _batchrows_grad_weight(grad_out, x, C, KH, KW, p)
    if ALIGNED:
        if _diag_ok(x, grad_out, KH, p):
            return _grad_weight_diag(grad_out, x, C, KH, KW, p)
        return _grad_weight_aligned(grad_out, x, C, KH, KW, p)
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


def _default_aligned_grad_weight(prec=None, sm_major: int = 9):
    """The Toeplitz aligned grad_weight's non-autotuned config: BKC 32 x R 4 (the model's best), or the
    first config that does not spill for this precision on this SM major (``_STATIC_SPILLS``)."""
    for cfg in [(32, 4, 4, 3)] + _ALIGNED_GRAD_WEIGHT_CONFIGS:
        if not _spills("aligned_grad_weight", prec, cfg, sm_major):
            return cfg
    return (32, 4, 4, 3)


def _grad_weight_blocks(KH: int, KW: int):
    """(BKH, NA) of the aligned grad_weight kernel: GEMM-M = BKH kernel rows x NA groups of 16 kernel
    columns, at most 64 (K = 17..32: 32 x 2 = 64, so sm_90 can use wgmma)."""
    bkh = _kblock(KH)
    na = max(1, min(64 // bkh, triton.next_power_of_2(triton.cdiv(KW, 16))))
    return bkh, na


def _grad_weight_aligned(grad_out, x, C, KH, KW, p):
    N, _, H, W = x.shape
    HO, WO = grad_out.shape[2], grad_out.shape[3]
    rows = N * HO
    t, _, l, _ = p.padding
    xp, pl16, _, wp = _aligned_input(x, l)
    grad_out = _read_layout(grad_out)
    bkh, na = _grad_weight_blocks(KH, KW)
    per_split = C * triton.cdiv(KH, bkh) * triton.cdiv(KW, 16 * na)
    # super-groups of RS output rows of one image (RS a multiple of every tuned R), split into
    # contiguous ranges: the split does not depend on the config the autotuner picks
    rs = _GRAD_WEIGHT_RS
    sgroups = N * triton.cdiv(HO, rs)
    splits = _num_splits(sgroups, per_split, x.device, per_sm=8)
    sg_per_split = triton.cdiv(sgroups, splits)
    splits = triton.cdiv(sgroups, sg_per_split)
    ws = new_output((splits, C, KH, KW), x, torch.float32)
    args = (
        xp, grad_out, ws,
        C, H, wp, HO, WO, sgroups, sg_per_split,
        H * wp, *grad_out.stride(),
        t, pl16,
        KH, KW,
    )
    kwargs = dict(
        SH=p.stride[0], SW=p.stride[1], DH=p.dilation[0], DW=p.dilation[1],
        BIG=_big(xp, grad_out), PREC=_precision(x.dtype), UPCAST=_upcast(x.dtype),
        BKH=bkh, NA=na, RS=rs,
    )
    grid = (per_split * splits,)
    base = K.dwconv_grad_weight_aligned_kernel
    with _device_guard(x):
        if INTERPRETED:
            base[grid](*args, **kwargs, **_INTERP_ALIGNED_GRAD_WEIGHT)
        elif AUTOTUNE:
            _grad_weight_aligned_tuned[grid](*args, **kwargs)
        else:
            bkc, r, warps, stages = _default_aligned_grad_weight(kwargs["PREC"], _current_sm_major())
            base[grid](*args, **kwargs, BKC=bkc, R=r, num_warps=warps, num_stages=stages)
    # deterministic: a fixed-order reduction over the splits (no atomics), one cast at the end
    return ws.sum(dim=0).to(x.dtype).reshape(C, 1, KH, KW)


# ------------------------------------------------------------------------------------------------
# grad_weight by row outer products and a diagonal sum (kernels.dwconv_grad_weight_diag_kernel)
# ------------------------------------------------------------------------------------------------
#: the diagonal grad_weight kernel serves input and output rows up to this many columns (its GEMM-N is
#: the output width rounded up to a power of two, GEMM-M the input width; wider planes run the
#: Toeplitz kernel ``dwconv_grad_weight_aligned_kernel``, whose work grows with K instead of W)
DIAG_MAX_W = 128
#: (BKR output rows per image, IMG images per dot, warps, stages)
_DIAG_GRAD_WEIGHT_CONFIGS = [(32, 1, 4, 3), (64, 1, 4, 3), (32, 2, 4, 3), (16, 4, 4, 3), (32, 1, 8, 3)]
_DIAG_GRAD_WEIGHT_KEY = ["KH", "KW", "H", "W", "HO", "WO", "SH", "SW", "DH", "DW", "PT", "PL", "WQ", "BM", "BN"]
_INTERP_DIAG_GRAD_WEIGHT = dict(BKR=16, IMG=1)


def _diag_configs():
    return [triton.Config(dict(BKR=bkr, IMG=img), num_warps=w, num_stages=s)
            for bkr, img, w, s in _DIAG_GRAD_WEIGHT_CONFIGS]


def _diag_cfg(c) -> tuple:
    return (c.kwargs["BKR"], c.kwargs["IMG"], c.num_warps, c.num_stages)


def _prune_diag_grad_weight_for(sm_major=None):
    """Diagonal grad_weight: drop 4-warp configs of 128-row tiles (the accumulator alone would take 128
    registers a thread) and configs known to spill on this GPU (keep the first if none is left)."""

    def prune(configs, named_args, **kwargs):
        major = sm_major if sm_major is not None else _current_sm_major()
        bm = int(kwargs.get("BM", named_args.get("BM", 64)))
        bn = int(kwargs.get("BN", named_args.get("BN", 64)))
        kept = [c for c in configs if not (bm * bn > 64 * 64 and c.num_warps < 8)
                and not _spills("diag_grad_weight", kwargs.get("PREC"), _diag_cfg(c), major)]
        return kept or configs[-1:]

    return prune


if INTERPRETED:
    _grad_weight_diag_tuned = None
else:  # pragma: no cover - needs a GPU
    _grad_weight_diag_tuned = triton.autotune(
        configs=_diag_configs(), key=_DIAG_GRAD_WEIGHT_KEY,
        prune_configs_by={"early_config_prune": _prune_diag_grad_weight_for()},
    )(K.dwconv_grad_weight_diag_kernel)


def diag_geometry(N: int, H: int, W: int, HO: int, WO: int, KH: int, sh: int, dh: int):
    """(WQ, BM, BN, HG) of the diagonal grad_weight kernel: the input row width rounded up to a power
    of two (>= 16), GEMM-M = max(64, WQ) (whole input rows of BM // WQ kernel rows), GEMM-N = the
    output width rounded up to a power of two (>= 16), and the rows of the bordered input copy (x
    with ``(BM // WQ - 1) * dh`` zero rows above and below)."""
    wq = max(16, triton.next_power_of_2(W))
    bm = max(64, wq)
    bn = max(16, triton.next_power_of_2(WO))
    tb = (bm // wq - 1) * dh
    return wq, bm, bn, H + 2 * tb


def _bordered_rows(x: torch.Tensor, t: int, hg: int, wq: int) -> torch.Tensor:
    """Contiguous planes ``[N, C, hg, wq]`` with ``out[..., r, u] = x[..., r - t, u]``, zero outside x
    (only the border is zero-filled: one read of x, one write of the copy)."""
    N, C, H, W = x.shape
    xg = torch.empty((N, C, hg, wq), dtype=x.dtype, device=x.device)
    r0, r1 = min(max(t, 0), hg), max(min(hg, t + H), 0)
    r1 = max(r1, r0)
    xg[:, :, :r0].zero_()
    xg[:, :, r1:].zero_()
    if r1 > r0:
        if W < wq:
            xg[:, :, r0:r1, W:].zero_()
        xg[:, :, r0:r1, :W].copy_(x[:, :, r0 - t:r1 - t, :])
    return xg


def _diag_g_vec(g: torch.Tensor) -> int:
    """Elements per vector with which the diagonal kernel can read grad_out in place: the widest of 16
    and 8 bytes that divides its row length and start (contiguous NCHW only); 0: it needs a copy."""
    esz = g.element_size()
    if not g.is_contiguous():
        return 0
    for nbytes in (16, 8):
        vec = nbytes // esz
        if g.shape[3] % vec == 0 and g.data_ptr() % nbytes == 0:
            return vec
    return 0


def _diag_ok(x: torch.Tensor, grad_out: torch.Tensor, KH: int, p: ConvParams) -> bool:
    N, _, H, W = x.shape
    HO, WO = grad_out.shape[2], grad_out.shape[3]
    if max(W, WO) > DIAG_MAX_W:
        return False
    # int32 operand offsets: up to 4 images (IMG) of one channel's planes of the copies
    C = x.shape[1]
    wq, _, _, hg = diag_geometry(N, H, W, HO, WO, KH, p.stride[0], p.dilation[0])
    return 4 * C * max(hg * wq, HO * (WO + 8)) < _I32


def _diag_default(bm: int, bn: int, prec=None, sm_major: int = 9):
    """The non-autotuned default (BKR, IMG, warps, stages), the config the static model ranks best
    (docs/triton_backend.md): 16 rows of four images per dot for 64-column outputs, 32 rows of two
    images for narrower ones; 8 warps for the 128-wide tiles; a known-spilling choice is replaced by
    the first safe config."""
    if bm * bn > 64 * 64:
        return (32, 1, 8, 3)
    cfg = (16, 4, 4, 3) if bn >= 64 else (32, 2, 4, 3)
    return _first_safe("diag_grad_weight", prec, sm_major, cfg, _DIAG_GRAD_WEIGHT_CONFIGS)


def _grad_weight_diag(grad_out, x, C, KH, KW, p):
    N, _, H, W = x.shape
    HO, WO = grad_out.shape[2], grad_out.shape[3]
    sh, sw = p.stride
    dh, dw = p.dilation
    t, _, l, _ = p.padding
    wq, bm, bn, hg = diag_geometry(N, H, W, HO, WO, KH, sh, dh)
    # the bordered copy: xg[n, c, r, u] = x[n, c, r - tb, u], zero outside x
    xg = _bordered_rows(x, (hg - H) // 2, hg, wq)
    vec = _diag_g_vec(grad_out)
    if vec:  # read in place, vectors of vec elements (16 or 8 bytes)
        g, wog = grad_out, WO
    else:  # rows that are not 8-byte aligned (or not contiguous): a zero-padded contiguous copy
        vec = 16 // x.element_size()
        wog = triton.cdiv(WO, vec) * vec
        g = torch.zeros((N, C, HO, wog), dtype=grad_out.dtype, device=grad_out.device)
        g[..., :WO].copy_(grad_out)
    n_mt = triton.cdiv(KH, bm // wq)
    per_split = C * n_mt
    if INTERPRETED:
        splits = min(N, 2)  # two splits: exercises the ordered reduction of partials
    else:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        splits = max(1, min(N, triton.cdiv(4 * sms, per_split)))
    nps = triton.cdiv(N, splits)
    splits = triton.cdiv(N, nps)
    grid = (splits * per_split,)
    z = torch.empty((grid[0], bm, bn), dtype=torch.float32, device=x.device)
    ws = new_output((splits, C, KH, KW), x, torch.float32)
    args = (
        xg, g, z, ws,
        N, C, H, W, HO, WO, nps, hg,
        HO * wog // vec, wog // vec, wog // vec,
        t, l,
        KH, KW,
    )
    kwargs = dict(
        SH=sh, SW=sw, DH=dh, DW=dw, PREC=_precision(x.dtype), UPCAST=_upcast(x.dtype),
        WQ=wq, VEC=vec, BM=bm, BN=bn, KWB=max(16, triton.next_power_of_2(KW)),
    )
    base = K.dwconv_grad_weight_diag_kernel
    with _device_guard(x):
        if INTERPRETED:
            base[grid](*args, **kwargs, **_INTERP_DIAG_GRAD_WEIGHT)
        elif AUTOTUNE:
            _grad_weight_diag_tuned[grid](*args, **kwargs)
        else:
            bkr, img, warps, stages = _diag_default(bm, bn, kwargs["PREC"], _current_sm_major())
            base[grid](*args, **kwargs, BKR=bkr, IMG=img, num_warps=warps, num_stages=stages)
    # deterministic: a fixed-order reduction over the splits (no atomics), one cast at the end
    return ws.sum(dim=0).to(x.dtype).reshape(C, 1, KH, KW)


# ------------------------------------------------------------------------------------------------
# forward / stride-1 grad_input by whole-row Toeplitz bands (kernels.dwconv_forward_rows_kernel)
# ------------------------------------------------------------------------------------------------
#: the rows kernel serves planes of more than this many pixels (smaller planes: the packed aligned
#: kernel) and at most ROWS_MAX_W input and output columns (its GEMM-N is the whole output row)
ROWS_MIN_PIXELS = 256
ROWS_MAX_W = 128
ROWS_BM = 64
#: the most kernel rows one chunk may span (BK = KHB * WQ, dilation 1)
ROWS_MAX_KHB = 2
#: (BK input columns per dot, warps, stages)
_ROWS_CONFIGS = [(32, 4, 3), (64, 4, 3), (16, 8, 4), (64, 8, 3), (128, 4, 3)]
_ROWS_KEY = ["KH", "H", "HO", "WO", "HQ", "SH", "DH", "WQ", "BN", "PACK"]
_INTERP_ROWS = dict(BK=16)


def _rows_configs():
    return [triton.Config(dict(BK=bk), num_warps=w, num_stages=s) for bk, w, s in _ROWS_CONFIGS]


def _rows_cfg(c) -> tuple:
    return (c.kwargs["BK"], c.num_warps, c.num_stages)


def _prune_rows_for(sm_major=None):
    """Rows kernel: chunks wider than the input row only at dilation 1 and up to ROWS_MAX_KHB kernel rows
    (the copy and the band are padded for that), then drop configs known to spill on this GPU (keep the
    narrowest chunk if none is left)."""

    def prune(configs, named_args, **kwargs):
        wq = int(kwargs.get("WQ", named_args.get("WQ", 64)))
        dh = int(kwargs.get("DH", named_args.get("DH", 1)))
        major = sm_major if sm_major is not None else _current_sm_major()
        fit = [c for c in configs if c.kwargs["BK"] <= (wq * ROWS_MAX_KHB if dh == 1 else wq)]
        fit = fit or [min(configs, key=lambda c: c.kwargs["BK"])]
        kept = [c for c in fit if not _spills("rows_conv", kwargs.get("PREC"), _rows_cfg(c), major)]
        return kept or fit[:1]

    return prune


if INTERPRETED:
    _forward_rows_tuned = None
else:  # pragma: no cover - needs a GPU
    _forward_rows_tuned = triton.autotune(
        configs=_rows_configs(), key=_ROWS_KEY, prune_configs_by={"early_config_prune": _prune_rows_for()},
    )(K.dwconv_forward_rows_kernel)


def rows_geometry(N: int, H: int, W: int, HO: int, WO: int, KH: int, sh: int, dh: int):
    """(WQ, BN, HQ, PACK, KHP) of the rows kernel: the input row width rounded up to a power of two
    (>= 16), GEMM-N = the output width rounded up likewise, the rows of the copy (H: the kernel masks
    the padding rows instead of reading a zero border), the planes per 64-row tile (several images of
    one channel when at least two fit) and the kernel rows of the band (KH rounded up to a multiple of
    ROWS_MAX_KHB at dilation 1, for chunks of whole kernel rows)."""
    wq = max(16, triton.next_power_of_2(W))
    bn = max(16, triton.next_power_of_2(WO))
    khp = triton.cdiv(KH, ROWS_MAX_KHB) * ROWS_MAX_KHB if dh == 1 else KH
    hq = H
    pack = ROWS_BM // HO if (N >= 2 and 2 * HO <= ROWS_BM) else 1
    return wq, bn, hq, max(1, min(pack, N)), khp


def _rows_ok(H: int, W: int, HO: int, WO: int, KH: int, sh: int, dh: int) -> bool:
    if H * W <= ROWS_MIN_PIXELS or max(W, WO) > ROWS_MAX_W or HO <= 0 or WO <= 0:
        return False
    hq = (HO - 1) * sh + (KH + ROWS_MAX_KHB - 1) * dh + 1
    return hq * max(16, triton.next_power_of_2(W)) * 4 < _I32


def _rows_offsets_fit(N: int, C: int, hq: int, wq: int, pack: int, span: int) -> bool:
    """The rows kernel's in-tile row offsets (``pack`` planes of one channel, ``C`` planes apart, plus
    the ``span`` rows an output row and a kernel row reach, masked ones included) are int32."""
    return (pack * C * hq + span) * wq < _I32


def _row_band(weight: torch.Tensor, flip: bool, sw: int, dw: int, pl: int, W: int, WO: int, wq: int, bn: int,
              khp: int):
    """The whole-row Toeplitz band ``[C, khp, wq, bn]`` of the rows kernel (kernel rows ``>= KH`` zero): ``band[c, kh, u, j] =
    f[c, kh, (u - j*sw + pl) / dw]``, zero where ``u - j*sw + pl`` is not a multiple of ``dw`` in
    ``[0, KW*dw)``, for ``u >= W`` and for ``j >= WO`` (``torch.where``: an Inf in the filter stays
    out of the zeros)."""
    C, _, KH, KW = weight.shape
    w = weight.flip(2, 3) if flip else weight
    u = torch.arange(wq, device=weight.device)[:, None]
    j = torch.arange(bn, device=weight.device)[None, :]
    d = u - j * sw + pl
    valid = (d >= 0) & (d % dw == 0) & (d < KW * dw) & (u < W) & (j < WO)
    idx = torch.where(valid, d // dw, torch.zeros_like(d))
    band = w.reshape(C, KH, KW)[:, :, idx]
    band = torch.where(valid, band, torch.zeros((), dtype=w.dtype, device=w.device))
    if khp > KH:
        band = torch.cat([band, band.new_zeros((C, khp - KH, wq, bn))], dim=1)
    return band.contiguous()


def _rows_fit(bk: int, wq: int, dh: int) -> int:
    """The widest chunk <= bk the rows kernel accepts: at most ROWS_MAX_KHB whole kernel rows at
    dilation 1, at most one row otherwise (the prune's rule, for the fixed interpreter config)."""
    return min(bk, wq * ROWS_MAX_KHB if dh == 1 else wq)


def _rows_default(wq: int, dh: int, prec=None, sm_major: int = 9):
    """The non-autotuned default (BK, warps, stages), the config the static model ranks best
    (docs/triton_backend.md): chunks of two whole kernel rows (dilation 1; 128 columns at most),
    else of one kernel row up to 64 columns; a known-spilling choice is replaced by the first safe
    config that fits."""
    if dh == 1:
        cfg = (min(2 * wq, 128), 4, 3)
    else:
        cfg = (64, 4, 3) if wq >= 64 else ((32, 4, 3) if wq == 32 else (16, 8, 4))
    fits = [c for c in _ROWS_CONFIGS if c[0] <= _rows_fit(128, wq, dh)]
    return _first_safe("rows_conv", prec, sm_major, cfg, fits)


def _conv_rows(x, weight, flip, bias, out, stride, dilation, pt, pl):
    """out = the Toeplitz convolution of x with (flipped) weight and signed offsets (pt, pl), by the rows
    kernel (a row-bordered copy of x, a whole-row band)."""
    N, C, H, W = x.shape
    HO, WO = out.shape[2], out.shape[3]
    KH = weight.shape[2]
    sh, sw = stride
    dh, dw = dilation
    wq, bn, hq, pack, khp = rows_geometry(N, H, W, HO, WO, KH, sh, dh)
    if not _rows_offsets_fit(N, C, hq, wq, pack, (HO - 1) * sh + (khp - 1) * dh + 1 + abs(pt)):
        return _conv_aligned(x, weight, flip, bias, out, stride, dilation, pt, pl)
    # the copy only pads the rows to WQ columns (the padding rows are masked in the kernel); rows that
    # are already WQ wide, contiguous and 16-byte aligned are read in place
    if W == wq and x.is_contiguous() and x.data_ptr() % 16 == 0:
        xq = x
    else:
        xq = _bordered_rows(x, 0, hq, wq)
    band = _row_band(weight, flip, sw, dw, pl, W, WO, wq, bn, khp)
    if pack > 1:
        grid = (C * triton.cdiv(N, pack),)
    else:
        grid = (C * N * triton.cdiv(HO, ROWS_BM),)
    args = (
        xq, band, bias if bias is not None else band, out,
        N, C, H, HO, WO, hq, pt,
        *out.stride(),
        KH, khp,
    )
    kwargs = dict(
        SH=sh, DH=dh, HAS_BIAS=bias is not None, PREC=_precision(x.dtype), UPCAST=_upcast(x.dtype),
        WQ=wq, BN=bn, BM=ROWS_BM, PACK=pack,
    )
    base = K.dwconv_forward_rows_kernel
    with _device_guard(x):
        if INTERPRETED:
            base[grid](*args, **kwargs, BK=_rows_fit(_INTERP_ROWS["BK"], wq, dh))
        elif AUTOTUNE:
            _forward_rows_tuned[grid](*args, **kwargs)
        else:
            bk, warps, stages = _rows_default(wq, dh, kwargs["PREC"], _current_sm_major())
            base[grid](*args, **kwargs, BK=bk, num_warps=warps, num_stages=stages)
    return out


# ------------------------------------------------------------------------------------------------
# batch-as-rows kernels for small planes (batchrows.py): the N images are the GEMM rows, the whole
# plane one GEMM dimension; forward and grad_input (transposed operator), any stride / dilation
# ------------------------------------------------------------------------------------------------
from . import batchrows as KB  # noqa: E402

#: True (default): forward and grad_input of small planes (batchrows_applicable) run the batch-as-rows
#: kernel; False: the aligned / strided kernels as for every other plane.  ``ALIGNED = False`` (the
#: original strided kernels for everything) turns it off as well
BATCHROWS = True
#: the largest plane (elements, input and output) the batch-as-rows kernels take: GEMM-K is the padded
#: plane, one operand tile [BM, KP] and the formed operator [KP, BN] must fit registers / shared memory
BATCHROWS_MAX_PLANE = 256

# (BM images, BN result positions, warps, stages); BM = 64 so sm_90 issues wgmma
_BATCHROWS_CONFIGS = [
    (64, 32, 4, 2),
    (64, 64, 4, 2),
    (64, 64, 8, 2),
    (64, 128, 8, 2),
]
_INTERP_BATCHROWS = dict(BM=16, BN=16)
# autotune key: batch (the M dimension), kernel size, both planes, geometry, pass, output layout
# (Triton's autotuner adds the dtypes)
# (KW, the column stride/dilation and PL are in the band; HA..WBP, SH, DH, TRANS, OUT_CL are constexprs
# and part of Triton's own key as well)
_BATCHROWS_KEY = ["N", "C", "KH", "HA", "WA", "HB", "WB", "WBP", "SH", "DH", "TRANS", "OUT_CL"]


def batchrows_applicable(ha: int, wa: int, hb: int, wb: int, kh: int, kw: int, esz: int = 2,
                         sm_major=None, prec=None, channels: int = 1) -> bool:
    """The one applicability rule of the batch-as-rows kernels: both planes (the reduced one ``ha x wa``,
    the result ``hb x wb``) have 1..256 elements, the padded GEMM-K ``next_pow2(ha*wa)`` is at most
    twice the taps per output ``kh*kw`` (the dense operator then costs at most 2x the MACs of the direct
    sum; RepLKNet's 14x14/K27 and 7x7/K13: 256 <= 1458, 64 <= 338), and at least one config fits the
    GPU's shared memory for elements of ``esz`` bytes (on the GPU; fp32 at GEMM-K 256 on sm_80 does
    not); fp32 with IEEE products (``prec == "ieee"``: CUDA-core FMA, no tensor cores) only up to
    GEMM-K 64 (7x7: its compile and its FMA count stay small); ``channels * plane < 2**31`` (the
    kernels' image strides ``C*H*W`` are int32 products).  Any stride, dilation, padding."""
    pa, pb = ha * wa, hb * wb
    if not BATCHROWS or not (1 <= pa <= BATCHROWS_MAX_PLANE and 1 <= pb <= BATCHROWS_MAX_PLANE):
        return False
    if channels * max(pa, pb) > _I32:
        return False
    kp = _batchrows_kp(pa)
    if kp > 2 * kh * kw or (esz == 4 and prec == "ieee" and kp > 64):
        return False
    if INTERPRETED and sm_major is None:
        return True
    major = sm_major if sm_major is not None else _current_sm_major()
    return any(_batchrows_fits(cfg, kp, esz, major) for cfg in _BATCHROWS_CONFIGS)


#: shared memory per CTA (opt-in) by SM major: A100 163 KiB, H100/H200 227 KiB
_SMEM_OPTIN = {8: 163 * 1024, 9: 227 * 1024}


def _batchrows_fits(cfg: tuple, kp: int, esz: int, sm_major: int) -> bool:
    """Shared memory of a config, as the static report measures it (``stages`` A tiles [BM, KP], the
    operator [KP, BN], ~8 KiB for the epilogue's layout conversion): within the opt-in limit."""
    bm, bn, _, stages = cfg
    need = (stages * bm * kp + kp * bn) * esz + 8192
    return need <= _SMEM_OPTIN.get(sm_major, _SMEM_OPTIN[8])


def _batchrows_kp(pa: int) -> int:
    return max(16, triton.next_power_of_2(pa))


def _batchrows_pitch(wb: int) -> int:
    """Row pitch of plane B in GEMM-N: a power of two >= 8, so every band gather is 16-B aligned."""
    return max(8, triton.next_power_of_2(wb))


def _batchrows_band(weight, wa: int, wb: int, wbp: int, sw: int, dw: int, pl: int, trans: bool):
    """The width-Toeplitz band ``[C, KH, wa, wbp]`` of the batch-as-rows kernel: ``band[c, kh, k, n] =
    f[c, kh, d / dw]`` with ``d = k - n*sw + pl`` (forward) or ``n - k*sw + pl`` (transposed operator),
    zero where ``d`` is not a multiple of ``dw`` in ``[0, KW*dw)`` or ``n >= wb`` (``torch.where``, not a
    product: an Inf in the filter stays out of the zeros).  ``wa/KW * wbp`` times the filter."""
    C, _, KH, KW = weight.shape
    k = torch.arange(wa, device=weight.device)[:, None]
    n = torch.arange(wbp, device=weight.device)[None, :]
    d = (n - k * sw + pl) if trans else (k - n * sw + pl)
    valid = (d >= 0) & (d % dw == 0) & (d < KW * dw) & (n < wb)
    idx = torch.where(valid, d // dw, torch.zeros_like(d))
    band = weight.reshape(C, KH, KW)[:, :, idx]
    band = torch.where(valid, band, torch.zeros((), dtype=weight.dtype, device=weight.device))
    return band.contiguous()


def _batchrows_cfg(c) -> tuple:
    return (c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages)


def _batchrows_configs():
    return [triton.Config(dict(BM=bm, BN=bn), num_warps=w, num_stages=s) for bm, bn, w, s in _BATCHROWS_CONFIGS]


def _prune_batchrows_for(sm_major=None):
    """Drop configs whose BN exceeds the result plane rounded up to a power of two (keep the smallest),
    then those the static report found spilling on this GPU (keep the smallest surviving one)."""

    def prune(configs, named_args, **kwargs):
        pb = int(kwargs.get("HB", named_args.get("HB"))) * int(kwargs.get("WBP", named_args.get("WBP")))
        cap = max(16, triton.next_power_of_2(pb))
        kept = [c for c in configs if c.kwargs["BN"] <= cap] or [min(configs, key=lambda c: c.kwargs["BN"])]
        major = sm_major if sm_major is not None else _current_sm_major()
        a = named_args.get("a_ptr")
        esz = a.element_size() if hasattr(a, "element_size") else int(kwargs.get("ESZ", 2))
        kp = int(kwargs.get("KP", named_args.get("KP", 16)))
        kept = [c for c in kept if _batchrows_fits(_batchrows_cfg(c), kp, esz, major)] or kept[:1]
        safe = [c for c in kept if not _spills("batchrows", kwargs.get("PREC"), _batchrows_cfg(c), major)]
        return safe or kept[:1]

    return prune


def _default_batchrows(pb: int) -> tuple:
    """The non-autotuned config the static model ranks best (docs/triton_backend.md): GEMM-N (the pitched
    result plane ``HB*WBP``) above 64: BN = 128 with 8 warps (14x14: 224); otherwise BN = 64 (32 when
    GEMM-N is at most 32) with 4 warps (7x7: 56)."""
    if pb > 64:
        return (64, 128, 8, 2)
    return (64, 32 if pb <= 32 else 64, 4, 2)


if INTERPRETED:
    _batchrows_tuned = None
else:  # pragma: no cover - needs a GPU
    _batchrows_tuned = triton.autotune(
        configs=_batchrows_configs(), key=_BATCHROWS_KEY,
        prune_configs_by={"early_config_prune": _prune_batchrows_for()},
    )(KB.dwconv_batchrows_kernel)


def _batchrows_m_per(n_mt: int, programs_per_group: int, device) -> int:
    """M tiles per program: all of them (the operator formed once per channel tile) unless the grid
    would then have fewer than ~4 programs per SM."""
    if INTERPRETED:
        return max(1, n_mt)  # one group: every program loops over all its M tiles
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs_per_group >= 4 * sms:
        return max(1, n_mt)
    groups = min(n_mt, triton.cdiv(4 * sms, programs_per_group))
    return max(1, triton.cdiv(n_mt, groups))


def _batchrows(a, weight, bias, out, stride, dilation, pt, pl, trans: bool, m_per=None):
    """out = the batch-as-rows product of a's planes with the operator of ``weight`` (forward) or its
    transpose (grad_input, ``trans``); see :mod:`.batchrows`."""
    N, C, HA, WA = a.shape
    HB, WB = out.shape[2], out.shape[3]
    if out.numel() == 0:
        return out
    KH, KW = weight.shape[2], weight.shape[3]
    a = a.contiguous()  # contiguous NCHW planes (one copy for channels_last or sliced operands)
    wbp = _batchrows_pitch(WB)
    band = _batchrows_band(weight, WA, WB, wbp, stride[1], dilation[1], pl, trans)
    if out.is_contiguous():
        dst, out_cl = out, False
    elif out.is_contiguous(memory_format=torch.channels_last):
        dst, out_cl = out, True
    else:  # pragma: no cover - the launchers allocate one of the two formats
        dst, out_cl = torch.empty(out.shape, dtype=out.dtype, device=out.device), False
    kp = _batchrows_kp(HA * WA)
    pb = HB * wbp  # GEMM-N: plane B with row pitch wbp
    if INTERPRETED:
        cfg = dict(_INTERP_BATCHROWS)
    elif AUTOTUNE:
        cfg = None
    else:
        d = _default_batchrows(pb)
        major = _current_sm_major()
        if not _batchrows_fits(d, kp, a.element_size(), major) or _spills("batchrows", _precision(a.dtype), d, major):
            d = _batchrows_cfg(_prune_batchrows_for(major)(_batchrows_configs(), {"a_ptr": a}, HB=HB, WBP=wbp,
                                                           KP=kp, PREC=_precision(a.dtype))[0])
        bm, bn, warps, stages = d
        cfg = dict(BM=bm, BN=bn, num_warps=warps, num_stages=stages)
    # M_PER is a kernel argument, so it must not depend on the tuned config: every config has the same
    # BM, and the programs-per-SM estimate uses the smallest BN of the list
    bms = {c[0] for c in _BATCHROWS_CONFIGS}
    assert len(bms) == 1, "the batch-as-rows configs share one BM (M_PER is a kernel argument)"
    bm = cfg["BM"] if cfg else next(iter(bms))
    bn_est = cfg["BN"] if cfg else min(c[1] for c in _BATCHROWS_CONFIGS)
    n_mt = triton.cdiv(N, bm)
    mp = m_per if m_per is not None else _batchrows_m_per(n_mt, C * triton.cdiv(pb, bn_est), a.device)
    args = (a, band, bias if bias is not None else band, dst, N, C, mp, pt, KH)
    kwargs = dict(
        HA=HA, WA=WA, HB=HB, WB=WB, WBP=wbp, SH=stride[0], DH=dilation[0],
        TRANS=trans, OUT_CL=out_cl, HAS_BIAS=bias is not None,
        PREC=_precision(a.dtype), UPCAST=_upcast(a.dtype), KP=kp,
    )

    def grid(meta):
        return (C * triton.cdiv(triton.cdiv(N, meta["BM"]), mp) * triton.cdiv(pb, meta["BN"]),)

    with _device_guard(a):
        if cfg is None:
            _batchrows_tuned[grid](*args, **kwargs)
        else:
            KB.dwconv_batchrows_kernel[grid](*args, **kwargs, **cfg)
    if dst is not out:  # pragma: no cover
        out.copy_(dst)
    return out


# grad_weight: G = X^T @ dY per channel, then the diagonal sums as two one-hot products (batchrows.py).
# (BKN images per dot, warps, stages); the grad_out rows per program (BHB) follow from the plane
# (_batchrows_gw_bhb), since the partials' shape depends on them
_BATCHROWS_GW_CONFIGS = [
    (32, 4, 2),
    (64, 4, 2),
    (64, 8, 2),
]
_INTERP_BATCHROWS_GW = dict(BKN=16)
_BATCHROWS_GW_KEY = ["N", "C", "KH", "KW", "H", "W", "HO", "WO", "SH", "SW", "DH", "DW", "BHB"]
#: GEMM-N columns per grad_weight program (BHB grad_out rows of pitch WOP)
BATCHROWS_GW_BN = 64


def _batchrows_gw_geometry(h: int, w: int, wo: int, kh: int, kw: int):
    """(HP, WP, WOP, KHP, KWP): the input plane with power-of-two rows and pitch (GEMM-M = HP*WP), the
    grad_out row pitch, and the one-hot widths (>= 16 for tl.dot)."""
    hp, wp = triton.next_power_of_2(h), triton.next_power_of_2(w)
    if hp * wp < 16:
        wp = 16 // hp
    wop = triton.next_power_of_2(wo)
    return hp, wp, wop, max(16, triton.next_power_of_2(kh)), max(16, triton.next_power_of_2(kw))


def _batchrows_gw_bhb(ho: int, wop: int, bn: int = None) -> int:
    """grad_out rows per program: ``bn // WOP`` (at least one), no more than the plane's rows rounded up."""
    bn = BATCHROWS_GW_BN if bn is None else bn
    return max(1, min(triton.next_power_of_2(ho), bn // wop))


def batchrows_grad_weight_applicable(h: int, w: int, ho: int, wo: int, kh: int, kw: int, esz: int = 2,
                                     prec=None, sm_major=None, channels: int = 1) -> bool:
    """The rule of the batch-as-rows grad_weight: the forward's rule (batchrows_applicable: planes of at
    most 256 elements, dense GEMM-K at most twice the taps) with the input plane padded to power-of-two
    rows and pitch, ``HP*WP <= 256`` (14x14: 256, 7x7: 64), kernels of at most 64 x 64 (the one-hot
    operands), and a tile of at least 16 GEMM-N columns (``BHB*WOP >= 16``); fp32 IEEE only up to
    ``HP*WP = 64``, as the forward."""
    if not BATCHROWS or not batchrows_applicable(h, w, ho, wo, kh, kw, esz, sm_major, prec, channels):
        return False
    hp, wp, wop, khp, kwp = _batchrows_gw_geometry(h, w, wo, kh, kw)
    if esz == 4 and prec == "ieee" and hp * wp > 64:
        return False
    bn = _INTERP_BATCHROWS_GW_BN if INTERPRETED else BATCHROWS_GW_BN
    return hp * wp <= BATCHROWS_MAX_PLANE and khp <= 64 and kwp <= 64 and _batchrows_gw_bhb(ho, wop, bn) * wop >= 16


_INTERP_BATCHROWS_GW_BN = 32


def _gw_cfg(c) -> tuple:
    return (c.kwargs["BKN"], c.num_warps, c.num_stages)


def _prune_batchrows_gw_for(sm_major=None):
    """Drop the grad_weight configs the static report found spilling on this GPU (keep the first)."""

    def prune(configs, named_args, **kwargs):
        major = sm_major if sm_major is not None else _current_sm_major()
        kept = [c for c in configs if not _spills("batchrows_gw", kwargs.get("PREC"), _gw_cfg(c), major)]
        return kept or configs[:1]

    return prune


def _batchrows_gw_configs():
    return [triton.Config(dict(BKN=k), num_warps=w, num_stages=s) for k, w, s in _BATCHROWS_GW_CONFIGS]


def _default_batchrows_gw() -> tuple:
    """The non-autotuned grad_weight config the static model ranks best (docs/triton_backend.md)."""
    return _BATCHROWS_GW_CONFIGS[0]


if INTERPRETED:
    _batchrows_gw_tuned = None
else:  # pragma: no cover - needs a GPU
    _batchrows_gw_tuned = triton.autotune(
        configs=_batchrows_gw_configs(),
        key=_BATCHROWS_GW_KEY, prune_configs_by={"early_config_prune": _prune_batchrows_gw_for()},
    )(KB.dwconv_batchrows_grad_weight_kernel)


def _batchrows_onehot_w(wp: int, wop: int, kwp: int, kw: int, sw: int, dw: int, pl: int, dtype, device):
    """The width one-hot of the batch-as-rows grad_weight, ``[wp*wop, kwp]``: row ``q = iw*wop + ow``,
    ``1`` in column ``kw`` where ``iw - ow*sw + pl == kw*dw`` (``kw < KW``), else 0."""
    q = torch.arange(wp * wop, device=device)
    d = (q // wop) - (q % wop) * sw + pl
    k = torch.arange(kwp, device=device)
    return ((d[:, None] == k[None, :] * dw) & (k[None, :] < kw)).to(dtype).contiguous()


def _batchrows_grad_weight(grad_out, x, C, KH, KW, p):
    N, _, H, W = x.shape
    HO, WO = grad_out.shape[2], grad_out.shape[3]
    x = x.contiguous()          # contiguous NCHW planes (one copy for channels_last or sliced tensors)
    grad_out = grad_out.contiguous()
    hp, wp, wop, khp, kwp = _batchrows_gw_geometry(H, W, WO, KH, KW)
    bhb = _batchrows_gw_bhb(HO, wop, _INTERP_BATCHROWS_GW_BN if INTERPRETED else None)
    n_rt = triton.cdiv(HO, bhb)
    ws = torch.empty((n_rt, C, KH, KW), dtype=torch.float32, device=x.device)  # every element written
    t, _, l, _ = p.padding
    prec = _precision(x.dtype)
    bw = _batchrows_onehot_w(wp, wop, kwp, KW, p.stride[1], p.dilation[1], l,
                             torch.float32 if prec == "ieee" else torch.bfloat16, x.device)
    args = (x, grad_out, bw, ws, N, C, t, l, KH, KW)
    kwargs = dict(H=H, W=W, HO=HO, WO=WO, HP=hp, WP=wp, WOP=wop, SH=p.stride[0], SW=p.stride[1],
                  DH=p.dilation[0], DW=p.dilation[1], PREC=prec,
                  # the one-hot dots are bf16 for every dtype: upcast them under the interpreter always
                  UPCAST=bool(INTERPRETED), BHB=bhb, KHP=khp, KWP=kwp)
    grid = (C * n_rt,)
    base = KB.dwconv_batchrows_grad_weight_kernel
    with _device_guard(x):
        if INTERPRETED:
            base[grid](*args, **kwargs, **_INTERP_BATCHROWS_GW)
        elif AUTOTUNE:
            _batchrows_gw_tuned[grid](*args, **kwargs)
        else:
            d = _default_batchrows_gw()
            if _spills("batchrows_gw", prec, d, _current_sm_major()):
                kept = _prune_batchrows_gw_for()(_batchrows_gw_configs(), {}, PREC=prec)
                d = _gw_cfg(kept[0])
            bkn, warps, stages = d
            base[grid](*args, **kwargs, BKN=bkn, num_warps=warps, num_stages=stages)
    # deterministic: a fixed-order reduction over the row tiles (no atomics), one cast at the end
    return ws.sum(dim=0).to(x.dtype).reshape(C, 1, KH, KW)
