"""The CVFP training protocol (docs/model.md: phase 1, between the phases, phase 2, ER) as plain loops.

Phase 1 trains the ContextBlock towards a fixed point (§4); the two context caches feed
phase 2 (§5); phase 2 trains the TokenBlock with early stopping (§7), one optimiser step at
a time through a :class:`Stepper` and one validation pass per epoch through an
:class:`Evaluator`. The eager versions of both are below; the run (run.py) may hand in
drop-ins from ``cvfp/fast/`` with the same interface. Nothing here imports ``fast/``.

Shapes: N training positions, M validation positions, C context width, L layers, k input
tokens, E embedding width, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from archsearch.config import RunConfig
from archsearch.cvfp.model import TokenEmbedding, tied_logits
from archsearch.cvfp.precision import gemm_dtype, precision_scope
from archsearch.errors import NonFiniteLoss

Progress = Callable[..., None]


def noop(*_: Any, **__: Any) -> None:
    pass


# --------------------------------------------------------------------------- phase 1 (§4)


@dataclass
class Phase1Result:
    contexts: torch.Tensor
    """(N, C) final training contexts: the last ``prev``."""
    iterations: int
    convergence_rate: float
    history: list[dict[str, float]] = field(default_factory=list)


def phase1_batch_losses(out: torch.Tensor, target: torch.Tensor, batch: int, w: float):
    """Per-batch (loss, cvfp, diversity) of ``out``/``target`` (n, C), n a multiple of ``batch``
    or one partial batch: loss = (1 - w) * MSE(out, prev) + w * (-||out - mean(out)||_F / batch_len)."""
    n, c = out.shape
    nb = max(1, n // batch) if n % batch == 0 else 1
    o = out.float().view(nb, n // nb, c)  # (nb, b, C)
    t = target.float().view(nb, n // nb, c)  # (nb, b, C)
    cvfp = (o - t).pow(2).mean(dim=(1, 2))  # (nb,)
    div = -torch.linalg.vector_norm(o - o.mean(dim=1, keepdim=True), dim=(1, 2)) / o.shape[1]  # (nb,)
    return (1.0 - w) * cvfp + w * div, cvfp, div


def phase1_spans(N: int, batch: int, chunk_batches: int) -> list[tuple[int, int]]:
    """The (start, end) position ranges one forward/backward covers: whole batches
    ``chunk_batches`` at a time (speed only), the partial last batch alone."""
    chunk = batch * chunk_batches
    full_end = (N // batch) * batch
    spans = [(s, min(s + chunk, full_end)) for s in range(0, full_end, chunk)]
    if full_end < N:
        spans.append((full_end, N))
    return spans


def train_phase1(block: nn.Module, emb: TokenEmbedding, windows: torch.Tensor, cfg: RunConfig,
                 generator: torch.Generator, progress: Progress = noop) -> Phase1Result:  # fmt: skip
    """Fixed-point training of the ContextBlock over the training stream: each iteration
    after the first is one full-data gradient step; ``prev`` becomes this iteration's output."""
    p1 = cfg.phase1
    device = windows.device
    N, C, B = windows.shape[0], block.context_dim, p1.batch_size
    num_batches = math.ceil(N / B)
    spans = phase1_spans(N, B, cfg.engine.phase1_chunk_batches)

    opt = torch.optim.Adam(block.parameters(), lr=p1.lr, fused=device.type == "cuda")
    # a drop-in of cvfp/fast (FusedContextBlock with engine.phase1_fused) may run the iteration
    fast = block.phase1_fast(emb, windows, cfg) if hasattr(block, "phase1_fast") else None
    # scaled in place: the same values as ``randn(...) * std``, one (N, C) buffer fewer
    prev = torch.randn(N, C, generator=generator, device=device).mul_(p1.init_context_std)  # (N, C): iteration 1
    history = [{"iteration": 1, "loss": math.nan, "cvfp": math.nan, "diversity": math.nan, "convergence_rate": 0.0}]
    rate, iteration = 0.0, 1
    progress("phase1", iteration=1, max_iterations=p1.max_iterations, convergence_rate=0.0)
    for iteration in range(2, p1.max_iterations + 1):
        noise = torch.randn(N, C, generator=generator, device=device).mul_(p1.noise_std)  # (N, C)
        out_all = torch.empty_like(prev)  # (N, C)
        opt.zero_grad(set_to_none=True)
        if fast is None:
            sums, rate_t = plain_iteration(block, emb, windows, prev, noise, out_all, spans, num_batches, cfg)
        else:
            sums, rate_t = fast.iteration(prev, noise, out_all, spans, num_batches)
        torch.nn.utils.clip_grad_norm_(block.parameters(), p1.grad_clip)
        opt.step()
        prev = out_all
        # one host sync per iteration: the three mean losses and the rate read back together
        loss, cvfp, div, rate = torch.cat([sums / num_batches, rate_t.reshape(1).to(sums.dtype)]).tolist()
        history.append({"iteration": iteration, "loss": loss, "cvfp": cvfp, "diversity": div, "convergence_rate": rate})
        progress("phase1", iteration=iteration, max_iterations=p1.max_iterations, convergence_rate=rate, loss=loss)
        if iteration >= p1.min_iterations and rate >= p1.min_converged_fraction:
            break
    if not torch.isfinite(prev).all():
        raise NonFiniteLoss(f"phase 1: contexts became NaN/Inf by iteration {iteration}")
    return Phase1Result(prev, iteration, rate, history)


