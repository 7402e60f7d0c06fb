"""The GPU suite: the one command for a GPU box with no network, run from a source checkout.

    python benchmarks/gpu_suite.py OUTDIR [--budget-s 570] [--skip-build] [--skip-tests]
                                          [--skip-bench] [--all-tests]
    python benchmarks/gpu_suite.py --device-out DIR [OUTDIR] ...   # a lent device machine

``--device-out DIR`` is the device-machine option (benchmarks/device_check.sh is nothing more):
the budget defaults to ``LKCONV_DEVICE_BUDGET_S`` or 500 s (so one 600 s call ends with time to
pack), OUTDIR defaults to /tmp/lkconv-gpu-<date>, and at the end the whole OUTDIR is packed into
DIR/suite.tgz with summary.md next to it (the device tool brings back a few files, so the many logs,
CSVs and plots travel as one archive; unpack into benchmarks/results/<gpu>-<date>/).

This is checkout-only tooling (it pip-installs the checkout and runs its tests), so it lives here
and not in the installed package.

Steps (each a subprocess; output streamed to the console and to a log in OUTDIR):

1. environment (env.json, nvidia-smi.txt)
2. build the extension in place: ``pip install --no-build-isolation -e .``   -> build.log
3. ``python -m lkconv info``                                                  -> info.log
4. ``python -m lkconv verify``                                                -> verify.log
5. tests: ``pytest -m gpu`` (``--all-tests``: the whole suite)                -> tests.log, tests.xml
   (with pytest-xdist on a GPU box: ``-m "gpu and not slow" -n 8``, then ``-m "gpu and slow"``
   -> tests_slow.log, tests_slow.xml)
6. benchmarks: the RepLKNet-31B set (all dtypes and passes), then a reduced K sweep
   -> bench_replknet31b/, bench_ksweep/ (CSV, markdown, PNG each)
7. calibration.md: measured ÷ modelled for the cells of the static model (lkconv/static)
8. summary.md: every step with exit code, time and log

The whole run is budgeted (default 570 s) so that it finishes within 10 minutes on an H100; each
step gets what is left, benchmarks skip (and report) cases once their budget is spent.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

__all__ = ["run_suite", "repo_root", "gpu_test_commands", "csrc_digest", "prebuilt_extension", "install_prebuilt",
           "main"]

#: where scripts/build_for_gpu_box.sh leaves the extension and the peer built for the GPU box
PREBUILT_DIR = ".gpu-prebuilt"


def repo_root() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.exists(os.path.join(root, "setup.py")) or os.path.exists(os.path.join(root, "pyproject.toml")):
        return root
    return None


def csrc_digest(root: str) -> str:
    """sha256 over what lkconv._C is built from (csrc/ and setup.py), to tell a stale prebuilt apart."""
    import hashlib

    h = hashlib.sha256()
    paths = [os.path.join("csrc", f) for f in sorted(os.listdir(os.path.join(root, "csrc")))
             if f.endswith((".cu", ".cuh", ".cpp", ".h", ".py"))] + ["setup.py"]
    for rel in paths:
        h.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _py_tag() -> str:
    """The running Python's extension tag (``cpython-312``): which prebuilt modules it can load."""
    return f"cpython-{sys.version_info[0]}{sys.version_info[1]}"


def prebuilt_extension(root: str, torch_version: str):
    """(path of the prebuilt lkconv._C, why not) for this checkout and torch (scripts/build_for_gpu_box.sh)."""
    import glob

    d = os.path.join(root, PREBUILT_DIR)
    info_path = os.path.join(d, "BUILD_INFO.json")
    if not os.path.exists(info_path):
        return None, f"no {PREBUILT_DIR}/BUILD_INFO.json"
    with open(info_path) as f:
        info = json.load(f)
    tag = _py_tag()
    so = glob.glob(os.path.join(d, "lkconv", f"_C.{tag}-*.so"))
    if not so:
        return None, f"no prebuilt lkconv._C for {tag}"
    if info.get("torch") != torch_version.split("+")[0]:
        return None, f"prebuilt for torch {info.get('torch')}, running {torch_version}"
    if info.get("csrc_digest") != csrc_digest(root):
        return None, f"prebuilt from other sources (commit {info.get('commit')}): csrc changed since"
    return so[0], ""


