"""What the device can do, and the one way graphs are captured on it.

- :func:`triton_available`: the one capability check ("CUDA device and Triton installed").
- :func:`gemm_caps`: what this build's CUDA GEMMs can write (probed once per device).
- :func:`sm_count`: the device's multiprocessor count (the kernels' grids).
- :data:`CAPTURE_LOCK` and :func:`graph_capture`: every CUDA-graph capture goes through them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import threading

import torch


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device`` (a CUDA device, Triton installed)."""
    return device.type == "cuda" and _have_triton()


_GEMM_CAPS: dict = {}


def gemm_caps(device: torch.device) -> tuple[bool, bool]:
    """(whether this build's CUDA GEMMs write fp32 from bf16 operands (``out_dtype``, torch 2.8+),
    whether such an addmm may write into its own fp32 addend, sparing the copy of it)."""
    if device not in _GEMM_CAPS:
        a = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
        try:
            torch.mm(a, a, out_dtype=torch.float32)
            torch.addmm(torch.zeros(16, 16, device=device), a, a, out_dtype=torch.float32)
            f32_out = True
        except (RuntimeError, TypeError):
            f32_out = False
        in_place = False
        if f32_out:
            try:
                c = torch.ones(16, 16, device=device)
                torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
                in_place = bool((c == 17.0).all())
            except (RuntimeError, TypeError):
                pass
        _GEMM_CAPS[device] = (f32_out, in_place)
    return _GEMM_CAPS[device]


_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    """The device's multiprocessor count, asked once per device (2 off CUDA: Triton's
    interpreter, in the CPU tests)."""
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return _SM_COUNT[device]


CAPTURE_LOCK = threading.Lock()
"""Held while a CUDA graph is captured and around calls that may synchronise the whole
device (cuSOLVER's eigensolver, of the effective ranks): several runs may share a GPU from threads of
one process."""

_CAPTURE_STREAMS: dict = {}


@contextlib.contextmanager
def graph_capture(graph: torch.cuda.CUDAGraph):
    """Capture ``graph`` from the work issued inside, like ``torch.cuda.graph`` but without
    the device-wide synchronize and ``empty_cache`` that it does first: those cost tens of
    milliseconds per capture and hand the allocator's cached blocks back to the driver, to be
    allocated again. Captured on a side stream ordered after the current one (as
    torch.cuda.graph does); replays run on whatever stream is current then. Serialised by
    CAPTURE_LOCK; the capture mode is thread-local, so other threads may launch meanwhile."""
    device = torch.cuda.current_device()
    current = torch.cuda.current_stream(device)
    with CAPTURE_LOCK:
        side = _CAPTURE_STREAMS.setdefault(device, torch.cuda.Stream(device))
        side.wait_stream(current)
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                yield graph
            finally:
                graph.capture_end()
        current.wait_stream(side)


def sync(device: torch.device) -> None:
    """Wait for this run's GPU work (its stream only: other runs may share the GPU)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
