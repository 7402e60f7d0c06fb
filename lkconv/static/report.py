"""``python -m lkconv static``: compile, analyse, model, write ``benchmarks/results/static-<commit>/``.

Also the calibration hook :func:`write_calibration` (called by the GPU suite with measured times).
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional

from . import compile as C
from . import model as M
from .kernels import ROLE_STATUS, describe_symbol
from .kernels import ARCHS, DTYPES, LAYERS, PASSES, SM_COUNT, shipped_triton_specs, spec_key, tile_of, triton_specs

__all__ = ["collect", "build_report", "write_report", "write_calibration", "calibrate_from_bench", "main"]

LABEL = ("All times and percentages are MODELLED (static throughput model, docs/performance_model.md); "
         "registers, spills, shared memory and instruction counts are MEASURED-STATIC (compiler output). "
         "Nothing here ran on a GPU.")


def _triton_worker(args):
    spec, arch = args
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        return C.compile_triton(spec, arch)
    except Exception as e:  # noqa: BLE001 - a failed compile is a reported fact, not a crash
        return dict(spec=spec, arch=arch, error=f"{type(e).__name__}: {e}"[:2000])


def collect(archs=ARCHS, jobs: int = 2, progress=print, triton: bool = True, cuda: bool = True) -> Dict:
    """Compile everything (cached) -> {"cuda": {arch: {sym: facts}}, "triton": {arch: [result]}, notes}."""
    out: Dict = dict(cuda={}, triton={}, notes=[], versions=C.tool_versions())
    if cuda:
        why = C.cuda_unavailable_reason()
        if why:
            out["notes"].append("CUDA part not run: " + why)
            progress("CUDA part skipped: " + why)
        else:
            for a in archs:
                out["cuda"][a] = C.compile_cuda(a, progress=progress)
    if triton:
        try:
            import triton as _t  # noqa: F401
        except ImportError:
            out["notes"].append("Triton part not run: triton is not installed")
            return out
        work = [(sp, a) for a in archs for sp in shipped_triton_specs(a)]
        t0 = time.perf_counter()
        prev = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "0"  # workers compile for the GPU even if this process interprets
        try:
            import multiprocessing as mp
            with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=mp.get_context("spawn")) as ex:
                for i, r in enumerate(ex.map(_triton_worker, work), 1):
                    out["triton"].setdefault(r["arch"], []).append(r)
                    if progress:
                        st = "error" if "error" in r else ("cached" if r.get("cached") else "compiled")
                        progress(f"triton sm_{r['arch']}  [{i}/{len(work)}]  {r['spec']['kernel']} "
                                 f"{r['spec']['dtype']}/{r['spec']['constexprs'].get('PREC')} {tile_of(r['spec'])}  "
                                 f"({st}, {time.perf_counter() - t0:.0f} s)")
        finally:
            if prev is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = prev
    return out


# ------------------------------------------------------------------------------------------------
def _mix_summary(hot: Optional[Dict]) -> Dict:
    if not hot:
        return {}
    mx = hot["mix"]
    tens = mx.get("hmma", 0) + mx.get("hgmma", 0)
    ffma = mx.get("ffma", 0)
    unit = tens or ffma or 1
    return dict(loop_instr=mx.get("total", 0), hmma=mx.get("hmma", 0), hgmma=mx.get("hgmma", 0), ldsm=mx.get("ldsm", 0),
                ld_generic=mx.get("ld_generic", 0), cp_async=mx.get("cp_async", 0), tma=mx.get("tma", 0),
                ldg_16=mx.get("ldg_16", 0), ldg_32=mx.get("ldg_32", 0), ldg_128=mx.get("ldg_128", 0),
                sts=mx.get("sts", 0), lds=mx.get("lds", 0), ffma=ffma, int_addr=mx.get("int_addr", 0),
                barrier=mx.get("barrier", 0), sync=mx.get("sync", 0),
                instr_per_unit=round(mx.get("total", 0) / unit, 2),
                unit=("tensor op" if tens else "FFMA" if ffma else "iteration"))


def kernel_rows(data: Dict) -> List[Dict]:
    """One row per compiled kernel/config and arch (measured-static)."""
    rows = []
    for a, kf in data["cuda"].items():
        for sym, f in sorted(kf.items(), key=lambda kv: kv[1]["name"]):
            thr = {"tc_toeplitz": 32 * (f["template"] or (1, 1))[0], "tc_toeplitz_mma": 128,
                   "grad_weight_tc": 128, "grad_weight_ffma": 128}.get(f["role"], 256)
            occ = M.occupancy(f["regs"] or 0, thr, 0)
            rows.append(dict(backend="cuda", arch=f"sm_{a}", kernel=f["name"], config="", dtype=f["dtype"],
                             role=f["role"], status=ROLE_STATUS.get(f["role"]), regs=f["regs"], spill_stores=f["spill_stores"],
                             spill_loads=f["spill_loads"], static_smem=f["static_smem"], dynamic_smem="per shape",
                             ctas_per_sm_regs=occ["ctas_per_sm"], **_mix_summary(f.get("hot"))))
    for a, res in data["triton"].items():
        for r in res:
            sp = r["spec"]
            base = dict(backend="triton", arch=f"sm_{a}", kernel=sp["kernel"], dtype=sp["dtype"],
                        prec=sp["constexprs"].get("PREC"), config=tile_of(sp),
                        shape=f"H{sp['values'].get('H') or sp['constexprs'].get('H') or sp['constexprs'].get('HA')}"
                              f"/K{sp['values']['KH']}/S{sp['constexprs']['SH']}")
            if "error" in r:
                rows.append(dict(base, error=r["error"]))
                continue
            f = r["facts"]
            occ = M.occupancy(f["regs"], 32 * sp["num_warps"], f["dynamic_smem"] or 0)
            role = describe_symbol(sp["kernel"])["role"]
            rows.append(dict(base, role=role, status=ROLE_STATUS.get(role), regs=f["regs"], spill_stores=f["spill_stores"],
                             spill_loads=f["spill_loads"], static_smem=f["static_smem"], dynamic_smem=f["dynamic_smem"],
                             ctas_per_sm=occ["ctas_per_sm"], occ_limiter=occ["limiter"],
                             ptx_vector_loads=f.get("ptx_vector_loads"), **_mix_summary(_hot_or_whole(f))))
    return rows


def _hot_or_whole(f: Dict) -> Optional[Dict]:
    """The hot loop, or the whole function for a kernel whose MMAs are straight-line code (no loop has
    tensor ops: the batch-as-rows forward at one M tile per program)."""
    loops = f.get("sass", {}).get("loops", [])
    whole = f.get("sass", {}).get("mix", {})
    if whole.get("tensor") and not any(lp["mix"].get("tensor") for lp in loops):
        return dict(mix=whole)
    return f.get("hot")


def _short(name: str) -> str:
    for junk in ("void lkconv::", "lkconv::", "(lkconv::ConvArgs, lkconv::SpPlan, int)", "(lkconv::ConvArgs, lkconv::SpPlan)",
                 "(lkconv::GradWeightArgs, lkconv::SpPlan, int, int)", "(lkconv::ConvArgs, int)", "(lkconv::ConvArgs)",
                 "(lkconv::GradWeightArgs)", "(lkconv::WgradArgs)"):
        name = name.replace(junk, "")
    return name


def _best_triton(tri: Dict, layer, p: str, dt: str, arch: int, machine, aligned: bool):
    """(best modelled config, the non-autotuned default config's model) over the specs that compiled."""
    best = dflt = None
    for sp in triton_specs(layer, p, dt, arch, aligned=aligned):
        res = tri.get(spec_key(sp))
        if res is None:
            continue
        r = M.model_triton(res["facts"], sp, layer, dt, machine, SM_COUNT[arch])
        r["config"] = tile_of(sp)
        r["kernel"] = sp["kernel"]
        if best is None or r["t_lo"] < best["t_lo"]:
            best = r
        if sp.get("default_config"):
            dflt = r
    return best, dflt


def model_rows(data: Dict, arch: int = 90, machine: M.Machine = M.H100) -> List[Dict]:
    """One row per (layer, pass, dtype): the CUDA kernel the launcher routes to by default and its
    fallback, the best Triton config of the default (aligned) kernels and of the fallback kernels; modelled."""
    rows = []
    tri = {spec_key(r["spec"]): r for r in data["triton"].get(arch, []) if "error" not in r}
    kf = data["cuda"].get(arch)
    for layer in LAYERS:
        for dt in DTYPES:
            fl = M.floors(layer, dt, machine)
            for p in PASSES:
                row = dict(layer=layer.label, pass_=p, dtype=dt, tc_floor_us=fl["tc_floor_s"] * 1e6,
                           ffma_floor_us=fl["ffma_floor_s"] * 1e6, hbm_us=fl["hbm_s"] * 1e6)
                if kf:
                    r = M.model_cuda_v2(kf, layer, p, dt, machine, SM_COUNT[arch])
                    if r is not None:
                        row.update(cuda_kernel=_short(r["kernel"]),
                                   cuda_tile=r.get("tile"), cuda_us_lo=r["t_lo"] * 1e6, cuda_us_hi=r["t_hi"] * 1e6,
                                   cuda_limiter=r["limiter"], cuda_ctas_per_sm=r["occupancy"]["ctas_per_sm"],
                                   cuda_occ_limiter=r["occupancy"]["limiter"],
                                   cuda_pct_tc=M.percent(fl["tc_floor_s"], r["t_lo"]),
                                   cuda_pct_ffma=M.percent(fl["ffma_floor_s"], r["t_lo"]),
                                   cuda_parts_us={k: round(v * 1e6, 1) for k, v in r["parts"].items()},
                                   cuda_note=("CUDA's IEEE fp32 kernel (no TF32 path for this shape)"
                                              if dt == "tf32" and "tf32" not in r["kernel"] else ""))
                    fb = M.model_cuda(kf, layer, p, dt, machine, SM_COUNT[arch])
                    if fb is not None and _short(fb["kernel"]) != row.get("cuda_kernel"):
                        row.update(cuda_fallback_kernel=_short(fb["kernel"]), cuda_fallback_us_lo=fb["t_lo"] * 1e6,
                                   cuda_fallback_us_hi=fb["t_hi"] * 1e6, cuda_fallback_limiter=fb["limiter"])
                best, dflt = _best_triton(tri, layer, p, dt, arch, machine, aligned=True)
                if best:
                    row.update(triton_kernel=best["kernel"], triton_config=best["config"],
                               triton_us_lo=best["t_lo"] * 1e6,
                               triton_us_hi=best["t_hi"] * 1e6, triton_limiter=best["limiter"],
                               triton_ctas_per_sm=best["occupancy"]["ctas_per_sm"],
                               triton_pct_tc=M.percent(fl["tc_floor_s"], best["t_lo"]),
                               triton_pct_ffma=M.percent(fl["ffma_floor_s"], best["t_lo"]),
                               triton_prep_us=best.get("prep_us"),
                               triton_parts_us={k: round(v * 1e6, 1) for k, v in best["parts"].items()})
                if dflt:
                    row.update(triton_default_config=dflt["config"], triton_default_us_lo=dflt["t_lo"] * 1e6,
                               triton_default_us_hi=dflt["t_hi"] * 1e6)
                fbt, _ = _best_triton(tri, layer, p, dt, arch, machine, aligned=False)
                if fbt:
                    row.update(triton_fallback_kernel=fbt["kernel"], triton_fallback_config=fbt["config"],
                               triton_fallback_us_lo=fbt["t_lo"] * 1e6, triton_fallback_us_hi=fbt["t_hi"] * 1e6,
                               triton_fallback_limiter=fbt["limiter"])
                rows.append(row)
    return rows


def routing_rows(model: List[Dict]) -> List[Dict]:
    """The routing input: per (backend, layer, pass, dtype) the modelled time at the slow end of the
    range (ISSUE_EFF_LOW issue efficiency) of the kernel the backend runs by default."""
    out = []
    for r in model:
        for be in ("cuda", "triton"):
            hi = r.get(f"{be}_us_hi")
            if hi is None:
                continue
            fb = r.get(f"{be}_fallback_us_hi")
            out.append(dict(backend=be, layer=r["layer"], pass_=r["pass_"], dtype=r["dtype"],
                            modelled_us=round(hi, 1), kernel=r.get(f"{be}_kernel"),
                            config=r.get("cuda_tile") if be == "cuda" else r.get("triton_config"),
                            limiter=r.get(f"{be}_limiter"),
                            fallback_kernel=r.get(f"{be}_fallback_kernel"),
                            fallback_modelled_us=round(fb, 1) if fb is not None else None, kind="modelled"))
    return out


ROUTING_MODULE = "routing_modelled.py"  # in lkconv/backends/, generated by routing_module_text
_HALF = ("fp16", "bf16")


def routing_cells(routing: Dict) -> Dict:
    """``routing.json`` -> ``{(backend, shape class, pass, dtype class): (µs, kernel)}`` as
    :mod:`lkconv.backends.routing` keys them: the shape class is the layer's plane side ("56", ...),
    fp16 and bf16 merge into "half" by taking the slower; fp32 and tf32 stay."""
    cells: Dict = {}
    for r in routing["rows"]:
        cls = r["layer"].split("/H")[1].split("/")[0]
        dcls = "half" if r["dtype"] in _HALF else r["dtype"]
        key = (r["backend"], cls, r["pass_"], dcls)
        kernel = (r.get("kernel") or "").replace("(anonymous namespace)::", "").split("(")[0].split("<")[0]
        if key not in cells or r["modelled_us"] > cells[key][0]:
            cells[key] = (float(r["modelled_us"]), kernel)
    return cells


def routing_module_text(routing: Dict, report_name: str) -> str:
    """The source of ``lkconv/backends/routing_modelled.py``: the modelled lkconv rows of ``auto``'s
    routing table, from one committed static report (so the table has one source: the report)."""
    lines = [f'"""GENERATED by `python -m lkconv static --update-routing benchmarks/results/{report_name}` '
             "from that folder's routing.json; do not edit.",
             "",
             "MODELLED times (static throughput model, docs/performance_model.md; H100 SXM, RepLKNet-31B layers at",
             f"N=64, the slow end of the range: {routing.get('issue_efficiency', 0.7)} issue efficiency) of each lkconv "
             "backend's default kernel, keyed",
             "(backend, shape class, pass, dtype class) as in lkconv.backends.routing; value (µs, kernel).",
             '"""', "", f"REPORT = {report_name!r}", "", "CELLS = {"]
    for key, (us, kernel) in sorted(routing_cells(routing).items()):
        lines.append(f"    {key!r}: ({us!r}, {kernel!r}),")
    lines += ["}", ""]
    return "\n".join(lines)


def update_routing(report_dir: str, package_dir: Optional[str] = None) -> str:
    """Write lkconv/backends/routing_modelled.py from ``report_dir``/routing.json; returns its path."""
    with open(os.path.join(report_dir, "routing.json")) as f:
        routing = json.load(f)
    package_dir = package_dir or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "backends")
    path = os.path.join(package_dir, ROUTING_MODULE)
    with open(path, "w") as f:
        f.write(routing_module_text(routing, os.path.basename(os.path.normpath(report_dir))))
    return path


