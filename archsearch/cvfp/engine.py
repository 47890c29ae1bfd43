"""One CVFP run: phase 1, the phase-2 context caches, phase 2 and the metrics (cvfp.md 4-7).

Pure PyTorch. All data stays on the run's device; token windows are gathered by indexing,
phase-1 batches are evaluated several at a time, and only the recurrent validation pass
loops over positions (its token half of every layer is computed for all positions at once).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from archsearch.config import RunConfig, param_counts, resolve_precision
from archsearch.cvfp import head
from archsearch.cvfp.metrics import effective_rank
from archsearch.cvfp.model import ContextBlock, TokenBlock, TokenEmbedding, init_parameters, token_vectors
from archsearch.errors import NonFiniteLoss

Progress = Callable[..., None]


def _noop(*_: Any, **__: Any) -> None:
    pass


# --------------------------------------------------------------------------- precision


CAPTURE_LOCK = threading.Lock()
"""Held while a CUDA graph is captured and around calls that may synchronise the whole
device (cuSOLVER's SVD): several runs may share a GPU from threads of one process."""


@contextlib.contextmanager
def precision_scope(precision: str, device: torch.device, cache_enabled: bool = True):
    """fp32: plain float32. tf32: float32 tensors, TF32 matrix units. bf16: autocast
    (its cast cache is off inside a CUDA-graph capture, as graphs require)."""
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled):
            yield
    elif precision == "tf32":
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old)
    else:
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old)


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


