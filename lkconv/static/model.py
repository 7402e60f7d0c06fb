"""Floors and the throughput model.  Every time this module returns is **modelled**, never measured.

Per SM, time = max(issue, tensor pipe, shared-memory wavefronts) over the CTAs the busiest SM runs;
the pass's time is the larger of that and the HBM time of its compulsory traffic.  The per-CTA counts
are the kernel's own loop trip counts (replicated from the kernel's loop bounds for each CTA position)
times the SASS instruction counts of the loop bodies (compiler facts).  Constants and their sources:
docs/performance_model.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from .kernels import SM_COUNT, Layer

__all__ = ["Machine", "H100", "H200", "floors", "occupancy", "model_cuda", "model_triton", "ISSUE_EFF_LOW",
           "conflict_ways"]


@dataclass(frozen=True)
class Machine:
    name: str
    sms: int = 132
    clock_hz: float = 1.83e9            # boost clock at which the TC peak below is 2048 MAC/clk/SM
    issue_per_clk: float = 4.0          # 4 SMSPs, one warp instruction each per clock
    wgmma_mac_per_clk: float = 2048.0   # dense fp16/bf16 wgmma per SM (989.4 TF / 132 / 1.83 GHz / 2)
    mma_sync_mac_per_clk: float = 1024.0  # ASSUMED: legacy mma.sync at half the wgmma rate (unmeasured)
    smem_wavefronts_per_clk: float = 1.0  # 128 B per clock per SM
    hbm_Bps: float = 3.35e12
    tc16_flops: float = 989.4e12        # datasheet dense fp16/bf16
    tf32_flops: float = 494.7e12        # datasheet dense tf32
    ffma_flops: float = 66.9e12         # datasheet fp32 (CUDA cores)
    regs_per_sm: int = 65536
    smem_per_sm: int = 233472           # 228 KiB
    smem_reserved_per_cta: int = 1024
    max_threads: int = 2048
    max_ctas: int = 32


H100 = Machine("H100 SXM")
H200 = Machine("H200 SXM", hbm_Bps=4.8e12)
#: second number of every range: the issue-bound time at this issue efficiency (imperfect latency hiding)
ISSUE_EFF_LOW = 0.7


# ------------------------------------------------------------------------------------------------
# floors
# ------------------------------------------------------------------------------------------------
def _bytes(dtype: str) -> int:
    return 2 if dtype in ("fp16", "bf16") else 4


def floors(layer: Layer, dtype: str, m: Machine = H100) -> Dict[str, float]:
    """Floors of one pass (all three passes have the same), in seconds, and their ingredients."""
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    P = K // 2
    nominal = 2.0 * N * C * H * H * K * K
    pairs = sum(1 for oh in range(H) for kh in range(K) if 0 <= oh - P + kh < H)
    f_row = pairs / (H * K)
    d = max(K / (16 * math.ceil((t + K - 1) / 16)) for t in (8, 16, 32, 64, 128))
    nonpad = 2.0 * N * C * sum(1 for oh in range(H) for kh in range(K) if 0 <= oh - P + kh < H) * \
        sum(1 for ow in range(H) for kw in range(K) if 0 <= ow - P + kw < H)
    hbm_b = (2 * N * C * H * H + C * K * K) * _bytes(dtype)
    hbm = hbm_b / m.hbm_Bps
    tc_peak = m.tf32_flops if dtype in ("tf32", "fp32") else m.tc16_flops
    tc = max(hbm, nominal * f_row / d / tc_peak)
    hbm32 = (2 * N * C * H * H + C * K * K) * 4 / m.hbm_Bps
    ffma = max(hbm32, nominal / m.ffma_flops)
    return dict(nominal_flop=nominal, nonpad_flop=nonpad, f_row=f_row, d=d, hbm_s=hbm, tc_floor_s=tc,
                ffma_floor_s=ffma, ffma_nonpad_s=nonpad / m.ffma_flops, tc_ideal_s=nominal / tc_peak)


# ------------------------------------------------------------------------------------------------
# occupancy
# ------------------------------------------------------------------------------------------------
def occupancy(regs: int, threads: int, smem: int, m: Machine = H100) -> Dict:
    """Theoretical CTAs/SM and warps/SM (registers allocated per warp in 256-register units)."""
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    warps_by_regs = 4 * ((m.regs_per_sm // 4) // per_warp)
    lim = {"regs": warps_by_regs // warps, "threads": m.max_threads // threads, "ctas": m.max_ctas,
           "smem": m.smem_per_sm // (smem + m.smem_reserved_per_cta)}
    ctas = min(lim.values())
    limiter = min(lim, key=lambda k: lim[k])
    return dict(ctas_per_sm=ctas, limiter=limiter, warps_per_sm=ctas * warps,
                occupancy=ctas * warps / (m.max_threads // 32))


def conflict_ways(row_stride_bytes: int) -> int:
    """ldmatrix: 8 rows of 16 B; rows whose 16-B group (mod 8) collide serialise."""
    groups = [((r * row_stride_bytes) // 16) % 8 for r in range(8)]
    return max(groups.count(g) for g in set(groups))


# ------------------------------------------------------------------------------------------------
# helpers over SASS facts
# ------------------------------------------------------------------------------------------------
def _loops(f: Dict) -> List[Dict]:
    return f["sass"]["loops"]


def _pick(f: Dict, need=(), forbid=(), key="total", min_depth=0) -> Optional[Dict]:
    c = [lp for lp in _loops(f) if all(lp["mix"].get(n, 0) > 0 for n in need)
         and not any(lp["mix"].get(n, 0) > 0 for n in forbid) and lp["depth"] >= min_depth]
    return max(c, key=lambda lp: lp["mix"].get(key, 0)) if c else None


def _parent(f: Dict, lp: Dict) -> Optional[Dict]:
    ps = [p for p in _loops(f) if p["lo"] <= lp["lo"] and lp["hi"] <= p["hi"] and p is not lp
          and (p["lo"], p["hi"]) != (lp["lo"], lp["hi"])]
    return min(ps, key=lambda p: p["hi"] - p["lo"]) if ps else None


def _per(lp: Optional[Dict], unit: str, div: float = 1.0) -> float:
    if lp is None:
        return 0.0
    n = lp["mix"].get(unit, 0) / div
    return lp["mix"]["total"] / n if n else float(lp["mix"]["total"])


class _Acc:
    """Per-CTA cost arrays: issue (warp instructions), tensor MACs, smem wavefronts, FFMA lanes."""

    def __init__(self, n: int):
        self.issue = np.zeros(n)
        self.macs = np.zeros(n)
        self.wave = np.zeros(n)


def _busiest(acc: _Acc, tc_rate: float, m: Machine, sms: int) -> Dict:
    n = acc.issue.size
    sm = np.arange(n) % sms
    issue = np.bincount(sm, acc.issue, minlength=sms) / m.issue_per_clk
    tc = np.bincount(sm, acc.macs, minlength=sms) / tc_rate if tc_rate else np.zeros(sms)
    wave = np.bincount(sm, acc.wave, minlength=sms) / m.smem_wavefronts_per_clk
    per = np.maximum(np.maximum(issue, tc), wave)
    i = int(per.argmax())
    parts = {"issue": issue[i], "tensor": tc[i], "smem": wave[i]}
    return dict(cycles=float(per[i]), parts={k: float(v) / m.clock_hz for k, v in parts.items()},
                ctas=n, total_issue=float(acc.issue.sum()), total_macs=float(acc.macs.sum()))


def _finish(b: Dict, hbm_s: float, extra: Dict) -> Dict:
    b["parts"]["hbm"] = hbm_s
    lim = max(b["parts"], key=lambda k: b["parts"][k])
    lo = max(b["parts"].values())
    # the upper end of the range: the SM sustains only ISSUE_EFF_LOW of its peak rate (latency not hidden)
    hi = lo / ISSUE_EFF_LOW
    return dict(b, t_lo=lo, t_hi=hi, limiter=lim, **extra)


def _hbm(layer: Layer, dtype: str, m: Machine, extra_bytes: float = 0.0) -> float:
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    return ((2 * N * C * H * H + C * K * K) * _bytes(dtype) + extra_bytes) / m.hbm_Bps


def _tc_rate(f: Dict, dtype: str, m: Machine) -> float:
    mix = f["hot"]["mix"] if f.get("hot") else {}
    if mix.get("hgmma"):
        r = m.wgmma_mac_per_clk
    elif mix.get("hmma"):
        r = m.mma_sync_mac_per_clk
    else:
        return 0.0
    return r / 2 if dtype in ("tf32", "fp32") else r


# ------------------------------------------------------------------------------------------------
# CUDA kernels
# ------------------------------------------------------------------------------------------------
def _ceil(a, b):
    return -(-a // b)


def toeplitz_small_tile(Ho: int, Wo: int) -> bool:
    """The launcher's tile choice (csrc/dwconv_forward.cu, toeplitz_small_tile)."""
    big = _ceil(Ho, 64) * 64 * _ceil(Wo, 64) * 64
    small = _ceil(Ho, 16) * 16 * _ceil(Wo, 16) * 16
    return 2 * small <= big


def _model_toeplitz(f: Dict, layer: Layer, dtype: str, warps: int, nb: int, m: Machine, sms: int) -> Dict:
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    P = K // 2
    BM, BN, thr = 16 * warps, 16 * nb, 32 * warps
    KK = (K + 30) // 16
    ldx = 16 * (nb + KK - 1)
    rows = BM + K - 1
    stage = _pick(f, need=("sts",), forbid=("tensor", "barrier"), key="total")
    stage = max([lp for lp in _loops(f) if (lp["mix"].get("ldg", 0) or lp["mix"].get("ld_generic", 0))
                 and lp["mix"].get("sts", 0) and not lp["mix"].get("tensor")],
                key=lambda lp: lp["mix"]["total"], default=stage)
    build = _pick(f, need=("lds", "sts"), forbid=("ldg", "tensor"), min_depth=1)
    mma = f["hot"]
    kh_loop = _parent(f, mma)
    epi = _pick(f, need=("stg",), forbid=("tensor",))
    c_stage = _per(stage, "sts")
    c_build = _per(build, "sts")
    n_mma_body = mma["mix"].get("hmma", 0) / 2 or 1
    c_mma = mma["mix"]["total"] / n_mma_body
    c_kh = kh_loop["mix"]["total"] if kh_loop else 0
    c_epi = _per(epi, "stg")
    ca = conflict_ways(ldx * 2)
    cb = conflict_ways(32)
    gy, gz = _ceil(H, BN), _ceil(H, BM)
    tile_cost = []
    for z in range(gz):
        for y in range(gy):
            oh0, ow0 = z * BM, y * BN
            kh_lo = min(max(P - oh0 - BM + 1, 0), K)
            kh_hi = min(max(H + P - oh0, 0), K)
            issue = warps * _ceil(rows * ldx, thr) * c_stage
            wave = warps * _ceil(rows * ldx, thr)
            macs = 0.0
            for kh in range(kh_lo, kh_hi):
                issue += warps * (_ceil(KK * 256, thr) * c_build + c_kh)
                wave += warps * 2 * _ceil(KK * 256, thr)
                for w in range(warps):
                    ih0 = oh0 - P + w * 16 + kh
                    if not (ih0 + 15 >= 0 and ih0 < H):
                        continue
                    for kk in range(KK):
                        live = sum(1 for j in range(nb) if not (ow0 - P + 16 * (j + kk) + 15 < 0 or
                                                                ow0 - P + 16 * (j + kk) >= H))
                        issue += c_mma * max(live, 0.25)
                        macs += 4096 * live
                        wave += 4 * cb + 4 * ca * live
            issue += warps * _ceil(16 * BN, 32) * c_epi
            wave += warps * (nb * 8 + _ceil(16 * BN, 32))
            tile_cost.append((issue, macs, wave))
    tiles = np.array(tile_cost)
    # blockIdx.x = plane (fastest), then y, then z: linear id = nc + NC*(y + gy*z)
    NC = N * C
    acc = _Acc(NC * gy * gz)
    idx_tile = np.repeat(np.arange(gy * gz), NC)
    acc.issue, acc.macs, acc.wave = tiles[idx_tile, 0], tiles[idx_tile, 1], tiles[idx_tile, 2]
    b = _busiest(acc, _tc_rate(f, dtype, m), m, sms)
    useful = layer.N * C * H * H * K * K  # nominal MACs (padding taps included), as the floors count them
    return _finish(b, _hbm(layer, dtype, m), dict(
        tile=f"{BM}x{BN}", threads=thr, dyn_smem=int(BM * BN * 4 + rows * ldx * 2 + KK * 512 + _ceil(K * K * 2, 32) * 32),
        per_unit=dict(stage_per_elem=c_stage, build_per_elem=c_build, instr_per_mma=c_mma, epilogue_per_out=c_epi),
        conflicts=dict(A=ca, B=cb), mma_usefulness=useful / max(b["total_macs"], 1)))


