"""A plain, slow transcription of the CVFP specification (docs/model.md), used only as a test oracle.

Nothing here is shared with the engine but the config dataclasses: layers are written
out with explicit tensors, token vectors are built position by position, phase 1 walks
its batches one at a time, and the validation pass calls the whole block step by step.
Parameters and random numbers are drawn in the order the engine documents, so that both
compute the same numbers from the same seed (fp32, CPU, tiny shapes only).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from archsearch.config import RunConfig


def _layer_norm(x, gain, bias, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * gain + bias


def _linear(shape_out, shape_in, cfg, g, device):
    w = torch.empty(shape_out, shape_in).normal_(0.0, cfg.model.init_std, generator=g).to(device).requires_grad_()
    b = torch.empty(shape_out).normal_(0.0, cfg.model.init_bias_std, generator=g).to(device).requires_grad_()
    return [w, b]


def _norm(dim, device):
    return [torch.ones(dim, device=device, requires_grad=True), torch.zeros(dim, device=device, requires_grad=True)]


class Reference:
    def __init__(self, cfg: RunConfig, embedding: torch.Tensor, seed: int, device: str | torch.device = "cpu"):
        self.cfg = cfg
        m = cfg.model
        self.device = d = torch.device(device)
        self.W = embedding.float().to(d)
        V, E = self.W.shape
        self.V, self.E, self.k, self.L, self.C = V, E, m.num_input_tokens, m.num_layers, m.context_dim
        self.eps = m.layernorm_eps
        g = torch.Generator().manual_seed(seed)
        C, Ek = self.C, E * self.k
        # ContextBlock: per layer fc (C, C+Ek) and LayerNorm(C)
        self.ctx_layers = [(_linear(C, C + Ek, cfg, g, d), _norm(C, d)) for _ in range(self.L)]
        # TokenBlock: per layer fc (d_out, C+d_in), optional proj (d_out, d_in), LayerNorm(d_out)
        widths = [Ek - ((Ek - E) * i) // self.L for i in range(self.L + 1)]
        self.tok_layers = []
        for i in range(self.L):
            d_in, d_out = widths[i], widths[i + 1]
            fc = _linear(d_out, C + d_in, cfg, g, d)
            proj = _linear(d_out, d_in, cfg, g, d) if d_in != d_out else None
            self.tok_layers.append((fc, proj, _norm(d_out, d)))

    # -- pieces -----------------------------------------------------------------------
    def token_vector(self, ids: list[int], t: int) -> torch.Tensor:
        parts = []
        for j in range(self.k):
            pos = t - self.k + 1 + j
            if pos < 0:
                parts.append(torch.zeros(self.E, device=self.device))
            else:
                e = self.W[ids[pos]]
                parts.append(_layer_norm(e, 1.0, 0.0, self.eps))
        return torch.cat(parts)

    def context_block(self, context: torch.Tensor, tokvec: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for (w, b), (gn, bn) in self.ctx_layers:
            delta = torch.relu(torch.cat([context, tokvec], -1) @ w.T + b)
            context = _layer_norm(context + delta, gn, bn, self.eps)
            outs.append(context)
        return outs

    def token_block(self, contexts: list[torch.Tensor], tokvec: torch.Tensor) -> torch.Tensor:
        h = tokvec
        for ((w, b), proj, (gn, bn)), c in zip(self.tok_layers, contexts):
            delta = torch.relu(torch.cat([c, h], -1) @ w.T + b)
            residual = h if proj is None else h @ proj[0].T + proj[1]
            h = _layer_norm(residual + delta, gn, bn, self.eps)
        return h

    def ctx_params(self):
        return [p for (lin, norm) in self.ctx_layers for p in lin + norm]

    def tok_params(self):
        ps = []
        for fc, proj, norm in self.tok_layers:
            ps += fc + (proj or []) + norm
        return ps

    @staticmethod
    def clip(params, max_norm):
        total = math.sqrt(sum(float((p.grad**2).sum()) for p in params if p.grad is not None))
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)

    # -- protocol ------------------------------------------------------------------------
    def phase1(self, ids: list[int], g: torch.Generator) -> tuple[torch.Tensor, list[dict]]:
        p1 = self.cfg.phase1
        N, C, B = len(ids), self.C, p1.batch_size
        tok = torch.stack([self.token_vector(ids, t) for t in range(N)])
        params = self.ctx_params()
        opt = torch.optim.Adam(params, lr=p1.lr)
        prev = torch.randn(N, C, generator=g, device=g.device) * p1.init_context_std
        history = [{"iteration": 1, "convergence_rate": 0.0}]
        num_batches = math.ceil(N / B)
        for it in range(2, p1.max_iterations + 1):
            noise = torch.randn(N, C, generator=g, device=g.device) * p1.noise_std
            for p in params:
                p.grad = None
            outs, losses = [], []
            for s in range(0, N, B):
                idx = list(range(s, min(s + B, N)))
                inp = torch.stack([prev[i - 1] if i > 0 else prev[N - 1] for i in idx]) + noise[idx]
                out = self.context_block(inp, tok[idx])[-1]
                cvfp = ((out - prev[idx]) ** 2).mean()
                div = -torch.sqrt(((out - out.mean(0, keepdim=True)) ** 2).sum()) / len(idx)
                loss = (1 - p1.dist_reg_weight) * cvfp + p1.dist_reg_weight * div
                if math.isfinite(float(loss.detach())):
                    (loss / num_batches).backward()
                losses.append(float(loss.detach()))
                outs.append(out.detach())
            self.clip(params, p1.grad_clip)
            opt.step()
            out_all = torch.cat(outs)
            rate = float((((out_all - prev) ** 2).mean(1) < p1.convergence_threshold).float().mean())
            prev = out_all
            history.append({"iteration": it, "loss": sum(losses) / num_batches, "convergence_rate": rate})
            if it >= p1.min_iterations and rate >= p1.min_converged_fraction:
                break
        return prev, history

    @torch.no_grad()
    def train_cache(self, ids: list[int], contexts: torch.Tensor) -> torch.Tensor:
        N = len(ids)
        rows = []
        for t in range(N - 1):
            inp = torch.zeros(self.C, device=self.device) if t == 0 else contexts[t - 1]
            rows.append(torch.stack(self.context_block(inp, self.token_vector(ids, t))))
        return torch.stack(rows, dim=1)  # (L, N-1, C)

    @torch.no_grad()
    def val_cache(self, ids: list[int]) -> torch.Tensor:
        ctx = torch.zeros(self.C, device=self.device)
        rows = []
        for t in range(len(ids) - 1):
            outs = self.context_block(ctx, self.token_vector(ids, t))
            rows.append(torch.stack(outs))
            ctx = outs[-1]
        return torch.stack(rows, dim=1)  # (L, M-1, C)

    def _ce_acc(self, ids, cache, s, e):
        tok = torch.stack([self.token_vector(ids, t) for t in range(s, e)])
        h = self.token_block([cache[i, s:e] for i in range(self.L)], tok)
        logits = h @ self.W.T
        targets = torch.tensor(ids[s + 1 : e + 1], device=self.device)
        logp = logits - torch.logsumexp(logits, -1, keepdim=True)
        ce = -logp[torch.arange(e - s, device=self.device), targets]
        correct = (logits.argmax(-1) == targets).float()
        return ce, correct

    def evaluate(self, ids, cache) -> tuple[float, float, float]:
        """(mean CE, accuracy, standard error of the mean CE: sample std / sqrt(positions))."""
        with torch.no_grad():
            ce, correct = self._ce_acc(ids, cache, 0, len(ids) - 1)
        return float(ce.mean()), float(correct.mean()), float(ce.double().std() / math.sqrt(ce.numel()))

    def phase2(self, ids, cache, val_ids, val_cache) -> tuple[dict, list[dict]]:
        p2 = self.cfg.phase2
        params = self.tok_params()
        opt = torch.optim.Adam(params, lr=p2.lr)
        n = len(ids) - 1
        best = {"val_loss": math.inf}
        history, bad = [], 0
        for epoch in range(1, p2.max_epochs + 1):
            for s in range(0, n, p2.batch_size):
                e = min(s + p2.batch_size, n)
                ce, _ = self._ce_acc(ids, cache, s, e)
                for p in params:
                    p.grad = None
                ce.mean().backward()
                self.clip(params, p2.grad_clip)
                opt.step()
            val_loss, val_acc, val_se = self.evaluate(val_ids, val_cache)
            history.append({"epoch": epoch, "val_loss": val_loss, "val_acc": val_acc})
            if val_loss < best["val_loss"]:
                best = {"val_loss": val_loss, "val_loss_se": val_se, "val_ppl": math.exp(val_loss), "val_acc": val_acc, "best_epoch": epoch}
                bad = 0
            else:
                bad += 1
                if bad >= p2.patience:
                    break
        best["stopped_epoch"] = epoch
        return best, history

    @staticmethod
    def effective_rank(x: torch.Tensor, max_rows: int, g: torch.Generator) -> float:
        if x.shape[0] > max_rows:
            x = x[torch.randperm(x.shape[0], generator=g)[:max_rows].to(x.device)]
        s = torch.linalg.svdvals(x)
        p = s / s.sum()
        return float(torch.exp(-(p * torch.log(p + 1e-10)).sum())) / x.shape[1]


def reference_run(cfg: RunConfig, embedding: torch.Tensor, train_ids, val_ids, seed: int, device="cpu") -> dict[str, Any]:
    """Everything cvfp.md defines for one run, computed the slow way (``device``: where its
    tensors live; the phase-1 random numbers come from a generator on that device)."""
    torch.manual_seed(seed)
    train_ids, val_ids = [int(i) for i in train_ids], [int(i) for i in val_ids]
    ref = Reference(cfg, embedding, seed, device)
    contexts, p1_hist = ref.phase1(train_ids, torch.Generator(device=ref.device).manual_seed(seed))
    train_cache = ref.train_cache(train_ids, contexts)
    val_cache = ref.val_cache(val_ids)
    g_er = torch.Generator().manual_seed(seed)
    train_er = ref.effective_rank(contexts, cfg.engine.er_max_rows, g_er)
    val_er = ref.effective_rank(val_cache[-1], cfg.engine.er_max_rows, g_er)
    best, p2_hist = ref.phase2(train_ids, train_cache, val_ids, val_cache)
    return {
        "contexts": contexts,
        "train_cache": train_cache,
        "val_cache": val_cache,
        "phase1_history": p1_hist,
        "phase1_iterations": p1_hist[-1]["iteration"],
        "train_er": train_er,
        "val_er": val_er,
        "phase2_history": p2_hist,
        **best,
    }
