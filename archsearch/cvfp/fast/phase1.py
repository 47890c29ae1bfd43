"""Phase 1's fused iteration (``engine.phase1_fused``; standard ContextBlocks, Triton).

The same iteration as phases.plain_iteration (cvfp.md 4: one full-data gradient step, the
per-batch MSE + diversity loss, NaN/Inf batches skipped, the convergence rate), without
autograd, per chunk of ``phase1.batch_size * engine.phase1_chunk_batches`` positions:

- forward: the token vectors gathered once in the GEMM dtype (a bf16 copy of the frozen
  table: no cast), then the token half of every layer in ONE GEMM, x (n, E*k) @ [W_token of
  all L layers]^T -> Z (n, L*C); per layer only the (C x C) product of the context, added to
  its slice of Z by the GEMM itself (addmm, beta 1), and phase1_kernels.ln_fwd (the bias, the
  ReLU, the residual and the norm; the output in fp32 and in the GEMM dtype for the next
  layer's product). No concatenation. The input contexts come from one kernel (roll, noise,
  cast); the last layer writes straight into the iteration's output.
- loss: two reductions over the chunk's output (column sums, squared error and convergence
  count per batch; then the spread about the batch mean), a few (nb,)-sized ops for the
  per-batch loss and its two gradient coefficients, no host sync;
- backward: the last layer's norm backward forms the loss gradient inline; each layer's dz is
  written over its slice of Z; d W_context and d context per layer (d context added to the
  residual's gradient by the GEMM), and d W_token of all layers as ONE GEMM, Z^T @ x, all
  accumulated in fp32 over the chunks. No d token vector.

Weights are cast to the GEMM dtype once per iteration (not per chunk and layer), straight into
the two operand buffers (no stack, no reshape copy). The gradients land in the parameters'
``.grad`` after the last chunk, for the caller's clip and Adam step. Buffers are allocated once
per phase 1, for the largest chunk.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from archsearch.cvfp.fast.layers import _mm
from archsearch.cvfp.precision import gemm_dtype, precision_scope


def _acc(buf: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """buf (fp32) += a @ b, in the GEMM where the build allows."""
    r = _mm(a, b, buf, torch.float32)
    if r.data_ptr() != buf.data_ptr():
        buf.copy_(r)


class FusedPhase1:
    def __init__(self, layers: nn.ModuleList, context_dim: int, emb, windows: torch.Tensor, cfg):
        from archsearch.cvfp.fast import phase1_kernels as K

        self.K, self.layers, self.cfg = K, layers, cfg
        self.L, self.C = L, C = len(layers), context_dim
        self.Ek = layers[0].fc.in_features - C
        self.eps = layers[0].norm.eps
        assert all(layer.norm.eps == self.eps for layer in layers)
        dev = windows.device
        self.device, self.windows, self.k = dev, windows, windows.shape[1]
        self.dtype = gemm_dtype(cfg.engine.precision)
        self.table = emb.normed.to(self.dtype)  # (V+1, E): the frozen, normalised embedding
        N, B = windows.shape[0], cfg.phase1.batch_size
        self.B = B
        n = min(B * cfg.engine.phase1_chunk_batches, max((N // B) * B, N % B))  # the largest span
        self.n, nb = n, max(1, math.ceil(n / B))
        f32, g16 = torch.float32, self.dtype
        self.x16 = torch.empty(n, self.Ek, device=dev, dtype=g16)  # (n, E*k) token vectors
        self.in16 = torch.empty(n, C, device=dev, dtype=g16)  # (n, C) input contexts, GEMM dtype
        self.Z = torch.empty(n, L * C, device=dev, dtype=g16)  # (n, L*C) pre-activations, then their gradients
        self.Y = torch.empty(max(L - 1, 1), n, C, device=dev, dtype=f32)  # outputs of layers 0..L-2 (residuals)
        self.Y16 = torch.empty(max(L - 1, 1), n, C, device=dev, dtype=g16)  # the same as GEMM operands
        self.mean = torch.empty(L, n, device=dev, dtype=f32)
        self.rstd = torch.empty(L, n, device=dev, dtype=f32)
        self.dy = torch.empty(n, C, device=dev, dtype=f32)  # d (layer output), then d (its residual)
        self.P = K.batch_programs(min(B, n), nb, C, dev)
        self.col = torch.empty(nb, self.P, C, device=dev, dtype=f32)
        self.s1 = torch.empty(nb, self.P, device=dev, dtype=f32)
        self.s2 = torch.empty(nb, self.P, device=dev, dtype=f32)
        self.cnt = torch.empty(nb, self.P, device=dev, dtype=f32)
        self.part = torch.empty(K.max_bwd_programs(n, C, dev), 3 * C, device=dev, dtype=f32)
        self.gWc = torch.empty(L, C, C, device=dev, dtype=f32)
        self.gWt = torch.empty(L * C, self.Ek, device=dev, dtype=f32)
        self.gvec = torch.empty(L, 3, C, device=dev, dtype=f32)  # d gamma, d beta, d bias per layer
        self.Wc = torch.empty(L, C, C, device=dev, dtype=g16)  # the context halves, GEMM dtype
        self.Wt = torch.empty(L * C, self.Ek, device=dev, dtype=g16)  # the token halves of all layers, stacked

    @torch.no_grad()
    def iteration(self, prev: torch.Tensor, noise: torch.Tensor, out_all: torch.Tensor, spans, num_batches: int):
        """One trained iteration: ``noise`` (N, C) becomes the input contexts, ``out_all`` (N, C)
        the outputs; the parameters' ``.grad`` the gradient of the summed batch losses / num_batches.
        Returns ((loss, cvfp, diversity) summed over finite batches, converged fraction), both
        tensors on the device."""
        C = self.C
        for i, layer in enumerate(self.layers):  # cast straight into the GEMM operands: no stack, no reshape copy
            w = layer.fc.weight.detach()  # (C, C + E*k)
            self.Wc[i].copy_(w[:, :C])
            self.Wt[i * C : (i + 1) * C].copy_(w[:, C:])
        self.gWc.zero_()
        self.gWt.zero_()
        self.gvec.zero_()
        sums = torch.zeros(3, device=self.device)
        count = torch.zeros((), device=self.device)
        # bf16 operands are bf16 already (autocast would cast the fp32 addends); fp32 and tf32
        # products as the run's precision says
        prec = "fp32" if self.cfg.engine.precision == "bf16" else self.cfg.engine.precision
        with torch.autocast(self.device.type, enabled=False), precision_scope(prec, self.device):
            for s, e in spans:
                self._span(prev, noise, out_all, s, e, num_batches, sums, count)
        for i, layer in enumerate(self.layers):
            layer.fc.weight.grad = torch.cat([self.gWc[i], self.gWt[i * C : (i + 1) * C]], dim=1)
            layer.fc.bias.grad = self.gvec[i, 2]
            layer.norm.weight.grad = self.gvec[i, 0]
            layer.norm.bias.grad = self.gvec[i, 1]
        return sums, count / prev.shape[0]

    def _span(self, prev, noise, out_all, s, e, num_batches, sums, count) -> None:
        K, C, L, B = self.K, self.C, self.L, self.B
        n = e - s
        p1 = self.cfg.phase1
        x16, in16, Z = self.x16[:n], self.in16[:n], self.Z[:n]
        torch.index_select(self.table, 0, self.windows[s:e].reshape(-1), out=x16.view(n * self.k, -1))
        K.inputs(prev, noise, in16, s, e)
        torch.mm(x16, self.Wt.t(), out=Z)  # the token half of every layer, one GEMM
        out, target = out_all[s:e], prev[s:e]
        for i, layer in enumerate(self.layers):
            z = Z[:, i * C : (i + 1) * C]
            ctx16 = in16 if i == 0 else self.Y16[i - 1, :n]
            torch.addmm(z, ctx16, self.Wc[i].t(), out=z)  # + the context half, added by the GEMM
            r = noise[s:e] if i == 0 else self.Y[i - 1, :n]
            last = i == L - 1
            K.ln_fwd(z, layer.fc.bias, r, layer.norm.weight, layer.norm.bias, self.eps, out if last else self.Y[i, :n],
                     None if last else self.Y16[i, :n], self.mean[i, :n], self.rstd[i, :n])  # fmt: skip

        # the per-batch loss (cvfp.md 4) and the convergence count
        nb = max(1, n // B) if n % B == 0 else 1
        blen = n // nb
        col, s1, s2, cnt = self.col[:nb], self.s1[:nb], self.s2[:nb], self.cnt[:nb]
        K.batch_stats(out, target, B, p1.convergence_threshold, col, s1, cnt)
        mu = col.sum(1) / blen  # (nb, C)
        K.batch_spread(out, mu, B, s2)
        w = p1.dist_reg_weight
        cvfp = s1.sum(1) / (blen * C)  # (nb,)
        norm = s2.sum(1).sqrt()
        div = -norm / blen
        loss = (1.0 - w) * cvfp + w * div
        ok = torch.isfinite(loss)
        zero = torch.zeros((), device=self.device)
        sums += torch.stack([torch.where(ok, loss, zero).sum(), torch.where(ok, cvfp, zero).sum(), torch.where(ok, div, zero).sum()])
        count += cnt.sum()
        ca = torch.where(ok, torch.full_like(loss, 2.0 * (1.0 - w) / (blen * C * num_batches)), zero)
        cc = torch.where(ok & (norm > 0), -w / (norm * blen * num_batches), zero)  # a zero spread has gradient 0 (torch's norm)
        okf = ok.float()

        # backward, last layer first
        dy = self.dy[:n]
        for i in reversed(range(L)):
            layer = self.layers[i]
            z = Z[:, i * C : (i + 1) * C]
            ctx16 = in16 if i == 0 else self.Y16[i - 1, :n]
            r = noise[s:e] if i == 0 else self.Y[i - 1, :n]
            last = i == L - 1
            part = K.ln_bwd(None if last else dy, (out, target, mu, ca, cc) if last else None, okf, z, layer.fc.bias, r,
                     layer.norm.weight, self.mean[i, :n], self.rstd[i, :n], dy if i > 0 else None, ctx16,
                     self.part, B)  # fmt: skip
            K.col_acc(part, self.gvec[i].view(-1))
            _acc(self.gWc[i], z.t(), ctx16)  # d W_context
            if i > 0:
                _acc(dy, z, self.Wc[i])  # d context, added to the residual's gradient
        _acc(self.gWt, Z.t(), x16)  # d W_token of every layer, one GEMM