def _model_fp32_blocked(f: Dict, layer: Layer, m: Machine, sms: int) -> Dict:
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    P = K // 2
    FB_H, FB_W = 32, 64
    ldx, rows = FB_W + K - 1, FB_H + K - 1
    stage = max([lp for lp in _loops(f) if lp["mix"].get("ldg", 0) and lp["mix"].get("sts", 0)],
                key=lambda lp: lp["mix"]["total"], default=None)
    fma = f["hot"]
    kh_loop = _parent(f, fma)
    c_stage = _per(stage, "sts")
    c_tap = fma["mix"]["total"] / (fma["mix"].get("ffma", 8) / 8)
    lds_tap = fma["mix"].get("lds", 0) / (fma["mix"].get("ffma", 8) / 8)
    c_kh = kh_loop["mix"]["total"] if kh_loop else 0
    gy, gz = _ceil(H, FB_W), _ceil(H, FB_H)
    tiles = []
    for z in range(gz):
        for y in range(gy):
            oh0, ow0 = z * FB_H, y * FB_W
            issue = 8 * _ceil(rows * ldx, 256) * c_stage
            wave = 8 * _ceil(rows * ldx, 256)
            for w in range(8):
                ohs = [oh0 + 4 * w + r for r in range(4) if oh0 + 4 * w + r < H]
                strips = [ow0 + 8 * s for s in range(8) if ow0 + 8 * s < H]
                if not ohs or not strips:
                    continue
                kh_lo = min(min(max(P - oh, 0), K) for oh in ohs)
                kh_hi = max(min(max(H + P - oh, 0), K) for oh in ohs)
                kw_lo = min(min(max(P - (ob + 7), 0), K) for ob in strips)
                kw_hi = max(min(max(H + P - ob, 0), K) for ob in strips)
                nkh, nkw = max(kh_hi - kh_lo, 0), max(kw_hi - kw_lo, 0)
                issue += nkh * (nkw * c_tap + c_kh)
                wave += nkh * nkw * lds_tap
            tiles.append((issue, 0.0, wave))
    t = np.array(tiles)
    NC = N * C
    acc = _Acc(NC * gy * gz)
    it = np.repeat(np.arange(gy * gz), NC)
    acc.issue, acc.macs, acc.wave = t[it, 0], t[it, 1], t[it, 2]
    b = _busiest(acc, 0.0, m, sms)
    return _finish(b, _hbm(layer, "fp32", m), dict(
        tile="32x64", threads=256, dyn_smem=int((rows * ldx + K * K) * 4),
        per_unit=dict(stage_per_elem=c_stage, instr_per_tap=c_tap, ffma_share=8 / c_tap)))


def cuda_grad_weight_splits(N: int, Ho: int, Wo: int, C: int) -> int:
    R = N * Ho * Wo
    s = min(_ceil(R, 2048), _ceil(2048, max(C, 1)), 1024, 65535)
    return max(s, 1)


def _model_grad_weight_partial(f: Dict, layer: Layer, dtype: str, m: Machine, sms: int) -> Dict:
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    taps = K * K
    P = min(taps, 256)
    L = 256 // P
    R = N * H * H
    splits = cuda_grad_weight_splits(N, H, H, C)
    chunk = _ceil(R, splits)
    main = f["hot"]  # the loop with the FMA and the loads (its nested ow-wrap loop excluded)
    c_step = main["mix"]["total"]
    wrap = [lp for lp in _loops(f) if (lp["lo"], lp["hi"]) in [tuple(c) for c in main["children"]]]
    c_wrap = sum(lp["mix"]["total"] for lp in wrap)
    cost_s = []
    for s in range(splits):
        pos = max(0, min(chunk, R - s * chunk))
        steps = _ceil(pos, L)
        issue = 0.0
        for base in range(0, taps, P):
            active = min(P, taps - base) * L
            warps = _ceil(active, 32)
            issue += warps * steps * (c_step + c_wrap * L / H) + 8 * 20
        cost_s.append(issue)
    cs = np.array(cost_s)
    acc = _Acc(C * splits)
    # blockIdx.x = c (fastest), blockIdx.y = split
    acc.issue = np.tile(cs, 1).repeat(C)  # id = c + C*s -> split index = id // C
    acc.wave = np.zeros_like(acc.issue)
    b = _busiest(acc, 0.0, m, sms)
    ws = splits * C * taps * 4 * 2
    return _finish(b, _hbm(layer, dtype, m, ws), dict(
        tile=f"P{P}xL{L}", threads=256, dyn_smem=0, splits=splits,
        per_unit=dict(instr_per_fma=c_step, wrap_loop=c_wrap),
        note="every step charged the load path (a warp executes it when any lane's tap is in the image)"))


