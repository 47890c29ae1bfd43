"""A model family of your own, in one file: a small LSTM language model.

Nothing in archsearch is edited to use it. A space file names it by ``module:attr``
(run from the repository root, so that ``examples`` is importable)::

    model: {family: "examples.lstm_family:family", hidden: 64}

or by path (``family: "examples/lstm_family.py:family"``, relative to the current
directory), or, once a package of yours declares it, by an entry-point name::

    [project.entry-points."archsearch.families"]
    lstm = "mypkg.lstm_family:family"

See ``spaces/lstm_family_tiny.yaml`` and ``archsearch.families`` for the protocol: a name, a
config dataclass (defaults, bounds in the field metadata, an optional ``problems()``), the
parameter counts from the config alone, and ``train(...) -> RunResult``.

The model: the frozen pretrained embedding (LayerNorm'd, like CVFP's token vectors), a
Linear(E -> hidden), ``num_layers`` LSTM layers, a Linear(hidden -> E) and the frozen tied
head (``logits = h W^T``). Trained with Adam on windows of ``context_length`` tokens, one
epoch at a time, early stopping on the validation loss. Validation carries the LSTM state
through the whole validation stream in chunks (truncated backprop is not needed there), so
every target 1..M-1 is predicted from all the tokens before it, as CVFP's recurrent pass does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from archsearch.families import Family, RunData
from archsearch.result import RunResult


@dataclass
class LSTMConfig:
    hidden: int = field(default=64, metadata={"low": 1, "high": 4096})
    num_layers: int = field(default=1, metadata={"low": 1, "high": 8})
    context_length: int = field(default=64, metadata={"low": 2, "high": 4096})
    lr: float = field(default=3e-3, metadata={"low": 0.0, "strict_low": True, "high": 1.0})
    batch_size: int = field(default=16, metadata={"low": 1, "high": 4096})
    max_epochs: int = field(default=5, metadata={"low": 1, "high": 1000})
    patience: int = field(default=1, metadata={"low": 1, "high": 1000})


def param_counts(cfg: LSTMConfig, embed_dim: int, vocab_size: int) -> dict[str, int]:
    E, H, L = embed_dim, cfg.hidden, cfg.num_layers
    lstm = L * (4 * H * (H + H) + 8 * H)  # per layer: W_ih (4H x H), W_hh (4H x H), two biases
    proj = (E * H + H) + (H * E + E)
    return {"lstm": lstm, "projections": proj, "total": lstm + proj}


def _model(cfg: LSTMConfig, embedding):
    import torch
    from torch import nn
    from torch.nn import functional as F

    E = embedding.shape[1]

    class LSTMLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("normed", F.layer_norm(embedding.float(), (E,)))  # (V, E), frozen
            self.register_buffer("head", embedding.float().clone())  # (V, E), frozen tied head
            self.inp = nn.Linear(E, cfg.hidden)
            self.lstm = nn.LSTM(cfg.hidden, cfg.hidden, cfg.num_layers, batch_first=True)
            self.out = nn.Linear(cfg.hidden, E)

        def forward(self, ids, state=None):  # (B, T) -> (B, T, V), state
            h, state = self.lstm(self.inp(self.normed[ids]), state)  # (B, T, H)
            return self.out(h) @ self.head.t(), state

    return LSTMLM()


def train(cfg: LSTMConfig, data: RunData, seed: int, device: str = "cpu", progress=None) -> RunResult:
    import torch
    from torch.nn import functional as F

    progress = progress or (lambda *a, **k: None)
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    dev = torch.device(device)
    train_ids, val_ids = data.train_ids.to(dev), data.val_ids.to(dev)
    N, M = len(train_ids), len(val_ids)
    model = _model(cfg, data.embedding.to(dev)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    T = min(cfg.context_length, N - 1)
    starts = torch.arange(0, N - T, T, device=dev)  # (W,) non-overlapping windows
    offsets = torch.arange(T, device=dev)
    gen = torch.Generator().manual_seed(seed)

    def evaluate():
        model.eval()
        losses, hits, state = [], [], None
        with torch.no_grad():
            for s in range(0, M - 1, 1024):  # the state is carried across chunks
                x, y = val_ids[s : min(s + 1024, M - 1)][None], val_ids[s + 1 : min(s + 1025, M)][None]
                logits, state = model(x, state)
                losses.append(F.cross_entropy(logits[0], y[0], reduction="none"))
                hits.append((logits[0].argmax(-1) == y[0]).float())
        model.train()
        ce = torch.cat(losses).double()
        return float(ce.mean()), float(ce.std() / math.sqrt(ce.numel())), float(torch.cat(hits).mean())

    best, best_epoch, bad, stopped, t_train = (math.inf, math.nan, math.nan), 0, 0, 0, 0.0
    for epoch in range(1, cfg.max_epochs + 1):
        t0 = time.perf_counter()
        order = starts[torch.randperm(len(starts), generator=gen).to(dev)]
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size, None] + offsets  # (B, T)
            logits, _ = model(train_ids[idx])
            loss = F.cross_entropy(logits.flatten(0, 1), train_ids[idx + 1].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        t_train += time.perf_counter() - t0
        val = evaluate()
        progress("phase2", epoch=epoch, max_epochs=cfg.max_epochs, val_ppl=math.exp(val[0]), val_acc=val[2])
        stopped = epoch
        if val[0] < best[0]:
            best, best_epoch, bad = val, epoch, 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    E, V = data.embedding.shape[1], data.embedding.shape[0]
    return RunResult(
        family="lstm", seed=seed, train_tokens=N, val_tokens=M, val_loss=best[0], val_loss_se=best[1],
        val_ppl=math.exp(best[0]), val_acc=best[2], params=param_counts(cfg, E, V),
        seconds=time.perf_counter() - t_start, device=dev.type, precision="fp32",
        phase_seconds={"train": t_train}, capped=["max_epochs"] if best_epoch == cfg.max_epochs else [],
        metrics={"best_epoch": best_epoch, "stopped_epoch": stopped, "embed_dim": E, "vocab_size": V},
    )


family = Family(name="lstm", config=LSTMConfig, param_counts=param_counts, train=train, version=1,
                description="a small LSTM LM on the frozen embedding and tied head (examples/lstm_family.py)")