def plain_iteration(block, emb, windows, prev, noise, out_all, spans, num_batches, cfg):
    """The gradient of one iteration (accumulated in the parameters' ``.grad``) and its outputs
    into ``out_all``: input context of position i is prev[i-1] + noise[i] (0 reads prev[N-1]).
    Returns ((loss, cvfp, diversity) summed over finite batches, the converged fraction)."""
    inputs = torch.roll(prev, shifts=1, dims=0) + noise  # position i reads prev[i-1]; 0 reads prev[N-1]
    sums = torch.zeros(3, device=windows.device)  # loss, cvfp, diversity summed over finite batches
    for s, e in spans:
        sums += phase1_span(block, emb, windows, inputs, prev, out_all, s, e, num_batches, cfg)
    rate = ((out_all - prev).pow(2).mean(dim=1) < cfg.phase1.convergence_threshold).float().mean()
    return sums, rate


def phase1_span(block, emb, windows, inputs, prev, out_all, s, e, num_batches, cfg) -> torch.Tensor:
    """Forward/backward of positions s..e (whole batches, or the last partial one); returns
    the summed (loss, cvfp, diversity) of its finite batches. A batch whose loss is NaN/Inf is
    skipped (§4): then the span is redone batch by batch, so that the bad batch's activations
    cannot leak NaN into the accumulated gradients."""
    B, device = cfg.phase1.batch_size, windows.device
    with precision_scope(cfg.engine.precision, device):
        out = block(inputs[s:e], emb.vectors(windows[s:e]))  # (n, C)
    losses, cvfp, div = phase1_batch_losses(out, prev[s:e], B, cfg.phase1.dist_reg_weight)
    finite = torch.isfinite(losses)
    if len(losses) == 1 or bool(finite.all()):
        out_all[s:e] = out.detach()
        if bool(finite.all()):
            (losses.sum() / num_batches).backward()
            return torch.stack([losses.sum(), cvfp.sum(), div.sum()]).detach()
        return torch.zeros(3, device=device)
    total = torch.zeros(3, device=device)
    for bs in range(s, e, B):
        total += phase1_span(block, emb, windows, inputs, prev, out_all, bs, bs + B, num_batches, cfg)
    return total


# --------------------------------------------------------------------------- contexts for phase 2 (§5)


