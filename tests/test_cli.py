"""`python -m lkconv ...` end to end (subprocesses), plus the in-process dispatch of `train`."""
import csv
import os
import subprocess
import sys

import pytest

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


def test_bad_arguments_are_clear(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--shape", "1,2,3"])
    assert "--shape" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--set", "tiny", "--providers", "nope"])
    assert "--providers" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--set", "tiny", "--ks", "3,x"])
    assert "--ks" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        cli.main(["verify", "--cases", "nope"])
    assert "--cases" in str(e.value.code)


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
