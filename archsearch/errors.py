"""Errors a user can act on. The CLI prints them without a traceback and exits with 2."""

from __future__ import annotations

from collections.abc import Iterable


SHOWN_CHARS = 80
"""Longest quoted value in a message; longer ones are cut (a 5 MB list is not echoed)."""
PROBLEM_CHARS = 500
"""Longest single problem of a ConfigError."""
MAX_PROBLEMS = 50
"""Problems listed by one ConfigError; the rest are counted."""


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, for quoting bad input in a message. Large
    containers are cut before they are turned into text."""
    if isinstance(value, (list, tuple, dict, set)) and len(value) > limit:
        kind = type(value).__name__
        return f"<a {kind} of {len(value):,} items>"
    try:
        text = repr(value)
    except RecursionError:
        text = f"<a deeply nested {type(value).__name__}>"
    if len(text) > limit:
        text = text[: limit - 15] + f"... ({len(text):,} chars)"
    return text


def number_text(x: float) -> str:
    """A bound as a message prints it: integers with thousands separators (32,768), others in %g."""
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def bound_problem(where: str, value: float, low: float | None = None, high: float | None = None, *,
                  strict_low: bool = False, why: str = "", given: object = None) -> str | None:  # fmt: skip
    """The problem of a number outside its bounds ([low, high]; (low, high] with
    ``strict_low``), or None; ``why`` says why the upper limit is where it is, ``given`` is
    the value as written (default: ``value``). The one wording of bounds for run settings
    (config.py), space options (space.py) and family fields (families/)."""
    given = value if given is None else given
    if low is not None and (value <= low if strict_low else value < low):
        return f"{where}: must be {'>' if strict_low else '>='} {number_text(low)}, got {shown(given)}"
    if high is not None and value > high:
        return f"{where}: must be <= {number_text(high)}{f' ({why})' if why else ''}, got {shown(given)}"
    return None


class UserError(Exception):
    """Bad input or a missing resource the user must fix; exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """One or more problems in a space file, an override or an argument, all listed at once."""

    def __init__(self, problems: Iterable[str] | str, source: str | None = None):
        problems = [problems] if isinstance(problems, str) else list(problems)
        problems = [p if len(p) <= PROBLEM_CHARS else p[: PROBLEM_CHARS - 20] + f"... ({len(p):,} chars)" for p in problems]
        if len(problems) > MAX_PROBLEMS:
            problems = problems[:MAX_PROBLEMS] + [f"... and {len(problems) - MAX_PROBLEMS:,} more problems"]
        self.problems = problems
        self.source = source
        super().__init__(self._message())

    def _message(self) -> str:
        head = f"{self.source}: " if self.source else ""
        if len(self.problems) == 1:
            return f"{head}{self.problems[0]}"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{head}{len(self.problems)} problems:\n{lines}"

    def with_source(self, source: str) -> "ConfigError":
        return ConfigError(self.problems, source)


class DataUnavailable(UserError):
    """A data source, tokenizer or embedding cannot be read (offline, missing file, ...)."""


class DataCorrupted(Exception):
    """A prepared-data folder or a run-cache entry fails its fingerprint check."""


class FitError(UserError, ValueError):
    """A scaling fit was asked of input that cannot be fitted."""


class NonFiniteLoss(RuntimeError):
    """A training loss turned NaN or Inf; the run cannot give a meaningful PPL."""


def is_disk_full(e: BaseException) -> bool:
    """A write failed for want of space: ENOSPC (or EDQUOT) anywhere in the exception's chain,
    or SQLite's own words for it ("database or disk is full")."""
    import errno

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "database or disk is full" in text or "No space left on device" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation failed: CUDA's OutOfMemoryError, Python's MemoryError or the CPU
    allocator's RuntimeError, anywhere in the exception's chain (a failed CUDA-graph capture
    reports its own error with the OOM as its context)."""
    import torch

    oom = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if isinstance(e, oom) or "can't allocate memory" in text or "out of memory" in text.lower():
            return True
        e = e.__cause__ or e.__context__
    return False


CUDA_ERROR_MARKS = ("CUDA error", "[CUDA]", "CUDA driver error", "CUBLAS_STATUS_", "CUDNN_STATUS_")
"""How a CUDA failure reads: torch's ``CUDA error: ...``, Triton's ``Triton Error [CUDA]: ...``,
the driver API's, cuBLAS's and cuDNN's status codes."""


def is_cuda_failure(e: BaseException) -> bool:
    """A CUDA error other than out of memory, anywhere in the exception's chain (torch's
    AcceleratorError, or a message marked as CUDA's). Some are sticky (an illegal memory access,
    a device-side assert, an unspecified launch failure): the process's CUDA context is unusable
    and every later CUDA call fails. The message does not always tell which, so any CUDA error
    counts: a new worker process costs seconds, a broken one would fail every later trial."""
    import torch

    if is_out_of_memory(e):
        return False
    accel = getattr(torch, "AcceleratorError", None)
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (accel is not None and isinstance(e, accel)) or any(m in str(e) for m in CUDA_ERROR_MARKS):
            return True
        e = e.__cause__ or e.__context__
    return False
