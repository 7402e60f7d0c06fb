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

__all__ = ["Timing", "time_cpu", "time_cuda", "load_snapshot", "usable_cores", "spread", "timing_warnings",
           "format_warnings", "SPREAD_LIMIT"]


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


# ------------------------------------------------------------------------------------------------
# timing hygiene: is this machine fit to time on right now?
# ------------------------------------------------------------------------------------------------
#: a row whose (max - min) / median exceeds this is "spread widely"
SPREAD_LIMIT = 0.5


def usable_cores() -> int:
    """CPUs this process may run on: the affinity mask where the OS has one (else os.cpu_count()),
    capped by a cgroup v2 CPU quota (``/sys/fs/cgroup/cpu.max``, containers) when one is set."""
    import math
    import os

    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max" and int(period) > 0:
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def load_snapshot() -> dict:
    """``{"load1": 1-minute load average or None, "cores": usable cores, "threads": torch threads}``."""
    import os

    try:
        load1 = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load1 = None
    return {"load1": load1, "cores": usable_cores(), "threads": torch.get_num_threads()}


def spread(median: float, lo: float, hi: float) -> float:
    """(max - min) / median of one measurement's repeats (0 for a single repeat)."""
    return (hi - lo) / median if median > 0 else 0.0


def timing_warnings(rows, before: dict, after=None, device: str = "cpu", threads_flag: str = "--threads") -> list:
    """Warnings (each with what to do) about the conditions a CPU timing ran under.

    * ``rows``: benchmark rows (fields ``status``, ``ms``, ``ms_min``, ``ms_max``, ``shape``, ...);
      rows whose repeats spread by more than :data:`SPREAD_LIMIT` of their median are reported;
    * ``before`` / ``after``: :func:`load_snapshot` at the start and the end of the run.  The load
      at the start is other processes'; at the end it includes this run's own threads, which are
      subtracted.  Load above the usable cores, or torch threads plus the others' load above them
      (oversubscription), is reported.
    ``device="cuda"`` checks the spread only (CUDA events do not see the CPU's load).
    """
    out = []
    ok = [r for r in rows if r.get("status") == "ok" and r.get("ms") not in ("", None)]
    wide = []
    for r in ok:
        s = spread(float(r["ms"]), float(r["ms_min"]), float(r["ms_max"]))
        if s > SPREAD_LIMIT:
            wide.append((s, r))
    if wide:
        wide.sort(key=lambda t: -t[0])
        s, r = wide[0]
        out.append(f"{len(wide)} of {len(ok)} measurements spread widely (max - min > {SPREAD_LIMIT:.0%} of the "
                   f"median; worst {s:.0%}: {r.get('shape', '')} {r.get('pass', '')} {r.get('provider', '')}): "
                   f"the machine was not quiet; rerun on an idle machine with more repeats (--repeats 10) "
                   f"and compare providers within one run only")
    if device != "cpu":
        return out
    cores = before.get("cores") or usable_cores()
    threads = before.get("threads") or torch.get_num_threads()
    loads = []
    if before.get("load1") is not None:
        loads.append(before["load1"])
    if after and after.get("load1") is not None:
        loads.append(max(after["load1"] - threads, 0.0))
    others = max(loads) if loads else None
    if others is not None and others >= cores:
        out.append(f"load average {others:.1f} from other processes on {cores} usable cores: they compete "
                   f"for the CPU, times are inflated and noisy; rerun on an idle machine")
    if threads > cores:
        out.append(f"torch uses {threads} threads on {cores} usable cores (oversubscribed): use "
                   f"{threads_flag} {cores} or fewer")
    elif others is not None and threads > 1 and threads + others > cores + 0.5:
        free = max(1, int(cores - others + 0.5))
        out.append(f"torch's {threads} threads plus a load of {others:.1f} from other processes oversubscribe "
                   f"the {cores} usable cores (threads then wait for each other): use {threads_flag} {free}"
                   + (" (or 1)" if free > 1 else ""))
    return out


def format_warnings(warnings) -> list:
    return [f"warning: {w}" for w in warnings]
