"""The benchmark code paths (lkconv.bench) on CPU at tiny sizes: shapes, peak table, correctness
gate (including deliberately wrong providers), runner statuses, CSV / markdown / PNG outputs, verify.
Speed is never asserted here; benchmarks/ and `python -m lkconv bench` measure it."""
import importlib.util

import pytest
import torch

import lkconv
from lkconv.bench import gate as gate_mod
from lkconv.bench.gate import Case, check_outputs
from lkconv.bench.peaks import floor_seconds, lookup_peak
from lkconv.bench.providers import LkconvProvider, Provider, TorchProvider, make_provider
from lkconv.bench.report import format_summary, format_table, read_csv, write_plots, write_results
from lkconv.bench.runner import ROW_FIELDS, run_benchmark
from lkconv.bench.shapes import Shape, parse_shape, shape_set
from lkconv.bench.timing import time_cpu
from lkconv.bench.verify import run_verify

TINY = [Shape(2, 4, 9, 9, 3, 3, "tiny"), Shape(2, 4, 9, 9, 7, 7, "tiny")]
FAST = dict(cpu_timing=dict(min_rep=1, max_rep=2, target_s=0.0, warmup_s=0.0), progress=False)


# ------------------------------------------------------------------------------------------------
# deliberately wrong / broken providers
# ------------------------------------------------------------------------------------------------
class ScaledTorch(TorchProvider):
    """Correct torch result, then one output perturbed: the gate must catch it."""

    def __init__(self, which=0, scale=1.01, name="wrong"):
        super().__init__(False)
        self.which, self.scale, self.name = which, scale, name

    def make(self, pass_, x, w, g, shape):
        fn = super().make(pass_, x, w, g, shape)

        def wrong():
            outs = list(fn())
            if self.which < len(outs):
                outs[self.which] = outs[self.which] * self.scale
            return tuple(outs)
        return wrong


class OneElementOff(TorchProvider):
    """Wrong in a single element of the last image (beyond the gate's sub-batch when n_gate < N)."""

    def __init__(self):
        super().__init__(False)
        self.name = "one-off"

    def make(self, pass_, x, w, g, shape):
        fn = super().make(pass_, x, w, g, shape)

        def wrong():
            outs = [o.clone() for o in fn()]
            outs[0][-1, -1, -1, -1] += 0.5
            return tuple(outs)
        return wrong


class NaNProvider(TorchProvider):
    def __init__(self):
        super().__init__(False)
        self.name = "nan"

    def make(self, pass_, x, w, g, shape):
        fn = super().make(pass_, x, w, g, shape)
        return lambda: tuple(torch.full_like(o, float("nan")) for o in fn())


class Raising(Provider):
    name = "raises"

    def make(self, pass_, x, w, g, shape):
        def fn():
            raise RuntimeError("kernel exploded")
        return fn


class Declining(TorchProvider):
    def __init__(self):
        super().__init__(False)
        self.name = "declines"

    def supports(self, shape, dtype, pass_, device):
        return "K > 5 not supported" if shape.kh > 5 else None


def _rows_by(rows, **kw):
    return [r for r in rows if all(r[k] == v for k, v in kw.items())]


# ------------------------------------------------------------------------------------------------
def test_shapes_and_flops():
    s = parse_shape("8,128,56,56,31")
    assert (s.n, s.c, s.h, s.w, s.kh, s.kw, s.padding, s.out_hw) == (8, 128, 56, 56, 31, 31, (15, 15), (56, 56))
    assert s.flops("forward") == 2 * 8 * 128 * 56 * 56 * 31 * 31
    assert s.flops("all") == 3 * s.flops("forward")
    assert s.bytes("forward", 4) == 4 * (2 * 8 * 128 * 56 * 56 + 128 * 31 * 31)
    assert parse_shape("1,2,10,12,3,5").kw == 5
    for bad in ("1,2,3", "a,b,c,d,e", "0,4,8,8,3"):
        with pytest.raises(ValueError, match="--shape"):
            parse_shape(bad)
    r31b = shape_set("replknet31b")
    assert [(x.n, x.c, x.h, x.kh) for x in r31b] == [(64, 128, 56, 31), (64, 256, 28, 29), (64, 512, 14, 27),
                                                      (64, 1024, 7, 13)]
    ks = shape_set("ksweep")
    assert len(ks) == 45 and {x.c for x in ks} == {384} and {x.h for x in ks} == {16, 32, 64}
    assert [x.kh for x in shape_set("cpu")] == [3, 7, 13, 31]
    assert [x.kh for x in shape_set("ksweep", ks=[3, 31])][:2] == [3, 31]
    with pytest.raises(ValueError, match="--set"):
        shape_set("nope")
    with pytest.raises(ValueError, match="--providers"):
        make_provider("nope")


