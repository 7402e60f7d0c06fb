"""The command line: ``python -m lkconv {info,bench,verify,static,train}``.

The GPU suite (build, tests, benchmarks from a source checkout) is checkout-only tooling:
``python benchmarks/gpu_suite.py OUTDIR`` (see docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from typing import List, Optional

__all__ = ["main"]

EPILOG = """\
examples:
  python -m lkconv info                      # versions, device, backends (available or why not)
  python -m lkconv bench                     # the default comparison on this machine (CPU: ~2-4 min)
  python -m lkconv bench --shape 8,128,56,56,31 --passes forward,all
  python -m lkconv bench --set ksweep --ks 3,13,31 --dtypes fp16,tf32       # on a GPU
  python -m lkconv bench --set replknet31b --providers torch,torch-cl,lkconv-cuda
  python -m lkconv verify                    # every backend vs the fp64 reference; exit 1 on failure
  python -m lkconv static                    # no GPU: SASS facts + modelled roofline of the GPU kernels
  python -m lkconv train --help              # RepLKNet training (lkconv.models.train)
"""

BENCH_EPILOG = """\
defaults:
  CPU : --set cpu (N=8, C=128, 56x56, K=3,7,13,31) --providers torch,torch-cl,lkconv-cpu
        --dtypes fp32 --passes forward,all
  CUDA: --set replknet31b --providers torch,torch-cl,lkconv-cuda,lkconv-triton,replknet
        --dtypes tf32,fp32,fp16,bf16 --passes forward,grad_input,grad_weight,all

shape sets: cpu, replknet31b, ksweep, tiny.  dtypes: fp32 (TF32 off), tf32 (fp32 data, TF32 allowed),
fp16, bf16, fp64.  passes: forward, grad_input, grad_weight, all (= forward+backward via autograd).
providers: torch (F.conv2d NCHW), torch-cl (channels_last: cuDNN NHWC / oneDNN), lkconv-<backend>
(cpu, cuda, triton, torch, reference; add -cl for channels_last), replknet (original extension).

Every provider is checked against the fp64 reference before it is timed; one that fails is reported
as WRONG and not timed (exit code 1). All arguments are checked before the run starts (a bad one: exit
code 2, one line naming it).  On CPU the run warns when its timings are not to be trusted (repeats
spreading widely, load average above the cores, oversubscribed threads) and says what to do, e.g.
--threads 1.  Results: results.csv, results.md, env.json, speedup_<dtype>.png
in --out (default bench_results/<device>-<date>/).

examples:
  python -m lkconv bench
  python -m lkconv bench --shape 8,128,56,56,31 --shape 8,256,28,28,29 --passes all
  python -m lkconv bench --set cpu --ks 13,31 --repeats 5 --out /tmp/cpu_bench
  python -m lkconv bench --set ksweep --ks 3,7,13,31 --dtypes fp16 --passes forward,all   # GPU
