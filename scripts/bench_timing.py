"""The benchmarks' timing loop of a GPU call (profile_gpu.py, bench_phase1.py, bench_recurrent.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], reps: int, warmup: int = 2, prep: Callable[[], object] | None = None, cuda: bool = True) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls, after ``warmup`` calls not timed;
    ``prep()`` (not timed) runs before every call. On CUDA a call is timed by two events around
    it on the current stream, from an idle device (a synchronize after the warm-ups and after
    each call); with ``cuda`` false (a CPU smoke test of a script) by the wall clock."""
    for _ in range(warmup):
        if prep is not None:
            prep()
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if prep is not None:
            prep()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]