def _sync(device: torch.device) -> None:
    """Wait for this run's GPU work (its stream only: other runs may share the GPU)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- phase 1


@dataclass
class Phase1Result:
    contexts: torch.Tensor
    """(N, C) final training contexts: the last ``prev``."""
    iterations: int
    convergence_rate: float
    history: list[dict[str, float]] = field(default_factory=list)


def _phase1_batch_losses(out: torch.Tensor, target: torch.Tensor, batch: int, w: float) -> torch.Tensor:
    """Per-batch losses of ``out``/``target`` (n, C), n a multiple of ``batch`` or one partial
    batch: (1 - w) * MSE(out, prev) + w * (-||out - mean(out)||_F / batch_len)."""
    n, c = out.shape
    nb = max(1, n // batch) if n % batch == 0 else 1
    o = out.float().view(nb, n // nb, c)  # (nb, b, C)
    t = target.float().view(nb, n // nb, c)
    cvfp = (o - t).pow(2).mean(dim=(1, 2))  # (nb,)
    div = -torch.linalg.vector_norm(o - o.mean(dim=1, keepdim=True), dim=(1, 2)) / o.shape[1]  # (nb,)
    return (1.0 - w) * cvfp + w * div, cvfp, div


def train_phase1(
    block: ContextBlock,
    emb: TokenEmbedding,
    windows: torch.Tensor,
    cfg: RunConfig,
    generator: torch.Generator,
    progress: Progress = _noop,
) -> Phase1Result:
    """Fixed-point training of the ContextBlock over the training stream (cvfp.md 4)."""
    p1, eng = cfg.phase1, cfg.engine
    device = windows.device
    N, C, B = windows.shape[0], block.context_dim, p1.batch_size
    num_batches = math.ceil(N / B)
    # chunks of whole batches evaluated together, then the partial last batch alone
    chunk = B * eng.phase1_chunk_batches
    full_end = (N // B) * B
    spans = [(s, min(s + chunk, full_end)) for s in range(0, full_end, chunk)]
    if full_end < N:
        spans.append((full_end, N))

    opt = torch.optim.Adam(block.parameters(), lr=p1.lr, fused=device.type == "cuda")
    prev = torch.randn(N, C, generator=generator, device=device) * p1.init_context_std  # (N, C)
    history = [{"iteration": 1, "loss": math.nan, "cvfp": math.nan, "diversity": math.nan, "convergence_rate": 0.0}]
    rate, iteration = 0.0, 1
    progress("phase1", iteration=1, max_iterations=p1.max_iterations, convergence_rate=0.0)
    for iteration in range(2, p1.max_iterations + 1):
        noise = torch.randn(N, C, generator=generator, device=device) * p1.noise_std
        inputs = torch.roll(prev, shifts=1, dims=0) + noise  # position i reads prev[i-1]; 0 reads prev[N-1]
        out_all = torch.empty_like(prev)
        opt.zero_grad(set_to_none=True)
        sums = torch.zeros(3, device=device)  # loss, cvfp, diversity summed over finite batches
        for s, e in spans:
            sums += _phase1_span(block, emb, windows, inputs, prev, out_all, s, e, B, p1.dist_reg_weight, num_batches, cfg)
        torch.nn.utils.clip_grad_norm_(block.parameters(), p1.grad_clip)
        opt.step()
        rate = float(((out_all - prev).pow(2).mean(dim=1) < p1.convergence_threshold).float().mean())
        prev = out_all
        loss, cvfp, div = (sums / num_batches).tolist()
        history.append({"iteration": iteration, "loss": loss, "cvfp": cvfp, "diversity": div, "convergence_rate": rate})
        progress("phase1", iteration=iteration, max_iterations=p1.max_iterations, convergence_rate=rate, loss=loss)
        if iteration >= p1.min_iterations and rate >= p1.min_converged_fraction:
            break
    if not torch.isfinite(prev).all():
        raise NonFiniteLoss(f"phase 1: contexts became NaN/Inf by iteration {iteration}")
    return Phase1Result(prev, iteration, rate, history)


def _phase1_span(block, emb, windows, inputs, prev, out_all, s, e, B, w, num_batches, cfg) -> torch.Tensor:
    """Forward/backward of positions s..e (whole batches, or the last partial one).

    Returns the summed (loss, cvfp, diversity) of its finite batches. A batch whose loss is
    NaN/Inf is skipped (cvfp.md 4); then the span is redone batch by batch so that the bad
    batch's activations cannot leak NaN into the accumulated gradients."""
    device = windows.device
    with precision_scope(cfg.engine.precision, device):
        out = block(inputs[s:e], emb.vectors(windows[s:e]))  # (n, C)
    losses, cvfp, div = _phase1_batch_losses(out, prev[s:e], B, w)
    finite = torch.isfinite(losses)
    if len(losses) == 1 or bool(finite.all()):
        if bool(finite.all()):
            (losses.sum() / num_batches).backward()
            out_all[s:e] = out.detach()
            return torch.stack([losses.sum(), cvfp.sum(), div.sum()]).detach()
        out_all[s:e] = out.detach()
        return torch.zeros(3, device=device)
    total = torch.zeros(3, device=device)
    for bs in range(s, e, B):
        total += _phase1_span(block, emb, windows, inputs, prev, out_all, bs, bs + B, B, w, num_batches, cfg)
    return total


# --------------------------------------------------------------------------- contexts for phase 2