def test_peak_table():
    h100 = lookup_peak("NVIDIA H100 80GB HBM3")
    assert h100.name == "H100 SXM" and h100.ffma_tflops == 66.9 and h100.fp16_tc_tflops == 989.4
    assert h100.hbm_tbps == 3.35 and h100.tf32_tc_tflops == 494.7 and h100.hfma2_tflops == 133.8
    assert lookup_peak("NVIDIA H100 PCIe").name == "H100 PCIe"
    h200 = lookup_peak("NVIDIA H200")
    assert h200.hbm_tbps == 4.8 and h200.fp16_tc_tflops == 989.4
    assert lookup_peak("NVIDIA A100-SXM4-80GB").name.startswith("A100")
    assert lookup_peak("NVIDIA GeForce GTX 1080") is None and lookup_peak(None) is None
    # 1 TFLOP of fp32 FFMA work on H100: 1/66.9 s, compute bound
    t, bound = floor_seconds(h100, "fp32", 1e12, 1e6)
    assert bound == "compute" and abs(t - 1 / 66.9) < 1e-12
    t, bound = floor_seconds(h100, "fp16", 1e6, 3.35e12)
    assert bound == "memory" and abs(t - 1.0) < 1e-12


def test_time_cpu_repeats():
    calls = []
    t = time_cpu(lambda: calls.append(1), min_rep=4, max_rep=6, target_s=0.0, warmup_s=0.0)
    assert t.n == 4 and len(calls) == 4 and t.min <= t.median <= t.max  # a slow first call counts
    calls.clear()
    t = time_cpu(lambda: calls.append(1), min_rep=3, max_rep=3, target_s=10.0, warmup_s=0.01)
    assert t.n == 3 and len(calls) > 4  # cheap calls: warmed up, then at most max_rep timed


def test_run_tiny_writes_outputs(tmp_path):
    provs = [make_provider("torch"), make_provider("torch-cl"), make_provider("lkconv-cpu"),
             make_provider("lkconv-cuda")]
    rows = run_benchmark(TINY, provs, ["fp32"], ["forward", "grad_input", "grad_weight", "all"], "cpu", **FAST)
    assert len(rows) == 2 * 4 * 4
    for r in rows:
        if r["provider"] == "lkconv-cuda":  # no GPU here, or no extension: listed, with the reason
            assert r["status"] in ("unavailable", "unsupported") and r["note"], r
            continue
        assert r["status"] == "ok", r
        assert float(r["ms"]) > 0 and float(r["gflops"]) > 0 and float(r["err"]) <= float(r["tol"])
        if r["provider"] == "torch":
            assert float(r["speedup"]) == 1.0
        else:
            assert float(r["speedup"]) > 0
    env = {"device": "cpu", "gpu": None, "torch": torch.__version__, "lkconv": lkconv.__version__}
    paths = write_results(rows, env, str(tmp_path / "res"), plots=True, log=lambda m: None)
    back = read_csv(paths["csv"])
    assert len(back) == len(rows) and list(back[0].keys()) == ROW_FIELDS
    assert {r["status"] for r in back} <= {"ok", "unavailable", "unsupported"}
    md = open(paths["markdown"]).read()
    assert "## Environment" in md and "| shape | dtype | pass |" in md and "lkconv-cpu" in md
    assert "9x9 K7" in md and md.count("\n|") > 2 * 4 * 3
    if importlib.util.find_spec("matplotlib") is not None:
        assert paths["plots"] and all((tmp_path / "res" / p.split("/")[-1]).stat().st_size > 1000
                                      for p in paths["plots"])
    text = format_table(rows) + format_summary(rows)
    assert "vs torch" in text and "lkconv-cpu" in text


@pytest.mark.parametrize("which", [0, 1, 2], ids=["forward", "grad_input", "grad_weight"])
def test_gate_rejects_wrong_provider(which):
    shape = TINY[1]
    wrong = ScaledTorch(which=which)
    rows = run_benchmark([shape], [make_provider("torch"), wrong], ["fp32"], ["all"], "cpu", **FAST)
    good, bad = rows
    assert good["status"] == "ok"
    assert bad["status"] == "WRONG" and bad["ms"] == "" and bad["speedup"] == "", bad
    assert "correctness gate" in bad["note"] and float(bad["err"]) > float(bad["tol"])
    # the isolated pass computing that output is rejected too (its only output is perturbed)
    pass_ = ["forward", "grad_input", "grad_weight"][which]
    (r,) = run_benchmark([shape], [ScaledTorch(which=0)], ["fp32"], [pass_], "cpu", **FAST)
    assert r["status"] == "WRONG" and r["ms"] == ""