def readme_performance_table(report_dir: str) -> str:
    """The README's modelled GPU table (bf16/fp16 merged by the slower, as auto's routing reads them) of
    a committed report folder, with the TC floor and PyTorch's estimated NCHW times from the routing
    table: ``tests/test_routing.py`` checks that README.md holds exactly this table."""
    from ..backends.routing import TIMES_US

    with open(os.path.join(report_dir, "routing.json")) as f:
        cells = routing_cells(json.load(f))
    with open(os.path.join(report_dir, "static.json")) as f:
        floors = json.load(f)["floors"]

    def us(v):
        return f"{v:,.0f}"

    out = ["| layer | pass | `cuda` µs (modelled) | `triton` µs (modelled) | tensor-core floor µs | "
           "PyTorch NCHW µs (estimate, ±2×) |", "|---|---|---:|---:|---:|---:|"]
    for label, fl in floors.items():
        cls, k = label.split("/H")[1].split("/")[0], label.split("/K")[1]
        floor = f"{fl['bf16']['tc_floor_s'] * 1e6:.1f}"
        for passes in (("forward", "grad_input"), ("grad_weight",)):
            be = {b: " / ".join(sorted({us(cells[(b, cls, p, "half")][0]) for p in passes}))
                  for b in ("cuda", "triton")}  # one number where forward and grad_input agree (stride 1)
            torch_t = " / ".join(us(TIMES_US[("torch", cls, p, "half")][0]) for p in passes)
            out.append(f"| {cls}²/K{k} | {' / '.join(passes)} | {be['cuda']} | {be['triton']} | "
                       f"{floor} | {torch_t} |")
    return "\n".join(out)