def _gemm_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype the layers' products take their inputs in under ``cfg``'s precision."""
    return torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32


@torch.no_grad()
def train_context_cache(
    block: ContextBlock, emb: TokenEmbedding, windows: torch.Tensor, contexts: torch.Tensor, cfg: RunConfig
) -> torch.Tensor:
    """(L, N-1, C) layer outputs for positions 0..N-2 in one parallel, noise-free pass:
    position 0 reads a zero context, position t the final phase-1 context of t-1."""
    N, C = contexts.shape
    L = len(block.layers)
    dtype = _gemm_dtype(cfg)
    inputs = torch.cat([contexts.new_zeros(1, C), contexts[: N - 2]])  # (N-1, C)
    cache = torch.empty(L, N - 1, C, device=contexts.device, dtype=dtype)
    step = cfg.engine.eval_batch_size * 4
    with precision_scope(cfg.engine.precision, contexts.device):
        for s in range(0, N - 1, step):
            e = min(s + step, N - 1)
            outs = block(inputs[s:e], emb.vectors(windows[s:e]), return_all=True)
            for i, o in enumerate(outs):
                cache[i, s:e] = o
    return cache


@torch.no_grad()
def val_context_cache(block: ContextBlock, emb: TokenEmbedding, windows: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """(L, M-1, C) layer outputs of the truly recurrent validation pass over positions 0..M-2:
    the context starts at zero and each step's last-layer output is the next step's context."""
    from archsearch.cvfp.recurrent import recurrent_pass

    return recurrent_pass(block, emb, windows[:-1], cfg)


# --------------------------------------------------------------------------- phase 2


@dataclass
class Phase2Result:
    best_epoch: int
    stopped_epoch: int
    val_loss: float
    val_ppl: float
    val_acc: float
    history: list[dict[str, float]] = field(default_factory=list)


def _layer_inputs(tblock: TokenBlock, rows: int, device: torch.device, cfg: RunConfig) -> list[torch.Tensor]:
    """Per TokenLayer a (rows, C + d_in) GEMM input in the products' dtype: TokenBlock.forward's
    ``packed``."""
    return [torch.empty(rows, layer.fc.in_features, device=device, dtype=_gemm_dtype(cfg)) for layer in tblock.layers]


def _copy_contexts(packed: list[torch.Tensor], contexts: torch.Tensor) -> None:
    """(L, r, C) contexts into the first r rows and C columns of the layers' GEMM inputs (cast
    to their dtype: the recurrent pass's validation cache is fp32)."""
    r, C = contexts.shape[1], contexts.shape[2]
    for buf, layer_contexts in zip(packed, contexts):
        buf[:r, :C].copy_(layer_contexts)


class Evaluation:
    """Mean cross-entropy and accuracy (argmax == target) over every validation position,
    once per epoch. With ``graphed`` on a GPU the whole pass (every chunk, the sums included)
    is captured as a CUDA graph at its first call, after its first and last chunks have run
    eagerly once (every kernel and product shape of the pass initialised), and replayed from
    then on: the same kernels on the same tensors, without the launches that otherwise make
    this pass CPU-bound. The graph reads the validation set from buffers of its own, which
    :meth:`load` fills, so that a later run of the same shape can replay it too; the
    contexts go straight into per-layer GEMM inputs (``packed``, as in the captured phase-2
    step), so no layer concatenates."""

    def __init__(self, tblock: TokenBlock, emb, val, cfg: RunConfig, weight: head.HeadWeight, graphed: bool):
        """``val``: (windows (n, k), targets (n,), context cache (L, n, C)); ``weight``: the head;
        ``emb``: anything with the TokenEmbedding's ``vectors``."""
        self.tblock, self.emb, self.cfg, self.weight = tblock, emb, cfg, weight
        device = val[1].device
        self.graphed = graphed and device.type == "cuda"
        self.packed = None
        if self.graphed:
            windows, targets, cache = val
            self.windows, self.targets, self.cache = windows.clone(), targets.clone(), None
            self.packed = _layer_inputs(tblock, cache.shape[1], device, cfg)
            _copy_contexts(self.packed, cache)
        else:
            self.windows, self.targets, self.cache = val
        self.ce_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.graph: torch.cuda.CUDAGraph | None = None

    def load(self, val) -> None:
        """This run's validation set (same shapes) into the graph's buffers."""
        windows, targets, cache = val
        self.windows.copy_(windows)
        self.targets.copy_(targets)
        _copy_contexts(self.packed, cache)

    def _spans(self) -> list[tuple[int, int]]:
        n, B = self.targets.shape[0], self.cfg.engine.eval_batch_size
        return [(s, min(s + B, n)) for s in range(0, n, B)]

    def _run(self, spans: list[tuple[int, int]], capturing: bool = False) -> None:
        self.ce_sum.zero_()
        self.correct.zero_()
        with precision_scope(self.cfg.engine.precision, self.targets.device, cache_enabled=not capturing):
            for s, e in spans:
                if self.packed is not None:
                    h = self.tblock(None, self.emb.vectors(self.windows[s:e]), [p[s:e] for p in self.packed])  # (b, E)
                else:
                    h = self.tblock(self.cache[:, s:e], self.emb.vectors(self.windows[s:e]))
                ce, hits = head.eval_sums(h, self.weight, self.targets[s:e])
                self.ce_sum += ce
                self.correct += hits

    @torch.no_grad()
    def prepare(self) -> None:
        """Capture the pass (graphed only, once). Issues GPU work but does not wait for it."""
        if self.graphed and self.graph is None:
            spans = self._spans()
            self._run(sorted({spans[0], spans[-1]}))  # warm-up, outside the graph
            graph = torch.cuda.CUDAGraph()
            with graph_capture(graph):
                self._run(spans, capturing=True)
            self.graph = graph

    @torch.no_grad()
    def __call__(self) -> tuple[float, float]:
        self.prepare()
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run(self._spans())
        n = self.targets.shape[0]
        return float(self.ce_sum) / n, int(self.correct) / n