@torch.no_grad()
def train_context_cache(block: nn.Module, emb: TokenEmbedding, windows: torch.Tensor, contexts: torch.Tensor,
                        cfg: RunConfig) -> torch.Tensor:  # fmt: skip
    """(L, N-1, C) layer outputs for positions 0..N-2 in one parallel, noise-free pass:
    position 0 reads a zero context, position t the final phase-1 context of t-1."""
    N, C = contexts.shape
    L = len(block.layers)
    inputs = torch.cat([contexts.new_zeros(1, C), contexts[: N - 2]])  # (N-1, C)
    cache = torch.empty(L, N - 1, C, device=contexts.device, dtype=gemm_dtype(cfg.engine.precision))  # (L, N-1, C)
    step = cfg.engine.eval_batch_size * 4
    with precision_scope(cfg.engine.precision, contexts.device):
        for s in range(0, N - 1, step):
            e = min(s + step, N - 1)
            outs = block(inputs[s:e], emb.vectors(windows[s:e]), return_all=True)  # L x (b, C)
            for i, o in enumerate(outs):
                cache[i, s:e] = o
    return cache


@torch.no_grad()
def val_context_cache(block: nn.Module, emb: TokenEmbedding, windows: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """(L, T, C) layer outputs of the truly recurrent pass over the T positions of ``windows``
    (the run passes positions 0..M-2): the context starts at zero and each step's last-layer
    output is the next step's context. fp32, full-precision products."""
    L, C, T = len(block.layers), block.context_dim, windows.shape[0]
    out = torch.empty(L, T, C, device=windows.device)  # (L, T, C)
    context = torch.zeros(1, C, device=windows.device)  # (1, C)
    with precision_scope("fp32", windows.device):
        for s in range(0, T, cfg.engine.eval_batch_size):
            vecs = emb.vectors(windows[s : s + cfg.engine.eval_batch_size])  # (b, E*k)
            for j in range(vecs.shape[0]):
                outs = block(context, vecs[j : j + 1], return_all=True)  # L x (1, C)
                out[:, s + j] = torch.cat(outs)  # (L, C)
                context = outs[-1]
    return out


# --------------------------------------------------------------------------- phase 2 (§7)


@dataclass
class EvalResult:
    loss: float
    """Mean cross-entropy over the validation positions."""
    acc: float
    loss_se: float
    """Standard error of that mean: std of the per-position losses / sqrt(positions)."""


class Stepper(Protocol):
    """One phase-2 optimiser step on training positions s..e (forward, tied-head CE,
    backward, clip, Adam); ``loss_sum`` (float64, on the device) accumulates CE * rows."""

    tblock: nn.Module
    """The module the steps train (a kept GPU session trains a copy of its own)."""
    loss_sum: torch.Tensor

    def __call__(self, s: int, e: int) -> None: ...


class Evaluator(Protocol):
    """One validation pass over every validation position."""

    def __call__(self) -> EvalResult: ...


def loss_stats(ce_sum: float, sq_sum: float, correct: int, n: int) -> EvalResult:
    """Mean, accuracy and standard error of the mean from sums over n per-position losses."""
    mean = ce_sum / n
    var = max(sq_sum / n - mean * mean, 0.0) * n / (n - 1) if n > 1 else math.nan  # sample variance (float64 sums)
    return EvalResult(mean, correct / n, math.sqrt(var / n))


class EagerStepper:
    """The plain phase-2 step. ``train``: (windows (n, k), targets (n,), context cache (L, n, C));
    ``head``: the tied head matrix (V, E) in the products' dtype."""

    def __init__(self, tblock: nn.Module, emb: TokenEmbedding, head: torch.Tensor, cfg: RunConfig, train):
        self.tblock, self.emb, self.head, self.cfg = tblock, emb, head, cfg
        self.windows, self.targets, self.cache = train
        self.params = list(tblock.parameters())
        self.opt = torch.optim.Adam(self.params, lr=cfg.phase2.lr, fused=self.targets.device.type == "cuda")
        self.loss_sum = torch.zeros((), device=self.targets.device, dtype=torch.float64)

    def __call__(self, s: int, e: int) -> None:
        targets = self.targets[s:e]  # (b,)
        with precision_scope(self.cfg.engine.precision, targets.device):
            h = self.tblock(self.cache[:, s:e], self.emb.vectors(self.windows[s:e]))  # (b, E)
            loss = F.cross_entropy(tied_logits(h, self.head).float(), targets)  # mean CE over the batch
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.phase2.grad_clip)
        self.opt.step()
        self.loss_sum += loss.detach().double() * (e - s)


