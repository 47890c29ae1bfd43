"""One CVFP run: device and precision resolved once, modules built, backends picked, phases
timed, a typed :class:`~archsearch.result.RunResult` returned.

A run goes in three stages, so that the runs of one trial (its sizes and seeds: one model
shape, one validation stream) can share the latency-bound middle one:

    start(...)                   set-up and phase 1                      -> StartedRun
    validation_contexts(runs)    the recurrent validation pass of every started run, in one
                                 recurrent_passes call (the first run's train cache and
                                 phase-2 session are prepared meanwhile)
    finish(run)                  train cache, effective ranks, phase 2   -> RunResult

:func:`train_run` is the three for one run; :func:`train_staged` the three for a trial's runs,
in groups that fit the device's memory. The protocol itself is phases.py; the model is
model.py; the fast drop-ins are chosen here (fast.select) and nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from archsearch.config import ModelConfig, RunConfig, param_counts, resolve_precision
from archsearch.cvfp import fast
from archsearch.cvfp.fast.device import CAPTURE_LOCK, sync
from archsearch.cvfp.memory import held_bytes
from archsearch.cvfp.metrics import effective_rank
from archsearch.cvfp.model import ContextBlock, TokenBlock, TokenEmbedding, init_parameters
from archsearch.cvfp.phases import EagerEvaluator, EagerStepper, Phase1Result, Progress, noop, train_context_cache, train_phase1, train_phase2, val_context_cache
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
    run = start(cfg, embedding, train_ids, val_ids, seed, device, progress, keep_tensors, build_blocks=build_blocks)
    validation_contexts([run])
    return finish(run)


# --------------------------------------------------------------------------- the stages


@dataclass
class StartedRun:
    """A run after :func:`start` (set-up and phase 1), until :func:`finish`. It holds, on its
    device, the (N, C) fp32 final contexts, its blocks (the ContextBlock with its phase-1
    gradients) and, after :func:`validation_contexts`, the (L, M-1, C) fp32 validation cache
    (:func:`held_bytes`); the (L, N-1, C) train cache is built in :func:`finish` (the first run
    of a :func:`validation_contexts` call builds it there, for the overlap)."""

    cfg: RunConfig
    seed: int
    device: torch.device
    progress: Progress
    keep_tensors: bool
    emb: TokenEmbedding
    cblock: nn.Module
    tblock: nn.Module
    backends: fast.Backends
    g_er: torch.Generator
    """The effective ranks' generator, first drawn from in finish (draw order as one run alone)."""
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    train_win: torch.Tensor
    """(N, k) windows of the training stream."""
    val_win: torch.Tensor
    """(M, k) windows of the validation stream (shared by the runs of a trial, like ``emb``)."""
    p1: Phase1Result
    sources: tuple[torch.Tensor, torch.Tensor]
    """The caller's embedding and validation ids: a later run given the same ones shares ``emb``
    and ``val_win`` (:func:`start`'s ``like``)."""
    seconds: float
    """Wall seconds this run has taken so far (its share of a shared stage included)."""
    phase_seconds: dict[str, float] = field(default_factory=dict)
    val_cache: torch.Tensor | None = None
    train_cache: torch.Tensor | None = None
    session: Any = None
    prep_secs: float = 0.0
    val_step_us: float = math.nan
    """Seconds per step of the recurrent pass this run's validation went through (shared by
    every run of that pass), in microseconds."""


