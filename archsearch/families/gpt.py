"""The ``gpt`` family: a small decoder-only transformer on CVFP's data protocol (pure torch).

What it shares with CVFP, so that the two scale on the same footing:

- **Input**: the source's pretrained embedding ``W`` (V, E), frozen by default, passed through
  the same parameter-free LayerNorm(E) as CVFP's ``embed_norm`` (CVFP never trains that norm,
  so it is LN at weight 1, bias 0). Learned position embeddings are added after it.
- **Head**: tied to the same ``W`` (``logits = h W^T``, no bias), frozen by default as in CVFP.
  ``train_embedding`` / ``train_head`` make either trainable (initialised from ``W``); both
  true gives one trainable matrix shared by both (GPT-2's tying).
- **Width**: ``d_model`` 0 means E. Otherwise an input projection Linear(E -> d_model) and an
  output projection Linear(d_model -> E) (both with bias) sit between the embedding, the
  blocks and the tied head.
- **Data**: the same training prefix and the same validation stream; loss = next-token
  cross-entropy. Training windows are ``context_length`` consecutive inputs with their next
  tokens as targets, non-overlapping (the last one ends at the stream's last target, so it
  may overlap the previous), shuffled every epoch with the run's seed.
- **Validation**: over exactly CVFP's targets: tokens 1..M-1 of the M-token stream, each once.
  Windows of ``context_length`` slide by ``eval_stride`` (0 = context_length // 2); the first
  window scores all its targets (token t+1 is predicted from tokens 0..t, as CVFP's recurrent
  pass starts from an empty context); every later window scores only the targets the previous
  one did not, so each of them sees at least ``context_length - eval_stride`` tokens of context.
- **Schedule**: AdamW at a constant ``lr``, gradient clip, epochs with CVFP phase 2's early
  stopping (after each epoch: validation loss; stop after ``patience`` epochs without a lower
  one, at most ``max_epochs``); reported numbers are those of the best epoch.
- **Arithmetic**: ``precision: auto`` is bf16 autocast with fp32 master weights and a fused
  AdamW on GPUs, fp32 on CPUs.

Blocks are pre-LayerNorm: ``x + Attn(LN(x))``, ``x + MLP(LN(x))`` with causal attention through
``torch.nn.functional.scaled_dot_product_attention`` and a GELU MLP of width
``round(mlp_ratio * d_model)``; a final LayerNorm before the output. Linear weights are
N(0, init_std), the residual projections N(0, init_std / sqrt(2 num_layers)) (GPT-2), biases 0.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

from archsearch.families import Family, RunData, bounded
from archsearch.result import RunResult


@dataclass
class GPTConfig:
    num_layers: int = bounded(4, 1, 64, doc="transformer blocks")
    d_model: int = bounded(0, 0, 8192, doc="residual width; 0 = the embedding's width E (no projections)")
    n_heads: int = bounded(4, 1, 128, doc="attention heads; must divide d_model")
    mlp_ratio: float = bounded(4.0, 0.25, 16.0, doc="MLP hidden width / d_model")
    context_length: int = bounded(128, 2, 8192, doc="tokens per training and validation window")
    lr: float = bounded(1e-3, 0.0, 1.0, strict_low=True, doc="AdamW learning rate (constant)")
    weight_decay: float = bounded(0.1, 0.0, 10.0, doc="AdamW decoupled weight decay (matrices only; not norms, biases, positions)")
    dropout: float = bounded(0.0, 0.0, 0.9, doc="dropout on attention weights, after attention and after the MLP")
    batch_size: int = bounded(32, 1, 65536, doc="windows per step")
    grad_clip: float = bounded(1.0, 0.0, 1e6, strict_low=True, doc="gradient-norm clip of every step")
    max_epochs: int = bounded(10, 1, 1000, doc="upper bound on epochs")
    patience: int = bounded(1, 1, 1000, doc="stop after this many epochs without a lower validation loss")
    train_embedding: bool = bounded(False, doc="train the input embedding (initialised from the pretrained one)")
    train_head: bool = bounded(False, doc="train the output head (initialised from the pretrained embedding)")
    eval_stride: int = bounded(0, 0, 8192, doc="validation windows' stride; 0 = context_length // 2")
    init_std: float = bounded(0.02, 0.0, 1.0, doc="std of the normal init of Linear weights and positions")
    precision: str = bounded("auto", choices=("auto", "fp32", "bf16"), doc="auto: bf16 autocast on GPUs, fp32 on CPUs")

    def problems(self) -> list[str]:
        out = []
        if self.d_model and self.d_model % self.n_heads:
            out.append(f"n_heads: {self.n_heads} does not divide d_model ({self.d_model})")
        if self.eval_stride > self.context_length:
            out.append(f"eval_stride: {self.eval_stride} is above context_length ({self.context_length})")
        return out


def _width(cfg: GPTConfig, E: int) -> int:
    return cfg.d_model or E


def _hidden(cfg: GPTConfig, d: int) -> int:
    return max(1, round(cfg.mlp_ratio * d))


def param_counts(cfg: GPTConfig, embed_dim: int, vocab_size: int) -> dict[str, int]:
    """Trainable parameters by part, from the config alone (the frozen embedding/head are not
    counted, as CVFP does not count its own)."""
    E, V = embed_dim, vocab_size
    d = _width(cfg, E)
    h = _hidden(cfg, d)
    per_block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)
    out = {
        "positions": cfg.context_length * d,
        "blocks": cfg.num_layers * per_block + 2 * d,  # + the final LayerNorm
        "projections": 0 if d == E else (E * d + d) + (d * E + E),
        # one trainable (V, E) matrix: the embedding, the head, or both when both train (tied)
        "embedding": V * E if (cfg.train_embedding or cfg.train_head) else 0,
    }
    out["total"] = sum(out.values())
    return out


def build(cfg: GPTConfig, embedding, device=None):
    """The model as plain nn.Modules (built on ``device``; parameters initialised by ``init``)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    V, E = embedding.shape
    d = _width(cfg, E)
    hdim = _hidden(cfg, d)
    if d % cfg.n_heads:
        raise ValueError(f"gpt: n_heads ({cfg.n_heads}) does not divide the width {d} (d_model 0 = the embedding's {E})")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.out = nn.Linear(d, hdim), nn.Linear(hdim, d)
            self.drop = nn.Dropout(cfg.dropout)

        def forward(self, x):  # (B, T, d)
            B, T, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)  # 3 x (B, T, d)
            q, k, v = (t.view(B, T, cfg.n_heads, d // cfg.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=cfg.dropout if self.training else 0.0)
            x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, d)))  # (B, T, d)
            return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            w = embedding.detach().float()
            shared = cfg.train_embedding and cfg.train_head
            self.wte = nn.Parameter(w.clone(), requires_grad=cfg.train_embedding)  # (V, E)
            self.head = self.wte if shared else nn.Parameter(w.clone(), requires_grad=cfg.train_head)
            self.wpe = nn.Parameter(torch.zeros(cfg.context_length, d))  # (Tmax, d)
            self.inp = nn.Linear(E, d) if d != E else None
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.num_layers))
            self.ln_f = nn.LayerNorm(d)
            self.outp = nn.Linear(d, E) if d != E else None
            self.drop = nn.Dropout(cfg.dropout)

        def forward(self, ids):  # (B, T) -> logits (B, T, V)
            T = ids.shape[1]
            x = F.layer_norm(self.wte[ids], (E,))  # (B, T, E): CVFP's embed_norm, never trained
            if self.inp is not None:
                x = self.inp(x)  # (B, T, d)
            x = self.drop(x + self.wpe[:T])
            for block in self.blocks:
                x = block(x)
            x = self.ln_f(x)
            if self.outp is not None:
                x = self.outp(x)  # (B, T, E)
            return x @ self.head.t()  # (B, T, V)

    with torch.device(device) if device is not None else contextlib.nullcontext():
        return GPT()