class EagerEvaluator:
    """The plain validation pass, in chunks of ``engine.eval_batch_size`` positions.
    ``val``: (windows (m, k), targets (m,), context cache (L, m, C))."""

    def __init__(self, tblock: nn.Module, emb: TokenEmbedding, head: torch.Tensor, cfg: RunConfig, val):
        self.tblock, self.emb, self.head, self.cfg = tblock, emb, head, cfg
        self.windows, self.targets, self.cache = val

    @torch.no_grad()
    def __call__(self) -> EvalResult:
        n, B = self.targets.shape[0], self.cfg.engine.eval_batch_size
        device = self.targets.device
        ce_sum = torch.zeros((), device=device, dtype=torch.float64)
        sq_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        with precision_scope(self.cfg.engine.precision, device):
            for s in range(0, n, B):
                targets = self.targets[s : s + B]  # (b,)
                h = self.tblock(self.cache[:, s : s + B], self.emb.vectors(self.windows[s : s + B]))  # (b, E)
                logits = tied_logits(h, self.head)  # (b, V)
                logp = logits.float().log_softmax(dim=-1)  # (b, V)
                ce_sum += F.nll_loss(logp, targets, reduction="sum").double()
                sq_sum += F.nll_loss(logp, targets, reduction="none").double().pow(2).sum()
                correct += (logits.argmax(dim=-1) == targets).sum()
        return loss_stats(float(ce_sum), float(sq_sum), int(correct), n)


@dataclass
class Phase2Result:
    best_epoch: int
    stopped_epoch: int
    val_loss: float
    val_loss_se: float
    val_ppl: float
    val_acc: float
    history: list[dict[str, float]] = field(default_factory=list)


def train_phase2(step: Stepper, evaluate: Evaluator, n: int, cfg: RunConfig, progress: Progress = noop) -> Phase2Result:
    """Next-token training over n positions in stream order, batches of ``phase2.batch_size``,
    one validation pass per epoch, early stopping on validation loss. The reported numbers are
    those of the best epoch."""
    p2 = cfg.phase2
    best = Phase2Result(0, 0, math.inf, math.nan, math.inf, 0.0)
    history: list[dict[str, float]] = []
    bad_epochs, epoch = 0, 0
    for epoch in range(1, p2.max_epochs + 1):
        step.loss_sum.zero_()
        for s in range(0, n, p2.batch_size):
            step(s, min(s + p2.batch_size, n))
        train_loss = float(step.loss_sum) / n
        val = evaluate()
        if not (math.isfinite(train_loss) and math.isfinite(val.loss)):
            raise NonFiniteLoss(f"phase 2: loss became NaN/Inf in epoch {epoch} (train {train_loss}, validation {val.loss})")
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val.loss, "val_ppl": math.exp(val.loss), "val_acc": val.acc})
        progress("phase2", epoch=epoch, max_epochs=p2.max_epochs, val_ppl=math.exp(val.loss), val_acc=val.acc)
        if val.loss < best.val_loss:
            best = Phase2Result(epoch, epoch, val.loss, val.loss_se, math.exp(val.loss), val.acc)
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs >= p2.patience:
                break
    best.stopped_epoch = epoch
    best.history = history
    return best
