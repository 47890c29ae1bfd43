"""Phase 2's fused step (``engine.phase2_fused``; standard TokenBlocks, CUDA + Triton, bf16).

The same step as graphs.Phase2Step (cvfp.md 7: forward through the TokenBlock, the tied-head
mean cross-entropy, backward, the gradient clip by total norm, Adam), without autograd:

- parameters: every TokenBlock parameter is a view of ONE flat fp32 buffer (the module's
  parameters are re-pointed at it, so the evaluator and the caller read the trained values
  there), laid out per layer as fc.weight, [proj.weight, proj.bias], norm.weight, norm.bias,
  fc.bias, so that the norm backward's three vector gradients (d gamma, d beta, d bias) are
  one contiguous span; their gradients are views of one flat fp32 buffer that the GEMMs
  write (beta 0: no zeroing kernel, no accumulation); Adam's m and v are flat too, and a
  copy of the parameters in the GEMM dtype (the bf16 shadow, one flat buffer) is written by
  the optimizer kernel itself: no per-layer weight casts;
- forward: per layer one GEMM of its input (layers.forward_packed's GEMM input: the contexts
  in place, the token written there by the previous layer's norm; no concatenation), the
  projected residual's GEMM with its bias where the widths differ, kernels.res_relu_ln_fwd
  (the bias, ReLU, residual and LayerNorm in fp32), the last layer's output written in the
  head's dtype by the same kernel; the head: logits GEMM, kernels.ce_rows (loss per row and
  softmax - onehot scaled by the row weight, over the logits), the d h GEMM;
- backward: kernels.res_relu_ln_bwd per layer; d W by one GEMM each into the flat gradient;
  the token's gradient by a GEMM that adds the residual's gradient itself (addmm, beta 1);
- the clip and Adam: phase2_kernels.clip_adam, two launches over the flat buffers;
- a batch's contexts into every layer's GEMM input (one buffer for all layers) by one kernel,
  the token vectors gathered straight into layer 0's (phase2_kernels).

Where ``graphed`` (CUDA, graphs.Phase2Session), a full batch is captured once as a CUDA graph
and replayed as graphs.Phase2Step is, the shorter last batch of an epoch with row weights 1/r
and 0; the warm-up step before the capture is undone (parameters, moments, step count). Else
each step runs eagerly on its own rows. Buffers are allocated once, for ``phase2.batch_size``
rows (fewer where the training stream is shorter).
"""

from __future__ import annotations

import torch

from archsearch.config import RunConfig
from archsearch.cvfp.fast.device import gemm_caps, graph_capture
from archsearch.cvfp.fast.graphs import RowWeighted
from archsearch.cvfp.model import token_vectors
from archsearch.cvfp.precision import gemm_dtype, precision_scope

ALIGN = 64
"""Every group of parameters in the flat buffers starts at a multiple of this many elements."""

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
"""torch.optim.Adam's defaults, which the plain step uses."""


def _gemm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float) -> None:
    """out = beta * out + a @ b (beta 0 or 1), written into ``out`` by the GEMM itself where the
    build can (bf16 operands, fp32 ``out``: torch 2.8+'s ``out_dtype``)."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out) if beta == 0 else torch.addmm(out, a, b, out=out)
        return
    f32_out, in_place = gemm_caps(out.device)
    if f32_out and in_place:
        torch.mm(a, b, out_dtype=out.dtype, out=out) if beta == 0 else torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        return
    r = torch.mm(a, b).to(out.dtype)
    out.copy_(r) if beta == 0 else out.add_(r)


def supported(tblock, cfg: RunConfig, device: torch.device) -> bool:
    """Whether the fused step runs this block on ``device`` (see EngineConfig.phase2_fused)."""
    from archsearch.cvfp.fast.device import triton_available
    from archsearch.cvfp.fast.layers import FusedTokenBlock

    return (cfg.engine.phase2_fused and cfg.engine.precision == "bf16" and triton_available(device)
            and isinstance(tblock, FusedTokenBlock))  # fmt: skip


class _Layer:
    """One TokenLayer's views: fp32 parameters, their GEMM-dtype shadows, their gradients."""

    def __init__(self, layer, take):
        fc, proj, norm = layer.fc, layer.proj, layer.norm
        self.d_out, self.d_in = fc.out_features, fc.in_features - layer.context_dim
        self.eps = norm.eps
        self.w = take(fc.weight)  # (d_out, C + d_in)
        self.pw = take(proj.weight) if proj is not None else None  # (d_out, d_in)
        self.pb = take(proj.bias) if proj is not None else None
        self.vec = take((norm.weight, norm.bias, fc.bias))  # gamma, beta, fc bias: one span of 3 * d_out