"""


def _csv_list(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_list(text: Optional[str], arg: str) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        return [int(t) for t in _csv_list(text)]
    except ValueError:
        raise ValueError(f"{arg} must be a comma-separated list of integers, got {text!r}") from None


# ------------------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    import platform

    import torch

    import lkconv
    from lkconv.backends import UnsupportedError, get_backend, resolve_backend
    from lkconv.params import normalize_params

    from .bench.env import git_commit, pkg_version

    print(f"lkconv   {lkconv.__version__}  (commit {git_commit() or 'n/a'})  {os.path.dirname(lkconv.__file__)}")
    print(f"torch    {torch.__version__}  (CUDA build {torch.version.cuda or 'none'})")
    print(f"triton   {pkg_version('triton') or 'not installed'}")
    print(f"python   {platform.python_version()}  {platform.platform()}")
    from .bench.env import _cpu_model

    print(f"cpu      {_cpu_model()}  ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}   {p.name}  sm_{p.major}{p.minor}  {p.total_memory / 2**30:.1f} GiB  "
                  f"cuDNN {torch.backends.cudnn.version()}")
    else:
        print("cuda     no CUDA device visible")
    from .bench.env import extension_info, format_extension_line

    print(f"lkconv._C {format_extension_line(extension_info())}")
    from . import ops as _ops

    print("lkconv._cpu_fast " + ("built: delegated CPU calls are remembered in C++" if _ops._fast is not None else
                                 "not built: delegated CPU calls are remembered in Python (~20-70 µs more a call "
                                 "after a large convolution; python setup.py build_ext --inplace builds it)"))
    print()
    print("backends:")
    status = lkconv.backend_status()
    width = max(len(n) for n in status)
    for name, why in status.items():
        desc = ""
        if why is None:
            try:
                desc = get_backend(name).description
            except Exception:
                desc = ""
        print(f"  {name.ljust(width)}  {'available' if why is None else 'unavailable: ' + why}")
        if desc:
            print(f"  {' ' * width}  {desc}")
    print()
    from lkconv.backends import routing

    print("auto on CUDA tensors, per pass (backends/routing.py; lkconv backends expected to beat PyTorch,")
    print(f"fastest first; K >= {routing.LARGE_KERNEL}, stride 1, dilation 1; times in µs are modelled unless "
          "marked measured):")
    for row in routing.route_table():
        times = ", ".join(f"{be} {t:.0f}" for be, t in row["times"].items() if t is not None)
        measured = [be for be, b in row["basis"].items() if b.startswith("measured")]
        print(f"  {row['dtype']:4s} {row['shape'] + '²':4s} {row['pass_']:11s} -> {' > '.join(row['order']):22s}"
              f" ({times}{'; measured: ' + ','.join(measured) if measured else ''})")
    print("  cuda/triton: " + routing.MODEL_BASIS + "; torch: " + routing.TORCH_BASIS
          + " (docs/performance_model.md)")
    print()
    devs = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("auto picks (N=8, C=128, 56x56, padding K//2):")
    for dev in devs:
        for dt in ([torch.float32] if dev == "cpu" else [torch.float32, torch.float16, torch.bfloat16]):
            for k in (3, 31):
                x = torch.empty(1, dtype=dt, device=dev).expand(8, 128, 56, 56)
                w = torch.empty(1, dtype=dt, device=dev).expand(128, 1, k, k)
                p = normalize_params(1, k // 2, 1, (k, k))
                try:
                    pick = resolve_backend("auto", x, w, p)
                except UnsupportedError as e:
                    pick = f"none ({e})"
                print(f"  {dev:4s} {str(dt).replace('torch.', ''):8s} K={k:<2d} -> {pick}")
    return 0


# ------------------------------------------------------------------------------------------------
class UsageError(SystemExit):
    """Bad command-line input: exit code 2 (like argparse's own errors); ``message`` names the argument."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


def _fail(msg: str) -> UsageError:
    """Print the one-line error and return the exception to raise."""
    print(f"error: {msg}", file=sys.stderr)
    return UsageError(msg)


def _parse_device(text: str, arg: str = "--device"):
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise _fail(f"{arg} must be cpu, cuda or cuda:<index>, got {text!r}")
    if device.type not in ("cpu", "cuda"):
        raise _fail(f"{arg} must be cpu, cuda or cuda:<index>, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _fail(f"{arg} {text} requested but no CUDA device is visible "
                        f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise _fail(f"{arg} {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def _check_positive(args, names_min) -> None:
    for name, lo, strict in names_min:
        v = getattr(args, name, None)
        if v is None:
            continue
        if v < lo or (strict and v == lo):
            flag = "--" + name.replace("_", "-")
            raise _fail(f"{flag} must be {'>' if strict else '>='} {lo}, got {v}")


def bench_config(args) -> dict:
    """Validate every ``bench`` argument before anything runs; returns the resolved run description
    (device, shapes, providers, dtypes, passes).  Bad input raises SystemExit(2) after one line on
    stderr naming the argument."""
    import torch

    from .bench.providers import DTYPES, default_providers, make_provider
    from .bench.shapes import PASSES, parse_shape, shape_set

    _check_positive(args, [("repeats", 1, False), ("target_s", 0, False), ("rep_ms", 0, True),
                           ("threads", 1, False), ("budget_s", 0, True), ("batch", 1, False)])
    device = _parse_device(args.device) if args.device else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtypes = _csv_list(args.dtypes) or (["tf32", "fp32", "fp16", "bf16"] if cuda else ["fp32"])
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise _fail(f"unknown dtype(s) {', '.join(bad)} (argument: --dtypes); choose from {', '.join(DTYPES)}")
    passes = _csv_list(args.passes) or (["forward", "grad_input", "grad_weight", "all"] if cuda
                                        else ["forward", "all"])
    bad = [p for p in passes if p not in PASSES]
    if bad:
        raise _fail(f"unknown pass(es) {', '.join(bad)} (argument: --passes); choose from {', '.join(PASSES)}")
    try:
        shapes = [parse_shape(s) for s in (args.shape or [])]
        sets = _csv_list(args.set) or ([] if shapes else ["replknet31b" if cuda else "cpu"])
        ks = _int_list(args.ks, "--ks")
        if ks is not None and (not ks or min(ks) < 1):
            raise ValueError(f"--ks must be positive kernel sizes, got {args.ks!r}")
        for name in sets:
            shapes += shape_set(name, ks=ks, batch=args.batch)
        if args.providers is not None:
            names = _csv_list(args.providers)
            if not names:
                raise ValueError("--providers is empty")
            providers = [make_provider(n) for n in names]
        else:
            providers = default_providers(device)
    except ValueError as e:
        raise _fail(str(e).replace("error: ", ""))
    if not shapes:
        raise _fail("no shapes selected (use --set or --shape)")
    if args.out:
        parent = args.out
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent.rstrip(os.sep))
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise _fail(f"--out {args.out!r} exists and is not a folder")
        if not os.access(parent or ".", os.W_OK):
            raise _fail(f"--out {args.out!r}: {parent or '.'!r} is not writable")
    if args.providers is not None:  # what the user named must run here
        for prov in providers:
            try:
                why = prov.unavailable(device)
            except Exception as e:
                why = f"failed to probe: {type(e).__name__}: {e}"
            if why:
                raise _fail(f"provider {prov.name} (argument: --providers) is unavailable on {device}: {why}")
    return dict(device=device, cuda=cuda, shapes=shapes, providers=providers, dtypes=dtypes, passes=passes)


def cmd_bench(args) -> int:
    import torch

    from .bench.env import device_slug, environment
    from .bench.peaks import lookup_peak
    from .bench.report import format_summary, format_table, unavailable_lines, write_results
    from .bench.runner import run_benchmark
    from .bench.timing import format_warnings, load_snapshot, timing_warnings

    cfg = bench_config(args)
    device, cuda, shapes, providers = cfg["device"], cfg["cuda"], cfg["shapes"], cfg["providers"]
    dtypes, passes = cfg["dtypes"], cfg["passes"]
    if args.threads:
        torch.set_num_threads(args.threads)

    env = environment(str(device))
    peak = lookup_peak(env.get("gpu")) if cuda else None
    if cuda:
        env["gpu_peak"] = None if peak is None else (
            f"{peak.name}: FFMA {peak.ffma_tflops}, HFMA2 {peak.hfma2_tflops}, TF32 TC {peak.tf32_tc_tflops}, "
            f"fp16/bf16 TC {peak.fp16_tc_tflops} TFLOP/s, HBM {peak.hbm_tbps} TB/s")
    out = args.out or os.path.join(
        "bench_results", f"{device_slug(env)}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")

    print(f"lkconv bench on {env.get('gpu') or 'CPU: ' + str(env.get('cpu'))} "
          f"(torch {env['torch']}, {env['torch_threads']} threads, lkconv {env['lkconv']} {env['lkconv_commit'] or ''})")
    if cuda and peak is None:
        print(f"note: unknown GPU {env.get('gpu')!r}: no peak table entry, % of floor is not reported")
    print(f"{len(shapes)} shapes x {len(dtypes)} dtypes x {len(passes)} passes x {len(providers)} providers; "
          f"results -> {out}")
    before = load_snapshot()
    if not cuda:  # the machine's state before anything of ours runs: warn early, not only at the end
        for line in format_warnings(timing_warnings([], before, None)):
            print(line)
    t0 = time.perf_counter()
    cpu_timing = dict(min_rep=args.repeats, target_s=args.target_s)
    cuda_timing = dict(rep_ms=args.rep_ms)
    try:
        rows = run_benchmark(shapes, providers, dtypes, passes, device, budget_s=args.budget_s,
                             progress=not args.no_progress, cpu_timing=cpu_timing, cuda_timing=cuda_timing)
    except ValueError as e:
        raise _fail(str(e))
    after = load_snapshot()
    env["load_avg_1min_start"], env["load_avg_1min_end"] = before.get("load1"), after.get("load1")
    env["usable_cores"] = before.get("cores")
    warnings = timing_warnings(rows, before, after, device=device.type)
    for line in unavailable_lines(rows):
        print(line)
    print()
    print(format_table(rows, cuda=cuda))
    print()
    print("summary (median ms; speedup vs torch NCHW):")
    print(format_summary(rows))
    for line in format_warnings(warnings):
        print(line)
    paths = write_results(rows, env, out, plots=not args.no_plot, warnings=warnings)
    print()
    print(f"wrote {paths['csv']}, {paths['markdown']}, {paths['env']}"
          + (", " + ", ".join(paths["plots"]) if paths["plots"] else ""))
    print(f"total {time.perf_counter() - t0:.0f} s")
    wrong = [r for r in rows if r["status"] == "WRONG"]
    if wrong:
        print(f"{len(wrong)} measurement(s) failed the correctness gate (WRONG): "
              + ", ".join(sorted({r['provider'] for r in wrong})), file=sys.stderr)
        return 1
    if not any(r["status"] == "ok" for r in rows):
        print("error: nothing was measured (every case unavailable, unsupported, failed or skipped; "
              "see the table)", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------
def cmd_verify(args) -> int:
    import torch

    import lkconv

    from .bench.verify import VERIFY_CASES, format_verify, run_verify

    cases = _csv_list(args.cases)
    if cases:
        bad = [c for c in cases if c not in VERIFY_CASES]
        if bad:
            raise _fail(f"unknown case(s) {', '.join(bad)} (argument: --cases); choose from {', '.join(VERIFY_CASES)}")
    devices = _csv_list(args.devices)
    if devices is not None:
        if not devices:
            raise _fail("--devices is empty; choose from cpu, cuda")
        for d in devices:
            if d not in ("cpu", "cuda"):
                raise _fail(f"unknown device {d!r} (argument: --devices); choose from cpu, cuda")
            if d == "cuda" and not torch.cuda.is_available():
                raise _fail("--devices cuda requested but no CUDA device is visible "
                            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
    backends = _csv_list(args.backends)
    if backends is not None:
        known = lkconv.list_backends()
        bad = [b for b in backends if b not in known]
        if bad or not backends:
            raise _fail(f"unknown backend(s) {', '.join(bad) or '(none given)'} (argument: --backends); "
                        f"choose from {', '.join(known)}")
    t0 = time.perf_counter()
    rows = run_verify(backends=backends, devices=devices, cases=cases)
    print(format_verify(rows))
    n_pass = sum(r["status"] == "pass" for r in rows)
    fails = [r for r in rows if r["status"] == "FAIL"]
    print(f"\n{n_pass} passed, {len(fails)} failed, {sum(r['status'] == 'skip' for r in rows)} skipped "
          f"(backend declines the case), {sum(r['status'] == 'unavailable' for r in rows)} backends unavailable; "
          f"{time.perf_counter() - t0:.1f} s")
    return 1 if fails else 0


def cmd_static(args) -> int:
    from lkconv.static.kernels import SM_COUNT
    from lkconv.static.report import main as static_main

    if args.update_routing:
        from lkconv.static.report import update_routing

        if not os.path.isfile(os.path.join(args.update_routing, "routing.json")):
            raise _fail(f"--update-routing {args.update_routing}: no routing.json there "
                        "(a benchmarks/results/static-* folder)")
        print(f"wrote {update_routing(args.update_routing)}")
        return 0

    try:
        archs = tuple(_int_list(args.archs, "--archs") or (80, 90))
    except ValueError as e:
        raise _fail(str(e).replace("error: ", ""))
    bad = [a for a in archs if a not in SM_COUNT]
    if bad or args.jobs < 1:
        raise _fail(f"--archs must be among {sorted(SM_COUNT)} (got {bad})" if bad else
                    f"--jobs must be >= 1, got {args.jobs}")
    if args.baseline and not os.path.isfile(os.path.join(args.baseline, "model.csv")):
        raise _fail(f"--baseline {args.baseline}: no model.csv there (a benchmarks/results/static-* folder)")
    return static_main(out=args.out, archs=archs, jobs=args.jobs, baseline=args.baseline)


def cmd_train(argv: List[str]) -> int:
    try:
        from lkconv.models.train import main as train_main
    except ImportError as e:
        print(f"lkconv train: the training entry point lkconv.models.train is not available ({e}).\n"
              "It ships with lkconv's models package; update your lkconv checkout/installation.", file=sys.stderr)
        return 2
    rc = train_main(argv)
    return int(rc or 0)


# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lkconv", description="lkconv: fast large-kernel depthwise "
                                 "convolution -- info, benchmarks, verification, training.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="{info,bench,verify,static,train}")
    sub.add_parser("info", help="versions, device, backends (available or why not), what auto picks")

    b = sub.add_parser("bench", help="benchmark providers on this device (gate vs reference, then time)",
                       description="Benchmark lkconv backends against PyTorch (and the original RepLKNet "
                       "extension) on this machine's device.", epilog=BENCH_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--shape", action="append", metavar="N,C,H,W,K",
                   help="a user shape (K or KH,KW; padding K//2, stride 1); repeatable")
    b.add_argument("--set", help="shape set(s), comma-separated: cpu, replknet31b, ksweep, tiny")
    b.add_argument("--ks", help="kernel sizes for the shape set, e.g. 3,7,13,31")
    b.add_argument("--batch", type=int, help="override the batch size N of the shape set")
    b.add_argument("--providers", help="comma-separated providers (see below)")
    b.add_argument("--dtypes", help="comma-separated: fp32, tf32, fp16, bf16, fp64")
    b.add_argument("--passes", help="comma-separated: forward, grad_input, grad_weight, all")
    b.add_argument("--device", help="cpu or cuda[:i] (default: cuda when visible)")
    b.add_argument("--out", help="results folder (default bench_results/<device>-<date>/)")
    b.add_argument("--repeats", type=int, default=3, help="CPU: minimum timed repeats (default 3)")
    b.add_argument("--target-s", type=float, default=1.5,
                   help="CPU: keep repeating until this many seconds are spent (default 1.5)")
    b.add_argument("--rep-ms", type=float, default=150.0, help="CUDA: timed milliseconds per case (default 150)")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    b.add_argument("--budget-s", type=float, help="stop timing new cases after this many seconds (reported)")
    b.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    v = sub.add_parser("verify", help="every available backend vs the fp64 reference (exit 1 on failure)",
                       description="Check every available lkconv backend against the fp64 reference on a "
                       "curated list of small cases (K 3..31 incl. K > H, even and rectangular kernels, stride, "
                       "dilation, channels_last, a strided view, bias), all three passes. A backend that "
                       "declines a case is 'skip' with its reason; exit code 1 on any FAIL.")
    v.add_argument("--backends", help="comma-separated backend names (default: all but reference)")
    v.add_argument("--devices", help="comma-separated: cpu, cuda (default: cpu and cuda when visible)")
    v.add_argument("--cases", help="comma-separated case ids (default: all)")

    st = sub.add_parser("static", help="no GPU: compile the GPU kernels, SASS report and modelled roofline "
                        "-> benchmarks/results/static-<commit>/")
    st.add_argument("--out", help="results folder (default benchmarks/results/static-<commit>/)")
    st.add_argument("--archs", help="comma-separated SM versions (default 80,90)")
    st.add_argument("--jobs", type=int, default=2, help="parallel Triton compiles (default 2)")
    st.add_argument("--baseline", help="an earlier static-* folder: add a before/after table (modelled) to the README")
    st.add_argument("--update-routing", metavar="DIR", help="no compile: regenerate auto's modelled routing rows "
                    "(lkconv/backends/routing_modelled.py) from DIR/routing.json, a committed static-* folder")

    sub.add_parser("train", help="train RepLKNet models (lkconv.models.train); arguments are passed on",
                   add_help=False)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # everything after "train" belongs to the trainer
        return cmd_train(argv[1:])
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 0
    return {"info": cmd_info, "bench": cmd_bench, "verify": cmd_verify, "static": cmd_static}[args.command](args)
