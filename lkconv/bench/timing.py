"""Timers: wall clock over repeats on the CPU, CUDA events (with L2 flush) on the GPU.

Both return a :class:`Timing` with the median, min and max over the timed repeats.  The callable is
assumed to be warm already (the correctness gate has run it once); the CUDA timer still warms up.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List

import torch

__all__ = ["Timing", "time_cpu", "time_cuda"]


@dataclass
class Timing:
    times_ms: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min(self) -> float:
        return min(self.times_ms)

    @property
    def max(self) -> float:
        return max(self.times_ms)

    @property
    def n(self) -> int:
        return len(self.times_ms)


def time_cpu(fn: Callable[[], object], min_rep: int = 3, max_rep: int = 20, target_s: float = 1.5,
             warmup_s: float = 0.05) -> Timing:
    """Wall time of ``fn()`` repeated until ``target_s`` seconds are spent (at least ``min_rep``, at
    most ``max_rep`` repeats).  Cheap calls are first warmed up for ``warmup_s`` seconds; a first
    call slower than that is already warm (the gate ran it) and counts as the first repeat."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times: List[float] = []
    spent = 0.0
    if first >= warmup_s:
        times.append(first * 1e3)
        spent = first
    else:
        t_end = t0 + warmup_s
        while time.perf_counter() < t_end:
            fn()
    while len(times) < max_rep and (len(times) < min_rep or spent < target_s):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt * 1e3)
        spent += dt
    return Timing(times)


_FLUSH = {}


def _flush_buffer(device) -> torch.Tensor:
    key = str(device)
    if key not in _FLUSH:
        # larger than the L2 of any current GPU (H100: 50 MB, H200: 60 MB)
        _FLUSH[key] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    return _FLUSH[key]


def time_cuda(fn: Callable[[], object], device=None, rep_ms: float = 150.0, warmup_ms: float = 25.0,
              min_rep: int = 5, max_rep: int = 200, flush_l2: bool = True) -> Timing:
    """CUDA-event timing of ``fn()`` on the current stream: estimate, warm up for ``warmup_ms``,
    then ``rep_ms`` worth of repeats (clamped to [min_rep, max_rep]), each with its own event pair.
    With ``flush_l2`` a 256 MiB buffer is zeroed before each repeat (outside the timed region), so
    small shapes are not measured from a warm L2."""
    device = device or torch.device("cuda", torch.cuda.current_device())
    buf = _flush_buffer(device) if flush_l2 else None
    torch.cuda.synchronize(device)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(3):
        fn()
    e.record()
    torch.cuda.synchronize(device)
    est = max(s.elapsed_time(e) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n = int(min(max_rep, max(min_rep, rep_ms / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        if buf is not None:
            buf.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return Timing([a.elapsed_time(b) for a, b in zip(starts, ends)])