def _resolved(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _on(device: torch.device):
    """Triton kernels and CUDA graphs work on the current device: make it this run's."""
    return torch.cuda.device(device.index) if device.type == "cuda" else contextlib.nullcontext()


def start(
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
    like: StartedRun | None = None,
) -> StartedRun:
    """Set-up and phase 1 of one run (:func:`train_run`'s arguments). ``like``: a started run
    of the same trial; where it was given the very same ``embedding`` and ``val_ids`` tensors
    and the same model config, its token table and validation windows are shared (they are
    a deterministic function of those: the numbers do not change, the memory is held once)."""
    device = _resolved(device)
    with _on(device):
        return _start(cfg, embedding, train_ids, val_ids, seed, device, progress, keep_tensors, build_blocks, like)


def _start(cfg, embedding, train_ids, val_ids, seed, device, progress, keep_tensors, build_blocks, like) -> StartedRun:
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
    E = int(embedding.shape[1])
    t_start = time.perf_counter()

    shared = like is not None and like.sources[0] is embedding and like.sources[1] is val_ids and like.cfg.model == m and like.device == device
    if shared:
        emb = like.emb
    else:
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

    train_dev = train_ids.to(device=device, dtype=torch.long)
    val_dev = val_ids.to(device=device, dtype=torch.long)
    train_win = emb.windows(train_dev)  # (N, k)
    val_win = like.val_win if shared else emb.windows(val_dev)  # (M, k)

    sync(device)
    t0 = time.perf_counter()
    p1 = train_phase1(backends.context_block, emb, train_win, cfg, g_run, progress)
    sync(device)
    t1 = time.perf_counter()
    cblock.requires_grad_(False)
    return StartedRun(cfg=cfg, seed=seed, device=device, progress=progress, keep_tensors=keep_tensors, emb=emb, cblock=cblock,
                      tblock=tblock, backends=backends, g_er=g_er, train_ids=train_dev, val_ids=val_dev, train_win=train_win,
                      val_win=val_win, p1=p1, sources=(embedding, val_ids), seconds=t1 - t_start,
                      phase_seconds={"phase1": t1 - t0, "contexts": 0.0})  # fmt: skip


def _train_cache(run: StartedRun) -> None:
    run.train_cache = train_context_cache(run.backends.context_block, run.emb, run.train_win, run.p1.contexts, run.cfg)  # (L, N-1, C)


def _phase2_data(run: StartedRun):
    """(windows, targets, context cache) of phase 2's training and validation positions."""
    return (run.train_win[:-1], run.train_ids[1:], run.train_cache), (run.val_win[:-1], run.val_ids[1:], run.val_cache)


def _prepare_phase2(run: StartedRun) -> None:
    if run.backends.fast_phase2:
        from archsearch.cvfp.fast import graphs

        t_prep = time.perf_counter()
        run.session = graphs.prepare_phase2(run.backends.token_block, run.emb, *_phase2_data(run), run.cfg)
        run.prep_secs = time.perf_counter() - t_prep


def _pass_key(run: StartedRun) -> tuple:
    """Runs whose recurrent passes can go in one call: one token table, one validation stream,
    one model shape and engine."""
    return (id(run.emb), id(run.val_win), repr(run.cfg.model), repr(run.cfg.engine))


def validation_contexts(runs: list[StartedRun]) -> None:
    """The (L, M-1, C) validation cache of every started run: the runs on the split recurrence
    (standard ContextBlocks) in one ``recurrent_passes`` call per token table and shape (a trial's
    runs: one call), the others by the plain step-by-step pass. The first run's train cache is
    built before, and its phase-2 session prepared while the GPU runs the passes (CPU work: a
    new session's warm-up step and captures). The pass's time is shared among its runs."""
    if not runs:
        return
    device = runs[0].device
    with _on(device):
        _validation_contexts(runs, device)


def _validation_contexts(runs: list[StartedRun], device: torch.device) -> None:
    for run in runs:
        run.progress("contexts")
    first = runs[0]
    t_enter = time.perf_counter()
    _train_cache(first)
    sync(device)
    t_val = time.perf_counter()
    groups: dict[tuple, list[StartedRun]] = {}
    for run in runs:
        if run.backends.split_recurrence:
            groups.setdefault(_pass_key(run), []).append(run)
        else:
            run.val_cache = val_context_cache(run.cblock, run.emb, run.val_win[:-1], run.cfg)  # (L, M-1, C)
    if groups:
        from archsearch.cvfp.fast.recurrent import recurrent_passes

        for group in groups.values():
            caches = recurrent_passes([r.cblock for r in group], group[0].emb, group[0].val_win[:-1], group[0].cfg)  # R x (L, M-1, C)
            for run, cache in zip(group, caches):
                run.val_cache = cache
    _prepare_phase2(first)  # CPU work while the GPU runs the recurrent passes
    sync(device)
    t2 = time.perf_counter()
    share = (t2 - t_val) / len(runs)
    M = int(first.val_ids.shape[0])
    for run in runs:
        run.phase_seconds["contexts"] += share
        run.seconds += share
        run.val_step_us = (t2 - t_val) / (M - 1) * 1e6
    first.phase_seconds["contexts"] += t_val - t_enter
    first.seconds += t_val - t_enter


def finish(run: StartedRun) -> RunResult:
    """Train cache (where not built yet), effective ranks and phase 2 of a run whose validation
    cache :func:`validation_contexts` made: the RunResult. The run's tensors are released
    (the StartedRun keeps none of them)."""
    if run.val_cache is None:
        raise ValueError("finish: the run has no validation cache yet (validation_contexts first)")
    with _on(run.device):
        return _finish(run)


def _finish(run: StartedRun) -> RunResult:
    cfg, device, p1, progress = run.cfg, run.device, run.p1, run.progress
    m = cfg.model
    N, M = int(run.train_ids.shape[0]), int(run.val_ids.shape[0])
    V, E = int(run.emb.weight.shape[0]), int(run.emb.weight.shape[1])
    t_enter = time.perf_counter()
    # no CVFP code draws from the global generators, but should some library code do so, a
    # staged finish sees them as its own run alone does, not as the last run started left them
    seed_everything(run.seed)
    if run.train_cache is None:
        _train_cache(run)
        _prepare_phase2(run)
    sync(device)
    t2 = time.perf_counter()
    with CAPTURE_LOCK if device.type == "cuda" else contextlib.nullcontext():
        train_er = effective_rank(p1.contexts, cfg.engine.er_max_rows, run.g_er)
        val_er = effective_rank(run.val_cache[-1], cfg.engine.er_max_rows, run.g_er)
    sync(device)
    t_er = time.perf_counter()
    tensors = {"contexts": p1.contexts, "train_cache": run.train_cache, "val_cache": run.val_cache} if run.keep_tensors else None
    train_p2, val_p2 = _phase2_data(run)
    session = run.session
    run.train_cache = run.val_cache = run.session = None  # the run's tensors live in this frame only
    del p1.contexts

    if run.backends.fast_phase2:
        from archsearch.cvfp.fast import graphs

        step, evaluate = graphs.phase2_backends(run.backends.token_block, run.emb, train_p2, val_p2, cfg, session)
    else:
        head = run.emb.weight.to(gemm_dtype(cfg.engine.precision))  # (V, E)
        step, evaluate = EagerStepper(run.tblock, run.emb, head, cfg, train_p2), EagerEvaluator(run.tblock, run.emb, head, cfg, val_p2)
    p2 = train_phase2(step, evaluate, N - 1, cfg, progress)  # a kept GPU session trains a copy of its own
    if session is not None:
        # the kept session must not hold this run's (L, N-1, C) train cache until the next run loads
        # its own: that is GBs beside the next run's phase 1 and train cache (memory.py counts none)
        session.step.load(None, None, None)
    del session, step, evaluate, train_p2, val_p2
    sync(device)
    t3 = time.perf_counter()

    p1_secs, p2_secs = run.phase_seconds["phase1"], t3 - t_er
    counts = param_counts(m, E)
    capped = []
    if p1.iterations >= cfg.phase1.max_iterations and p1.convergence_rate < cfg.phase1.min_converged_fraction:
        capped.append("phase1_max_iterations")
    if p2.best_epoch == cfg.phase2.max_epochs:
        capped.append("max_epochs")
    result = RunResult(
        family="cvfp",
        seed=run.seed,
        train_tokens=N,
        val_tokens=M,
        val_loss=p2.val_loss,
        val_loss_se=p2.val_loss_se,
        val_ppl=p2.val_ppl,
        val_acc=p2.val_acc,
        params={"phase1": counts["phase1_params"], "phase2": counts["phase2_params"], "total": counts["total_params"]},
        seconds=run.seconds + (t3 - t_enter),
        device=device_name(device),
        precision=cfg.engine.precision,
        phase_seconds={"phase1": p1_secs, "contexts": run.phase_seconds["contexts"] + (t2 - t_enter), "er": t_er - t2, "phase2": p2_secs},
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
            # the pass's time per step (shared by the runs batched in it); includes the GPU
            # work of phase 2's preparation (a new session's warm-up step: a few ms)
            "val_step_us": run.val_step_us,
            "phase2_prepare_seconds": run.prep_secs,  # CPU time; the first run's overlapped with the recurrent pass
            "embed_dim": E,
            "vocab_size": V,
        },
        history={"phase1": p1.history, "phase2": p2.history},
    )
    if tensors is not None:
        result.tensors = tensors
    return result