def model_cuda(kfacts: Dict[str, Dict], layer: Layer, pass_: str, dtype: str, m: Machine = H100,
               sms: int = None) -> Optional[Dict]:
    """Model the CUDA backend's kernel for (layer, pass, dtype); kfacts = {symbol: facts} of one arch."""
    sms = sms or m.sms
    kd = "fp32" if dtype in ("fp32", "tf32") else dtype
    sp = model_small_plane(kfacts, layer, pass_, dtype, m, sms, {v: k for k, v in SM_COUNT.items()}.get(sms, 90))
    if sp is not None:  # both planes <= 256 pixels: the batch-as-rows kernels (csrc/dwconv_small_plane.cu)
        return sp

    def find(role, tmpl=None):
        for f in kfacts.values():
            if f.get("role") == role and f.get("dtype") == (kd if role != "fp32_direct" else f.get("dtype")) \
                    and (tmpl is None or f.get("template") == tmpl):
                return f
        return None

    if pass_ in ("forward", "grad_input"):
        if kd == "fp32":
            f = find("fp32_direct")
            r = _model_fp32_blocked(f, layer, m, sms)
        else:
            small = toeplitz_small_tile(layer.H, layer.H)
            w, nb = (1, 1) if small else (4, 4)
            f = find("tc_toeplitz", (w, nb))
            r = _model_toeplitz(f, layer, kd, w, nb, m, sms)
    else:
        f = find("grad_weight_partial")
        r = _model_grad_weight_partial(f, layer, kd, m, sms)
    occ = occupancy(f["regs"], r["threads"], r["dyn_smem"] + 0, m)
    return dict(r, kernel=f["name"], regs=f["regs"], occupancy=occ)


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------
def model_triton(facts: Dict, spec: Dict, layer: Layer, dtype: str, m: Machine = H100, sms: int = None) -> Dict:
    sms = sms or m.sms
    if spec["kernel"] == "dwconv_batchrows_kernel":
        return _model_batchrows(facts, spec, layer, dtype, m, sms)
    if spec["kernel"] == "dwconv_batchrows_grad_weight_kernel":
        return _model_batchrows_grad_weight(facts, spec, layer, dtype, m, sms)
    v, c = spec["values"], spec["constexprs"]
    hot = facts["hot"]
    body = hot["mix"]["total"] if hot else 0
    waves_it = (hot["mix"].get("sts", 0) + hot["mix"].get("lds", 0) + hot["mix"].get("ldsm", 0)) if hot else 0
    warps = spec["num_warps"]
    eb = _bytes(dtype)
    tc_rate = _tc_rate(facts, dtype, m) if dtype != "fp32" else 0.0
    extra_hbm = prep_bytes = 0.0
    if spec["kernel"] == "dwconv_forward_kernel":
        BM, BN, BK = c["BM"], c["BN"], c["BK"]
        HO, WO, H, W, KH, KW, PT, PL = v["HO"], v["WO"], v["H"], v["W"], v["KH"], v["KW"], v["PT"], v["PL"]
        n_tw, n_th = _ceil(WO, BN), _ceil(HO, BM)
        iters = []
        for t in range(n_th * n_tw):
            i0, j0 = (t // n_tw) * BM, (t % n_tw) * BN
            i_last = min(i0 + BM, HO) - 1
            kh_lo = max(PT - i_last, 0)
            kh_hi = min(max(H - 1 + PT - i0, -1) + 1, KH)
            c0 = j0 - PL
            L = (BN - 1) + (KW - 1) + 1
            k_lo, k_hi = max(-c0, 0), min(W - c0, L)
            n_chunks = _ceil(max(k_hi - k_lo, 0), BK)
            iters.append(max(kh_hi - kh_lo, 0) * n_chunks)
        it = np.array(iters, dtype=float)
        per_plane = n_th * n_tw
        n_prog = v["NC"] * per_plane
        prog_it = np.tile(it, v["NC"])  # pid: tile fastest, then plane
        macs_it = BM * BN * BK
        opnd_bytes = (BM * BK + BK * BN) * eb
        useful = layer.N * layer.C * HO * WO * KH * KW
    elif spec["kernel"] == "dwconv_forward_aligned_kernel":
        BM, BN, BK, KHB = c["BM"], c["BN"], c["BK"], c["KHB"]
        N, C, H, W, WO, HO = v["N"], v["C"], v["H"], v["W"], v["WO"], v["HO"]
        KH, LB, PT, PL16, LBORD = v["KH"], v["LB"], v["PT"], v["PL16"], v["LBORD"]
        n_tw = _ceil(WO, BN)
        if c["PACKED"]:
            pack = BM // HO
            n_grp = _ceil(N, pack)
            row_tiles = [(0, HO)]                 # every tile holds whole planes: rows 0 .. HO-1
            per_plane_tiles = n_tw
            n_prog = n_tw * n_grp * C
        else:
            row_tiles = [(i0, min(i0 + BM, HO)) for i0 in range(0, HO, BM)]
            n_prog = len(row_tiles) * n_tw * N * C
        iters = []
        for i0, i_end in row_tiles:
            kh_lo = max(PT - (i_end - 1), 0)
            kh_hi = min(max(H - 1 + PT - i0, -1) + 1, KH)
            for tw in range(n_tw):
                s_ = tw * BN - PL16
                k_lo = (max(LBORD - s_, 0) // 16) * 16
                k_hi = min(LBORD + W - s_, LB)
                n_chunks = _ceil(max(k_hi - k_lo, 0), BK)
                iters.append(_ceil(max(kh_hi - kh_lo, 0), KHB) * n_chunks)
        it = np.array(iters, dtype=float)        # pid: column tile fastest, then row tile / group, plane
        prog_it = np.tile(it, n_prog // it.size)
        macs_it = BM * BN * BK * KHB
        opnd_bytes = (BM * BK * KHB + BK * KHB * BN) * eb
        useful = layer.N * layer.C * HO * WO * KH * KH
        extra_hbm, prep_bytes = aligned_extra_bytes(layer, dtype, v["WP"], LB, "forward")
    elif spec["kernel"] == "dwconv_grad_weight_aligned_kernel":
        BKH, NA, RS, BKC, R = c["BKH"], c["NA"], c["RS"], c["BKC"], c["R"]
        C, HO, WO, KH, KW = v["C"], v["HO"], v["WO"], v["KH"], v["KW"]
        n_khb, n_kwb = _ceil(KH, BKH), _ceil(KW, 16 * NA)
        splits = spec["splits"]
        n_prog = C * n_kwb * n_khb * splits
        pid = np.arange(n_prog)
        s = pid // C // n_kwb // n_khb
        n_chunks = _ceil((WO - 1) + 15 + 1, BKC)
        g_lo = s * v["SG_PER_SPLIT"]
        g_hi = np.minimum(g_lo + v["SG_PER_SPLIT"], v["SGROUPS"])
        prog_it = (np.maximum(g_hi - g_lo, 0) * (RS // R) * n_chunks).astype(float)
        macs_it = BKH * NA * 16 * R * BKC
        opnd_bytes = (BKH * NA * R * BKC + R * BKC * 16) * eb
        useful = layer.N * layer.C * HO * WO * KH * KW
        extra_hbm, prep_bytes = aligned_extra_bytes(layer, dtype, v["WP"], 0, "grad_weight", splits)
    elif spec["kernel"] == "dwconv_forward_rows_kernel":
        BM, BN, BK, WQ, PACK = c["BM"], c["BN"], c["BK"], c["WQ"], c["PACK"]
        N, C, H, HO, KH, PT = v["N"], v["C"], v["H"], v["HO"], v["KH"], v["PT"]
        if PACK > 1:
            row_tiles = [(0, HO)]
            n_prog = C * _ceil(N, PACK)
        else:
            row_tiles = [(i0, min(i0 + BM, HO)) for i0 in range(0, HO, BM)]
            n_prog = C * N * len(row_tiles)
        iters = []
        for i0, i_end in row_tiles:                 # stride 1, dilation 1 (the layer set)
            kh_lo = max(PT - (i_end - 1), 0)
            kh_hi = min(max(H - 1 + PT - i0, -1) + 1, KH)
            khb, nuc = _ceil(BK, WQ), _ceil(WQ, BK)
            kh_lo = (kh_lo // khb) * khb
            iters.append(_ceil(max(kh_hi - kh_lo, 0), khb) * nuc)
        it = np.array(iters, dtype=float)           # pid: row tile fastest
        prog_it = np.tile(it, n_prog // it.size)
        macs_it = BM * BN * BK
        opnd_bytes = (BM * BK + BK * BN) * eb
        useful = layer.N * layer.C * HO * v["WO"] * KH * KH
        extra_hbm, prep_bytes = rows_extra_bytes(layer, dtype, v["HQ"], WQ, BN, v["KHP"])
    elif spec["kernel"] == "dwconv_grad_weight_diag_kernel":
        BM, BN, BKR, WQ, IMG = c["BM"], c["BN"], c["BKR"], c["WQ"], c["IMG"]
        N, C, H, HO, WO, KH, KW, PT = v["N"], v["C"], v["H"], v["HO"], v["WO"], v["KH"], v["KW"], v["PT"]
        KHT = BM // WQ
        n_mt = _ceil(KH, KHT)
        splits, nps = spec["splits"], v["N_PER_SPLIT"]
        n_prog = n_mt * C * splits
        pid = np.arange(n_prog)
        kh0 = (pid % n_mt) * KHT
        s = pid // n_mt // C
        kh_last = np.minimum(kh0 + KHT, KH) - 1
        i_lo = np.maximum(PT - kh_last, 0)                       # stride 1, dilation 1 (the layer set)
        i_hi = np.minimum(np.maximum(H - 1 + PT - kh0, -1) + 1, HO)
        n_ch = -(-np.maximum(i_hi - i_lo, 0) // BKR)
        n_img = np.maximum(np.minimum(s * nps + nps, N) - s * nps, 0)
        prog_it = (-(-n_img // IMG) * n_ch).astype(float)
        macs_it = BM * BN * BKR * IMG
        opnd_bytes = (BKR * BM + BKR * BN) * IMG * eb
        useful = layer.N * layer.C * HO * WO * KH * KW
        extra_hbm, prep_bytes = diag_extra_bytes(layer, dtype, v["HG"], WQ, v["GRV"] * c["VEC"], n_prog * BM * BN,
                                                 splits)
    else:  # dwconv_grad_weight_kernel
        BKH, BKW, BK = c["BKH"], c["BKW"], c["BK"]
        C, HO, WO, W, KH, KW, PL = v["C"], v["HO"], v["WO"], v["W"], v["KH"], v["KW"], v["PL"]
        ROWS, RPS = v["ROWS"], v["ROWS_PER_SPLIT"]
        n_khb, n_kwb = _ceil(KH, BKH), _ceil(KW, BKW)
        splits = spec["splits"]
        n_prog = C * n_khb * n_kwb * splits
        pid = np.arange(n_prog)
        kwb = (pid // C) % n_kwb
        s = pid // C // n_kwb // n_khb
        kw0 = kwb * BKW
        kw_last = np.minimum(kw0 + BKW, KW) - 1
        col_lo = np.maximum(kw0 - PL, 0)
        col_hi = np.minimum((WO - 1) + kw_last - PL + 1, W)
        n_chunks = -(-np.maximum(col_hi - col_lo, 0) // BK)
        q_lo = s * RPS
        q_hi = np.minimum(q_lo + RPS, ROWS)
        prog_it = (np.maximum(q_hi - q_lo, 0) * n_chunks).astype(float)
        macs_it = BKH * BKW * BK
        opnd_bytes = (BKH * BK + BK * BKW) * eb
        useful = layer.N * layer.C * HO * WO * KH * KW
    acc = _Acc(n_prog)
    # every program also runs the kernel's straight-line code once (index set-up, masks, epilogue
    # stores): all SASS outside loops, per warp -- an upper bound (both sides of every branch counted)
    straight = max(facts["sass"].get("n_instr", 0) - sum(lp["mix"]["total"] for lp in _loops(facts)), 0)
    acc.issue = prog_it * warps * body + warps * straight
    acc.macs = prog_it * (macs_it if tc_rate else 0)
    wave_it = warps * waves_it + (opnd_bytes / 128 if hot and hot["mix"].get("hgmma") else 0)
    acc.wave = prog_it * wave_it
    b = _busiest(acc, tc_rate, m, sms)
    threads = 32 * warps
    occ = occupancy(facts["regs"], threads, facts.get("dynamic_smem") or 0, m)
    total_macs = float(prog_it.sum()) * macs_it
    r = _finish(b, _hbm(layer, dtype, m, extra_hbm), dict(
        prep_us=prep_bytes / m.hbm_Bps * 1e6,
        threads=threads, dyn_smem=facts.get("dynamic_smem"), occupancy=occ, regs=facts["regs"],
        straight_line_instr=straight,
        per_unit=dict(instr_per_iter=body, macs_per_iter=macs_it, instr_per_kmac=body * warps / macs_it * 1000),
        mma_usefulness=useful / max(total_macs, 1)))
    if prep_bytes:  # the aligned copy and the band are separate (torch) kernels before this one: additive
        prep = prep_bytes / m.hbm_Bps
        r["parts"]["prep"] = prep
        r["t_lo"] += prep
        r["t_hi"] += prep
    return r


def batchrows_band_bytes(C: int, KH: int, WA: int, WBP: int, dtype: str) -> int:
    """Bytes of the batch-as-rows width-Toeplitz band ``[C, KH, WA, WBP]`` (ops._batchrows_band)."""
    return C * KH * WA * WBP * _bytes(dtype)


def _model_batchrows(facts: Dict, spec: Dict, layer: Layer, dtype: str, m: Machine, sms: int) -> Dict:
    """The batch-as-rows kernel (forward / grad_input of small planes).  Per program: the straight-line
    SASS once (forming F_c[:, tile] from the band, the prologue, the epilogue; both sides of every
    branch counted) plus the M-tile loop body per further M tile when the SASS has that loop (at N = 64
    and BM = 64 there is one M tile and the compiler leaves no loop); tensor MACs ``BM * KP * BN`` per
    M tile, padding included; HBM: x + y + w, plus the band (written by its torch kernel before the
    launch: additive, and read once by the kernel: L2 reuse across a channel's column tiles assumed)."""
    v, c = spec["values"], spec["constexprs"]
    warps = spec["num_warps"]
    BM, BN, KP = c["BM"], c["BN"], c["KP"]
    N, C, KH = v["N"], v["C"], v["KH"]
    np_ = c["HB"] * c["WBP"]
    n_nt, n_mt = _ceil(np_, BN), _ceil(N, BM)
    mper = v["M_PER"]
    n_grp = _ceil(n_mt, mper)
    n_prog = C * n_grp * n_nt
    g = (np.arange(n_prog) // n_nt) % n_grp
    tiles = np.minimum(mper, n_mt - g * mper).astype(float)
    whole = facts["sass"]["mix"]
    hot = facts.get("hot")
    mloop = hot if hot and hot["mix"].get("tensor", 0) + hot["mix"].get("ffma", 0) > 0 else None
    body = mloop["mix"]["total"] if mloop else 0
    straight = max(facts["sass"].get("n_instr", 0) - sum(lp["mix"]["total"] for lp in _loops(facts)), 0)
    if whole.get("hgmma"):
        tc_rate = m.wgmma_mac_per_clk
    elif whole.get("hmma"):
        tc_rate = m.mma_sync_mac_per_clk
    else:
        tc_rate = 0.0
    if dtype in ("tf32", "fp32"):
        tc_rate /= 2
    macs_tile = BM * KP * BN
    acc = _Acc(n_prog)
    acc.issue = warps * (straight + body * np.maximum(tiles - 1, 0))
    acc.macs = tiles * macs_tile if tc_rate else np.zeros(n_prog)
    waves = whole.get("sts", 0) + whole.get("lds", 0) + whole.get("ldsm", 0)
    opnd = (BM * KP + KP * BN) * _bytes(dtype)
    acc.wave = warps * waves + (tiles * opnd / 128 if whole.get("hgmma") else np.zeros(n_prog))
    b = _busiest(acc, tc_rate, m, sms)
    band = batchrows_band_bytes(C, KH, c["WA"], c["WBP"], dtype)
    occ = occupancy(facts["regs"], 32 * warps, facts.get("dynamic_smem") or 0, m)
    useful = layer.N * layer.C * c["HA"] * c["WA"] * c["HB"] * c["WB"]
    r = _finish(b, _hbm(layer, dtype, m, band), dict(
        prep_us=band / m.hbm_Bps * 1e6, threads=32 * warps, dyn_smem=facts.get("dynamic_smem"), occupancy=occ,
        regs=facts["regs"], straight_line_instr=straight,
        per_unit=dict(instr_per_iter=straight + body, macs_per_iter=macs_tile,
                      instr_per_kmac=(straight + body) * warps / macs_tile * 1000),
        mma_usefulness=useful / max(float(tiles.sum()) * macs_tile, 1)))
    prep = band / m.hbm_Bps  # the band's torch kernel runs before the launch: additive
    r["parts"]["prep"] = prep
    r["t_lo"] += prep
    r["t_hi"] += prep
    return r


def _model_batchrows_grad_weight(facts: Dict, spec: Dict, layer: Layer, dtype: str, m: Machine,
                                 sms: int) -> Dict:
    """The batch-as-rows grad_weight: per program (channel, tile of BHB grad_out rows) the batch loop
    (``ceil(N / BKN)`` trips of the hot loop: the operand loads and the G dot) plus the straight-line
    SASS once (the permute, the hi/lo split, both one-hot products, the partial store; both sides of
    every branch counted).  Tensor MACs: G (``KP x BN x N``) plus the one-hot products
    (``HP*BHB x WP*WOP x KWP`` and ``KHP x HP*BHB x KWP``, twice each for the hi/lo split).  HBM: x + dy +
    w, plus the fp32 partials (written, then read by the launcher's ordered sum)."""
    v, c = spec["values"], spec["constexprs"]
    warps = spec["num_warps"]
    N, C = v["N"], v["C"]
    HP, WP, WOP, BHB, BKN, KHP, KWP = c["HP"], c["WP"], c["WOP"], c["BHB"], c["BKN"], c["KHP"], c["KWP"]
    n_rt = _ceil(c["HO"], BHB)
    n_prog = C * n_rt
    trips = _ceil(N, BKN)
    hot = facts.get("hot")
    body = hot["mix"]["total"] if hot else 0
    straight = max(facts["sass"].get("n_instr", 0) - sum(lp["mix"]["total"] for lp in _loops(facts)), 0)
    whole = facts["sass"]["mix"]
    rate = m.wgmma_mac_per_clk if whole.get("hgmma") else (m.mma_sync_mac_per_clk if whole.get("hmma") else 0.0)
    if dtype in ("tf32", "fp32"):
        rate /= 2
    kp, bn = HP * WP, BHB * WOP
    split = 1 if c["PREC"] == "ieee" else 2
    macs_g = kp * bn * BKN * trips
    macs_1h = split * (HP * BHB * WP * WOP * KWP + KHP * HP * BHB * KWP)
    acc = _Acc(n_prog)
    acc.issue = np.full(n_prog, float(warps * (straight + body * trips)))
    acc.macs = np.full(n_prog, float(macs_g + macs_1h)) if rate else np.zeros(n_prog)
    waves = whole.get("sts", 0) + whole.get("lds", 0) + whole.get("ldsm", 0)
    acc.wave = np.full(n_prog, float(warps * waves + (trips * (kp + bn) * BKN * _bytes(dtype) / 128
                                                      if whole.get("hgmma") else 0)))
    b = _busiest(acc, rate, m, sms)
    partial = n_rt * C * layer.K * layer.K * 4 * 2
    occ = occupancy(facts["regs"], 32 * warps, facts.get("dynamic_smem") or 0, m)
    useful = layer.N * layer.C * c["H"] * c["W"] * c["HO"] * c["WO"]
    return _finish(b, _hbm(layer, dtype, m, partial), dict(
        prep_us=0.0, threads=32 * warps, dyn_smem=facts.get("dynamic_smem"), occupancy=occ, regs=facts["regs"],
        straight_line_instr=straight,
        per_unit=dict(instr_per_iter=body, macs_per_iter=kp * bn * BKN,
                      instr_per_kmac=(straight + body * trips) * warps / (macs_g + macs_1h) * 1000),
        mma_usefulness=useful / max(n_prog * float(macs_g + macs_1h), 1)))


def aligned_extra_bytes(layer: Layer, dtype: str, WP: int, LB: int, kind: str, splits: int = 0):
    """HBM bytes the aligned Triton path adds to a pass's compulsory traffic, split into (bytes the
    kernel itself moves beyond x + y + w, bytes of the separate preparation kernels):
    kernel: it reads the aligned copy (N*C*H*WP elements) instead of x (N*C*H*W), plus for forward the
    band (C*KH*LB*16 elements, read once; L2 reuse across the programs of a channel assumed), for
    grad_weight the fp32 partials (written, then read by the launcher's ``ws.sum``);
    preparation: the copy reads x and writes the bordered copy (+ the zeroed border columns), and the
    band is written once (its gather reads the filter, negligible)."""
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    eb = _bytes(dtype)
    x_el, xp_el = N * C * H * H, N * C * H * WP
    kern = (xp_el - x_el) * eb
    prep = (x_el + xp_el) * eb
    if kind == "forward":
        band = C * K * LB * 16 * eb
        kern += band
        prep += band
    else:
        kern += splits * C * K * K * 4 * 2
    return float(kern), float(prep)


def rows_extra_bytes(layer: Layer, dtype: str, HQ: int, WQ: int, BN: int, KHP: int):
    """(kernel, preparation) HBM bytes the rows kernel adds: it reads the column-padded copy
    (N*C*HQ*WQ elements, HQ = H: the padding rows are masked, zero-filled without a read) instead of x
    and the whole-row band (C*KHP*WQ*BN, once per channel: L2 reuse across the programs of a channel
    assumed); preparation: the copy (read x, write the copy) and the band write.  Rows already WQ wide
    (contiguous NCHW, as modelled) are read in place: no copy."""
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    eb = _bytes(dtype)
    x_el, xq_el, band = N * C * H * H, N * C * HQ * WQ, C * KHP * WQ * BN
    if WQ == H:
        return float(band * eb), float(band * eb)
    return float((xq_el - x_el + band) * eb), float((x_el + xq_el + band) * eb)


def diag_extra_bytes(layer: Layer, dtype: str, HG: int, WQ: int, WOG: int, z_elems: int, splits: int):
    """(kernel, preparation) HBM bytes the diagonal grad_weight path adds: the kernel reads the bordered
    copy (N*C*HG*WQ elements) instead of x, grad_out as it is or its padded copy (rows of WOG), writes
    and reads back its fp32 scratch Z (z_elems; counted both ways although the read-back normally hits
    L2) and the fp32 partials; preparation: the bordered copy (read x, write the copy) and, where the
    grad_out rows are not 16-byte aligned, the padded copy of grad_out (read, write)."""
    N, C, H = layer.N, layer.C, layer.H
    eb = _bytes(dtype)
    x_el = N * C * H * H
    xg_el = N * C * HG * WQ
    g_el = N * C * H * WOG
    kern = (xg_el - x_el + g_el - x_el) * eb + z_elems * 4 * 2 + splits * C * layer.K * layer.K * 4 * 2
    prep = (x_el + xg_el) * eb + ((x_el + g_el) * eb if WOG != H else 0)
    return float(kern), float(prep)


def percent(floor_s: float, t: float) -> float:
    return 100.0 * floor_s / t if t > 0 else float("nan")


# ------------------------------------------------------------------------------------------------
# CUDA v2 kernels: toeplitz_mma_kernel, grad_weight_tc_kernel, grad_weight_ffma_kernel
# ------------------------------------------------------------------------------------------------
def _round_up(a: int, b: int) -> int:
    return _ceil(a, b) * b


def cuda_vec_elems(row_stride: int, esz: int) -> int:
    """vec_elems (csrc/dwconv_mma.cuh) for a contiguous NCHW tensor of rows of ``row_stride`` elements
    (torch allocations are 256-byte aligned; the plane and image strides are multiples of the row's)."""
    for nbytes in (16, 8, 4):
        ve = nbytes // esz
        if ve < 2:
            break
        if row_stride % ve == 0:
            return ve
    return 1


TM_WARPS, TM_IMG, TM_MAX_SMEM_OPTIN = 4, 8, 227 * 1024  # H100: the per-block opt-in the launcher halves


def tm_s0(pl: int) -> int:
    return (-pl) % 8


def tm_layout(KH: int, KW: int, H: int, s0: int, nb: int, dg: int, bm: int) -> Dict[str, int]:
    """csrc/dwconv_forward.cu tm_layout (image-rows toeplitz_mma_kernel), element offsets and bytes."""
    nd = (KW + 15 + s0 + 15) // 16
    ngrp = _ceil(nd, dg)
    nch = nb + ngrp * dg - 1
    xc = 16 * nch
    rows = min(H, bm + KH - 1)
    ip = rows * xc + 8
    z_off = TM_IMG * ip
    fp = _round_up(16 * ngrp * dg + 24, 8)
    fe_off = _round_up(z_off + xc, 64)
    fo_off = fe_off + _round_up(KH * fp, 64) + 32
    return dict(nd=nd, ngrp=ngrp, nch=nch, xc=xc, rows=rows, fp=fp, bytes=(fo_off + KH * fp) * 2)


def toeplitz_mma_config(Wo: int, KW: int, pl: int) -> Tuple[int, int]:
    """toeplitz_mma_config (csrc/dwconv_forward.cu): (NB, DG)."""
    nd = (KW + 15 + tm_s0(pl) + 15) // 16
    return (2 if Wo <= 32 else 4, 3 if (nd == 3 or nd >= 5) else 2)


def toeplitz_mma_rows(KH: int, KW: int, H: int, Ho: int, pl: int, nb: int, dg: int,
                      optin: int = TM_MAX_SMEM_OPTIN) -> int:
    """toeplitz_mma_rows (csrc/dwconv_forward.cu): output rows per CTA (0: the launcher declines)."""
    def nbytes(bm):
        return tm_layout(KH, KW, H, tm_s0(pl), nb, dg, bm)["bytes"]
    bm = _round_up(Ho, 2)
    while bm > 2 and nbytes(bm) > optin // 2:
        bm = _round_up(bm // 2, 2)
    return bm if nbytes(bm) <= optin else 0


def _mem_ops(lp: Optional[Dict]) -> int:
    if lp is None:
        return 1
    mx = lp["mix"]
    return max(mx.get("cp_async", 0) + mx.get("ldg", 0) + mx.get("ld_generic", 0), 1)


def _image_rows_loops(f: Dict, nb: int, dg: int, nch_g: int, step: int) -> Dict:
    """The measured-static loop costs of an image-rows Toeplitz kernel (toeplitz_mma / toeplitz_tf32): one kernel
    row of one offset group (the hot loop over its unroll), the group and pair loops' own instructions, the
    cp.async vector and scalar staging loops per memory op.  ``step``: chunks per column block (block ob uses
    chunks step*ob + d, d < dg)."""
    mma = f["hot"]
    grp_loop = _parent(f, mma)
    pair_loop = _parent(f, grp_loop) if grp_loop else None
    sites_static = sum(1 for j in range(nch_g) for ob in range(nb) if 0 <= j - step * ob < dg)
    unroll = max(mma["mix"].get("hmma", 0) / (2 * sites_static), 1)
    loops = _loops(f)
    vec_loop = max([lp for lp in loops if lp["mix"].get("cp_async")], key=lambda lp: lp["mix"]["total"], default=None)
    sc_loop = max([lp for lp in loops if lp["mix"].get("ldg") and lp["mix"].get("sts")
                   and not lp["mix"].get("cp_async")], key=lambda lp: lp["mix"]["total"], default=None)
    return dict(c_kh=mma["mix"]["total"] / unroll,        # one kernel row of one group
                lds_kh=mma["mix"].get("lds", 0) / unroll,
                c_grp=grp_loop["mix"]["total"] if grp_loop else 0,
                c_pair=pair_loop["mix"]["total"] if pair_loop else 0,
                sites_static=sites_static, loops=loops,
                c_vec=vec_loop["mix"]["total"] / _mem_ops(vec_loop) if vec_loop else 25.0,
                c_sc=sc_loop["mix"]["total"] / _mem_ops(sc_loop) if sc_loop else 8.0)


def _image_rows_model(f: Dict, layer: Layer, dtype: str, lc: Dict, *, nb: int, dg: int, bm: int, L: Dict, s0: int,
                      imgs: int, warps: int, chunk: int, nch_g: int, step: int, macs_per_hmma: int, stage, c_stage: float,
                      ve: int, m: Machine, sms: int) -> Dict:
    """The per-CTA cost of an image-rows Toeplitz kernel over its grid: CTA = (channel, ``imgs`` images, bm output
    rows, 16*NB columns); ``stage(nimg, nrows) -> (issue, wavefronts)`` the CTA's staging; per warp its output-row
    pairs, each: per offset group with a chunk meeting the image (chunks of ``chunk`` columns) and kernel row of the
    pair's range one hot-loop pass (a chunk in the zero border is predicated off: its instructions issue, its HMMAs
    use no tensor time), the group and pair loops' own instructions; MACs 2 HMMA x ``macs_per_hmma`` per live
    (chunk, block) site; wavefronts 4 per live ldmatrix.x4, the hot loop's 32-bit A words."""
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    P = K // 2
    BN = 16 * nb
    c_kh, lds_kh, c_grp, c_pair = lc["c_kh"], lc["lds_kh"], lc["c_grp"], lc["c_pair"]
    gx_img, gy, gz = _ceil(N, imgs), _ceil(H, BN), _ceil(H, bm)
    tiles = []
    for gi in range(gx_img):
        nimg = min(imgs, N - imgs * gi)
        for z in range(gz):
            oh0 = z * bm
            ih_lo, ih_hi = max(oh0 - P, 0), min(oh0 + bm - 1 - P + K, H)
            nrows = max(ih_hi - ih_lo, 0)
            for y in range(gy):
                ow0 = y * BN
                c0 = ow0 - P - s0
                issue, wave = stage(nimg, nrows)
                macs = 0.0
                npairs = (min(H - oh0, bm) + 1) // 2
                for p in range(npairs):
                    oha = oh0 + 2 * p
                    nkh = max(min(H + P - oha, K) - max(P - oha - 1, 0), 0)
                    issue += c_pair
                    for g in range(L["ngrp"]):
                        live = [c0 + chunk * (dg * g + j) + chunk - 1 >= 0 and c0 + chunk * (dg * g + j) < H
                                for j in range(nch_g)]
                        if not any(live):
                            continue
                        sites = sum(1 for j in range(nch_g) if live[j] for ob in range(nb) if 0 <= j - step * ob < dg)
                        issue += c_grp + nkh * c_kh
                        macs += nkh * sites * 2 * macs_per_hmma
                        wave += nkh * (4 * sum(live) + lds_kh)
                tiles.append((issue, macs, wave))
    t = np.array(tiles).reshape(gx_img, gz, gy, 3)
    # blockIdx.x = c + C * image group (fastest), then y, then z
    acc = _Acc(C * gx_img * gy * gz)
    order = np.repeat(t.transpose(1, 2, 0, 3).reshape(-1, 3), C, axis=0)
    acc.issue, acc.macs, acc.wave = order[:, 0], order[:, 1], order[:, 2]
    b = _busiest(acc, _tc_rate(f, dtype, m), m, sms)
    useful = N * C * H * H * K * K
    return _finish(b, _hbm(layer, dtype, m), dict(
        tile=f"8img x {bm}x{BN}", threads=32 * warps, dyn_smem=int(L["bytes"]), vec_x=ve, rows_per_cta=bm,
        per_unit=dict(instr_per_kh=c_kh, instr_per_group=c_grp, instr_per_pair=c_pair, stage_per_vector=c_stage,
                      instr_per_hmma=c_kh / (2 * lc["sites_static"])),
        mma_usefulness=useful / max(b["total_macs"], 1)))


def _model_toeplitz_mma(f: Dict, layer: Layer, dtype: str, nb: int, dg: int, m: Machine, sms: int) -> Dict:
    """toeplitz_mma_kernel<T, NB, DG> (image-rows tiling): CTA = (channel, 8 images, bm output rows, 16*NB
    columns).  Per CTA: the staging of the needed input rows of its images (cp.async vectors of vec_x
    elements, or scalar), the zero row, filter rows Fe and the shifted copy Fo; per warp its output-row
    pairs, each: per Toeplitz-offset group and kernel row of the pair's range one pass of the measured-static
    hot-loop body (all NB + DG - 1 chunk blocks: a chunk in the zero border is predicated off, so its
    instructions still issue but its HMMAs use no tensor time), the group loop's and the pair loop's own
    instructions (the pair loop holds the epilogue: static count, both store paths = upper bound).  MACs: 2
    HMMA.16816 (2048 MACs each) per live (chunk, block) site.  Shared-memory wavefronts: 4 per live
    ldmatrix.x4, 1 per 32-bit A word, the staging stores."""
    H, K = layer.H, layer.K
    P = K // 2
    s0 = tm_s0(P)
    bm = toeplitz_mma_rows(K, K, H, H, P, nb, dg)
    L = tm_layout(K, K, H, s0, nb, dg, bm)
    nch_g = nb + dg - 1
    ve = cuda_vec_elems(H, 2)
    lc = _image_rows_loops(f, nb, dg, nch_g, 1)
    c_sc = lc["c_sc"]
    c_stage = lc["c_vec"] if ve > 1 else c_sc

    def stage(nimg, nrows):  # per image, warp-strided rows, lane-strided vectors; the zero row; Fe; Fo
        issue = nimg * nrows * _ceil(L["xc"], 32 * ve) * c_stage
        issue += TM_WARPS * _ceil(L["xc"], 32 * TM_WARPS) * 4
        issue += 2 * TM_WARPS * _ceil(K, TM_WARPS) * _ceil(L["fp"], 32) * c_sc
        wave = nimg * nrows * _ceil(L["xc"], 32 * ve) * max(ve * 2 * 32 // 128, 1)
        wave += 3 * TM_WARPS * _ceil(K, TM_WARPS) * _ceil(L["fp"], 32)
        return issue, wave
    return _image_rows_model(f, layer, dtype, lc, nb=nb, dg=dg, bm=bm, L=L, s0=s0, imgs=TM_IMG, warps=TM_WARPS,
                             chunk=16, nch_g=nch_g, step=1, macs_per_hmma=2048, stage=stage, c_stage=c_stage, ve=ve,
                             m=m, sms=sms)


# toeplitz_tf32_kernel (csrc/dwconv_toeplitz_tf32.cu): the same image-rows tiling on TF32 tensor cores
TF_WARPS, TF_IMG = 8, 8


def tf_layout(KH: int, KW: int, H: int, s0: int, nb: int, dg: int, bm: int) -> Dict[str, int]:
    """csrc/dwconv_toeplitz_tf32.cu tf_layout: offsets in floats and bytes."""
    nd = (KW + 15 + s0 + 7) // 8
    ngrp = _ceil(nd, dg)
    nch = 2 * nb - 2 + ngrp * dg
    xc = 8 * nch
    rows = min(H, bm + KH - 1)
    ip = rows * xc + 4
    z_off = TF_IMG * ip
    fp = _round_up(8 * ngrp * dg + 24, 8)
    fe_off = _round_up(z_off + xc, 32)
    return dict(nd=nd, ngrp=ngrp, nch=nch, xc=xc, rows=rows, fp=fp, bytes=(fe_off + KH * fp) * 4)


def toeplitz_tf32_config(Wo: int, KW: int, pl: int) -> Tuple[int, int]:
    """toeplitz_tf32_config (csrc/dwconv_toeplitz_tf32.cu): (NB, DG)."""
    nd = (KW + 15 + tm_s0(pl) + 7) // 8
    return (2 if Wo <= 32 else 4, 6 if nd % 6 in (0, 5) else 4)


def toeplitz_tf32_rows(KH: int, KW: int, H: int, Ho: int, pl: int, nb: int, dg: int,
                       optin: int = TM_MAX_SMEM_OPTIN) -> int:
    """toeplitz_tf32_rows: all output rows if the tile fits the opt-in (one CTA per SM), else halved; 0: declines."""
    def nbytes(bm):
        return tf_layout(KH, KW, H, tm_s0(pl), nb, dg, bm)["bytes"]
    bm = _round_up(Ho, 2)
    while bm > 2 and nbytes(bm) > optin:
        bm = _round_up(bm // 2, 2)
    return bm if nbytes(bm) <= optin else 0


def _model_toeplitz_tf32(f: Dict, layer: Layer, nb: int, dg: int, m: Machine, sms: int) -> Dict:
    """toeplitz_tf32_kernel<NB, DG>: toeplitz_mma_kernel's model with 32-bit elements.  CTA = (channel, 8 images,
    bm output rows, 16*NB columns), 8 warps.  Per CTA: the staging of the needed input rows (cp.async vectors of
    vec_x floats, then the in-place TF32 rounding pass over the same vectors: the measured-static body of that loop
    per vector), the zero row, the TF32-rounded filter rows Fe; per warp its output-row pairs, each: per offset
    group and kernel row one pass of the measured-static hot-loop body (2 NB - 2 + DG chunks; a chunk in the zero
    border is predicated off: its instructions issue, its HMMAs use no tensor time), the group and pair loops' own
    instructions (the pair loop holds the epilogue).  MACs: 2 HMMA.1688.F32.TF32 (16x8x8 = 1024 MACs each) per live
    (chunk, block) site, at half the 16-bit mma.sync rate per SM (TF32 tensor rate = 1/2 of fp16/bf16).
    Shared-memory wavefronts: 4 per ldmatrix.x4 (4 x 128 B), 1 per 32-bit A word, 4 + 4 per rounding vector of
    4 floats (LDS.128 + STS.128), the staging stores."""
    H, K = layer.H, layer.K
    P = K // 2
    s0 = tm_s0(P)
    bm = toeplitz_tf32_rows(K, K, H, H, P, nb, dg)
    L = tf_layout(K, K, H, s0, nb, dg, bm)
    nch_g = 2 * nb - 2 + dg
    ve = cuda_vec_elems(H, 4)
    lc = _image_rows_loops(f, nb, dg, nch_g, 2)
    # the in-place rounding loop of width ve: one LDS, ve conversions (fp), one STS per vector
    cvt_loop = next((lp for lp in lc["loops"] if lp["mix"].get("lds") == 1 and lp["mix"].get("sts") == 1
                     and lp["mix"].get("fp") == ve and not lp["mix"].get("ldg")), None)
    c_sc = lc["c_sc"]
    c_cvt = cvt_loop["mix"]["total"] if cvt_loop else 5.0 * ve + 4
    c_stage = lc["c_vec"] + c_cvt if ve > 1 else c_sc

    def stage(nimg, nrows):
        vecs = nimg * nrows * _ceil(L["xc"], 32 * ve)          # warp-level vector instructions
        issue = vecs * c_stage
        issue += TF_WARPS * _ceil(L["xc"], 32 * TF_WARPS) * 4
        issue += TF_WARPS * _ceil(K, TF_WARPS) * _ceil(L["fp"], 32) * c_sc
        wave = vecs * max(ve * 4 * 32 // 128, 1) * (3 if ve > 1 else 1)  # cp.async + LDS + STS
        wave += TF_WARPS * _ceil(K, TF_WARPS) * _ceil(L["fp"], 32)
        return issue, wave
    return _image_rows_model(f, layer, "tf32", lc, nb=nb, dg=dg, bm=bm, L=L, s0=s0, imgs=TF_IMG, warps=TF_WARPS,
                             chunk=8, nch_g=nch_g, step=2, macs_per_hmma=1024, stage=stage, c_stage=c_stage, ve=ve,
                             m=m, sms=sms)


def cuda_grad_weight_fast_splits(N: int, Ho: int, C: int) -> int:
    """grad_weight_splits of csrc/dwconv_grad_weight.cu on the fast path."""
    s = min(_ceil(N * Ho, 64), _ceil(1024, max(C, 1)), 1024)
    return max(s, 1)


def gwt_layout_bytes(K: int, esz: int, tc: bool) -> int:
    kh32 = _round_up(K, 32)
    xr = 16 + kh32 - 1
    xp = 64 + 8 if tc else 64 + 4
    gp = 1 << (7 if 64 + kh32 + 8 <= 128 else 8)
    ge_off = _round_up(xr * xp, 64)
    go_off = ge_off + _round_up(16 * gp, 64) + 32 if tc else ge_off + 16 * gp
    total = go_off + 16 * gp if tc else go_off
    return max(total * esz, 4 * 32 * 32 * 4)


def _gwt_batches(N: int, Ho: int, rho0: int, rho1: int) -> List[int]:
    """nr of every staged batch of rows [rho0, rho1) (at most 16 rows, never across an image)."""
    out, rho = [], rho0
    while rho < rho1:
        oh0 = rho % Ho
        nr = min(16, rho1 - rho, Ho - oh0)
        out.append(nr)
        rho += nr
    return out


def _model_grad_weight_fast(f: Dict, layer: Layer, dtype: str, m: Machine, sms: int, tc: bool) -> Dict:
    """grad_weight_tc_kernel (tc) / grad_weight_ffma_kernel: grid (C, splits), 4 warps; per staged batch
    of nr <= 16 output rows and 64-column window: stage x (nr + 16*ceil(K/16) - 1 rows; fp32 32*ceil) and
    grad_out (nr rows; the tc kernel also builds the shifted copy Go), then each warp takes the rows
    i = wr, wr + 4, ... (one 32 x 32 tap group for K <= 32).  tc: per (row, 16-column chunk) MB ldmatrix.x4,
    the B pairs, MB*NB HMMA.16816; ffma: per (row, 8-column step) the unrolled 256-FFMA body."""
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    esz = 2 if tc else 4
    splits = cuda_grad_weight_fast_splits(N, H, C)
    NHo = N * H
    chunk = _ceil(NHo, splits)
    ve = cuda_vec_elems(H, esz)
    xw = 64 if H > 32 else 32 if H > 16 else 16
    KWP = 32 * _ceil(K, 32)
    need = xw + KWP + 8
    gw = 64 if need <= 64 else 128 if need <= 128 else 256
    xrows_extra = (_round_up(K, 16) if tc else _round_up(K, 32)) - 1
    hot = f["hot"]
    stage_loops = [lp for lp in _loops(f) if lp["mix"].get("cp_async")]
    c_vec = float(np.mean([lp["mix"]["total"] / _mem_ops(lp) for lp in stage_loops])) if stage_loops else 25.0
    c_sc = 8.0
    c_stage = c_vec if ve > 1 else c_sc
    if tc:
        MB = 2 if 16 < K else 1
        NB = 4 if K >= 32 else (K + 7) // 8
        cands = [lp for lp in _loops(f) if lp["mix"].get("hmma") and lp["mix"].get("ldsm")
                 and lp["mix"]["hmma"] == NB * lp["mix"]["ldsm"] and lp["mix"]["ldsm"] == 4 * MB]
        body = cands[0] if cands else hot
        u = body["mix"]["ldsm"] / MB
        c_unit = body["mix"]["total"] / u                       # per (row, 16-column chunk)
        lds_unit = body["mix"].get("lds", 0) / u
        par = _parent(f, body)
        c_row = max((par["mix"]["total"] if par else 0) - (par["mix"].get("hmma", 0) / (MB * NB)) * c_unit, 10) \
            if par else 10
        units = min(4, _ceil(H, 16))                            # nq: 16-wide chunks inside the image
        macs_unit = MB * NB * 2048
        wave_unit = 4 * MB + lds_unit
        go_words = gw // 2
        variant = f"<{MB},{NB}>"
    else:
        c_unit = hot["mix"]["total"]                            # per (row, 8-column step)
        lds_unit = hot["mix"].get("lds", 0)
        par = _parent(f, hot)
        # the row loop's own body: the row set-up plus the half step (4 columns: the FFMA of that body and
        # its loads) that ends a window with 1-4 columns left; charged only where it runs
        c_half = (par["mix"].get("ffma", 0) + par["mix"].get("lds", 0) + 2) if par and par["mix"].get("ffma") else 0
        c_row = (par["mix"]["total"] - c_half) if par else 10
        rem = H % 8
        units = H // 8 + (1 if rem > 4 or (rem and not c_half) else 0)
        c_row += c_half if 0 < rem <= 4 else 0
        macs_unit = 0
        wave_unit = lds_unit
        go_words = 0
        variant = "4x8 taps/lane"
    costs = []
    for s in range(splits):
        rho0, rho1 = s * chunk, min(s * chunk + chunk, NHo)
        issue = wave = macs = 0.0
        for nr in _gwt_batches(N, H, rho0, rho1):
            xv = (nr + xrows_extra) * _ceil(xw, ve)
            gv = nr * _ceil(gw, ve)
            issue += 4 * (_ceil(xv, 128) + _ceil(gv, 128)) * c_stage
            wave += 4 * (_ceil(xv, 128) + _ceil(gv, 128)) * max(ve * esz * 32 // 128, 1)
            if go_words:
                issue += 4 * _ceil(nr * go_words, 128) * 10
                wave += 4 * _ceil(nr * go_words, 128) * 2
            for wr in range(4):
                rows = _ceil(max(nr - wr, 0), 4)
                issue += rows * (units * c_unit + c_row)
                macs += rows * units * macs_unit
                wave += rows * units * wave_unit
            issue += 4 * 3 * 8                                  # three barriers per window
        issue += 4 * 300                                        # epilogue: fragments -> smem -> partials
        costs.append((issue, macs, wave))
    cs = np.array(costs)
    acc = _Acc(C * splits)
    sidx = np.arange(C * splits) // C                           # blockIdx.x = c (fastest), y = split
    acc.issue, acc.macs, acc.wave = cs[sidx, 0], cs[sidx, 1], cs[sidx, 2]
    b = _busiest(acc, _tc_rate(f, dtype, m) if tc else 0.0, m, sms)
    ws = splits * C * K * K * 4 * 2
    return _finish(b, _hbm(layer, dtype, m, ws), dict(
        tile=f"RB16xQW64 {variant}", threads=128, dyn_smem=gwt_layout_bytes(K, esz, tc), splits=splits,
        vec=ve, per_unit=dict(instr_per_unit=c_unit, instr_per_row=c_row, stage_per_vector=c_stage),
        mma_usefulness=(N * C * H * H * K * K / max(b["total_macs"], 1)) if tc else None))


def model_cuda_v2(kfacts: Dict[str, Dict], layer: Layer, pass_: str, dtype: str, m: Machine = H100,
                  sms: int = None) -> Optional[Dict]:
    """The kernel the CUDA launchers route (layer, pass, dtype) to by default: fp16/bf16 forward and
    stride-1 grad_input -> toeplitz_mma_kernel (K <= 64; <NB, DG> of toeplitz_mma_config: NB = 2 16-column
    blocks for Wo <= 32, else 4), tf32 (fp32 with TF32 allowed) -> toeplitz_tf32_kernel (K <= 64, where its tile
    fits), fp32 -> fp32_rb_kernel (K <= 64; 56x56 or 28x28x2 tile by fp32_rb_small_tile;
    fp32_blocked_kernel above); grad_weight (stride 1, K <= 64, 48 KB smem) ->
    grad_weight_tc_kernel / grad_weight_ffma_kernel.  None when the default kernel is not compiled."""
    sms = sms or m.sms
    kd = "fp32" if dtype in ("fp32", "tf32") else dtype
    sp = model_small_plane(kfacts, layer, pass_, dtype, m, sms, {v: k for k, v in SM_COUNT.items()}.get(sms, 90))
    if sp is not None:  # both planes <= 256 pixels: the batch-as-rows kernels (csrc/dwconv_small_plane.cu)
        return sp

    def find(role, tmpl=None):
        for f in kfacts.values():
            if f.get("role") == role and (role == "fp32_direct" or f.get("dtype") == kd) \
                    and (tmpl is None or f.get("template") == tmpl):
                return f
        return None

    if pass_ in ("forward", "grad_input"):
        if dtype == "tf32" and layer.K <= 64:  # TF32 allowed: toeplitz_tf32_kernel where its tile fits
            nb, dg = toeplitz_tf32_config(layer.H, layer.K, layer.K // 2)
            f = next((f for f in kfacts.values() if f.get("role") == "tc_toeplitz_tf32"
                      and f.get("template") == (nb, dg)), None)
            if f is not None and toeplitz_tf32_rows(layer.K, layer.K, layer.H, layer.H, layer.K // 2, nb, dg):
                r = _model_toeplitz_tf32(f, layer, nb, dg, m, sms)
                occ = occupancy(f["regs"], r["threads"], r["dyn_smem"], m)
                return dict(r, kernel=f["name"], regs=f["regs"], occupancy=occ)
        if kd == "fp32":
            cfg = "28" if fp32_rb_small_tile(layer.H, layer.H) else "56"
            R, CC, LC, LR, SUB, WY = FRB_CONFIGS[cfg]
            f = next((f for f in kfacts.values() if f.get("role") == "fp32_rb"
                      and f"fp32_rb_kernel<{R}, {CC}, {LC}, {LR}, {SUB}, {WY}>" in f["name"]), None)
            if f is None or layer.K > FRB_MAX_K:
                return model_cuda(kfacts, layer, pass_, dtype, m, sms)
            r = _model_fp32_rb(f, layer, cfg, m, sms)
            occ = occupancy(f["regs"], r["threads"], r["dyn_smem"], m)
            return dict(r, kernel=f["name"], regs=f["regs"], occupancy=occ)
        if layer.K > 64:
            return model_cuda(kfacts, layer, pass_, dtype, m, sms)
        nb, dg = toeplitz_mma_config(layer.H, layer.K, layer.K // 2)
        f = find("tc_toeplitz_mma", (nb, dg))
        if f is None:
            return None
        r = _model_toeplitz_mma(f, layer, kd, nb, dg, m, sms)
    else:
        tc = kd != "fp32"
        if layer.K > 64 or gwt_layout_bytes(layer.K, 2 if tc else 4, tc) > 48 * 1024:
            return model_cuda(kfacts, layer, pass_, dtype, m, sms)
        f = find("grad_weight_tc" if tc else "grad_weight_ffma")
        if f is None:
            return None
        r = _model_grad_weight_fast(f, layer, kd, m, sms, tc)
    occ = occupancy(f["regs"], r["threads"], r["dyn_smem"], m)
    return dict(r, kernel=f["name"], regs=f["regs"], occupancy=occ)


# ------------------------------------------------------------------------------------------------
# fp32_rb_kernel (csrc/dwconv_forward_fp32.cu): fp32 forward / stride-1 grad_input, R x CC register blocks
# ------------------------------------------------------------------------------------------------
#: (R, CC, LC, LR, SUB, WY) of the two configurations, as the launcher instantiates them
FRB_CONFIGS = {"56": (7, 7, 8, 1, 4, 8), "28": (7, 7, 4, 2, 4, 2)}
FRB_MAX_K = 64
#: ESTIMATED (not read from SASS: the row loop's own body holds every variant's straight-line code): per input
#: row the prologue (CC - 1 LDS), the chunk count split (n3, rem), the row pointers and the variant dispatch
FRB_ROW_INSTR = 40


def fp32_rb_small_tile(Ho: int, Wo: int) -> bool:
    """The launcher's tile choice (csrc/dwconv_forward_fp32.cu, fp32_rb_small_tile)."""
    big = _ceil(Ho, 56) * 56 * _ceil(Wo, 56) * 56
    small = _ceil(Ho, 28) * 28 * _ceil(Wo, 28) * 28
    return small < big


def frb_pitch(LC: int, LR: int, SUB: int) -> Tuple[int, int, int, int]:
    """csrc/dwconv_forward_fp32.cu frb_pitch: (xp_mod, xp_rem, ps_mod, ps_rem)."""
    if (LC, LR, SUB) == (8, 2, 2):
        return 16, 8, 32, 16
    if (LC, LR, SUB) == (4, 2, 4):
        return 8, 4, 16, 8
    if (LC, LR, SUB) == (8, 1, 4):
        return 4, 0, 16, 8
    return 16, 8, 8, 4


def frb_layout(KH: int, KW: int, TH: int, TW: int, SUB: int, pitch: Tuple[int, int, int, int],
               rows_cap: int) -> Dict[str, int]:
    """csrc/dwconv_forward_fp32.cu frb_layout (float offsets, bytes); rows_cap as frb_rows_cap."""
    xp_mod, xp_rem, ps_mod, ps_rem = pitch
    xr = min(TH + KH - 1, rows_cap)
    xcols = _round_up(TW + KW + 3, 4)
    xp = _round_up(xcols - xp_rem, xp_mod) + xp_rem
    ps = _round_up(xr * xp - ps_rem, ps_mod) + ps_rem
    fp = _round_up(KW, 4)
    f_off = _round_up(SUB * ps, 4)
    return dict(xr=xr, xcols=xcols, xp=xp, ps=ps, fp=fp, f_off=f_off, bytes=(f_off + KH * fp) * 4)


def _frb_loops(f: Dict, R: int, CC: int) -> Dict:
    """The kernel's loops by their SASS mix: per output-row count v the 3-chunk loops of that instantiation
    (FFMA = 3 x 4 x v x CC; for v = R the fewest branches: the unguarded one), the x staging loop (cp.async)
    and the filter staging loop (LDG + STS)."""
    per_v = {}
    for v in range(1, R + 1):
        c = [lp for lp in _loops(f) if lp["mix"].get("ffma", 0) == 3 * 4 * v * CC]
        if c:
            per_v[v] = min(c, key=lambda lp: lp["mix"].get("control", 0))
    stage = max([lp for lp in _loops(f) if lp["mix"].get("cp_async")], key=lambda lp: lp["mix"]["total"], default=None)
    filt = max([lp for lp in _loops(f) if lp["mix"].get("ldg") and lp["mix"].get("sts")],
               key=lambda lp: lp["mix"]["total"], default=None)
    return dict(per_v=per_v, stage=stage, filt=filt)


def _model_fp32_rb(f: Dict, layer: Layer, cfg: str, m: Machine, sms: int) -> Dict:
    """fp32_rb_kernel<R, CC, LC, LR, SUB, WY>: per CTA the staging (x: SUB planes x XR rows x XCOLS/ve cp.async
    vectors over the CTA's threads, the measured-static cost per vector; the filter: KH x ceil(FP/32) per warp),
    then per warp its uniform input-row range [s_lo, s_hi) and chunk count: a row with v valid output rows
    (v = R in the steady state, 1..R-1 in the first / last R-1 rows) costs nfull x (its instantiation's 3-chunk
    loop body / 3, measured-static) + ntail single taps (v CC FFMA + CC + v LDS) + FRB_ROW_INSTR.  Shared
    memory: 1 wavefront per x LDS.32 (frb_pitch makes them conflict-free) and per broadcast LDS.128 of the
    filter; staging bytes / 128."""
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    P = K // 2
    R, CC, LC, LR, SUB, WY = FRB_CONFIGS[cfg]
    TW, TH, thr = LC * CC, WY * LR * R, 32 * WY
    L = frb_layout(K, K, TH, TW, SUB, frb_pitch(LC, LR, SUB), H if LR == 1 and H < TH + K - 1 else TH + K - 1)
    ve = cuda_vec_elems(H, 4)
    lp = _frb_loops(f, R, CC)
    c_v = {v: lp["per_v"][v]["mix"]["total"] / 3 if v in lp["per_v"] else 4 * v * CC + v + 4 + 3
           for v in range(1, R + 1)}
    c_vec = lp["stage"]["mix"]["total"] / _mem_ops(lp["stage"]) if lp["stage"] else 25.0
    c_felem = lp["filt"]["mix"]["total"] / max(lp["filt"]["mix"].get("sts", 1), 1) if lp["filt"] else 12.0
    vpr = L["xcols"] // ve
    gy, gz = _ceil(H, TW), _ceil(H, TH)
    tiles, ffma_cta = [], []
    for z in range(gz):
        for y in range(gy):
            oh0, ow0 = z * TH, y * TW
            issue = wave = ffma = 0.0
            # staging: every warp runs ceil(vectors / threads) iterations per plane, the filter rows split by warp
            issue += WY * SUB * _ceil(L["xr"] * vpr, thr) * c_vec
            wave += SUB * L["xr"] * vpr * max(ve * 4 * 32 // 128, 1) / 32
            issue += WY * _ceil(K, WY) * _ceil(L["fp"], 32) * c_felem
            wave += K * _ceil(L["fp"], 32)
            for w in range(WY):
                wr0 = oh0 + w * LR * R
                if wr0 >= H:
                    continue
                SR = R + K - 1
                s_lo = min(max(P - (wr0 + (LR - 1) * R), 0), SR)
                s_hi = min(max(H + P - wr0, 0), SR)
                kw_lo = min(max(P - (ow0 + TW - 1), 0), K)
                kw_hi = min(max(H + P - ow0, 0), K)
                kwa = kw_lo & ~3
                ntap = kw_hi - kwa
                nfull = (ntap >> 2) + (1 if ntap & 3 == 3 else 0)
                ntail = 0 if ntap & 3 == 3 else ntap & 3
                issue += 200                                  # set-up: indices, ranges
                if kw_lo < kw_hi:
                    for s in range(s_lo, s_hi):
                        v = sum(1 for i in range(R) if 0 <= s - i < K)
                        issue += nfull * c_v[v] + ntail * (v * CC + CC + v) + FRB_ROW_INSTR
                        wave += nfull * (4 + v) + ntail * (CC + v) + (CC - 1)
                        ffma += (nfull * 4 + ntail) * v * CC * 32
                issue += R * CC * 5                           # epilogue: one guarded scalar store per output
            tiles.append((issue, 0.0, wave))
            ffma_cta.append(ffma)
    t = np.array(tiles)
    groups = _ceil(N, SUB) * C
    acc = _Acc(groups * gy * gz)
    it_ = np.repeat(np.arange(gy * gz), groups)  # blockIdx.x = group * C + c (fastest), then y, z
    acc.issue, acc.macs, acc.wave = t[it_, 0], t[it_, 1], t[it_, 2]
    b = _busiest(acc, 0.0, m, sms)
    useful = N * C * H * H * K * K
    issued_ffma = sum(ffma_cta) * groups
    return _finish(b, _hbm(layer, "fp32", m), dict(
        tile=f"{TH}x{TW}x{SUB} R{R}xCC{CC}", threads=thr, dyn_smem=int(L["bytes"]), vec_x=ve,
        per_unit=dict(instr_per_chunk=c_v[R], ffma_share_chunk=4 * R * CC / c_v[R], instr_per_row=FRB_ROW_INSTR,
                      stage_per_vector=c_vec),
        ffma_lanes_issued_per_nominal=issued_ffma / useful))


# ------------------------------------------------------------------------------------------------
# small planes (csrc/dwconv_small_plane.cu): the batch-as-rows GEMM per channel
# ------------------------------------------------------------------------------------------------
SP_THREADS, SP_WARPS, SP_MB_TC, SP_MB_F32, SP_XP_F32 = 256, 8, 64, 32, 36
SP_MAX_PIX, SP_MAX_TAPS, SP_SMEM_BUDGET = 256, 4096, 112 * 1024
#: the opt-in shared memory per block the launcher reads from the device (A100 / H100)
SMEM_OPTIN = {80: 163 * 1024, 90: 227 * 1024}


def sp_applies(layer: Layer, dtype: str) -> bool:
    """sp_rule() of the launcher for a layer of the set (stride 1, padding K // 2: planes H x H both)."""
    H, K = layer.H, layer.K
    return H * H <= SP_MAX_PIX and K * K <= SP_MAX_TAPS and min(K, H) ** 2 * 8 >= H * H


def sp_bytes(kind: int, P: int, QB: int, taps: int) -> int:
    """dynamic shared memory of sp_layout_tc / sp_layout_f32 / sp_gw_layout / sp_layout_tf32 (kind 0..4 as
    sp_make_plan)."""
    if kind == 4:
        pitch = _round_up(P, 8) + 4
        return SP_MB_TC * pitch * 4 + _round_up(QB, 16) * pitch * 4 + 2 * _round_up(taps * 4, 16)
    if kind == 0:
        pitch = _round_up(P, 16) + 8
        return SP_MB_TC * pitch * 2 + _round_up(QB, 16) * pitch * 2 + 2 * _round_up(taps * 2, 16)
    if kind == 1:
        return P * SP_XP_F32 * 4 + P * _round_up(QB, 8) * 4 + _round_up(taps * 4, 16)
    if kind == 2:
        grows = _round_up(P, 16)
        ys_off = SP_MB_TC * (grows + 8) * 2
        gs_off = _round_up(ys_off + SP_MB_TC * (_round_up(QB, 16) + 8) * 2, 16)
        return gs_off + grows * (_round_up(QB, 16) + 8) * 4
    grows = _round_up(P, 4)
    return SP_MB_F32 * grows * 4 + SP_MB_F32 * _round_up(QB, 8) * 4 + grows * _round_up(QB, 8) * 4


def sp_plan(kind: int, P: int, Q: int, taps: int, N: int, C: int, optin: int) -> Optional[Dict]:
    """sp_make_plan(): pixel block QB (fewest blocks that fit min(optin, budget)) and batch groups."""
    budget = min(optin, SP_SMEM_BUDGET)
    mb = SP_MB_TC if kind in (0, 2, 4) else SP_MB_F32
    for s in range(1, 33):
        QB = _round_up(_ceil(Q, s), 8)
        nbytes = sp_bytes(kind, P, QB, taps)
        if nbytes > budget:
            continue
        qsplits = _ceil(Q, QB)
        nchunks = _ceil(N, mb)
        bg = max(min(_ceil(512, C * qsplits), nchunks, 1024 // qsplits), 1)
        cpg = _ceil(nchunks, bg)
        return dict(QB=QB, qsplits=qsplits, bgroups=_ceil(nchunks, cpg), cpg=cpg, nchunks=nchunks, bytes=nbytes)
    return None


def _sp_loops(f: Dict, need=(), forbid=(), depth=None) -> List[Dict]:
    return [lp for lp in _loops(f) if all(lp["mix"].get(n, 0) for n in need)
            and not any(lp["mix"].get(n, 0) for n in forbid) and (depth is None or lp["depth"] == depth)]


def _own(lp: Optional[Dict]) -> float:
    return float(lp["mix"]["total"]) if lp else 0.0


def _sp_children(f: Dict, lp: Dict) -> List[Dict]:
    kids = {tuple(c) for c in lp.get("children", [])}
    return [c for c in _loops(f) if (c["lo"], c["hi"]) in kids]


#: straight-line instructions of one sp_build_fc thread before its kernel-row loop (pixel, kw range, kh range):
#: not a loop, so not in the SASS loop table; an estimate (about 60 SASS instructions in the sm_90 listing)
SP_BUILD_PROLOGUE = 60.0


def _sp_build_cost(f: Dict, H: int, K: int, blocks: List[Tuple[int, int]], pairs: bool) -> List[Tuple[float, float]]:
    """issue and smem wavefronts of sp_build_fc (forward form, stride 1, dilation 1, padding K // 2) per pixel
    block [q0, q0 + qn): thread t -> (pixel t mod qn, kernel-row group t / qn); per warp the prologue, then per
    kernel-row trip of its slowest lane the kh loop's own body and per store the copy loop's body per store.
    Both instantiations of the build (word copies for dil_w == 1, element copies otherwise) are in the kernel;
    the dearer body of each loop level is charged."""
    khl = [lp for lp in _loops(f) if lp["depth"] == 0 and not any(lp["mix"].get(k) for k in ("ldg", "hmma", "cp_async", "ffma", "barrier"))
           and any(c["mix"].get("lds") and c["mix"].get("sts") for c in _sp_children(f, lp))]
    c_kh = max((_own(lp) for lp in khl), default=60.0)
    c_st = max((c["mix"]["total"] / c["mix"]["sts"] for lp in khl for c in _sp_children(f, lp)
                if c["mix"].get("sts")), default=4.0)
    p = K // 2
    out = []
    for q0, qn in blocks:
        kg = SP_THREADS // qn
        khper = _ceil(K, kg)
        issue = wave = 0.0
        for w in range(SP_WARPS):
            tr_max = st_max = 0
            live = False
            for t in range(32 * w, 32 * w + 32):
                if t >= qn * kg:
                    continue
                live = True
                g, qi = divmod(t, qn)
                oh, ow = divmod(q0 + qi, H)
                iw0 = ow - p
                n = max(min(K, H - iw0) - max(-iw0, 0), 0)
                lo, hi = max(g * khper, p - oh), min(g * khper + khper, K, H + p - oh)
                trips = max(hi - lo, 0) if n else 0
                stores = ((n + 1) // 2 + 1) if pairs else n
                tr_max, st_max = max(tr_max, trips), max(st_max, trips * stores)
            if live:
                issue += SP_BUILD_PROLOGUE + tr_max * c_kh + st_max * c_st
                wave += st_max * 4 + tr_max * 2   # scattered STS (~4-way across the lanes' rows); filter LDS
        out.append((issue, wave))
    return out


def _model_small_plane(f: Dict, layer: Layer, dtype: str, m: Machine, sms: int, arch: int) -> Dict:
    """small_plane_mma_kernel<T, false> (fp16/bf16) / small_plane_ffma_kernel<false> (fp32): grid (C, pixel
    blocks, batch groups), 8 warps.  Per CTA: filter -> smem, zero-fill of the F_c block (16-B STS), the F_c
    scatter (_sp_build_cost), then per batch chunk the staging (cp.async vectors of the plane or scalar loads),
    the warp items (32 rows x 32 pixels: the K loop body of the full item per 16-wide step, the item's own
    body once: zero-init, epilogue) or the FFMA thread items (4 x 8 block, the unrolled k loop).  dtype "tf32":
    small_plane_mma_kernel<float, false> (TF32 tensor cores): 4-byte layout (kind 4), 32-byte K steps of 8 floats,
    HMMA.1688.F32.TF32 = 1024 MACs at half the 16-bit rate, plus the in-place rounding loop per staged vector."""
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    tf32 = dtype == "tf32"
    tc = dtype != "fp32"
    P = Q = H * H
    taps = K * K
    kind = 4 if tf32 else 0 if tc else 1
    pl = sp_plan(kind, P, Q, taps, N, C, SMEM_OPTIN.get(arch, 227 * 1024))
    QB, qs, bgroups, cpg = pl["QB"], pl["qsplits"], pl["bgroups"], pl["cpg"]
    mb = SP_MB_TC if tc else SP_MB_F32
    blocks = [(b * QB, min(QB, Q - b * QB)) for b in range(qs)]
    build = _sp_build_cost(f, H, K, blocks, pairs=tc and not tf32)
    fil = max(_sp_loops(f, need=("ldg", "sts"), forbid=("cp_async",), depth=0), key=lambda lp: lp["mix"]["sts"])
    c_fil = fil["mix"]["total"] / fil["mix"]["sts"]
    zero = max(_sp_loops(f, need=("sts",), forbid=("ldg", "lds", "cp_async"), depth=0), key=lambda lp: lp["mix"]["sts"])
    c_zero = zero["mix"]["total"] / zero["mix"]["sts"]
    chunk = max(_sp_loops(f, need=("barrier",), depth=0), key=lambda lp: lp["mix"]["total"])
    esz = 2 if tc and not tf32 else 4
    if tc:
        kl = sorted(_sp_loops(f, need=("hmma", "ldsm")), key=lambda lp: lp["mix"]["total"] / lp["mix"]["hmma"])
        full, part = kl[0], kl[-1]
        unroll = full["mix"]["hmma"] / 8                    # 8 HMMA per 16-wide K step of a full item
        c_k_full = full["mix"]["total"] / unroll
        c_k_part = part["mix"]["total"] / unroll
        item = _parent(f, full)
        c_item = _own(item)
        vloop = _sp_loops(f, need=("cp_async",))
        # element staging: the flat-plane loop (the leanest of the element loops; the strided gather has its own)
        sloop = [lp for lp in _sp_loops(f, need=("ldg", "sts"), forbid=("cp_async",)) if lp["depth"] >= 2]
        c_vec = vloop[0]["mix"]["total"] / vloop[0]["mix"]["cp_async"] if vloop else 25.0
        c_sc = min((lp["mix"]["total"] / lp["mix"]["sts"] for lp in sloop), default=10.0)
        ve = 1
        for nbytes in (16, 8, 4):                            # sp_vec: plane stride H*H and image stride C*H*H
            e = nbytes // esz
            if e < 2:
                break
            if (H * H) % e == 0:
                ve = e
                break
        kp = _round_up(P, 32 // esz)
        ksteps = kp * esz // 32
        # tf32: the in-place rounding loop of width ve (one LDS, ve conversions, one STS per vector)
        rl = [lp for lp in _sp_loops(f, need=("lds", "sts"), forbid=("cp_async", "ldg", "hmma"))
              if lp["mix"].get("fp") == ve] if tf32 else []
        c_round = (rl[0]["mix"]["total"] if rl else 5.0 * ve + 4) if tf32 else 0.0
    else:
        hot = f["hot"]
        c_k = hot["mix"]["total"] / (hot["mix"]["ffma"] / 32)  # per k of a 4 x 8 thread block
        item = _parent(f, hot)
        c_item = _own(item)
        xl = [lp for lp in _sp_loops(f, need=("ldg", "sts"), forbid=("cp_async",)) if lp["depth"] >= 1]
        c_x = xl[0]["mix"]["total"] / xl[0]["mix"]["sts"] if xl else 10.0
    costs = []
    for bi, (q0, qn) in enumerate(blocks):
        issue = _ceil(taps, 32) * c_fil
        nwords = (_round_up(QB, 16) * (kp + 16 // esz) * esz // 16) if tc else P * _round_up(QB, 8) // 4
        issue += _ceil(nwords, 32) * c_zero
        wave = _ceil(nwords, 32) * 4 + _ceil(taps, 32)
        issue += build[bi][0]
        wave += build[bi][1]
        costs_b = []
        for bz in range(bgroups):
            iss, mac, wv = issue, 0.0, wave
            for ch in range(bz * cpg, min(bz * cpg + cpg, pl["nchunks"])):
                rv = min(N - ch * mb, mb)
                iss += SP_WARPS * _own(chunk)                      # chunk loop body, once per warp
                if tc:
                    per_row = _ceil(kp, 32 * ve)
                    iss += mb * per_row * (c_vec if ve > 1 else c_sc * ve)
                    wv += mb * per_row * max(ve * esz * 32 // 128, 1)
                    if tf32:                                       # rounding pass: LDS + STS per vector
                        iss += mb * per_row * c_round
                        wv += mb * per_row * 2 * max(ve * esz * 32 // 128, 1)
                    nnb = _ceil(qn, 32)
                    for it in range(2 * nnb):
                        mbk, nb = it & 1, it >> 1
                        if mbk * 32 >= rv:
                            iss += 10
                            continue
                        mt1 = mbk * 32 + 16 < rv
                        ntv = min(_ceil(qn - nb * 32, 8), 4)
                        fullit = rv - mbk * 32 >= 32 and qn - nb * 32 >= 32
                        # a partial item runs out of line (sp_fwd_item_partial): charged twice the inline item body
                        iss += (c_item if fullit else 2 * c_item) + ksteps * (c_k_full if fullit else c_k_part)
                        mac += ksteps * (2 if mt1 else 1) * ntv * (1024 if tf32 else 2048)
                        nldsm = (2 if mt1 else 1) + (2 if ntv > 2 else 1)
                        wv += ksteps * nldsm * 4
                else:
                    iss += SP_WARPS * _ceil(P, SP_WARPS) * c_x
                    wv += SP_WARPS * _ceil(P, SP_WARPS) * 2
                    nit = 8 * _ceil(qn, 8)
                    rounds = _ceil(nit, SP_THREADS)
                    warps_busy = min(SP_WARPS, _ceil(nit, 32))
                    iss += warps_busy * rounds * (c_item + P * c_k)
                    wv += warps_busy * rounds * P * 3            # 3 x LDS.128 per k (broadcast within a warp)
            costs_b.append((iss, mac, wv))
        costs.append(costs_b)
    # blockIdx.x = c (fastest), y = pixel block, z = batch group
    n = C * qs * bgroups
    acc = _Acc(n)
    lin = np.arange(n)
    yb, zb = (lin // C) % qs, lin // (C * qs)
    arr = np.array([[costs[y][z] for z in range(bgroups)] for y in range(qs)])  # [qs, bgroups, 3]
    acc.issue, acc.macs, acc.wave = arr[yb, zb, 0], arr[yb, zb, 1], arr[yb, zb, 2]
    b = _busiest(acc, _tc_rate(f, dtype, m) if tc else 0.0, m, sms)
    useful = N * C * P * Q
    return _finish(b, _hbm(layer, dtype, m), dict(
        tile=f"{mb}xQB{QB} x{qs} blocks" + (" mma 32x32/warp" if tc else " ffma 4x8/thread"), threads=SP_THREADS,
        dyn_smem=pl["bytes"], vec_x=(ve if tc else 1), plan=pl,
        per_unit=(dict(instr_per_kstep_full=c_k_full, instr_per_kstep_partial=c_k_part, instr_per_item=c_item)
                  if tc else dict(instr_per_k=c_k, instr_per_item=c_item)),
        mma_usefulness=(useful / max(b["total_macs"], 1)) if tc else None))


def _model_small_plane_gw(f: Dict, layer: Layer, dtype: str, m: Machine, sms: int, arch: int) -> Dict:
    """small_plane_gw_mma_kernel<T> / small_plane_gw_ffma_kernel: grid (C, pixel blocks x batch groups), 8
    warps.  Per batch chunk: stage x (the whole plane) and grad_out (the block's pixels), then the warp items
    (32 x-pixels x 32 grad_out pixels, K = the chunk's batch rows, G accumulated in fp32 smem) or the FFMA
    thread items (4 x 8); at the end each tap sums its pairs (the tap loop's innermost body per pair)."""
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    tc = dtype not in ("fp32", "tf32")
    P = Q = H * H
    taps = K * K
    pl = sp_plan(2 if tc else 3, P, Q, taps, N, C, SMEM_OPTIN.get(arch, 227 * 1024))
    QB, qs, bgroups, cpg = pl["QB"], pl["qsplits"], pl["bgroups"], pl["cpg"]
    mb = SP_MB_TC if tc else SP_MB_F32
    esz = 2 if tc else 4
    chunk = max(_sp_loops(f, need=("barrier",), depth=0), key=lambda lp: lp["mix"]["total"])
    vl = _sp_loops(f, need=("cp_async",))
    c_vec = float(np.mean([lp["mix"]["total"] / lp["mix"]["cp_async"] for lp in vl])) if vl else 25.0
    sl = [lp for lp in _sp_loops(f, need=("ldg", "sts"), forbid=("cp_async",)) if lp["depth"] >= 2]
    c_sc = min((lp["mix"]["total"] / lp["mix"]["sts"] for lp in sl), default=10.0)  # the flat-plane loop
    ve = 1
    for nbytes in (16, 8, 4):
        e = nbytes // esz
        if e >= 2 and (H * H) % e == 0:
            ve = e
            break
    tap_inner = min(_sp_loops(f, need=("lds",), forbid=("sts", "ldsm", "ffma", "hmma", "cp_async", "ldg"), depth=2),
                    key=lambda lp: lp["mix"]["total"], default=None)
    tap_mid = _parent(f, tap_inner) if tap_inner else None
    tap_out = _parent(f, tap_mid) if tap_mid else None
    c_pair = tap_inner["mix"]["total"] / max(tap_inner["mix"]["lds"], 1) if tap_inner else 4.0
    if tc:
        kl = sorted(_sp_loops(f, need=("hmma", "ldsm")), key=lambda lp: lp["mix"]["total"] / lp["mix"]["hmma"])
        full, part = kl[0], kl[-1]
        unroll = full["mix"]["hmma"] / 8
        c_k_full, c_k_part = full["mix"]["total"] / unroll, part["mix"]["total"] / unroll
        c_item = _own(_parent(f, full))
        grows = _round_up(P, 16)
    else:
        hot = f["hot"]
        c_k = hot["mix"]["total"] / (hot["mix"]["ffma"] / 32)
        c_item = _own(_parent(f, hot))
        grows = _round_up(P, 4)
    p = K // 2
    costs = {}
    for qsi in range(qs):
        q0, qn = qsi * QB, min(QB, Q - qsi * QB)
        # tap sums: thread = tap (t = tid + 256 r); per warp and round the outer body, per output row of the
        # block its slowest lane's row body, per pair of the slowest lane the column loop (unrolled: total / lds)
        tap_issue = 0.0
        oh_a, oh_b = q0 // H, (q0 + qn - 1) // H
        for w in range(SP_WARPS):
            for r in range(_ceil(taps, SP_THREADS)):
                rows_max = pairs_max = 0
                for t in range(32 * w + SP_THREADS * r, 32 * w + SP_THREADS * r + 32):
                    if t >= taps:
                        continue
                    kh, kw = divmod(t, K)
                    rows = pairs = 0
                    for oh in range(oh_a, oh_b + 1):
                        if not 0 <= oh - p + kh < H:
                            continue
                        rows += 1
                        iw0 = kw - p
                        lo = max(q0 - oh * H, max(-iw0, 0))
                        hi = min(q0 + qn - oh * H, H - iw0, H)
                        pairs += max(hi - lo, 0)
                    rows_max, pairs_max = max(rows_max, rows), max(pairs_max, pairs)
                if 32 * w + SP_THREADS * r < taps:
                    tap_issue += _own(tap_out) + rows_max * _own(tap_mid) + pairs_max * c_pair
        for bg in range(bgroups):
            iss = tap_issue
            mac = wv = 0.0
            for ch in range(bg * cpg, min(bg * cpg + cpg, pl["nchunks"])):
                rv = min(N - ch * mb, mb)
                iss += SP_WARPS * _own(chunk)
                wx, wy = grows, (_round_up(QB, 16) if tc else _round_up(QB, 8))
                per = _ceil(wx, 32 * ve) + _ceil(wy, 32 * ve)
                iss += mb * per * (c_vec if ve > 1 else c_sc * ve)
                wv += mb * per * max(ve * esz * 32 // 128, 1)
                if tc:
                    ksteps = _ceil(rv, 16)
                    nmg, nnb = _ceil(grows, 32), _ceil(qn, 32)
                    for it in range(nmg * nnb):
                        mbk, nb = it % nmg, it // nmg
                        mt1 = mbk * 32 + 16 < P
                        ntv = min(_ceil(qn - nb * 32, 8), 4)
                        fullit = mt1 and ntv == 4 and ch == bg * cpg
                        iss += (c_item if fullit else 2 * c_item) + ksteps * (c_k_full if fullit else c_k_part)
                        mac += ksteps * (2 if mt1 else 1) * ntv * 2048
                        wv += ksteps * ((2 if mt1 else 1) + (2 if ntv > 2 else 1)) * 4
                        wv += (2 if mt1 else 1) * ntv * 2 * 2 * 2     # float2 G read-modify-write per fragment row pair
                else:
                    nit = (grows // 4) * _ceil(qn, 8)
                    rounds = _ceil(nit, SP_THREADS)
                    warps_busy = min(SP_WARPS, _ceil(nit, 32))
                    iss += warps_busy * rounds * (c_item + rv * c_k)
                    wv += warps_busy * rounds * rv * (4 + 2)       # LDS.128 of x (4 wavefronts), grad_out (broadcast)
            costs[(qsi, bg)] = (iss, mac, wv)
    splits = qs * bgroups
    n = C * splits
    acc = _Acc(n)
    arr = np.array([costs[(s % qs, s // qs)] for s in range(splits)])
    sidx = np.arange(n) // C                                   # blockIdx.x = c, y = split (pixel block fastest)
    acc.issue, acc.macs, acc.wave = arr[sidx, 0], arr[sidx, 1], arr[sidx, 2]
    b = _busiest(acc, _tc_rate(f, dtype, m) if tc else 0.0, m, sms)
    ws = splits * C * taps * 4 * 2
    return _finish(b, _hbm(layer, dtype, m, ws), dict(
        tile=f"G {grows}xQB{QB} x{qs} blocks, batch {mb}" + (" mma" if tc else " ffma"), threads=SP_THREADS,
        dyn_smem=pl["bytes"], splits=splits, vec=ve, plan=pl,
        per_unit=dict(instr_per_item=c_item, instr_per_pair=c_pair),
        mma_usefulness=(N * C * P * Q / max(b["total_macs"], 1)) if tc else None))


# ------------------------------------------------------------------------------------------------
# small-plane grad_weight by row pairs (csrc/dwconv_small_plane_gw_rows.cu)
# ------------------------------------------------------------------------------------------------
GR_THREADS, GR_WARPS, GR_ND, GR_MB, GR_MAX_SIDE, GR_MIN_W, GR_RP = 256, 8, 4, 32, 16, 9, 24
#: straight-line code of small_plane_gw_rows_kernel outside its loops, per warp: the per-lane staging offsets
#: (gr_offsets: 8 divisions), the warp's dh / oh range and lane addresses, the accumulator stores to Rs (16 STS.64
#: with addresses) -- not loops, so not in the SASS loop table; an estimate (about 200 SASS instructions)
GR_STRAIGHT = 200.0


def gr_plan(N: int, C: int, H: int, Ho: int, KH: int, pt: int) -> Dict:
    """gr_plan() of the kernel (the emulation's transcription, tested equal)."""
    dh_lo = max(-pt, 1 - Ho)
    ndh = max(min(KH - 1 - pt, H - 1) - dh_lo + 1, 0)
    xpi, ypi = H * 16 + 8, Ho * 16 + 8
    stage_bytes = GR_MB * (xpi + ypi) * 2
    nchunks = _ceil(N, GR_MB)
    bg = max(min(_ceil(512, C), nchunks, 1024), 1)
    cpg = _ceil(nchunks, bg)
    return dict(dh_lo=dh_lo, ndh=ndh, xpi=xpi, ypi=ypi, stage_bytes=stage_bytes,
                bytes=max(2 * stage_bytes, ndh * 16 * GR_RP * 4), nchunks=nchunks, cpg=cpg,
                bgroups=_ceil(nchunks, cpg))


def gr_applies(layer: Layer, dtype: str) -> bool:
    """gr_rule() for a layer of the set (stride 1, padding K // 2, 16-bit): inside the small-plane rule and
    GR_MIN_W <= W <= 16 (H = W = Ho = Wo)."""
    return dtype not in ("fp32", "tf32") and sp_applies(layer, dtype) and GR_MIN_W <= layer.H <= GR_MAX_SIDE \
        and gr_plan(layer.N, layer.C, layer.H, layer.H, layer.K, layer.K // 2)["bytes"] <= SP_SMEM_BUDGET


def gr_vec_layer(layer: Layer) -> int:
    """gr_vec() for a contiguous NCHW tensor of the layer (W = Wo = H; plane and image strides H*H, C*H*H): the
    kernel instantiation <T, VE> the launcher takes."""
    W = layer.H
    for ve in (8, 4, 2):
        if W % ve == 0 and (W * W) % ve == 0:
            return ve
    return 1


def _model_gw_rows(f: Dict, layer: Layer, dtype: str, m: Machine, sms: int) -> Dict:
    """small_plane_gw_rows_kernel<T>: grid (C, batch groups), 8 warps, warp w owns GR_ND consecutive dh.  Per
    chunk of GR_MB images: staging (every warp: its images x 2 planes, the per-image cost of the dearest
    cp.async loop body: the VE variant is a runtime choice), then per warp and per output row oh of its range
    the whole hot-loop body (ptxas predicates the per-dh blocks: every instruction issues, valid or not; a
    chunk of <= 16 images runs half of it), tensor work and B-operand wavefronts only for the valid (oh, dh)
    pairs (a predicated-off HMMA / LDSM is charged no tensor time / no wavefront: ASSUMED, as for
    toeplitz_mma_kernel), the A-operand ldmatrix on every row; then the epilogue: per warp the straight-line
    code (GR_STRAIGHT), per round of 256 taps the tap loop's own body and its inner ow loops (unrolled bodies
    by their LDS count) for Wo columns."""
    N, C, H, K = layer.N, layer.C, layer.H, layer.K
    W = Ho = Wo = H
    pt = K // 2
    p = gr_plan(N, C, H, Ho, K, pt)
    taps = K * K
    hot = f["hot"]
    c_oh = float(hot["mix"]["total"])                     # both 16-image k steps, all GR_ND dh (predicated)
    chunk = max(_sp_loops(f, need=("barrier",), depth=0), key=lambda lp: lp["mix"]["total"])
    st = _sp_loops(f, need=("cp_async",), depth=1) or _sp_loops(f, need=("cp_async",))
    if st:  # VE > 1: the unrolled image loop, 4 vector slots per image
        c_img = max(lp["mix"]["total"] / (lp["mix"]["cp_async"] / 4) for lp in st)
    else:   # VE = 1: gr_stage_elems, thread = element: a warp's share of an image's H*W elements
        el = _sp_loops(f, need=("sts",), forbid=("hmma", "stg"))
        c_img = (max((lp["mix"]["total"] / max(lp["mix"]["sts"], 1) for lp in el), default=20.0)
                 * layer.H * layer.H / 32 * GR_WARPS / GR_WARPS)
    ve = gr_vec_layer(layer)
    tap_out = max(_sp_loops(f, need=("stg",), forbid=("hmma", "cp_async"), depth=0), key=lambda lp: lp["mix"]["total"],
                  default=None)
    inner = sorted(_sp_children(f, tap_out), key=lambda lp: -lp["mix"].get("lds", 0)) if tap_out else []
    # the ow loop: the widest unrolled body first, the remainder loop for the rest
    tap_round, left = _own(tap_out), Wo
    for lp in inner:
        u = lp["mix"].get("lds", 0)
        if u:
            trips = left // u if lp is not inner[-1] else _ceil(left, u)
            tap_round += trips * lp["mix"]["total"]
            left -= trips * u
    # per warp: its oh range and its valid pairs
    warps = []
    for w in range(GR_WARPS):
        d0 = p["dh_lo"] + GR_ND * w
        ndw = min(p["ndh"] - GR_ND * w, GR_ND)
        if ndw <= 0:
            warps.append((0, 0))
            continue
        ohs = range(max(-(d0 + ndw - 1), 0), min(H - d0, Ho))
        pairs = sum(1 for oh in ohs for j in range(ndw) if 0 <= oh + d0 + j < H)
        warps.append((len(ohs), pairs))
    rows_all = sum(r for r, _ in warps)
    pairs_all = sum(q for _, q in warps)
    cp_wave = max(ve * 2 * 32 // 128, 1) * 2              # a warp's cp.async: 128-512 B over rows of 32 B (2-way)
    costs = []
    for bg in range(p["bgroups"]):
        iss = GR_WARPS * GR_STRAIGHT
        mac = wv = 0.0
        for ch in range(bg * p["cpg"], min(bg * p["cpg"] + p["cpg"], p["nchunks"])):
            rv = min(N - ch * GR_MB, GR_MB)
            kpad = _round_up(rv, 16)
            ks = kpad // 16
            iss += GR_WARPS * _own(chunk)
            imgs = _ceil(kpad, GR_WARPS)                    # images per warp (the busiest warp's count, per warp)
            iss += GR_WARPS * imgs * 2 * c_img
            vec_instr = kpad * (_ceil(H * W // ve, 32) + _ceil(Ho * Wo // ve, 32))
            wv += vec_instr * cp_wave
            iss += rows_all * c_oh * (1.0 if ks == 2 else 0.5)
            mac += pairs_all * ks * 2 * 2048
            wv += (rows_all + pairs_all) * ks * 4             # ldmatrix.x4: 4 wavefronts (conflict-free pitch)
        iss += GR_WARPS * _ceil(taps, GR_THREADS) * tap_round
        wv += GR_WARPS * (GR_ND * 4 * 2) + GR_WARPS * _ceil(taps, GR_THREADS) * Wo * 2
        costs.append((iss, mac, wv))
    n = C * p["bgroups"]
    acc = _Acc(n)
    arr = np.array(costs)
    sidx = np.arange(n) // C                                  # blockIdx.x = c, y = batch group
    acc.issue, acc.macs, acc.wave = arr[sidx, 0], arr[sidx, 1], arr[sidx, 2]
    b = _busiest(acc, _tc_rate(f, dtype, m), m, sms)
    ws = p["bgroups"] * C * taps * 4 * 2
    return _finish(b, _hbm(layer, dtype, m, ws), dict(
        tile=f"rows {p['ndh']} dh / {GR_ND} per warp, batch {GR_MB} x2 buffers", threads=GR_THREADS,
        dyn_smem=p["bytes"], splits=p["bgroups"], vec=ve, plan=p,
        per_unit=dict(instr_per_hmma_hot=c_oh / max(hot["mix"].get("hmma", 1), 1), instr_per_image_stage=c_img,
                      instr_per_tap_round=tap_round, valid_pairs=pairs_all, oh_rows=rows_all),
        mma_usefulness=(N * C * Wo * W * pairs_all / max(b["total_macs"], 1))))


def model_small_plane(kfacts: Dict[str, Dict], layer: Layer, pass_: str, dtype: str, m: Machine, sms: int,
                      arch: int) -> Optional[Dict]:
    """The small-plane kernel of (layer, pass, dtype) when the launcher routes there (sp_applies), else None.
    forward and the stride-1 grad_input run the non-transposed forward kernel (grad_input: with the flipped
    filter, same planes), grad_weight the G kernel."""
    if not sp_applies(layer, dtype):
        return None
    kd = "fp32" if dtype in ("fp32", "tf32") else dtype
    if pass_ == "grad_weight" and gr_applies(layer, kd):  # the row-pair kernel takes it (gr_rule)
        ve = gr_vec_layer(layer)
        tn = "__half" if kd == "fp16" else "__nv_bfloat16"
        f = next((f for f in kfacts.values() if f.get("role") == "sp_gw_rows" and f.get("dtype") == kd
                  and f"small_plane_gw_rows_kernel<{tn}, {ve}>" in f["name"]), None)
        if f is not None:
            r = _model_gw_rows(f, layer, kd, m, sms)
            return dict(r, kernel=f["name"], regs=f["regs"], occupancy=occupancy(f["regs"], r["threads"],
                                                                                 r["dyn_smem"], m))
    if dtype == "tf32" and pass_ != "grad_weight":  # TF32 allowed: small_plane_mma_kernel<float, false>
        f = next((f for f in kfacts.values() if f.get("role") == "sp_mma" and f.get("dtype") == "tf32"
                  and ("true>" not in f["name"])), None)
        if f is not None and sp_plan(4, layer.H ** 2, layer.H ** 2, layer.K ** 2, layer.N, layer.C,
                                     SMEM_OPTIN.get(arch, 227 * 1024)) is not None:
            r = _model_small_plane(f, layer, "tf32", m, sms, arch)
            occ = occupancy(f["regs"], r["threads"], r["dyn_smem"], m)
            return dict(r, kernel=f["name"], regs=f["regs"], occupancy=occ)
    role = ("sp_mma" if kd != "fp32" else "sp_ffma") if pass_ != "grad_weight" else \
        ("sp_gw_mma" if kd != "fp32" else "sp_gw_ffma")
    f = next((f for f in kfacts.values() if f.get("role") == role and f.get("dtype") == kd
              and ("true>" not in f["name"])), None)
    if f is None:
        return None
    r = (_model_small_plane_gw if pass_ == "grad_weight" else _model_small_plane)(f, layer, kd, m, sms, arch)
    occ = occupancy(f["regs"], r["threads"], r["dyn_smem"], m)
    return dict(r, kernel=f["name"], regs=f["regs"], occupancy=occ)
