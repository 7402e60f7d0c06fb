"""The benchmark loop: shape -> dtype -> pass -> provider; gate, then time; one row per measurement."""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .gate import Case, check_outputs
from .peaks import floor_seconds, lookup_peak
from .providers import DTYPES, Provider
from .shapes import PASSES, Shape
from .timing import time_cpu, time_cuda
from ..testing import tf32

__all__ = ["run_benchmark", "ROW_FIELDS", "STATUSES"]

ROW_FIELDS = [
    "group", "shape", "n", "c", "h", "w", "kh", "kw", "dtype", "pass", "provider", "status",
    "ms", "ms_min", "ms_max", "reps", "gflops", "gbps", "pct_floor", "bound", "speedup",
    "err", "tol", "note",
]
#: ok: gated and timed; WRONG: failed the gate (not timed); unsupported / unavailable: declined;
#: error: raised; skipped: time budget exhausted
STATUSES = ("ok", "WRONG", "unsupported", "unavailable", "error", "skipped")


def _row(shape: Shape, dtype: str, pass_: str, provider: str, status: str, note: str = "") -> Dict:
    r = {k: "" for k in ROW_FIELDS}
    r.update(group=shape.group, shape=shape.label, n=shape.n, c=shape.c, h=shape.h, w=shape.w, kh=shape.kh,
             kw=shape.kw, dtype=dtype, provider=provider, status=status, note=note)
    r["pass"] = pass_
    return r


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:300]


def run_benchmark(
    shapes: Sequence[Shape],
    providers: Sequence[Provider],
    dtypes: Sequence[str] = ("fp32",),
    passes: Sequence[str] = ("forward", "all"),
    device="cpu",
    *,
    budget_s: Optional[float] = None,
    progress: bool = True,
    cpu_timing: Optional[Dict] = None,
    cuda_timing: Optional[Dict] = None,
    log: Callable[[str], None] = print,
    gpu_name: Optional[str] = None,
) -> List[Dict]:
    """Run every (shape, dtype, pass, provider) combination and return one row dict per combination
    (fields :data:`ROW_FIELDS`).  A provider is timed only after its outputs pass the gate."""
    device = torch.device(device)
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r} (argument: --dtypes); choose from {sorted(DTYPES)}")
    for p in passes:
        if p not in PASSES:
            raise ValueError(f"unknown pass {p!r} (argument: --passes); choose from {list(PASSES)}")
    if device.type == "cuda" and gpu_name is None:
        gpu_name = torch.cuda.get_device_name(device)
    # the peak table applies to GPU runs (gpu_name may also be given explicitly, e.g. in tests)
    peak = lookup_peak(gpu_name)

    unavailable = {}
    for prov in providers:
        try:
            why = prov.unavailable(device)
        except Exception as e:  # a provider must never break the run
            why = f"failed to probe: {_short(e)}"
        if why:
            unavailable[prov.name] = why

    total = len(shapes) * len(dtypes) * len(passes) * len(providers)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="bench", unit="case", dynamic_ncols=True, leave=True)
        except ImportError:
            bar = None
    done = 0
    t_start = time.perf_counter()
    rows: List[Dict] = []

    def tick(desc: str):
        nonlocal done
        done += 1
        if bar is not None:
            bar.set_postfix_str(desc[:60], refresh=False)
            bar.update(1)
        elif progress:
            log(f"[{done}/{total}] {desc}")

    for shape in shapes:
        for dtype in dtypes:
            case = None
            try:
                for pass_ in passes:
                    group_rows = []
                    for prov in providers:
                        desc = f"{shape.label} {dtype} {pass_} {prov.name}"
                        if prov.name in unavailable:
                            group_rows.append(_row(shape, dtype, pass_, prov.name, "unavailable", unavailable[prov.name]))
                            tick(desc)
                            continue
                        if budget_s is not None and time.perf_counter() - t_start > budget_s:
                            group_rows.append(_row(shape, dtype, pass_, prov.name, "skipped", "time budget exhausted"))
                            tick(desc)
                            continue
                        try:
                            why = prov.supports(shape, DTYPES[dtype][0], pass_, device)
                        except Exception as e:
                            why = f"failed to check: {_short(e)}"
                        if why:
                            group_rows.append(_row(shape, dtype, pass_, prov.name, "unsupported", why))
                            tick(desc)
                            continue
                        if case is None:
                            case = Case(shape, dtype, device)
                        group_rows.append(_measure(case, prov, pass_, device, peak, cpu_timing, cuda_timing))
                        tick(desc)
                    _speedups(group_rows)
                    rows.extend(group_rows)
            finally:
                del case
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if bar is not None:
        bar.close()
    return rows


def _measure(case: Case, prov: Provider, pass_: str, device, peak, cpu_timing, cuda_timing) -> Dict:
    shape, dtype = case.shape, case.dtype_mode
    row = _row(shape, dtype, pass_, prov.name, "error")
    try:
        with tf32(case.tf32):
            x, w, g_gate = prov.prepare(case.x, case.w, case.g_gate)
            fn = prov.make(pass_, x, w, g_gate, shape)
            outs = fn()  # the gate's call doubles as the first warm-up (autotuning, JIT, caches)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            gate = check_outputs(case, pass_, outs)
            del outs
            row["err"], row["tol"] = f"{gate.err:.3g}", f"{gate.tol:.3g}"
            if not gate.ok:
                row["status"] = "WRONG"
                row["note"] = f"failed the correctness gate vs fp64 reference ({gate.detail}); not timed"
                return row
            # time with a fully random grad_out (the gate's is zero beyond the checked sub-batch)
            x, w, g = prov.prepare(case.x, case.w, case.g)
            fn = prov.make(pass_, x, w, g, shape)
            if device.type == "cuda":
                t = time_cuda(fn, device=device, **(cuda_timing or {}))
            else:
                t = time_cpu(fn, **(cpu_timing or {}))
    except Exception as e:  # OOM, a crashing provider, ...: reported, never fatal
        row["status"] = "error"
        row["note"] = _short(e)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row
    flops = shape.flops(pass_)
    nbytes = shape.bytes(pass_, case.x.element_size())
    sec = t.median / 1e3
    row.update(status="ok", ms=f"{t.median:.6g}", ms_min=f"{t.min:.6g}", ms_max=f"{t.max:.6g}", reps=t.n,
               gflops=f"{flops / sec / 1e9:.4g}", gbps=f"{nbytes / sec / 1e9:.4g}")
    if case.n_gate < shape.n:
        row["note"] = f"gate: reference on {case.n_gate}/{shape.n} images"
    if peak is not None:
        fl, bound = floor_seconds(peak, dtype, flops, nbytes)
        row["pct_floor"] = f"{100 * fl / sec:.3g}"
        row["bound"] = bound
    return row


def _speedups(group_rows: List[Dict]) -> None:
    """speedup = torch (NCHW) median / provider median, within one (shape, dtype, pass)."""
    base = next((r for r in group_rows if r["provider"] == "torch" and r["status"] == "ok"), None)
    if base is None:
        return
    for r in group_rows:
        if r["status"] == "ok":
            r["speedup"] = f"{float(base['ms']) / float(r['ms']):.3g}"