# --------------------------------------------------------------------------- a trial's runs staged

STAGE_MEMORY_FRACTION = 0.5
"""Staged runs hold at most this fraction of the device memory available to the process when
staging begins (free on the device plus PyTorch's cached, unallocated blocks, within the
allocator's cap where the worker shares its GPU: archsearch.gpu_share); the rest is left for
the working run's own phase 1 or phase 2, as one run alone has it."""


def stage_budget(device: str | torch.device) -> int | None:
    """Bytes staged runs may hold on ``device`` (:data:`STAGE_MEMORY_FRACTION` of
    ``gpu_share.available_bytes``); None: no limit (a CPU: its memory is the process's, as
    for one run after another)."""
    from archsearch.gpu_share import available_bytes

    device = _resolved(device)
    if device.type != "cuda":
        return None
    return int(STAGE_MEMORY_FRACTION * available_bytes(device))


def stage_groups(need: list[int], budget: int | None) -> list[list[int]]:
    """Consecutive run indices grouped so that each group's ``need`` (bytes) stays within
    ``budget``; a run that alone exceeds it is a group of its own (it runs as it would alone)."""
    groups: list[list[int]] = []
    held = 0
    for i, n in enumerate(need):
        if groups and (budget is None or held + n <= budget):
            groups[-1].append(i)
            held += n
        else:
            groups.append([i])
            held = n
    return groups


