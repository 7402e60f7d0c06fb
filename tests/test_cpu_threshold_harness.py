"""benchmarks/cpu_threshold.py measures what it claims: the interleaved timer makes exactly the calls
it reports (shuffled rounds, the sample counts per callable), the user-level gradient callables run
only the backward of the node a user's call records (one gradient, the one asked for, no forward), on
lkconv's side and PyTorch's alike, and README.md's CPU table is the generator's output for the run it
cites.  No timing is asserted here."""
from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lkconv.backends import cpu as cpu_mod
from lkconv.params import normalize_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMT = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


def _bench():
    spec = importlib.util.spec_from_file_location("cpu_threshold", os.path.join(ROOT, "benchmarks", "cpu_threshold.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------
# the interleaved timer
# ------------------------------------------------------------------------------------------------
class _FakeClock:
    """A clock that only the callables advance (each by its cost): the timer's decisions are then exact."""
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _costed(clock, costs, calls):
    def make(k):
        def f():
            calls.append(k)
            clock.t += costs[k]
        return f
    return {k: make(k) for k in costs}


def test_time_interleaved_makes_exactly_the_calls_it_reports_in_shuffled_rounds(monkeypatch):
    b = _bench()
    clock = _FakeClock()
    monkeypatch.setattr(b, "CLOCK", clock)
    calls = []
    keys = [("forward", "nchw", p) for p in ("a", "b", "c", "d", "e", "f")]
    # "a".."d" cheap (the group's fastest 1 ms), "e" 4x the fastest (beyond near=2.5), "f" far and slow
    costs = dict(zip(keys, (1e-3, 1.2e-3, 2e-3, 2.4e-3, 4e-3, 0.5)))
    fns = _costed(clock, costs, calls)
    # the warm-up times given: "b" looked slow at its (cold) warm-up, but is judged on its medians
    warm = {keys[0]: 1e-3, keys[1]: 5e-3, keys[2]: 2e-3, keys[3]: 2.4e-3, keys[4]: 4e-3, keys[5]: 0.5}
    ts = b.time_interleaved(fns, 3, group_of=lambda k: k[:2], slow_abs=0.25, slow_rel=4.0, warm=warm,
                            small_s=0.02, small_mult=4, seed=7)
    want = {keys[0]: 12, keys[1]: 12, keys[2]: 12, keys[3]: 12, keys[4]: 3, keys[5]: 2}
    assert {k: len(v) for k, v in ts.items()} == want
    assert {k: calls.count(k) for k in keys} == want  # no call beyond the reported samples (warm given)
    assert all(v == pytest.approx([costs[k]] * len(v)) for k, v in ts.items())  # each sample: that call's time
    # rounds: each callable at most once per round, and the order is not the same every round
    rounds, pos = [], 0
    for r in range(12):
        n = sum(1 for k in keys if want[k] > r)
        rounds.append(calls[pos:pos + n])
        pos += n
    assert all(len(set(r)) == len(r) for r in rounds)
    assert len({tuple(r) for r in rounds[:2]} | {tuple(r) for r in rounds[2:3]}) > 1
    assert len({r[0] for r in rounds}) > 1
    # the near callables' extra samples come in the same rounds: after the first phase (rounds of
    # all six, "f" in two of them), every later round holds the four near ones and nothing else
    assert all(set(r) == set(keys[:4]) for r in rounds[3:])
    # without given warm-up times each callable is called once more (its warm-up)
    calls.clear()
    ts = b.time_interleaved({k: fns[k] for k in keys[:2]}, 5, group_of=lambda k: k[:2], slow_abs=1.0,
                            slow_rel=4.0)
    assert [len(v) for v in ts.values()] == [5, 5] and len(calls) == 12


def test_time_interleaved_gives_cheap_near_callables_the_same_sample_budget(monkeypatch):
    b = _bench()
    clock = _FakeClock()
    monkeypatch.setattr(b, "CLOCK", clock)
    keys = [("forward", "nchw", p) for p in ("a", "b", "c")]
    costs = dict(zip(keys, (2e-3, 4e-3, 0.04)))  # fastest 2 ms; "c" 20x: far from the choice
    fns = _costed(clock, costs, [])
    ts = b.time_interleaved(fns, 3, group_of=lambda k: k[:2], slow_abs=0.25, slow_rel=4.0,
                            small_s=0.06, small_mult=4, small_budget_s=0.1, max_samples=40)
    # 0.1 s at the fastest's 2 ms = 50 -> capped at 40, for both near callables; c: the plain repeats
    assert {k: len(v) for k, v in ts.items()} == {keys[0]: 40, keys[1]: 40, keys[2]: 3}
    ts = b.time_interleaved(fns, 3, group_of=lambda k: k[:2], slow_abs=0.25, slow_rel=4.0,
                            small_s=0.06, small_mult=4, small_budget_s=0.05, max_samples=40)
    assert {k: len(v) for k, v in ts.items()} == {keys[0]: 25, keys[1]: 25, keys[2]: 3}  # 0.05 s / 2 ms


def test_ratio_ci_brackets_the_ratio_and_narrows_with_samples():
    b = _bench()
    import random
    rng = random.Random(1)

    def cell(n, auto=1.0, torch_=1.1):
        noisy = lambda m: [m * (1 + 0.1 * rng.random()) for _ in range(n)]  # noqa: E731
        return {"times_ms": {"torch": noisy(torch_), "torch_rt": noisy(3.0), "auto": noisy(auto)},
                "median_ms": {}}
    few, many = cell(9), cell(100)
    for c in (few, many):
        lo, hi = b.ratio_ci(c)
        med = __import__("statistics").median
        r = min(med(c["times_ms"]["torch"]), med(c["times_ms"]["torch_rt"])) / med(c["times_ms"]["auto"])
        assert lo <= r <= hi and 1.0 < lo and hi < 1.2  # the true ratio is 1.1
    assert (b.ratio_ci(many)[1] - b.ratio_ci(many)[0]) < (b.ratio_ci(few)[1] - b.ratio_ci(few)[0])
    assert b.ratio_ci({"median_ms": {}}) is None  # a run that kept no samples


# ------------------------------------------------------------------------------------------------
# user-level gradients: only the backward, only the gradient asked for
# ------------------------------------------------------------------------------------------------
class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if name.startswith("convolution"):
            self.seen.append((name, tuple(args[-1]) if name == "convolution_backward.default" else None))
        return func(*args, **(kwargs or {}))


def _tensors(K, layout, N=2, C=3, H=11):
    torch.manual_seed(K)
    x = torch.randn(N, C, H, H).contiguous(memory_format=FMT[layout])
    w = torch.randn(C, 1, K, K)
    g = torch.randn(N, C, H, H).contiguous(memory_format=FMT[layout])
    return x, w, g, normalize_params(1, "same", 1, (K, K)), [K // 2, K // 2]


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("pass_", ["grad_input", "grad_weight"])
def test_torch_user_gradient_runs_one_convolution_backward_for_that_gradient_only(pass_, layout):
    b = _bench()
    x, w, g, p, pad = _tensors(3, layout)
    fn = b.torch_user(pass_, x, w, g, pad, x.shape[1])
    assert fn.node == "ConvolutionBackward0"
    with _Ops() as mode:
        got = fn()
        got2 = fn()  # retain_graph: the same backward again
    mask = (True, False, False) if pass_ == "grad_input" else (False, True, False)
    assert mode.seen == [("convolution_backward.default", mask)] * 2  # no forward in the timing
    want = b.torch_pass(pass_, x, w, g, pad, x.shape[1])()
    torch.testing.assert_close(got, want)
    assert torch.equal(got, got2)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("K", [3, 31])
@pytest.mark.parametrize("pass_", ["grad_input", "grad_weight"])
def test_lkconv_user_gradient_runs_only_that_pass_of_the_node_the_call_recorded(pass_, K, layout, monkeypatch):
    """Delegated calls (every needed pass is PyTorch's own kernel) run F.conv2d's node: one
    convolution_backward with that gradient's mask; the others run lkconv's eager node: one call of
    that pass of the cpu backend, none of the other passes, no forward."""
    b = _bench()
    x, w, g, p, pad = _tensors(K, layout)
    passes = ("forward", pass_)
    delegated = cpu_mod.CPUBackend().delegates_to_torch(x, tuple(w.shape), p, passes)
    fn = b.lk_auto(pass_, x, w, g, p)
    counts = {"forward": 0, "grad_input": 0, "grad_weight": 0}
    for name in counts:
        real = getattr(cpu_mod.CPUBackend, name)

        def spy(self, *a, _real=real, _name=name, **k):
            counts[_name] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(cpu_mod.CPUBackend, name, spy)
    with _Ops() as mode:
        got = fn()
    if delegated:
        assert fn.node == "ConvolutionBackward0"
        mask = (True, False, False) if pass_ == "grad_input" else (False, True, False)
        assert mode.seen == [("convolution_backward.default", mask)]
        assert counts == {"forward": 0, "grad_input": 0, "grad_weight": 0}
    else:
        assert fn.node == "_EagerConvFunctionBackward"
        assert counts == {"forward": 0, "grad_input": int(pass_ == "grad_input"),
                          "grad_weight": int(pass_ == "grad_weight")}
    want = b.torch_pass(pass_, x, w, g, pad, x.shape[1])()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if pass_ == "grad_input":
        assert got.is_contiguous(memory_format=FMT[layout])


def test_both_delegated_and_lkconv_nodes_are_exercised():
    """The parametrisation above is not vacuous: K=3 is delegated, K=31 is not (2 threads' and 1
    thread's tables alike)."""
    for threads in (1, 2):
        for layout in ("nchw", "cl"):
            x, w, g, p, pad = _tensors(3, layout)
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                be = cpu_mod.CPUBackend()
                assert be.delegates_to_torch(x, tuple(w.shape), p, ("forward", "grad_input"))
                x, w, g, p, pad = _tensors(31, layout)
                assert not be.delegates_to_torch(x, tuple(w.shape), p, ("forward", "grad_input"))
            finally:
                torch.set_num_threads(old)


def test_user_gradient_rejects_the_forward():
    b = _bench()
    x, w, g, p, pad = _tensors(3, "nchw")
    with pytest.raises(ValueError, match="gradient pass"):
        b.user_grad(lambda u, v: u, "forward", x, w, g)


# ------------------------------------------------------------------------------------------------
# README's CPU table is generated
# ------------------------------------------------------------------------------------------------
def test_readme_cpu_table_is_the_generated_table_of_the_run_it_cites():
    b = _bench()
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    runs = re.findall(r"\]\((benchmarks/results/cpu-threshold-[^)/]+)/results\.md\)", readme)
    assert runs, "README cites no cpu-threshold run"
    run = runs[0]  # the first one cited is the table's run
    with open(os.path.join(ROOT, run, "results.json")) as f:
        res = json.load(f)
    table = b.readme_table(res)
    assert table.count("\n") >= 26  # 8 kernel sizes x 3 passes + header + the autograd line
    assert table in readme, ("README's CPU table: paste the output of python benchmarks/cpu_threshold.py "
                             f"--readme-table {run}/results.json")


def test_outside_kernel_splits_the_delegated_call_around_the_f_conv2d_it_runs():
    b = _bench()
    import lkconv.ops as lkops
    fast = lkops._fast
    res = b.outside_kernel(1, 4, 12, K=3, rounds=5)
    stores = ["c++", "python"] if fast is not None else ["python"]
    # K=3 is delegated on both layouts, in every store
    assert [(o["store"], o["layout"]) for o in res] == [(s, lay) for s in stores for lay in ("nchw", "cl")]
    for o in res:
        assert o["call"] > 0 and o["f_conv2d"] > 0
        if o["store"] == "python":
            assert 0 < o["inside"] <= o["call"]
        else:
            assert o["inside"] is None
    assert lkops._fast is fast  # the store is restored
    import lkconv.functional as lkf
    assert lkf.F is torch.nn.functional  # the shim is removed again