def test_gate_tiny_relative_errors_and_nan():
    shape = TINY[0]
    rows = run_benchmark([shape], [ScaledTorch(scale=1 + 1e-3), NaNProvider()], ["fp32"], ["forward"], "cpu", **FAST)
    assert [r["status"] for r in rows] == ["WRONG", "WRONG"]


def test_gate_sub_batch_checks_whole_grads(monkeypatch):
    """With the reference on a sub-batch, grad_weight (all images) and grad_input (zero beyond the
    sub-batch) are still checked in full; a correct provider passes."""
    shape = Shape(3, 4, 9, 9, 5, 5, "sub")
    case = Case(shape, "fp32", "cpu", n_gate=1)
    assert case.n_gate == 1 and case.g_gate[1:].abs().max() == 0
    prov = TorchProvider()
    for pass_ in ("forward", "grad_input", "grad_weight", "all"):
        outs = prov.make(pass_, case.x, case.w, case.g_gate, shape)()
        assert check_outputs(case, pass_, outs).ok, pass_
    # grad_input wrong in the last image (outside the reference sub-batch) is still caught
    outs = OneElementOff().make("grad_input", case.x, case.w, case.g_gate, shape)()
    assert not check_outputs(case, "grad_input", outs).ok
    # the runner picks a sub-batch by the reference cost budget
    monkeypatch.setitem(gate_mod.REF_BUDGET, "cpu", 4 * 9 * 9 * 25)
    rows = run_benchmark([shape], [prov, ScaledTorch(which=2)], ["fp32"], ["all"], "cpu", **FAST)
    assert rows[0]["status"] == "ok" and "1/3 images" in rows[0]["note"]
    assert rows[1]["status"] == "WRONG"


def test_runner_statuses_unavailable_unsupported_error_budget():
    provs = [make_provider("torch"), LkconvProvider("no-such-backend"), Declining(), Raising()]
    rows = run_benchmark(TINY, provs, ["fp32"], ["forward"], "cpu", **FAST)
    st = {(r["shape"], r["provider"]): r for r in rows}
    k3, k7 = TINY[0].label, TINY[1].label
    assert st[(k3, "lkconv-no-such-backend")]["status"] == "unavailable"
    assert "no-such-backend" in st[(k3, "lkconv-no-such-backend")]["note"]
    assert st[(k3, "declines")]["status"] == "ok" and st[(k7, "declines")]["status"] == "unsupported"
    assert st[(k3, "raises")]["status"] == "error" and "kernel exploded" in st[(k3, "raises")]["note"]
    rows = run_benchmark(TINY, [make_provider("torch")], ["fp32"], ["forward"], "cpu", budget_s=0.0, **FAST)
    assert {r["status"] for r in rows} == {"skipped"}
    with pytest.raises(ValueError, match="--dtypes"):
        run_benchmark(TINY, [make_provider("torch")], ["fp8"], ["forward"], "cpu", **FAST)
    with pytest.raises(ValueError, match="--passes"):
        run_benchmark(TINY, [make_provider("torch")], ["fp32"], ["sideways"], "cpu", **FAST)


def test_channels_last_provider_keeps_layout():
    prov = make_provider("torch-cl")
    case = Case(TINY[0], "fp32", "cpu")
    x, w, g = prov.prepare(case.x, case.w, case.g)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    (out,) = prov.make("forward", x, w, g, TINY[0])()
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_plots_optional_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    msgs = []
    rows = [{k: "" for k in ROW_FIELDS}]
    assert write_plots(rows, str(tmp_path), log=msgs.append) == []
    assert msgs and "matplotlib" in msgs[0]


def test_verify_passes_and_flags_a_wrong_backend():
    from lkconv import backends as B
    from lkconv.backends.torch_native import TorchBackend

    rows = run_verify(backends=["cpu", "torch"], devices=["cpu"], dtypes={"cpu": ["fp32"]},
                      cases=["k3", "k13-same", "channels_last", "noncontig-slice"])
    assert len(rows) == 8 and all(r["status"] == "pass" for r in rows), rows

    class Wrong(TorchBackend):
        name = "wrong-test"

        def grad_weight(self, grad_out, x, weight_shape, p):
            return super().grad_weight(grad_out, x, weight_shape, p) * 1.001

    B.register_backend("wrong-test", Wrong)
    try:
        rows = run_verify(backends=["wrong-test"], devices=["cpu"], dtypes={"cpu": ["fp32"]}, cases=["k3"])
    finally:
        B._FACTORIES.pop("wrong-test", None)
        B._INSTANCES.pop("wrong-test", None)
    assert rows[0]["status"] == "FAIL" and "grad_weight" in rows[0]["detail"]