def staging_helps(cfg: RunConfig, device: str | torch.device) -> bool:
    """Whether staging a trial's runs gains anything here: CUDA with Triton, where the
    recurrent passes of several runs go in one persistent kernel (``engine.recurrent`` auto
    or persistent). On a CPU the passes are one after another anyway."""
    from archsearch.cvfp.fast.device import triton_available

    device = torch.device(device)
    return device.type == "cuda" and triton_available(device) and cfg.engine.recurrent in ("auto", "persistent")


StagedRun = tuple[torch.Tensor, int, Progress]
"""(train_ids, seed, progress) of one run of :func:`train_staged`."""


def train_staged(
    cfg: RunConfig,
    embedding: torch.Tensor,
    val_ids: torch.Tensor,
    runs: list[StagedRun],
    device: str | torch.device = "cpu",
    *,
    keep_tensors: bool = False,
    build_blocks: BuildBlocks = standard_blocks,
    budget: int | None | str = "device",
) -> Iterator[RunResult | BaseException]:
    """The runs of one trial (one config, one validation stream; sizes and seeds), staged:
    phase 1 of every run of a group, one batched validation pass for the group, then each
    run's finish, in the runs' order. Yields, for each run in order, its RunResult or the
    exception it failed with; after an exception nothing more (one run after another would
    have stopped there too). A run whose phase 1 fails ends the group's starts: the runs
    started before it are finished and yielded first, then its exception. An out-of-memory
    error anywhere is yielded at once, as the next run's, with every started run dropped: the
    caller trains that run and the rest one after another, as without staging. Groups: as many
    consecutive runs as fit ``budget`` bytes (:func:`held_bytes`, :func:`stage_budget`; "device"
    measures it, None is no limit). Each run draws from its own generators: its numbers are
    those of :func:`train_run` of it alone, to the bit on the CPU. Closing the generator (a
    pruned trial) drops the started runs; their phase 1 was spent."""
    from archsearch.errors import is_out_of_memory

    device = _resolved(device)
    E, M = int(embedding.shape[1]), int(val_ids.shape[0])
    if budget == "device":
        budget = stage_budget(device)
    need = [held_bytes(cfg, int(ids.shape[0]), M, E) for ids, _, _ in runs]
    for group in stage_groups(need, budget):
        started: list[StartedRun] = []
        failure: BaseException | None = None
        for i in group:
            ids, seed, progress = runs[i]
            progress("start")
            try:
                started.append(start(cfg, embedding, ids, val_ids, seed, device, progress, keep_tensors,
                                     build_blocks=build_blocks, like=started[0] if started else None))  # fmt: skip
            except Exception as e:
                failure = e
                break
        if failure is not None and is_out_of_memory(failure):
            started.clear()
            yield failure
            return
        try:
            validation_contexts(started)
        except Exception as e:
            started.clear()
            yield e
            return
        while started:
            run = started.pop(0)
            try:
                result = finish(run)
            except Exception as e:
                del run
                started.clear()
                yield e
                return
            del run
            yield result
        if failure is not None:
            yield failure
            return