def _f(v, nd=0):
    if v is None or v == "":
        return "—"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def model_markdown(rows: List[Dict], dtypes=("bf16", "fp32")) -> str:
    out = []
    for dt in dtypes:
        out += [f"### {dt} — modelled (H100 SXM; range = perfect latency hiding … 0.7 issue efficiency)", "",
                "| layer | pass | TC floor µs | FFMA floor µs | CUDA kernel (default) | CUDA µs | CUDA % TC / % FFMA floor | "
                "limiter | Triton config (aligned, best modelled) | Triton µs | Triton % TC / % FFMA floor | limiter | "
                "CUDA fallback µs | Triton fallback µs |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["dtype"] != dt:
                continue
            out.append(
                f"| {r['layer']} | {r['pass_']} | {r['tc_floor_us']:,.1f} | {r['ffma_floor_us']:,.1f} | "
                f"{r.get('cuda_kernel', '—')} {r.get('cuda_tile') or ''} | "
                f"{_f(r.get('cuda_us_lo'))}–{_f(r.get('cuda_us_hi'))} | "
                f"{_f(r.get('cuda_pct_tc'), 2)} / {_f(r.get('cuda_pct_ffma'), 1)} | {r.get('cuda_limiter', '—')} | "
                f"{r.get('triton_config', '—')} | {_f(r.get('triton_us_lo'))}–{_f(r.get('triton_us_hi'))} | "
                f"{_f(r.get('triton_pct_tc'), 2)} / {_f(r.get('triton_pct_ffma'), 1)} | "
                f"{r.get('triton_limiter', '—')} | "
                f"{_f(r.get('cuda_fallback_us_lo'))}–{_f(r.get('cuda_fallback_us_hi'))} | "
                f"{_f(r.get('triton_fallback_us_lo'))}–{_f(r.get('triton_fallback_us_hi'))} |")
        out.append("")
    return "\n".join(out)


def kernels_markdown(krows: List[Dict]) -> str:
    cols = ["backend", "arch", "kernel", "status", "config", "dtype", "regs", "spill_stores", "static_smem", "dynamic_smem",
            "loop_instr", "unit", "instr_per_unit", "hmma", "hgmma", "ldsm", "ld_generic", "cp_async", "ldg_16",
            "ldg_128", "ffma", "int_addr", "barrier", "sync"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in krows:
        if "error" in r:
            out.append(f"| {r['backend']} | {r['arch']} | {r['kernel']} | {r.get('config')} | {r['dtype']} | "
                       f"COMPILE ERROR: {r['error'][:120]} |")
            continue
        out.append("| " + " | ".join(_f(r.get(c), 2) if isinstance(r.get(c), float) else _f(r.get(c)) for c in cols)
                   + " |")
    return "\n".join(out)


def build_report(data: Dict) -> Dict:
    # the model is for H100/H200 (sm_90 code); sm_80 contributes compiler facts (CI checks) only
    model = model_rows(data, 90, M.H100) if (data["cuda"].get(90) or data["triton"].get(90)) else []
    return dict(label=LABEL, versions=data["versions"], notes=data["notes"], kernels=kernel_rows(data),
                model_h100=model, routing=routing_rows(model), floors={l.label: {dt: M.floors(l, dt) for dt in DTYPES}
                                                           for l in LAYERS},
                machine=M.H100.__dict__, h200_hbm_Bps=M.H200.hbm_Bps, issue_eff_low=M.ISSUE_EFF_LOW)


MODEL_NOTES = """\
## How the default kernels are modelled (all modelled; assumptions)

* **Small planes** (14², 7²: both planes <= 256 pixels, `sp_rule`): every CUDA pass runs the batch-as-rows
  kernels (`small_plane_mma_kernel` / `small_plane_ffma_kernel`, `small_plane_gw_mma_kernel` /
  `small_plane_gw_ffma_kernel`): per CTA (channel, pixel block, batch group) of the launcher's plan the filter
  staging, the F_c zero-fill and scatter (per warp its slowest lane's kernel-row trips and word/element
  copies; the dearer of the two build instantiations' loop bodies), per batch chunk the staging (per
  vector or element), per warp item the K-loop body per 16-wide step (full items: the conditional-free
  loop; partial items: the checked loop and twice the item body, for the out-of-line call), HMMA.16816 =
  2048 MACs for live tiles, 4 wavefronts per ldmatrix.x4; grad_weight adds the tap sums (per warp and
  round of 32 taps its slowest lane's rows and pairs) and the fp32 partials (write + read) to HBM.
* **Routing** follows the launchers for the layer set (stride 1, K <= 64); above 256 pixels: CUDA fp16/bf16 forward and
  grad_input -> `toeplitz_mma_kernel` (`<NB,DG>` of `toeplitz_mma_config`: `<4,3>` at 56², `<2,3>` at
  28²); fp32 -> `fp32_rb_kernel` (`<7,7,8,1,4,8>` = 56x56x4 planes at 56²,
  `<7,7,4,2,4,2>` = 28x28x4 below, the `fp32_rb_small_tile` rule), tf32 (fp32 with TF32 allowed) ->
  `toeplitz_tf32_kernel` (`<4,6>` at 56², `<2,6>` at 28²: the image-rows tiling with HMMA.1688.F32.TF32 =
  1024 MACs at half the 16-bit mma.sync rate, 8 warps, the in-place TF32 rounding pass of the staging charged per
  vector; at 14² / 7² `small_plane_mma_kernel<float>`); grad_weight -> `grad_weight_tc_kernel`
  (fp16/bf16) / `grad_weight_ffma_kernel` (fp32, also for tf32: CUDA's grad_weight has no TF32 path), split count of
  `grad_weight_splits`.  Triton (`ops.ALIGNED = True`): forward and stride-1 grad_input ->
  `dwconv_forward_rows_kernel` for planes of more than 256 pixels and at most 128 columns (56², 28²),
  else `dwconv_forward_aligned_kernel` (14², 7²); grad_weight -> `dwconv_grad_weight_diag_kernel` for
  planes up to 128 columns (the whole layer set; `dwconv_grad_weight_aligned_kernel` is its fallback
  for wider planes); the time is the best modelled config of the list the shipped prune keeps (the
  autotuner keeps the fastest measured one); `triton_default_*` in model.csv is the non-autotuned
  default config.  "fallback" columns: `toeplitz_wmma_kernel` (now only K > 64) and
  `grad_weight_partial_kernel`, and the unaligned Triton kernels (`ops.ALIGNED = False`).
* **toeplitz_mma_kernel** (image-rows tiling: the mma's n8 = 8 images at one output row, m16 = 16 output
  columns, k16 = 16 input columns; CTA = 8 images x `bm` rows x 16*NB columns, `bm` of
  `toeplitz_mma_rows` with the H100 opt-in limit): per CTA the needed input rows of its images are
  staged (cp.async vectors of `vec_x` elements: 8 / 4 / 2 / 1 at 56² / 28² / 14² / 7²), the zero row,
  the filter rows and their shifted copy; per warp and output-row pair the pair loop's own SASS (the
  epilogue, both store paths: upper bound), per Toeplitz-offset group the group loop's, and per kernel row
  of the pair's range the hot-loop body (measured-static; all chunk blocks issue, predicated), HMMA.16816 =
  2048 MACs only for chunks that meet the image columns (ASSUMED: a predicated-off HMMA takes no tensor
  time), 4 wavefronts per live ldmatrix.x4 and 1 per 32-bit A word (conflict-free: odd image pitch).
* **grad_weight_tc / grad_weight_ffma**: per CTA (c, split) its staged batches of <= 16 rows (never
  across an image), one 64-column window; per warp its rows i = wr (mod 4), per row nq 16-column
  chunks (tc: the `<MB,NB>` variant's unrolled body per chunk; ffma: the 256-FFMA body per 8 columns)
  plus the row loop; staging charged per vector; fp32 partials (write + read) in the HBM traffic.
* **fp32_rb_kernel**: per CTA the x staging (cp.async vectors of `vec_x` floats: 4 at 56² / 28², only the
  tile's image rows for the 56x56x4 tile) and the chunk-major filter; per warp its uniform input-row range
  (the zero-border rows of the image are skipped per 7-row / 14-row warp) and 4-tap chunk count; per input
  row with v valid output rows the measured-static 3-chunk loop body of that row-count instantiation / 3 per
  chunk (v = 7: 628 SASS, 588 FFMA on sm_90) plus single taps and an estimated 40 instructions per row;
  x LDS.32 conflict-free (layout), filter LDS.128 broadcast (1 wavefront).
* **Aligned Triton**: per program the loop trip count of the kernel's own bounds, the hot loop body
  per iteration per warp, and **once per program the kernel's straight-line SASS** (an upper bound:
  both sides of every branch).  HBM: the kernel reads the bordered copy (`N*C*H*WP`) instead of x and,
  forward, the band `C*KH*LB*16` once; the copy (read x + write the copy) and the band write are
  separate torch kernels, charged as **additive** prep time at HBM bandwidth (`parts.prep`).
  HGMMA at the wgmma peak irrespective of N (the Toeplitz aligned kernels issue 64x16x16: optimistic;
  the rows and diag kernels issue 64x64x16 at 56², 64x32x16 at 28²).
* **Triton rows forward**: per program (64 output rows -- or whole packed planes -- by the whole output
  row) (rounded kernel-row range) x (WQ / BK) chunks; HBM: the column-padded copy `N*C*H*WQ` (padding
  rows masked, not stored) instead of x and the whole-row band `C*KHP*WQ*BN` once per channel; copy and band are additive prep.
* **Triton diag grad_weight**: per program (channel, kernel-row block, image split) (images / IMG) x
  (clipped output rows / BKR) iterations, plus the straight-line diagonal epilogue; HBM: the bordered
  copy instead of x, grad_out (in place, or its padded copy at prep when its rows are not 8-byte
  aligned), the fp32 scratch Z written **and** read back (pessimistic: the read normally hits L2), the
  fp32 partials; the copy is additive prep.
* Unchanged from the earlier report: mma.sync at half the wgmma rate (unmeasured), 0.7 issue
  efficiency for the slow end, H100 SXM constants (docs/performance_model.md).
* `routing.json` / `routing.csv`: per (backend, layer, pass, dtype) the slow end of the range of the
  kernel each backend runs by default.  There is no torch NCHW estimate: neither this report nor the
  earlier one models torch/cuDNN (no cuDNN kernel is compiled here).
"""


def write_report(rep: Dict, outdir: str, baseline: Optional[str] = None) -> List[str]:
    os.makedirs(outdir, exist_ok=True)
    paths = []
    p = os.path.join(outdir, "static.json")
    with open(p, "w") as f:
        json.dump(rep, f, indent=1, default=str)
    paths.append(p)
    p = os.path.join(outdir, "routing.json")
    with open(p, "w") as f:
        json.dump(dict(label=LABEL, machine="H100 SXM (sm_90 code)", issue_efficiency=M.ISSUE_EFF_LOW,
                       value="modelled_us = the slow end of the modelled range (0.7 issue efficiency) of the "
                             "backend's default kernel; fallback_modelled_us the same for the kernel the backend "
                             "keeps behind a switch (CUDA: the pre-v2 kernel; Triton: ops.ALIGNED = False)",
                       note="no torch NCHW estimate: the static model has none (no cuDNN kernel is compiled here)",
                       rows=rep.get("routing", [])), f, indent=1)
    paths.append(p)
    for name, rows in (("kernels.csv", rep["kernels"]), ("model.csv", rep["model_h100"]),
                       ("routing.csv", rep.get("routing", []))):
        p = os.path.join(outdir, name)
        keys: List[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()})
        paths.append(p)
    md = ["# lkconv static performance report", "", f"**{LABEL}**", "",
          "Tools: " + ", ".join(f"{k} {v}" for k, v in rep["versions"].items()), ""]
    for n in rep["notes"]:
        md += [f"> {n}", ""]
    md += ["## Modelled time per (layer, pass, dtype), H100 SXM, sm_90 code", "",
           "N = 64, stride 1, padding K//2. Floors: docs/performance_model.md. forward and grad_input (stride 1) "
           "run the same kernel. `limiter`: the model's binding resource on the busiest SM.", "",
           model_markdown(rep["model_h100"], ("bf16", "fp16", "fp32", "tf32")), "",
           MODEL_NOTES, ""]
    if baseline:
        md += [f"## Before/after (modelled): `{os.path.basename(os.path.normpath(baseline))}` -> this report", "",
               "Same floors and constants; the earlier numbers are the committed ones (its model charged no "
               "straight-line code per Triton program; re-modelled now, the unaligned Triton kernels are "
               "0-11 % slower, see the fallback columns above).", "",
               compare_markdown(os.path.join(baseline, "model.csv"), os.path.join(outdir, "model.csv"),
                                os.path.basename(os.path.normpath(baseline)).replace("static-", ""), "now"), ""]
    md += ["## Kernels (measured-static)", "",
           "Hot loop = the loop issuing the tensor ops (else the FFMA); counts are SASS instructions of one "
           "iteration of its body per warp; `instr_per_unit` per tensor instruction (HMMA/HGMMA) or per FFMA.", "",
           kernels_markdown(rep["kernels"]), ""]
    p = os.path.join(outdir, "README.md")
    with open(p, "w") as f:
        f.write("\n".join(md))
    paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------------
def write_calibration(measured: List[Dict], outdir: str, model_csv: Optional[str] = None) -> Optional[str]:
    """Measured ÷ modelled per (layer, pass, dtype, backend).

    ``measured``: rows with ``layer`` (e.g. ``C128/H56/K31``), ``pass`` (forward, grad_input,
    grad_weight), ``dtype`` (fp16, bf16, fp32, tf32), ``backend`` (cuda, triton) and ``us`` (measured
    median).  The model is taken from ``model_csv`` (default: the newest committed
    ``benchmarks/results/static-*/model.csv``).  Writes ``calibration.csv`` and ``calibration.md`` in
    ``outdir``; returns the markdown path (None when no model table is found)."""
    from .tools import repo_root

    if model_csv is None:
        root = repo_root()
        cands = []
        if root:
            base = os.path.join(root, "benchmarks", "results")
            for d in os.listdir(base) if os.path.isdir(base) else []:
                p = os.path.join(base, d, "model.csv")
                if d.startswith("static-") and os.path.isfile(p):
                    cands.append(p)
        if not cands:
            return None
        model_csv = max(cands, key=os.path.getmtime)
    with open(model_csv) as f:
        model = {(r["layer"], r["pass_"], r["dtype"]): r for r in csv.DictReader(f)}
    rows = []
    for m in measured:
        mr = model.get((m["layer"], m["pass"], m["dtype"]))
        if mr is None:
            continue
        lo = mr.get(f"{m['backend']}_us_lo")
        if not lo:
            continue
        lo = float(lo)
        hi = float(mr[f"{m['backend']}_us_hi"])
        rows.append(dict(layer=m["layer"], pass_=m["pass"], dtype=m["dtype"], backend=m["backend"],
                         measured_us=m["us"], modelled_us_lo=lo, modelled_us_hi=hi,
                         measured_over_modelled=m["us"] / lo, limiter=mr.get(f"{m['backend']}_limiter")))
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "calibration.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["layer", "pass_", "dtype", "backend", "measured_us", "modelled_us_lo",
                                          "modelled_us_hi", "measured_over_modelled", "limiter"])
        w.writeheader()
        w.writerows(rows)
    md = ["# measured ÷ modelled", "", f"model: `{os.path.relpath(model_csv, outdir)}` (modelled); "
          "measured: this run's GPU timings (measured).  A ratio of 1 means the model's constants hold for "
          "that cell's limiter; record calibrated constants in docs/performance_model.md.", "",
          "| layer | pass | dtype | backend | measured µs | modelled µs | measured ÷ modelled | model limiter |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['layer']} | {r['pass_']} | {r['dtype']} | {r['backend']} | {r['measured_us']:,.1f} | "
                  f"{r['modelled_us_lo']:,.0f}–{r['modelled_us_hi']:,.0f} | {r['measured_over_modelled']:.2f} | "
                  f"{r['limiter']} |")
    p = os.path.join(outdir, "calibration.md")
    with open(p, "w") as f:
        f.write("\n".join(md) + "\n")
    return p


