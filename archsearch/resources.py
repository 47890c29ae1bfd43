"""``resources.gpus: auto``: how many trials share one GPU (pure: no Ray, no Optuna, no torch).

Where the GPUs are fewer than the trials that may run at once, each trial gets 1/k of a GPU,
k the largest of 1..MAX_TRIALS_PER_GPU such that k processes of the space's largest run fit
in GPU_MEMORY_FRACTION of the smallest GPU, and no more than the trials can use
(k <= ceil(trials at once / GPUs)). A process's size is its family's estimate of the run's
peak allocation plus what an earlier run of the worker keeps (:func:`space_run_memory`),
times ALLOCATOR_MARGIN, plus CUDA_CONTEXT_BYTES. Without an estimate (a family that gives
none, a GPU whose memory the driver cannot see) it is one GPU per trial, as an explicit
``resources.gpus: 1`` always is. Each worker that shares a GPU caps its allocator at its share
(:func:`allocator_cap`, applied by archsearch.gpu_share in the worker).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any

from archsearch.errors import ConfigError

MAX_TRIALS_PER_GPU = 4
"""Trials auto puts on one GPU at most (4 at 0.25 GPU each was the fastest measured for the
report's grid on one H200, benchmarks/NOTES.md)."""
GPU_MEMORY_FRACTION = 0.85
"""Share of the smallest GPU's memory the trials on it may fill together."""
ALLOCATOR_MARGIN = 1.2
"""PyTorch's allocator holds more than it hands out (cached blocks, fragmentation, graph pools)."""
CUDA_CONTEXT_BYTES = 2**30
"""A process's CUDA context, kernels and libraries: device memory outside the allocator."""
MAX_CORNERS = 64
"""Combinations of a search's non-numeric choices (e.g. ``family``) that are estimated; beyond
it there is no estimate (one GPU per trial)."""


@dataclass(frozen=True)
class Sharing:
    """What auto decided, and why (the run prints :meth:`message` once and keeps :meth:`to_dict`)."""

    per_gpu: int
    """Trials on one GPU (1: each trial has a GPU of its own)."""
    gpus: float
    """GPUs per trial as handed to Ray (1 / per_gpu, rounded down to Ray's 1e-4 steps)."""
    reason: str
    process_bytes: int | None = None
    """The estimated device memory of one trial's process."""
    gpu_bytes: int | None = None
    """The smallest GPU's memory."""

    def message(self) -> str:
        if self.per_gpu == 1:
            size = f"estimated peak {_gib(self.process_bytes)} of {_gib(self.gpu_bytes, 0)}; " if self.process_bytes and self.gpu_bytes else ""
            return f"resources.gpus auto: 1 trial per GPU ({size}{self.reason})"
        return (f"resources.gpus auto: {self.per_gpu} trials per GPU: estimated peak {_gib(self.process_bytes)} each "
                f"of {_gib(self.gpu_bytes, 0)} ({self.reason}; resources.gpus=1 turns it off)")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _gib(n: int, digits: int = 1) -> str:
    return f"{n / 2**30:.{digits}f} GiB"


def process_bytes(peak: int, kept: int) -> int:
    """Device memory of a worker whose run allocates ``peak`` beside ``kept`` of an earlier run."""
    return int((peak + kept) * ALLOCATOR_MARGIN) + CUDA_CONTEXT_BYTES


MIN_CAP_BYTES = 256 * 2**20
"""The least a sharing worker's allocator is allowed (a share too small for its CUDA context
still gets this much: its runs then fail out_of_memory in that worker, as they would)."""


def allocator_cap(gpus: float, gpu_bytes: int) -> int:
    """Bytes the CUDA allocator of a worker holding ``gpus`` (< 1) of a GPU of ``gpu_bytes`` may
    reserve: its share of GPU_MEMORY_FRACTION of the GPU, less its CUDA context (outside the
    allocator). k workers at 1/k then hold at most GPU_MEMORY_FRACTION of it together, the
    budget :func:`trials_per_gpu` fits their estimates in (archsearch.gpu_share applies it)."""
    return max(MIN_CAP_BYTES, min(int(gpus * GPU_MEMORY_FRACTION * gpu_bytes) - CUDA_CONTEXT_BYTES, int(gpu_bytes)))


def gpus_for(per_gpu: int) -> float:
    """1 / per_gpu in Ray's resolution (1e-4), rounded down so that per_gpu trials fit on one GPU."""
    return 1.0 if per_gpu <= 1 else math.floor(1e4 / per_gpu) / 1e4


def trials_per_gpu(process: int | None, gpu_bytes: int | None, n_gpus: float, at_once: int) -> tuple[int, str]:
    """k trials per GPU for ``at_once`` trials at a time on ``n_gpus`` GPUs of at least
    ``gpu_bytes`` each, a trial's process taking ``process`` bytes (None: unknown), and why."""
    if n_gpus < 1 or at_once <= n_gpus:
        return 1, f"{at_once} trial{'s' * (at_once != 1)} at once on {n_gpus:g} GPU{'s' * (n_gpus != 1)}"
    if process is None:
        return 1, "no memory estimate"
    if not gpu_bytes:
        return 1, "the GPUs' memory is not known"
    fits = int(GPU_MEMORY_FRACTION * gpu_bytes // process)
    k = max(1, min(MAX_TRIALS_PER_GPU, math.ceil(at_once / n_gpus), fits))
    if k == fits and fits < MAX_TRIALS_PER_GPU:
        why = f"{k} fit in {GPU_MEMORY_FRACTION:.0%} of it"
    elif k == MAX_TRIALS_PER_GPU:
        why = f"at most {MAX_TRIALS_PER_GPU} per GPU"
    else:
        why = f"{at_once} trials at once on {n_gpus:g} GPU{'s' * (n_gpus != 1)}"
    return k, why


def _largest(dist) -> list[Any]:
    """The values of a searched distribution that make the largest run: its high end (numbers),
    or every choice of a categorical that is not all numbers."""
    if dist.type == "categorical":
        numbers = [c for c in dist.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
        return [max(numbers)] if len(numbers) == len(dist.choices) else list(dist.choices)
    return [int(dist.high) if dist.type == "int" else dist.high]


def candidate_configs(space) -> list[dict[str, Any]] | None:
    """The configs whose runs bound a space's memory: every named config (a grid's points, a
    search's warm start) and for a search the corner of its parameters' largest values (each
    combination of non-numeric choices); the base where there is neither. None when there are
    too many combinations."""
    out = list(space.configs.values())
    if space.parameters and not space.is_grid:
        names = list(space.parameters)
        values = [_largest(space.parameters[n]) for n in names]
        if math.prod(len(v) for v in values) > MAX_CORNERS:
            return None
        out += [dict(zip(names, combo)) for combo in itertools.product(*values)]
    return out or [{}]


def space_run_memory(space, train_tokens: list[int], val_tokens: int, vocab_size: int, embed_dim: int) -> tuple[int | None, str]:
    """(process bytes of a worker of this space, what it rests on), or (None, why not);
    ``train_tokens``: the sizes' training-token counts (each run of every seed is counted). A worker may run any config after any
    other, so it is the largest trial's peak plus the largest of what a trial keeps
    (:func:`process_bytes`)."""
    configs = candidate_configs(space)
    if configs is None:
        return None, f"more than {MAX_CORNERS} combinations of the searched choices"
    peak = kept = 0
    runs = [n for n in train_tokens for _ in getattr(space, "seeds", [0])]  # a trial's runs: its sizes times its seeds
    for params in configs:
        try:
            cfg = space.run_config(params)
        except ConfigError:  # a corner of the search that is not a valid config: never run
            continue
        if cfg.family == "cvfp" and cfg.engine.stage_sizes == "auto" and space.early_stopping.get("pruner", "none") != "none":
            cfg = cfg.replace(**{"engine.stage_sizes": False})  # auto stages no trial a pruner may stop (families/cvfp.stage_sizes)
        family = cfg.family_object()
        estimate = getattr(family, "gpu_memory", None)
        if estimate is None:
            return None, f"family {cfg.family!r} gives no memory estimate"
        try:
            p, k = estimate(cfg.family_config, runs, val_tokens, vocab_size, embed_dim)
            p, k = int(p), int(k)
        except Exception as e:  # a family's own code: its failure costs the sharing, not the run
            return None, f"family {cfg.family!r}: gpu_memory raised {type(e).__name__}: {str(e)[:200]}"
        peak, kept = max(peak, p), max(kept, k)
    return process_bytes(peak, kept), f"{len(configs)} config{'s' * (len(configs) != 1)} up to {max(train_tokens):,} tokens"


def resolve_auto(space, n_gpus: float, gpu_bytes: int | None, at_once: int, sizes: tuple[list[int], int, int, int] | None) -> Sharing:
    """``resources.gpus: auto`` on a cluster of ``n_gpus`` GPUs (>= 1) whose smallest has
    ``gpu_bytes`` (None: unknown), ``at_once`` trials at a time; ``sizes`` = (the sizes'
    training tokens, validation tokens, V, E) of the data."""
    if n_gpus >= at_once or n_gpus < 1:
        k, why = trials_per_gpu(None, gpu_bytes, n_gpus, at_once)
        return Sharing(k, gpus_for(k), why, None, gpu_bytes)
    process, rests_on = space_run_memory(space, *sizes) if sizes else (None, "no data sizes")
    if process is None:
        return Sharing(1, 1.0, rests_on, None, gpu_bytes)
    k, why = trials_per_gpu(process, gpu_bytes, n_gpus, at_once)
    return Sharing(k, gpus_for(k), f"{why}; the largest of {rests_on}", process, gpu_bytes)
