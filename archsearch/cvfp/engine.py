"""One CVFP run: phase 1, the phase-2 context caches, phase 2 and the metrics (cvfp.md 4-7).

Pure PyTorch. All data stays on the run's device; token windows are gathered by indexing,
phase-1 batches are evaluated several at a time, and only the recurrent validation pass
loops over positions (its token half of every layer is computed for all positions at once).
"""

from __future__ import annotations

import contextlib
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
from archsearch.cvfp.model import ContextBlock, TokenBlock, TokenEmbedding, init_parameters
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


@torch.no_grad()
def train_context_cache(
    block: ContextBlock, emb: TokenEmbedding, windows: torch.Tensor, contexts: torch.Tensor, cfg: RunConfig
) -> torch.Tensor:
    """(L, N-1, C) layer outputs for positions 0..N-2 in one parallel, noise-free pass:
    position 0 reads a zero context, position t the final phase-1 context of t-1."""
    N, C = contexts.shape
    L = len(block.layers)
    dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32
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


class Evaluation:
    """Mean cross-entropy and accuracy (argmax == target) over every validation position,
    once per epoch. On a GPU the whole pass (every chunk, the sums included) is captured as
    a CUDA graph at its second call and replayed from then on: the same kernels on the same
    tensors (the validation set and the TokenBlock's parameters stay put during a run),
    without the launches that otherwise make this pass CPU-bound."""

    def __init__(self, tblock: TokenBlock, emb: TokenEmbedding, val, cfg: RunConfig, weight: head.HeadWeight, graphed: bool):
        """``val``: (windows (n, k), targets (n,), context cache (L, n, C)); ``weight``: the head."""
        self.tblock, self.emb, self.cfg, self.weight = tblock, emb, cfg, weight
        self.windows, self.targets, self.cache = val
        device = self.targets.device
        self.ce_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.graphed = graphed and device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0

    def _run(self, capturing: bool = False) -> None:
        self.ce_sum.zero_()
        self.correct.zero_()
        n, B = self.targets.shape[0], self.cfg.engine.eval_batch_size
        with precision_scope(self.cfg.engine.precision, self.targets.device, cache_enabled=not capturing):
            for s in range(0, n, B):
                e = min(s + B, n)
                h = self.tblock(self.cache[:, s:e], self.emb.vectors(self.windows[s:e]))  # (b, E)
                ce, hits = head.eval_sums(h, self.weight, self.targets[s:e])
                self.ce_sum += ce
                self.correct += hits

    @torch.no_grad()
    def __call__(self) -> tuple[float, float]:
        self.calls += 1
        if self.graphed and self.graph is None and self.calls >= 2:  # the first call warmed up
            graph = torch.cuda.CUDAGraph()
            with CAPTURE_LOCK, torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._run(capturing=True)
            self.graph = graph
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()
        n = self.targets.shape[0]
        return float(self.ce_sum) / n, int(self.correct) / n