class Phase2Step:
    """One phase-2 optimiser step on positions s..e: forward, tied-head CE, backward, clip,
    Adam. On a GPU a full-batch step is captured once as a CUDA graph (:meth:`prepare`) and
    replayed (its inputs are copied into static buffers): the same kernels on the same
    tensors, without the ~200 kernel launches per step that otherwise make phase 2
    CPU-bound. The graph's loss is a weighted sum of the rows' cross-entropies (weights 1/B),
    so the shorter last batch of an epoch (r rows) replays it too: its rows go first,
    weighted 1/r, the others 0; a row of weight 0 adds exactly 0 to every gradient, so this
    is the mean over the r rows."""

    def __init__(self, tblock, emb, weight, opt, cfg: RunConfig, cache, windows, targets):
        self.tblock, self.emb, self.weight, self.opt, self.cfg = tblock, emb, weight, opt, cfg
        self.params = list(tblock.parameters())
        self.load(cache, windows, targets)
        device = targets.device
        self.grad_scale = None  # with a fused Adam: the clip's inverse factor, read by Adam's kernel
        if opt.defaults.get("fused"):
            self.grad_scale = torch.ones((), device=device)
            opt.grad_scale = self.grad_scale
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.graph: torch.cuda.CUDAGraph | None = None
        B = cfg.phase2.batch_size
        self.row_weight = torch.full((B,), 1.0 / B, device=device)  # the graph's rows' loss weights
        self.rows = torch.full((), float(B), device=device, dtype=torch.float64)  # rows of weight > 0
        self.rows_now = B

    def load(self, cache, windows, targets) -> None:
        """The training data the steps read (the graph reads copies of its batches)."""
        self.cache, self.windows, self.targets = cache, windows, targets

    def _compute(self, ctx, win, tgt, weighted: bool = False, packed=None) -> None:
        with precision_scope(self.cfg.engine.precision, tgt.device, cache_enabled=self.graph is None and not self._capturing):
            h = self.tblock(ctx, self.emb.vectors(win), packed)  # (b, E)
            # mean CE of the tied head (weighted: the graph's form of it, see the class)
            loss = head.train_loss(h, self.weight, tgt, self.row_weight if weighted else None)
        self.opt.zero_grad(set_to_none=self.graph is None and not self._capturing)
        loss.backward()
        self._clip_and_step()
        self.loss_sum += loss.detach().double() * (self.rows if weighted else tgt.shape[0])

    _capturing = False

    def _clip_and_step(self) -> None:
        """Gradient clipping by total norm (torch.nn.utils.clip_grad_norm_), then Adam. With
        the fused Adam the clip's factor min(1, max_norm / (norm + 1e-6)) is not multiplied
        into the gradients by a kernel of its own: Adam's kernel divides them by its inverse
        (its ``grad_scale``, as for a GradScaler), the same up to rounding."""
        max_norm = self.cfg.phase2.grad_clip
        if self.grad_scale is None:
            torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            self.grad_scale.copy_(torch.clamp((norm + 1e-6) / max_norm, min=1.0))
        self.opt.step()

    def reset_optimizer(self) -> None:
        """Adam as new: every state tensor (step count, moments) zeroed in place (the graph
        holds them)."""
        for state in self.opt.state.values():
            for v in state.values():
                if torch.is_tensor(v):
                    v.zero_()

    def prepare(self) -> None:
        """Capture the step. One eager step on the first batch first initialises Adam's
        state, cuBLAS and the kernels; the parameters and Adam's state are then put back as
        they were, so the run's first step is a replay like every other one."""
        B = self.cfg.phase2.batch_size
        initial = [p.detach().clone() for p in self.params]
        self._compute(self.cache[:, :B], self.windows[:B], self.targets[:B])
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.params], initial)
        self.reset_optimizer()
        self.loss_sum.zero_()
        self.capture()

    def capture(self) -> None:
        """The graph reads its batch from static buffers: per TokenLayer one (B, C + d_in)
        GEMM input whose first C columns each replay's batch is copied into (the layers
        write the rest: TokenBlock.forward), the windows and the targets."""
        B = self.cfg.phase2.batch_size
        self.packed = _layer_inputs(self.tblock, B, self.cache.device, self.cfg)
        _copy_contexts(self.packed, self.cache[:, :B])
        self.static = (self.windows[:B].clone(), self.targets[:B].clone())
        self._capturing = True
        self.opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with graph_capture(graph):
            self._compute(None, *self.static, weighted=True, packed=self.packed)
        self._capturing = False
        self.graph = graph

    def _set_rows(self, r: int) -> None:
        if r != self.rows_now:
            self.row_weight.fill_(1.0 / r)
            self.row_weight[r:] = 0.0
            self.rows.fill_(float(r))
            self.rows_now = r

    def __call__(self, s: int, e: int) -> None:
        if self.graph is not None:
            win, tgt = self.static
            r = e - s
            self._set_rows(r)
            _copy_contexts(self.packed, self.cache[:, s:e])
            win[:r].copy_(self.windows[s:e])
            tgt[:r].copy_(self.targets[s:e])
            self.graph.replay()
        else:
            self._compute(self.cache[:, s:e], self.windows[s:e], self.targets[s:e])


