"""Where a command's wall time goes: contiguous perf_counter laps (pure: no torch, Ray or Optuna).

``archsearch run --json`` writes its laps as ``timings``: each part starts where the one
before it ended, and the first starts at the process's start, so their sum is the time from
the process's start to the writing of the JSON (what is left of the wall time is the
interpreter's exit). A part that runs beside the others in a thread (``data``, ...) is
recorded on its own and is not one of the laps (:data:`OVERLAPPED`).
"""

from __future__ import annotations

import os
import time

OVERLAPPED = ("data", "gpu_memory", "warm_imports", "late_imports")
"""Timings keys that run in a thread beside the laps, not part of the laps' sum: the data's
preparation, the GPUs' memory (a child process) and the imports of what comes next, all three
while Ray starts, and the imports a trial's end needs (beside Ray Tune's start)."""


def process_start() -> float:
    """This process's start on :func:`time.perf_counter`'s clock: Linux's start time of the
    process (/proc/self/stat, in clock ticks of 10 ms since boot, against CLOCK_BOOTTIME);
    elsewhere, or if /proc cannot be read, now (the laps then miss the interpreter's start)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter()
    return time.perf_counter() - max(0.0, age)


class Laps:
    """Contiguous laps into ``into`` (a dict of seconds): ``lap(name)`` records the time since
    the previous lap (or ``start``) under ``name`` (added to what the name holds already)."""

    def __init__(self, into: dict[str, float] | None = None, start: float | None = None):
        self.into = {} if into is None else into
        self.last = time.perf_counter() if start is None else start

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        seconds = now - self.last
        self.into[name] = self.into.get(name, 0.0) + seconds
        self.last = now
        return seconds
