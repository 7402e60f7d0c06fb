"""`python -m lkconv ...` end to end (subprocesses), plus the in-process dispatch of `train`."""
import csv
import os
import subprocess
import sys

import pytest
import torch

import lkconv
from lkconv import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(lkconv.__file__)))


def _gpu_suite():
    """benchmarks/gpu_suite.py (checkout-only tooling, not part of the package), imported by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite", os.path.join(ROOT, "benchmarks", "gpu_suite.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "lkconv", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_help_and_bench_help():
    p = _run("--help")
    assert p.returncode == 0, p.stderr
    for cmd in ("info", "bench", "verify", "train", "examples"):
        assert cmd in p.stdout
    # argparse runs in-process for the sub-command help (no second interpreter start)
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0


def test_bench_help_text(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "--shape" in out and "examples" in out and "replknet31b" in out and "WRONG" in out


def test_info_runs():
    p = _run("info")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert f"lkconv   {lkconv.__version__}" in out and "torch" in out and "backends:" in out
    for name in lkconv.backend_status():
        assert f"  {name}" in out
    assert "available" in out and "auto picks" in out and "cpu  float32  K=31 ->" in out
    ext = [ln for ln in out.splitlines() if ln.startswith("lkconv._C ")]
    assert len(ext) == 1 and ("not built" in ext[0] or "built for sm_" in ext[0]), ext


def _elf_with_fatbin(entries):
    """A minimal 64-bit ELF whose .nv_fatbin section holds one fatbin with ``entries`` (kind, arch)."""
    import struct

    body = b""
    for kind, arch in entries:
        payload = b"\0" * 24
        hdr = struct.pack("<HHIQ", kind, 0x101, 64, len(payload)) + b"\0" * 12 + struct.pack("<I", arch)
        body += hdr + b"\0" * (64 - len(hdr)) + payload
    fat = struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body
    shstr = b"\0.shstrtab\0.nv_fatbin\0"
    data_off = 64
    fat_off, str_off = data_off, data_off + len(fat)
    shoff = str_off + len(shstr)
    shoff += (-shoff) % 8
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9 + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, shoff, 0, 64,
                                                                    0, 0, 64, 3, 1)
    sh = lambda name, typ, off, size: struct.pack("<IIQQQQIIQQ", name, typ, 0, 0, off, size, 0, 0, 1, 0)
    out = ehdr + fat + shstr
    out += b"\0" * (shoff - len(out))
    return out + sh(0, 0, 0, 0) + sh(1, 3, str_off, len(shstr)) + sh(11, 1, fat_off, len(fat))


def test_fatbin_archs_reads_the_gpu_code(tmp_path):
    from lkconv.bench.env import extension_info, fatbin_archs

    lib = tmp_path / "lib.so"
    lib.write_bytes(_elf_with_fatbin([(2, 80), (2, 90), (1, 90)]))
    assert fatbin_archs(str(lib)) == ["sm_80", "sm_90", "PTX compute_90"]
    lib.write_bytes(b"not an ELF file")
    assert fatbin_archs(str(lib)) is None
    info = extension_info()
    if info["built"]:  # the real extension (default TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX")
        assert info["archs"] and all(a.startswith(("sm_", "PTX compute_")) for a in info["archs"]), info


def test_bench_tiny_shape_end_to_end(tmp_path):
    out = tmp_path / "res"
    p = _run("bench", "--shape", "2,4,10,10,5", "--passes", "forward,all", "--out", str(out), "--no-plot",
             "--no-progress", "--repeats", "1", "--target-s", "0")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "summary" in p.stdout and "2x4x10x10 K5" in p.stdout
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["provider"] for r in rows} == {"torch", "torch-cl", "lkconv-cpu"}
    assert all(r["status"] == "ok" and float(r["ms"]) > 0 for r in rows), rows
    assert (out / "results.md").read_text().count("2x4x10x10 K5") >= 4
    assert (out / "env.json").exists()


_NO_CUDA = not torch.cuda.is_available()
_CUDA_BACKEND_MISSING = lkconv.backend_status().get("cuda") is not None

#: (argv, the argument the one-line error must name, run this row?)
BAD_INPUT = [
    (["bench", "--shape", "1,2,3"], "--shape", True),
    (["bench", "--shape", "2,4,8,8,0"], "--shape", True),
    (["bench", "--set", "nope"], "--set", True),
    (["bench", "--set", "tiny", "--providers", "nope"], "--providers", True),
    (["bench", "--set", "tiny", "--providers", "torch,lkconv-cpuu"], "--providers", True),  # a typo
    (["bench", "--set", "tiny", "--providers", "lkconv-cuda"], "--providers", _CUDA_BACKEND_MISSING),
    (["bench", "--set", "tiny", "--providers", ","], "--providers", True),
    (["bench", "--set", "tiny", "--dtypes", "fp8"], "--dtypes", True),
    (["bench", "--set", "tiny", "--passes", "backward"], "--passes", True),
    (["bench", "--set", "tiny", "--ks", "3,x"], "--ks", True),
    (["bench", "--set", "tiny", "--ks", "0"], "--ks", True),
    (["bench", "--set", "tiny", "--repeats", "0"], "--repeats", True),
    (["bench", "--set", "tiny", "--threads", "0"], "--threads", True),
    (["bench", "--set", "tiny", "--rep-ms", "0"], "--rep-ms", True),
    (["bench", "--set", "tiny", "--budget-s", "-1"], "--budget-s", True),
    (["bench", "--set", "tiny", "--device", "tpu"], "--device", True),
    (["bench", "--set", "tiny", "--device", "cuda"], "--device", _NO_CUDA),
    (["bench", "--set", "tiny", "--out", os.path.abspath(__file__)], "--out", True),  # a file, not a folder
    (["verify", "--cases", "nope"], "--cases", True),
    (["verify", "--devices", "gpu"], "--devices", True),
    (["verify", "--devices", "cuda"], "--devices", _NO_CUDA),
    (["verify", "--backends", "cudaa"], "--backends", True),
]


@pytest.mark.parametrize("argv,arg,applies", BAD_INPUT, ids=[" ".join(r[0]) for r in BAD_INPUT])
def test_bad_input_is_one_line_naming_the_argument(argv, arg, applies, capsys):
    """Rejected before anything runs (no banner), exit code 2, one line on stderr naming the argument."""
    if not applies:
        pytest.skip("this row's input is valid on this machine (a CUDA device / the extension is present)")
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and arg in lines[0], cap.err
    assert "lkconv bench on" not in cap.out and "results ->" not in cap.out


TRAIN_BAD_INPUT = [
    (["--device", "cuda"], "--device", _NO_CUDA),
    (["--backend", "cuda"], "--backend", _CUDA_BACKEND_MISSING),
    (["--backend", "cpuu"], "--backend", True),
    (["--threads", "0"], "--threads", True),
    (["--steps", "0"], "--steps", True),
]


@pytest.mark.parametrize("argv,arg,applies", TRAIN_BAD_INPUT, ids=[" ".join(r[0]) for r in TRAIN_BAD_INPUT])
def test_train_bad_input_is_one_line(argv, arg, applies, capsys):
    if not applies:
        pytest.skip("this row's input is valid on this machine")
    assert cli.main(["train", *argv, "--no-progress"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and arg in lines[0], lines


def test_bad_input_in_a_subprocess_has_no_traceback():
    """What a user sees: exit code 2, one line, no Python traceback."""
    for argv in (["bench", "--set", "tiny", "--providers", "torch,lkconv-cpuu"],
                 ["train", "--backend", "cpuu"]):
        p = _run(*argv, timeout=120)
        assert p.returncode == 2, (argv, p.stdout, p.stderr)
        assert "Traceback" not in p.stderr and p.stderr.strip().count("\n") == 0, p.stderr
        assert "--providers" in p.stderr or "--backend" in p.stderr


def test_train_delegates_or_exits_2(monkeypatch, capsys):
    import types

    monkeypatch.setitem(sys.modules, "lkconv.models.train", None)  # import fails
    assert cli.main(["train", "--epochs", "1"]) == 2
    assert "lkconv.models.train" in capsys.readouterr().err
    seen = []
    fake = types.ModuleType("lkconv.models.train")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "lkconv.models.train", fake)
    assert cli.main(["train", "--epochs", "1", "--help"]) == 0
    assert seen == [["--epochs", "1", "--help"]]


def test_verify_command_exit_code(capsys):
    assert cli.main(["verify", "--backends", "cpu", "--devices", "cpu", "--cases", "k3,k31-gt-H"]) == 0
    out = capsys.readouterr().out
    assert "pass" in out and "0 failed" in out


def test_suite_orchestration(tmp_path, monkeypatch):
    """The suite's steps, their order and summary.md, with each step's subprocess stubbed out
    (the real steps are `python -m lkconv info/verify/bench` and pytest, tested above)."""
    suite = _gpu_suite()

    calls = []

    def fake_step(name, cmd, log_path, timeout, cwd, echo=True, env=None):
        calls.append((name, cmd, timeout))
        open(log_path, "w").write("ok\n")
        return dict(step=name, rc=5 if name == "tests" else 0, seconds=0.1, log=os.path.basename(log_path),
                    note="", command=" ".join(cmd))

    monkeypatch.setattr(suite, "_run_step", fake_step)
    monkeypatch.setattr(suite, "prebuilt_extension", lambda root, tv: (None, "none in this test"))
    rc = suite.run_suite(str(tmp_path / "run"), budget_s=570, echo=False)
    assert rc == 0  # pytest's "no tests selected" (5) is not a failure
    names = [c[0] for c in calls]
    assert names[:4] == ["build", "info", "verify", "tests"] and names[4].startswith("bench_")
    assert calls[0][1][-4:] == ["--no-build-isolation", "--no-deps", "-v", "-e", "."][-4:]
    assert "--no-build-isolation" in calls[0][1]
    assert all(0 < c[2] <= 570 for c in calls)
    summary = (tmp_path / "run" / "summary.md").read_text()
    for n in names:
        assert f"| {n} |" in summary
    assert (tmp_path / "run" / "env.json").exists()


def test_suite_prebuilt_extension(tmp_path, monkeypatch):
    """scripts/build_for_gpu_box.sh's output is used only for the sources and torch it was built from."""
    import json
    import sys

    suite = _gpu_suite()
    root = tmp_path / "repo"
    (root / "csrc").mkdir(parents=True)
    (root / "csrc" / "k.cu").write_text("__global__ void k() {}\n")
    (root / "setup.py").write_text("# setup\n")
    so, why = suite.prebuilt_extension(str(root), "2.11.0+cu130")
    assert so is None and "BUILD_INFO.json" in why
    pre = root / suite.PREBUILT_DIR
    (pre / "lkconv").mkdir(parents=True)
    tag = f"cpython-{sys.version_info[0]}{sys.version_info[1]}"
    (pre / "lkconv" / f"_C.{tag}-x86_64-linux-gnu.so").write_bytes(b"")
    info = dict(commit="abc", csrc_digest=suite.csrc_digest(str(root)), torch="2.11.0")
    (pre / "BUILD_INFO.json").write_text(json.dumps(info))
    so, why = suite.prebuilt_extension(str(root), "2.11.0+cu130")
    assert so and so.endswith(".so") and why == ""
    # installed with the CPU module of the same Python (not another Python's)
    (pre / "lkconv" / f"_cpu_fast.{tag}-x86_64-linux-gnu.so").write_bytes(b"cpu")
    (pre / "lkconv" / "_cpu_fast.cpython-39-x86_64-linux-gnu.so").write_bytes(b"other")
    (root / "lkconv").mkdir()
    copied = suite.install_prebuilt(so, str(root))
    assert sorted(os.path.basename(f) for f in copied) == sorted(
        [f"_C.{tag}-x86_64-linux-gnu.so", f"_cpu_fast.{tag}-x86_64-linux-gnu.so"])
    assert sorted(os.listdir(root / "lkconv")) == sorted(os.path.basename(f) for f in copied)
    so, why = suite.prebuilt_extension(str(root), "2.14.1+cu130")
    assert so is None and "torch 2.11.0" in why
    (root / "csrc" / "k.cu").write_text("__global__ void k() { /* changed */ }\n")
    so, why = suite.prebuilt_extension(str(root), "2.11.0+cu130")
    assert so is None and "csrc changed" in why