class _TokenVectors:
    """A copy of the embedding's token-vector table, for a :class:`Phase2Session`."""

    def __init__(self, emb: TokenEmbedding):
        self.normed = emb.normed.clone()

    def vectors(self, windows: torch.Tensor) -> torch.Tensor:
        return token_vectors(self.normed, windows)


class Phase2Session:
    """Phase 2's GPU machinery for one shape of run, kept by the calling thread for its next
    run of the same shape (a trial trains one architecture at several data sizes in a row;
    the sizes differ only in the training data the steps read): a TokenBlock, its Adam, the
    head matrix, the token-vector table, the captured step and the captured validation pass.
    A run copies its initial parameters, embedding and validation set in and zeroes Adam's
    state; every step of every run, the first included, is a replay of the captured step,
    so a run computes the same whether its session is new or kept. Only the latest session
    of each thread is kept (about 1.5 GB at the report's shapes); :func:`release_phase2_graphs`
    frees it."""

    def __init__(self, key, tblock: TokenBlock, emb: TokenEmbedding, train, val, cfg: RunConfig):
        windows, targets, cache = train
        self.key = key
        self.tblock = copy.deepcopy(tblock)
        self.emb = _TokenVectors(emb)
        self.weight = head.head_weight(emb.weight, cfg.engine.precision)
        opt = torch.optim.Adam(self.tblock.parameters(), lr=cfg.phase2.lr, fused=True, capturable=True)
        self.step = Phase2Step(self.tblock, self.emb, self.weight, opt, cfg, cache, windows, targets)
        self.evaluation = Evaluation(self.tblock, self.emb, val, cfg, self.weight, graphed=True)
        self.step.prepare()

    def load(self, tblock: TokenBlock, emb: TokenEmbedding, train, val) -> None:
        """A new run of this shape: its initial parameters, embedding, data; Adam as new."""
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.tblock.parameters()], [p.data for p in tblock.parameters()])
            self.emb.normed.copy_(emb.normed)
            self.weight.matrix[: self.weight.vocab_size].copy_(emb.weight)  # its padding rows stay zero
        self.step.reset_optimizer()
        windows, targets, cache = train
        self.step.load(cache, windows, targets)
        self.evaluation.load(val)


