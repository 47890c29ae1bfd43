"""The one place that turns a run's ``engine.precision`` into arithmetic (pure torch).

fp32: plain float32 products. tf32: float32 tensors, TF32 matrix units. bf16: autocast
(bf16 products, fp32 master weights, LayerNorms and losses). ``auto`` is resolved once per
run (``config.resolve_precision``: bf16 on CUDA, fp32 elsewhere) before anything here runs.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def precision_scope(precision: str, device: torch.device, cache_enabled: bool = True):
    """Run the enclosed products in ``precision`` (autocast's cast cache must be off inside a
    CUDA-graph capture: ``cache_enabled=False`` there)."""
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled):
            yield
        return
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def gemm_dtype(precision: str) -> torch.dtype:
    """The dtype the layers' and the head's products take their inputs in."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes Linears in on this device type now, or None where it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
