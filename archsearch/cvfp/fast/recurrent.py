"""The truly recurrent validation pass (cvfp.md 5) for the standard ContextLayer form.

The pass is inherently sequential, so it is latency. Each ContextLayer is
``LN(c + ReLU(W_c c + W_t x + b))``, W_c = fc.weight[:, :C] by model.py's column contract. The token half ``W_t x + b`` does
not depend on the recurrence, so it is computed for every position in one batched product;
the sequential loop then does, per step and layer, one (C x C) matrix-vector product, the
residual and the LayerNorm. On GPUs with Triton the whole loop is one persistent kernel
(kernels.py) with a grid-wide barrier per layer; the fallback is one fused kernel per
layer and step replayed from a CUDA graph of ``GRAPH_STEPS`` steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from archsearch.config import RunConfig
from archsearch.cvfp.fast.device import graph_capture, triton_available
from archsearch.cvfp.model import ContextBlock, TokenEmbedding

GRAPH_STEPS = 128  # steps per captured graph (even, see triton_pass)


def _token_half(block: ContextBlock, emb: TokenEmbedding, windows: torch.Tensor, batch: int) -> torch.Tensor:
    """(L, T, C): W_t x_t + b for every layer and position, in float32."""
    C = block.context_dim
    T = windows.shape[0]
    out = torch.empty(len(block.layers), T, C, device=windows.device)
    for s in range(0, T, batch):
        x = emb.vectors(windows[s : s + batch])  # (b, E*k)
        for i, layer in enumerate(block.layers):
            out[i, s : s + batch] = F.linear(x, layer.fc.weight[:, C:], layer.fc.bias)
    return out


def _steps(ctx, P, Wc, norms, out, eps):
    """Advance the recurrence over P.shape[1] steps. ctx (C,) is updated in place."""
    for t in range(P.shape[1]):
        c = ctx
        for i, (w, (g, b)) in enumerate(zip(Wc, norms)):
            h = torch.addmv(P[i, t], w, c)  # (C,) = W_c c + (W_t x + b)
            c = F.layer_norm(c + torch.relu(h), (c.shape[0],), g, b, eps)
            out[i, t] = c
        ctx.copy_(c)


@torch.no_grad()
def recurrent_pass(block: ContextBlock, emb: TokenEmbedding, windows: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """(L, T, C) layer outputs for T positions, the context starting at zero, in float32: the
    same values as phases.val_context_cache (to rounding) for a standard ContextBlock. On the
    CPU this split form (the token half batched) is what every run uses."""
    C = block.context_dim
    T = windows.shape[0]
    device = windows.device
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        P = _token_half(block, emb, windows, cfg.engine.eval_batch_size)  # (L, T, C)
        Wc = [layer.fc.weight[:, :C].contiguous() for layer in block.layers]  # (C, C) each
        norms = [(layer.norm.weight, layer.norm.bias) for layer in block.layers]
        eps = block.layers[0].norm.eps
        out = torch.empty_like(P)
        ctx = torch.zeros(C, device=device)
        mode = cfg.engine.recurrent
        fused = triton_available(device)
        if mode in ("auto", "persistent") and fused:
            from archsearch.cvfp.fast.kernels import recurrent_persistent

            G = torch.stack([g for g, _ in norms]).contiguous()
            B = torch.stack([b for _, b in norms]).contiguous()
            result = recurrent_persistent(P, torch.stack(Wc).contiguous(), G, B, eps)
            if result is not None:
                return result
        if mode in ("auto", "persistent", "graph") and fused:
            return triton_pass(P, Wc, norms, eps)
        if mode == "graph" and device.type == "cuda" and T >= GRAPH_STEPS:
            _graph_pass(ctx, P, Wc, norms, out, eps)
        else:
            _steps(ctx, P, Wc, norms, out, eps)
        return out
    finally:
        torch.set_float32_matmul_precision(old)


def recurrent_passes(blocks: list[ContextBlock], emb: TokenEmbedding, windows: torch.Tensor, cfg: RunConfig) -> list[torch.Tensor]:
    """:func:`recurrent_pass` of several ContextBlocks of one shape over the same positions
    (a trial's sizes share the validation stream and the model shape): one (L, T, C) tensor
    per block, in order. Today one pass after another."""
    return [recurrent_pass(block, emb, windows, cfg) for block in blocks]


def _graph_pass(ctx, P, Wc, norms, out, eps) -> None:
    """Replay one captured graph of GRAPH_STEPS steps; the tail runs eagerly."""
    L, T, C = P.shape
    S = GRAPH_STEPS
    static_P = torch.empty(L, S, C, device=P.device)
    static_out = torch.empty(L, S, C, device=P.device)
    static_ctx = ctx.clone()
    static_P.copy_(P[:, :S])
    warm = static_ctx.clone()
    _steps(warm, static_P, Wc, norms, static_out, eps)  # warm-up outside the capture, as CUDA graphs require
    graph = torch.cuda.CUDAGraph()
    with graph_capture(graph):
        _steps(static_ctx, static_P, Wc, norms, static_out, eps)
    full = (T // S) * S
    static_ctx.copy_(ctx)
    for s in range(0, full, S):
        static_P.copy_(P[:, s : s + S])
        graph.replay()
        out[:, s : s + S].copy_(static_out)
    ctx.copy_(static_ctx)
    if full < T:
        _steps(ctx, P[:, full:], Wc, norms, out[:, full:], eps)


def triton_pass(P, Wc, norms, eps, rows: int = 8, use_graph: bool = True, steps: int = GRAPH_STEPS) -> torch.Tensor:
    """The recurrence as one fused kernel per layer and step, replayed from a CUDA graph.

    Global kernel k finishes layer (k-1) % L of step (k-1) // L and starts layer k % L of
    step k // L; kernel 0 starts from the zero context. A graph holds S*L consecutive
    kernels (S = ``steps`` steps, S*L even); the token halves P and the outputs go through
    static buffers."""
    from archsearch.cvfp.fast.kernels import recurrent_step

    L, T, C = P.shape
    S = steps
    chunks = -(-T // S)
    device = P.device
    Ppad = torch.zeros(L, chunks * S + 1, C, device=device)
    Ppad[:, :T] = P
    W = torch.stack(Wc).contiguous()  # (L, C, C)
    G = torch.stack([g for g, _ in norms]).contiguous()  # (L, C)
    B = torch.stack([b for _, b in norms]).contiguous()
    xb, hb = torch.zeros(2, C, device=device), torch.zeros(2, C, device=device)
    out = torch.empty(L, chunks * S, C, device=device)
    static_P = torch.empty(L, S + 1, C, device=device)
    static_out = torch.empty(L, S, C, device=device)
    scratch = torch.zeros(4, C, device=device)

    def launch(kk: int) -> None:  # local kernel kk of a chunk (S*L is even: parities repeat)
        j, i = kk % L, (kk + 1) % L
        recurrent_step(xb[kk % 2], hb[kk % 2], xb[(kk + 1) % 2], hb[(kk + 1) % 2], G[j], B[j], W[i],
                       static_P[i, (kk + 1) // L], static_out[j, kk // L], eps, rows=rows)  # fmt: skip

    def chunk() -> None:
        for kk in range(S * L):
            launch(kk)

    replay = chunk
    if use_graph:
        # compile both variants outside the capture, on scratch buffers
        recurrent_step(scratch[0], scratch[1], scratch[2], scratch[3], G[0], B[0], W[0], P[0, 0], scratch[2], eps, first=True, rows=rows)
        recurrent_step(scratch[0], scratch[1], scratch[2], scratch[3], G[0], B[0], W[0], P[0, 0], scratch[2], eps, rows=rows)
        torch.cuda.current_stream(device).synchronize()
        graph = torch.cuda.CUDAGraph()
        with graph_capture(graph):
            chunk()
        replay = graph.replay
    # kernel 0: the zero context (xb[1] is still zero) starts layer 0 of step 0
    recurrent_step(xb[1], hb[1], xb[0], hb[0], G[0], B[0], W[0], Ppad[0, 0], scratch[2], eps, first=True, rows=rows)
    for r in range(chunks):
        t0 = r * S
        static_P.copy_(Ppad[:, t0 : t0 + S + 1])
        replay()
        out[:, t0 : t0 + S].copy_(static_out)
    return out[:, :T]