_SESSIONS = threading.local()


def release_phase2_graphs() -> None:
    """Free the calling thread's kept phase-2 session (graphs and buffers; see Phase2Session)."""
    _SESSIONS.__dict__.pop("session", None)


def _session_key(tblock: TokenBlock, emb: TokenEmbedding, train, val, cfg: RunConfig) -> tuple:
    """Everything a captured phase-2 step and validation pass depend on, but the values."""
    p2 = dataclasses.asdict(cfg.phase2)
    del p2["max_epochs"], p2["patience"]  # the epoch loop is outside the graphs
    shapes = tuple((tuple(t.shape), t.dtype) for t in (*val, train[2][:, :0], emb.normed, emb.weight))
    return (
        train[1].device,
        json.dumps({"model": dataclasses.asdict(cfg.model), "phase2": p2, "engine": dataclasses.asdict(cfg.engine)}, sort_keys=True),
        tuple((name, tuple(p.shape)) for name, p in tblock.named_parameters()),
        shapes,
    )


def _phase2_session(tblock, emb, train, val, cfg: RunConfig) -> Phase2Session:
    key = _session_key(tblock, emb, train, val, cfg)
    session = getattr(_SESSIONS, "session", None)
    if session is not None and session.key == key:
        session.load(tblock, emb, train, val)
        return session
    release_phase2_graphs()  # before the new one allocates
    session = Phase2Session(key, tblock, emb, train, val, cfg)
    _SESSIONS.session = session
    return session


def _phase2_graphed(train, cfg: RunConfig) -> bool:
    n = train[1].shape[0]
    return train[1].device.type == "cuda" and cfg.engine.phase2_graph and n >= 4 * cfg.phase2.batch_size


def prepare_phase2(tblock: TokenBlock, emb: TokenEmbedding, train, val, cfg: RunConfig) -> Phase2Session | None:
    """Phase 2's session, loaded with this run's values and with both graphs captured, or
    None where phase 2 runs without graphs. Issues GPU work (stream-ordered: ``val``'s cache
    may still be being computed) but never waits for it, so train_run calls it while the
    recurrent validation pass runs: the CPU work of a new session (its eager warm-up step and
    captures, tens of milliseconds) then hides behind that latency-bound kernel."""
    if not _phase2_graphed(train, cfg):
        return None
    session = _phase2_session(tblock, emb, train, val, cfg)
    session.evaluation.prepare()
    return session


