"""lkconv's benchmark suite (``python -m lkconv bench``): shape sets, providers, correctness gate,
timers, GPU peak table and report writers.  See docs/benchmarks.md."""
from .providers import DTYPES, LkconvProvider, Provider, ReplknetProvider, TorchProvider, default_providers, make_provider
from .runner import ROW_FIELDS, run_benchmark
from .shapes import PASSES, SHAPE_SETS, Shape, parse_shape, shape_set

__all__ = [
    "DTYPES", "PASSES", "SHAPE_SETS", "ROW_FIELDS", "Shape", "Provider", "TorchProvider", "LkconvProvider",
    "ReplknetProvider", "default_providers", "make_provider", "parse_shape", "shape_set", "run_benchmark",
]