def install_prebuilt(prebuilt: str, root: str) -> List[str]:
    """Copy the prebuilt lkconv._C (``prebuilt``, from :func:`prebuilt_extension`) and, where it was
    built with it, the CPU module lkconv._cpu_fast of the running Python into the checkout's lkconv/;
    returns the files copied."""
    import glob
    import shutil

    files = [prebuilt] + sorted(glob.glob(os.path.join(os.path.dirname(prebuilt), f"_cpu_fast.{_py_tag()}-*.so")))
    for f in files:
        shutil.copy(f, os.path.join(root, "lkconv", os.path.basename(f)))
    return files


def _run_step(name: str, cmd: List[str], log_path: str, timeout: float, cwd: Optional[str], echo: bool = True,
              env: Optional[Dict[str, str]] = None) -> Dict:
    t0 = time.perf_counter()
    rc: Optional[int] = None
    note = ""
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        if timeout <= 1:
            note = "not run: suite time budget exhausted"
            log.write(note + "\n")
        else:
            try:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        cwd=cwd, env=env, bufsize=1)
                deadline = time.perf_counter() + timeout
                assert proc.stdout is not None
                for line in proc.stdout:
                    log.write(line)
                    if echo:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                    if time.perf_counter() > deadline:
                        proc.kill()
                        note = f"killed after {timeout:.0f} s (time budget)"
                        break
                try:
                    rc = proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
                    note = f"killed after {timeout:.0f} s (time budget)"
            except OSError as e:
                note = f"could not start: {e}"
        if note:
            log.write(f"\n[suite] {note}\n")
    return dict(step=name, rc=rc, seconds=round(time.perf_counter() - t0, 1), log=os.path.basename(log_path),
                note=note, command=" ".join(cmd))


def _calibration_step(outdir: str) -> Optional[Dict]:
    """Write calibration.md (measured ÷ modelled) from bench_replknet31b/results.csv, if it exists."""
    res = os.path.join(outdir, "bench_replknet31b", "results.csv")
    if not os.path.isfile(res):
        return None
    t0 = time.perf_counter()
    try:
        from lkconv.static.report import calibrate_from_bench

        path = calibrate_from_bench(res, outdir)
        rc, note = 0, ("calibration.md: measured ÷ modelled" if path else "no cell of the static model was timed")
    except Exception as e:  # noqa: BLE001 - reported in the summary, the suite goes on
        rc, note = 1, f"calibration failed: {type(e).__name__}: {e}"[:300]
    return dict(step="calibration", rc=rc, seconds=round(time.perf_counter() - t0, 1), log="calibration.md",
                note=note, command="lkconv.static.report.calibrate_from_bench")


def _xdist_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("xdist") is not None