def train_phase2(
    tblock: TokenBlock,
    emb: TokenEmbedding,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cfg: RunConfig,
    progress: Progress = _noop,
    session: Phase2Session | None = None,
) -> Phase2Result:
    """Next-token training of the TokenBlock with early stopping on validation loss (cvfp.md 7).

    ``train``/``val``: (windows (n, k), targets (n,), context cache (L, n, C)). On a GPU with
    ``engine.phase2_graph`` (and at least 4 batches) the steps and validation passes replay
    CUDA graphs kept between runs of the same shape (:class:`Phase2Session`; ``session``: one
    that :func:`prepare_phase2` readied for this very run); ``tblock`` ends trained either way."""
    p2 = cfg.phase2
    windows, targets, cache = train
    n = targets.shape[0]
    device = targets.device
    graphed = _phase2_graphed(train, cfg)
    if graphed:
        if session is None:
            session = _phase2_session(tblock, emb, train, val, cfg)
        step, evaluation, trained = session.step, session.evaluation, session.tblock
    else:
        opt = torch.optim.Adam(tblock.parameters(), lr=p2.lr, fused=device.type == "cuda")
        weight = head.head_weight(emb.weight, cfg.engine.precision)
        step = Phase2Step(tblock, emb, weight, opt, cfg, cache, windows, targets)
        evaluation = Evaluation(tblock, emb, val, cfg, weight, graphed=cfg.engine.phase2_graph)  # graphs on GPUs only
        trained = tblock
    best = Phase2Result(0, 0, math.inf, math.inf, 0.0)
    history: list[dict[str, float]] = []
    bad_epochs, epoch = 0, 0
    for epoch in range(1, p2.max_epochs + 1):
        step.loss_sum.zero_()
        for s in range(0, n, p2.batch_size):
            step(s, min(s + p2.batch_size, n))
        loss_sum = step.loss_sum
        train_loss = float(loss_sum) / n
        val_loss, val_acc = evaluation()
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise NonFiniteLoss(f"phase 2: loss became NaN/Inf in epoch {epoch} (train {train_loss}, validation {val_loss})")
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_ppl": math.exp(val_loss), "val_acc": val_acc})
        progress("phase2", epoch=epoch, max_epochs=p2.max_epochs, val_ppl=math.exp(val_loss), val_acc=val_acc)
        if val_loss < best.val_loss:
            best = Phase2Result(epoch, epoch, val_loss, math.exp(val_loss), val_acc)
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs >= p2.patience:
                break
    if trained is not tblock:
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in tblock.parameters()], [p.data for p in trained.parameters()])
    best.stopped_epoch = epoch
    best.history = history
    return best


# --------------------------------------------------------------------------- one run


def train_run(
    cfg: RunConfig,
    embedding: torch.Tensor,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    seed: int,
    device: str | torch.device = "cpu",
    progress: Progress = _noop,
    keep_tensors: bool = False,
) -> dict[str, Any]:
    """Train one architecture on one training stream and return its metrics (cvfp.md 4-7).

    ``embedding`` (V, E) is the frozen pretrained matrix; ``train_ids`` (N,) and ``val_ids``
    (M,) are token-id streams. Deterministic for a given seed on a given device.
    ``keep_tensors`` adds the final contexts and both caches under "tensors" (for tests)."""
    device = torch.device(device)
    if device.type == "cuda":
        # Triton kernels and CUDA graphs work on the current device: make it this run's
        with torch.cuda.device(device.index if device.index is not None else torch.cuda.current_device()):
            return _train_run(cfg, embedding, train_ids, val_ids, seed, torch.device("cuda", torch.cuda.current_device()), progress, keep_tensors)
    return _train_run(cfg, embedding, train_ids, val_ids, seed, device, progress, keep_tensors)


