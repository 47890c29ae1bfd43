"""The truly recurrent validation pass (cvfp.md 5) for the standard ContextLayer form.

The pass is inherently sequential, so it is latency. Each ContextLayer is
``LN(c + ReLU(W_c c + W_t x + b))``, W_c = fc.weight[:, :C] by model.py's column contract. The token half ``W_t x + b`` does
not depend on the recurrence, so it is computed for every position in one batched product;
the sequential loop then does, per step and layer, one (C x C) matrix-vector product, the
residual and the LayerNorm. On GPUs with Triton the whole loop is one persistent kernel
(recurrent_kernels.py) with a barrier per layer, and the passes of several blocks of one
shape (a trial's sizes) share one launch: the GPU carries several recurrences per step. The
fallback is one fused kernel per layer and step replayed from a CUDA graph of
``GRAPH_STEPS`` steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from archsearch.config import RunConfig
from archsearch.cvfp.fast.device import graph_capture, sm_count, triton_available
from archsearch.cvfp.model import ContextBlock, TokenEmbedding

log = logging.getLogger(__name__)

GRAPH_STEPS = 128  # steps per captured graph (even, see triton_pass)
MEMORY_FRACTION = 0.9  # of the memory available to the process (gpu_share.available_bytes) a batch of passes may take (its P and outputs)


@dataclass(frozen=True)
class Variant:
    """One launch of the persistent kernel (recurrent_kernels.recurrent_batched)."""

    runs: int
    """Passes per launch."""
    sync: str
    """How a run's programs wait for each other: atomic | volatile | flag."""
    rows: int
    """Rows of W_c per program: a run has ceil(C / rows) programs."""
    sub: int | None = None
    """Rows per sub-tile (None = rows: the tile stays in registers)."""
    warps: int | None = None
    """Warps per program (None: 4 up to C = 1024, else 8)."""
    per_sm: int = 1
    """The most programs per multiprocessor this entry may use (the compiled kernel may allow
    fewer); 1 keeps every program on a multiprocessor of its own."""


# The rule: a shape's tile (rows per program) is today's one-run tile, the fewest rows (8, 16,
# 32) whose ceil(C / rows) programs fit one per multiprocessor; for R passes, the first entry of
# that tile with runs <= R whose launch fits (the device holds all its programs at once, at most
# per_sm per multiprocessor, and its inputs and outputs fit in MEMORY_FRACTION of the free
# memory) takes the next `runs` passes; the rest go the same way; a pass no entry takes runs on
# the graphed kernels. One tile per shape, so a pass's bits do not depend on how many passes its
# trial batched (entries of one tile give the same bits whatever their runs and sync). Measured
# on an H200 (2026-12-01, scripts/bench_recurrent.py, benchmarks/h200_recurrent.json), L6/C768,
# us per run-step: the 'atomic' wait at rows 8 R1 13.4 / R2 7.6 / R4 6.0, the 'flag' wait 11.9 /
# 7.3 / 6.1 (other tiles were at most 7 % faster at R4 and give other bits). The wait is the
# atomic counter: the flag wait raced (scripts/check_determinism.py, the same pass repeated on an
# H200: at L2/C64, rows 8, 2 of 5 repeats differed from the first, by up to 0.29; the atomic and
# volatile waits gave 5 of 5 equal there and at every other shape tried), so it stays a variant
# of the bench, not of PLAN. Passes of one tile give the same bits whatever the wait.
PLAN: tuple[Variant, ...] = tuple(Variant(n, "atomic", rows, per_sm=3) for rows in (8, 16, 32) for n in (4, 3, 2, 1))