def init(model, cfg: GPTConfig, generator) -> None:
    """GPT-2's initialisation, drawn from ``generator`` (so a seed fixes it on any device)."""
    import torch

    resid_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("wte", "head"):
                continue
            if name.endswith("bias"):
                p.zero_()
            elif ".ln" in name or name.startswith("ln_f"):
                p.fill_(1.0)
            else:
                std = resid_std if name.endswith(("proj.weight", "out.weight")) else cfg.init_std
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def trainable_params(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def train_windows(N: int, T: int):
    """Start positions of the training windows over N tokens (N-1 targets): every T-th, the
    last one moved back to end at the last target; and their length (T, or N-1 if shorter)."""
    L = min(T, N - 1)
    starts = list(range(0, N - 1 - L + 1, L))
    if starts[-1] + L < N - 1:
        starts.append(N - 1 - L)
    return starts, L


def eval_windows(M: int, T: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of the validation windows: inputs are positions
    start..end-1, targets start+1..end; the positions from ``first`` on are scored. Together
    they score every position 0..M-2 exactly once."""
    out, done, s = [], 0, 0
    while done < M - 1:
        e = min(s + T, M - 1)
        out.append((s, e, done))
        done = e
        s += stride
    return out


def _evaluate(model, val_ids, cfg: GPTConfig, amp) -> tuple[float, float, float]:
    """Mean loss, its standard error and accuracy over the validation targets 1..M-1."""
    import torch
    from torch.nn import functional as F

    M = int(val_ids.shape[0])
    T = cfg.context_length
    stride = cfg.eval_stride or max(1, T // 2)
    losses, hits = [], []
    model.eval()
    with torch.no_grad():
        windows = eval_windows(M, T, stride)
        full = [w for w in windows if w[1] - w[0] == T]
        rest = [w for w in windows if w[1] - w[0] != T]
        groups = [full[i : i + max(1, cfg.batch_size)] for i in range(0, len(full), max(1, cfg.batch_size))] + [[w] for w in rest]
        for group in groups:
            x = torch.stack([val_ids[s:e] for s, e, _ in group])  # (B, T)
            y = torch.stack([val_ids[s + 1 : e + 1] for s, e, _ in group])  # (B, T)
            with amp():
                logits = model(x)  # (B, T, V)
            ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape)  # (B, T)
            ok = (logits.argmax(-1) == y).float()
            for j, (s, _e, first) in enumerate(group):
                losses.append(ce[j, first - s :])
                hits.append(ok[j, first - s :])
    model.train()
    ce = torch.cat(losses).double()
    n = ce.numel()
    se = float(ce.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return float(ce.mean()), se, float(torch.cat(hits).mean())


def train(cfg: GPTConfig, data: RunData, seed: int, device: str = "cpu", progress=None) -> RunResult:
    """One run of the transformer (see the module docstring for the protocol)."""
    import random

    import numpy as np
    import torch
    from torch.nn import functional as F

    from archsearch.errors import NonFiniteLoss

    progress = progress or (lambda *a, **k: None)
    device = torch.device(device)
    t_start = time.perf_counter()
    train_ids = data.train_ids.to(device=device, dtype=torch.long)
    val_ids = data.val_ids.to(device=device, dtype=torch.long)
    N, M = int(train_ids.shape[0]), int(val_ids.shape[0])
    if N < 3 or M < 2:
        raise ValueError(f"a run needs at least 3 training and 2 validation tokens, got {N} and {M}")
    V, E = data.embedding.shape
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as CVFP: large-vocabulary softmax gradients are full of denormals

    model = build(cfg, data.embedding.to(device), device)
    init(model, cfg, torch.Generator().manual_seed(seed))
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and n != "wpe"]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.dim() != 2 or n == "wpe")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )  # fmt: skip

    def amp():
        if precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    starts, L = train_windows(N, cfg.context_length)
    starts_t = torch.tensor(starts, device=device)
    offsets = torch.arange(L, device=device)
    g_shuffle = torch.Generator().manual_seed(seed)
    best = (math.inf, math.nan, math.nan)
    best_epoch, stopped, bad, history = 0, 0, 0, []
    train_secs = eval_secs = 0.0
    for epoch in range(1, cfg.max_epochs + 1):
        t0 = time.perf_counter()
        order = torch.randperm(len(starts), generator=g_shuffle).to(device)
        total, count = torch.zeros((), device=device), 0  # summed on the device: no sync per step
        for i in range(0, len(starts), cfg.batch_size):
            idx = starts_t[order[i : i + cfg.batch_size]][:, None] + offsets  # (B, L) positions
            x, y = train_ids[idx], train_ids[idx + 1]  # (B, L)
            with amp():
                logits = model(x)  # (B, L, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            total += loss.detach() * x.shape[0]
            count += x.shape[0]
        train_loss = float(total) / max(count, 1)  # (synchronises)
        if not math.isfinite(train_loss):  # a NaN/Inf step leaves its mark in the sum
            raise NonFiniteLoss(f"gpt: training loss is {train_loss} in epoch {epoch}")
        t1 = time.perf_counter()
        val_loss, val_se, val_acc = _evaluate(model, val_ids, cfg, amp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_secs += t1 - t0
        eval_secs += time.perf_counter() - t1
        if not math.isfinite(val_loss):
            raise NonFiniteLoss(f"gpt: validation loss is {val_loss} at epoch {epoch}")
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc})
        progress("phase2", epoch=epoch, max_epochs=cfg.max_epochs, val_ppl=math.exp(val_loss), val_acc=val_acc)
        stopped = epoch
        if val_loss < best[0]:
            best, best_epoch, bad = (val_loss, val_se, val_acc), epoch, 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break

    counts = param_counts(cfg, E, V)
    val_loss, val_se, val_acc = best
    return RunResult(
        family="gpt", seed=int(seed), train_tokens=N, val_tokens=M, val_loss=val_loss, val_loss_se=val_se,
        val_ppl=math.exp(val_loss), val_acc=val_acc, params=counts, seconds=time.perf_counter() - t_start,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type, precision=precision,
        phase_seconds={"train": train_secs, "eval": eval_secs},
        capped=["max_epochs"] if best_epoch >= cfg.max_epochs else [],
        metrics={
            "best_epoch": best_epoch, "stopped_epoch": stopped,
            "train_tokens_per_s": (N - 1) * stopped / train_secs if train_secs > 0 else math.nan,
            "embed_dim": E, "vocab_size": V, "d_model": _width(cfg, E),
        },
        history={"epochs": history},
    )  # fmt: skip


family = Family(
    name="gpt", config=GPTConfig, param_counts=param_counts, train=train, version=1,
    description="decoder-only pre-LN transformer on the frozen pretrained embedding and tied head",
)  # fmt: skip