def calibrate_from_bench(results_csv: str, outdir: str, model_csv: Optional[str] = None) -> Optional[str]:
    """The GPU suite's hook: measured times of ``lkconv-cuda`` / ``lkconv-triton`` (NCHW) from a
    ``python -m lkconv bench`` results.csv, for the cells of the static model (N = 64 layer set;
    passes forward, grad_input, grad_weight), -> :func:`write_calibration`.  None when no cell matches."""
    measured = []
    with open(results_csv) as f:
        for r in csv.DictReader(f):
            backend = {"lkconv-cuda": "cuda", "lkconv-triton": "triton"}.get(r.get("provider"))
            if backend is None or r.get("status") != "ok" or r.get("pass") not in PASSES or not r.get("ms"):
                continue
            if r.get("dtype") not in DTYPES or int(r.get("n") or 0) != 64 or r.get("kh") != r.get("kw"):
                continue
            measured.append(dict(layer=f"C{r['c']}/H{r['h']}/K{r['kh']}", backend=backend, dtype=r["dtype"],
                                 us=float(r["ms"]) * 1e3, **{"pass": r["pass"]}))
    if not measured:
        return None
    return write_calibration(measured, outdir, model_csv)


def default_outdir() -> str:
    from lkconv.bench.env import git_commit
    from .tools import repo_root

    root = repo_root() or os.getcwd()
    return os.path.join(root, "benchmarks", "results", f"static-{git_commit() or 'nocommit'}")