def test_percent_of_floor_columns():
    """The roofline columns (filled on GPU runs) from the peak table, exercised with a given GPU name."""
    shape = TINY[1]
    rows = run_benchmark([shape], [make_provider("torch")], ["fp32"], ["forward", "all"], "cpu",
                         gpu_name="NVIDIA H100 80GB HBM3", **FAST)
    peak = lookup_peak("NVIDIA H100 80GB HBM3")
    for r in rows:
        assert r["status"] == "ok" and r["bound"] in ("compute", "memory")
        fl, bound = floor_seconds(peak, "fp32", shape.flops(r["pass"]), shape.bytes(r["pass"], 4))
        assert bound == r["bound"]
        assert abs(float(r["pct_floor"]) - 100 * fl / (float(r["ms"]) / 1e3)) <= 0.01 * float(r["pct_floor"])
    table = format_table(rows, cuda=True)
    assert "% floor" in table and "TFLOP/s" in table


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_cuda_paths_tiny():
    """On a GPU box: CUDA timer, gate on the device (all dtype modes), every GPU provider either
    measured correctly or declined with a reason, and a wrong provider caught."""
    from lkconv.bench.providers import default_providers
    from lkconv.bench.timing import time_cuda

    dev = torch.device("cuda")
    shapes = [Shape(2, 16, 20, 20, 7, 7, "tiny"), Shape(2, 16, 20, 20, 13, 13, "tiny")]
    provs = default_providers(dev) + [ScaledTorch(which=0, scale=1.1)]  # 10%: beyond the bf16 floor
    rows = run_benchmark(shapes, provs, ["tf32", "fp32", "fp16", "bf16"], ["forward", "grad_input", "grad_weight",
                                                                          "all"], dev, progress=False,
                         cuda_timing=dict(rep_ms=5, min_rep=3, max_rep=10, warmup_ms=1))
    for r in rows:
        if r["provider"] == "wrong":
            assert r["status"] == "WRONG", r
        elif r["provider"] in ("torch", "torch-cl"):
            assert r["status"] == "ok", r
        else:
            assert r["status"] in ("ok", "unavailable", "unsupported"), r
        if r["status"] == "ok":
            assert float(r["ms"]) > 0 and int(r["reps"]) >= 3
            if lookup_peak(torch.cuda.get_device_name()) is not None:
                assert r["pct_floor"] != ""
    x = torch.randn(1 << 20, device=dev)
    t = time_cuda(lambda: x.mul_(1.0), rep_ms=2, min_rep=4, max_rep=8, warmup_ms=1)
    assert 4 <= t.n <= 8 and t.min > 0


# ------------------------------------------------------------------------------------------------
# timing hygiene and plot layout
# ------------------------------------------------------------------------------------------------
def _ok_row(ms, lo, hi, shape="8x128x56x56 K31", provider="torch", pass_="all"):
    r = {k: "" for k in ROW_FIELDS}
    r.update(status="ok", ms=str(ms), ms_min=str(lo), ms_max=str(hi), shape=shape, provider=provider)
    r["pass"] = pass_
    return r


def test_timing_warnings_spread_load_threads():
    from lkconv.bench.timing import timing_warnings

    quiet = {"load1": 0.1, "cores": 4, "threads": 4}
    assert timing_warnings([_ok_row(10, 9.5, 10.5)], quiet, {"load1": 4.0, "cores": 4, "threads": 4}) == []
    # repeats spread by more than half the median: named, with what to do
    (w,) = timing_warnings([_ok_row(10, 9.5, 10.5), _ok_row(10, 4, 30, provider="lkconv-cpu")], quiet)
    assert "1 of 2" in w and "lkconv-cpu" in w and "260%" in w and "--repeats" in w
    # other processes' load above the cores (at the start; at the end our own threads are subtracted)
    ws = timing_warnings([], {"load1": 5.0, "cores": 2, "threads": 1})
    assert len(ws) == 1 and "load average 5.0" in ws[0] and "idle" in ws[0]
    assert timing_warnings([], {"load1": 0.2, "cores": 2, "threads": 2}, {"load1": 2.1, "cores": 2, "threads": 2}) == []
    ws = timing_warnings([], {"load1": 0.2, "cores": 2, "threads": 2}, {"load1": 4.5, "cores": 2, "threads": 2})
    assert any("load average 2.5" in w for w in ws)
    # oversubscription: more threads than cores, or threads + others' load above the cores
    ws = timing_warnings([], {"load1": 0.0, "cores": 2, "threads": 8})
    assert ws == ["torch uses 8 threads on 2 usable cores (oversubscribed): use --threads 2 or fewer"]
    ws = timing_warnings([], {"load1": 1.0, "cores": 2, "threads": 2})
    assert len(ws) == 1 and "--threads 1" in ws[0]
    # CUDA: the CPU's load does not matter to CUDA events; the spread still does
    assert timing_warnings([], {"load1": 9.0, "cores": 2, "threads": 8}, device="cuda") == []