class Phase2Step:
    """One phase-2 optimiser step on positions s..e: forward, tied-head CE, backward, clip,
    Adam. On a GPU a full-batch step is captured once as a CUDA graph and replayed (its
    inputs are copied into static buffers): the same kernels on the same tensors, without
    the ~200 kernel launches per step that otherwise make phase 2 CPU-bound. The graph's loss
    is a weighted sum of the rows' cross-entropies (weights 1/B), so the shorter last batch of
    an epoch (r rows) replays it too: its rows go first, weighted 1/r, the others 0; a row of
    weight 0 adds exactly 0 to every gradient, so this is the mean over the r rows."""

    def __init__(self, tblock, emb, weight, opt, cfg: RunConfig, cache, windows, targets):
        self.tblock, self.emb, self.weight, self.opt, self.cfg = tblock, emb, weight, opt, cfg
        self.cache, self.windows, self.targets = cache, windows, targets
        self.params = list(tblock.parameters())
        device = targets.device
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.graph: torch.cuda.CUDAGraph | None = None
        B = cfg.phase2.batch_size
        self.row_weight = torch.full((B,), 1.0 / B, device=device)  # the graph's rows' loss weights
        self.rows = torch.full((), float(B), device=device, dtype=torch.float64)  # rows of weight > 0
        self.rows_now = B

    def _compute(self, ctx, win, tgt, weighted: bool = False) -> None:
        with precision_scope(self.cfg.engine.precision, tgt.device, cache_enabled=self.graph is None and not self._capturing):
            h = self.tblock(ctx, self.emb.vectors(win))  # (b, E)
            # mean CE of the tied head (weighted: the graph's form of it, see the class)
            loss = head.train_loss(h, self.weight, tgt, self.row_weight if weighted else None)
        self.opt.zero_grad(set_to_none=self.graph is None and not self._capturing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.phase2.grad_clip)
        self.opt.step()
        self.loss_sum += loss.detach().double() * (self.rows if weighted else tgt.shape[0])

    _capturing = False

    def capture(self) -> None:
        B = self.cfg.phase2.batch_size
        self.static = (self.cache[:, :B].clone(), self.windows[:B].clone(), self.targets[:B].clone())
        self._capturing = True
        self.opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with CAPTURE_LOCK, torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._compute(*self.static, weighted=True)
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
            ctx, win, tgt = self.static
            r = e - s
            self._set_rows(r)
            ctx[:, :r].copy_(self.cache[:, s:e])
            win[:r].copy_(self.windows[s:e])
            tgt[:r].copy_(self.targets[s:e])
            self.graph.replay()
        else:
            self._compute(self.cache[:, s:e], self.windows[s:e], self.targets[s:e])


GRAPH_WARMUP_STEPS = 1  # eager steps before the phase-2 step is captured


def train_phase2(
    tblock: TokenBlock,
    emb: TokenEmbedding,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cfg: RunConfig,
    progress: Progress = _noop,
) -> Phase2Result:
    """Next-token training of the TokenBlock with early stopping on validation loss (cvfp.md 7).

    ``train``/``val``: (windows (n, k), targets (n,), context cache (L, n, C))."""
    p2 = cfg.phase2
    windows, targets, cache = train
    n = targets.shape[0]
    device = targets.device
    graphed = device.type == "cuda" and cfg.engine.phase2_graph and n >= 4 * p2.batch_size
    opt = torch.optim.Adam(tblock.parameters(), lr=p2.lr, fused=device.type == "cuda", capturable=graphed)
    weight = head.head_weight(emb.weight, cfg.engine.precision)
    step = Phase2Step(tblock, emb, weight, opt, cfg, cache, windows, targets)
    evaluation = Evaluation(tblock, emb, val, cfg, weight, graphed=cfg.engine.phase2_graph)  # graphs on GPUs only
    best = Phase2Result(0, 0, math.inf, math.inf, 0.0)
    history: list[dict[str, float]] = []
    bad_epochs, epoch = 0, 0
    for epoch in range(1, p2.max_epochs + 1):
        step.loss_sum.zero_()
        for s in range(0, n, p2.batch_size):
            e = min(s + p2.batch_size, n)
            if graphed and e - s == p2.batch_size and step.graph is None and epoch == 1 and s >= GRAPH_WARMUP_STEPS * p2.batch_size:
                step.capture()  # after eager warm-up: Adam's state, cuBLAS and the kernels initialised
            step(s, e)
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
    _sync(device)
    t2 = time.perf_counter()
    with CAPTURE_LOCK if device.type == "cuda" else contextlib.nullcontext():
        train_er = effective_rank(p1.contexts, cfg.engine.er_max_rows, g_er)
        val_er = effective_rank(val_cache[-1], cfg.engine.er_max_rows, g_er)
    _sync(device)
    t_er = time.perf_counter()
    tensors = {"contexts": p1.contexts, "train_cache": train_cache, "val_cache": val_cache} if keep_tensors else None
    del p1.contexts

    p2 = train_phase2(
        tblock,
        emb,
        (train_win[:-1], train_ids[1:], train_cache),
        (val_win[:-1], val_ids[1:], val_cache),
        cfg,
        progress,
    )
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
        "val_step_us": (t2 - t_val) / (M - 1) * 1e6,
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