def tile_rows(C: int, sms: int) -> int:
    """Rows per program of a shape's tile: the fewest whose programs fit one per multiprocessor."""
    return next((r for r in (8, 16, 32) if -(-C // r) <= sms), 32)


def _token_half(block: ContextBlock, emb: TokenEmbedding, windows: torch.Tensor, batch: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """(L, T, C): W_t x_t + b for every layer and position, in float32 (into ``out`` if given)."""
    C = block.context_dim
    T = windows.shape[0]
    if out is None:
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


def _recurrent_weights(block: ContextBlock):
    """W_c (L, C, C), LayerNorm weights and biases (L, C) each, contiguous, and the norms' eps."""
    C = block.context_dim
    W = torch.stack([layer.fc.weight[:, :C] for layer in block.layers]).contiguous()
    G = torch.stack([layer.norm.weight for layer in block.layers]).contiguous()
    B = torch.stack([layer.norm.bias for layer in block.layers]).contiguous()
    return W, G, B, block.layers[0].norm.eps


@torch.no_grad()
def recurrent_pass(block: ContextBlock, emb: TokenEmbedding, windows: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """(L, T, C) layer outputs for T positions, the context starting at zero, in float32: the
    same values as phases.val_context_cache (to rounding) for a standard ContextBlock. On the
    CPU this split form (the token half batched) is what every run uses."""
    return recurrent_passes([block], emb, windows, cfg)[0]


@torch.no_grad()
def recurrent_passes(blocks: list[ContextBlock], emb: TokenEmbedding, windows: torch.Tensor, cfg: RunConfig) -> list[torch.Tensor]:
    """:func:`recurrent_pass` of several ContextBlocks of one shape over the same positions
    (a trial's sizes share the validation stream and the model shape): one (L, T, C) tensor
    per block, in order. With the persistent kernel (``engine.recurrent`` auto or
    persistent, CUDA and Triton), PLAN decides which passes share a launch."""
    if not blocks:
        return []
    shapes = {(len(b.layers), b.context_dim, b.layers[0].norm.eps) for b in blocks}
    if len(shapes) > 1:
        raise ValueError(f"recurrent_passes: the blocks must share one shape (num_layers, context_dim, LayerNorm eps), got {sorted(shapes)}")
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        if cfg.engine.recurrent in ("auto", "persistent") and triton_available(windows.device):
            return _batched_passes(blocks, emb, windows, cfg)
        return [_one_pass(block, emb, windows, cfg) for block in blocks]
    finally:
        torch.set_float32_matmul_precision(old)


def _one_pass(block: ContextBlock, emb: TokenEmbedding, windows: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """One pass without the persistent kernel: graphed Triton kernels, a graphed or an eager loop."""
    C = block.context_dim
    T = windows.shape[0]
    device = windows.device
    P = _token_half(block, emb, windows, cfg.engine.eval_batch_size)  # (L, T, C)
    Wc = [layer.fc.weight[:, :C].contiguous() for layer in block.layers]  # (C, C) each
    norms = [(layer.norm.weight, layer.norm.bias) for layer in block.layers]
    eps = block.layers[0].norm.eps
    mode = cfg.engine.recurrent
    if mode in ("auto", "persistent", "graph") and triton_available(device):
        return triton_pass(P, Wc, norms, eps)
    out = torch.empty_like(P)
    ctx = torch.zeros(C, device=device)
    if mode == "graph" and device.type == "cuda" and T >= GRAPH_STEPS:
        _graph_pass(ctx, P, Wc, norms, out, eps)
    else:
        _steps(ctx, P, Wc, norms, out, eps)
    return out


def _fits(v: Variant, left: int, L: int, T: int, C: int, device: torch.device, interpret: bool) -> bool:
    """Whether PLAN entry ``v`` may take ``v.runs`` of ``left`` passes of shape (L, T, C) now."""
    from archsearch.cvfp.fast.recurrent_kernels import resident_programs

    if v.runs > left:
        return False
    grid = v.runs * -(-C // v.rows)
    if interpret:  # the interpreter runs one program after another: one program per run
        return grid == v.runs
    sms = sm_count(device)
    try:
        resident = resident_programs(device, L, C, v.rows, v.sub, v.warps, v.sync)
    except Exception as e:  # a variant that does not compile here: the next entry (a bug, so said)
        log.warning("recurrent kernel %s does not compile here (%s: %s); PLAN's next entry is used", v, type(e).__name__, e)
        return False
    if grid > min(sms * v.per_sm, resident):
        return False
    from archsearch.gpu_share import available_bytes

    free = available_bytes(device)  # free and the allocator's cached blocks, within a sharing worker's cap
    need = v.runs * 4 * (2 * L * T * C + L * C * C + 2 * L * C)  # P, outputs, W, G, B in float32
    return need <= MEMORY_FRACTION * free


def _batched_passes(blocks, emb, windows, cfg, plan: tuple[Variant, ...] = PLAN, interpret: bool = False) -> list[torch.Tensor]:
    """The passes by PLAN (``interpret``: the residency rule of Triton's interpreter instead of
    the device's, for the CPU tests): each launch's token halves go straight into one stacked
    (runs, L, T, C) tensor; the outputs are views of the launch's (runs, L, T, C) result."""
    from archsearch.cvfp.fast.recurrent_kernels import BarrierTimeout, recurrent_batched

    L, C, T = len(blocks[0].layers), blocks[0].context_dim, windows.shape[0]
    device = windows.device
    outs: list[torch.Tensor] = []
    if not interpret:  # one tile per shape (see PLAN)
        rows = tile_rows(C, sm_count(device))
        plan = tuple(v for v in plan if v.rows == rows)
    while len(outs) < len(blocks):
        left = len(blocks) - len(outs)
        v = next((v for v in plan if _fits(v, left, L, T, C, device, interpret)), None)
        group = blocks[len(outs) : len(outs) + (v.runs if v else 1)]
        out = None
        if v is not None:
            P = torch.empty(v.runs, L, T, C, device=device)
            for r, block in enumerate(group):
                _token_half(block, emb, windows, cfg.engine.eval_batch_size, out=P[r])
            weights = [_recurrent_weights(block) for block in group]
            W = torch.stack([w for w, _, _, _ in weights])  # (runs, L, C, C)
            G = torch.stack([g for _, g, _, _ in weights])  # (runs, L, C)
            B = torch.stack([b for _, _, b, _ in weights])
            eps = weights[0][3]
            try:
                out = recurrent_batched(P, W, G, B, eps, rows=v.rows, sub=v.sub, warps=v.warps, sync=v.sync, check_residency=not interpret)
            except BarrierTimeout as e:  # e.g. another thread's persistent launch held multiprocessors
                log.warning("%s; these passes run on the graphed kernels", e)
                plan = ()  # no more persistent launches in this call
            del P
        if out is None:
            outs.extend(_one_pass(block, emb, windows, cfg) for block in group)
        else:
            outs.extend(out.unbind(0))
    return outs


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
    from archsearch.cvfp.fast.recurrent_kernels import recurrent_step

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