def gpu_test_commands(py: str, outdir: str, dev: str, all_tests: bool, xdist: bool, workers: Optional[int] = None):
    """The pytest steps as (name, command, time cap in s).  On a GPU box with pytest-xdist the GPU
    tests run in parallel processes (Triton JIT-compiles every kernel variant a test meets, which is
    CPU-bound; the GPU has room for several small tests at once), except those marked ``slow`` (the
    > 2**31-element tests need ~25 GiB each), which run afterwards in one process."""
    base = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    xml = f"--junitxml={os.path.join(outdir, 'tests.xml')}"
    if all_tests:
        return [("tests", [*base, xml], 400.0)]
    if dev == "cuda" and xdist:
        n = workers or max(2, min(8, (os.cpu_count() or 4) // 2))
        return [
            ("tests", [*base, "-m", "gpu and not slow", "-n", str(n), xml], 200.0),
            ("tests_slow", [*base, "-m", "gpu and slow",
                            f"--junitxml={os.path.join(outdir, 'tests_slow.xml')}"], 120.0),
        ]
    return [("tests", [*base, "-m", "gpu", xml], 180.0)]


def run_suite(outdir: str, budget_s: float = 570.0, skip_build: bool = False, skip_tests: bool = False,
              all_tests: bool = False, skip_bench: bool = False, bench_extra: Sequence[str] = (),
              echo: bool = True) -> int:
    """Run the GPU suite into ``outdir``; returns 0 when every step succeeded, else 1."""
    t_start = time.perf_counter()
    os.makedirs(outdir, exist_ok=True)
    outdir = os.path.abspath(outdir)
    root = repo_root()
    py = sys.executable
    env = dict(os.environ)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if root:
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")

    def left() -> float:
        return budget_s - (time.perf_counter() - t_start)

    def say(msg: str):
        if echo:
            print(f"[suite {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    steps: List[Dict] = []
    # 1. environment
    if root and root not in sys.path:
        sys.path.insert(0, root)
    from lkconv.bench.env import environment

    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with open(os.path.join(outdir, "env.json"), "w") as f:
        json.dump(environment(dev), f, indent=2, default=str)
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except Exception as e:
        smi = f"nvidia-smi not available: {e}"
    with open(os.path.join(outdir, "nvidia-smi.txt"), "w") as f:
        f.write(smi)
    if dev != "cuda":
        say("WARNING: no CUDA device visible; the suite runs, but GPU tests skip and benchmarks run on CPU")

    # 2. build (or the extension prebuilt for this box by scripts/build_for_gpu_box.sh)
    peers = os.path.join(root, PREBUILT_DIR, "peers") if root else ""
    if peers and os.path.isdir(peers):
        env["PYTHONPATH"] = peers + os.pathsep + env["PYTHONPATH"]
        say(f"benchmark peers from {peers}")
    prebuilt, why_not = prebuilt_extension(root, torch.__version__) if root else (None, "no checkout")
    if not skip_build and prebuilt:
        for so in install_prebuilt(prebuilt, root):
            say(f"using the prebuilt {so}")
        steps.append(dict(step="build", rc=0, seconds=0, log="", command="",
                          note=f"prebuilt ({PREBUILT_DIR}/BUILD_INFO.json matches this checkout)"))
        skip_build = True
    elif not skip_build and root:
        say(f"not using a prebuilt extension: {why_not}")
    if not skip_build:
        if root is None:
            steps.append(dict(step="build", rc=None, seconds=0, log="", note="no source checkout found; skipped",
                              command=""))
        else:
            say("building the extension: pip install --no-build-isolation -e .")
            benv = dict(env)
            if dev == "cuda":  # on a GPU box a failed CUDA build must fail the step, not install pure Python
                benv.setdefault("LKCONV_BUILD_CUDA", "1")
                # build for this device only: half the compile time of the default sm80+sm90 list
                major, minor = torch.cuda.get_device_capability()
                benv.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
            steps.append(_run_step("build", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v",
                                             "-e", "."], os.path.join(outdir, "build.log"),
                                   min(300.0, left() - 200), root, echo, benv))
    # 3./4. info and verify
    say("python -m lkconv info")
    steps.append(_run_step("info", [py, "-m", "lkconv", "info"], os.path.join(outdir, "info.log"),
                           min(60.0, left()), root, echo, env))
    say("python -m lkconv verify")
    steps.append(_run_step("verify", [py, "-m", "lkconv", "verify"], os.path.join(outdir, "verify.log"),
                           min(120.0, left() - 150), root, echo, env))
    # 5. tests
    if not skip_tests:
        for name, cmd, cap in gpu_test_commands(py, outdir, dev, all_tests, _xdist_available()):
            say(" ".join(cmd[1:]))
            reserve = 120 if name == "tests" else 100  # keep time for the benchmarks
            steps.append(_run_step(name, cmd, os.path.join(outdir, f"{name}.log"), min(cap, left() - reserve),
                                   root, echo, env))
            if steps[-1]["rc"] == 5:  # pytest: no tests collected/selected
                steps[-1]["note"] = "no tests selected (pytest exit code 5)"
    # 6. benchmarks
    if not skip_bench:
        if dev == "cuda":
            runs = [
                ("bench_replknet31b", ["--set", "replknet31b"], 0.55),
                ("bench_ksweep", ["--set", "ksweep", "--ks", "3,7,13,19,25,31", "--dtypes", "fp16,tf32",
                                  "--passes", "forward,all"], 1.0),
            ]
        else:  # no GPU: the GPU sets would take hours on a CPU; a smoke run keeps the suite testable
            runs = [("bench_tiny", ["--set", "tiny"], 1.0)]
        for name, args, share in runs:
            b = max(0.0, left() - 15) * share  # this step's wall-clock share (the process is killed after)
            say(f"benchmark {name} (budget {b:.0f} s)")
            # the bench stops starting new cases 45 s before its share ends (start-up, writing, plots)
            cmd = [py, "-m", "lkconv", "bench", *args, "--out", os.path.join(outdir, name),
                   "--budget-s", f"{max(1.0, b - 45):.0f}", "--no-progress", *bench_extra]
            steps.append(_run_step(name, cmd, os.path.join(outdir, f"{name}.log"), b if b > 60 else 0,
                                   root, echo, env))
    # 6b. measured / modelled for the static model's cells (lkconv/static, docs/performance_model.md)
    cal = _calibration_step(outdir)
    if cal:
        steps.append(cal)
    # 7. summary
    lines = ["# lkconv GPU suite", "", f"Total {time.perf_counter() - t_start:.0f} s (budget {budget_s:.0f} s). "
             "Environment: env.json, nvidia-smi.txt.", "", "| step | exit code | seconds | log | note |",
             "|---|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s['step']} | {s['rc']} | {s['seconds']} | {s['log']} | {s['note']} |")
    for name in ("bench_replknet31b", "bench_ksweep", "bench_tiny"):
        md = os.path.join(outdir, name, "results.md")
        if os.path.exists(md):
            lines += ["", f"Benchmark tables: [{name}/results.md]({name}/results.md)"]
    with open(os.path.join(outdir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump(steps, f, indent=2)
    say(f"done; summary in {os.path.join(outdir, 'summary.md')}")
    failed = [s for s in steps if s["rc"] != 0 and not s["note"].startswith(("no source", "no tests"))]
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import datetime
    import shutil
    import tarfile

    ap = argparse.ArgumentParser(prog="python benchmarks/gpu_suite.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", help="results folder (required unless --device-out)")
    ap.add_argument("--budget-s", type=float, help="total time budget (default 570 s; --device-out: 500 s)")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--all-tests", action="store_true", help="run the whole test suite, not only -m gpu")
    ap.add_argument("--device-out", metavar="DIR",
                    help="lent device machine: pack OUTDIR into DIR/suite.tgz and copy summary.md there")
    args = ap.parse_args(argv)
    if args.outdir is None and args.device_out is None:
        ap.error("OUTDIR is required (or --device-out DIR)")
    if args.budget_s is not None and args.budget_s <= 0:
        ap.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.outdir and os.path.exists(args.outdir) and not os.path.isdir(args.outdir):
        ap.error(f"OUTDIR {args.outdir!r} exists and is not a folder")
    outdir = args.outdir or f"/tmp/lkconv-gpu-{datetime.datetime.utcnow():%Y%m%d-%H%M%S}"
    budget = args.budget_s
    if budget is None:
        budget = float(os.environ.get("LKCONV_DEVICE_BUDGET_S", "500")) if args.device_out else 570.0
    rc = run_suite(outdir, budget_s=budget, skip_build=args.skip_build, skip_tests=args.skip_tests,
                   all_tests=args.all_tests, skip_bench=args.skip_bench)
    if args.device_out:
        os.makedirs(args.device_out, exist_ok=True)
        with tarfile.open(os.path.join(args.device_out, "suite.tgz"), "w:gz") as tar:
            tar.add(outdir, arcname=".")
        summary = os.path.join(outdir, "summary.md")
        if os.path.exists(summary):
            shutil.copy(summary, os.path.join(args.device_out, "summary.md"))
            print(open(summary).read())
        print(f"gpu_suite.py: exit {rc}; results packed into {os.path.join(args.device_out, 'suite.tgz')}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
