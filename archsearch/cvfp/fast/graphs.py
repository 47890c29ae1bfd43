"""Phase 2 on a GPU: the fast stepper and evaluator, captured as CUDA graphs, in kept sessions.

:class:`Phase2Step` and :class:`Evaluation` are drop-ins for phases.EagerStepper and
phases.EagerEvaluator (the same interface, the same function): they use the fused tied-head
cross-entropy (head.py), the fused Adam with the clip folded in, and, where
``engine.phase2_graph`` is on and an epoch has at least 4 batches, one captured graph of the
step and one of the whole validation pass. The graphs read their inputs from buffers of their
own (per TokenLayer a GEMM input with the contexts in place: layers.forward_packed), so a
later run of the same shape can replay them: :class:`Phase2Session` keeps them per thread.
A bf16 run with ``engine.phase2_fused`` (:func:`phase2_fused`) steps through fast/phase2.py's
FusedPhase2Step instead (the same interface, no autograd), captured and kept the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import threading

import torch

from archsearch.config import RunConfig
from archsearch.cvfp.fast import head
from archsearch.cvfp.fast.device import graph_capture
from archsearch.cvfp.fast.layers import forward_packed
from archsearch.cvfp.model import TokenEmbedding, token_vectors
from archsearch.cvfp.phases import EvalResult, loss_stats
from archsearch.cvfp.precision import gemm_dtype, precision_scope


def _layer_inputs(tblock, rows: int, device: torch.device, cfg: RunConfig) -> list[torch.Tensor]:
    """Per TokenLayer a (rows, C + d_in) GEMM input in the products' dtype (layers.forward_packed's
    ``packed``)."""
    return [torch.empty(rows, layer.fc.in_features, device=device, dtype=gemm_dtype(cfg.engine.precision)) for layer in tblock.layers]


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

    def __init__(self, tblock, emb, val, cfg: RunConfig, weight: head.HeadWeight, graphed: bool):
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
        self.sq_sum = torch.zeros((), device=device, dtype=torch.float64)
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
        self.sq_sum.zero_()
        self.correct.zero_()
        with precision_scope(self.cfg.engine.precision, self.targets.device, cache_enabled=not capturing):
            for s, e in spans:
                if self.packed is not None:
                    h = forward_packed(self.tblock, self.emb.vectors(self.windows[s:e]), [p[s:e] for p in self.packed])  # (b, E)
                else:
                    h = self.tblock(self.cache[:, s:e], self.emb.vectors(self.windows[s:e]))
                ce, sq, hits = head.eval_sums(h, self.weight, self.targets[s:e])
                self.ce_sum += ce
                self.sq_sum += sq
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
    def __call__(self) -> EvalResult:
        self.prepare()
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run(self._spans())
        return loss_stats(float(self.ce_sum), float(self.sq_sum), int(self.correct), self.targets.shape[0])


class RowWeighted:
    """The row weights of a captured step: the graph always reads B rows, and a batch of r rows
    goes first, weighted 1/r, the others 0 (``row_weight``); ``rows`` holds r on the device for
    the loss sum. Shared by Phase2Step and the fused step (fast/phase2.py)."""

    def _init_rows(self, rows: int, device: torch.device) -> None:
        self.row_weight = torch.full((rows,), 1.0 / rows, device=device)  # the graph's rows' loss weights
        self.rows = torch.full((), float(rows), device=device, dtype=torch.float64)  # rows of weight > 0
        self.rows_now = rows

    def _set_rows(self, r: int) -> None:
        if r != self.rows_now:
            self.row_weight.fill_(1.0 / r)
            self.row_weight[r:] = 0.0
            self.rows.fill_(float(r))
            self.rows_now = r


class Phase2Step(RowWeighted):
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
        self._init_rows(B, device)

    def load(self, cache, windows, targets) -> None:
        """The training data the steps read (the graph reads copies of its batches)."""
        self.cache, self.windows, self.targets = cache, windows, targets

    def _compute(self, ctx, win, tgt, weighted: bool = False, packed=None) -> None:
        with precision_scope(self.cfg.engine.precision, tgt.device, cache_enabled=self.graph is None and not self._capturing):
            vec = self.emb.vectors(win)  # (b, E*k)
            h = self.tblock(ctx, vec) if packed is None else forward_packed(self.tblock, vec, packed)  # (b, E)
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
        write the rest: layers.forward_packed), the windows and the targets."""
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

    def __init__(self, key, tblock, emb: TokenEmbedding, train, val, cfg: RunConfig):
        windows, targets, cache = train
        self.key = key
        self.tblock = copy.deepcopy(tblock)
        self.emb = _TokenVectors(emb)
        self.weight = head.head_weight(emb.weight, cfg.engine.precision)
        if phase2_fused(self.tblock, cfg, targets.device):  # re-points the block's parameters at its flat buffer
            from archsearch.cvfp.fast.phase2 import FusedPhase2Step

            self.step = FusedPhase2Step(self.tblock, self.emb, self.weight, cfg, cache, windows, targets, graphed=True)
        else:
            opt = torch.optim.Adam(self.tblock.parameters(), lr=cfg.phase2.lr, fused=True, capturable=True)
            self.step = Phase2Step(self.tblock, self.emb, self.weight, opt, cfg, cache, windows, targets)
        self.evaluation = Evaluation(self.tblock, self.emb, val, cfg, self.weight, graphed=True)
        self.step.prepare()

    def load(self, tblock, emb: TokenEmbedding, train, val) -> None:
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