def test_suite_test_commands():
    """The pytest steps: one `-m gpu` run without xdist or GPU; with both, the non-slow GPU tests in
    parallel and the slow (> 2**31 elements, ~25 GiB) ones afterwards in one process."""
    gpu_test_commands = _gpu_suite().gpu_test_commands

    def opt(cmd, flag):  # the value of the last `flag` in cmd (the first -m is `-m pytest`)
        idx = [k for k, a in enumerate(cmd) if a == flag]
        return cmd[idx[-1] + 1] if idx else None

    (one,) = gpu_test_commands("py", "/o", "cpu", False, True)
    assert one[0] == "tests" and opt(one[1], "-m") == "gpu" and "-n" not in one[1]
    (one,) = gpu_test_commands("py", "/o", "cuda", False, False)
    assert opt(one[1], "-m") == "gpu" and "-n" not in one[1]
    fast, slow = gpu_test_commands("py", "/o", "cuda", False, True, workers=6)
    assert opt(fast[1], "-m") == "gpu and not slow" and opt(fast[1], "-n") == "6"
    assert slow[0] == "tests_slow" and opt(slow[1], "-m") == "gpu and slow" and "-n" not in slow[1]
    assert fast[2] + slow[2] <= 400
    (every,) = gpu_test_commands("py", "/o", "cuda", True, True)
    assert opt(every[1], "-m") == "pytest"  # no marker selection: the whole suite


