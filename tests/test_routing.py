"""auto's routing table for CUDA tensors (lkconv/backends/routing.py): the order it derives, the
per-pass routes the ops read, and that no entry routes to a backend modelled slower than PyTorch.
Runs without a GPU: check() takes a Request, and routing only reads facts of the request."""
import pytest
import torch

import lkconv
from lkconv.backends import Request, routing
from lkconv.backends.base import PASSES
from lkconv.params import normalize_params

CUDA = torch.device("cuda", 0)
LAYERS = {"56": (128, 56, 31), "28": (256, 28, 29), "14": (512, 14, 27), "7": (1024, 7, 13)}


def _req(pass_, cls="56", dtype=torch.bfloat16, k=None, stride=1, dilation=1, n=64):
    C, H, K = LAYERS[cls]
    k = k or K
    p = normalize_params(stride, k // 2 * dilation, dilation, (k, k))
    return Request(pass_, CUDA, dtype, None if pass_ == "grad_weight" else dtype, (n, C, H, H), (C, 1, k, k), p)


def test_every_cell_never_prefers_a_backend_modelled_slower_than_torch():
    rows = routing.route_table()
    assert len(rows) == 3 * 4 * 3
    for r in rows:
        assert r["order"][-1] == "torch"
        t = r["times"]
        picked = r["order"][:-1]
        for be in picked:
            assert t[be] is not None and t["torch"] is not None and t[be] < t["torch"], r
        assert [t[be] for be in picked] == sorted(t[be] for be in picked), r  # fastest first
        for be in ("cuda", "triton"):  # every faster backend with a time is in the order
            if t[be] is not None and t["torch"] is not None and t[be] < t["torch"]:
                assert be in picked, r


def test_shape_classes_follow_the_model_layers():
    for cls in LAYERS:
        assert routing.shape_class(_req("forward", cls)) == cls
    assert routing.shape_class(_req("forward", "56", k=7)) is None  # small kernel: no model
    assert routing.shape_class(_req("forward", "56", stride=2)) is None
    assert routing.shape_class(_req("forward", "56", dilation=2)) is None


def test_route_order_examples(monkeypatch):
    # a kernel modelled slower than PyTorch is not chosen (bf16 7x7/K13 forward, cuda made slower)
    key = ("cuda", "7", "forward", "half")
    monkeypatch.setitem(routing.TIMES_US, key, (routing.TIMES_US[("torch", "7", "forward", "half")][0] + 1, "test"))
    order, why = routing.route_order(_req("forward", "7"))
    assert "cuda" not in order and order[-1] == "torch" and "torch" in why
    monkeypatch.undo()
    # every modelled lkconv kernel of the committed report beats PyTorch's estimate in every cell today
    order, _ = routing.route_order(_req("forward", "7"))
    assert set(order) == {"cuda", "triton", "torch"} and order[-1] == "torch"
    order, _ = routing.route_order(_req("grad_weight", "56"))
    assert order[0] == "cuda"
    assert routing.route_order(_req("forward", "56", k=3))[0] == ("torch",)
    assert routing.route_order(_req("forward", "56", dtype=torch.float64))[0] == ("torch",)


def test_measured_beats_modelled(monkeypatch):
    key = ("triton", "56", "forward", "half")
    monkeypatch.setitem(routing.MEASURED_US, key, (1.0, "measured: test"))
    order, why = routing.route_order(_req("forward", "56"))
    assert order[0] == "triton" and "triton 1" in why
    monkeypatch.setitem(routing.MEASURED_US, key, (10**9, "measured: test"))
    assert "triton" not in routing.route_order(_req("forward", "56"))[0]


def test_routes_join_and_split():
    assert routing.join_route({p: "torch" for p in PASSES}) == "torch"
    r = routing.join_route({"forward": "cuda", "grad_input": "cuda", "grad_weight": "triton"})
    assert r == "forward=cuda;grad_input=cuda;grad_weight=triton"
    assert [routing.route_for(r, p) for p in PASSES] == ["cuda", "cuda", "triton"]
    assert routing.route_for("cpu", "grad_weight") == "cpu"
    with pytest.raises(ValueError, match="grad_weight"):
        routing.route_for("forward=cuda", "grad_weight")


def test_ops_run_each_pass_on_its_routed_backend():
    """A per-pass route through the real ops on CPU tensors: each op takes its own pass's backend
    (forward on cpu, grad_input on torch, grad_weight on reference) and the gradients are right."""
    import torch.nn.functional as F

    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    route = routing.join_route({"forward": "cpu", "grad_input": "torch", "grad_weight": "reference"})
    y = torch.ops.lkconv.dwconv2d(x, w, None, [1, 1], [2, 2, 2, 2], [1, 1], route)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    yr = F.conv2d(xr, wr, None, 1, 2, 1, 3)
    rgx, rgw = torch.autograd.grad(yr, (xr, wr), g)
    for a, b in ((y, yr), (gx, rgx), (gw, rgw)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_auto_on_cuda_requests_is_routed_per_pass(monkeypatch):
    """resolve's CUDA branch without a GPU: backends stood in by ones that accept every request,
    so the result is exactly the table's first choice per pass."""
    from lkconv import backends

    class Accepting(backends.Backend):
        def __init__(self, name):
            self.name = name

        def check(self, req):
            return None

    monkeypatch.setattr(backends, "_unavailable_reason", lambda name: None)
    for name in ("cuda", "triton", "torch"):
        monkeypatch.setitem(backends._INSTANCES, name, Accepting(name))
    x = torch.empty(1).expand(64, 1024, 7, 7)
    w = torch.empty(1).expand(1024, 1, 13, 13)

    class FakeCudaTensor:  # resolve reads device, dtype and shape only
        def __init__(self, t, dtype):
            self.shape, self.device, self.dtype = t.shape, CUDA, dtype

    p = normalize_params(1, 6, 1, (13, 13))
    got = backends._route_cuda(FakeCudaTensor(x, torch.bfloat16), FakeCudaTensor(w, torch.bfloat16), p)
    want = {ps: routing.route_order(_req(ps, "7"))[0][0] for ps in PASSES}
    assert got == routing.join_route(want)
    assert routing.route_for(got, "forward") != "cuda"  # modelled slower than torch at 7x7/K13


def test_modelled_rows_are_the_committed_report():
    """auto's modelled lkconv rows are generated from one committed static report (one source): the
    module in the package is exactly what `python -m lkconv static --update-routing` makes of it."""
    import json
    import os

    from lkconv.backends import routing_modelled
    from lkconv.static.report import routing_module_text

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.join(root, "benchmarks", "results", routing_modelled.REPORT)
    with open(os.path.join(folder, "routing.json")) as f:
        text = routing_module_text(json.load(f), routing_modelled.REPORT)
    with open(routing_modelled.__file__) as f:
        assert f.read() == text, "regenerate: python -m lkconv static --update-routing " + folder
    # and the table uses it: every generated cell is in TIMES_US with the report named in its basis
    for key, (us, kernel) in routing_modelled.CELLS.items():
        t, basis = routing.TIMES_US[key]
        assert t == us and routing_modelled.REPORT in basis and kernel in basis
        assert kernel.endswith("_kernel"), (key, kernel)  # a kernel name, not a mangled fragment


def test_readme_gpu_table_is_the_routing_report():
    """README's modelled GPU table is generated from the report the routing rows come from."""
    import os

    from lkconv.backends import routing_modelled
    from lkconv.static.report import readme_performance_table

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    table = readme_performance_table(os.path.join(root, "benchmarks", "results", routing_modelled.REPORT))
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    assert table in readme, "README's GPU table: paste lkconv.static.report.readme_performance_table(<report>)"
    assert routing_modelled.REPORT in readme
