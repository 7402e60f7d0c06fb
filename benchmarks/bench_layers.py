#!/usr/bin/env python
"""Layer-level benchmark: a thin wrapper around ``python -m lkconv bench`` (lkconv/bench/).

Same arguments, same outputs (console table, results.csv, results.md, env.json, speedup_<dtype>.png);
see ``python benchmarks/bench_layers.py --help`` and docs/benchmarks.md.

    python benchmarks/bench_layers.py                                   # CPU: the default comparison
    python benchmarks/bench_layers.py --set replknet31b                 # GPU: RepLKNet-31B layers
    python benchmarks/bench_layers.py --set ksweep --dtypes fp16 --passes forward,all
    python benchmarks/bench_layers.py --shape 64,384,32,32,31 --providers torch,torch-cl,lkconv-cuda
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lkconv.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
