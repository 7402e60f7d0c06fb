"""What is compiled and modelled: the kernel table, the layer set, the Triton specialisations.

``KERNEL_TABLE`` is the single place that maps a kernel symbol (found by pattern in a cubin's function
list) to (backend, passes, role).  When kernels or files are renamed, update this table only.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

__all__ = ["KERNEL_TABLE", "ROLE_STATUS", "describe_symbol", "demangle", "Layer", "LAYERS", "DTYPES", "PASSES", "ARCHS",
           "SM_COUNT", "triton_conv_configs", "triton_grad_weight_configs", "triton_specs", "tile_of"]

# (regex on the demangled symbol, backend, passes, role); the first matching row wins
KERNEL_TABLE: List[Tuple[str, str, str, str]] = [
    (r"small_plane_mma_kernel", "cuda", "forward,grad_input", "sp_mma"),
    (r"small_plane_ffma_kernel", "cuda", "forward,grad_input", "sp_ffma"),
    (r"small_plane_gw_mma_kernel", "cuda", "grad_weight", "sp_gw_mma"),
    (r"small_plane_gw_rows_kernel", "cuda", "grad_weight", "sp_gw_rows"),
    (r"small_plane_gw_ffma_kernel", "cuda", "grad_weight", "sp_gw_ffma"),
    (r"toeplitz_tf32_kernel", "cuda", "forward,grad_input", "tc_toeplitz_tf32"),
    (r"toeplitz_mma_kernel", "cuda", "forward,grad_input", "tc_toeplitz_mma"),
    (r"toeplitz_wmma_kernel", "cuda", "forward,grad_input", "tc_toeplitz"),
    (r"fp32_rb_kernel", "cuda", "forward,grad_input", "fp32_rb"),
    (r"fp32_blocked_kernel", "cuda", "forward,grad_input", "fp32_direct"),
    (r"generic_conv_kernel", "cuda", "forward,grad_input", "fallback"),
    (r"grad_input_strided_kernel", "cuda", "grad_input", "fallback_strided"),
    (r"grad_weight_tc_kernel", "cuda", "grad_weight", "grad_weight_tc"),
    (r"grad_weight_ffma_kernel", "cuda", "grad_weight", "grad_weight_ffma"),
    (r"grad_weight_partial_kernel", "cuda", "grad_weight", "grad_weight_partial"),
    (r"grad_weight_reduce_kernel", "cuda", "grad_weight", "grad_weight_reduce"),
    (r"dwconv_forward_aligned_kernel", "triton", "forward,grad_input", "tr_conv_aligned"),
    (r"dwconv_forward_rows_kernel", "triton", "forward,grad_input", "tr_conv_rows"),
    (r"dwconv_grad_weight_diag_kernel", "triton", "grad_weight", "tr_grad_weight_diag"),
    (r"dwconv_grad_weight_aligned_kernel", "triton", "grad_weight", "tr_grad_weight_aligned"),
    (r"dwconv_batchrows_grad_weight_kernel", "triton", "grad_weight", "tr_batchrows_grad_weight"),
    (r"dwconv_batchrows_kernel", "triton", "forward,grad_input", "tr_batchrows"),
    (r"dwconv_forward_kernel|forward_kernel", "triton", "forward,grad_input", "tr_conv"),
    (r"dwconv_grad_input_kernel|grad_input_kernel", "triton", "grad_input", "tr_grad_input_strided"),
    (r"dwconv_grad_weight_kernel|grad_weight_kernel", "triton", "grad_weight", "tr_grad_weight"),
]

#: what the launchers route the RepLKNet layer set to by default ("default") and what they keep for other
#: shapes or behind a switch ("fallback": CUDA toeplitz_wmma_kernel only for K > 64, fp32_blocked_kernel
#: only for fp32 K > 64 (or where fp32_rb_kernel's shared memory does not fit), Triton's Toeplitz
#: aligned grad_weight only for planes wider than ops.DIAG_MAX_W,
#: grad_weight_partial_kernel outside the fast path's stride 1 / dilation 1 / K <= 64; Triton's
#: unaligned kernels behind ``ops.ALIGNED = False`` and for grad_input at stride > 1)
ROLE_STATUS: Dict[str, str] = {
    "tc_toeplitz_mma": "default", "fp32_rb": "default", "fp32_direct": "fallback", "grad_weight_tc": "default",
    "grad_weight_ffma": "default", "grad_weight_reduce": "default", "tr_conv_aligned": "default",
    "tr_grad_weight_diag": "default", "tr_conv_rows": "default", "tr_grad_weight_aligned": "fallback",
    "tr_batchrows": "default (H*W <= 256)", "tr_batchrows_grad_weight": "default (H*W <= 256)",
    "tr_grad_input_strided": "default (stride > 1)",
    "tc_toeplitz": "fallback", "fallback": "fallback", "fallback_strided": "fallback",
    "grad_weight_partial": "fallback", "tr_conv": "fallback", "tr_grad_weight": "fallback",
    "sp_mma": "default (planes <= 256 px)", "sp_ffma": "default (planes <= 256 px)",
    "sp_gw_mma": "default (planes <= 256 px)", "sp_gw_ffma": "default (planes <= 256 px)",
    "sp_gw_rows": "default (16-bit, stride 1, planes 9..16 wide)",
    "tc_toeplitz_tf32": "default (fp32 with TF32 allowed, planes > 256 px)",
}

ARCHS = (80, 90)
#: SMs of the GPU each arch is modelled/specialised for (A100 SXM, H100/H200 SXM)
SM_COUNT = {80: 108, 90: 132}
DTYPES = ("fp16", "bf16", "fp32", "tf32")       # tf32 = fp32 data with TF32 allowed (PyTorch's default)
PASSES = ("forward", "grad_input", "grad_weight")

_DEMANGLED: Dict[str, str] = {}


def demangle(sym: str) -> str:
    if sym not in _DEMANGLED:
        try:
            out = subprocess.run(["c++filt", sym], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        _DEMANGLED[sym] = out or sym
    return _DEMANGLED[sym]


def describe_symbol(sym: str) -> Dict:
    """``{name, backend, passes, role, dtype, template}`` of a symbol (role None when unknown)."""
    name = demangle(sym)
    for pat, backend, passes, role in KERNEL_TABLE:
        if re.search(pat, name):
            break
    else:
        backend, passes, role = None, "", None
    dtype = None
    if "__nv_bfloat16" in name or "bfloat16" in name:
        dtype = "bf16"
    elif "__half" in name:
        dtype = "fp16"
    elif re.search(r"<float\b|\(float|Ifloat|kernelIf", name + sym):
        dtype = "fp32"
    if dtype is None and role in ("grad_weight_ffma", "fp32_rb", "sp_ffma", "sp_gw_ffma"):  # fp32 by construction
        dtype = "fp32"
    if role == "tc_toeplitz_tf32" or (role == "sp_mma" and dtype == "fp32"):  # fp32 on TF32 tensor cores
        dtype = "tf32"
    m = re.search(r"<[^<>]*?,\s*(\d+),\s*(\d+)>", name)
    tmpl = (int(m.group(1)), int(m.group(2))) if m else None
    if tmpl is None and role == "tc_toeplitz_tf32":  # toeplitz_tf32_kernel<NB, DG>: two parameters only
        m = re.search(r"<\s*(\d+),\s*(\d+)>", name)
        tmpl = (int(m.group(1)), int(m.group(2))) if m else None
    return dict(name=name, backend=backend, passes=passes, role=role, dtype=dtype, template=tmpl)


@dataclass(frozen=True)
class Layer:
    C: int
    H: int
    K: int
    N: int = 64

    @property
    def label(self) -> str:
        return f"C{self.C}/H{self.H}/K{self.K}"

    @property
    def short(self) -> str:
        return f"{self.H}²/K{self.K}"


#: RepLKNet-31B at 224², batch 64 (stride 1, padding K//2)
LAYERS = (Layer(128, 56, 31), Layer(256, 28, 29), Layer(512, 14, 27), Layer(1024, 7, 13))


def tile_of(spec: Dict) -> str:
    c = spec["constexprs"]
    if spec["kernel"] == "dwconv_forward_aligned_kernel":
        return (f"{c['BM']}/{c['BN']}/{c['BK']}x{c['KHB']}{' packed' if c['PACKED'] else ''} "
                f"w{spec['num_warps']} s{spec['num_stages']}")
    if spec["kernel"] == "dwconv_grad_weight_aligned_kernel":
        return (f"{c['BKH']}x{16 * c['NA']}/BKC{c['BKC']}xR{c['R']} "
                f"w{spec['num_warps']} s{spec['num_stages']}")
    if spec["kernel"] == "dwconv_batchrows_grad_weight_kernel":
        return (f"G{c['HP'] * c['WP']}x{c['BHB'] * c['WOP']}/BKN{c['BKN']} w{spec['num_warps']} "
                f"s{spec['num_stages']}")
    if spec["kernel"] == "dwconv_batchrows_kernel":
        return f"rows{c['BM']}/{c['BN']}/K{c['KP']} w{spec['num_warps']} s{spec['num_stages']}"
    if spec["kernel"] == "dwconv_grad_weight_kernel":
        return f"{c['BKH']}x{c['BKW']}/BK{c['BK']} w{spec['num_warps']} s{spec['num_stages']}"
    if spec["kernel"] == "dwconv_forward_rows_kernel":
        return (f"rows {c['BM']}x{c['BN']}/BK{c['BK']}{' pack' + str(c['PACK']) if c['PACK'] > 1 else ''} "
                f"w{spec['num_warps']} s{spec['num_stages']}")
    if spec["kernel"] == "dwconv_grad_weight_diag_kernel":
        return f"diag {c['BM']}x{c['BN']}/{c['IMG']}x{c['BKR']} w{spec['num_warps']} s{spec['num_stages']}"
    return f"{c['BM']}/{c['BN']}/{c['BK']} w{spec['num_warps']} s{spec['num_stages']}"


# ------------------------------------------------------------------------------------------------
# Triton: configs as the launcher ships them (read from ops.py, pruned by its own prune function)
# ------------------------------------------------------------------------------------------------
def _ops():
    from lkconv.backends.triton import ops
    return ops


def triton_conv_configs(rows: int, cols: int, prec=None, arch: int = 90) -> List[Tuple[int, int, int, int, int]]:
    """(BM, BN, BK, warps, stages) of the forward/grad_input autotune list that survive the shipped
    ``_prune_conv`` for an output plane rows x cols on ``sm_<arch>``."""
    ops = _ops()
    kept = ops._prune_conv("R", "Q", sm_major=arch // 10)(ops._conv_configs(), {"R": rows, "Q": cols}, PREC=prec)
    return [(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_warps, c.num_stages) for c in kept]


def triton_grad_weight_configs(prec=None, arch: int = 90) -> List[Tuple[int, int, int]]:
    """(BK, warps, stages) of the grad_weight autotune list that survive the shipped ``_prune_grad_weight``."""
    ops = _ops()
    kept = ops._prune_grad_weight(sm_major=arch // 10)(ops._grad_weight_configs(), {}, PREC=prec)
    return [(c.kwargs["BK"], c.num_warps, c.num_stages) for c in kept]


def _prec(dtype: str):
    return {"fp32": "ieee", "tf32": "tf32"}.get(dtype)


def _elt(dtype: str) -> str:
    return {"fp16": "fp16", "bf16": "bf16"}.get(dtype, "fp32")


def _runtime_spec(kernel: str, values: Dict[str, int], constexprs: Dict, dtype: str, warps: int, stages: int) -> Dict:
    """The specialisation Triton's launcher applies: an int equal to 1 becomes a constexpr, an int that
    is a multiple of 16 (and every pointer: torch allocations are 256-byte aligned) gets divisibility 16,
    an int >= 2**31 is i64."""
    cons = dict(constexprs)
    div, ints = [], {}
    for n, v in values.items():
        if n.endswith("_ptr"):
            div.append(n)
        elif v == 1:
            cons[n] = 1
        else:
            if v % 16 == 0:
                div.append(n)
            ints[n] = "i64" if abs(v) >= 2**31 else "i32"
    return dict(kernel=kernel, dtype=_elt(dtype), ws_dtype="fp32", constexprs=cons, divisible=sorted(div),
                int_types=ints, num_warps=warps, num_stages=stages, values=values)


def grad_weight_splits(layer: Layer, arch: int, bkh: int, bkw: int) -> Tuple[int, int]:
    """(splits, rows_per_split) exactly as ops.grad_weight / _num_splits compute them."""
    rows = layer.N * layer.H
    per_split = layer.C * -(-layer.K // bkh) * -(-layer.K // bkw)
    want = -(-4 * SM_COUNT[arch] // per_split)
    splits = max(1, min(want, -(-rows // 4)))
    rps = -(-rows // splits)
    return -(-rows // rps), rps


def aligned_geometry(layer: Layer, pl: int) -> Dict[str, int]:
    """LBORD, PL16, WP (ops._aligned_input) and LB (ops._toeplitz_band, stride 1, dilation 1)."""
    from lkconv.backends.triton import kernels as TK
    a = TK.ALIGN
    lbord = pl % a
    wp = -(-(lbord + layer.H) // a) * a
    lb = -(-((ops_band_bn() - 1) + (layer.K - 1) + 1) // a) * a
    return dict(LBORD=lbord, PL16=pl - lbord, WP=wp, LB=lb)


def ops_band_bn() -> int:
    return _ops().BAND_BN


def aligned_conv_configs(ho: int, packed: bool, prec=None, arch: int = 90) -> List[Tuple[int, int, int, int, int]]:
    """(BM, BK, KHB, warps, stages) of the aligned forward list that survive the shipped prune on sm_<arch>."""
    ops = _ops()
    kept = ops._prune_aligned_conv_for(arch // 10)(ops._aligned_conv_configs(), {"HO": ho, "PACKED": packed},
                                                   PACKED=packed, PREC=prec)
    return [(c.kwargs["BM"], c.kwargs["BK"], c.kwargs["KHB"], c.num_warps, c.num_stages) for c in kept]


def aligned_grad_weight_splits(layer: Layer, arch: int, bkh: int, na: int, rs: int) -> Tuple[int, int, int]:
    """(splits, super-groups, super-groups per split) exactly as ops._grad_weight_aligned computes them."""
    sgroups = layer.N * -(-layer.H // rs)
    per_split = layer.C * -(-layer.K // bkh) * -(-layer.K // (16 * na))
    want = -(-8 * SM_COUNT[arch] // per_split)
    splits = max(1, min(want, -(-sgroups // 4)))
    sps = -(-sgroups // splits)
    return -(-sgroups // sps), sgroups, sps


def diag_grad_weight_splits(layer: Layer, arch: int, per_split: int) -> Tuple[int, int]:
    """(splits, images per split) exactly as ops._grad_weight_diag computes them."""
    splits = max(1, min(layer.N, -(-4 * SM_COUNT[arch] // per_split)))
    nps = -(-layer.N // splits)
    return -(-layer.N // nps), nps


def diag_grad_weight_specs(layer: Layer, dtype: str, arch: int) -> List[Dict]:
    """The diagonal grad_weight kernel (the default grad_weight for planes up to ops.DIAG_MAX_W wide) at
    stride 1 / dilation 1, one spec per config the shipped prune keeps; grad_out (W*esz a multiple of
    16 bytes) is read in place, else from the launcher's padded copy."""
    ops = _ops()
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    P = K // 2
    wq, bm, bn, hg = ops.diag_geometry(N, H, H, H, H, K, 1, 1)
    esz = 2 if dtype in ("fp16", "bf16") else 4
    vecs = [nb // esz for nb in (16, 8) if H % (nb // esz) == 0]  # ops._diag_g_vec on a fresh NCHW grad_out
    vec = vecs[0] if vecs else 16 // esz
    wog = -(-H // vec) * vec
    per_split = C * -(-K // (bm // wq))
    splits, nps = diag_grad_weight_splits(layer, arch, per_split)
    vals = dict(xg_ptr=0, g_ptr=0, z_ptr=0, ws_ptr=0, N=N, C=C, H=H, W=H, HO=H, WO=H, N_PER_SPLIT=nps, HG=hg,
                GPV=H * wog // vec, GRV=wog // vec, WOV=wog // vec, PT=P, PL=P, KH=K, KW=K)
    cons = dict(SH=1, SW=1, DH=1, DW=1, PREC=_prec(dtype), UPCAST=False, WQ=wq, VEC=vec, BM=bm, BN=bn,
                KWB=max(16, 1 << (K - 1).bit_length()))
    kept = ops._prune_diag_grad_weight_for(arch // 10)(ops._diag_configs(), {}, PREC=_prec(dtype), BM=bm, BN=bn)
    specs = []
    for c in kept:
        cfg = ops._diag_cfg(c)
        sp = _runtime_spec("dwconv_grad_weight_diag_kernel", vals, dict(cons, BKR=cfg[0], IMG=cfg[1]), dtype,
                           cfg[2], cfg[3])
        sp["splits"] = splits
        sp["g_copy"] = wog != H
        sp["default_config"] = cfg == tuple(ops._diag_default(bm, bn, _prec(dtype), arch // 10))
        specs.append(sp)
    return specs


def rows_conv_specs(layer: Layer, pass_: str, dtype: str, arch: int) -> List[Dict]:
    """The rows kernel (the default forward / stride-1 grad_input for planes of more than
    ops.ROWS_MIN_PIXELS pixels and at most ops.ROWS_MAX_W columns), one spec per config the shipped
    prune keeps; grad_input is the same kernel on grad_out (flipped band, offsets K-1-K//2)."""
    ops = _ops()
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    pt = K // 2 if pass_ == "forward" else K - 1 - K // 2
    wq, bn, hq, pack, khp = ops.rows_geometry(N, H, H, H, H, K, 1, 1)
    vals = dict(xq_ptr=0, t_ptr=0, b_ptr=0, y_ptr=0, N=N, C=C, H=H, HO=H, WO=H, HQ=hq, PT=pt,
                syn=C * H * H, syc=H * H, syh=H, syw=1, KH=K, KHP=khp)
    cons = dict(SH=1, DH=1, HAS_BIAS=False, PREC=_prec(dtype), UPCAST=False, WQ=wq, BN=bn, BM=ops.ROWS_BM,
                PACK=pack)
    kept = ops._prune_rows_for(arch // 10)(ops._rows_configs(), {}, PREC=_prec(dtype), WQ=wq, DH=1)
    specs = []
    for c in kept:
        bk, w, st = ops._rows_cfg(c)
        sp = _runtime_spec("dwconv_forward_rows_kernel", vals, dict(cons, BK=bk), dtype, w, st)
        sp["default_config"] = (bk, w, st) == tuple(ops._rows_default(wq, 1, _prec(dtype), arch // 10))
        specs.append(sp)
    return specs


def _aligned_specs(layer: Layer, pass_: str, dtype: str, arch: int, toeplitz: bool = False) -> List[Dict]:
    """The aligned kernels (the default path, ``ops.ALIGNED``) at stride 1: forward, grad_input
    (the same kernel on grad_out with the flipped band) and grad_weight (the diagonal kernel for planes
    up to ``ops.DIAG_MAX_W`` wide; ``toeplitz``: the Toeplitz aligned grad_weight kernel, its fallback
    for wider planes)."""
    ops = _ops()
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    P = K // 2
    common = dict(SH=1, SW=1, DH=1, BIG=False, PREC=_prec(dtype), UPCAST=False)
    specs = []
    if pass_ in ("forward", "grad_input") and not toeplitz and ops._rows_ok(H, H, H, H, K, 1, 1):
        specs = rows_conv_specs(layer, pass_, dtype, arch)
    elif pass_ in ("forward", "grad_input"):
        pl = P if pass_ == "forward" else K - 1 - P
        g = aligned_geometry(layer, pl)
        bm_max = max(c[0] for c in ops._ALIGNED_CONV_CONFIGS)
        packed = bool(ops._packed(N, H, bm_max))
        vals = dict(xp_ptr=0, t_ptr=0, b_ptr=0, y_ptr=0, N=N, C=C, H=H, W=H, WP=g["WP"], HO=H, WO=H,
                    sxp=H * g["WP"], syn=C * H * H, syc=H * H, syh=H, syw=1, PT=pl, PL16=g["PL16"],
                    LBORD=g["LBORD"], KH=K, LB=g["LB"])
        for bm, bk, khb, w, s in aligned_conv_configs(H, packed, _prec(dtype), arch):
            cons = dict(common, HAS_BIAS=False, PACKED=packed, BN=ops.BAND_BN, BM=bm, BK=bk, KHB=khb)
            sp = _runtime_spec("dwconv_forward_aligned_kernel", vals, cons, dtype, w, s)
            sp["default_config"] = (bm, bk, khb, w, s) == tuple(ops._default_aligned_conv(H, packed, _prec(dtype),
                                                                                           arch // 10))
            specs.append(sp)
    elif pass_ == "grad_weight" and not toeplitz and H <= ops.DIAG_MAX_W:
        specs = diag_grad_weight_specs(layer, dtype, arch)
    elif pass_ == "grad_weight":
        g = aligned_geometry(layer, P)
        bkh, na = ops._grad_weight_blocks(K, K)
        rs = ops._GRAD_WEIGHT_RS
        splits, sgroups, sps = aligned_grad_weight_splits(layer, arch, bkh, na, rs)
        vals = dict(xp_ptr=0, g_ptr=0, ws_ptr=0, C=C, H=H, WP=g["WP"], HO=H, WO=H, SGROUPS=sgroups,
                    SG_PER_SPLIT=sps, sxp=H * g["WP"], sgn=C * H * H, sgc=H * H, sgh=H, sgw=1, PT=P,
                    PL16=g["PL16"], KH=K, KW=K)
        kept = ops._prune_aligned_grad_weight_for(arch // 10)(ops._aligned_grad_weight_configs(), {},
                                                               PREC=_prec(dtype))
        for bkc, r, w, s in [(c.kwargs["BKC"], c.kwargs["R"], c.num_warps, c.num_stages) for c in kept]:
            cons = dict(common, DW=1, SW=1, BKH=bkh, NA=na, RS=rs, BKC=bkc, R=r)
            sp = _runtime_spec("dwconv_grad_weight_aligned_kernel", vals, cons, dtype, w, s)
            sp["splits"] = splits
            sp["default_config"] = (bkc, r, w, s) == ops._default_aligned_grad_weight(_prec(dtype), arch // 10)
            specs.append(sp)
    return specs


def triton_specs(layer: Layer, pass_: str, dtype: str, arch: int, stride: int = 1,
                 aligned: Optional[bool] = None) -> List[Dict]:
    """Every Triton launch the runtime would compile for (layer, pass, dtype): one spec per surviving
    autotune config.  ``aligned`` (default: the launcher's ``ops.ALIGNED``, True): the aligned kernels
    for forward, grad_input at stride 1 and grad_weight; False: the original (fallback) kernels.  forward and grad_input (stride 1) are the same kernel (grad_input: flipped filter,
    offsets K-1-K//2); bias is off (RepLKNet's large convolutions are followed by BatchNorm)."""
    if aligned is None:
        aligned = bool(_ops().ALIGNED)
    if aligned and pass_ in ("forward", "grad_input"):
        br = batchrows_specs(layer, pass_, dtype, arch, stride)
        if br:  # small planes: what ops.forward / ops.grad_input route to first
            return br
    if aligned and pass_ == "grad_weight":
        br = batchrows_grad_weight_specs(layer, dtype, arch, stride)
        if br:
            return br
    if aligned and stride == 1:
        return _aligned_specs(layer, pass_, dtype, arch)
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    P = K // 2
    common = dict(SH=stride, SW=stride, DH=1, DW=1, BIG=False, PREC=_prec(dtype), UPCAST=False)
    specs = []
    if pass_ in ("forward", "grad_input") and stride == 1:
        HO = WO = H
        pt = P if pass_ == "forward" else K - 1 - P
        vals = dict(x_ptr=0, w_ptr=0, b_ptr=0, y_ptr=0, NC=N * C, C=C, H=H, W=H, HO=HO, WO=WO,
                    sxn=C * H * H, sxc=H * H, sxh=H, sxw=1, syn=C * HO * WO, syc=HO * WO, syh=WO, syw=1,
                    PT=pt, PL=pt, KH=K, KW=K)
        for bm, bn, bk, w, s in triton_conv_configs(HO, WO, _prec(dtype), arch):
            cons = dict(common, HAS_BIAS=False, PLANE_FAST=False, BM=bm, BN=bn, BK=bk)
            specs.append(_runtime_spec("dwconv_forward_kernel", vals, cons, dtype, w, s))
    elif pass_ == "grad_input":  # stride > 1: the transposed-Toeplitz kernel
        HO = WO = (H + 2 * P - K) // stride + 1
        vals = dict(g_ptr=0, w_ptr=0, gx_ptr=0, NC=N * C, C=C, H=H, W=H, HO=HO, WO=WO,
                    sgn=C * HO * WO, sgc=HO * WO, sgh=WO, sgw=1, sxn=C * H * H, sxc=H * H, sxh=H, sxw=1,
                    PT=P, PL=P, KH=K, KW=K)
        for bm, bn, bk, w, s in triton_conv_configs(H, H, _prec(dtype), arch):
            cons = dict(common, PLANE_FAST=False, BM=bm, BN=bn, BK=bk)
            specs.append(_runtime_spec("dwconv_grad_input_kernel", vals, cons, dtype, w, s))
    elif pass_ == "grad_weight":
        HO = WO = (H + 2 * P - K) // stride + 1
        bkh = bkw = min(64, max(16, 1 << (K - 1).bit_length()))
        splits, rps = grad_weight_splits(layer, arch, bkh, bkw)
        vals = dict(x_ptr=0, g_ptr=0, ws_ptr=0, C=C, H=H, W=H, HO=HO, WO=WO, ROWS=N * HO, ROWS_PER_SPLIT=rps,
                    sxn=C * H * H, sxc=H * H, sxh=H, sxw=1, sgn=C * HO * WO, sgc=HO * WO, sgh=WO, sgw=1,
                    PT=P, PL=P, KH=K, KW=K)
        for bk, w, s in triton_grad_weight_configs(_prec(dtype), arch):
            cons = dict(common, BKH=bkh, BKW=bkw, BK=bk)
            sp = _runtime_spec("dwconv_grad_weight_kernel", vals, cons, dtype, w, s)
            sp["splits"] = splits
            specs.append(sp)
    return specs


def batchrows_specs(layer: Layer, pass_: str, dtype: str, arch: int, stride: int = 1) -> List[Dict]:
    """The batch-as-rows kernel (``ops.batchrows_applicable``) for forward / grad_input of a small plane,
    one spec per config that survives the shipped prune on sm_<arch>; [] where the rule declines."""
    ops = _ops()
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    P = K // 2
    HO = (H + 2 * P - K) // stride + 1
    trans = pass_ == "grad_input"
    ha, hb = (HO, H) if trans else (H, HO)
    esz = 2 if dtype in ("fp16", "bf16") else 4
    if not ops.batchrows_applicable(ha, ha, hb, hb, K, K, esz, sm_major=arch // 10, prec=_prec(dtype)):
        return []
    kp = ops._batchrows_kp(ha * ha)
    wbp = ops._batchrows_pitch(hb)
    vals = dict(a_ptr=0, t_ptr=0, b_ptr=0, y_ptr=0, N=N, C=C, M_PER=-(-N // 64), PT=P, KH=K)
    kept = ops._prune_batchrows_for(arch // 10)(ops._batchrows_configs(), {}, HB=hb, WBP=wbp, PREC=_prec(dtype),
                                                KP=kp, ESZ=esz)
    specs = []
    for c in kept:
        bm, bn, w, s = c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages
        cons = dict(HA=ha, WA=ha, HB=hb, WB=hb, WBP=wbp, SH=stride, DH=1, TRANS=trans, OUT_CL=False,
                    HAS_BIAS=False, PREC=_prec(dtype), UPCAST=False, BM=bm, BN=bn, KP=kp)
        sp = _runtime_spec("dwconv_batchrows_kernel", vals, cons, dtype, w, s)
        sp["default_config"] = (bm, bn, w, s) == tuple(ops._default_batchrows(hb * wbp))
        specs.append(sp)
    return specs


def batchrows_grad_weight_specs(layer: Layer, dtype: str, arch: int, stride: int = 1) -> List[Dict]:
    """The batch-as-rows grad_weight (``ops.batchrows_grad_weight_applicable``), one spec per config that
    survives the shipped prune on sm_<arch>; [] where the rule declines."""
    ops = _ops()
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    P = K // 2
    HO = (H + 2 * P - K) // stride + 1
    esz = 2 if dtype in ("fp16", "bf16") else 4
    if not ops.batchrows_grad_weight_applicable(H, H, HO, HO, K, K, esz, _prec(dtype), sm_major=arch // 10):
        return []
    hp, wp, wop, khp, kwp = ops._batchrows_gw_geometry(H, H, HO, K, K)
    bhb = ops._batchrows_gw_bhb(HO, wop)
    vals = dict(x_ptr=0, g_ptr=0, bw_ptr=0, ws_ptr=0, N=N, C=C, PT=P, PL=P, KH=K, KW=K)
    kept = ops._prune_batchrows_gw_for(arch // 10)(ops._batchrows_gw_configs(), {}, PREC=_prec(dtype))
    specs = []
    for c in kept:
        bkn, w, s = c.kwargs["BKN"], c.num_warps, c.num_stages
        cons = dict(H=H, W=H, HO=HO, WO=HO, HP=hp, WP=wp, WOP=wop, SH=stride, SW=stride, DH=1, DW=1,
                    PREC=_prec(dtype), UPCAST=False, BHB=bhb, BKN=bkn, KHP=khp, KWP=kwp)
        sp = _runtime_spec("dwconv_batchrows_grad_weight_kernel", vals, cons, dtype, w, s)
        sp["ptr_dtypes"] = {"bw_ptr": "fp32" if _prec(dtype) == "ieee" else "bf16"}
        sp["default_config"] = (bkn, w, s) == tuple(ops._default_batchrows_gw())
        sp["splits"] = -(-HO // bhb)
        specs.append(sp)
    return specs


def spec_key(spec: Dict) -> str:
    import json
    s = {k: v for k, v in spec.items() if k not in ("values", "splits", "default_config", "g_copy")}
    return json.dumps(s, sort_keys=True, default=str)


def shipped_triton_specs(arch: int) -> List[Dict]:
    """Every distinct Triton compile of the layer set (plus the stride-2 grad_input kernel once, so CI
    covers every shipped kernel), deduplicated by specialisation."""
    seen: Dict[str, Dict] = {}
    for layer in LAYERS:
        for dt in DTYPES:
            for aligned in (True, False):  # the default (aligned) kernels and the fallback ones
                for p in ("forward", "grad_weight"):
                    for sp in triton_specs(layer, p, dt, arch, aligned=aligned):
                        seen.setdefault(spec_key(sp), sp)
    for dt in DTYPES:
        for sp in triton_specs(LAYERS[0], "grad_input", dt, arch, stride=2):
            seen.setdefault(spec_key(sp), sp)
        for layer in LAYERS:  # the batch-as-rows grad_input (transposed operator) is its own compile
            for sp in batchrows_specs(layer, "grad_input", dt, arch):
                seen.setdefault(spec_key(sp), sp)
    # the Toeplitz aligned kernels as the fallbacks for planes wider than ops.ROWS_MAX_W / ops.DIAG_MAX_W
    # (the aligned forward is the default below 256 pixels anyway), compiled once at 56²/K31 geometry in
    # every dtype so that CI checks their configs too
    for dt in DTYPES:
        for p in ("forward", "grad_weight"):
            for sp in _aligned_specs(LAYERS[0], p, dt, arch, toeplitz=True):
                seen.setdefault(spec_key(sp), sp)
    return list(seen.values())