def test_markdown_reports_timing_conditions(tmp_path):
    rows = run_benchmark(TINY[:1], [make_provider("torch")], ["fp32"], ["forward"], "cpu", **FAST)
    env = {"device": "cpu", "gpu": None}
    md = open(write_results(rows, env, str(tmp_path), plots=False, warnings=["load is high"])["markdown"]).read()
    assert "## Timing conditions" in md and "load is high" in md
    md = open(write_results(rows, env, str(tmp_path), plots=False, warnings=[])["markdown"]).read()
    assert "## Timing conditions" in md and "No warning" in md


def test_plot_layout_kernel_sweep_vs_shapes():
    from lkconv.bench.report import plot_layout

    def rows_of(shapes):
        out = []
        for s in shapes:
            r = {k: "" for k in ROW_FIELDS}
            r.update(group=s.group, shape=s.label, n=s.n, c=s.c, h=s.h, w=s.w, kh=s.kh, kw=s.kw)
            out.append(r)
        return out

    mode, fams = plot_layout(rows_of(shape_set("cpu")))
    assert mode == "kernel" and list(fams.values()) == ["8x128x56x56"]
    mode, fams = plot_layout(rows_of(shape_set("ksweep", ks=[3, 7])))
    assert mode == "kernel" and list(fams.values()) == ["64x384x16x16", "64x384x32x32", "64x384x64x64"]
    # user shapes of different families, a rectangular kernel, the RepLKNet-31B layers: the shapes
    mode, labels = plot_layout(rows_of([parse_shape("8,128,56,56,31"), parse_shape("8,256,28,28,29")]))
    assert mode == "shape" and labels == ["8x128x56x56 K31", "8x256x28x28 K29"]
    mode, labels = plot_layout(rows_of([parse_shape("2,4,10,10,7"), parse_shape("2,4,10,10,7,21")]))
    assert mode == "shape" and "2x4x10x10 K7x21" in labels
    assert plot_layout(rows_of(shape_set("replknet31b")))[0] == "shape"


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_plots_title_and_axes(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = []
    real = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **kw):
        saved.append((fig._suptitle.get_text(), [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes],
                      [[ln.get_linestyle() for ln in ax.get_lines()] for ax in fig.axes]))
        return real(fig, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    shapes = [parse_shape("2,4,9,9,3"), parse_shape("2,4,9,9,5,7")]
    rows = run_benchmark(shapes, [make_provider("torch"), make_provider("lkconv-cpu")], ["fp32"], ["forward"],
                         "cpu", **FAST)
    env = {"cpu": "TestCPU", "torch_threads": 2, "torch": "x", "lkconv_commit": "abc123", "gpu": None}
    (path,) = write_plots(rows, str(tmp_path), env=env)
    assert (tmp_path / "speedup_fp32.png").stat().st_size > 1000
    title, labels, styles = saved[0]
    assert "TestCPU" in title and "abc123" in title and "2 shape(s)" in title
    assert ("shape (N x C x H x W, kernel K or KHxKW)", "speedup vs torch NCHW (x)") in labels
    assert ("shape (N x C x H x W, kernel K or KHxKW)", "median time per call (ms)") in labels
    # two unrelated shapes: each provider's points stand alone (no line joins them)
    assert all(ax_styles.count("None") == 2 for ax_styles in styles), styles


def test_usable_cores_honours_a_cgroup_quota(monkeypatch):
    import builtins
    import io
    import os

    from lkconv.bench.timing import usable_cores

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert usable_cores() >= 1
    real_open = builtins.open
    for text, want in (("150000 100000\n", min(n, 2)), ("max 100000\n", n), ("50000 100000\n", 1)):
        monkeypatch.setattr(builtins, "open", lambda path, *a, _t=text, **kw: io.StringIO(_t)
                            if path == "/sys/fs/cgroup/cpu.max" else real_open(path, *a, **kw))
        assert usable_cores() == want, text