def main(out: Optional[str] = None, archs=ARCHS, jobs: int = 2, quiet: bool = False,
         baseline: Optional[str] = None) -> int:
    t0 = time.perf_counter()

    def progress(msg):
        if not quiet:
            print(f"[static {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    print(LABEL, flush=True)
    data = collect(archs, jobs=jobs, progress=progress)
    rep = build_report(data)
    out = out or default_outdir()
    paths = write_report(rep, out, baseline)
    print()
    print(model_markdown(rep["model_h100"], ("bf16", "fp32")))
    errs = [r for r in rep["kernels"] if "error" in r]
    spills = [r for r in rep["kernels"] if (r.get("spill_stores") or 0) > 0]
    for r in spills:
        print(f"SPILL: {r['backend']} {r['arch']} {r['kernel']} {r.get('config', '')} {r['dtype']}: "
              f"{r['spill_stores']} B spill stores")
    for r in errs:
        print(f"COMPILE ERROR: {r['backend']} {r['arch']} {r['kernel']} {r.get('config')}: {r['error'][:300]}")
    print(f"\nwrote {', '.join(os.path.relpath(p) for p in paths)}  ({time.perf_counter() - t0:.0f} s)")
    return 1 if errs else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def compare_markdown(old_csv: str, new_csv: str, old_label: str, new_label: str,
                     dtypes=("bf16", "fp32")) -> str:
    """Before/after table of two committed ``model.csv`` files (modelled µs range and % of the floor:
    TC floor for the 16-bit dtypes, FFMA floor for fp32), CUDA and Triton default kernels."""
    def load(p):
        with open(p) as f:
            return {(r["layer"], r["pass_"], r["dtype"]): r for r in csv.DictReader(f)}

    old, new = load(old_csv), load(new_csv)

    def rng(r, be):
        lo, hi = r.get(f"{be}_us_lo"), r.get(f"{be}_us_hi")
        return f"{float(lo):,.0f}–{float(hi):,.0f}" if lo else "—"

    def pct(r, be, dt):
        v = r.get(f"{be}_pct_{'ffma' if dt == 'fp32' else 'tc'}")
        return f"{float(v):.1f}" if v else "—"

    out = []
    for dt in dtypes:
        fl = "FFMA" if dt == "fp32" else "TC"
        out += [f"#### {dt} — modelled µs (H100 SXM), {old_label} → {new_label}; % = % of the {fl} floor", "",
                f"| layer | pass | CUDA {old_label} | % | CUDA {new_label} | % | Triton {old_label} | % | "
                f"Triton {new_label} | % |", "|---|---|---|---|---|---|---|---|---|---|"]
        for key, n in new.items():
            if key[2] != dt:
                continue
            o = old.get(key, {})
            out.append(f"| {key[0]} | {key[1]} | {rng(o, 'cuda')} | {pct(o, 'cuda', dt)} | {rng(n, 'cuda')} | "
                       f"{pct(n, 'cuda', dt)} | {rng(o, 'triton')} | {pct(o, 'triton', dt)} | {rng(n, 'triton')} | "
                       f"{pct(n, 'triton', dt)} |")
        out.append("")
    return "\n".join(out)
