"""One CVFP run: device and precision resolved once, modules built, backends picked, phases
timed, a typed :class:`~archsearch.result.RunResult` returned.

The protocol itself is phases.py; the model is model.py; the fast drop-ins are chosen here
(fast.select) and nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from archsearch.config import ModelConfig, RunConfig, param_counts, resolve_precision
from archsearch.cvfp import fast
from archsearch.cvfp.fast.device import CAPTURE_LOCK, sync
from archsearch.cvfp.metrics import effective_rank
from archsearch.cvfp.model import ContextBlock, TokenBlock, TokenEmbedding, init_parameters
from archsearch.cvfp.phases import EagerEvaluator, EagerStepper, Progress, noop, train_context_cache, train_phase1, train_phase2, val_context_cache
from archsearch.cvfp.precision import gemm_dtype
from archsearch.result import RunResult

log = logging.getLogger(__name__)

BuildBlocks = Callable[[ModelConfig, int], tuple[nn.Module, nn.Module]]


def standard_blocks(m: ModelConfig, embed_dim: int) -> tuple[nn.Module, nn.Module]:
    """The model of cvfp.md: (ContextBlock, TokenBlock)."""
    return ContextBlock(m, embed_dim), TokenBlock(m, embed_dim)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def train_run(
    cfg: RunConfig,
    embedding: torch.Tensor,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    seed: int,
    device: str | torch.device = "cpu",
    progress: Progress = noop,
    keep_tensors: bool = False,
    *,
    build_blocks: BuildBlocks = standard_blocks,
) -> RunResult:
    """Train one architecture on one training stream (cvfp.md 4-7).

    ``embedding`` (V, E) is the frozen pretrained matrix; ``train_ids`` (N,) and ``val_ids``
    (M,) are token-id streams. Deterministic for a given seed on a given device.
    ``keep_tensors`` puts the final contexts and both caches in ``result.tensors`` (tests).
    ``build_blocks(model_cfg, E)`` makes the (ContextBlock, TokenBlock) pair: a variant form
    trains on the plain path (with a notice)."""
    device = torch.device(device)
    if device.type == "cuda":
        # Triton kernels and CUDA graphs work on the current device: make it this run's
        with torch.cuda.device(device.index if device.index is not None else torch.cuda.current_device()):
            here = torch.device("cuda", torch.cuda.current_device())
            return _train_run(cfg, embedding, train_ids, val_ids, seed, here, progress, keep_tensors, build_blocks)
    return _train_run(cfg, embedding, train_ids, val_ids, seed, device, progress, keep_tensors, build_blocks)


def _train_run(cfg, embedding, train_ids, val_ids, seed, device, progress, keep_tensors, build_blocks) -> RunResult:
    if device.type == "cpu":
        # softmax gradients of a 30k-50k vocabulary are full of denormal floats, which make
        # CPU matrix products ~20x slower; flushing them to zero changes nothing measurable
        torch.set_flush_denormal(True)
    N, M = int(train_ids.shape[0]), int(val_ids.shape[0])
    if N < 3 or M < 2:
        raise ValueError(f"a run needs at least 3 training and 2 validation tokens, got {N} and {M}")
    seed_everything(seed)
    cfg = cfg.replace(**{"engine.precision": resolve_precision(cfg.engine.precision, device.type)})
    m = cfg.model
    V, E = int(embedding.shape[0]), int(embedding.shape[1])
    t_start = time.perf_counter()

    # the (V, E) table goes to the device first, so that its LayerNorm runs there, not on the host
    emb = TokenEmbedding(embedding.to(device), m.num_input_tokens, m.layernorm_eps)
    g_init = torch.Generator().manual_seed(seed)
    with torch.device("meta"):  # no default initialisation: init_parameters sets every parameter
        cblock, tblock = build_blocks(m, E)
    cblock.to_empty(device=device), tblock.to_empty(device=device)
    init_parameters(cblock, m, g_init)
    init_parameters(tblock, m, g_init)
    g_run = torch.Generator(device=device).manual_seed(seed)
    g_er = torch.Generator().manual_seed(seed)
    backends = fast.select(cblock, tblock, cfg, device)
    for notice in backends.notices:
        log.warning("cvfp: %s", notice)
        progress("notice", message=notice)

    train_ids = train_ids.to(device=device, dtype=torch.long)
    val_ids = val_ids.to(device=device, dtype=torch.long)
    train_win, val_win = emb.windows(train_ids), emb.windows(val_ids)  # (N, k), (M, k)

    sync(device)
    t0 = time.perf_counter()
    p1 = train_phase1(backends.context_block, emb, train_win, cfg, g_run, progress)
    sync(device)
    t1 = time.perf_counter()

    cblock.requires_grad_(False)
    progress("contexts")
    train_cache = train_context_cache(backends.context_block, emb, train_win, p1.contexts, cfg)  # (L, N-1, C)
    sync(device)
    t_val = time.perf_counter()
    if backends.split_recurrence:
        from archsearch.cvfp.fast.recurrent import recurrent_pass

        val_cache = recurrent_pass(cblock, emb, val_win[:-1], cfg)  # (L, M-1, C)
    else:
        val_cache = val_context_cache(cblock, emb, val_win[:-1], cfg)  # (L, M-1, C)
    train_p2 = (train_win[:-1], train_ids[1:], train_cache)
    val_p2 = (val_win[:-1], val_ids[1:], val_cache)
    session, prep_secs = None, 0.0
    if backends.fast_phase2:
        from archsearch.cvfp.fast import graphs

        t_prep = time.perf_counter()
        session = graphs.prepare_phase2(backends.token_block, emb, train_p2, val_p2, cfg)  # CPU work while the GPU runs the recurrent pass
        prep_secs = time.perf_counter() - t_prep
    sync(device)
    t2 = time.perf_counter()
    with CAPTURE_LOCK if device.type == "cuda" else contextlib.nullcontext():
        train_er = effective_rank(p1.contexts, cfg.engine.er_max_rows, g_er)
        val_er = effective_rank(val_cache[-1], cfg.engine.er_max_rows, g_er)
    sync(device)
    t_er = time.perf_counter()
    tensors = {"contexts": p1.contexts, "train_cache": train_cache, "val_cache": val_cache} if keep_tensors else None
    del p1.contexts

    if backends.fast_phase2:
        step, evaluate = graphs.phase2_backends(backends.token_block, emb, train_p2, val_p2, cfg, session)
    else:
        head = emb.weight.to(gemm_dtype(cfg.engine.precision))  # (V, E)
        step, evaluate = EagerStepper(tblock, emb, head, cfg, train_p2), EagerEvaluator(tblock, emb, head, cfg, val_p2)
    p2 = train_phase2(step, evaluate, N - 1, cfg, progress)  # a kept GPU session trains a copy of its own
    del session, step, evaluate, train_p2, val_p2
    sync(device)
    t3 = time.perf_counter()

    p1_secs, p2_secs = t1 - t0, t3 - t_er
    counts = param_counts(m, E)
    capped = []
    if p1.iterations >= cfg.phase1.max_iterations and p1.convergence_rate < cfg.phase1.min_converged_fraction:
        capped.append("phase1_max_iterations")
    if p2.best_epoch == cfg.phase2.max_epochs:
        capped.append("max_epochs")
    result = RunResult(
        family="cvfp",
        seed=seed,
        train_tokens=N,
        val_tokens=M,
        val_loss=p2.val_loss,
        val_loss_se=p2.val_loss_se,
        val_ppl=p2.val_ppl,
        val_acc=p2.val_acc,
        params={"phase1": counts["phase1_params"], "phase2": counts["phase2_params"], "total": counts["total_params"]},
        seconds=time.perf_counter() - t_start,
        device=device_name(device),
        precision=cfg.engine.precision,
        phase_seconds={"phase1": p1_secs, "contexts": t2 - t1, "er": t_er - t2, "phase2": p2_secs},
        capped=capped,
        metrics={
            "train_er": train_er,
            "val_er": val_er,
            "phase1_iterations": p1.iterations,
            "phase1_convergence_rate": p1.convergence_rate,
            "phase2_best_epoch": p2.best_epoch,
            "phase2_stopped_epoch": p2.stopped_epoch,
            "phase1_tokens_per_s": N * (p1.iterations - 1) / p1_secs if p1_secs > 0 else math.nan,
            "phase2_tokens_per_s": (N - 1 + M - 1) * p2.stopped_epoch / p2_secs if p2_secs > 0 else math.nan,
            # includes the GPU work of phase 2's preparation (a new session's warm-up step: a few ms)
            "val_step_us": (t2 - t_val) / (M - 1) * 1e6,
            "phase2_prepare_seconds": prep_secs,  # CPU time, overlapped with the recurrent pass
            "embed_dim": E,
            "vocab_size": V,
        },
        history={"phase1": p1.history, "phase2": p2.history},
    )
    if tensors is not None:
        result.tensors = tensors
    return result