def release_phase2_graphs() -> bool:
    """Free the calling thread's kept phase-2 session (graphs and buffers; see Phase2Session).
    Returns whether one was kept. The memory goes back to PyTorch's allocator cache (see
    archsearch.trial.free_memory for handing it back to the driver)."""
    return _SESSIONS.__dict__.pop("session", None) is not None


def _session_key(tblock, emb: TokenEmbedding, train, val, cfg: RunConfig) -> tuple:
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


def phase2_fused(tblock, cfg: RunConfig, device: torch.device) -> bool:
    """Whether phase 2 steps through fast/phase2.py (``engine.phase2_fused``, a bf16 run on CUDA with
    Triton, the fused view of a standard TokenBlock) rather than :class:`Phase2Step`."""
    from archsearch.cvfp.fast.phase2 import supported

    return supported(tblock, cfg, device)


def _phase2_graphed(train, cfg: RunConfig) -> bool:
    n = train[1].shape[0]
    return train[1].device.type == "cuda" and cfg.engine.phase2_graph and n >= 4 * cfg.phase2.batch_size


def prepare_phase2(tblock, emb: TokenEmbedding, train, val, cfg: RunConfig) -> Phase2Session | None:
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


def phase2_backends(tblock, emb: TokenEmbedding, train, val, cfg: RunConfig, session: Phase2Session | None = None):
    """(stepper, evaluator) for phase 2 on a GPU: a kept session's graphed pair where
    :func:`_phase2_graphed` allows (``session``: one that :func:`prepare_phase2` readied for this
    very run), else an uncaptured step (fused head, fused Adam) and an evaluation graphed on
    its own where ``engine.phase2_graph`` is on. The stepper's ``tblock`` is what it trains."""
    if _phase2_graphed(train, cfg):
        if session is None:
            session = _phase2_session(tblock, emb, train, val, cfg)
        return session.step, session.evaluation
    windows, targets, cache = train
    weight = head.head_weight(emb.weight, cfg.engine.precision)
    if phase2_fused(tblock, cfg, targets.device):
        from archsearch.cvfp.fast.phase2 import FusedPhase2Step

        step = FusedPhase2Step(tblock, emb, weight, cfg, cache, windows, targets, graphed=False)
    else:
        opt = torch.optim.Adam(tblock.parameters(), lr=cfg.phase2.lr, fused=targets.device.type == "cuda")
        step = Phase2Step(tblock, emb, weight, opt, cfg, cache, windows, targets)
    return step, Evaluation(tblock, emb, val, cfg, weight, graphed=cfg.engine.phase2_graph)