def test_train_timing_warnings():
    """train's summary carries the benchmark's hygiene checks, applied to its step times."""
    from lkconv.bench.timing import timing_warnings
    from lkconv.models.train import _timing_warnings

    quiet = {"load1": 0.0, "cores": 2, "threads": 1}
    cpu = torch.device("cpu")
    assert _timing_warnings([0.10] * 8 + [0.11, 0.105], quiet, quiet, cpu, timing_warnings) == []
    # a checkpoint hiccup (one slow step in ten is dropped) is not noise; steady doubling is
    assert _timing_warnings([0.10] * 9 + [3.0], quiet, quiet, cpu, timing_warnings) == []
    (w,) = _timing_warnings([0.1, 0.25] * 10, quiet, quiet, cpu, timing_warnings)
    assert "step times spread widely" in w and "images_per_s" in w
    busy = {"load1": 1.5, "cores": 2, "threads": 2}
    ws = _timing_warnings([0.1] * 10, busy, None, cpu, timing_warnings)
    assert any("--threads 1" in w for w in ws)


def test_suite_device_out_packs_the_results(tmp_path, monkeypatch):
    """--device-out (what benchmarks/device_check.sh runs): the results folder packed into
    DIR/suite.tgz, summary.md next to it, the suite's exit code returned."""
    import tarfile

    suite = _gpu_suite()

    def fake_step(name, cmd, log_path, timeout, cwd, echo=True, env=None):
        open(log_path, "w").write("ok\n")
        return dict(step=name, rc=1 if name == "verify" else 0, seconds=0.1, log=os.path.basename(log_path),
                    note="", command=" ".join(cmd))

    monkeypatch.setattr(suite, "_run_step", fake_step)
    out = tmp_path / "out"
    rc = suite.main([str(tmp_path / "run"), "--device-out", str(out), "--budget-s", "100"])
    assert rc == 1  # the failed verify step fails the suite
    assert "| verify | 1 |" in (out / "summary.md").read_text()
    with tarfile.open(out / "suite.tgz") as tar:
        names = tar.getnames()
    assert "./summary.md" in names and "./verify.log" in names
    with pytest.raises(SystemExit):
        suite.main([])  # neither OUTDIR nor --device-out


@pytest.mark.parametrize("argv,needle", [
    (["/tmp/x", "--budget-s", "0"], "--budget-s"),
    ([os.path.abspath(__file__)], "OUTDIR"),  # a file, not a folder
])
def test_gpu_suite_bad_arguments(argv, needle, capsys):
    """benchmarks/gpu_suite.py checks its arguments before it builds or runs anything."""
    with pytest.raises(SystemExit) as e:
        _gpu_suite().main(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err