class FusedPhase2Step(RowWeighted):
    """graphs.Phase2Step's interface (``tblock``, ``loss_sum``, ``__call__(s, e)``, ``load``,
    ``reset_optimizer``, ``prepare``) for the fused step. ``weight``: the head (head.HeadWeight);
    ``emb``: anything with the (V+1, E) token-vector table ``normed``."""

    def __init__(self, tblock, emb, weight, cfg: RunConfig, cache, windows, targets, graphed: bool):
        self.tblock, self.emb, self.weight, self.cfg = tblock, emb, weight, cfg
        self.load(cache, windows, targets)
        dev = targets.device
        self.device = dev
        self.graphed = graphed and dev.type == "cuda"
        self.dtype = gemm_dtype(cfg.engine.precision)
        self.C = C = tblock.context_dim
        f32 = torch.float32
        layers = list(tblock.layers)
        # the flat layout: groups of parameters in the order _Layer takes them, each group
        # starting at a multiple of ALIGN elements (the GEMMs' operands aligned as a fresh
        # tensor's are; the gaps are zeros that no gradient reaches, so Adam keeps them 0)
        groups: list[list[torch.nn.Parameter]] = []
        for layer in layers:
            groups.append([layer.fc.weight])
            if layer.proj is not None:
                groups += [[layer.proj.weight], [layer.proj.bias]]
            groups.append([layer.norm.weight, layer.norm.bias, layer.fc.bias])
        assert sum(len(grp) for grp in groups) == len(list(tblock.parameters())), "every TokenBlock parameter is in the flat layout"
        offsets: dict[int, int] = {}
        off = 0
        for grp in groups:
            off = -(-off // ALIGN) * ALIGN
            for p in grp:
                offsets[id(p)] = off
                off += p.numel()
        total = -(-off // ALIGN) * ALIGN
        self.numel = total
        self.P = torch.zeros(total, device=dev, dtype=f32)
        self.G = torch.zeros(total, device=dev, dtype=f32)
        self.M = torch.zeros(total, device=dev, dtype=f32)
        self.V2 = torch.zeros(total, device=dev, dtype=f32)
        self.S = torch.empty(total, device=dev, dtype=self.dtype) if self.dtype != f32 else None
        with torch.no_grad():
            for grp in groups:
                for p in grp:
                    o = offsets[id(p)]
                    self.P[o : o + p.numel()].copy_(p.detach().reshape(-1))
                    p.data = self.P[o : o + p.numel()].view(p.shape)  # the module trains the flat buffer

        def take(spec):
            """(fp32 view, GEMM-dtype view, gradient view) of one parameter or of a span of several."""
            ps = spec if isinstance(spec, tuple) else (spec,)
            s = offsets[id(ps[0])]
            n = sum(p.numel() for p in ps)
            shape = ps[0].shape if len(ps) == 1 else (len(ps), ps[0].numel())
            for j, p in enumerate(ps):
                assert offsets[id(p)] == s + ps[0].numel() * j
            shadow = (self.S if self.S is not None else self.P)[s : s + n].view(shape)
            return self.P[s : s + n].view(shape), shadow, self.G[s : s + n].view(shape)

        self.layers = [_Layer(layer, take) for layer in layers]
        from archsearch.cvfp.fast import phase2_kernels

        self.K2 = phase2_kernels
        self.adam = phase2_kernels.adam_state(ADAM_BETAS, dev)  # step, beta1 ** step, beta2 ** step, betas
        self.norm_scratch = phase2_kernels.norm_scratch(total, dev)  # the norm's partials, the clip's factor, a count
        self._sync_shadow()

        B = cfg.phase2.batch_size
        self.B = rows = min(B, max(1, targets.shape[0]))
        # per layer its (rows, C + d_in) GEMM input: the batch's contexts, then the token (written by
        # the previous layer's norm); all in one buffer, so that one kernel fills every layer's contexts
        sizes = [-(-rows * (C + lay.d_in) // ALIGN) * ALIGN for lay in self.layers]
        self.packed_flat = torch.zeros(sum(sizes), device=dev, dtype=self.dtype)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.packed = [self.packed_flat[o : o + rows * (C + lay.d_in)].view(rows, C + lay.d_in) for o, lay in zip(starts, self.layers)]
        self.packed_meta = phase2_kernels.layer_inputs_meta(self.packed_flat, self.packed)
        E = self.layers[-1].d_out
        self.h16 = torch.empty(rows, E, device=dev, dtype=self.dtype)  # the last layer's output, the head's input
        self.grad_h = torch.empty(rows, E, device=dev, dtype=self.dtype)
        self.chunk = min(rows, weight.chunk_rows)
        self.logits = torch.empty(self.chunk, weight.matrix.shape[0], device=dev, dtype=weight.dtype)
        self.loss_rows = torch.empty(rows, device=dev, dtype=f32)
        self.win = torch.zeros(rows, windows.shape[1], device=dev, dtype=windows.dtype)
        self.tgt = torch.zeros(rows, device=dev, dtype=targets.dtype)
        self._init_rows(rows, dev)
        self.loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        self.graph: torch.cuda.CUDAGraph | None = None

    def load(self, cache, windows, targets) -> None:
        """The training data the steps read (each step copies its batch into the step's buffers)."""
        self.cache, self.windows, self.targets = cache, windows, targets

    @torch.no_grad()
    def _sync_shadow(self) -> None:
        if self.S is not None:
            self.S.copy_(self.P)

    @torch.no_grad()
    def reset_optimizer(self) -> None:
        """Adam as new (moments and step count zeroed in place: the graph holds them), the
        shadow of the parameters, which a new run has just copied in, refreshed, and every
        buffer a step reads zeroed (gradients, batch buffers, head buffers), so that a run starts
        from the same state whether its session is new (after the undone warm-up step) or kept."""
        for t in (self.M, self.V2, self.G, *self.norm_scratch, self.packed_flat, self.h16, self.grad_h, self.logits, self.loss_rows,
                  self.win, self.tgt):  # fmt: skip
            t.zero_()
        self.K2.reset_adam_state(self.adam)
        self._sync_shadow()
        self._set_rows(self.B)

    def _fill(self, s: int, e: int) -> None:
        r = e - s
        self.K2.fill_contexts(self.cache, s, e, self.packed_flat, self.packed_meta)
        self.win[:r].copy_(self.windows[s:e])
        self.tgt[:r].copy_(self.targets[s:e])

    @torch.no_grad()
    def _compute(self, r: int) -> None:
        """One step on the first r rows of the buffers, the loss weighted by ``row_weight``."""
        from archsearch.cvfp.fast.kernels import ce_rows, res_relu_ln_bwd, res_relu_ln_fwd

        C, L, f32 = self.C, len(self.layers), torch.float32
        prec = "fp32" if self.cfg.engine.precision == "bf16" else self.cfg.engine.precision
        with torch.autocast(self.device.type, enabled=False), precision_scope(prec, self.device):
            # forward
            # the token vectors into layer 0's GEMM input; in fp32 too where they are its residual
            first = self.layers[0]
            vec = None if first.pw is not None else torch.empty(r, first.d_in, device=self.device, dtype=f32)
            if self.dtype == f32:
                vec = token_vectors(self.emb.normed, self.win[:r])  # (r, E*k)
                self.packed[0][:r, C:].copy_(vec)
            else:
                self.K2.gather_tokens(self.emb.normed, self.win[:r], self.packed[0][:r, C:], vec)
            h = vec
            saved = []
            for i, lay in enumerate(self.layers):
                x = self.packed[i][:r]
                z = torch.mm(x, lay.w[1].t())  # (r, d_out), GEMM dtype, without the bias
                if lay.pw is not None:
                    res = torch.addmm(lay.pb[1], x[:, C:], lay.pw[1].t())  # (r, d_out), GEMM dtype
                else:
                    res = h
                vec32 = lay.vec[0]
                last = i == L - 1
                out16 = self.packed[i + 1][:r, C:] if not last else (self.h16[:r] if self.dtype != f32 else None)
                h, mean, rstd = res_relu_ln_fwd(z, res, vec32[0], vec32[1], lay.eps, vec32[2], out16)
                saved.append((z, res, mean, rstd))
            h16 = self.h16[:r] if self.dtype != f32 else h
            # the tied head: loss per row, d loss / d h (rows scaled by their weights)
            Wh = self.weight.matrix
            for s in range(0, r, self.chunk):
                e = min(s + self.chunk, r)
                logits = self.logits[: e - s]
                torch.mm(h16[s:e], Wh.t(), out=logits)
                ce_rows(logits, self.tgt[s:e], self.loss_rows[s:e], None, write_grad=True, vocab_size=self.weight.vocab_size,
                        row_scale=self.row_weight[s:e])  # fmt: skip
                torch.mm(logits, Wh, out=self.grad_h[s:e])
            self.K2.add_loss(self.loss_rows[:r], self.row_weight[:r], self.rows, self.loss_sum)
            # backward, last layer first
            dy = self.grad_h[:r]
            vec_grads, vec_dst = [], []
            for i in reversed(range(L)):
                lay = self.layers[i]
                z, res, mean, rstd = saved[i]
                x = self.packed[i][:r]
                vec32 = lay.vec[0]
                need_dr = i > 0 or lay.pw is not None
                dz, dr, dg, db, dzb = res_relu_ln_bwd(dy, z, res, vec32[0], mean, rstd, need_dr, vec32[2])
                vec_grads += [dg, db, dzb]
                vec_dst += list(lay.vec[2].unbind(0))
                _gemm(lay.w[2], dz.t(), x, 0.0)  # d W (fp32, written by the GEMM)
                if lay.pw is not None:
                    _gemm(lay.pw[2], dr.t(), x[:, C:], 0.0)
                    torch.sum(dr, 0, dtype=f32, out=lay.pb[2])
                if i > 0:  # d token: the fc's part and the residual's, fp32
                    w_tok = lay.w[1][:, C:]
                    if lay.pw is None:
                        _gemm(dr, dz, w_tok, 1.0)  # dr is fp32 here (the residual is the token itself)
                        dy = dr
                    else:
                        dy = torch.empty(r, lay.d_in, device=self.device, dtype=f32)
                        _gemm(dy, dz, w_tok, 0.0)
                        _gemm(dy, dr, lay.pw[1], 1.0)
            torch._foreach_copy_(vec_dst, vec_grads)
            p2 = self.cfg.phase2
            self.K2.clip_adam(self.P, self.G, self.M, self.V2, self.S, self.norm_scratch, self.adam, p2.lr, ADAM_BETAS, ADAM_EPS,
                              p2.grad_clip)  # fmt: skip

    def prepare(self) -> None:
        """Capture the step (graphed only). One step on the first batch first compiles the
        kernels and initialises cuBLAS; the parameters, moments and step count are then put
        back as they were, so the run's first step is a replay like every other one."""
        if not self.graphed or self.graph is not None:
            return
        initial = self.P.clone()
        self._set_rows(self.B)
        self._fill(0, self.B)
        self._compute(self.B)
        with torch.no_grad():
            self.P.copy_(initial)
        del initial
        self.reset_optimizer()
        self.loss_sum.zero_()
        graph = torch.cuda.CUDAGraph()
        with graph_capture(graph):
            self._compute(self.B)
        self.graph = graph

    def __call__(self, s: int, e: int) -> None:
        r = e - s
        if self.graph is None and self.graphed:
            self.prepare()
        self._fill(s, e)
        self._set_rows(r)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._compute(r)