def _train_run(cfg, embedding, train_ids, val_ids, seed, device, progress, keep_tensors) -> dict[str, Any]:
    if device.type == "cpu":
        # softmax gradients of a 30k-50k vocabulary are full of denormal floats, which make
        # CPU matrix products ~20x slower; flushing them to zero changes nothing measurable
        torch.set_flush_denormal(True)
    N, M = int(train_ids.shape[0]), int(val_ids.shape[0])
    if N < 3 or M < 2:
        raise ValueError(f"a run needs at least 3 training and 2 validation tokens, got {N} and {M}")
    seed_everything(seed)
    if cfg.engine.precision == "auto":
        cfg = cfg.replace(**{"engine.precision": resolve_precision("auto", device.type)})
    m = cfg.model
    E = int(embedding.shape[1])
    t_start = time.perf_counter()

    # the (V, E) table goes to the device first, so that its LayerNorm runs there, not on the host
    emb = TokenEmbedding(embedding.to(device), m.num_input_tokens, m.layernorm_eps)
    g_init = torch.Generator().manual_seed(seed)
    with torch.device("meta"):  # no default initialisation: init_parameters sets every parameter
        cblock, tblock = ContextBlock(m, E), TokenBlock(m, E)
    cblock.to_empty(device=device), tblock.to_empty(device=device)
    init_parameters(cblock, m, g_init)
    init_parameters(tblock, m, g_init)
    g_run = torch.Generator(device=device).manual_seed(seed)
    g_er = torch.Generator().manual_seed(seed)

    train_ids = train_ids.to(device=device, dtype=torch.long)
    val_ids = val_ids.to(device=device, dtype=torch.long)
    train_win, val_win = emb.windows(train_ids), emb.windows(val_ids)  # (N, k), (M, k)

    _sync(device)
    t0 = time.perf_counter()
    p1 = train_phase1(cblock, emb, train_win, cfg, g_run, progress)
    _sync(device)
    t1 = time.perf_counter()

    cblock.requires_grad_(False)
    progress("contexts")
    train_cache = train_context_cache(cblock, emb, train_win, p1.contexts, cfg)  # (L, N-1, C)
    _sync(device)
    t_val = time.perf_counter()
    val_cache = val_context_cache(cblock, emb, val_win, cfg)  # (L, M-1, C)
    train_p2 = (train_win[:-1], train_ids[1:], train_cache)
    val_p2 = (val_win[:-1], val_ids[1:], val_cache)
    t_prep = time.perf_counter()
    session = prepare_phase2(tblock, emb, train_p2, val_p2, cfg)  # CPU work while the GPU runs the recurrent pass
    prep_secs = time.perf_counter() - t_prep
    _sync(device)
    t2 = time.perf_counter()
    with CAPTURE_LOCK if device.type == "cuda" else contextlib.nullcontext():
        train_er = effective_rank(p1.contexts, cfg.engine.er_max_rows, g_er)
        val_er = effective_rank(val_cache[-1], cfg.engine.er_max_rows, g_er)
    _sync(device)
    t_er = time.perf_counter()
    tensors = {"contexts": p1.contexts, "train_cache": train_cache, "val_cache": val_cache} if keep_tensors else None
    del p1.contexts

    p2 = train_phase2(tblock, emb, train_p2, val_p2, cfg, progress, session)
    del session, train_p2, val_p2
    _sync(device)
    t3 = time.perf_counter()

    p1_secs, cache_secs, p2_secs = t1 - t0, t2 - t1, t3 - t_er
    counts = param_counts(m, E)
    result = {
        "train_tokens": N,
        "val_tokens": M,
        "val_ppl": p2.val_ppl,
        "val_loss": p2.val_loss,
        "val_acc": p2.val_acc,
        "train_er": train_er,
        "val_er": val_er,
        "phase1_iterations": p1.iterations,
        "phase1_convergence_rate": p1.convergence_rate,
        "phase2_best_epoch": p2.best_epoch,
        "phase2_stopped_epoch": p2.stopped_epoch,
        "phase1_seconds": p1_secs,
        "phase1_tokens_per_s": N * (p1.iterations - 1) / p1_secs if p1_secs > 0 else math.nan,
        "contexts_seconds": cache_secs,
        # includes the GPU work of phase 2's preparation (a new session's warm-up step: a few ms)
        "val_step_us": (t2 - t_val) / (M - 1) * 1e6,
        "phase2_prepare_seconds": prep_secs,  # CPU time, overlapped with the recurrent pass
        "er_seconds": t_er - t2,
        "phase2_seconds": p2_secs,
        "phase2_tokens_per_s": (N - 1 + M - 1) * p2.stopped_epoch / p2_secs if p2_secs > 0 else math.nan,
        "seconds": time.perf_counter() - t_start,
        **counts,
        "embed_dim": E,
        "vocab_size": int(embedding.shape[0]),
        "device": device_name(device),
        "precision": cfg.engine.precision,
        "seed": seed,
        "phase1_history": p1.history,
        "phase2_history": p2.history,
    }
    if tensors is not None:
        result["tensors"] = tensors
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
