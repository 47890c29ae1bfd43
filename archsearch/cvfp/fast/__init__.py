"""Fast drop-ins for the plain model and protocol, chosen by the run (run.py), never by them.

- ``layers.py``     fused LN(residual + ReLU(W [context, x] + b)) blocks (CUDA + Triton)
- ``head.py``       the fused tied-head cross-entropy (CUDA + Triton)
- ``graphs.py``     phase 2's stepper and evaluator as CUDA graphs, kept per thread
- ``recurrent.py``  the validation recurrence with the token half batched; its kernels
- ``kernels.py``    the Triton kernels themselves (imported only where Triton runs)
- ``device.py``     the capability check, GEMM probes, the one graph-capture helper

:func:`select` decides. A drop-in is used only where the module has exactly the standard
form of model.py (the exact classes); any other form runs on the plain path, and the run
says so once (a logging warning and a ``notice`` progress event).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from archsearch.config import RunConfig
from archsearch.cvfp.fast.device import triton_available
from archsearch.cvfp.fast.layers import FusedContextBlock, FusedTokenBlock, standard_context_block, standard_token_block


@dataclass
class Backends:
    context_block: nn.Module
    """What phase 1 and the training-context pass run: the plain ContextBlock or its fused view."""
    token_block: nn.Module
    """What phase 2 trains: the plain TokenBlock or its fused view (the same parameters)."""
    split_recurrence: bool
    """Validation pass through fast/recurrent.py (standard ContextLayers only)."""
    fast_phase2: bool
    """Phase 2 through fast/graphs.py (CUDA, standard TokenLayers)."""
    notices: list[str] = field(default_factory=list)


def _layer_names(block: nn.Module) -> str:
    names = sorted({type(layer).__name__ for layer in getattr(block, "layers", [])} or {type(block).__name__})
    return ", ".join(names)


def select(cblock: nn.Module, tblock: nn.Module, cfg: RunConfig, device: torch.device) -> Backends:
    """The backends of one run on ``device`` for these (already built) plain blocks."""
    std_c, std_t = standard_context_block(cblock), standard_token_block(tblock)
    fuse = cfg.engine.fused_layers and triton_available(device)
    notices = []
    if not std_c:
        notices.append(f"ContextBlock with {type(cblock).__name__}/{_layer_names(cblock)} is not the standard form: "
                       "phase 1 and the validation pass run on the plain path")  # fmt: skip
    if not std_t:
        notices.append(f"TokenBlock with {type(tblock).__name__}/{_layer_names(tblock)} is not the standard form: "
                       "phase 2 runs on the plain path")  # fmt: skip
    return Backends(
        context_block=FusedContextBlock(cblock) if std_c and fuse else cblock,
        token_block=FusedTokenBlock(tblock) if std_t and fuse else tblock,
        split_recurrence=std_c and cfg.engine.recurrent != "plain",
        fast_phase2=std_t and device.type == "cuda",
        notices=notices,
    )


__all__ = ["Backends", "select"]
