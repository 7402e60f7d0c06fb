"""The command line: ``python -m lkconv {info,bench,verify,suite,static,train}``."""
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
  python -m lkconv suite /tmp/gpu_run        # GPU box: build, tests, benchmarks -> one folder
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
as WRONG and not timed (exit code 1).  Results: results.csv, results.md, env.json, speedup_<dtype>.png
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
        raise SystemExit(f"error: {arg} must be a comma-separated list of integers, got {text!r}")


# ------------------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    import platform

    import torch

    import lkconv
    from lkconv.backends import UnsupportedError, get_backend, resolve_backend
    from lkconv.params import normalize_params

    from .env import git_commit, pkg_version

    print(f"lkconv   {lkconv.__version__}  (commit {git_commit() or 'n/a'})  {os.path.dirname(lkconv.__file__)}")
    print(f"torch    {torch.__version__}  (CUDA build {torch.version.cuda or 'none'})")
    print(f"triton   {pkg_version('triton') or 'not installed'}")
    print(f"python   {platform.python_version()}  {platform.platform()}")
    from .env import _cpu_model

    print(f"cpu      {_cpu_model()}  ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}   {p.name}  sm_{p.major}{p.minor}  {p.total_memory / 2**30:.1f} GiB  "
                  f"cuDNN {torch.backends.cudnn.version()}")
    else:
        print("cuda     no CUDA device visible")
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
def cmd_bench(args) -> int:
    import torch

    from .env import device_slug, environment
    from .peaks import lookup_peak
    from .providers import default_providers, make_provider
    from .report import format_summary, format_table, unavailable_lines, write_results
    from .runner import run_benchmark
    from .shapes import parse_shape, shape_set

    if args.device:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda requested but no CUDA device is visible")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"

    try:
        shapes = [parse_shape(s) for s in (args.shape or [])]
        sets = _csv_list(args.set) or ([] if shapes else ["replknet31b" if cuda else "cpu"])
        ks = _int_list(args.ks, "--ks")
        for name in sets:
            shapes += shape_set(name, ks=ks, batch=args.batch)
        providers = [make_provider(n) for n in _csv_list(args.providers)] if args.providers else \
            default_providers(device)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    dtypes = _csv_list(args.dtypes) or (["tf32", "fp32", "fp16", "bf16"] if cuda else ["fp32"])
    passes = _csv_list(args.passes) or (["forward", "grad_input", "grad_weight", "all"] if cuda
                                        else ["forward", "all"])
    if not shapes:
        raise SystemExit("error: no shapes selected (use --set or --shape)")

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
    t0 = time.perf_counter()
    cpu_timing = dict(min_rep=args.repeats, target_s=args.target_s)
    cuda_timing = dict(rep_ms=args.rep_ms)
    try:
        rows = run_benchmark(shapes, providers, dtypes, passes, device, budget_s=args.budget_s,
                             progress=not args.no_progress, cpu_timing=cpu_timing, cuda_timing=cuda_timing)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    for line in unavailable_lines(rows):
        print(line)
    print()
    print(format_table(rows, cuda=cuda))
    print()
    print("summary (median ms; speedup vs torch NCHW):")
    print(format_summary(rows))
    paths = write_results(rows, env, out, plots=not args.no_plot)
    print()
    print(f"wrote {paths['csv']}, {paths['markdown']}, {paths['env']}"
          + (", " + ", ".join(paths["plots"]) if paths["plots"] else ""))
    print(f"total {time.perf_counter() - t0:.0f} s")
    wrong = [r for r in rows if r["status"] == "WRONG"]
    if wrong:
        print(f"{len(wrong)} measurement(s) failed the correctness gate (WRONG): "
              + ", ".join(sorted({r['provider'] for r in wrong})), file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------
def cmd_verify(args) -> int:
    from .verify import VERIFY_CASES, format_verify, run_verify

    cases = _csv_list(args.cases)
    if cases:
        bad = [c for c in cases if c not in VERIFY_CASES]
        if bad:
            raise SystemExit(f"error: unknown case(s) {bad} (argument: --cases); choose from {list(VERIFY_CASES)}")
    devices = _csv_list(args.devices)
    t0 = time.perf_counter()
    rows = run_verify(backends=_csv_list(args.backends), devices=devices, cases=cases)
    print(format_verify(rows))
    n_pass = sum(r["status"] == "pass" for r in rows)
    fails = [r for r in rows if r["status"] == "FAIL"]
    print(f"\n{n_pass} passed, {len(fails)} failed, {sum(r['status'] == 'skip' for r in rows)} skipped "
          f"(backend declines the case), {sum(r['status'] == 'unavailable' for r in rows)} backends unavailable; "
          f"{time.perf_counter() - t0:.1f} s")
    return 1 if fails else 0


def cmd_suite(args) -> int:
    from .suite import run_suite

    return run_suite(args.outdir, budget_s=args.budget_s, skip_build=args.skip_build, skip_tests=args.skip_tests,
                     all_tests=args.all_tests, skip_bench=args.skip_bench)


def cmd_static(args) -> int:
    from lkconv.static.kernels import SM_COUNT
    from lkconv.static.report import main as static_main

    archs = tuple(_int_list(args.archs, "--archs") or (80, 90))
    bad = [a for a in archs if a not in SM_COUNT]
    if bad or args.jobs < 1:
        raise SystemExit(f"error: --archs must be among {sorted(SM_COUNT)} (got {bad})" if bad else
                         f"error: --jobs must be >= 1, got {args.jobs}")
    return static_main(out=args.out, archs=archs, jobs=args.jobs)


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
                                 "convolution -- info, benchmarks, verification, GPU suite, training.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="{info,bench,verify,suite,static,train}")
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

    v = sub.add_parser("verify", help="every available backend vs the fp64 reference (exit 1 on failure)")
    v.add_argument("--backends", help="comma-separated backend names (default: all but reference)")
    v.add_argument("--devices", help="comma-separated: cpu, cuda (default: cpu and cuda when visible)")
    v.add_argument("--cases", help="comma-separated case ids (default: all)")

    s = sub.add_parser("suite", help="GPU box: build, verify, tests, benchmarks -> OUTDIR (<= 10 min on H100)")
    s.add_argument("outdir")
    s.add_argument("--budget-s", type=float, default=570.0, help="total time budget (default 570 s)")
    s.add_argument("--skip-build", action="store_true")
    s.add_argument("--skip-tests", action="store_true")
    s.add_argument("--skip-bench", action="store_true")
    s.add_argument("--all-tests", action="store_true", help="run the whole test suite, not only -m gpu")

    st = sub.add_parser("static", help="no GPU: compile the GPU kernels, SASS report and modelled roofline "
                        "-> benchmarks/results/static-<commit>/")
    st.add_argument("--out", help="results folder (default benchmarks/results/static-<commit>/)")
    st.add_argument("--archs", help="comma-separated SM versions (default 80,90)")
    st.add_argument("--jobs", type=int, default=2, help="parallel Triton compiles (default 2)")

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
    return {"info": cmd_info, "bench": cmd_bench, "verify": cmd_verify, "suite": cmd_suite,
            "static": cmd_static}[args.command](args)
