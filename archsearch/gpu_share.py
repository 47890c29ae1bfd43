"""A trial worker's share of a GPU that it shares with others (torch only: no Ray, no Optuna).

Where ``resources.gpus`` is below 1 (auto's 1/k, or a fractional number), k workers run on one
GPU. Each caps its own CUDA caching allocator before its first allocation
(:func:`configure_worker`): it may reserve at most ``gpus`` x GPU_MEMORY_FRACTION of the GPU's
memory less its CUDA context (:func:`archsearch.resources.allocator_cap`), so that one trial
cannot starve the others: an allocation beyond it fails in that worker only, as an
out-of-memory error, which the trial's fallbacks handle (a staged trial's runs one after
another, a run retried once without the kept phase-2 session, else the trial fails
``out_of_memory``). The engine's memory-dependent choices (how many staged runs, how many
recurrent passes per launch) read :func:`available_bytes`, which honours the cap.

Such a worker also runs PyTorch's allocator with ``expandable_segments:True`` unless the user
set ``PYTORCH_ALLOC_CONF`` / ``PYTORCH_CUDA_ALLOC_CONF`` themselves (theirs is kept as it is):
without it the allocator's reserved memory, what the other processes on the GPU lose, was
up to 1.7x what the runs allocated on an H200 (one segment per size of tensor, the sizes of
a trial differing); expandable segments grow one segment per stream instead, so freed memory
of one run's tensors serves the next run's larger ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping
from dataclasses import asdict, dataclass
from typing import Any

from archsearch.resources import allocator_cap

ALLOC_CONF = "expandable_segments:True"
"""The allocator setting of a worker that shares its GPU (unless the user has their own)."""
ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
"""Where PyTorch reads its allocator settings (the first is the newer name)."""

_CAPS: dict[int, int] = {}
"""Bytes the allocator may reserve, per device index, as :func:`configure_worker` set them (the
fallback where torch cannot report its per-process fraction)."""


@dataclass(frozen=True)
class WorkerShare:
    """What :func:`configure_worker` did (the worker records it with its trial)."""

    gpus: float
    """The worker's share of a GPU as Ray handed it."""
    cap_bytes: int | None
    """Bytes its allocator may reserve (None: no cap)."""
    fraction: float | None
    """The same as passed to torch.cuda.set_per_process_memory_fraction."""
    alloc_conf: str | None
    """The allocator settings in force: ours, the user's, or None (PyTorch's defaults)."""
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def user_alloc_conf(environ: MutableMapping[str, str] | None = None) -> str | None:
    environ = os.environ if environ is None else environ
    return next((environ[v] for v in ALLOC_CONF_VARS if environ.get(v)), None)


def set_alloc_conf(environ: MutableMapping[str, str] | None = None, apply: Callable[[str], Any] | None = None) -> tuple[str, bool]:
    """Expandable segments for this process unless the user chose settings: (the settings in
    force, whether they are ours). Sets ``PYTORCH_CUDA_ALLOC_CONF`` (read when CUDA starts in
    this process, and by its children) and, where torch is imported, its runtime setter (the
    variable alone is too late where torch parsed it at import)."""
    environ = os.environ if environ is None else environ
    own = user_alloc_conf(environ)
    if own is not None:
        return own, False
    environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF
    if apply is None:
        import torch

        # torch 2.9+ names it in torch._C (torch.cuda.memory's wrapper warns there); older builds have the wrapper only
        apply = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if apply is not None:
        try:
            apply(ALLOC_CONF)
        except Exception:  # an old build without the runtime setter: the variable does it at CUDA's start
            pass
    return ALLOC_CONF, True


def configure_worker(gpus: float, device: int | None = None, *, environ: MutableMapping[str, str] | None = None,
                     total_memory: Callable[[int], int] | None = None, set_fraction: Callable[[float, int], Any] | None = None,
                     apply_conf: Callable[[str], Any] | None = None, cuda: bool | None = None) -> WorkerShare:  # fmt: skip
    """Before a trial's first CUDA allocation in a worker holding ``gpus`` of a GPU: where that
    is below 1, the allocator settings (:func:`set_alloc_conf`) and the cap
    (``torch.cuda.set_per_process_memory_fraction``). The keyword arguments stand in for torch
    (tests)."""
    if not 0 < gpus < 1:
        return WorkerShare(gpus, None, None, user_alloc_conf(environ), "a GPU of its own (or none): no cap")
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        return WorkerShare(gpus, None, None, user_alloc_conf(environ), "no CUDA device in this worker")
    conf, _ours = set_alloc_conf(environ, apply_conf)
    if total_memory is None or set_fraction is None or device is None:
        import torch

        device = torch.cuda.current_device() if device is None else device
        total_memory = total_memory or (lambda d: torch.cuda.get_device_properties(d).total_memory)
        set_fraction = set_fraction or (lambda f, d: torch.cuda.set_per_process_memory_fraction(f, d))
    total = int(total_memory(device))
    cap = allocator_cap(gpus, total)
    fraction = set_cap(cap, device, total, set_fraction)
    return WorkerShare(gpus, cap, fraction, conf, f"{gpus:g} of the GPU: at most {cap / 2**30:.1f} GiB for its allocator")


def set_cap(cap: int | None, device: int, total: int, set_fraction: Callable[[float, int], Any] | None = None) -> float:
    """Cap this process's allocator on ``device`` (of ``total`` bytes) at ``cap`` bytes (None:
    no cap); returns the fraction passed to torch.cuda.set_per_process_memory_fraction."""
    if set_fraction is None:
        import torch

        def set_fraction(f, d):
            torch.cuda.set_per_process_memory_fraction(f, d)

    fraction = 1.0 if cap is None else min(1.0, cap / total)
    set_fraction(fraction, device)
    if cap is None:
        _CAPS.pop(device, None)
    else:
        _CAPS[device] = cap
    return fraction


def memory_cap(device) -> int | None:
    """Bytes this process's allocator may reserve on ``device`` (a CUDA torch.device), or None
    where uncapped: torch's per-process fraction where it reports one, else what
    :func:`configure_worker` set."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if get is not None:
        try:
            fraction = float(get(index))
        except Exception:
            fraction = None
        if fraction is not None:
            return int(fraction * torch.cuda.get_device_properties(index).total_memory) if fraction < 1 else None
    return _CAPS.get(index)


def available_bytes(device, *, info: Callable[[], tuple[int, int, int, int, int | None]] | None = None) -> int:
    """Bytes this process can still allocate on a CUDA ``device``: free on the device plus the
    allocator's cached blocks, and no more than its cap leaves (cap - allocated). ``info``
    (tests) returns (free, total, reserved, allocated, cap)."""
    if info is None:
        import torch

        free, total = torch.cuda.mem_get_info(device)
        reserved, allocated, cap = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device), memory_cap(device)
    else:
        free, total, reserved, allocated, cap = info()
    avail = free + reserved - allocated
    if cap is not None:
        avail = min(avail, cap - allocated)
    return max(0, int(avail))
